"""Parsing and checking of request input, before the service sees it.

Janssen answers 500 for malformed JSON or wrongly typed fields; we answer 400 invalid_request
with a description that names the field.  The JSON value rules (no NaN or Infinity, nesting at
most ``MAX_DEPTH``, exact integers, storable text) are ``jsonvalues``'s.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import jsonvalues
from .errors import InvalidRequest, InvalidSsaMetadata, PayloadTooLarge
from .jsonvalues import storable  # noqa: F401  (routes and auth take it from here)

MAX_BODY = 64 * 1024
MAX_STRING = 4096
MAX_LIST = 100


@dataclass(frozen=True)
class CreateRequest:
    """A checked POST /ssa body.  ``expiration`` is None when the default applies."""

    org_id: str = ""
    description: str = ""
    software_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    software_roles: list[str] = field(default_factory=list)
    grant_types: list[str] = field(default_factory=list)
    expiration: int | None = None
    one_time_use: bool = True
    rotate_ssa: bool = True
    lifetime: int | None = None
    custom: dict[str, Any] = field(default_factory=dict)


def _check_strings(value: Any) -> None:
    """NUL anywhere in a parsed body (its nesting is already known to be within MAX_DEPTH)."""
    if isinstance(value, str):
        if not storable(value):
            raise InvalidRequest("The request body holds a NUL character or an unpaired surrogate.")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k)
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


class _Streamed(Protocol):
    def stream(self) -> AsyncIterator[bytes]: ...


async def read_body(request: _Streamed, limit: int = MAX_BODY) -> bytes:
    """The request body, refused (413) as soon as more than ``limit`` bytes have arrived, so no
    more than that is ever buffered.  Behind ``serve`` the HTTP edge refuses first (at once for a
    Content-Length over the limit); this holds under any ASGI server."""
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_body(raw: bytes) -> Any:
    if len(raw) > MAX_BODY:
        raise InvalidRequest(f"The request body is larger than {MAX_BODY} bytes.", status=413)
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        body = jsonvalues.loads(raw)  # refuses NaN, Infinity, deep nesting, unpaired surrogates
    except jsonvalues.JsonValueError as e:
        raise InvalidRequest(f"The request body {e}.") from None
    if b"\\u0000" in raw:  # the only way JSON text can carry a NUL
        _check_strings(body)
    return body


def check_fields(fields: dict[str, Any]) -> None:
    """The rules of a parsed body for fields that did not come as JSON text (CLI flags, a saved
    template): the same 400 ``invalid_request``."""
    try:
        jsonvalues.check(fields)
    except jsonvalues.JsonValueError as e:
        raise InvalidRequest(f"The request {e}.") from None


def _string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string.")
    if len(value) > MAX_STRING:
        raise InvalidRequest(f"'{name}' is longer than {MAX_STRING} characters.")
    return value


def _string_list(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"'{name}' must be a list of strings.")
    if len(value) > MAX_LIST or any(len(v) > MAX_STRING for v in value):
        raise InvalidRequest(f"'{name}' is too long.")
    return list(value)


def _bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false.")
    return value


def _integer(body: dict[str, Any], name: str, *, allow_numeric_string: bool = False) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if allow_numeric_string and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())  # Janssen's own docs send "expiration": "1696799089"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be an integer.")
    if abs(value) > 10**12:
        raise InvalidRequest(f"'{name}' is out of range.")
    return value


def parse_create_request(body: Any, custom_attributes: tuple[str, ...]) -> CreateRequest:
    """Check a POST /ssa body; unknown keys are ignored (never stored), as in Janssen."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    lifetime = _integer(body, "lifetime")
    if lifetime is not None and lifetime < 1:
        raise InvalidSsaMetadata("Invalid SSA Metadata: 'lifetime' must be at least 1 second.")
    expiration = _integer(body, "expiration", allow_numeric_string=True)
    values: dict[str, Any] = {
        "org_id": _string(body, "org_id"),
        "description": _string(body, "description"),
        "software_id": _string(body, "software_id") or None,
        "software_roles": _string_list(body, "software_roles"),
        "grant_types": _string_list(body, "grant_types"),
        "expiration": expiration if expiration is not None and expiration > 0 else None,
        "one_time_use": _bool(body, "one_time_use"),
        "rotate_ssa": _bool(body, "rotate_ssa"),
        "lifetime": lifetime,
    }
    custom = {}
    for name in custom_attributes:
        if body.get(name) is not None:
            value = body[name]
            try:
                size = len(json.dumps(value, allow_nan=False))
            except ValueError:  # NaN or Infinity from a caller that did not parse JSON text
                raise InvalidRequest(f"'{name}' holds NaN or Infinity.") from None
            if size > MAX_STRING:
                raise InvalidRequest(f"'{name}' is too large.")
            custom[name] = value
    return CreateRequest(**{k: v for k, v in values.items() if v is not None}, custom=custom)


def parse_form(raw: bytes) -> dict[str, str]:
    """An application/x-www-form-urlencoded body; a repeated parameter is invalid (RFC 6749 §3.2)."""
    from urllib.parse import parse_qsl

    if len(raw) > MAX_BODY:
        raise InvalidRequest(f"The request body is larger than {MAX_BODY} bytes.", status=413)
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("The request body is not a valid form.") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if not (storable(key) and storable(value)):
            raise InvalidRequest("The form holds a NUL character.")
        if key in form:
            raise InvalidRequest(f"The parameter '{key}' is given more than once.")
        form[key] = value
    return form
