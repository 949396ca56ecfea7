"""Attachment bytes in a local directory (one host, or a volume every host mounts).

A file is written to a temporary name in the same directory and renamed into place when
complete, so a reader never sees half a file and a refused upload leaves only nothing.
Files sit two levels deep (``ab/atc_ab...``) so no directory grows huge.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import CHUNK_BYTES, KEY_PATTERN, FileStorage, FilesUnusable, check_key

__all__ = ["LocalFiles"]


class LocalFiles(FileStorage):
    """Files under ``root`` (created on first use)."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[4:6] / key

    def write(self, key: str, chunks: Iterable[bytes]) -> int:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        size = 0
        try:
            with os.fdopen(handle, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    size += len(chunk)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return size

    def read(self, key: str) -> Iterator[bytes]:
        handle = open(self._path(key), "rb")  # noqa: SIM115 (closed by the generator)

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(CHUNK_BYTES):
                    yield chunk

        return chunks()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def stored_keys(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for path in self.root.glob("*/atc_*"):
            if KEY_PATTERN.fullmatch(path.name):
                yield path.name

    def drop_partial(self, older_than: float) -> int:
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than
        dropped = 0
        for path in self.root.glob("*/.incoming-*"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    dropped += 1
        return dropped

    def probe(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            raise FilesUnusable(f"cannot write to {self.root}: {exc.strerror}") from None
