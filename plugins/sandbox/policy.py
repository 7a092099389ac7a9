"""The language layer: restricted compilation, curated builtins and helpers, calling a hook.

Runs inside a worker process.  Scripts get fresh globals and a fresh copy of the builtins each,
``safer_getattr``, ``full_write_guard``, guarded unpacking and a capped print; no ``__import__``
(``import`` fails), no real ``getattr``/``type``/``vars``/``dir``/``globals``/``compile``/``open``.
Helpers are plain functions, never modules: ``json``, ``re``, ``datetime``, ``uuid``, ``base64``
and ``operator`` all lead to ``os`` through public attributes.
"""

from __future__ import annotations

import base64
import builtins
import datetime as _dt
import hashlib
import json
import math
import operator
import time
import types
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from RestrictedPython import compile_restricted_exec, safe_builtins
from RestrictedPython.Guards import (full_write_guard, guarded_iter_unpack_sequence, guarded_unpack_sequence,
                                     safer_getattr, safer_getattr_raise)

from ssa_server.frames import dumps, loads, valid_unicode
from ssa_server.jwt_draft import JwtDraft
from ssa_server.script_rules import (HOOKS, MAX_LOG_LINE, MAX_LOG_LINES, before_create, create_change,
                                             passes_answer)

from . import janssen
from .errors import ScriptError, ScriptRefused
from .janssen_objects import (METHODS_KEY, SELF_KEY, AppConfiguration, Client, ConfigurationAttributes,
                              CustomScript, HttpRequest, Inert, JanssenSelf, JSONArray, SsaList, missing)
from .refusals import compile_errors, top_level_error

_INPLACE = {"+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
            "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow, "|=": operator.ior,
            "&=": operator.iand, "^=": operator.ixor, "<<=": operator.ilshift, ">>=": operator.irshift}
_EXTRA_BUILTINS = ("list", "dict", "tuple", "set", "frozenset", "sorted", "reversed", "min", "max", "sum",
                   "enumerate", "zip", "map", "filter", "any", "all", "iter", "next")
_FORBIDDEN = ("setattr", "delattr", "__build_class__")  # no classes: nothing to put a __del__ or __eq__ on


# --- helpers offered to scripts (plain functions) ---
def json_dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, sort_keys=True)


def json_loads(text: str) -> Any:
    if not isinstance(text, str) or len(text) > 1 << 20:
        raise ValueError("json_loads takes a string of at most 1 MiB")
    return json.loads(text)


def now() -> int:
    return int(time.time())


def utc_iso(ts: int | float) -> str:
    return _dt.datetime.fromtimestamp(float(ts), _dt.timezone.utc).isoformat()


def new_uuid() -> str:
    return str(uuid.uuid4())


def b64url_encode(text: str) -> str:
    return base64.urlsafe_b64encode(str(text).encode()).rstrip(b"=").decode()


def b64url_decode(text: str) -> str:
    return base64.urlsafe_b64decode(str(text) + "=" * (-len(str(text)) % 4)).decode()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(str(text).encode()).hexdigest()


HELPERS = {f.__name__: f for f in (json_dumps, json_loads, now, utc_iso, new_uuid, b64url_encode,
                                   b64url_decode, sha256_hex)}


class CappedPrint:
    """``print`` for scripts: collected (never to a file), capped."""

    def __init__(self, _getattr_: Any = None, limit: int = 64 * 1024) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit

    def write(self, text: str) -> None:
        self.size += len(text)
        if self.size > self.limit:
            raise RuntimeError("print output limit exceeded")
        self.parts.append(text)

    def __call__(self) -> str:
        return "".join(self.parts)

    def _call_print(self, *objects: Any, **kw: Any) -> None:
        if kw.get("file") is not None:
            raise RuntimeError("print(file=...) is not allowed")
        print(*objects, sep=str(kw.get("sep", " ")), end=str(kw.get("end", "\n")), file=self)


class HttpError(Exception):
    """A ``context.http`` call the server refused (``http refused: ...``) or could not complete
    (``http failed: ...``); uncaught, it fails the step like any exception."""


AskHost = Callable[[dict[str, Any]], dict[str, Any]]


class ScriptHttp:
    """``context.http``: each call is asked of the server over the worker's pipes (the worker has
    no network); the server performs it only if the URL is in this script's allow-list."""

    def __init__(self, ask: AskHost | None) -> None:
        self._ask = ask  # (an underscore name: safer_getattr keeps scripts away from it)

    def __repr__(self) -> str:
        return "Http()"

    def get(self, url: Any, headers: Any = None) -> dict[str, Any]:
        return self._call({"method": "GET", "url": url, "headers": headers})

    def post(self, url: Any, json: Any = None, headers: Any = None) -> dict[str, Any]:
        return self._call({"method": "POST", "url": url, "headers": headers, "json": json})

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._ask is None:
            raise HttpError("http refused: no HTTP here")
        try:
            check_json(request, max_bytes=MAX_HTTP_REQUEST, max_depth=32)
        except ScriptError as e:
            raise HttpError(f"http refused: the request is not plain JSON within {MAX_HTTP_REQUEST} bytes "
                            f"({e})") from None
        answer = self._ask(request)
        if "http" not in answer:
            raise HttpError(str(answer.get("http_error", "http failed"))[:MAX_LOG_LINE])
        return answer["http"]


MAX_HTTP_REQUEST = 80 * 1024  # URL, headers and a JSON body (the server caps the body at 64 KiB)


_NO_SECRETS: Mapping[str, str] = types.MappingProxyType({})


class ScriptContext:
    """The read-only ``context`` a hook receives (full_write_guard refuses attribute writes)."""

    def __init__(self, facts: dict[str, Any], config: dict[str, Any], ask: AskHost | None = None,
                 secrets: Mapping[str, str] = _NO_SECRETS, script: CustomScript | None = None) -> None:
        self._script = script
        self.client_id = facts.get("client_id", "")
        self.scopes = list(facts.get("scopes", []))
        self.hook = facts.get("hook", "")
        self.settings = facts.get("settings", {})  # facts come fresh from the request frame
        self.request = facts.get("request", {})
        # The script's config outlives the call: a copy each time (plain JSON: the pool made it so).
        self.config = loads(dumps(config)) if config else {}
        # This script's secrets only, read-only (a mapping proxy made at load: nothing to copy).
        self.secrets = secrets
        self._logs: list[str] = []
        self._dropped = 0  # log lines past the per-call cap
        self._denied: dict[str, str] | None = None
        self.http = ScriptHttp(ask)

    def __repr__(self) -> str:
        return f"Context(client_id={self.client_id!r}, hook={self.hook!r})"

    def __getattr__(self, name: str) -> Any:  # only for what is not here: named in the error
        return missing("context", name)

    # Janssen's ModifySsaResponseContext getters (docs/scripts.md, "Janssen objects")
    def getClient(self) -> Client:  # noqa: N802
        return Client(self.client_id, self.scopes)

    def getHttpRequest(self) -> HttpRequest:  # noqa: N802
        return HttpRequest(self.request if isinstance(self.request, dict) else {})

    def getAppConfiguration(self) -> AppConfiguration:  # noqa: N802
        return AppConfiguration(self.settings if isinstance(self.settings, dict) else {})

    def getScript(self) -> CustomScript:  # noqa: N802
        return self._script or CustomScript("", "")

    def getGrant(self) -> None:  # noqa: N802 - Janssen: null for SSA calls
        return None

    def log(self, message: Any) -> None:
        if len(self._logs) < MAX_LOG_LINES:
            self._logs.append(_printable(str(message))[:MAX_LOG_LINE])
        else:
            self._dropped += 1

    def deny(self, error: Any = "access_denied", description: Any = "") -> None:
        self._denied = {"error": _printable(str(error))[:64] or "access_denied",
                        "description": _printable(str(description))[:MAX_LOG_LINE]}


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def _builtins() -> dict[str, Any]:
    b = dict(safe_builtins)  # a fresh copy per script: one script cannot poison another's
    for name in _FORBIDDEN:
        b.pop(name, None)
    b.update({n: getattr(builtins, n) for n in _EXTRA_BUILTINS})
    b["getattr"] = safer_getattr_raise
    b["RecursionError"] = RecursionError
    b["HttpError"] = HttpError
    b.update(HELPERS)
    return b


def load(name: str, source: str, *, max_source: int, output_limit: int, config: dict[str, Any] | None = None,
         revision: str = "") -> dict[str, Any]:
    """Compile and run the script's top level; its globals.  ScriptRefused on any failure.  A
    Janssen-format file is adapted first (``janssen.adapt``) and its instance set up."""
    if len(source.encode()) > max_source:
        raise ScriptRefused(f"{name}: larger than {max_source} bytes")
    filename = f"<script {name}>"
    adapted = janssen.adapt(name, source)
    if adapted is not None:
        source = adapted.source
    try:
        result = compile_restricted_exec(source, filename=filename)
    except BaseException as e:  # RecursionError, MemoryError in the parser
        raise ScriptRefused(f"{name}: cannot be compiled ({type(e).__name__})") from None
    if result.errors or result.code is None:  # (no code comes without errors)
        raise ScriptRefused(f"{name}: {compile_errors(result.errors)}")
    env: dict[str, Any] = {
        "__builtins__": _builtins(), "__name__": f"script_{name}",
        "_getattr_": safer_getattr, "_getitem_": operator.getitem, "_getiter_": iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence, "_unpack_sequence_": guarded_unpack_sequence,
        "_write_": full_write_guard, "_inplacevar_": lambda op, x, y: _INPLACE[op](x, y),
        "_apply_": lambda f, *a, **k: f(*a, **k),
        "_print_": lambda _getattr_=None: CappedPrint(limit=output_limit),
    }
    if adapted is not None:
        env["__builtins__"].update({n: Inert(path) for n, path in adapted.inert.items()})
    try:
        exec(result.code, env)
        if adapted is not None:
            _instantiate(name, env, adapted.methods, config or {}, revision)
    except ScriptRefused:
        raise
    except BaseException as e:
        raise ScriptRefused(f"{name}: {top_level_error(e, filename)}") from None
    return env


def _instantiate(name: str, env: dict[str, Any], methods: frozenset[str], config: dict[str, Any],
                 revision: str) -> None:
    """A Janssen script's one instance in this worker: ``__init__(self, currentTimeMillis)``,
    then ``init(self, customScript, configurationAttributes)`` (or Janssen's older
    ``init(self, configurationAttributes)``); ``init`` returning False refuses the script.  Its
    attributes are a plain dict in the module state (``SELF_KEY``): what ``init`` left is what
    every call starts from (``state.py``)."""
    constructor = env.pop("__init__", None)
    methods = methods - {"__init__"}
    attrs: dict[str, Any] = {}
    env[SELF_KEY], env[METHODS_KEY] = attrs, methods
    me = JanssenSelf(env, attrs, methods)
    if isinstance(constructor, types.FunctionType):
        constructor(me, int(time.time() * 1000))
    init = env.get("init") if "init" in methods else None
    if isinstance(init, types.FunctionType):
        attributes = ConfigurationAttributes(config)
        if init.__code__.co_argcount >= 3:
            done = init(me, CustomScript(name, revision), attributes)
        else:
            done = init(me, attributes)
        if done is False:
            raise ScriptRefused(f"{name}: init() returned False (Janssen: the script failed to initialize)")
    version = env.get("getApiVersion") if "getApiVersion" in methods else None
    if isinstance(version, types.FunctionType):
        version(me)


def destroy(world: dict[str, Any], config: dict[str, Any]) -> None:
    """A Janssen script's ``destroy(self, configurationAttributes)``, as its revision leaves the
    worker (unloaded or replaced); what it raises or returns is ignored."""
    methods = world.get(METHODS_KEY)
    fn = world.get("destroy")
    if methods is None or "destroy" not in methods or not isinstance(fn, types.FunctionType):
        return
    try:
        fn(JanssenSelf(world, world[SELF_KEY], methods), ConfigurationAttributes(config))
    except BaseException:  # a script's own failure while leaving: nothing to report it to
        pass


def hooks_of(env: dict[str, Any]) -> list[str]:
    return [h for h in HOOKS if isinstance(env.get(h), types.FunctionType)]


def call(env: dict[str, Any], hook: str, payload: dict[str, Any], facts: dict[str, Any],
         config: dict[str, Any], *, output_limit: int, ask: AskHost | None = None,
         secrets: Mapping[str, str] = _NO_SECRETS, script: CustomScript | None = None) -> dict[str, Any]:
    """Run one hook on ``payload``, which the script may change (the worker parsed it from the
    request frame: nothing else holds it); the JSON-ready result, validated by the caller."""
    fn = env.get(hook)
    if not isinstance(fn, types.FunctionType):
        raise ScriptError("invalid_result", f"the script defines no {hook}()")
    context = ScriptContext(facts, config, ask, secrets, script)
    printed = CappedPrint(limit=output_limit)
    env["_print_"] = lambda _getattr_=None: printed  # print() in this call lands here
    methods = env.get(METHODS_KEY)  # a Janssen script: its methods take self, and Janssen's objects
    me = JanssenSelf(env, env[SELF_KEY], methods) if methods is not None else None
    if hook == "create":
        header, claims = payload["header"], payload["claims"]
        before = before_create(header, claims)
        jwt = JwtDraft(header, claims)
        returned = fn(jwt, context) if me is None else fn(me, jwt, context)
        broken = create_change(*before, jwt.header, jwt.claims)
        if broken is not None:
            raise ScriptError("invalid_result", broken)
        out: dict[str, Any] = {"header": jwt.header, "claims": jwt.claims}
    else:
        ssa_list = payload["ssa_list"]
        if me is None:
            returned = fn(ssa_list, context)
        else:
            returned = fn(me, JSONArray(ssa_list) if hook == "get" else SsaList(ssa_list), context)
        # a revoke answer carries no list: the next script gets the list as revoked
        out = {"ssa_list": ssa_list} if passes_answer(hook) else {}
    if returned is not None and not isinstance(returned, bool):
        raise ScriptError("invalid_result", f"{hook}() must return True, False or None")
    logs, dropped = _call_logs(context, printed())
    out.update(result=returned is not False, logs=logs)
    if dropped:
        out["logs_dropped"] = dropped
    if context._denied is not None:
        out["denied"] = context._denied
    return out


def _call_logs(context: ScriptContext, printed: str) -> tuple[list[str], int]:
    """The call's log lines (``context.log`` first, then ``print``: MAX_LOG_LINES in all) and
    how many were left out."""
    lines = printed.splitlines()
    room = MAX_LOG_LINES - len(context._logs)
    kept = context._logs + [_printable(line)[:MAX_LOG_LINE] for line in lines[:room]]
    return kept, context._dropped + max(0, len(lines) - room)


# Subclasses of str/int/dict/list, datetimes and dataclasses are refused, not converted.
_PLAIN_ONLY = (orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATETIME
               | orjson.OPT_PASSTHROUGH_DATACLASS)


def check_json(value: Any, *, max_bytes: int, max_depth: int) -> bytes:
    """Serialise a result: plain JSON only (strings valid Unicode), within the size and depth caps."""
    try:
        text = orjson.dumps(value, option=_PLAIN_ONLY)
    except TypeError:
        # not plain JSON, a lone surrogate, nested past orjson's limit, or an integer beyond 64 bits
        _check_depth(value, max_depth)  # names what is wrong, or passes for the big integers
        text = dumps(value)
    else:
        # orjson writes NaN as null and does not count depth: walk the value only when the
        # text could hide either (results normally hold no null and a few brackets).
        if b"null" in text or text.count(b"[") + text.count(b"{") > max_depth:
            _check_depth(value, max_depth)
    if len(text) > max_bytes:
        raise ScriptError("limit", f"the result is larger than {max_bytes} bytes")
    return text


def _check_depth(value: Any, limit: int) -> None:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ScriptError("limit", f"the result is nested deeper than {limit} levels")
        if type(item) is dict:
            for key in item:
                if type(key) is not str:
                    raise ScriptError("invalid_result", "result keys must be strings")
                _check_unicode(key)
            stack.extend((v, depth + 1) for v in item.values())
        elif type(item) is str:
            _check_unicode(item)
        elif type(item) is list:
            stack.extend((v, depth + 1) for v in item)
        elif type(item) is float and not math.isfinite(item):
            raise ScriptError("invalid_result", "the result holds NaN or infinity, not plain JSON")
        elif item is not None and type(item) not in (int, float, bool):
            raise ScriptError("invalid_result", f"the result holds a {type(item).__name__}, not plain JSON")


def _check_unicode(text: str) -> None:
    if not valid_unicode(text):
        raise ScriptError("invalid_result",
                          "the result holds a lone surrogate (a string that is not valid Unicode)")
