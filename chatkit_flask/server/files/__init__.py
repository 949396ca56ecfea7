"""Where attachment bytes live, chosen by ``CHATKIT_FILES_URL``: a local directory
(``file:///path``, the default: ``chatkit-files`` in the app's instance folder) or S3-compatible
object storage (``s3://bucket/prefix``, with ``CHATKIT_S3_ENDPOINT_URL`` for MinIO, R2, ...).

Every backend streams: :meth:`FileStorage.write` takes an iterable of chunks and never holds a
whole file, and a write whose chunks raise leaves nothing behind (the caller refuses an upload
by raising from its chunk iterator). Keys are attachment ids (``atc_`` + 32 hex digits): the
visitor's file name never reaches the storage.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from chatkit_flask.settings import ConfigError

__all__ = [
    "DEFAULT_FILES_DIR",
    "FILES_URL_KEY",
    "KEY_PATTERN",
    "FileStorage",
    "FilesUnusable",
    "open_files",
    "storage_errors",
]

FILES_URL_KEY = "CHATKIT_FILES_URL"
DEFAULT_FILES_DIR = "chatkit-files"  # in the app's instance folder
KEY_PATTERN = re.compile(r"atc_[0-9a-f]{32}")
CHUNK_BYTES = 64 * 1024


class FilesUnusable(Exception):
    """The file storage cannot serve; the message says why without credentials."""


class FileStorage(ABC):
    """Bytes by key. Blocking: call from a request thread or ``asyncio.to_thread``."""

    kind = "files"

    def __str__(self) -> str:
        return f"{self.kind} file storage"

    @abstractmethod
    def write(self, key: str, chunks: Iterable[bytes]) -> int:
        """Store the chunks under ``key``; return the byte count. If iterating ``chunks``
        raises, nothing is stored and the exception propagates."""

    @abstractmethod
    def read(self, key: str) -> Iterator[bytes]:
        """The bytes of ``key`` in chunks; ``FileNotFoundError`` when there are none."""

    def read_all(self, key: str) -> bytes:
        return b"".join(self.read(key))

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``'s bytes; a missing key is not an error."""

    @abstractmethod
    def stored_keys(self) -> Iterator[str]:
        """Every stored key (for the orphan sweep)."""

    def drop_partial(self, older_than: float) -> int:
        """Delete the leftovers of writes a crash interrupted, started more than
        ``older_than`` seconds ago; return how many (S3: a bucket lifecycle rule that aborts
        incomplete multipart uploads does this)."""
        return 0

    @abstractmethod
    def probe(self) -> None:
        """Raise :class:`FilesUnusable` unless the storage can be written (start-up check)."""


def storage_errors() -> tuple[type[Exception], ...]:
    """What a storage raises when it cannot be reached or used: ``OSError`` (a full or
    read-only disk) and, when boto3 is installed, botocore's errors."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def check_key(key: str) -> str:
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError("not an attachment key")
    return key


def open_files(
    url: str | None, *, instance_path: str | None, s3_endpoint_url: str | None = None
) -> FileStorage:
    """The storage ``url`` names (None: the instance folder). Raises ``ConfigError`` naming
    ``CHATKIT_FILES_URL`` for a URL it cannot use."""
    if not url:
        if instance_path is None:
            raise ConfigError(FILES_URL_KEY, "is required when the runtime is built without an app")
        from .local import LocalFiles

        return LocalFiles(Path(instance_path) / DEFAULT_FILES_DIR)
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ConfigError(FILES_URL_KEY, "use file:///absolute/path (no host)")
        from .local import LocalFiles

        return LocalFiles(Path(unquote(parts.path)))
    if scheme == "s3":
        if not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc:
            raise ConfigError(
                FILES_URL_KEY, "use s3://bucket or s3://bucket/prefix (credentials come from the "
                "usual AWS variables, never the URL)",
            )
        from .s3 import S3Files

        return S3Files(parts.netloc, unquote(parts.path).strip("/"), endpoint_url=s3_endpoint_url)
    raise ConfigError(FILES_URL_KEY, "must be file:///path or s3://bucket/prefix")
