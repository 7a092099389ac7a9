"""JSON values every store keeps exactly, and the one way this server writes and reads JSON text.

Reading untrusted text (``loads``, ``check``), checked before anything else touches it:

- No NaN, Infinity or -Infinity, and no number beyond the float range: they are not JSON, yet the
  stdlib reads and writes them, orjson writes NaN as null and PostgreSQL refuses them.
- Nesting is limited (``MAX_DEPTH``, as a script's result) and checked before any recursive code
  runs (``json``, ``clone``, the string checks): a deep value cannot reach a RecursionError.
- Integers of any size stay exact: orjson would read one beyond 64 bits as a float, so such a text
  is read by the stdlib, after orjson has checked its syntax.
- Text is UTF-8: no unpaired surrogate (``storable`` also refuses NUL, which PostgreSQL cannot hold).

The depth check costs two ``bytes.count`` calls on the raw text; only a text with more brackets
than the limit is walked.

Writing (``dumps``, ``encode``), the one convention of orjson and the stdlib: orjson writes; what
it refuses (an integer beyond 64 bits) the stdlib writes in the same form (compact, UTF-8, no NaN).
Such a text is *wide*: read back by orjson its big integers would become floats, so a reader of
text we wrote reads a wide one with ``loads_wide``.  The container records which texts are wide
its own way (a journal line carries ``"j": 1``; a sandbox frame can start with a space, as
``core/frames.py`` does); a reader of text from outside uses ``loads``, which finds
the long digit runs itself.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

MAX_DEPTH = 32  # arrays and objects, the outermost one included

_LONG_NUMBER = re.compile(rb"[0-9]{20,}")
_LONG_NUMBER_HEAD = re.compile(rb"([0-9]{19})[0-9]+")


class JsonValueError(ValueError):
    """Not a JSON value every store keeps as it is; the message completes "The value ..."."""


class NotJson(JsonValueError):
    """Not JSON text at all."""


def loads(raw: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """The value of JSON text ``raw``, checked as the module says; JsonValueError otherwise."""
    long = _LONG_NUMBER.search(raw) is not None
    try:
        # orjson first, always: strict (no NaN or Infinity, no overflow to infinity, no unpaired
        # surrogate, UTF-8 only) and not recursive in Python.  Digit runs are cut to 19 for this
        # check only (a number stays a number, a \u escape stays whole).
        value = orjson.loads(_LONG_NUMBER_HEAD.sub(rb"\1", raw) if long else raw)
    except orjson.JSONDecodeError as e:
        if "depth" in str(e):
            raise JsonValueError(f"is nested deeper than {max_depth} levels") from None
        if "infinity" in str(e):
            raise JsonValueError("holds a number beyond the float range") from None
        raise NotJson("is not valid JSON") from None
    if raw.count(b"[") + raw.count(b"{") > max_depth:  # fewer brackets cannot nest deeper
        check_depth(value, max_depth)
    if long:  # the exact integers; the depth is known to be small now
        try:
            value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
        except JsonValueError:
            raise
        except ValueError:
            raise NotJson("is not valid JSON") from None
    return value


def dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    """Compact UTF-8 JSON text of ``value`` (orjson; the stdlib for what orjson refuses)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except TypeError:
        return _stdlib_dumps(value, sort_keys)


def encode(value: Any, *, sort_keys: bool = False, newline: bool = False) -> tuple[bytes, bool]:
    """``dumps`` (with a final newline if asked), and whether the text is wide (read it back
    with ``loads_wide``)."""
    try:
        option = (orjson.OPT_SORT_KEYS if sort_keys else 0) | (orjson.OPT_APPEND_NEWLINE if newline else 0)
        return orjson.dumps(value, option=option), False
    except TypeError:
        text = _stdlib_dumps(value, sort_keys)
        return (text + b"\n" if newline else text), True


def _stdlib_dumps(value: Any, sort_keys: bool) -> bytes:
    # UnicodeEncodeError (a ValueError) for text that is not UTF-8; ValueError for NaN.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      sort_keys=sort_keys).encode()


def loads_wide(text: bytes) -> Any:
    """The value of a wide text this server wrote (integers beyond 64 bits exact).  Not for text
    from outside: it checks nothing ``loads`` checks."""
    return json.loads(text)


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """JsonValueError if arrays and objects nest deeper than ``limit`` (no recursion)."""
    if type(value) is not dict and type(value) is not list:
        return
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise JsonValueError(f"is nested deeper than {limit} levels")
        for child in item.values() if type(item) is dict else item:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))


def check(value: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """The same rules for a value that was not read from JSON text (CLI flags, a saved template):
    JSON types only, string keys, finite floats, storable text, nesting within ``max_depth``."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is dict or kind is list:
            if depth >= max_depth:
                raise JsonValueError(f"is nested deeper than {max_depth} levels")
            if kind is dict:
                for key in item:
                    if type(key) is not str or not storable(key):
                        raise JsonValueError("has a key that is not storable text")
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
        elif kind is str:
            if not storable(item):
                raise JsonValueError("holds a NUL character or text that is not UTF-8")
        elif kind is float:
            if not math.isfinite(item):
                raise JsonValueError("holds NaN or Infinity")
        elif item is not None and kind is not bool and kind is not int:
            raise JsonValueError(f"holds a {kind.__name__}, which is not JSON")


def storable(text: str) -> bool:
    """Whether every store can keep ``text``: no NUL (PostgreSQL text and JSONB refuse it) and no
    unpaired surrogate (not encodable as UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_constant(name: str) -> Any:
    raise JsonValueError(f"holds {name}, which is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonValueError("holds a number beyond the float range")
    return value


def clone(value: Any) -> Any:
    """A deep copy of a JSON value (faster than ``copy.deepcopy``: it knows only dicts and lists)."""
    if type(value) is dict:
        return {k: clone(v) for k, v in value.items()}
    if type(value) is list:
        return [clone(v) for v in value]
    return value
