"""Who may talk to the server and how much they may send, checked before any route runs.

* Host: a request must name this server (localhost, an IP address, or the name it was bound to). A web
  page on another site can point its own DNS name at 127.0.0.1 ("DNS rebinding") and so reach the
  server from the user's browser; such requests carry that foreign name in their Host header.
* API key: with ``--api-key`` every route needs it, as ``Authorization: Bearer KEY`` (OpenAI clients) or
  HTTP Basic with the key as the password (browsers: the chat page and /docs, which cannot set headers
  on a page load, get a login prompt; any user name works). Only ``/health`` answers without it, and
  then says no more than that the server is alive.
* Body size: a request body beyond the limit gets a 413 before it is all read.
* The page's responses carry a Content-Security-Policy: script only from this server's files, no
  inline script, nothing loaded from elsewhere, so model output rendered in the page cannot run or leak.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import error_body

LIVENESS_PATH = "/health"
LOOPBACK_NAMES = ("localhost",)
# FastAPI's /docs and /redoc pages load Swagger UI / ReDoc from a CDN with inline script: no CSP there.
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
AUTH_CHALLENGE = 'Basic realm="mlx-qwen35", charset="UTF-8"'


class BodyTooLarge(HTTPException):
    """A request body went past the server's limit while being read."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the server's limit of {limit / 2**20:g} MB")


def host_name(header: str | None) -> str | None:
    """The host a Host header names (lowercase, without port or IPv6 brackets); None if it does not parse."""
    try:
        return urlsplit(f"//{header}").hostname if header else None
    except ValueError:
        return None


def is_ip_address(name: str) -> bool:
    """Whether ``name`` is an IPv4 or IPv6 address (rebinding needs a DNS name, so addresses are safe)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(header: str | None, bound_host: str) -> bool:
    """Whether a request's Host header names this server: localhost, an IP address, or the name it was bound to."""
    if header is None:  # HTTP/1.0 without Host: not a browser, so not a rebinding page
        return True
    name = host_name(header)
    return name is not None and (name in LOOPBACK_NAMES or name == bound_host.lower() or is_ip_address(name))


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine."""
    return host.lower() in LOOPBACK_NAMES or (is_ip_address(host) and ipaddress.ip_address(host).is_loopback)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning to print when the server is reachable from other machines without a key."""
    if api_key or is_loopback(host):
        return None
    return (
        f"warning: serving on {host} without --api-key: anyone who can reach this address can use the model "
        "and read what it is sent; add --api-key KEY (or bind --host 127.0.0.1)"
    )


def key_matches(headers: Headers, api_key: str) -> bool:
    """Whether the request carries ``api_key``: ``Bearer KEY``, or Basic auth with KEY as the password."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given = credentials.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    else:
        return False
    return hmac.compare_digest(given.encode(), api_key.encode())


class Guard:
    """ASGI middleware: refuses foreign Host headers, missing keys and oversized bodies; adds the page's CSP."""

    def __init__(self, app: ASGIApp, bound_host: str, api_key: str | None, max_body_bytes: int):
        self.app, self.bound_host, self.api_key, self.max_body_bytes = app, bound_host, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"]
        if not host_allowed(headers.get("host"), self.bound_host):
            name = headers.get("host", "")[:100]
            message = (
                f"Host {name!r} is not this server's address; open it as localhost or by IP address "
                "(or bind --host NAME to serve under a name)"
            )
            await respond(send, 403, message, "permission_error")
            return
        if self.api_key and path != LIVENESS_PATH and not key_matches(headers, self.api_key):
            message = "missing or wrong API key: send 'Authorization: Bearer KEY' (browsers: sign in with the key as the password)"
            await respond(send, 401, message, "authentication_error", {"www-authenticate": AUTH_CHALLENGE})
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await respond(send, 413, BodyTooLarge(self.max_body_bytes).detail)
            return
        await self.app(scope, self._limited(receive), self._with_policy(send, path))

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` that raises ``BodyTooLarge`` once the body read so far exceeds the limit."""
        total = 0

        async def limited() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return limited

    def _with_policy(self, send: Send, path: str) -> Send:
        """``send`` that adds the security headers to the response."""

        async def with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if path not in DOCS_PATHS:
                    extra.append((b"content-security-policy", PAGE_POLICY.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return with_policy


async def respond(send: Send, status: int, message: str, kind: str = "invalid_request_error", headers=None) -> None:
    """Send an OpenAI error object as the whole response."""
    body = json.dumps(error_body(message, kind)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
