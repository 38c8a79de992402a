"""What every HTTP request passes before a route sees it: who may call, how much it may send, how
long it may take, and the count of every answer.

- Host and Origin: a server bound to a loopback address answers only requests addressed to a
  loopback name (DNS rebinding turns a web page's own host name into 127.0.0.1), and a request a
  browser sends from another origin (its `Origin` header) is refused unless that origin is allowed
  with --cors-origins. Browsers' "simple" cross-origin POSTs (text/plain, forms) need no CORS
  preflight, so without this check any web page could make a local server generate.
- Content type: a POST body must be JSON. `curl -d` (form-encoded, no Origin) is accepted too, as
  Ollama accepts it; a browser cannot send that without an Origin header.
- Bodies: read with a size limit (413) and a deadline between chunks (408), so a slow or huge
  upload cannot hold a connection, memory, or the event loop.
- Sends: a client that stops reading a stream is cut off after a deadline, which ends (and
  aborts) its generation instead of leaving it blocked forever.
- The API key (`Authorization: Bearer KEY` or `x-api-key: KEY`) when the server has one.
- Every response's status is counted (ktrans_http_responses_total), whatever produced it.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect, Request

from ktrans_server.errors import APIError, render_error, unauthorized

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
# Open without an API key: liveness checks, the web page (it asks for the key itself), version.
PUBLIC_PATHS = {"/health", "/", "/api/version"}
_FORM = "application/x-www-form-urlencoded"


@dataclass
class Limits:
    max_body_bytes: int = 16 << 20     # the largest request body accepted (413 above)
    body_timeout: float = 30.0         # seconds allowed between two chunks of a body (408 after)
    send_timeout: float = 120.0        # seconds a client may leave a response unread
    allowed_hosts: list[str] = field(default_factory=list)  # Host names accepted ("*" = any)
    allowed_origins: list[str] = field(default_factory=list)  # cross-origin callers (--cors-origins)
    api_key: str | None = None         # required on every route but PUBLIC_PATHS when set


class ClientGone(Exception):
    """The client closed the connection while its request was being read."""


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str) -> list[str]:
    """Host names accepted by default: the loopback names when bound to loopback, else any."""
    return sorted(LOOPBACK_NAMES) if is_loopback(bind_host) else ["*"]


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header[: host_header.find("]") + 1] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    """Pure ASGI middleware (it must see every response, including those of other middleware)."""

    def __init__(self, app, limits: Limits, count):
        self.app, self.limits, self.count = app, limits, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            response = render_error(scope["path"], refusal)
            return await response(scope, receive, self._counting(send))
        await self.app(scope, receive, self._counting(send, timeout=self.limits.send_timeout))

    def _counting(self, send, timeout: float | None = None):
        async def wrapped(message):
            if message["type"] == "http.response.start":
                self.count(f"responses_{message['status']}")
            if timeout is None or message["type"] != "http.response.body":
                return await send(message)
            try:
                await asyncio.wait_for(send(message), timeout)
            except asyncio.TimeoutError:
                # NOTE: raising here ends the response (and so the generation behind it).
                raise OSError(f"client read nothing for {timeout:g} s; closing the response") from None
        return wrapped

    def _refusal(self, scope) -> APIError | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        hosts = self.limits.allowed_hosts
        host = _host_name(headers.get("host", ""))
        if "*" not in hosts and host.lower() not in hosts:
            return APIError(403, f"Host '{host}' is not served here; allowed: {', '.join(hosts)}. "
                                 "Start the server with --allowed-hosts to add names.",
                            type="permission_error", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, headers.get("host", "")):
            return APIError(403, f"Cross-origin requests from '{origin}' are not allowed. Start the "
                                 "server with --cors-origins to allow that page.",
                            type="permission_error", code="origin_not_allowed")
        if self.limits.api_key and scope["method"] != "OPTIONS" and scope["path"] not in PUBLIC_PATHS:
            if not _key_ok(headers, self.limits.api_key):
                return unauthorized()
        if scope["method"] in ("POST", "PUT", "PATCH"):
            return _content_type_refusal(headers.get("content-type", ""), origin is not None)
        return None

    def _origin_ok(self, origin: str, host_header: str) -> bool:
        allowed = self.limits.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        # Same origin: the page was served by this server (the web chat page).
        return origin.split("://", 1)[-1] == host_header


def _key_ok(headers: dict[str, str], key: str) -> bool:
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key.encode())


def _content_type_refusal(content_type: str, from_browser: bool) -> APIError | None:
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        return None
    if not from_browser and kind in ("", _FORM):
        return None
    return APIError(415, f"Request bodies must be JSON: send 'Content-Type: application/json' "
                         f"(got '{content_type or 'none'}').", code="unsupported_media_type")


async def read_json(request: Request, limits: Limits) -> dict[str, Any]:
    """The request body as a JSON object, read within the size and time limits."""
    raw = await read_body(request, limits)
    try:
        # NOTE: a big body is parsed in a worker thread: megabytes of JSON hold the event loop
        # (and every other stream) for tens of milliseconds.
        body = json.loads(raw) if len(raw) < _PARSE_INLINE_BYTES else await asyncio.to_thread(json.loads, raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"Request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "Request body must be a JSON object.")
    return body


# A body over the limit is still read (and dropped) up to this much, so that the client, still
# sending, reads the 413 instead of a connection reset (closing a socket with unread data resets
# it); past this the connection is simply closed.
_DRAIN_BYTES = 64 << 20
_PARSE_INLINE_BYTES = 256 << 10


async def read_body(request: Request, limits: Limits) -> bytes:
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), limits.body_timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise APIError(408, f"The request body did not arrive: nothing for {limits.body_timeout:g} s.",
                           code="request_timeout", headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise ClientGone() from None
        size += len(chunk)
        if size > limits.max_body_bytes:
            chunks = []               # NOTE: nothing over the limit is kept in memory
            if size > limits.max_body_bytes + _DRAIN_BYTES:
                raise _too_large(limits)
            continue
        chunks.append(chunk)
    if size > limits.max_body_bytes:
        raise _too_large(limits)
    return b"".join(chunks)


def _too_large(limits: Limits) -> APIError:
    mib = limits.max_body_bytes / (1 << 20)
    return APIError(413, f"The request body is larger than this server accepts ({mib:g} MiB; "
                         "see --max-body-mb).", code="request_too_large", headers={"Connection": "close"})
