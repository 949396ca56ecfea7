"""How attachment bytes cross HTTP: an upload body read as it arrives (``multipart/form-data``
with a ``file`` field, as chatkit-js sends it, or a raw body), and the headers a stored file is
served with. No storage and no store here (see ``attachments``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO
from urllib.parse import quote

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import NEED_DATA, Data, Epilogue, Field, File, MultipartDecoder

from .attachments import AttachmentRefused

__all__ = ["content_headers", "upload_chunks"]

READ_BYTES = 64 * 1024
FORM_OVERHEAD = 64 * 1024  # multipart headers and other fields an upload body may carry


def content_headers(mime: str, name: str) -> dict[str, str]:
    """Headers for serving an attachment: inline for images (previews), a download for the
    rest; never sniffed, never run, never cached by shared caches."""
    disposition = "inline" if mime.startswith("image/") else "attachment"
    ascii_name = "".join(c if c.isascii() and (c.isalnum() or c in "._- ") else "_" for c in name)
    return {
        "Content-Type": mime,
        "Content-Disposition": (
            f'{disposition}; filename="{ascii_name[:100]}"; '
            f"filename*=UTF-8''{quote(name[:100], safe='')}"
        ),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; img-src 'self'; sandbox",
        "Cache-Control": "private, max-age=300",
        "Cross-Origin-Resource-Policy": "cross-origin",  # the ChatKit iframe shows previews
        "Referrer-Policy": "no-referrer",
    }


def upload_chunks(stream: IO[bytes], content_type: str, max_bytes: int) -> Iterator[bytes]:
    """The file's bytes from an upload body, read as they arrive: the ``file`` field of a
    ``multipart/form-data`` body (what chatkit-js sends), or the raw body. A body longer than
    ``max_bytes`` plus the form's overhead stops being read."""
    mimetype, options = parse_options_header(content_type or "")
    budget = [max_bytes + FORM_OVERHEAD]

    def read() -> bytes:
        chunk = stream.read(min(READ_BYTES, max(budget[0], 1)))
        budget[0] -= len(chunk)
        if budget[0] < 0:
            raise AttachmentRefused(413, "too_large", "The upload is too large.")
        return chunk

    if mimetype != "multipart/form-data":
        while chunk := read():
            yield chunk
        return
    boundary = options.get("boundary")
    if not boundary:
        raise AttachmentRefused(400, "invalid_upload", "The upload form has no boundary.")
    # What the decoder may hold at once: one read plus a part's headers (file data passes
    # through as events; only a boundary's worth waits between two reads).
    decoder = MultipartDecoder(boundary.encode(), max_form_memory_size=READ_BYTES + FORM_OVERHEAD)
    in_file = seen = False
    while True:
        chunk = read()
        try:
            decoder.receive_data(chunk or None)
            event = decoder.next_event()
            while event is not NEED_DATA:
                if isinstance(event, File):
                    in_file = event.name == "file" and not seen
                    seen = seen or in_file
                elif isinstance(event, Field):
                    in_file = False
                elif isinstance(event, Data) and in_file:
                    if event.data:
                        yield event.data
                    if not event.more_data:
                        return
                elif isinstance(event, Epilogue):
                    break
                event = decoder.next_event()
        except RequestEntityTooLarge:  # a part's headers larger than FORM_OVERHEAD
            raise AttachmentRefused(413, "too_large", "The upload form is too large.") from None
        except ValueError:
            raise AttachmentRefused(
                400, "invalid_upload", "The upload form is malformed."
            ) from None
        if not chunk or isinstance(event, Epilogue):
            break
    if not seen:
        raise AttachmentRefused(400, "invalid_upload", "The upload form has no 'file' field.")
