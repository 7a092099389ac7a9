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
