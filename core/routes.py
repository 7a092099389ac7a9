"""HTTP handlers: parse the request, call the service, shape the response.  No rules here."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .responses import JSONResponse
from starlette.routing import Route

from .audit import AuditQuery
from .auth import authenticate, basic_credentials
from .events import ANONYMOUS_ACTOR
from .client_assertions import ASSERTION_ALGS, PRIVATE_KEY_JWT
from .errors import InvalidRequest, NotFound
from .metrics import CONTENT_TYPE
from .script_revisions import RevisionError, history
from .server import Server
from .service import CallContext
from .status_list import MEDIA_TYPE
from .ssa import ADMIN, DEVELOPER, PORTAL, SSA_SCOPES
from .throttle import client_address
from .tokens import Caller
from .validation import (parse_create_request, parse_form, parse_json_body, parse_script_test, read_body,
                         storable)

def _server(request: Request) -> Server:
    return request.app.state.server


def _context(request: Request, caller: Caller) -> CallContext:
    scope = request.scope
    return CallContext(caller.client_id, caller.scopes, scope["method"], scope["path"], scope["headers"])


async def _ssa_caller(request: Request, *scopes: str) -> Caller:
    """Feature flag first (as Janssen), then the token and its scopes."""
    server = _server(request)
    server.service.require_enabled()
    with server.tracing.span("auth") as span:
        caller = await authenticate(request, server.tokens, server.clients, scopes)
        span.set_attribute("ssa.client_id", caller.client_id)
    return caller


def _query(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise InvalidRequest(f"The parameter '{name}' is given more than once.")
    if values and not storable(values[0]):
        raise InvalidRequest(f"The parameter '{name}' holds a NUL character.")
    return values[0] if values and values[0].strip() else None


def _empty(status: int = 200) -> Response:
    return Response(b"", status_code=status, media_type="application/json")


async def token(request: Request) -> Response:
    server = _server(request)
    if not server.settings.token_endpoint_enabled:
        raise NotFound("The token endpoint is turned off (token_endpoint_enabled is false): "
                       "get a token from the authorization server.")
    clients = server.clients
    form = parse_form(await read_body(request))
    return JSONResponse(await clients.token(form, basic_credentials(request),
                                            lambda: client_address(request.scope, clients.proxies)))


async def create_ssa(request: Request) -> Response:
    caller = await _ssa_caller(request, ADMIN)
    server = _server(request)
    with server.tracing.span("validation"):
        raw = await read_body(request)
        body = parse_create_request(parse_json_body(raw), server.settings.custom_attributes)
    jwt = await server.service.create(body, _context(request, caller))
    return JSONResponse({"ssa": jwt}, status_code=201)


async def list_ssas(request: Request) -> Response:
    caller = await _ssa_caller(request, ADMIN, PORTAL, DEVELOPER)
    items = await _server(request).service.list_ssas(
        _context(request, caller), jti=_query(request, "jti"), org_id=_query(request, "org_id"))
    return JSONResponse(items)


async def search_ssas(request: Request) -> Response:
    caller = await _ssa_caller(request, ADMIN)
    limit = _query(request, "limit")
    if limit is not None and not (limit.isascii() and limit.isdigit() and len(limit) <= 9):
        raise InvalidRequest("'limit' must be a positive integer.")
    items = await _server(request).service.search(
        _context(request, caller), request.query_params.getlist("where"),
        limit=int(limit) if limit is not None else None)
    return JSONResponse(items)


async def revoke_ssas(request: Request) -> Response:
    caller = await _ssa_caller(request, ADMIN)
    await _server(request).service.revoke(
        _context(request, caller), jti=_query(request, "jti"), org_id=_query(request, "org_id"))
    return _empty()


async def get_jwt(request: Request) -> Response:
    caller = await _ssa_caller(request, ADMIN)
    return JSONResponse({"ssa": await _server(request).service.get_jwt(_query(request, "jti"),
                                                                       actor=caller.client_id)})


async def list_templates(request: Request) -> Response:
    await _ssa_caller(request, ADMIN)
    return JSONResponse(await _server(request).service.list_templates())


async def put_template(request: Request) -> Response:
    """201 for a new template, 200 for a replaced one; the body is a create body."""
    caller = await _ssa_caller(request, ADMIN)
    service = _server(request).service
    created = await service.save_template(request.path_params["name"],
                                          parse_json_body(await read_body(request)), caller.client_id)
    return _empty(201 if created else 200)


async def delete_template(request: Request) -> Response:
    caller = await _ssa_caller(request, ADMIN)
    await _server(request).service.delete_template(request.path_params["name"], caller.client_id)
    return Response(status_code=204)


async def validate_ssa(request: Request) -> Response:
    server = _server(request)
    jti = request.headers.get("jti")
    await server.service.validate(jti if jti is None or storable(jti) else None,  # unstorable: no such SSA
                                  actor=ANONYMOUS_ACTOR)
    return _empty()


async def ssa_status(request: Request) -> Response:
    """Open like /ssa/validation (consumers hold no token); unknown jtis are throttled per address."""
    server = _server(request)
    server.service.require_enabled()
    body = await server.service.status(_query(request, "jti"),
                                       lambda: client_address(request.scope, server.clients.proxies))
    return JSONResponse(body)


async def status_list(request: Request) -> Response:
    """A Token Status List Token (open: consumers fetch it); cacheable for its ttl, unlike the rest."""
    server = _server(request)
    list_id = request.path_params["list_id"]
    token = None
    if server.settings.status_list and list_id.isascii() and list_id.isdigit() and len(list_id) <= 18:
        token = await server.service.status_lists.token(list_id)
    if token is None:
        raise NotFound("No such status list.")
    return Response(token.jwt.encode("ascii"), media_type=MEDIA_TYPE,
                    headers={"Cache-Control": f"public, max-age={token.ttl}"})


def discovery_document(request: Request) -> dict[str, Any]:
    settings = _server(request).settings
    doc: dict[str, Any] = {"issuer": settings.issuer, "jwks_uri": f"{settings.issuer}/jwks"}
    if settings.token_endpoint_enabled:  # off: the external authorization server issues the tokens
        doc.update({
            "token_endpoint": f"{settings.issuer}/token",
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post",
                                                      PRIVATE_KEY_JWT],
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
            "grant_types_supported": ["client_credentials"],
        })
    doc["scopes_supported"] = list(SSA_SCOPES)
    doc["response_types_supported"] = ["token"]
    if settings.enabled:
        doc["ssa_endpoint"] = settings.ssa_endpoint
        doc["ssa_status_endpoint"] = f"{settings.issuer}/ssa/status"
    return doc


async def list_scripts(request: Request) -> Response:
    server = _server(request)
    await authenticate(request, server.tokens, server.clients, (ADMIN,))
    return JSONResponse(server.scripts.listing() if server.scripts is not None else [])


LOG_PAGE = 1000  # ring entries per answer (a ring holds script_log_buffer)


async def script_logs(request: Request) -> Response:
    """A script's ring of log lines and failures after the cursor ``since`` (admin)."""
    server = _server(request)
    await authenticate(request, server.tokens, server.clients, (ADMIN,))
    since = _count_param(request, "since", 0, 0, 2**53)
    limit = _count_param(request, "limit", LOG_PAGE, 1, LOG_PAGE)
    name = request.path_params["name"]
    found = server.scripts.logs(name, since, limit) if server.scripts is not None else None
    if found is None:
        raise NotFound(f"no script named {name[:64]!r}")
    lines, cursor = found
    return JSONResponse({"name": name, "lines": lines, "next": cursor})


async def script_revisions(request: Request) -> Response:
    """A script's kept revisions, newest first (admin; from the store, so any node answers)."""
    server = _server(request)
    await authenticate(request, server.tokens, server.clients, (ADMIN,))
    name = request.path_params["name"]
    try:
        found = await history(server.store, name)
    except RevisionError as e:
        raise NotFound(str(e)) from None
    return JSONResponse({"name": name, "revisions": found})


async def script_test(request: Request) -> Response:
    """Run one hook of a loaded script on a sample (or the given) event in a fresh sandbox (admin);
    the script's failure is the answer's ``error``, not an HTTP error."""
    server = _server(request)
    await authenticate(request, server.tokens, server.clients, (ADMIN,))
    hook, event = parse_script_test(parse_json_body(await read_body(request)))
    name = request.path_params["name"]
    found = None
    if server.scripts is not None:
        found = await asyncio.to_thread(server.scripts.test_hook, name, hook, event)
    if found is None:
        raise NotFound(f"no script named {name[:64]!r}")
    return JSONResponse(found)


def _count_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = _query(request, name)
    if text is None:
        return default
    if not text.isdigit() or len(text) > 16 or not low <= int(text) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return int(text)


async def audit(request: Request) -> Response:
    """A page of the audit trail (admin): ``since``, ``action``, ``jti``, ``org_id``, ``limit``,
    and ``next`` (the cursor a previous page answered)."""
    server = _server(request)
    await authenticate(request, server.tokens, server.clients, (ADMIN,))
    if server.audit is None:
        raise NotFound("The audit trail is off (audit_enabled = false).")
    for name in request.query_params:
        if name not in AUDIT_PARAMS:
            raise InvalidRequest(f"Unknown parameter '{name[:64]}'; use {', '.join(AUDIT_PARAMS)}.")
    query = AuditQuery.parse(**{name: _query(request, name) for name in AUDIT_PARAMS})
    return JSONResponse(await server.audit.page(query))


AUDIT_PARAMS = ("since", "action", "jti", "org_id", "limit", "next")


async def metrics(request: Request) -> Response:
    """The Prometheus text format (``metrics.py``), admin token on the main port; with
    ``metrics_port`` set it is served there (open) and this route answers 404."""
    server = _server(request)
    if not server.settings.metrics_enabled:
        raise NotFound("Metrics are off (metrics_enabled = false).")
    if server.settings.metrics_port:
        raise NotFound("Metrics are served on the metrics port (metrics_port).")
    await authenticate(request, server.tokens, server.clients, (ADMIN,))
    await server.observe_state()
    return Response(server.metrics.exposition(), media_type=CONTENT_TYPE)


async def discovery(request: Request) -> Response:
    return JSONResponse(discovery_document(request))


async def jwks(request: Request) -> Response:
    server = _server(request)
    await server.keys.refresh_if_due()
    return JSONResponse(server.keys.jwks())


async def openapi(request: Request) -> Response:
    from .openapi import openapi_document

    settings = _server(request).settings
    return JSONResponse(openapi_document(settings.issuer, settings.custom_attributes))


async def health_live(request: Request) -> Response:
    return JSONResponse({"status": "UP"})


async def health_ready(request: Request) -> Response:
    checks = await _server(request).readiness()
    up = all(c["status"] == "UP" for c in checks)
    return JSONResponse({"status": "UP" if up else "DOWN", "checks": checks}, status_code=200 if up else 503)


# Starlette tries the routes in order (a regex each), so the busiest come first: every route
# above a request's own costs it a match (each a few thousand instructions; measured).  No two
# routes' paths overlap, so the order changes nothing else (a 405's Allow lists every method).
ROUTES = [
    Route("/ssa/validation", validate_ssa, methods=["POST"]),
    Route("/ssa", create_ssa, methods=["POST"]),
    Route("/ssa", list_ssas, methods=["GET"]),
    Route("/ssa/status", ssa_status, methods=["GET"]),
    Route("/token", token, methods=["POST"]),
    Route("/statuslists/{list_id}", status_list, methods=["GET"]),
    Route("/jwks", jwks, methods=["GET"]),
    Route("/ssa", revoke_ssas, methods=["DELETE"]),
    Route("/ssa/jwt", get_jwt, methods=["GET"]),
    Route("/ssa/search", search_ssas, methods=["GET"]),
    Route("/ssa/templates", list_templates, methods=["GET"]),
    Route("/ssa/templates/{name}", put_template, methods=["PUT"]),
    Route("/ssa/templates/{name}", delete_template, methods=["DELETE"]),
    Route("/scripts", list_scripts, methods=["GET"]),
    Route("/scripts/{name}/logs", script_logs, methods=["GET"]),
    Route("/scripts/{name}/revisions", script_revisions, methods=["GET"]),
    Route("/scripts/{name}/test", script_test, methods=["POST"]),
    Route("/.well-known/openid-configuration", discovery, methods=["GET"]),
    Route("/.well-known/oauth-authorization-server", discovery, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/health/live", health_live, methods=["GET"]),
    Route("/health/ready", health_ready, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/audit", audit, methods=["GET"]),
]

# Every method of each path, for the Allow header of a 405 (/ssa is three routes).
ALLOWED_METHODS = {path: ", ".join(sorted({m for r in ROUTES if r.path == path for m in r.methods or ()}))
                   for path in {r.path for r in ROUTES}}
