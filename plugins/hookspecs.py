"""The hooks trusted plugins implement: one function each, called after the core built, listed
or revoked SSAs.  ``HookRunner`` (``plugins/hooks.py``) calls them, after the scripts' chain of
the same hook has run (the plugins get what the scripts handed back).  Arguments are copies of
plain data; a plugin runs in a thread, never on the event loop.

- ``ssa_create`` and ``ssa_get`` are ``firstresult``: the implementations run in pluggy's order
  (``tryfirst`` first, then the last registered first) and the first that returns a value that
  is not None ends the hook.  ``False`` means "stop here": for ``ssa_get`` the caller then
  answers with the unmodified list (a script answering ``False`` ends the hook the same way,
  before any plugin).  Raising ``ApiError`` (e.g. ``ScriptDenied``) refuses the request with its
  status; any other exception is a 502 ``script_failed``, or with ``on_script_error = "skip"`` a
  log line (the request goes on with the changes made so far).
- ``ssa_revoke`` is a broadcast: every implementation runs, in the same order, on its own copy
  of the revoked list, whatever the others return or raise; the return value is ignored, each
  failure is a log line naming the plugin, and the revocation stands.  Hook wrappers
  (``wrapper=True``, ``hookwrapper=True``) are not run for it (an error line says so).
"""

from __future__ import annotations

from typing import Any

import pluggy

from ssa_server.jwt_draft import JwtDraft

__all__ = ["JwtDraft", "hookimpl", "hookspec", "ssa_create", "ssa_get", "ssa_revoke"]

hookspec = pluggy.HookspecMarker("ssa_server")
hookimpl = pluggy.HookimplMarker("ssa_server")


@hookspec(firstresult=True)
def ssa_create(jwt: JwtDraft, context: dict[str, Any]) -> bool | None:
    """Change the new SSA's JWT header and claims before it is signed and stored."""


@hookspec(firstresult=True)
def ssa_get(ssa_list: list[dict[str, Any]], context: dict[str, Any]) -> bool | None:
    """Change, in place, the list ``GET /ssa`` is about to return."""


@hookspec
def ssa_revoke(ssa_list: list[dict[str, Any]], context: dict[str, Any]) -> None:
    """Observe the SSAs that were just revoked (the revocation stands whatever happens here)."""
