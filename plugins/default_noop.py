"""The built-in plugin: implements every hook and changes nothing, so the hook path always runs."""

from __future__ import annotations

from typing import Any

from .hookspecs import JwtDraft, hookimpl


@hookimpl(trylast=True)
def ssa_create(jwt: JwtDraft, context: dict[str, Any]) -> None:
    return None


@hookimpl(trylast=True)
def ssa_get(ssa_list: list[dict[str, Any]], context: dict[str, Any]) -> None:
    return None


@hookimpl(trylast=True)
def ssa_revoke(ssa_list: list[dict[str, Any]], context: dict[str, Any]) -> None:
    return None
