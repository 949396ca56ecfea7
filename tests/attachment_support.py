"""Shared by the attachment tests: where the bytes go (a local directory or a bucket on moto's
S3 server) and how a test sees what is stored there."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatkit_flask.testing.s3_server import CREDENTIALS, S3Server

BUCKET = "chat-files"


def s3_server() -> Iterator[S3Server]:
    """For a module fixture: moto's S3 server with the bucket made."""
    with S3Server() as server:
        server.create_bucket(BUCKET)
        yield server


def files_backend(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_files: str = "atc_*",
) -> dict[str, Any]:
    """For a fixture parametrised ``local`` / ``s3`` (the latter needs an ``s3`` fixture): the
    settings (``config``) and ``stored()``, the names stored there (on local storage, those
    matching ``local_files``; ``"*"`` catches half-written files too)."""
    if request.param == "local":
        root = tmp_path / "files"
        return {
            "config": {"CHATKIT_FILES_URL": f"file://{root}"},
            "stored": lambda: sorted(p.name for p in root.rglob(local_files) if p.is_file())
            if root.exists() else [],
        }  # fmt: skip
    s3 = request.getfixturevalue("s3")
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    prefix = f"t{os.urandom(4).hex()}"  # each test its own prefix in the one bucket
    return {
        "config": {"CHATKIT_FILES_URL": f"s3://{BUCKET}/{prefix}",
                   "CHATKIT_S3_ENDPOINT_URL": s3.url},
        "stored": lambda: [key.rsplit("/", 1)[1] for key in s3.keys(BUCKET, prefix + "/")],
    }  # fmt: skip
