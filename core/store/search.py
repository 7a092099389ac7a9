"""The admin search's filter: a small language over every stored SSA field, and its two evaluations,
side by side so that they agree: TinyDB's ``Query`` (the embedded store) and parameterised SQL
(PostgreSQL).  Nothing is evaluated as code; field names come from ``SsaRecord``, never from the
request, and every value reaches SQL as a parameter.

    where := term ("," term)*        at most MAX_TERMS terms and MAX_LENGTH characters in all
    term  := field op value          spaces around each part are ignored
    field := a record field | a configured custom attribute | "custom." any custom attribute name
    op    := "=" | "!=" | "<" | "<=" | ">" | ">=" | "~"
    value := "a JSON string" | a bare value (up to the next comma, trimmed)

Every term must hold.  ``a != v`` matches exactly the records ``a = v`` does not (records without
the field included).  By the field's kind (``docs/store.md`` has the table):

- text (``jti``, ``org_id``, ``status``, ...): ``=``/``!=`` exact, ranges by code point, ``~``
  contains; a bare value is the text as written.
- number (``created_at``, ``expiration``: an integer or an ISO 8601 date or time, UTC unless it
  says otherwise; ``lifetime``: an integer, or ``null`` for none): ``=``, ``!=`` and ranges.
- flag (``one_time_use``, ``rotate_ssa``): ``=``/``!=`` ``true`` or ``false``.
- list (``software_roles``, ``grant_types``): ``=`` holds the value, ``!=`` does not.
- custom attribute (any JSON): a bare value is a number, ``true``, ``false``, ``null`` or else
  text (quote it to make ``"5"`` text).  ``=`` equal JSON values (a list: holds the value;
  ``1 = 1.0``, ``true`` is no number), ranges compare numbers with numbers and text with text,
  ``~`` contains (text), ``= null`` matches a record without the attribute or with null.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, get_args, get_origin, get_type_hints

from tinydb import Query
from tinydb.queries import QueryInstance

from .. import jsonvalues
from ..ssa import STATES, SsaRecord, StatusRef

MAX_LENGTH = 1024  # characters of every ``where`` together
MAX_TERMS = 16
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000  # SSAs one search returns

TEXT, NUMBER, FLAG, LIST, CUSTOM = "text", "number", "flag", "list", "custom attribute"
DATE_FIELDS = frozenset({"created_at", "expiration"})
INDEXED = ("jti", "org_id", "creator_id")  # the embedded store's lookups that do not scan
_RANGES = ("<", "<=", ">", ">=")
_OPERATORS = {TEXT: ("=", "!=", *_RANGES, "~"), NUMBER: ("=", "!=", *_RANGES), FLAG: ("=", "!="),
              LIST: ("=", "!="), CUSTOM: ("=", "!=", *_RANGES, "~")}


class FilterError(ValueError):
    """A filter that is not of the language (the message names the term and what is wrong)."""


def _kinds() -> tuple[dict[str, str], frozenset[str]]:
    """Each searchable field of ``SsaRecord`` and its kind; the fields that may be null or absent."""
    kinds, nullable = {}, set()
    for name, hint in get_type_hints(SsaRecord).items():
        args = get_args(hint)
        if StatusRef in args:  # the Token Status List entry: not a search field
            continue
        if type(None) in args:
            nullable.add(name)
            hint = next(a for a in args if a is not type(None))
        if hint is str:
            kinds[name] = TEXT
        elif hint is bool:
            kinds[name] = FLAG
        elif hint is int:
            kinds[name] = NUMBER
        elif get_origin(hint) is list and get_args(hint) == (str,):
            kinds[name] = LIST
        elif get_origin(hint) is not dict:  # ``custom``: its attributes are searched by name
            raise TypeError(f"SsaRecord.{name}: no search kind for {hint}")
    return kinds, frozenset(nullable)


FIELDS, NULLABLE = _kinds()


@dataclass(frozen=True)
class Term:
    field: str  # a record field, or a custom attribute's name (``custom``)
    custom: bool
    kind: str
    op: str
    value: str | int | float | bool | None  # None: ``= null`` / ``!= null``


@dataclass(frozen=True)
class SsaFilter:
    terms: tuple[Term, ...] = ()

    def equal_to(self, field: str) -> str | None:
        """The value of the first ``field = text`` term on a record field (an index lookup)."""
        for term in self.terms:
            if term.field == field and not term.custom and term.op == "=" and type(term.value) is str:
                return term.value
        return None


# --- the language ---
_FIELD = re.compile(r"\s*(custom\.)?([^\s=!<>~,\"]*)\s*")
_OPERATOR = re.compile(r"(!=|<=|>=|=|<|>|~)\s*")
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"\s*')
_BARE = re.compile(r"[^,]*")
_INTEGER = re.compile(r"-?[0-9]+\Z")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")


def parse(where: str | Iterable[str], custom_attributes: Collection[str] = ()) -> SsaFilter:
    """The filter of ``where`` (several texts: every term of each); FilterError if it is not one.
    A bare field name is a record field or one of ``custom_attributes``."""
    texts = [where] if isinstance(where, str) else list(where)
    texts = [t for t in texts if t.strip()]
    if sum(len(t) for t in texts) > MAX_LENGTH:
        raise FilterError(f"The filter is longer than {MAX_LENGTH} characters.")
    terms: list[Term] = []
    for text in texts:
        if not jsonvalues.storable(text):
            raise FilterError("The filter holds a NUL character or text that is not UTF-8.")
        pos = 0
        while True:
            if len(terms) == MAX_TERMS:
                raise FilterError(f"The filter has more than {MAX_TERMS} terms.")
            term, pos = _term(text, pos, len(terms) + 1, custom_attributes)
            terms.append(term)
            if pos == len(text):
                break
            pos += 1  # the comma
    return SsaFilter(tuple(terms))


def _term(text: str, pos: int, number: int, custom_attributes: Collection[str]) -> tuple[Term, int]:
    def fail(problem: str) -> FilterError:
        return FilterError(f"Filter term {number}: {problem}.")

    m = _FIELD.match(text, pos)
    assert m is not None  # (it matches the empty string)
    prefix, name = m.group(1), m.group(2)
    if not name:
        raise fail("a field name is missing")
    custom = bool(prefix) or name not in FIELDS
    if custom and not prefix and name not in custom_attributes:
        raise fail(f"{name} is neither an SSA field nor a configured custom attribute (custom.{name} "
                   "searches any stored attribute)")
    kind = CUSTOM if custom else FIELDS[name]
    label = f"custom.{name}" if custom else name
    op_match = _OPERATOR.match(text, m.end())
    if op_match is None:
        raise fail(f"an operator (=, !=, <, <=, >, >=, ~) must follow {label}")
    op = op_match.group(1)
    if op not in _OPERATORS[kind]:
        raise fail(f"{label} is a {kind}: its operators are {', '.join(_OPERATORS[kind])}")
    pos = op_match.end()
    quoted = _STRING.match(text, pos)
    if quoted is not None:
        raw, pos = quoted.group(0).strip(), quoted.end()
        try:
            value: Any = json.loads(raw)
        except ValueError:
            raise fail("a quoted value is not a JSON string") from None
        if not jsonvalues.storable(value):
            raise fail("a quoted value holds a NUL character or text that is not UTF-8")
        if pos < len(text) and text[pos] != ",":
            raise fail("a comma must follow a quoted value")
    else:
        if text.startswith('"', pos):
            raise fail("a quoted value is not closed, or not a JSON string")
        bare = _BARE.match(text, pos)
        assert bare is not None
        raw, pos = bare.group(0).strip(), bare.end()
        if not raw:
            raise fail(f"a value must follow {label} {op} (quote an empty text: \"\")")
        value = _bare(raw, kind, name, fail)
    return Term(name, custom, kind, op, _checked(value, quoted is not None, kind, name, op, label, fail)), pos


def _bare(raw: str, kind: str, name: str, fail: Callable[[str], FilterError]) -> Any:
    """A bare value as its field's kind reads it (text stays text for text and list fields)."""
    if kind in (TEXT, LIST):
        return raw
    if raw in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[raw]
    if kind == NUMBER:
        if _INTEGER.match(raw):
            return int(raw)
        return _epoch(raw) if name in DATE_FIELDS else raw
    if _NUMBER.match(raw):
        number = json.loads(raw)
        if type(number) is float and not math.isfinite(number):
            raise fail(f"{raw} is beyond the float range")
        return number
    return raw


def _epoch(text: str) -> int | str:
    """An ISO 8601 date or time as epoch seconds (UTC unless it gives an offset); ``text`` if it
    is none, or not a whole second."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    if moment.microsecond:
        return text
    return int(moment.timestamp())


def _checked(value: Any, quoted: bool, kind: str, name: str, op: str, label: str,
             fail: Callable[[str], FilterError]) -> Any:
    if kind in (TEXT, LIST):
        if type(value) is not str:
            raise fail(f"{label} is {kind}: compare it with text")
        if name == "status" and op in ("=", "!=") and value not in STATES:
            raise fail(f"status is one of {', '.join(STATES)}")
        return value
    if kind == NUMBER:
        if value is None and name in NULLABLE and op in ("=", "!="):
            return None
        if quoted and name in DATE_FIELDS:
            value = _epoch(value)
        if type(value) is not int:
            what = "an integer"
            if name in DATE_FIELDS:
                what = "an integer (epoch seconds) or an ISO 8601 date or time"
            raise fail(f"{label} compares with {what}{' or null' if name in NULLABLE else ''}")
        return value
    if kind == FLAG:
        if type(value) is not bool:
            raise fail(f"{label} is true or false")
        return value
    if value is None and op not in ("=", "!="):
        raise fail(f"{label} {op} null: null compares only with = and !=")
    if op in _RANGES and type(value) is bool:
        raise fail(f"{label} {op}: ranges compare numbers or text")
    if op == "~" and type(value) is not str:
        raise fail(f"{label} ~: contains compares text (quote the value)")
    return value


# --- evaluation by TinyDB's query engine (the embedded store) ---
# (On a TinyDB path they build a query; on two values, ``_ordered``'s, they compare.)
_NATIVE: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_NUMBERS = (int, float)


def _same(value: Any, wanted: Any) -> bool:
    """JSON equality: numbers by value (1 = 1.0; a boolean is no number), text and flags exactly."""
    if type(wanted) in _NUMBERS:
        return type(value) in _NUMBERS and value == wanted
    return type(value) is type(wanted) and value == wanted


def _equal(value: Any, wanted: Any) -> bool:
    return _same(value, wanted) or (type(value) is list and any(_same(v, wanted) for v in value))


def _contains(value: Any, wanted: str) -> bool:
    return type(value) is str and wanted in value


def _ordered(compare: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def test(value: Any, wanted: Any) -> bool:
        kinds = _NUMBERS if type(wanted) in _NUMBERS else (str,)
        return type(value) in kinds and compare(value, wanted)
    return test


_ORDERED = {op: _ordered(_NATIVE[op]) for op in _RANGES}


def tinydb_query(where: SsaFilter) -> QueryInstance | None:
    """The filter as a TinyDB query on stored SSA documents (None: no terms, everything matches)."""
    query: QueryInstance | None = None
    for term in where.terms:
        test = _tinydb_term(term)
        query = test if query is None else query & test
    return query


def _tinydb_term(term: Term) -> QueryInstance:
    if term.op == "!=":
        return ~_tinydb_term(Term(term.field, term.custom, term.kind, "=", term.value))
    path: Query = Query()["custom"][term.field] if term.custom else Query()[term.field]
    value = term.value
    test: QueryInstance
    if term.kind == LIST:
        test = path.any([value])
    elif term.kind != CUSTOM and term.field not in NULLABLE:
        # The field always holds a value of its kind: TinyDB's own operators are exact.
        test = path.search(re.escape(str(value))) if term.op == "~" else _NATIVE[term.op](path, value)
    elif value is None:
        test = ~path.exists() | (path == None)  # noqa: E711  (a TinyDB query, not a comparison)
    else:
        compare = _equal if term.op == "=" else _contains if term.op == "~" else _ORDERED[term.op]
        # TinyDB types test()'s function as taking the value only; it passes the extra arguments too.
        test = path.test(compare, value)  # type: ignore[arg-type]
    return test


# --- evaluation by SQL (PostgreSQL: the ssa table's columns, the rest in the JSONB doc) ---
_SQL_OPS = {"=": "=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def to_sql(where: SsaFilter, columns: Collection[str]) -> tuple[str, list[Any]]:
    """The filter as a WHERE condition and its parameters; ``columns``: the fields that are
    columns of their own (the others are in ``doc``)."""
    parts: list[str] = []
    params: list[Any] = []
    for term in where.terms:
        parts.append(_sql_term(term, columns, params))
    return " AND ".join(parts) or "TRUE", params


def _sql_term(term: Term, columns: Collection[str], params: list[Any]) -> str:
    if term.op == "!=":
        return f"NOT {_sql_term(Term(term.field, term.custom, term.kind, '=', term.value), columns, params)}"
    value, op = term.value, term.op
    if term.kind != CUSTOM and term.field in columns:  # (field names are SsaRecord's, never the request's)
        if term.op == "~":
            params.append(value)
            return f"COALESCE(strpos({term.field}, %s) > 0, false)"
        params.append(value)
        # Ranges of text by code point, as Python compares; equality keeps the column's index.
        collate = ' COLLATE "C"' if term.kind == TEXT and op in _RANGES else ""
        return f"COALESCE({term.field}{collate} {_SQL_OPS[op]} %s, false)"
    if term.custom:
        json_value = "(doc->'custom'->%s)"
        key: list[Any] = [term.field]
    else:
        json_value, key = f"(doc->'{term.field}')", []

    def at() -> str:  # the value's JSONB expression, its key parameter (if any) appended
        params.extend(key)
        return json_value

    if value is None:
        return f"(COALESCE({at()}, 'null'::jsonb) = 'null'::jsonb)"
    if op == "=":
        if term.kind == LIST:
            sql = f"{at()} @> %s::jsonb"
            params.append(jsonvalues.dumps([value]).decode())
            return f"COALESCE({sql}, false)"
        first = f"{at()} = %s::jsonb"
        params.append(jsonvalues.dumps(value).decode())
        second = f"{at()} @> %s::jsonb"  # a list holding the value
        params.append(jsonvalues.dumps([value]).decode())
        return f"COALESCE({first} OR {second}, false)"
    if op == "~":
        guard = f"jsonb_typeof({at()}) = 'string'"
        test = f"strpos({at()} #>> '{{}}', %s) > 0"
        params.append(value)
        return f"(CASE WHEN {guard} THEN {test} ELSE false END)"
    if type(value) is str:
        guard = f"jsonb_typeof({at()}) = 'string'"
        test = f"({at()} #>> '{{}}') COLLATE \"C\" {_SQL_OPS[op]} %s"
        params.append(value)
    else:
        guard = f"jsonb_typeof({at()}) = 'number'"
        test = f"({at()})::numeric {_SQL_OPS[op]} %s::numeric"
        params.append(Decimal(repr(value)) if type(value) is float else value)
    return f"(CASE WHEN {guard} THEN {test} ELSE false END)"
