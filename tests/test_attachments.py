"""Attachments through HTTP, as the ChatKit UI sends them: ``attachments.create``, the upload of
the bytes to the URL it returns (multipart, field ``file``), a message naming the attachment,
and the model receiving it. Every case runs on the local directory and on a real S3 server
(moto's standalone server, started here), and every refusal leaves no stored bytes.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("chatkit")
pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests")

from flask import Flask
from flask.testing import FlaskClient
from itsdangerous.timed import TimestampSigner

from chatkit_flask.server.files import FileStorage
from chatkit_flask.service import create_app
from chatkit_flask.settings import ConfigError
from chatkit_flask.testing.driver import ChatKitDriver, ChatKitHTTPError
from chatkit_flask.testing.fake_responses import FakeResponses
from chatkit_flask.testing.s3_server import CREDENTIALS, S3Server
from tests.attachment_support import files_backend, s3_server
from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.server_support import sse_events

URL = "/api/chatkit"


def png(width: int = 2, height: int = 2) -> bytes:
    """A real PNG (a grey square)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))  # fmt: skip


PNG = png()
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
HTML = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>" * 4


# ------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    yield from s3_server()


@pytest.fixture(params=["local", "s3"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Where attachment bytes go, and ``stored()``: the names stored there."""
    return files_backend(request, tmp_path, monkeypatch)


@pytest.fixture
def make_app(
    fake: FakeResponses, backend: dict[str, Any], tmp_path: Path
) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def factory(**overrides: Any) -> Flask:
        config: dict[str, Any] = {
            "CHATKIT_BACKEND": "server",
            "OPENAI_API_KEY": TEST_API_KEY,
            "OPENAI_BASE_URL": fake.base_url,
            "SECRET_KEY": TEST_SECRET_KEY,
            "CHATKIT_STORE_URL": f"sqlite:///{tmp_path}/threads.db",
            "CHATKIT_AGENT_MODEL": "gpt-test",
            "CHATKIT_AGENT_INSTRUCTIONS": "Answer briefly.",
            "CHATKIT_COOKIE_SECURE": False,
            "CHATKIT_MODEL_TIMEOUT": 10,
            "CHATKIT_TITLE_MODEL": "off",
            "CHATKIT_ATTACHMENTS": True,
            "CHATKIT_ATTACHMENT_MAX_BYTES": 4096,
            "RATELIMIT_STORAGE_URI": "memory://",
            "TESTING": True,
            **backend["config"],
            **overrides,
        }
        app = create_app(config, environ={})
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["chatkit"].server.bridge.close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def stored(backend: dict[str, Any]) -> Callable[[], list[str]]:
    return backend["stored"]


# -------------------------------------------------------------------- helpers
def post(client: FlaskClient, body: dict[str, Any]) -> Any:
    return client.post(URL, json=body, buffered=True)


def create(client: FlaskClient, data: bytes = PNG, name: str = "cat.png",
           mime: str = "image/png", size: int | None = None) -> Any:  # fmt: skip
    params = {"name": name, "size": len(data) if size is None else size, "mime_type": mime}
    return post(client, {"type": "attachments.create", "params": params})


def upload(client: FlaskClient, attachment: dict[str, Any], data: bytes,
           name: str = "cat.png", mime: str = "image/png") -> Any:  # fmt: skip
    """What chatkit-js does with a two-phase upload: POST multipart, the file in ``file``."""
    descriptor = attachment["upload_descriptor"]
    assert descriptor["method"] == "POST"
    path = urlsplit(descriptor["url"]).path
    return client.post(path, data={"file": (io.BytesIO(data), name, mime)},
                       content_type="multipart/form-data")  # fmt: skip


def attach(client: FlaskClient, data: bytes = PNG, name: str = "cat.png",
           mime: str = "image/png") -> dict[str, Any]:  # fmt: skip
    created = create(client, data, name, mime)
    assert created.status_code == 200, created.data
    uploaded = upload(client, created.get_json(), data, name, mime)
    assert uploaded.status_code == 200, uploaded.data
    return uploaded.get_json()


def message(client: FlaskClient, text: str, attachment_ids: list[str],
            thread_id: str | None = None) -> Any:  # fmt: skip
    user_input = {"content": [{"type": "input_text", "text": text}],
                  "attachments": attachment_ids, "inference_options": {}}  # fmt: skip
    if thread_id is None:
        return post(client, {"type": "threads.create", "params": {"input": user_input}})
    return post(client, {"type": "threads.add_user_message",
                         "params": {"thread_id": thread_id, "input": user_input}})  # fmt: skip


def error_code(response: Any) -> str:
    return response.get_json()["error"]


# ---------------------------------------------------------------------- tests
def test_the_model_receives_an_attached_image_as_input_image(
    app: Flask, fake: FakeResponses, stored: Callable[[], list[str]]
) -> None:
    client = app.test_client()
    created = create(client)
    assert created.status_code == 200, created.data
    body = created.get_json()
    assert body["type"] == "image" and body["id"].startswith("atc_")
    assert "/api/chatkit/uploads/" in body["upload_descriptor"]["url"]
    assert "metadata" not in body  # the upload's nonce digest stays on the server
    assert stored() == []  # nothing before the bytes come

    uploaded = upload(client, body, PNG)
    assert uploaded.status_code == 200, uploaded.data
    assert uploaded.get_json()["upload_descriptor"] is None
    assert stored() == [body["id"]]

    response = message(client, "What is in this picture?", [body["id"]])
    assert response.status_code == 200, response.data
    events = sse_events(response.data)
    assert events[-1]["type"] == "thread.item.done", events
    (image,) = fake.input_parts("input_image")
    assert image["image_url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    user_item = next(e["item"] for e in events
                     if e["type"] == "thread.item.done" and e["item"]["type"] == "user_message")
    assert [a["id"] for a in user_item["attachments"]] == [body["id"]]

    # The preview the UI shows: only through the signed link, never sniffed or run.
    preview = client.get(urlsplit(user_item["attachments"][0]["preview_url"]).path)
    assert preview.status_code == 200 and preview.data == PNG
    assert preview.headers["Content-Type"] == "image/png"
    assert preview.headers["X-Content-Type-Options"] == "nosniff"
    assert preview.headers["Content-Disposition"].startswith("inline;")
    assert "sandbox" in preview.headers["Content-Security-Policy"]

    # A deleted thread leaves no bytes (and no preview).
    thread_id = events[0]["thread"]["id"]
    deleted = post(client, {"type": "threads.delete", "params": {"thread_id": thread_id}})
    assert deleted.status_code == 200, deleted.data
    assert stored() == []
    assert client.get(urlsplit(user_item["attachments"][0]["preview_url"]).path).status_code == 404


def test_a_pdf_reaches_the_model_as_input_file(
    app: Flask, fake: FakeResponses, stored: Callable[[], list[str]]
) -> None:
    client = app.test_client()
    attachment = attach(client, PDF, "report.pdf", "application/pdf")
    assert attachment["type"] == "file"
    response = message(client, "Summarise it", [attachment["id"]])
    assert response.status_code == 200, response.data
    (part,) = fake.input_parts("input_file")
    assert part["filename"] == "report.pdf"
    assert part["file_data"] == "data:application/pdf;base64," + base64.b64encode(PDF).decode()


def test_an_oversized_file_is_refused_with_no_bytes_kept(
    app: Flask, fake: FakeResponses, stored: Callable[[], list[str]]
) -> None:
    client = app.test_client()
    big = PNG + b"\x00" * 5000
    refused = create(client, big)
    assert refused.status_code == 413 and error_code(refused) == "too_large"
    # Declared small, sent large: refused while streaming, the partial bytes dropped.
    created = create(client, PNG, size=len(PNG))
    uploaded = upload(client, created.get_json(), big)
    assert uploaded.status_code == 413 and error_code(uploaded) == "too_large"
    assert stored() == []
    unready = message(client, "here", [created.get_json()["id"]])
    assert unready.status_code == 400 and error_code(unready) == "attachment_not_ready"
    assert fake.count == 0


def test_a_file_whose_content_is_not_an_allowed_type_is_refused(
    app: Flask, stored: Callable[[], list[str]]
) -> None:
    client = app.test_client()
    created = create(client, HTML, "cat.png", "image/png")  # HTML named and declared as PNG
    assert created.status_code == 200
    uploaded = upload(client, created.get_json(), HTML)
    assert uploaded.status_code == 415 and error_code(uploaded) == "unsupported_type"
    declared = create(client, HTML, "page.html", "text/html")
    assert declared.status_code == 415 and error_code(declared) == "unsupported_type"
    # A PDF sent for a declared image is refused too: an image stays an image.
    created = create(client, PDF, "cat.png", "image/png")
    assert upload(client, created.get_json(), PDF).status_code == 415
    assert stored() == []


def test_another_visitors_attachment_cannot_be_used_deleted_or_seen(
    app: Flask, fake: FakeResponses, stored: Callable[[], list[str]]
) -> None:
    alice, mallory = app.test_client(), app.test_client()
    attachment = attach(alice)
    used = message(mallory, "look", [attachment["id"]])
    assert used.status_code == 404 and error_code(used) == "not_found"
    assert used.get_json()["message"] == "No such attachment."  # not "No such conversation."
    gone = post(mallory, {"type": "attachments.delete",
                          "params": {"attachment_id": attachment["id"]}})  # fmt: skip
    assert gone.status_code == 404
    assert gone.get_json()["message"] == "No such attachment."
    preview = urlsplit(attachment["preview_url"]).path
    forged = preview[:-4] + ("AAAA" if not preview.endswith("AAAA") else "BBBB")
    assert mallory.get(forged).status_code == 404
    assert fake.count == 0  # no model call for a refused message
    assert stored() == [attachment["id"]]  # Alice's bytes untouched, none of Mallory's
    # Alice's own delete removes the bytes.
    deleted = post(alice, {"type": "attachments.delete",
                           "params": {"attachment_id": attachment["id"]}})  # fmt: skip
    assert deleted.status_code == 200, deleted.data
    assert stored() == []


def test_an_upload_url_works_once_and_expires(
    app: Flask, monkeypatch: pytest.MonkeyPatch, stored: Callable[[], list[str]]
) -> None:
    client = app.test_client()
    created = create(client).get_json()
    assert upload(client, created, PNG).status_code == 200
    again = upload(client, created, png(3, 3))
    assert again.status_code == 410 and error_code(again) == "upload_used"
    assert stored() == [created["id"]]
    assert client.get(urlsplit(created["preview_url"]).path).data == PNG  # the first bytes

    # A URL older than CHATKIT_ATTACHMENT_UPLOAD_TTL (300 s by default).
    real = TimestampSigner.get_timestamp
    monkeypatch.setattr(TimestampSigner, "get_timestamp", lambda self: real(self) - 301)
    late = create(client).get_json()
    monkeypatch.setattr(TimestampSigner, "get_timestamp", real)
    expired = upload(client, late, PNG)
    assert expired.status_code == 410 and error_code(expired) == "upload_expired"
    tampered = dict(late, upload_descriptor={**late["upload_descriptor"],
                                             "url": late["upload_descriptor"]["url"] + "x"})
    assert upload(client, tampered, PNG).status_code == 404
    assert stored() == [created["id"]]


def test_the_daily_total_per_visitor_is_kept(
    make_app: Callable[..., Flask], stored: Callable[[], list[str]]
) -> None:
    app = make_app(CHATKIT_ATTACHMENT_DAILY_BYTES=8192)
    client, other = app.test_client(), app.test_client()
    assert create(client, size=4096).status_code == 200
    assert create(client, size=4000).status_code == 200
    refused = create(client, size=200)
    assert refused.status_code == 429 and error_code(refused) == "upload_quota"
    assert 0 < int(refused.headers["Retry-After"]) <= 86_400
    assert create(other, size=4096).status_code == 200  # another visitor has their own total
    assert stored() == []


def test_uploads_count_against_the_per_ip_request_limit(
    make_app: Callable[..., Flask], stored: Callable[[], list[str]]
) -> None:
    app = make_app(CHATKIT_RATELIMIT_REQUESTS_PER_IP="3 per minute")
    client = app.test_client()
    first = create(client).get_json()
    second = create(client).get_json()
    assert upload(client, first, PNG).status_code == 200  # the third request
    limited = upload(client, second, PNG)
    assert limited.status_code == 429
    assert stored() == [first["id"]]


def test_prune_and_purge_delete_the_files_too(
    app: Flask, stored: Callable[[], list[str]]
) -> None:
    client = app.test_client()
    kept = attach(client)
    assert message(client, "keep this", [kept["id"]]).status_code == 200
    files: FileStorage = app.extensions["chatkit"].server.files
    orphan = "atc_" + "0" * 32
    files.write(orphan, [PNG])  # bytes whose metadata is gone (a crash, an expired thread)
    leftovers: list[Path] = []
    root = getattr(files, "root", None)
    if root is not None:  # a local write a crash interrupted an hour ago, and one under way
        for age, name in ((7200, ".incoming-old"), (0, ".incoming-now")):
            path = root / "00" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(PNG)
            os.utime(path, (path.stat().st_atime - age, path.stat().st_mtime - age))
            leftovers.append(path)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["chatkit", "prune"])
    assert result.exit_code == 0, result.output
    expected = 2 if leftovers else 1
    assert f"Deleted {expected} attachment file(s)" in result.output
    assert stored() == [kept["id"]]
    assert [path.exists() for path in leftovers] == ([False, True] if leftovers else [])

    cookie = client.get_cookie("chatkit_session_id")
    assert cookie is not None
    result = runner.invoke(args=["chatkit", "purge", "--visitor", cookie.value, "--yes"])
    assert result.exit_code == 0, result.output
    assert "1 attachment(s)" in result.output
    assert stored() == []


def test_the_config_tells_the_page_to_show_the_upload_button(app: Flask) -> None:
    config = app.test_client().get(URL + "/config").get_json()
    assert config["uploadStrategy"] == {"type": "two_phase"}
    assert config["attachments"]["enabled"] is True
    assert config["attachments"]["maxSize"] == 4096
    assert "image/png" in config["attachments"]["accept"]


def test_attachments_are_refused_when_off(make_app: Callable[..., Flask]) -> None:
    client = make_app(CHATKIT_ATTACHMENTS=False).test_client()
    refused = create(client)
    assert refused.status_code == 400 and error_code(refused) == "unsupported_request"
    assert "attachments" not in client.get(URL + "/config").get_json()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CHATKIT_FILES_URL", "ftp://host/files"),
        ("CHATKIT_ATTACHMENT_TYPES", "text/html"),
        ("CHATKIT_ATTACHMENT_TYPES", "image/png,image/svg+xml"),
        ("CHATKIT_ATTACHMENT_DAILY_BYTES", "100"),
        ("CHATKIT_S3_ENDPOINT_URL", "http://user:pw@minio:9000"),
    ],
)
def test_bad_attachment_settings_stop_start_up(
    make_app: Callable[..., Flask], key: str, value: str
) -> None:
    with pytest.raises(ConfigError) as error:
        make_app(**{key: value})
    assert error.value.key == key
    assert "pw" not in str(error.value)


def test_an_unreachable_bucket_stops_start_up(make_app: Callable[..., Flask], s3: S3Server,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        make_app(CHATKIT_FILES_URL="s3://no-such-bucket", CHATKIT_S3_ENDPOINT_URL=s3.url)
    assert error.value.key == "CHATKIT_FILES_URL" and "no-such-bucket" in str(error.value)


def test_a_later_message_sends_the_image_again_with_the_history(
    app: Flask, fake: FakeResponses
) -> None:
    client = app.test_client()
    attachment = attach(client)
    events = sse_events(message(client, "Look", [attachment["id"]]).data)
    thread_id = events[0]["thread"]["id"]
    followed = message(client, "And now?", [], thread_id)
    assert followed.status_code == 200, followed.data
    assert len(fake.input_parts("input_image")) == 1  # from the first message, in the history
    reused = message(client, "Again", [attachment["id"]])  # a new thread: already used
    assert reused.status_code == 400 and error_code(reused) == "attachment_in_use"


def test_a_storage_failure_is_a_503_not_a_crash(
    make_app: Callable[..., Flask], s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    s3.create_bucket("doomed")
    app = make_app(CHATKIT_FILES_URL="s3://doomed", CHATKIT_S3_ENDPOINT_URL=s3.url)
    client = app.test_client()
    created = create(client).get_json()
    s3.client().delete_bucket(Bucket="doomed")  # the storage goes away under the server
    failed = upload(client, created, PNG)
    assert failed.status_code == 503 and error_code(failed) == "files_unavailable"
    assert failed.headers["Retry-After"] == "5"


@pytest.mark.redis
def test_attachments_live_in_the_redis_store_too(
    make_app: Callable[..., Flask], fake: FakeResponses, stored: Callable[[], list[str]],
    redis_server: Any,
) -> None:
    import redis

    from tests.services import SUITE_REDIS

    url = SUITE_REDIS.url(9)
    redis.Redis.from_url(url).flushdb()
    app = make_app(CHATKIT_STORE_URL=url)
    alice, mallory = app.test_client(), app.test_client()
    attachment = attach(alice)
    assert message(mallory, "mine?", [attachment["id"]]).status_code == 404
    events = sse_events(message(alice, "Look", [attachment["id"]]).data)
    assert len(fake.input_parts("input_image")) == 1
    thread_id = events[0]["thread"]["id"]
    assert post(alice, {"type": "threads.delete",
                        "params": {"thread_id": thread_id}}).status_code == 200  # fmt: skip
    assert stored() == []
    assert redis.Redis.from_url(url).keys("chatkit:store:attachment:*") == []
    redis.Redis.from_url(url).flushdb()


@pytest.mark.postgres
def test_attachments_live_in_the_postgres_store_too(
    make_app: Callable[..., Flask], fake: FakeResponses, stored: Callable[[], list[str]],
    postgres_tables: str,
) -> None:
    """The SQL store on PostgreSQL: the image reaches the model, another visitor cannot use
    it, a deleted thread leaves neither bytes nor rows, and purge takes an unsent one."""
    import sqlalchemy as sa

    app = make_app(CHATKIT_STORE_URL=postgres_tables)
    alice, mallory = app.test_client(), app.test_client()
    attachment = attach(alice)
    assert message(mallory, "mine?", [attachment["id"]]).status_code == 404
    events = sse_events(message(alice, "Look", [attachment["id"]]).data)
    assert len(fake.input_parts("input_image")) == 1
    thread_id = events[0]["thread"]["id"]
    assert stored() == [attachment["id"]]
    assert post(alice, {"type": "threads.delete",
                        "params": {"thread_id": thread_id}}).status_code == 200  # fmt: skip
    assert stored() == []

    unsent = attach(alice)
    cookie = alice.get_cookie("chatkit_session_id")
    assert cookie is not None
    result = app.test_cli_runner().invoke(
        args=["chatkit", "purge", "--visitor", cookie.value, "--yes"]
    )
    assert result.exit_code == 0, result.output
    assert "1 attachment(s)" in result.output
    assert unsent["id"] not in stored()
    engine = sa.create_engine(postgres_tables, poolclass=sa.NullPool)
    with engine.connect() as db:
        assert db.scalar(sa.text("SELECT count(*) FROM chatkit_attachments")) == 0
    engine.dispose()


def test_a_message_with_too_many_or_unknown_attachments_is_refused_before_the_model(
    make_app: Callable[..., Flask], fake: FakeResponses
) -> None:
    client = make_app(CHATKIT_ATTACHMENTS_PER_MESSAGE=1).test_client()
    first, second = attach(client), attach(client)
    refused = message(client, "both", [first["id"], second["id"]])
    assert refused.status_code == 400 and error_code(refused) == "too_many_attachments"
    unknown = message(client, "which?", ["atc_" + "f" * 32])
    assert unknown.status_code == 404
    malformed = message(client, "which?", ["../../etc/passwd"])
    assert malformed.status_code == 404
    assert fake.count == 0
    assert post(client, {"type": "threads.list", "params": {}}).get_json()["data"] == []


def test_flask_chatkit_check_round_trips_the_attachment_storage(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["chatkit", "check"])
    assert "Attachment storage:" in result.output, result.output
    assert "wrote, read back and deleted a probe file" in result.output
    assert TEST_SECRET_KEY not in result.output


def test_a_site_test_attaches_a_file_with_the_driver(app: Flask, fake: FakeResponses) -> None:
    chat = ChatKitDriver(app.test_client())
    attachment = chat.attach(PNG, "cat.png", "image/png")
    reply = chat.send("What is this?", attachments=[attachment["id"]])
    assert reply.text.startswith("You said")
    (image,) = fake.input_parts("input_image")
    assert image["image_url"].endswith(base64.b64encode(PNG).decode())
    with pytest.raises(ChatKitHTTPError) as refused:
        chat.attach(HTML, "page.png", "image/png")
    assert refused.value.status == 415


def test_with_limits_off_an_upload_url_still_works_once(
    make_app: Callable[..., Flask], stored: Callable[[], list[str]]
) -> None:
    client = make_app(RATELIMIT_ENABLED=False).test_client()
    created = create(client, size=4096).get_json()  # no daily total to count it in
    assert upload(client, created, PNG).status_code == 200
    assert upload(client, created, PNG).status_code == 410
    assert stored() == [created["id"]]


def test_a_file_larger_than_one_part_streams_through_and_a_refusal_mid_way_keeps_nothing(
    make_app: Callable[..., Flask], stored: Callable[[], list[str]]
) -> None:
    big = PNG + os.urandom(9 * 1024 * 1024)  # over the 8 MiB part: S3 takes it in parts
    app = make_app(CHATKIT_ATTACHMENT_MAX_BYTES=16 * 1024 * 1024,
                   CHATKIT_ATTACHMENT_DAILY_BYTES=64 * 1024 * 1024)  # fmt: skip
    client = app.test_client()
    created = create(client, big).get_json()
    first = upload(client, created, big)
    assert first.status_code == 200, first.data
    assert client.get(urlsplit(created["preview_url"]).path).data == big
    # Declared one byte short: refused after the first part went out; the upload is aborted.
    short = create(client, big, size=len(big) - 1).get_json()
    refused = upload(client, short, big)
    assert refused.status_code == 413
    assert stored() == [created["id"]]
