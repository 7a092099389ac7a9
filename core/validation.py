"""Parsing and checking of request input, before the service sees it.

Janssen answers 500 for malformed JSON or wrongly typed fields; we answer 400 invalid_request
with a description that names the field.  The JSON value rules (no NaN or Infinity, nesting at
most ``MAX_DEPTH``, exact integers, storable text) are ``jsonvalues``'s.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from . import jsonvalues
from .errors import InvalidRequest, InvalidSsaMetadata, PayloadTooLarge
from .jsonvalues import storable  # noqa: F401  (routes and auth take it from here)
from .ssa import REQUEST_FIELDS, CreateRequest, Kind

MAX_BODY = 64 * 1024
MAX_STRING = 4096
MAX_LIST = 100


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


def _epoch(body: dict[str, Any], name: str) -> int | None:
    value = _integer(body, name, allow_numeric_string=True)
    return value if value is not None and value > 0 else None  # 0 or less: the default


def _seconds(body: dict[str, Any], name: str) -> int | None:
    value = _integer(body, name)
    if value is not None and value < 1:
        raise InvalidSsaMetadata(f"Invalid SSA Metadata: '{name}' must be at least 1 second.")
    return value


_PARSERS: dict[Kind, Callable[[dict[str, Any], str], Any]] = {
    "text": _string, "texts": _string_list, "boolean": _bool, "epoch": _epoch, "seconds": _seconds,
}
_FIELDS = tuple((f.name, _PARSERS[f.kind], f.generated) for f in REQUEST_FIELDS)


def parse_create_request(body: Any, custom_attributes: tuple[str, ...]) -> CreateRequest:
    """Check a create request (the fields of ``ssa.CreateRequest``, by their kind); unknown keys
    are ignored (never stored), as in Janssen.  An absent or null field takes its default, and so
    does an empty one whose default is generated (``software_id``)."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    values: dict[str, Any] = {}
    for name, parse, generated in _FIELDS:
        value = parse(body, name)
        if value is not None and (value or not generated):
            values[name] = value
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
    return CreateRequest(**values, custom=custom)


def parse_script_test(body: Any) -> tuple[str, dict[str, Any] | None]:
    """A POST /scripts/NAME/test body: ``{"hook": "create"|"get"|"revoke", "event": {"payload": {...},
    "context": {...}}}``, the event and either part optional (the sample fills them in)."""
    from .script_rules import HOOKS

    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    hook = body.get("hook")
    if hook not in HOOKS:
        raise InvalidRequest(f"'hook' must be one of {', '.join(HOOKS)}.")
    event = body.get("event")
    if event is None:
        return hook, None
    parts = ("payload", "context")
    if not isinstance(event, dict) or any(not isinstance(event.get(k, {}), dict) for k in parts):
        raise InvalidRequest("'event' must be an object of 'payload' and 'context' objects.")
    return hook, {k: event[k] for k in parts if k in event}


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
