"""A real S3-compatible server for tests: moto's standalone server on a free loopback port.

    with S3Server() as s3:              # needs ``moto[server]`` (a test dependency)
        s3.create_bucket("files")
        app.config["CHATKIT_FILES_URL"] = "s3://files/chat"
        app.config["CHATKIT_S3_ENDPOINT_URL"] = s3.url

It speaks the S3 HTTP API (signatures, multipart uploads, listings) like MinIO would; boto3
needs credentials to sign with: :data:`CREDENTIALS` (any values; set them in the environment).
"""

from __future__ import annotations

import socket
from typing import Any, Self

__all__ = ["CREDENTIALS", "S3Server"]

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-access-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """moto's ``ThreadedMotoServer`` on 127.0.0.1 and a free port (started on ``__enter__``)."""

    def __init__(self) -> None:
        self.port = 0
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        from moto.server import ThreadedMotoServer

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A boto3 S3 client for this server (signing with :data:`CREDENTIALS`)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        )
        return sorted(entry["Key"] for page in pages for entry in page.get("Contents", ()))
