"""API errors: one class per contract, one JSON body shape everywhere.

Every error body is ``{"error": code, "error_description": text}``.  Descriptions are kept to
RFC 6749 §5.2's character set (printable ASCII without ``"`` and ``\\``) so they are also safe
inside a ``WWW-Authenticate`` header.
"""

from __future__ import annotations

import math
import re

_UNSAFE = re.compile(r'[^\x20-\x21\x23-\x5B\x5D-\x7E]')


def clean_description(text: str, limit: int = 300) -> str:
    """Printable ASCII without quote and backslash, trimmed: safe in JSON and in headers."""
    return _UNSAFE.sub("?", text)[:limit]


class ApiError(Exception):
    """An error the API answers with; ``status`` and ``error`` are the contract."""

    status: int = 400
    error: str = "invalid_request"
    description: str = "The request is invalid."

    def __init__(self, description: str | None = None, *, headers: dict[str, str] | None = None,
                 status: int | None = None, error: str | None = None) -> None:
        if description is not None:
            self.description = description
        if status is not None:
            self.status = status
        if error is not None:
            self.error = error
        self.headers = dict(headers or {})
        super().__init__(self.description)

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": clean_description(self.description)}


class InvalidRequest(ApiError):
    status, error = 400, "invalid_request"
    description = ("The request is missing a required parameter, includes an invalid parameter value, "
                   "includes a parameter more than once, or is otherwise malformed.")


class InvalidSsaMetadata(ApiError):
    status, error, description = 400, "invalid_ssa_metadata", "Invalid SSA Metadata"


class InvalidJti(ApiError):
    status, error, description = 400, "invalid_jti", "Invalid JTI or not exists"


class UnknownJti(ApiError):
    """GET /ssa/status: no SSA has this jti (never issued here, or purged after ``cleanup_grace``)."""

    status, error, description = 404, "invalid_jti", "No SSA with this jti (unknown, or purged)."


class InvalidClient(ApiError):
    """Token endpoint: unknown client or wrong secret (RFC 6749 §5.2)."""

    status, error, description = 401, "invalid_client", "Client authentication failed."

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description, headers={"WWW-Authenticate": 'Basic realm="ssa-server"'})


class InvalidScope(ApiError):
    status, error, description = 400, "invalid_scope", "The requested scope is not allowed for this client."


class UnsupportedGrantType(ApiError):
    status, error = 400, "unsupported_grant_type"
    description = "Only the client_credentials grant is supported."


def _bearer_challenge(params: dict[str, str]) -> str:
    parts = ['realm="ssa-server"'] + [f'{k}="{clean_description(v)}"' for k, v in params.items()]
    return "Bearer " + ", ".join(parts)


class MissingToken(ApiError):
    """RFC 6750 §3: no credentials at all; the challenge carries no error code."""

    status, error, description = 401, "invalid_token", "An access token is required."

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": _bearer_challenge({})})


class InvalidToken(ApiError):
    status, error, description = 401, "invalid_token", "The access token is invalid or expired."

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description)
        self.headers["WWW-Authenticate"] = _bearer_challenge(
            {"error": "invalid_token", "error_description": self.description})


class InsufficientScope(ApiError):
    """Janssen answers 401 unauthorized_client; we add RFC 6750's insufficient_scope challenge."""

    status, error, description = 401, "unauthorized_client", "Unauthorized client"

    def __init__(self, scopes: list[str]) -> None:
        super().__init__(headers={"WWW-Authenticate": _bearer_challenge(
            {"error": "insufficient_scope", "scope": " ".join(scopes)})})


class FeatureDisabled(ApiError):
    status, error, description = 403, "access_denied", "The SSA feature is disabled on this server."


class ScriptDenied(ApiError):
    """A script called ``context.deny(error, description)``."""

    status = 403


class ScriptFailed(ApiError):
    """A create/get script raised, timed out or hit a limit, and ``on_script_error`` is fail."""

    status, error = 502, "script_failed"  # the script is an upstream of the request; not a 500


class SandboxBusy(ApiError):
    """Admission control: no script worker could take the call within the script timeout, so the
    request is refused at once instead of queueing (RFC 9110 §15.6.4, with ``Retry-After``)."""

    status, error, description = 503, "temporarily_unavailable", "The script sandbox is busy; retry later."

    def __init__(self, *, retry_after: int = 1) -> None:
        super().__init__(headers={"Retry-After": str(retry_after)})


class NotAcceptable(ApiError):
    status, error, description = 406, "not_acceptable", "Give jti or org_id to choose the SSAs to revoke."


class NothingToRevoke(ApiError):
    status, error, description = 422, "unprocessable_entity", "No active SSA matches the given jti/org_id."


class NotFound(ApiError):
    status, error, description = 404, "not_found", "No such resource."


class MethodNotAllowed(ApiError):
    status, error, description = 405, "method_not_allowed", "This method is not allowed on this resource."


class ServiceUnavailable(ApiError):
    status, error, description = 503, "temporarily_unavailable", "The store is not available; retry later."

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description, headers={"Retry-After": "1"})  # the store probes about once a second


# --- the HTTP edge (``edge.py``) and the token endpoint's throttle ---
class PayloadTooLarge(ApiError):
    status, error = 413, "invalid_request"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than {limit} bytes.", headers={"Connection": "close"})


class HeadTooLarge(ApiError):
    status, error = 431, "invalid_request"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request line and headers are larger than {limit} bytes.")


class RequestTimeout(ApiError):
    status, error, description = 408, "invalid_request", "The request was not received in time."


class TooManyConnections(ApiError):
    status, error = 503, "temporarily_unavailable"
    description = "The server has too many open connections; retry later."

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})


class SlowDown(ApiError):
    """Too many failed client authentications for this client id or from this address: refused
    before the secret is checked, whether it is right or not (RFC 8628's ``slow_down`` code)."""

    status, error, description = 429, "slow_down", "Too many failed client authentications; retry later."

    def __init__(self, retry_after: float, description: str | None = None) -> None:
        super().__init__(description, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})
