"""The Janssen-facing objects a Janssen-format script gets, in the worker: plain-data wrappers.

Each holds only the call's own plain JSON data (or immutable strings) under ``_``-names, which
the script's guards refuse (``safer_getattr``; ``full_write_guard`` lets a wrapper be written only
through its own ``__guarded_setitem__``/``__guarded_setattr__``).  None holds a host object, a
module or a class a script could climb from; their ``repr`` is plain data.  A method a Janssen
object has but these do not fails naming it (``Unsupported``).
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from typing import Any

_DOCS = "see 'Janssen objects' in docs/scripts.md"


def missing(label: str, name: str) -> UnsupportedMethod:
    """What ``label.name`` is when ours lacks it: for a Java-style method name (``getX``,
    ``isX``, camelCase) a callable that fails naming it (the sandbox's getattr answers None for a
    missing attribute, which would fail as "'NoneType' object is not callable"); otherwise
    AttributeError (None for the script, as for every missing attribute)."""
    if name[:1].islower() and (name != name.lower() or name.startswith(("get", "set", "is", "has"))):
        return UnsupportedMethod(f"{label}.{name}")
    raise AttributeError(name)


class UnsupportedMethod:
    """A Janssen method ssa-server does not offer: calling it fails, naming it."""

    __slots__ = ("_what",)
    _what: str

    def __init__(self, what: str) -> None:
        object.__setattr__(self, "_what", what)

    def __repr__(self) -> str:
        return f"<{self._what}(): not supported>"

    def __call__(self, *args: Any, **kw: Any) -> Any:
        raise NotImplementedError(f"{self._what}() is not supported in ssa-server scripts ({_DOCS})")


class Unsupported:
    """``__getattr__`` for every Janssen object: a missing method is named in the error."""

    __slots__ = ()
    _label = "object"

    def __getattr__(self, name: str) -> Any:
        return missing(self._label, name)


class Inert(Unsupported):
    """What a Java or Janssen import binds: a name, not a class; using it is a clear error."""

    __slots__ = ("_path",)

    def __init__(self, path: str) -> None:
        object.__setattr__(self, "_path", path)

    def __repr__(self) -> str:
        return f"<{self._path} (a Java name, inert in ssa-server)>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return Inert(f"{self._path}.{name}")

    def __call__(self, *args: Any, **kw: Any) -> Any:
        raise NotImplementedError(f"{self._path}() is not available in ssa-server scripts: Java classes are "
                                  f"inert names ({_DOCS})")


class JanssenSelf(Unsupported):
    """``self`` of a Janssen script's methods: its attributes live in a plain dict of the call's
    world (``SELF_KEY``), so they are copied for each call like any module state (or kept per
    client with ``keep_state``); its methods are the world's functions, bound to it."""

    __slots__ = ("_attrs", "_world", "_methods")
    _label = "self"

    def __init__(self, world: dict[str, Any], attrs: dict[str, Any], methods: frozenset[str]) -> None:
        object.__setattr__(self, "_world", world)
        object.__setattr__(self, "_attrs", attrs)
        object.__setattr__(self, "_methods", methods)

    def __repr__(self) -> str:
        return "<ModifySsaResponse instance>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        attrs = self._attrs
        if name in attrs:
            return attrs[name]
        if name in self._methods and not name.startswith("_"):
            fn = self._world.get(name)
            if isinstance(fn, types.FunctionType):
                return types.MethodType(fn, self)
        value = self._world.get(name, _ABSENT)  # a class attribute: a module global after the adaptation
        if value is not _ABSENT and not name.startswith("_") and not isinstance(value, types.FunctionType):
            return value
        raise AttributeError(f"self has no attribute {name!r}")

    def __guarded_setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise AttributeError(f"self.{name} cannot be set")
        self._attrs[name] = value

    def __guarded_delattr__(self, name: str) -> None:
        self._attrs.pop(name, None)


_ABSENT = object()
SELF_KEY = "__janssen_self__"  # the world's key of the instance's attributes (state.py copies it)
METHODS_KEY = "__janssen_methods__"


class SimpleCustomProperty(Unsupported):
    """One ``configurationAttributes`` entry: ``getValue1()`` its name, ``getValue2()`` its value
    as Janssen gives it, a string (a TOML string as is; other values as JSON text, ``true``,
    ``7``)."""

    __slots__ = ("_name", "_value")
    _label = "SimpleCustomProperty"

    def __init__(self, name: str, value: str) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_value", value)

    def __repr__(self) -> str:
        return f"SimpleCustomProperty({self._name!r}, {self._value!r})"

    def getValue1(self) -> str:  # noqa: N802 - Janssen's names
        return self._name

    def getValue2(self) -> str:  # noqa: N802
        return self._value

    def getDescription(self) -> str:  # noqa: N802
        return ""


class ConfigurationAttributes(Unsupported):
    """``configurationAttributes``: Janssen's ``Map<String, SimpleCustomProperty>`` over the
    script's ``NAME.toml`` (without its ``[sandbox]`` table).  Immutable: shared by every call."""

    __slots__ = ("_props",)
    _label = "configurationAttributes"

    def __init__(self, config: dict[str, Any]) -> None:
        props = {str(k): SimpleCustomProperty(str(k), _as_text(v))
                 for k, v in config.items()}
        object.__setattr__(self, "_props", props)

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k}={p.getValue2()}" for k, p in self._props.items()) + "}"

    def get(self, name: str) -> SimpleCustomProperty | None:
        return self._props.get(name)

    def containsKey(self, name: str) -> bool:  # noqa: N802
        return name in self._props

    def keySet(self) -> tuple[str, ...]:  # noqa: N802
        return tuple(self._props)

    def values(self) -> tuple[SimpleCustomProperty, ...]:
        return tuple(self._props.values())

    def size(self) -> int:
        return len(self._props)

    def isEmpty(self) -> bool:  # noqa: N802
        return not self._props

    def __contains__(self, name: object) -> bool:
        return name in self._props

    def __len__(self) -> int:
        return len(self._props)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class CustomScript(Unsupported):
    """``customScript`` of ``init`` and ``context.getScript()``: the script's name and revision."""

    __slots__ = ("_name", "_revision")
    _label = "customScript"

    def __init__(self, name: str, revision: str) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_revision", revision)

    def __repr__(self) -> str:
        return f"CustomScript({self._name!r})"

    def getName(self) -> str:  # noqa: N802
        return self._name

    def getRevision(self) -> str:  # noqa: N802
        return self._revision

    def getScriptType(self) -> str:  # noqa: N802
        return "modify_ssa_response"


# --- the context's Janssen getters (ScriptContext builds these from the call's facts) ---
class Client(Unsupported):
    __slots__ = ("_client_id", "_scopes")
    _label = "client"

    def __init__(self, client_id: str, scopes: list[str]) -> None:
        object.__setattr__(self, "_client_id", client_id)
        object.__setattr__(self, "_scopes", tuple(scopes))

    def __repr__(self) -> str:
        return f"Client({self._client_id!r})"

    def getClientId(self) -> str:  # noqa: N802
        return self._client_id

    def getScopes(self) -> list[str]:  # noqa: N802
        return list(self._scopes)


class HttpRequest(Unsupported):
    """``context.getHttpRequest()``: the filtered headers ``context.request["headers"]`` has."""

    __slots__ = ("_request",)
    _label = "httpRequest"

    def __init__(self, request: dict[str, Any]) -> None:
        object.__setattr__(self, "_request", request)

    def __repr__(self) -> str:
        return f"HttpRequest({self.getMethod()} {self.getRequestURI()})"

    def _headers(self) -> dict[str, Any]:
        headers = self._request.get("headers")
        return headers if isinstance(headers, dict) else {}

    def getHeader(self, name: str) -> str | None:  # noqa: N802
        value = self._headers().get(str(name).lower())
        return value if isinstance(value, str) else None

    def getHeaderNames(self) -> list[str]:  # noqa: N802
        return list(self._headers())

    def getMethod(self) -> str:  # noqa: N802
        return str(self._request.get("method", ""))

    def getRequestURI(self) -> str:  # noqa: N802
        return str(self._request.get("path", ""))


class SsaConfiguration(Unsupported):
    __slots__ = ("_settings",)
    _label = "ssaConfiguration"

    def __init__(self, settings: dict[str, Any]) -> None:
        object.__setattr__(self, "_settings", settings)

    def getSsaSigningAlg(self) -> str:  # noqa: N802
        return str(self._settings.get("signing_alg", ""))

    def getSsaExpirationInDays(self) -> int:  # noqa: N802
        return int(self._settings.get("expiration_in_days") or 0)

    def getSsaCustomAttributes(self) -> list[str]:  # noqa: N802
        return list(self._settings.get("custom_attributes") or [])


class AppConfiguration(Unsupported):
    __slots__ = ("_settings",)
    _label = "appConfiguration"

    def __init__(self, settings: dict[str, Any]) -> None:
        object.__setattr__(self, "_settings", settings)

    def __repr__(self) -> str:
        return f"AppConfiguration(issuer={self.getIssuer()!r})"

    def getIssuer(self) -> str:  # noqa: N802
        return str(self._settings.get("issuer", ""))

    def getSsaConfiguration(self) -> SsaConfiguration:  # noqa: N802
        return SsaConfiguration(self._settings)


# --- the hook arguments ---
def _wrap(value: Any) -> Any:
    if type(value) is dict:
        return JSONObject(value)
    if type(value) is list:
        return JSONArray(value)
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, (JSONObject, JSONArray)):
        return value._data
    return value


class JSONObject(Unsupported):
    """``org.json.JSONObject`` over a plain dict of the call's data (changes land in it)."""

    __slots__ = ("_data",)
    _label = "JSONObject"

    def __init__(self, data: dict[str, Any]) -> None:
        object.__setattr__(self, "_data", data)

    def __repr__(self) -> str:
        return json.dumps(self._data, sort_keys=True, default=str)

    def toString(self) -> str:  # noqa: N802
        return repr(self)

    def _value(self, key: str) -> Any:
        if key not in self._data:
            raise KeyError(f'JSONObject["{key}"] not found.')
        return self._data[key]

    def get(self, key: str) -> Any:
        return _wrap(self._value(key))

    def opt(self, key: str) -> Any:
        return _wrap(self._data.get(key))

    def getString(self, key: str) -> str:  # noqa: N802
        value = self._value(key)
        if not isinstance(value, str):
            raise ValueError(f'JSONObject["{key}"] is not a string.')
        return value

    def optString(self, key: str, default: str = "") -> str:  # noqa: N802
        value = self._data.get(key)
        return value if isinstance(value, str) else default

    def getInt(self, key: str) -> int:  # noqa: N802
        return int(self._value(key))

    getLong = getInt

    def getBoolean(self, key: str) -> bool:  # noqa: N802
        value = self._value(key)
        if not isinstance(value, bool):
            raise ValueError(f'JSONObject["{key}"] is not a Boolean.')
        return value

    def getJSONObject(self, key: str) -> JSONObject:  # noqa: N802
        value = self._value(key)
        if type(value) is not dict:
            raise ValueError(f'JSONObject["{key}"] is not a JSONObject.')
        return JSONObject(value)

    def getJSONArray(self, key: str) -> JSONArray:  # noqa: N802
        value = self._value(key)
        if type(value) is not list:
            raise ValueError(f'JSONObject["{key}"] is not a JSONArray.')
        return JSONArray(value)

    def has(self, key: str) -> bool:
        return key in self._data

    def put(self, key: str, value: Any) -> JSONObject:
        if not isinstance(key, str):
            raise TypeError("JSONObject keys are strings")
        self._data[key] = _unwrap(value)
        return self

    def remove(self, key: str) -> Any:
        return _wrap(self._data.pop(key, None))

    def keys(self) -> list[str]:
        return list(self._data)

    def length(self) -> int:
        return len(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __guarded_setitem__(self, key: str, value: Any) -> None:
        self.put(key, value)

    def __guarded_delitem__(self, key: str) -> None:
        del self._data[key]


class JSONArray(Unsupported):
    """The ``get`` argument: ``org.json.JSONArray`` (``length()``, ``getJSONObject(i)``, ``put``)
    over the plain list the call returns, and a list too (``len``, ``[i]``, iteration give its
    plain items)."""

    __slots__ = ("_data",)
    _label = "JSONArray"

    def __init__(self, data: list[Any]) -> None:
        object.__setattr__(self, "_data", data)

    def __repr__(self) -> str:
        return json.dumps(self._data, sort_keys=True, default=str)

    def toString(self) -> str:  # noqa: N802
        return repr(self)

    def length(self) -> int:
        return len(self._data)

    def get(self, index: int) -> Any:
        return _wrap(self._data[index])

    def opt(self, index: int) -> Any:
        return _wrap(self._data[index]) if 0 <= index < len(self._data) else None

    def getJSONObject(self, index: int) -> JSONObject:  # noqa: N802
        value = self._data[index]
        if type(value) is not dict:
            raise ValueError(f"JSONArray[{index}] is not a JSONObject.")
        return JSONObject(value)

    def getJSONArray(self, index: int) -> JSONArray:  # noqa: N802
        value = self._data[index]
        if type(value) is not list:
            raise ValueError(f"JSONArray[{index}] is not a JSONArray.")
        return JSONArray(value)

    def getString(self, index: int) -> str:  # noqa: N802
        value = self._data[index]
        if not isinstance(value, str):
            raise ValueError(f"JSONArray[{index}] is not a string.")
        return value

    def put(self, *args: Any) -> JSONArray:
        """``put(value)`` appends; ``put(index, value)`` sets (padding with nulls, as org.json)."""
        if len(args) == 1:
            self._data.append(_unwrap(args[0]))
        elif len(args) == 2 and type(args[0]) is int and 0 <= args[0] <= 100_000:
            index, value = args
            while len(self._data) <= index:
                self._data.append(None)
            self._data[index] = _unwrap(value)
        else:
            raise TypeError("JSONArray.put takes (value) or (index, value) with 0 <= index <= 100000")
        return self

    def remove(self, index: int) -> Any:
        return _wrap(self._data.pop(index))

    def isEmpty(self) -> bool:  # noqa: N802
        return not self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._data))

    def __getitem__(self, index: int) -> Any:
        return self._data[index]

    def __guarded_setitem__(self, index: int, value: Any) -> None:
        self._data[index] = _unwrap(value)

    def __guarded_delitem__(self, index: int) -> None:
        del self._data[index]


class SsaAttributes(Unsupported):
    """``Ssa.getAttributes()`` (Janssen's ``SsaAttributes``), read from the GET element's ``ssa``."""

    __slots__ = ("_ssa",)
    _label = "SsaAttributes"
    _STANDARD = frozenset({"jti", "org_id", "software_id", "software_roles", "grant_types", "iss", "iat",
                           "exp", "description", "one_time_use", "rotate_ssa", "lifetime"})

    def __init__(self, ssa: dict[str, Any]) -> None:
        object.__setattr__(self, "_ssa", ssa)

    def __repr__(self) -> str:
        return f"SsaAttributes(software_id={self._ssa.get('software_id')!r})"

    def getOneTimeUse(self) -> Any:  # noqa: N802
        return self._ssa.get("one_time_use")

    isOneTimeUse = getOneTimeUse

    def getRotateSsa(self) -> Any:  # noqa: N802
        return self._ssa.get("rotate_ssa")

    isRotateSsa = getRotateSsa

    def getLifetime(self) -> Any:  # noqa: N802
        return self._ssa.get("lifetime")

    def getSoftwareId(self) -> Any:  # noqa: N802
        return self._ssa.get("software_id")

    def getSoftwareRoles(self) -> list[Any]:  # noqa: N802
        return list(self._ssa.get("software_roles") or [])

    def getGrantTypes(self) -> list[Any]:  # noqa: N802
        return list(self._ssa.get("grant_types") or [])

    def getClientDn(self) -> None:  # noqa: N802
        return None

    def getCustomAttributes(self) -> dict[str, Any]:  # noqa: N802
        return {k: v for k, v in self._ssa.items() if k not in self._STANDARD}


class Ssa(Unsupported):
    """One revoked SSA as Janssen's ``Ssa`` entity (the seed's "SSA class structure"), read from
    a GET element; dates are epoch seconds."""

    __slots__ = ("_item",)
    _label = "Ssa"

    def __init__(self, item: dict[str, Any]) -> None:
        object.__setattr__(self, "_item", item)

    def _ssa(self) -> dict[str, Any]:
        inner = self._item.get("ssa")
        return inner if isinstance(inner, dict) else {}

    def __repr__(self) -> str:
        return f"Ssa(id={self.getId()!r}, orgId={self.getOrgId()!r}, state={self.getState()!r})"

    def getId(self) -> Any:  # noqa: N802
        return self._ssa().get("jti")

    def getOrgId(self) -> Any:  # noqa: N802
        return self._ssa().get("org_id")

    def getDescription(self) -> Any:  # noqa: N802
        return self._ssa().get("description")

    def getState(self) -> Any:  # noqa: N802
        return self._item.get("status")

    def getCreationDate(self) -> Any:  # noqa: N802
        return self._item.get("created_at")

    def getExpirationDate(self) -> Any:  # noqa: N802
        return self._item.get("expiration")

    def getCreatorId(self) -> Any:  # noqa: N802
        return self._item.get("iss")

    def getCreatorType(self) -> str:  # noqa: N802
        return "CLIENT"

    def getAttributes(self) -> SsaAttributes:  # noqa: N802
        return SsaAttributes(self._ssa())


class SsaList(Unsupported):
    """The ``revoke`` argument: ``java.util.List<Ssa>`` (``size()``, ``get(i)``, iteration)."""

    __slots__ = ("_data",)
    _label = "List"

    def __init__(self, data: list[Any]) -> None:
        object.__setattr__(self, "_data", data)

    def __repr__(self) -> str:
        return "[" + ", ".join(repr(s) for s in self) + "]"

    def size(self) -> int:
        return len(self._data)

    def get(self, index: int) -> Ssa:
        return Ssa(self._data[index])

    def isEmpty(self) -> bool:  # noqa: N802
        return not self._data

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> Ssa:
        return Ssa(self._data[index])

    def __iter__(self) -> Iterator[Ssa]:
        return iter([Ssa(item) for item in self._data if type(item) is dict])


# Immutable: the module state of every call shares them (state.py).
SHAREABLE = (Inert, ConfigurationAttributes, SimpleCustomProperty, CustomScript)
