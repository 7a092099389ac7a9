"""``JwtDraft``: the unsigned SSA JWT a create hook changes, scripts and trusted plugins alike.

No pluggy here: the sandbox worker builds one for each create script (``hookspecs`` imports it
from this module for the trusted plugins).
"""

from __future__ import annotations

from typing import Any


class JwtDraft:
    """The unsigned SSA JWT: plain ``header`` and ``claims`` dicts a create hook may change.

    Janssen-style accessors (``getHeader().setClaim(k, v)``, ``getClaims().getClaim(k)``) are
    provided so Janssen scripts port with little change.
    """

    def __init__(self, header: dict[str, Any], claims: dict[str, Any]) -> None:
        self.header = header
        self.claims = claims

    def __repr__(self) -> str:  # plain data only: no class path or memory address for scripts
        return f"JwtDraft(header={self.header!r}, claims={self.claims!r})"

    def getHeader(self) -> _ClaimsView:  # noqa: N802 - Janssen's name
        return _ClaimsView(self.header)

    def getClaims(self) -> _ClaimsView:  # noqa: N802 - Janssen's name
        return _ClaimsView(self.claims)


class _ClaimsView:
    def __init__(self, target: dict[str, Any]) -> None:
        self._target = target

    def __repr__(self) -> str:
        return f"Claims({self._target!r})"

    def setClaim(self, name: str, value: Any) -> None:  # noqa: N802
        self._target[name] = value

    def getClaim(self, name: str) -> Any:  # noqa: N802
        return self._target.get(name)

    def getClaimAsString(self, name: str) -> str | None:  # noqa: N802
        """Janssen's: a string claim as is, a list's first string, anything else None."""
        value = self._target.get(name)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
        return None

    def getClaimAsLong(self, name: str) -> int | None:  # noqa: N802
        value = self._target.get(name)
        return value if type(value) is int else None

    getClaimAsInteger = getClaimAsLong

    def getClaimAsStringList(self, name: str) -> list[str]:  # noqa: N802
        value = self._target.get(name)
        if isinstance(value, str):
            return [value]
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    def hasClaim(self, name: str) -> bool:  # noqa: N802
        return name in self._target

    def removeClaim(self, name: str) -> None:  # noqa: N802
        self._target.pop(name, None)

    def toJsonObject(self) -> dict[str, Any]:  # noqa: N802 - a copy (a plain dict)
        return dict(self._target)
