"""Text that is safe to show: control characters escaped, passwords and credentials masked.

Every log line (the app's text format, gunicorn's access log), every CLI line and every kept
upstream body goes through these functions; nothing here imports Flask.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["REDACTED", "escape_control", "mask_url", "redact_credentials"]

REDACTED = "[redacted]"

# C0 controls, DEL, C1 controls (ESC and CSI start terminal sequences; CR/LF forge lines), the
# Unicode line and paragraph separators, and bidirectional overrides (text that reads otherwise
# than it is). Inside a quoted field the backslash and the double quote are escaped too.
_CONTROLS = "\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029\\u200e\\u200f\\u202a-\\u202e\\u2066-\\u2069"
_UNSAFE = re.compile(f"[{_CONTROLS}]")
_UNSAFE_QUOTED = re.compile(f'[{_CONTROLS}\\\\"]')
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", '"': '\\"'}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(value: object, *, quoted: bool = False) -> str:
    """``str(value)`` with control characters shown as ``\\n``, ``\\t``, ``\\x1b``,
    ``\\u2028``: one line stays one line and no escape sequence reaches a terminal. Printable
    text, non-ASCII letters included, is unchanged, so escaping twice changes nothing.

    ``quoted=True`` is for a value written between double quotes: ``\\`` and ``"`` are escaped
    as well, so that the value cannot end its field early.
    """
    text = value if isinstance(value, str) else str(value)
    return (_UNSAFE_QUOTED if quoted else _UNSAFE).sub(_escape_one, text)


# Query parameters that carry a credential (redis-py reads ?password=, others ?token= ...).
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with the password of its userinfo and any credential-like query value replaced by
    ``***`` (``redis://:***@host:6379/0``, ``redis://host/0?password=***``). A string that does
    not parse as a URL is replaced whole."""
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" not in netloc and not any(_SECRET_PARAM.search(name) for name, _ in query):
        return url  # nothing to hide (and urlunsplit would turn memory:// into memory:)
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        # A lone userinfo part (redis://secret@host) is how some clients take a password.
        netloc = f"{user}:***@{hostinfo}" if has_password else f"***@{hostinfo}"
    if any(_SECRET_PARAM.search(name) for name, _ in query):
        masked = [(name, "***" if _SECRET_PARAM.search(name) else value) for name, value in query]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts._replace(netloc=netloc))


# Session client secrets (ek_..., cs_...) and OpenAI keys (sk-..., also sk-proj-...), whole or
# partly shown ("sk-proj-****abcd"), wherever they appear in a kept upstream text.
_TOKEN = re.compile(r"(?<![A-Za-z0-9])(?:ek|cs)_[A-Za-z0-9_-]{8,}|\bsk-[A-Za-z0-9_*.-]{5,}")
_WORD = re.compile(r"[A-Za-z0-9_*.-]{8,}")
_FRAGMENT = 8  # characters of the API key that make a fragment worth hiding


def redact_credentials(text: str, api_key: str | None = None) -> str:
    """``text`` with the API key, any run of 8 or more of its characters, any ``sk-`` key and any
    client-secret-shaped token (``ek_...``, ``cs_...``) replaced by ``[redacted]``."""
    if api_key:
        text = text.replace(api_key, REDACTED)
    text = _TOKEN.sub(REDACTED, text)
    if api_key and len(api_key) >= _FRAGMENT:
        grams = {api_key[i : i + _FRAGMENT] for i in range(len(api_key) - _FRAGMENT + 1)}

        def hide(match: re.Match[str]) -> str:
            word = match.group()
            for i in range(len(word) - _FRAGMENT + 1):
                if word[i : i + _FRAGMENT] in grams:
                    return REDACTED
            return word

        text = _WORD.sub(hide, text)
    return text
