"""``context.http``'s server side: the HTTP calls a script asks for, performed by the server.

A worker asks mid-step with a frame on its answer pipe, ``{"http": {"method", "url",
"headers", "json"}}``; the pool (``pool.py``) hands the request here together with the name of
the script *the server* knows runs that step (a lone call: an HTTP-using script never runs in
a batch or a chain, see ``docs/sandbox.md``), and writes the answer back on the request pipe:
``{"http": {"status", "headers", "json" | "text"}}`` or ``{"http_error": "..."}``.

What a call must pass, in order: its shape (GET or POST, headers as strings, a JSON body of at
most 64 KiB), the script's rate (``calls_per_second``, a token bucket per script), its
allow-list (``http_allow.match``), the addresses (a name resolved once, every address checked,
the connection made to the checked address: no DNS rebinding between check and connect).
Then one HTTP/1.1 request over a fresh connection (h11, no pooling), no redirect followed (a 3xx
comes back to the script as it is), the response cut off past ``max_bytes`` or the time left.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11

from ssa_server import jsonvalues

from .http_allow import AllowEntry, HttpRefused, Target, address_allowed, match

MAX_BODY = 64 * 1024  # a POST's JSON body
MAX_HEADERS = 32
_FORBIDDEN_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
                      "proxy-authorization", "keep-alive"}
_USER_AGENT = "ssa-server-script"

Resolve = Callable[[str, int], Awaitable[list[str]]]
Connect = Callable[[str, int, str, bool], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass(frozen=True)
class HttpLimits:
    timeout: float = 2.0  # seconds per call, at most the step's wall time left
    max_bytes: int = 256 * 1024  # response head and body
    calls_per_step: int = 4
    calls_per_second: float = 20.0  # per script, a bucket of that many


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class HttpBroker:
    limits: HttpLimits = field(default_factory=HttpLimits)
    resolve: Resolve | None = None  # tests inject a resolver; default: the loop's getaddrinfo
    connect: Connect | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per script: calls, refused, failed
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def figures(self, name: str) -> dict[str, int]:
        return dict(self.counts.get(name) or {"calls": 0, "refused": 0, "failed": 0})

    async def perform(self, name: str, allow: tuple[AllowEntry, ...], request: Any,
                      time_left: float) -> dict[str, Any]:
        """The answer frame for one request of script ``name``; never raises but CancelledError."""
        counts = self.counts.setdefault(name, {"calls": 0, "refused": 0, "failed": 0})
        counts["calls"] += 1
        try:
            method, target, headers, body = self._checked(name, allow, request)
            timeout = min(self.limits.timeout, time_left)
            if timeout <= 0:
                raise TimeoutError
            async with asyncio.timeout(timeout):
                address = await self._address(target)
                return {"http": await self._exchange(address, target, method, headers, body)}
        except HttpRefused as e:
            counts["refused"] += 1
            return {"http_error": f"http refused: {e}"}
        except TimeoutError:
            counts["failed"] += 1
            took = min(self.limits.timeout, time_left)
            return {"http_error": f"http failed: no complete answer within {took:.3g} s"}
        except (OSError, ssl.SSLError, h11.ProtocolError, _TooLarge, UnicodeError) as e:
            counts["failed"] += 1
            return {"http_error": f"http failed: {_reason(e)}"}

    def perform_blocking(self, name: str, allow: tuple[AllowEntry, ...], request: Any,
                         time_left: float) -> dict[str, Any]:
        """``perform`` for the pool's blocking path (``scripts test``, the pytest fixture)."""
        return asyncio.run(self.perform(name, allow, request, time_left))

    def refusal(self, name: str, why: str) -> dict[str, Any]:
        counts = self.counts.setdefault(name, {"calls": 0, "refused": 0, "failed": 0})
        counts["calls"] += 1
        counts["refused"] += 1
        return {"http_error": f"http refused: {why}"}

    def _checked(self, name: str, allow: tuple[AllowEntry, ...],
                 request: Any) -> tuple[str, Target, list[tuple[str, str]], bytes | None]:
        if not isinstance(request, dict) or request.get("method") not in ("GET", "POST"):
            raise HttpRefused("only get() and post()")
        raw_headers = request.get("headers") or {}
        if not isinstance(raw_headers, dict) or len(raw_headers) > MAX_HEADERS:
            raise HttpRefused(f"headers must be a dict of at most {MAX_HEADERS} strings")
        headers = []
        for key, value in raw_headers.items():
            if not isinstance(value, str) or len(key) > 256 or len(value) > 4096:
                raise HttpRefused("a header name or value is not a short string")
            if key.lower() in _FORBIDDEN_HEADERS:
                raise HttpRefused(f"the {key[:40]!r} header is the server's")
            headers.append((key, value))
        body = None
        if request["method"] == "POST":
            body = jsonvalues.dumps(request.get("json"))
            if len(body) > MAX_BODY:
                raise HttpRefused(f"a JSON body larger than {MAX_BODY} bytes")
        target = match(allow, request.get("url"))
        self._take_token(name)
        return request["method"], target, headers, body

    def _take_token(self, name: str) -> None:
        now, rate = time.monotonic(), self.limits.calls_per_second
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket(rate, now)
        bucket.tokens = min(rate, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1:
            raise HttpRefused(f"more than {rate:g} calls per second for this script")
        bucket.tokens -= 1

    async def _address(self, target: Target) -> str:
        """The one address the connection goes to, checked: a name is resolved once."""
        entry = target.entry
        if entry.literal is not None:
            addresses = [str(entry.literal)]
        elif self.resolve is not None:
            addresses = await self.resolve(target.host, target.port)
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port,
                                                                 type=socket.SOCK_STREAM)
            addresses = [str(info[4][0]) for info in infos]
        if not addresses:
            raise OSError(f"{target.host} has no address")
        for text in addresses:
            if not address_allowed(ipaddress.ip_address(text.split("%", 1)[0]), entry):
                raise HttpRefused(f"{target.host} resolves to {text}, a loopback, private, link-local or "
                                  "reserved address (name it as an IP address in the allow-list to reach it)")
        return addresses[0]

    async def _exchange(self, address: str, target: Target, method: str, headers: list[tuple[str, str]],
                        body: bytes | None) -> dict[str, Any]:
        tls = target.scheme == "https"
        if self.connect is not None:
            reader, writer = await self.connect(address, target.port, target.host, tls)
        else:
            reader, writer = await asyncio.open_connection(
                address, target.port, ssl=ssl.create_default_context() if tls else None,
                server_hostname=target.host if tls else None, limit=65536)
        try:
            return await _http_exchange(reader, writer, target, method, headers, body, self.limits.max_bytes)
        finally:
            writer.close()


class _TooLarge(Exception):
    pass


async def _http_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target,
                         method: str, headers: list[tuple[str, str]], body: bytes | None,
                         cap: int) -> dict[str, Any]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=min(cap, 65536))
    sent = [("Host", target.host_header), ("User-Agent", _USER_AGENT), ("Connection", "close"), *headers]
    if body is not None:
        sent += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    out = conn.send(h11.Request(method=method, target=target.target, headers=sent))
    if body is not None:
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    writer.write(out)
    await writer.drain()
    response: h11.Response | None = None
    chunks: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            size += len(data)
            if size > cap:
                raise _TooLarge(f"the response is larger than {cap} bytes")
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    if response is None:
        raise OSError("the connection closed before a response")
    return _answer(response, b"".join(chunks))


def _answer(response: h11.Response, body: bytes) -> dict[str, Any]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in response.headers:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    out: dict[str, Any] = {"status": response.status_code, "headers": headers}
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            out["json"] = jsonvalues.loads(body)
            return out
        except ValueError:
            pass
    out["text"] = body.decode("utf-8", "replace")
    return out


def _reason(error: BaseException) -> str:
    if isinstance(error, _TooLarge):
        return str(error)
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]
