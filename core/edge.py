"""The HTTP edge: uvicorn's httptools protocol with time limits, a connection cap and JSON refusals.

uvicorn (0.54) bounds little of what a client can hold: a connection that sends nothing, or its
head or body a byte at a time, stays open as long as the client likes (uvicorn's keep-alive timer
only runs between requests); every connection is accepted until the process runs out of file
descriptors, and then the store, the scripts folder and the helper processes cannot open theirs
either; httptools puts no limit on a request head; and uvicorn's own refusals are text/plain.
``EdgeProtocol`` adds, per connection:

- a head deadline: ``http_head_timeout`` from accept (and, on a kept-alive connection, from a
  request's first byte) to the end of the request head; a connection that sent nothing is
  closed, a partial head is answered 408;
- a body deadline: ``http_body_timeout`` from the end of the head to the end of the body (408),
  which also holds when the app answered before reading the body;
- uvicorn's keep-alive timer (``http_idle_timeout``) between requests;
- a cap on open connections, counted at accept: above it, a JSON 503 with ``Retry-After``;
- a head above ``MAX_HEAD`` bytes is answered 431; a body above ``MAX_BODY`` (the app's limit for
  every body it reads) 413, at once when its Content-Length says so, else as soon as more than
  the limit has arrived: nothing above the limit is buffered;
- every refusal, uvicorn's 400 for a malformed request included, is the API's JSON error body
  with ``Cache-Control: no-store`` and ``Connection: close``.

One timer per connection serves both deadlines: armed at accept or at a request's first byte, it
closes what is late when it fires, or re-arms itself for the nearest deadline.  A request only
records when its head started and ended (two reads of the loop's clock; no timer per request).

``serve`` refuses to run without httptools (``cli``): uvicorn's h11 fallback has none of this.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import math
import resource
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from .errors import (ApiError, HeadTooLarge, InvalidRequest, PayloadTooLarge, RequestTimeout,
                     TooManyConnections)
from .settings import Settings
from .validation import MAX_BODY

log = logging.getLogger("ssa_server.edge")

MAX_HEAD = 64 * 1024  # request line and headers; a Bearer token is ~1 KiB
LINGER = 2.0  # seconds an answered connection is read (and dropped) before it is closed
DISCARD = 1024 * 1024  # ... or until this much more has arrived
REFUSALS = 64  # connections above the cap being answered at once (each lingers REFUSAL_LINGER s)
REFUSAL_LINGER = 0.5
RESERVE = 128 + REFUSALS  # descriptors kept for the store, the logs, the event loop and refusals
CEILING = 16_384  # ~9 KiB of the server's memory per open connection (measured), plus kernel buffers


@dataclass(frozen=True)
class EdgeLimits:
    head_timeout: float
    body_timeout: float
    idle_timeout: float
    max_connections: int


def max_connections(settings: Settings, soft_limit: int) -> int:
    """``http_max_connections``, or else what the file-descriptor limit leaves after a reserve for
    what the server itself opens (store, logs, event loop, two pipes per script worker and the
    signing process, PostgreSQL connections, answers above the cap), at most ``CEILING``."""
    if settings.http_max_connections:
        return settings.http_max_connections
    reserve = RESERVE + 4 * settings.script_workers + settings.store_pool_max
    return max(16, min(CEILING, soft_limit - reserve))


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (helper processes inherit it; the sandbox
    lowers its workers' own); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # e.g. an infinite hard limit the kernel caps lower
            pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class EdgeConfig(uvicorn.Config):
    """uvicorn's ``Config`` with the edge's protocol and limits.  It pickles (the protocol by its
    name), so ``serve --workers N`` hands it to every worker."""

    def __init__(self, app: Any, *, limits: EdgeLimits, fd_limit: int, **options: Any) -> None:
        # uvicorn annotates timeout_keep_alive as int; it only hands it to loop.call_later (a float).
        super().__init__(app, http=EdgeProtocol,
                         timeout_keep_alive=limits.idle_timeout, **options)  # type: ignore[arg-type]
        self.limits = limits
        self.fd_limit = fd_limit

    def log_limits(self) -> None:
        """One INFO line with the edge's limits (once the store opened: a store that cannot be
        opened stays the one line a failed start-up writes)."""
        limits = self.limits
        log.info("HTTP edge: at most %d connections per process (file descriptors: %d), head %gs, body %gs, "
                 "idle %gs", limits.max_connections, self.fd_limit, limits.head_timeout, limits.body_timeout,
                 limits.idle_timeout)


def edge_config(settings: Settings, app: Any, **options: Any) -> EdgeConfig:
    """The uvicorn configuration of ``serve`` (one process or ``--workers N``).  Raises the soft
    file-descriptor limit first: the default connection cap is derived from it."""
    soft = raise_fd_limit()
    limits = EdgeLimits(head_timeout=settings.http_head_timeout, body_timeout=settings.http_body_timeout,
                        idle_timeout=settings.http_idle_timeout,
                        max_connections=max_connections(settings, soft))
    # X-Forwarded-* only change the client address and scheme uvicorn reports (every URL the
    # server hands out comes from the configured issuer).  The access log is the server's own
    # request line (observe.py: request id, route template, client_id), never uvicorn's (raw
    # paths with their queries).  JSON logs: uvicorn's loggers go through the server's handler.
    if settings.log_format == "json":
        options.setdefault("log_config", None)
    return EdgeConfig(app, limits=limits, fd_limit=soft, host=settings.host, port=settings.port,
                      log_level=settings.log_level, access_log=False,
                      proxy_headers=settings.access_log, server_header=False, **options)


class _Answer:
    """A refusal rendered once: everything but the Date header, which uvicorn refreshes."""

    def __init__(self, error: ApiError) -> None:
        body = json.dumps(error.body(), separators=(",", ":")).encode()
        lines = [f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}",
                 "content-type: application/json", f"content-length: {len(body)}",
                 "cache-control: no-store", "pragma: no-cache", "connection: close"]
        lines += [f"{name.lower()}: {value}" for name, value in error.headers.items()
                  if name.lower() != "connection"]
        self.head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self.body = body

    def render(self, state: ServerState) -> bytes:
        defaults = b"".join(name + b": " + value + b"\r\n" for name, value in state.default_headers)
        return self.head + defaults + b"\r\n" + self.body


MALFORMED = _Answer(InvalidRequest("The request is not valid HTTP/1.1."))
HEAD_TIMEOUT = _Answer(RequestTimeout("The request head was not received in time."))
BODY_TIMEOUT = _Answer(RequestTimeout("The request body was not received in time."))
HEAD_TOO_LARGE = _Answer(HeadTooLarge(MAX_HEAD))
BODY_TOO_LARGE = _Answer(PayloadTooLarge(MAX_BODY))
BUSY = _Answer(TooManyConnections())


class _Closer(asyncio.Protocol):
    """A connection that has had its answer: what the client still sends is read and dropped
    until it closes its side, ``DISCARD`` bytes more arrived or ``linger`` seconds passed, so the
    answer is not lost to the TCP reset that closing with unread input would send."""

    def __init__(self, connections: set[Any], loop: asyncio.AbstractEventLoop, answer: bytes,
                 linger: float) -> None:
        self.connections = connections
        self.loop = loop
        self.answer = answer
        self.linger = linger
        self.dropped = 0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # uvloop's are not asyncio.Transport subclasses
        self.transport = transport
        if self.answer:
            transport.write(self.answer)
        if self.linger <= 0:
            transport.close()
            return
        self.connections.add(self)  # it still holds a descriptor: counted against the cap
        if transport.can_write_eof():
            transport.write_eof()
        if not transport.is_reading():
            transport.resume_reading()
        self.timer = self.loop.call_later(self.linger, transport.close)

    def data_received(self, data: bytes) -> None:
        self.dropped += len(data)
        if self.dropped > DISCARD:
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def shutdown(self) -> None:  # uvicorn's graceful shutdown
        self.transport.close()


def _refuse(transport: asyncio.Transport, state: ServerState, loop: asyncio.AbstractEventLoop,
            cap: int) -> None:
    """Above the cap: the JSON 503.  Beyond REFUSALS more, closed right after it (no lingering
    descriptor); Linux still delivers the answer before the reset."""
    linger = REFUSAL_LINGER if len(state.connections) < cap + REFUSALS else 0.0
    closer = _Closer(state.connections, loop, BUSY.render(state), linger)
    transport.set_protocol(closer)
    closer.connection_made(transport)


# The base methods, called directly (no super() lookup): these run per request.
_base_data_received = HttpToolsProtocol.data_received
_base_on_message_begin = HttpToolsProtocol.on_message_begin
_base_on_headers_complete = HttpToolsProtocol.on_headers_complete
_base_on_body = HttpToolsProtocol.on_body
_base_on_message_complete = HttpToolsProtocol.on_message_complete


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the edge's limits (see the module docstring)."""

    def __init__(self, config: EdgeConfig, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = config.limits
        self._head_timeout = config.limits.head_timeout
        self._head_since: float | None = None  # a request head is under way since then
        self._head_bytes = 0  # received while it is incomplete
        self._chunk = 0  # size of the read being parsed
        self._body_since: float | None = None  # a body is under way since then
        self._body_bytes = 0
        self._watch: asyncio.TimerHandle | None = None
        self._watch_due = 0.0
        self._has_cycle = False  # whether self.cycle is the request being parsed (else an earlier one)
        self._answered = False

    # --- connection ---
    # asyncio types the argument as a BaseTransport; a stream protocol is given a Transport (uvicorn's
    # own connection_made narrows it the same way).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            _refuse(transport, self.server_state, self.loop, self.limits.max_connections)
            return
        super().connection_made(transport)
        self._head_since = now = self.loop.time()
        self._arm(now + self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._chunk = len(data)
        _base_data_received(self, data)
        if self._head_since is not None and not self._answered:  # the head is still incomplete
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._answer(HEAD_TOO_LARGE)

    def send_400_response(self, msg: str) -> None:
        self._answer(MALFORMED)

    # --- parser callbacks ---
    def on_message_begin(self) -> None:
        if self._answered:
            return
        _base_on_message_begin(self)
        self._head_bytes = 0
        self._has_cycle = False
        if self._head_since is None:  # a later request on this connection: its head's clock starts now
            self._head_since = now = self.loop.time()
            due = now + self._head_timeout
            if self._watch is None or self._watch_due > due:
                self._arm(due)

    def on_headers_complete(self) -> None:
        if self._answered:
            return
        # A head completed in one large read may still be too large: only then is it measured.
        if self._head_bytes + self._chunk > MAX_HEAD and self._head_size() > MAX_HEAD:
            self._answer(HEAD_TOO_LARGE)
            return
        self._head_since = None
        for name, value in self.headers:
            if name == b"content-length" and int(value) > MAX_BODY:  # the parser checked it is digits
                self._answer(BODY_TOO_LARGE)
                return
        self._body_since = self.loop.time()
        self._body_bytes = 0
        _base_on_headers_complete(self)
        self._has_cycle = True

    def on_body(self, body: bytes) -> None:
        if self._answered:
            return
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY:  # chunked, or more than its Content-Length said
            self._answer(BODY_TOO_LARGE)
            return
        _base_on_body(self, body)

    def on_message_complete(self) -> None:
        if self._answered:
            return
        self._body_since = None
        _base_on_message_complete(self)

    # --- limits ---
    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _arm(self, due: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._watch_due = due
        self._watch = self.loop.call_at(due, self._check)

    def _check(self) -> None:
        """The connection's timer: close what is late, else wait for the nearest deadline."""
        self._watch = None
        if self._answered or self.transport.is_closing():
            return
        now = self.loop.time()
        due = math.inf
        if self._head_since is not None:
            due = self._head_since + self._head_timeout
            if due <= now:
                if self._head_bytes == 0 and self.cycle is None:
                    self.transport.close()  # silent since accept: nothing to answer
                else:
                    self._answer(HEAD_TIMEOUT)
                return
        if self._body_since is not None:
            body_due = self._body_since + self.limits.body_timeout
            if body_due <= now:
                self._answer(BODY_TIMEOUT)
                return
            due = min(due, body_due)
        if due < math.inf:
            self._arm(due)

    def _answer(self, answer: _Answer) -> None:
        """Send ``answer`` (unless this request's response has begun) and close the connection
        through a ``_Closer``; the request's app task, if one runs, sees the client gone."""
        if self._answered:
            return
        self._answered = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._unset_keepalive_if_required()
        data = answer.render(self.server_state)
        cycle = self.cycle
        if cycle is not None:
            if not cycle.response_complete:  # a request in the app: it sees the client gone
                if cycle.response_started:
                    data = b""  # its response is under way: no second one
                cycle.disconnected = True  # its receive() gets http.disconnect, its send() does nothing
                cycle.waiting_for_100_continue = False
                cycle.message_event.set()
            elif self._has_cycle:
                data = b""  # this request was answered before its body came: no second answer
        self.pipeline.clear()
        self.connections.discard(self)
        closer = _Closer(self.connections, self.loop, data, LINGER)
        self.transport.set_protocol(closer)
        closer.connection_made(self.transport)
