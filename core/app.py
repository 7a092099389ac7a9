"""The Starlette application: routes, error handlers, response headers, lifespan."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .responses import JSONResponse

from .errors import ApiError, MethodNotAllowed, NotFound, ServiceUnavailable
from .observe import NO_STORE, ObserveRequests
from .routes import ALLOWED_METHODS, ROUTES
from .server import Server
from .settings import Settings
from .store import StoreDegraded, StoreUnavailable
from .tracing import OtelTracing, TraceRequests

log = logging.getLogger("ssa_server.app")

# Starlette answers an unexpected exception from its outermost middleware, outside ObserveRequests.
_NO_STORE_HEADERS = {name.decode(): value.decode() for name, value in NO_STORE}


def _error_response(error: ApiError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _error_response(NotFound())
    if exc.status_code == 405:
        allowed = ALLOWED_METHODS.get(request.url.path) or (exc.headers or {}).get("Allow", "")
        return _error_response(MethodNotAllowed(headers={"Allow": allowed}))
    return _error_response(ApiError("The request could not be served.", status=exc.status_code))


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, StoreDegraded):  # a degraded store logged its cause once, not per request
        log.error("store unavailable: %s", exc)
    return _error_response(ServiceUnavailable())


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client left (or the edge cut it: a body too slow or too large) while its body was read;
    # nothing can be answered, and nothing was done.
    log.debug("client gone on %s %s", request.method, request.url.path)
    return Response(b"", status_code=400)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # A bug: log it for the operator, never send a traceback to the client.
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "server_error", "error_description": "An unexpected error occurred."},
                        status_code=500, headers=_NO_STORE_HEADERS)


def create_app(settings: Settings | None = None, *, server: Server | None = None,
               manage_lifespan: bool = True, on_stop: Callable[[], None] | None = None) -> Starlette:
    """The ASGI app; ``server`` may be given prebuilt, else it is built from ``settings``.

    ``manage_lifespan=False`` when the caller starts and stops the server itself (``serve``
    does, so that a locked data dir is reported before uvicorn starts).  ``on_stop`` runs after
    the lifespan stopped the server.
    """
    if server is None:
        server = Server.build(settings or Settings())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not manage_lifespan:
            yield
            return
        await server.start()
        try:
            yield
        finally:
            await server.stop()
            if on_stop is not None:
                on_stop()

    handlers: dict[Any, Any] = {
        ApiError: _api_error,
        HTTPException: _http_error,
        StoreUnavailable: _store_unavailable,
        ClientDisconnect: _client_gone,
        Exception: _unexpected,
    }
    app = Starlette(routes=ROUTES, exception_handlers=handlers, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(ObserveRequests, metrics=server.metrics if server.settings.metrics_enabled else None,
                       log_requests=server.settings.access_log)
    if isinstance(server.tracing, OtelTracing):  # (off: no middleware, nothing per request)
        app.add_middleware(TraceRequests, tracing=server.tracing)  # outermost: the request's span
    return app
