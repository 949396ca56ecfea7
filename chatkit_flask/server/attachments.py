"""Attachments: ChatKit's two-phase upload, checked and stored where ``server/files`` says.

1. ``attachments.create`` (a ChatKit request) checks the declared type and size, reserves the
   size in the visitor's daily total (counted in the limiter's storage, Redis across hosts),
   saves the metadata in the thread store and answers with an upload URL on this extension:
   ``{prefix}/uploads/<token>``. The token is signed (the site's ``SECRET_KEY``), names the
   attachment and its owner, expires after ``upload_ttl`` seconds and works once.
2. The browser POSTs the bytes there (``multipart/form-data`` with a ``file`` field, as
   chatkit-js sends them, or a raw body). They are streamed to storage, never held whole: the
   first bytes must be of an allowed type by their own signature (``filetype``), whatever the
   name or header says, and the count may not pass the declared size or the cap. A refused
   upload leaves no bytes.
3. A message may then name the attachment; :class:`AttachmentConverter` gives it to the model
   as ``input_image`` or ``input_file``.

Previews and downloads are served at ``{prefix}/attachments/<token>``: a signed capability URL
handed only to the owner, in their own thread (the ChatKit UI renders previews inside OpenAI's
iframe, where the site's cookie is not sent), with ``Content-Disposition``, ``nosniff`` and a
CSP that runs nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import filetype
from chatkit.agents import ThreadItemConverter
from chatkit.errors import CustomStreamError
from chatkit.store import AttachmentStore, NotFoundError, Store
from chatkit.types import (
    Attachment,
    AttachmentCreateParams,
    AttachmentUploadDescriptor,
    FileAttachment,
    HiddenContextItem,
    ImageAttachment,
    UserMessageItem,
    UserMessageTagContent,
)
from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer
from openai.types.responses import (
    ResponseInputFileParam,
    ResponseInputImageParam,
    ResponseInputTextParam,
)

from .context import RequestContext
from .files import FileStorage, storage_errors

__all__ = [
    "DEFAULT_TYPES",
    "UPLOAD_TYPE",
    "AttachmentConverter",
    "AttachmentNotFound",
    "AttachmentPolicy",
    "AttachmentRefused",
    "Attachments",
]

log = logging.getLogger("chatkit_flask")

UPLOAD_TYPE = "attachments.upload"  # how logs and metrics name an upload to its URL
DEFAULT_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf")
SNIFF_BYTES = 262  # what filetype reads to recognise every type it knows
DAY = 86_400
PARTIAL_AGE = 3_600  # seconds after which an unfinished write is a crash's leftover
MAX_NAME_CHARS = 255
UNAVAILABLE_NOTE = "[An attachment of this message is no longer available.]"
FILES_DOWN_MESSAGE = "Attached files cannot be reached just now. Please try again in a moment."


class AttachmentRefused(Exception):
    """An attachment request refused with ``status`` and a JSON ``code`` (no bytes kept)."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


class AttachmentNotFound(NotFoundError):
    """An attachment that is missing or another's (the same 404 for both), told apart from a
    missing thread so the visitor reads which one."""

    message = "No such attachment."


@dataclass(frozen=True)
class AttachmentPolicy:
    """What visitors may upload: bytes per file and per visitor per day, MIME types (checked
    against the content), seconds an upload URL stays valid, attachments per message."""

    max_bytes: int = 5 * 1024 * 1024
    daily_bytes: int = 50 * 1024 * 1024
    types: frozenset[str] = frozenset(DEFAULT_TYPES)
    upload_ttl: int = 300
    per_message: int = 4


class Attachments(AttachmentStore[RequestContext]):
    """The SDK's ``AttachmentStore`` plus the upload, download and clean-up steps.

    ``store`` is the (owner-scoped) thread store holding the metadata, ``files`` the bytes,
    ``quota_storage()`` the limiter's storage for the daily totals and single-use marks (None
    while limits are off: then no daily total, and single use is kept per process), and
    ``secret_keys`` sign the URLs (the last one signs; older ones still verify).
    """

    def __init__(
        self,
        store: Store[RequestContext],
        files: FileStorage,
        policy: AttachmentPolicy,
        quota_storage: Callable[[], Any],
        secret_keys: list[str],
    ) -> None:
        self.store = store
        self.files = files
        self.policy = policy
        self._quota = quota_storage
        self._uploads = URLSafeTimedSerializer(secret_keys, salt="chatkit-flask.upload")
        self._downloads = URLSafeSerializer(secret_keys, salt="chatkit-flask.download")
        self._used_here: set[str] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the SDK's side
    def generate_attachment_id(self, mime_type: str, context: RequestContext) -> str:
        return f"atc_{secrets.token_hex(16)}"

    async def create_attachment(
        self, input: AttachmentCreateParams, context: RequestContext
    ) -> Attachment:
        """Check the declared file, reserve its size, and describe where to upload it (the SDK
        saves the metadata)."""
        mime = input.mime_type.split(";", 1)[0].strip().lower()
        if mime not in self.policy.types:
            raise AttachmentRefused(
                415, "unsupported_type", "This kind of file cannot be attached here."
            )
        if input.size > self.policy.max_bytes:
            raise AttachmentRefused(413, "too_large", self._too_large())
        if input.size < 1:
            raise AttachmentRefused(400, "empty_file", "The file is empty.")
        await asyncio.to_thread(self._reserve, context.owner, input.size)
        attachment_id = self.generate_attachment_id(mime, context)
        nonce = secrets.token_urlsafe(16)
        token = self._uploads.dumps([attachment_id, context.owner, nonce])
        fields: dict[str, Any] = {
            "id": attachment_id,
            "name": input.name[:MAX_NAME_CHARS] or "file",
            "mime_type": mime,
            "upload_descriptor": AttachmentUploadDescriptor(
                url=f"{context.base_url}/uploads/{token}", method="POST"
            ),
            "metadata": {"declared_size": input.size, "nonce": _digest(nonce)},
        }
        if mime.startswith("image/"):
            preview = self.content_url(attachment_id, fields["name"], context.base_url)
            return ImageAttachment(preview_url=preview, **fields)
        return FileAttachment(**fields)

    async def delete_attachment(self, attachment_id: str, context: RequestContext) -> None:
        """The bytes of an attachment of the caller's (another's: ``NotFoundError``); the SDK
        then deletes the metadata."""
        await self._own(attachment_id, context)
        await self._files(self.files.delete, attachment_id)

    # --------------------------------------------------------------- upload
    def accept_upload(
        self,
        token: str,
        chunks: Iterable[bytes],
        run: Callable[[Callable[[], Any]], Any],
    ) -> Attachment:
        """Store the bytes sent to an upload URL and mark the attachment uploaded. ``run``
        runs a coroutine factory on the server's loop. Raises :class:`AttachmentRefused`."""
        attachment_id, owner, nonce = self._open_upload_token(token)
        context = RequestContext(owner=owner)
        try:
            attachment = run(lambda: self.store.load_attachment(attachment_id, context=context))
        except NotFoundError:
            raise _gone() from None
        metadata = attachment.metadata or {}
        if attachment.upload_descriptor is None or metadata.get("nonce") != _digest(nonce):
            raise _gone()
        self._claim(attachment_id)
        limit = min(int(metadata.get("declared_size", 0)), self.policy.max_bytes)
        sniffed: dict[str, str] = {}
        checked = self._checked(chunks, attachment.mime_type, limit, sniffed)
        try:
            size = self.files.write(attachment_id, checked)
        except storage_errors() as exc:
            raise files_down(exc) from None
        done = attachment.model_copy(
            update={
                "upload_descriptor": None,
                "mime_type": sniffed["mime"],
                "metadata": {"size": size},
            }
        )
        try:
            run(lambda: self.store.save_attachment(done, context=context))
        except BaseException:
            self.files.delete(attachment_id)  # deleted meanwhile, or the store failed
            raise
        return done

    def _checked(
        self, chunks: Iterable[bytes], declared: str, limit: int, sniffed: dict[str, str]
    ) -> Iterator[bytes]:
        """The chunks, refused (by raising: the storage then keeps nothing) when their
        signature is not an allowed type of the declared kind or they pass ``limit`` bytes."""
        source = iter(chunks)
        head = b""
        for chunk in source:
            head += chunk
            if len(head) > limit:
                raise AttachmentRefused(413, "too_large", self._too_large(limit))
            if len(head) >= SNIFF_BYTES:
                break
        if not head:
            raise AttachmentRefused(400, "empty_file", "The upload held no file.")
        kind = filetype.guess_mime(head[:8192])
        if kind not in self.policy.types or not _same_kind(kind, declared):
            raise AttachmentRefused(
                415, "unsupported_type", "The file's content is not of an allowed type."
            )
        sniffed["mime"] = kind
        total = len(head)
        yield head
        for chunk in source:
            total += len(chunk)
            if total > limit:
                raise AttachmentRefused(413, "too_large", self._too_large(limit))
            yield chunk

    def _open_upload_token(self, token: str) -> tuple[str, str, str]:
        try:
            attachment_id, owner, nonce = self._uploads.loads(
                token, max_age=self.policy.upload_ttl
            )
        except SignatureExpired:
            raise AttachmentRefused(
                410, "upload_expired", "This upload link has expired. Attach the file again."
            ) from None
        except (BadSignature, ValueError, TypeError):
            raise AttachmentRefused(404, "not_found", "No such upload.") from None
        return str(attachment_id), str(owner), str(nonce)

    def _claim(self, attachment_id: str) -> None:
        """Single use across workers and hosts (the limiter's storage), else per process."""
        storage = self._quota()
        if storage is not None:
            if storage.incr(f"chatkit:upload-used:{attachment_id}", self.policy.upload_ttl) > 1:
                raise _gone()
            return
        with self._lock:
            if attachment_id in self._used_here:
                raise _gone()
            self._used_here.add(attachment_id)

    def _reserve(self, owner: str, size: int) -> None:
        """Count ``size`` bytes in ``owner``'s daily total, or refuse (429) if it would pass."""
        storage = self._quota()
        if storage is None or not self.policy.daily_bytes:
            return
        key = f"chatkit:upload-bytes:{owner}"
        if storage.incr(key, DAY, size) <= self.policy.daily_bytes:
            return
        storage.incr(key, DAY, -size)
        wait = max(1, int(storage.get_expiry(key) - time.time()))
        raise AttachmentRefused(
            429,
            "upload_quota",
            f"You have uploaded as much as you may today. Try again in {wait} seconds.",
            retry_after=wait,
        )

    def _too_large(self, limit: int | None = None) -> str:
        cap = self.policy.max_bytes if limit is None else limit
        return f"The file is larger than allowed ({cap} bytes)."

    # ------------------------------------------------------------- download
    def content_url(self, attachment_id: str, name: str, base_url: str) -> str:
        """The signed link to an attachment's bytes. It names the attachment, not its owner:
        it keeps working when a visitor's threads move to their account at log-in, and stops
        when the bytes are deleted."""
        token = self._downloads.dumps([attachment_id, name])
        return f"{base_url}/attachments/{token}"

    def open_download(self, token: str) -> tuple[str, str, Iterator[bytes]]:
        """``(mime type, file name, bytes)`` for a download link (``NotFoundError`` when the
        link is not one of ours or the bytes are gone). The type is read from the bytes again:
        only an allowed one is ever served."""
        try:
            attachment_id, name = self._downloads.loads(token)
            chunks = self.files.read(str(attachment_id))
        except (BadSignature, ValueError, TypeError, FileNotFoundError):
            raise NotFoundError("no such attachment") from None
        first = next(chunks, b"")
        mime = filetype.guess_mime(first[:8192]) if first else None
        if mime not in self.policy.types:
            getattr(chunks, "close", lambda: None)()
            raise NotFoundError("not an attachment")
        return mime, str(name), itertools.chain([first], chunks)

    # ------------------------------------------------------------ messages
    async def check_message(
        self, attachment_ids: list[str], thread_id: str | None, context: RequestContext
    ) -> None:
        """Before a message is taken (their number and ids were checked when it was parsed):
        each attachment is the caller's (else ``NotFoundError``), uploaded, and not already
        part of another thread."""
        for attachment_id in attachment_ids:
            attachment = await self._own(attachment_id, context)
            if attachment.upload_descriptor is not None:
                raise AttachmentRefused(
                    400, "attachment_not_ready", "An attachment has not finished uploading."
                )
            if attachment.thread_id is not None and attachment.thread_id != thread_id:
                raise AttachmentRefused(
                    400, "attachment_in_use", "An attachment already belongs to another thread."
                )

    async def _own(self, attachment_id: str, context: RequestContext) -> Attachment:
        """The caller's attachment (:class:`AttachmentNotFound` when missing or another's)."""
        try:
            return await self.store.load_attachment(attachment_id, context=context)
        except NotFoundError:
            raise AttachmentNotFound(attachment_id) from None

    async def forget_thread(self, thread_id: str, context: RequestContext) -> None:
        """Delete the bytes and metadata of every attachment in the caller's thread (before the
        thread itself is deleted; ``NotFoundError`` if it is not the caller's)."""
        after: str | None = None
        while True:
            page = await self.store.load_thread_items(thread_id, after, 100, "asc", context)
            for item in page.data:
                if isinstance(item, UserMessageItem):
                    for attachment in item.attachments:
                        await self._files(self.files.delete, attachment.id)
                        await self.store.delete_attachment(attachment.id, context=context)
            if not page.has_more:
                return
            after = page.after

    def sweep(self, run: Callable[[Callable[[], Any]], Any]) -> int:
        """Delete stored bytes no attachment metadata names any more (a thread that expired,
        a purge, a crash between two steps); returns how many. Blocking."""
        swept = 0
        batch: list[str] = []

        def flush() -> int:
            known = run(lambda: self.store.known_attachments(list(batch)))
            orphans = [key for key in batch if key not in known]
            for key in orphans:
                self.files.delete(key)
            batch.clear()
            return len(orphans)

        for key in self.files.stored_keys():
            batch.append(key)
            if len(batch) >= 500:
                swept += flush()
        if batch:
            swept += flush()
        return swept + self.files.drop_partial(older_than=PARTIAL_AGE)

    def purge_owner_files(self, owner: str, run: Callable[[Callable[[], Any]], Any]) -> int:
        """Delete the bytes of every attachment of ``owner`` (before the store's purge)."""
        ids = run(lambda: self.store.owner_attachments(owner))
        for attachment_id in ids:
            self.files.delete(attachment_id)
        return len(ids)

    async def read(self, attachment: Attachment) -> bytes | None:
        """The bytes to send the model (None when they are gone); a storage that fails ends
        the reply with an error event before the model is called."""
        try:
            return await asyncio.to_thread(self.files.read_all, attachment.id)
        except (FileNotFoundError, ValueError):
            return None
        except storage_errors() as exc:
            files_down(exc)
            raise CustomStreamError(FILES_DOWN_MESSAGE, allow_retry=True) from None

    async def _files(self, func: Callable[..., Any], *args: Any) -> Any:
        """A storage call off the loop; its failure is a 503 ``files_unavailable``."""
        try:
            return await asyncio.to_thread(func, *args)
        except FileNotFoundError:
            return None
        except storage_errors() as exc:
            raise files_down(exc) from None


def files_down(exc: BaseException) -> AttachmentRefused:
    """Log a storage failure (its class only: a message may quote a bucket or a path) and
    give the refusal for it."""
    log.error("chatkit_flask: attachment storage failed: %s", type(exc).__name__)
    return AttachmentRefused(503, "files_unavailable", FILES_DOWN_MESSAGE, retry_after=5)


def _same_kind(sniffed: str, declared: str) -> bool:
    """An image stays an image (a PNG declared as JPEG is fine); anything else must match."""
    if declared.startswith("image/"):
        return sniffed.startswith("image/")
    return sniffed == declared


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _gone() -> AttachmentRefused:
    return AttachmentRefused(410, "upload_used", "This upload link was already used.")


class AttachmentConverter(ThreadItemConverter):
    """History to model input: images as ``input_image``, PDFs as ``input_file`` (data URLs),
    an @-mention tag as its text (the SDK refuses tags), and a hidden context item a tool
    stored with JSON content as that JSON (the SDK refuses it, and every later turn of the
    thread would fail)."""

    def __init__(self, attachments: Attachments | None = None) -> None:
        self.attachments = attachments

    async def tag_to_message_content(self, tag: UserMessageTagContent) -> ResponseInputTextParam:
        return ResponseInputTextParam(type="input_text", text=f"@{tag.text}")

    async def hidden_context_to_input(self, item: HiddenContextItem) -> Any:
        if not isinstance(item.content, str):
            text = json.dumps(item.content, separators=(",", ":"), ensure_ascii=False, default=str)
            item = item.model_copy(update={"content": text})
        return await super().hidden_context_to_input(item)

    async def attachment_to_message_content(self, attachment: Attachment) -> Any:
        data = await self.attachments.read(attachment) if self.attachments is not None else None
        if data is None:
            return ResponseInputTextParam(type="input_text", text=UNAVAILABLE_NOTE)
        url = f"data:{attachment.mime_type};base64,{base64.b64encode(data).decode()}"
        if attachment.mime_type.startswith("image/"):
            return ResponseInputImageParam(type="input_image", image_url=url, detail="auto")
        return ResponseInputFileParam(type="input_file", file_data=url, filename=attachment.name)
