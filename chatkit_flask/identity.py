"""Who is asking: a signed-in user of the host app, or an anonymous visitor (signed cookie)."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from itsdangerous import BadSignature, TimestampSigner
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.sansio.http import parse_cookie

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "Identity",
    "VisitorCookie",
    "client_address",
    "client_network",
    "cookie_values",
    "hash_id",
    "ipv6_network",
    "user_identity",
    "visitor_cookie_name",
]

_VISITOR_ID = re.compile(r"[A-Za-z0-9_-]{22}")
_MAX_COOKIE_LENGTH = 200  # a valid cookie is ~60 characters; anything longer is not ours
_SALT = "chatkit-flask.visitor"


def visitor_cookie_name(name: str, secure: bool) -> str:
    """The visitor cookie's name as sent: ``__Host-<name>`` when the cookie is Secure.

    A browser accepts a ``__Host-`` cookie only from this very host, Secure, with ``Path=/`` and
    no ``Domain``, so a page on a sibling subdomain cannot plant one (cookie tossing). Plain
    HTTP cannot carry the prefix and keeps ``name``; a name that already has a prefix is kept.
    """
    if secure and not name.startswith(("__Host-", "__Secure-")):
        return "__Host-" + name
    return name


def cookie_values(cookie_header: str | None, name: str) -> list[str]:
    """Every value sent for cookie ``name`` (werkzeug's ``request.cookies`` keeps only the
    first of duplicates, which is the one an attacker's broader cookie may win). Parsed as
    ``request.cookies`` is (werkzeug.http's variant fails on non-UTF-8 bytes)."""
    return parse_cookie(cookie=cookie_header).getlist(name)


def hash_id(value: str) -> str:
    """A short, stable, non-reversible tag for logs (never log the raw id or cookie)."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Identity:
    """The caller: ``user`` goes upstream, ``limit_key`` keys the per-user limit.

    ``user_id`` is the id the host's user loader returned, as a string (None for a visitor):
    what the site's own code knows its users by, unlike the prefixed ``user``.
    """

    user: str
    limit_key: str
    log_id: str
    new_cookie: str | None = None  # signed value to set, when a fresh visitor id was issued
    user_id: str | None = None


class VisitorCookie:
    """Issues and verifies the anonymous visitor cookie: a random id signed with SECRET_KEY.

    Old keys (``SECRET_KEY_FALLBACKS``) still verify, and a cookie signed with one is re-issued
    with the current key, so rotating keys logs nobody out.
    """

    def __init__(self, secret_key: str, fallbacks: Sequence[str], max_age: int) -> None:
        self._max_age = max_age
        self._signer = TimestampSigner(secret_key, salt=_SALT, digest_method=hashlib.sha256)
        self._fallbacks = [
            TimestampSigner(key, salt=_SALT, digest_method=hashlib.sha256) for key in fallbacks
        ]

    def issue(self) -> tuple[str, str]:
        """Return a new (visitor id, signed cookie value)."""
        visitor_id = secrets.token_urlsafe(16)
        return visitor_id, self._signer.sign(visitor_id).decode()

    def verify(self, value: str | None) -> tuple[str | None, bool]:
        """Return (visitor id or None, whether the cookie should be re-issued)."""
        if not value or len(value) > _MAX_COOKIE_LENGTH:
            return None, False
        for index, signer in enumerate([self._signer, *self._fallbacks]):
            try:
                raw = signer.unsign(value, max_age=self._max_age)
            except BadSignature:  # also covers expired signatures
                continue
            visitor_id = raw.decode("ascii", "replace")
            if not _VISITOR_ID.fullmatch(visitor_id):
                return None, False
            return visitor_id, index > 0
        return None, False

    def resolve(self, cookie_value: str | None) -> Identity:
        """The anonymous identity for a request carrying ``cookie_value`` (maybe None)."""
        visitor_id, reissue = self.verify(cookie_value)
        new_cookie = None
        if visitor_id is None:
            visitor_id, new_cookie = self.issue()
        elif reissue:
            new_cookie = self._signer.sign(visitor_id).decode()
        return self.identity(visitor_id, new_cookie)

    @staticmethod
    def identity(visitor_id: str, new_cookie: str | None = None) -> Identity:
        """The identity of visitor ``visitor_id`` (already verified)."""
        tag = hash_id(visitor_id)  # limiter keys and logs never hold the raw id
        return Identity(
            user=f"visitor_{visitor_id}",
            limit_key=f"visitor:{tag}",
            log_id=f"v:{tag}",
            new_cookie=new_cookie,
        )


def user_identity(user_id: Any) -> Identity | None:
    """The identity of a user the host app has signed in, or None (anonymous) unless
    ``user_id`` is a non-empty ``str`` or a non-zero ``int`` (``False``, ``0``, ``None``,
    objects and empty strings never become a shared "user")."""
    if isinstance(user_id, bool) or not isinstance(user_id, str | int) or user_id == 0:
        return None  # 0, like False, is what loaders return for "nobody"
    text = str(user_id)
    if not text.strip():
        return None
    tag = hash_id("user:" + text)  # a separate namespace: never equal to a visitor's tag
    return Identity(
        user=f"user_{text}", limit_key=f"user:{tag}", log_id=f"u:{tag}", user_id=text
    )


def _in_networks(remote_addr: str | None, networks: Sequence[str]) -> bool:
    try:
        address = ipaddress.ip_address((remote_addr or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(net) for net in networks)


def client_address(environ: Mapping[str, Any], settings: Settings) -> tuple[str | None, str]:
    """The client's address and the request's scheme, for the extension's own routes only.

    ``X-Forwarded-For``/``-Proto`` count only when the connecting address is in
    ``CHATKIT_TRUSTED_PROXY_NETWORKS``, and then for ``CHATKIT_TRUSTED_PROXIES`` hops (werkzeug's
    ProxyFix does the parsing). The host app's own routes are never rewritten.
    """
    remote_addr = environ.get("REMOTE_ADDR")
    scheme = environ.get("wsgi.url_scheme", "http")
    hops = settings.trusted_proxies
    if not hops or not _in_networks(remote_addr, settings.trusted_proxy_networks):
        return remote_addr, scheme
    seen: dict[str, Any] = {}

    def capture(env: dict[str, Any], _start: Any) -> list[bytes]:
        seen.update(env)
        return []

    ProxyFix(capture, x_for=hops, x_proto=hops)(dict(environ), lambda *_: None)  # type: ignore[arg-type]
    return seen.get("REMOTE_ADDR"), seen.get("wsgi.url_scheme", scheme)


def _client_ip(remote_addr: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in ``remote_addr`` (port, brackets and zone id dropped; an IPv4-mapped IPv6
    address as IPv4), or None."""
    if not remote_addr:
        return None
    text = remote_addr.strip()
    if text.startswith("["):  # "[2001:db8::1]:443"
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # "203.0.113.9:51234"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_network(remote_addr: str | None, ipv6_prefix: int) -> str:
    """The address a per-IP limit is keyed on: the IPv4 address, or the IPv6 /prefix network.

    One IPv6 client usually holds a whole /64, so limiting single addresses would be no limit.
    """
    address = _client_ip(remote_addr)
    if address is None:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


def ipv6_network(remote_addr: str | None, prefix: int) -> str | None:
    """The IPv6 /prefix network of ``remote_addr``, or None for IPv4 (mapped too) and garbage."""
    address = _client_ip(remote_addr)
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    return str(ipaddress.IPv6Network((address, prefix), strict=False))
