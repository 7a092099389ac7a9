"""Each request observed once: its id, route template, status and duration.

``ObserveRequests`` (pure ASGI, no task per request; one send wrapper for the response's own
headers: ``Cache-Control: no-store`` on every response unless the handler set its own
``Cache-Control`` (the Status List Tokens, meant to be cached), and ``X-Request-ID``) gives every
request an id: the client's
``X-Request-ID`` when it is a sane token (``REQUEST_ID``: at most 64 characters of
``[A-Za-z0-9._:-]``, too short for a JWT, so a token pasted there is not logged), else one made
here (a per-process random prefix and a counter: no system call per request).  The id is echoed
in the response's ``X-Request-ID`` and set in ``CURRENT`` for the request's task, where the log
records made meanwhile pick it up (``logs.py``).  When the response is done, the request's
duration goes into ``http_server_request_duration_seconds{method,route,status}`` (the route as
its template, ``/scripts/{name}/logs``, never the raw path) and, with ``access_log``, one log
line (route, status, duration, client_id).
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:  # (logs.py imports this module: it stays light)
    from .metrics import Metrics

access = logging.getLogger("ssa_server.access")
_perf_counter = time.perf_counter

REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_HEADER = b"x-request-id"
NO_STORE = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
UNMATCHED = "unmatched"  # the route label of a request no route matched (never the raw path)


class RequestInfo:
    """What the log records of one request carry; the handlers fill in ``client_id``.  ``scope``
    is the request's ASGI scope: the events of the request find the client's address in it
    (``throttle.client_address``, behind ``trusted_proxies``), only when an event is made."""

    __slots__ = ("request_id", "client_id", "scope")

    def __init__(self, request_id: str, scope: Scope | None = None) -> None:
        self.request_id = request_id
        self.client_id: str | None = None
        self.scope = scope


CURRENT: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar("ssa_request", default=None)


def note_client(client_id: str) -> None:
    """The request's authenticated client (its log line's ``client_id``)."""
    info = CURRENT.get()
    if info is not None:
        info.client_id = client_id


class _Ids:
    """Request ids made here: a random prefix per process, then a counter."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(6) + "-"
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


class ObserveRequests:
    def __init__(self, app: ASGIApp, metrics: Metrics | None, *, log_requests: bool = False) -> None:
        """``metrics`` None: durations not kept (``metrics_enabled = false``)."""
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests
        self.new_id = _Ids().next

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = _perf_counter()
        given = None
        for name, value in scope["headers"]:
            if name == _HEADER:
                given = value
                break
        request_id = given.decode() if given is not None and REQUEST_ID.fullmatch(given) else self.new_id()
        info = RequestInfo(request_id, scope)
        token = CURRENT.set(info)
        status = 500  # unless a response starts: an exception on its way to the 500 handler

        def send_observed(message: Message) -> Awaitable[None]:
            # A plain function handing back send's awaitable: no coroutine of its own per message
            # (the app awaits what it returns).
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", [])
                own = (_HEADER, request_id.encode())
                for name, _ in headers:  # (a loop: a generator costs more per request)
                    if name == b"cache-control":
                        message["headers"] = [*headers, own]
                        break
                else:
                    message["headers"] = [*headers, *NO_STORE, own]
            return send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            seconds = _perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            if self.metrics is not None:
                self.metrics.request(scope["method"], template, status, seconds)
            if self.log_requests:
                access.info("%s %s %d", scope["method"], template, status,
                            extra={"route": template, "status": status,
                                   "duration_ms": round(seconds * 1000, 3), "client_id": info.client_id})
            CURRENT.reset(token)
