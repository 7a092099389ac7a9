"""The hooks: one function each, called after the core built, listed or revoked SSAs.

Every hook is ``firstresult``: implementations run in order and the chain stops at the first
one that returns a value that is not None.  Returning ``False`` means "stop here": for
``ssa_get`` the caller then answers with the unmodified list.  Raising ``ApiError`` (for
example ``ScriptDenied``) refuses the request.  Arguments are copies of plain data.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("ssa_server")
hookimpl = pluggy.HookimplMarker("ssa_server")


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


@hookspec(firstresult=True)
def ssa_create(jwt: JwtDraft, context: dict[str, Any]) -> bool | None:
    """Change the new SSA's JWT header and claims before it is signed and stored."""


@hookspec(firstresult=True)
def ssa_get(ssa_list: list[dict[str, Any]], context: dict[str, Any]) -> bool | None:
    """Change, in place, the list ``GET /ssa`` is about to return."""


@hookspec(firstresult=True)
def ssa_revoke(ssa_list: list[dict[str, Any]], context: dict[str, Any]) -> bool | None:
    """Observe the SSAs that were just revoked (the revocation stands whatever happens here)."""
