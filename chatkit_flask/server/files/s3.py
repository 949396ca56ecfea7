"""Attachment bytes in S3-compatible object storage (AWS S3, MinIO, R2, Ceph, ...) via boto3.

Credentials and region come from boto3's usual chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, an instance role...), never from our settings.
Uploads go through boto3's managed transfer: a file up to one part is sent in one request, a
larger one in parts of :data:`PART_BYTES`, so memory stays bounded by one part; an upload whose
chunks raise is aborted and leaves no object.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from . import CHUNK_BYTES, KEY_PATTERN, FileStorage, FilesUnusable, check_key

__all__ = ["S3Files"]

PART_BYTES = 8 * 1024 * 1024


class _ChunkReader(io.RawIOBase):
    """A readable file over an iterator of chunks (what boto3's transfer wants)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._rest = chunk
        size = min(len(buffer), len(self._rest))
        buffer[:size] = self._rest[:size]
        self._rest = self._rest[size:]
        return size


class S3Files(FileStorage):
    """Objects ``<prefix>/<key>`` in ``bucket``; ``endpoint_url`` for a non-AWS service."""

    kind = "s3"

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self._client: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"s3 file storage (bucket {self.bucket})"

    def _s3(self) -> Any:
        """One client per process (boto3 clients are thread-safe, not fork-safe)."""
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                import boto3
                from botocore.config import Config

                self._client = boto3.client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    config=Config(retries={"max_attempts": 3}, connect_timeout=5, read_timeout=30),
                )
                self._pid = os.getpid()
            return self._client

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def write(self, key: str, chunks: Iterable[bytes]) -> int:
        from boto3.s3.transfer import TransferConfig

        counted = _Counted(chunks)
        config = TransferConfig(
            multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=1,
            use_threads=False,
        )
        self._s3().upload_fileobj(_ChunkReader(counted), self.bucket, self._name(key),
                                  Config=config)  # fmt: skip
        return counted.size

    def read(self, key: str) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self._s3().get_object(Bucket=self.bucket, Key=self._name(key))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(key) from None
            raise

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK_BYTES)
            finally:
                body.close()

        return chunks()

    def delete(self, key: str) -> None:
        self._s3().delete_object(Bucket=self.bucket, Key=self._name(key))

    def stored_keys(self) -> Iterator[str]:
        pages = self._s3().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for entry in page.get("Contents", ()):
                name = entry["Key"][len(self.prefix):]
                if KEY_PATTERN.fullmatch(name):
                    yield name

    def probe(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._s3().head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise FilesUnusable(f"bucket {self.bucket!r} cannot be used ({code})") from None
        except BotoCoreError as exc:
            raise FilesUnusable(f"bucket {self.bucket!r} cannot be reached ({type(exc).__name__})"
                                ) from None  # fmt: skip


class _Counted:
    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.size += len(chunk)
            yield chunk
