"""Attachments under gunicorn as shipped (config/gunicorn.conf.py: 3 of server mode's workers,
uploads read through its ASGI adapter; limits in the real Redis): a 2 MB file sent chunked
arrives whole, an upload URL raced by four connections (any worker) is taken exactly once,
and the model receives the image."""

from __future__ import annotations

import base64
import secrets
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import requests

from chatkit_flask.testing.fake_responses import FakeResponses
from tests.test_attachments import png
from tests.test_server_gunicorn import Service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
BIG = png() + b"\x00" * (2 * 1024 * 1024)  # a PNG signature, then 2 MB


@pytest.fixture
def service(
    tmp_path: Path, real_redis: redis.Redis
) -> Iterator[tuple[Service, FakeResponses, Path]]:
    files = tmp_path / "files"
    with FakeResponses(api_key="test-model-key-not-a-real-one") as fake:
        service = Service(
            tmp_path, fake, f"sqlite:///{tmp_path}/threads.db",
            CHATKIT_ATTACHMENTS="true", CHATKIT_FILES_URL=f"file://{files}",
            CHATKIT_ATTACHMENT_MAX_BYTES=str(3 * 1024 * 1024),
        )  # fmt: skip
        try:
            yield service, fake, files
        finally:
            service.stop()
    assert service.tracebacks() == []


def multipart_chunks(data: bytes, boundary: str) -> Iterator[bytes]:
    """A multipart body as chatkit-js sends it, in 64 KB pieces (sent chunked)."""
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"'
           f"\r\nContent-Type: image/png\r\n\r\n").encode()  # fmt: skip
    for start in range(0, len(data), 64 * 1024):
        yield data[start : start + 64 * 1024]
    yield f"\r\n--{boundary}--\r\n".encode()


def test_a_raced_upload_url_is_taken_once_and_the_model_sees_the_image(
    service: tuple[Service, FakeResponses, Path],
) -> None:
    svc, fake, files = service
    params = {"name": "big.png", "size": len(BIG), "mime_type": "image/png"}
    created = svc.post({"type": "attachments.create", "params": params})
    assert created.status_code == 200, created.text
    cookie = created.cookies["chatkit_session_id"]
    attachment: dict[str, Any] = created.json()
    path = urlsplit(attachment["upload_descriptor"]["url"]).path

    def send(_: int) -> int:
        boundary = secrets.token_hex(8)
        with requests.Session() as session:  # a connection each: any worker may take it
            response = session.post(
                svc.base + path, data=multipart_chunks(BIG, boundary), timeout=60,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )  # fmt: skip
        return response.status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = Counter(pool.map(send, range(4)))
    assert statuses == Counter({200: 1, 410: 3}), statuses
    (stored,) = list(files.rglob("atc_*"))
    assert stored.read_bytes() == BIG

    user_input = {"content": [{"type": "input_text", "text": "What is this?"}],
                  "attachments": [attachment["id"]], "inference_options": {}}  # fmt: skip
    answer = svc.post({"type": "threads.create", "params": {"input": user_input}}, cookie)
    assert answer.status_code == 200, answer.text
    (image,) = fake.input_parts("input_image")
    assert base64.b64decode(image["image_url"].partition(",")[2]) == BIG
