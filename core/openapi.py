"""The OpenAPI 3.1 document of every route (a test keeps it in step with ``routes.ROUTES``)."""

from __future__ import annotations

from typing import Any

from .client_assertions import ASSERTION_ALGS, JWT_BEARER, MAX_ASSERTION
from .service import TEMPLATE_NAME
from .ssa import ADMIN, DEVELOPER, PORTAL, REQUEST_FIELDS, STATES, Kind
from .store.search import DEFAULT_LIMIT, MAX_LENGTH, MAX_LIMIT, MAX_TERMS

_ERROR = {"$ref": "#/components/schemas/Error"}
_JWT = {"type": "object", "required": ["ssa"],
        "properties": {"ssa": {"type": "string", "description": "compact JWS"}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {400: "Bad request", 401: "Missing or invalid token, or insufficient scope (unauthorized_client)",
            403: "Feature flag off (access_denied) or a script denied the request",
            404: "No SSA with this jti (invalid_jti): never issued, or purged; no such script or template",
            406: "Neither jti nor org_id given", 413: "Body too large", 422: "No ACTIVE SSA matches",
            429: "Too many failed client authentications, or unknown jtis from one address "
                 "(slow_down, Retry-After)",
            502: "A script failed",
            503: "Not ready, the store is unreachable, or no script worker is free in time "
                 "(temporarily_unavailable; Retry-After)"}
    return {str(s): {"description": text[s], "content": {"application/json": {"schema": _ERROR}}}
            for s in statuses}


def _ok(description: str, schema: dict[str, Any] | None = None, status: int = 200) -> dict[str, Any]:
    body: dict[str, Any] = {"description": description}
    if schema is not None:
        body["content"] = {"application/json": {"schema": schema}}
    return {str(status): body}


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": "string"},
            "description": description}


_KIND_SCHEMAS: dict[Kind, dict[str, Any]] = {
    "text": {"type": "string"}, "texts": {"type": "array", "items": {"type": "string"}},
    "boolean": {"type": "boolean"}, "epoch": {"type": ["integer", "string"]},
    "seconds": {"type": "integer", "minimum": 1},
}


CUSTOM_MARK = "x-ssa-custom-attribute"  # marks the configured custom attributes (the text UI reads them)


def create_request_schema(custom_attributes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The POST /ssa body: the fields of ``ssa.CreateRequest``, then the server's configured custom
    attributes (any JSON value, marked ``x-ssa-custom-attribute``): the one place the API says
    which custom attributes it keeps."""
    properties: dict[str, Any] = {}
    for f in REQUEST_FIELDS:
        schema = {**_KIND_SCHEMAS[f.kind], "description": f.help}
        if f.kind == "boolean":
            schema["default"] = f.default
        properties[f.name] = schema
    for name in custom_attributes:
        properties[name] = {"description": "a configured custom attribute (any JSON value)",
                            CUSTOM_MARK: True}
    return {"type": "object", "properties": properties, "additionalProperties": True}


def openapi_document(issuer: str, custom_attributes: tuple[str, ...] = ()) -> dict[str, Any]:
    bearer = lambda *scopes: [{"bearer": list(scopes)}]  # noqa: E731
    create_schema = create_request_schema(custom_attributes)
    ssa_item: dict[str, Any] = {
        "type": "object",
        "required": ["ssa", "created_at", "expiration", "iss", "status"],
        "properties": {
            "ssa": {"type": "object", "additionalProperties": True},
            "created_at": {"type": "integer"}, "expiration": {"type": "integer"},
            "iss": {"type": "string", "description": "client_id that created the SSA"},
            "status": {"type": "string", "enum": ["ACTIVE"]},
        },
    }
    stored_item = dict(ssa_item, properties=dict(ssa_item["properties"],
                                                 status={"type": "string", "enum": list(STATES)}))
    any_object = {"type": "object", "additionalProperties": True}
    template_item = {"type": "object", "required": ["name", "fields", "created_at"],
                     "properties": {"name": {"type": "string"}, "fields": any_object,
                                    "created_at": {"type": "integer",
                                                   "description": "when it was last saved"}}}
    template_name = {"name": "name", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": TEMPLATE_NAME.pattern},
                     "description": "1-64 ASCII letters, digits, '.', '_', '-'; "
                                    "starts with a letter or digit"}
    paths: dict[str, Any] = {
        "/token": {"post": {
            "summary": "Client-credentials grant (RFC 6749 §4.4); the client authenticates with HTTP Basic, "
                       "client_secret_post or private_key_jwt (RFC 7523 §2.2: client_assertion_type and "
                       "client_assertion), one method per client",
            "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                "type": "object", "required": ["grant_type"],
                "properties": {"grant_type": {"const": "client_credentials"}, "scope": {"type": "string"},
                               "client_id": {"type": "string"}, "client_secret": {"type": "string"},
                               "client_assertion_type": {"const": JWT_BEARER},
                               "client_assertion": {
                                   "type": "string", "maxLength": MAX_ASSERTION,
                                   "description": "a JWT signed by the client (iss = sub = client_id, aud = "
                                                  "the token endpoint or the issuer, exp, jti used once; "
                                                  f"alg one of {', '.join(ASSERTION_ALGS)})"}}}}}},
            "responses": {**_ok("Access token", {"type": "object", "required": ["access_token", "token_type",
                                                                               "expires_in", "scope"]}),
                          **_errors(400, 401, 413, 429, 503)},
        }},
        "/ssa": {
            "post": {"summary": "Create an SSA", "security": bearer(ADMIN),
                     "requestBody": {"required": True,
                                     "content": {"application/json": {"schema": create_schema}}},
                     "responses": {**_ok("The signed SSA", _JWT, 201),
                                   **_errors(400, 401, 403, 413, 502, 503)}},
            "get": {"summary": "List active SSAs", "security": bearer(ADMIN, PORTAL, DEVELOPER),
                    "parameters": [_query("jti", "SSA id"), _query("org_id", "organization")],
                    "responses": {**_ok("Matching SSAs", {"type": "array", "items": ssa_item}),
                                  **_errors(400, 401, 403, 502, 503)}},
            "delete": {"summary": "Revoke SSAs", "security": bearer(ADMIN),
                       "parameters": [_query("jti", "SSA id"), _query("org_id", "organization")],
                       "responses": {**_ok("Revoked (empty body)"), **_errors(400, 401, 403, 406, 422, 503)}},
        },
        "/ssa/search": {"get": {
            "summary": "Search every stored SSA, of any status (admin; docs/store.md, Search)",
            "security": bearer(ADMIN),
            "parameters": [
                {"name": "where", "in": "query", "required": False, "explode": True,
                 "schema": {"type": "array", "items": {"type": "string"}},
                 "description": f"field op value[,field op value...]; repeatable, every term must hold "
                                f"(at most {MAX_TERMS} terms, {MAX_LENGTH} characters); "
                                "ops = != < <= > >= ~; fields: any SSA field, a configured custom attribute, "
                                "or custom.NAME; created_at and expiration also take ISO 8601 dates"},
                {"name": "limit", "in": "query", "required": False, "schema": {
                    "type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}}],
            "responses": {**_ok("Matching SSAs, oldest first", {"type": "array", "items": stored_item}),
                          **_errors(400, 401, 403, 503)}}},
        "/ssa/templates": {"get": {
            "summary": "Saved templates (create bodies to reuse), oldest first", "security": bearer(ADMIN),
            "responses": {**_ok("Templates", {"type": "array", "items": template_item}),
                          **_errors(401, 403, 503)}}},
        "/ssa/templates/{name}": {
            "put": {"summary": "Save or replace a template: the body is checked as a POST /ssa body; "
                               "unknown members are dropped",
                    "security": bearer(ADMIN), "parameters": [template_name],
                    "requestBody": {"required": True,
                                    "content": {"application/json": {"schema": create_schema}}},
                    "responses": {**_ok("Replaced (empty body)"), **_ok("Created (empty body)", status=201),
                                  **_errors(400, 401, 403, 413, 503)}},
            "delete": {"summary": "Delete a template", "security": bearer(ADMIN),
                       "parameters": [template_name],
                       "responses": {"204": {"description": "Deleted"}, **_errors(400, 401, 403, 404, 503)}}},
        "/ssa/jwt": {"get": {"summary": "The SSA JWT, re-signed", "security": bearer(ADMIN),
                             "parameters": [_query("jti", "SSA id")],
                             "responses": {**_ok("The JWT", _JWT), **_errors(400, 401, 403, 503)}}},
        "/ssa/validation": {"post": {
            "summary": "Validate an SSA (a one-time SSA becomes USED)",
            "parameters": [{"name": "jti", "in": "header", "required": True, "schema": {"type": "string"}}],
            "responses": {**_ok("Valid (empty body)"), **_errors(400, 403, 503)}}},
        "/ssa/status": {"get": {
            "summary": "An SSA's status, without a token and without any change "
                       "(a one-time SSA stays ACTIVE)",
            "parameters": [{"name": "jti", "in": "query", "required": True, "schema": {"type": "string"}}],
            "responses": {**_ok("The status", {
                "type": "object", "required": ["jti", "status", "exp", "one_time_use"],
                "properties": {"jti": {"type": "string"}, "status": {"type": "string", "enum": list(STATES)},
                               "exp": {"type": "integer"}, "one_time_use": {"type": "boolean"}}}),
                          **_errors(400, 403, 404, 429, 503)}}},
        "/statuslists/{list_id}": {"get": {
            "summary": "A Token Status List Token (draft-ietf-oauth-status-list-19; docs/consumers.md)",
            "parameters": [{"name": "list_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The signed list (cacheable for its ttl)",
                                  "content": {"application/statuslist+jwt": {"schema": {"type": "string"}}}},
                          "404": {"description": "No such list, or status lists are off (not_found)",
                                  "content": {"application/json": {"schema": _ERROR}}}}}},
        "/scripts": {"get": {"summary": "Loaded user scripts: hooks, revision, state, last error, calls, "
                                        "failures by kind, p50, p99, HTTP calls",
                             "security": bearer(ADMIN),
                             "responses": {**_ok("Scripts", {"type": "array", "items": any_object}),
                                           **_errors(401, 503)}}},
        "/scripts/{name}/logs": {"get": {
            "summary": "A script's last log lines and failures (a ring per script, per server process)",
            "security": bearer(ADMIN),
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "since", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 0, "default": 0},
                            "description": "the cursor: entries with a greater seq (the last answer's next)"},
                           {"name": "limit", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1000}}],
            "responses": {**_ok("Entries {seq, time, revision, kind: log|failure, line} and next",
                                any_object),
                          **_errors(400, 401, 404)}}},
        "/scripts/{name}/revisions": {"get": {
            "summary": "A script's kept revisions, newest first (from the store: any node answers)",
            "security": bearer(ADMIN),
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {**_ok("{name, revisions: [{revision, seen_at, state: loaded|refused|failed, "
                                "reason, seen_by, has_config}]}", any_object),
                          **_errors(401, 404, 503)}}},
        "/scripts/{name}/test": {"post": {
            "summary": "Run one hook of a loaded script on a sample event (or the given one) in a fresh "
                       "sandbox, as `ssa-server scripts test` does; the serving scripts are not touched",
            "security": bearer(ADMIN),
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["hook"],
                "properties": {"hook": {"enum": ["create", "get", "revoke"]},
                               "event": {"type": "object", "properties": {"payload": any_object,
                                                                          "context": any_object}}}}}}},
            "responses": {**_ok("{name, hook, revision, result: {header and claims, or ssa_list; result, "
                                "logs, denied}}, or, when the script failed, error: {kind, message}",
                                any_object),
                          **_errors(400, 401, 404, 503)}}},
        "/.well-known/openid-configuration": {"get": {"summary": "Discovery",
                                                      "responses": _ok("Metadata", any_object)}},
        "/.well-known/oauth-authorization-server": {"get": {"summary": "RFC 8414 metadata",
                                                            "responses": _ok("Metadata", any_object)}},
        "/jwks": {"get": {"summary": "Public SSA signing keys",
                          "responses": {**_ok("JWK set", any_object), **_errors(503)}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": _ok("OpenAPI 3.1", any_object)}},
        "/health/live": {"get": {"summary": "Liveness", "responses": _ok("Alive", any_object)}},
        "/health/ready": {"get": {"summary": "Readiness (store, signing key)",
                                  "responses": {**_ok("Ready", any_object), **_errors(503)}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text format; no jti, org_id or client_id in any label). "
                       "With metrics_port set: served open on that port, and 404 here",
            "security": bearer(ADMIN),
            "responses": {"200": {"description": "Prometheus text format 0.0.4",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_errors(401, 404, 503)}}},
        "/audit": {"get": {
            "summary": "The audit trail, oldest first, a page at a time (admin): every create, revoke, "
                       "validation, get-JWT, refused token grant, client, key and script change, with "
                       "its actor, address, request id, outcome, reason and the hash chain's seq, "
                       "prev_hash and hash",
            "security": bearer(ADMIN),
            "parameters": [
                _query("since", "events at or after this time: epoch seconds or ISO 8601"),
                _query("action", "one action (ssa.created, ssa.revoked, token.refused, ...)"),
                _query("jti", "events of this SSA"), _query("org_id", "events of this organisation"),
                _query("limit", "events per page, 1 to 1000 (default 100)"),
                _query("next", "the cursor the previous page answered as next"),
            ],
            "responses": {**_ok("A page: events and the next cursor (null: no more)", {
                "type": "object", "required": ["events", "next"],
                "properties": {"events": {"type": "array", "items": {"type": "object"}},
                               "next": {"type": ["integer", "null"]}}}),
                **_errors(400, 401, 404, 503)}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "ssa-server", "version": "1", "description": "Janssen-compatible SSA API"},
        "servers": [{"url": issuer}],
        "paths": paths,
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error", "error_description"],
                                  "properties": {"error": {"type": "string"},
                                                 "error_description": {"type": "string"}}}},
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                "description": "An access token from POST /token or, when configured, from an external "
                               "authorization server (an RFC 9068 at+jwt, or an opaque token it "
                               "introspects: RFC 7662); 503 when that server cannot be asked"}},
        },
    }
