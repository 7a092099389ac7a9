"""``HookRunner``: how a hook runs. The scripts first, then the trusted plugins through pluggy.

The scripts' chain runs on the event loop (``ScriptHost.run``: sandbox round trips need no
thread); the trusted plugins run in a thread (they may block), and only when one implements the
hook.  ``ssa_create`` and ``ssa_get`` end at the first result (a script's ``False`` included);
``ssa_revoke`` is a broadcast: every implementation runs, each failure is logged, nothing refuses
the revocation.  See ``hookspecs`` for what a plugin may do, ``script_rules`` for the scripts.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio.to_thread
import pluggy

from ssa_server.errors import ApiError, ScriptFailed
from ssa_server.jsonvalues import clone
from ssa_server.jwt_draft import JwtDraft
from ssa_server.script_rules import HOOKS, failure_refuses

from .scripts import ScriptHost

log = logging.getLogger("ssa_server.hooks")


class HookRunner:
    """The one place the service calls hooks through.  ``plugins`` may gain implementations at
    any time (``register``): what implements a hook is looked up at each call."""

    def __init__(self, plugins: pluggy.PluginManager, scripts: ScriptHost | None = None, *,
                 on_error: str = "fail") -> None:
        self.plugins = plugins
        self.scripts = scripts
        self.on_error = on_error
        self._callers: dict[str, pluggy.HookCaller] = {h: getattr(plugins.hook, f"ssa_{h}") for h in HOOKS}

    def wanted(self, hook: str) -> bool:
        """Whether anything runs on ``hook`` (a script or a trusted plugin); when nothing does,
        the caller skips the copies it would hand over."""
        scripts = self.scripts is not None and self.scripts.serves(hook)
        return scripts or bool(self._callers[hook].get_hookimpls())

    async def create(self, draft: JwtDraft, context: dict[str, Any]) -> None:
        """Let the hooks change ``draft`` in place before it is signed (the caller checks the
        signing rules afterwards: ``script_rules.create_change``)."""
        await self._first_result("create", draft, context, jwt=draft)

    async def get(self, ssa_list: list[dict[str, Any]], context: dict[str, Any]) -> bool | None:
        """Let the hooks change ``ssa_list`` in place; False: answer with the unmodified list."""
        return await self._first_result("get", ssa_list, context, ssa_list=ssa_list)

    async def _first_result(self, hook: str, data: Any, context: dict[str, Any],
                            **arguments: Any) -> bool | None:
        """The scripts, then the plugins' firstresult call; a failure that is not an ApiError
        refuses (502) or is skipped, by ``on_script_error`` (``failure_refuses``)."""
        try:
            if self.scripts is not None and await self.scripts.run(hook, data, context) is False:
                return False
            caller = self._callers[hook]
            if not caller.get_hookimpls():
                return None
            result: bool | None = await anyio.to_thread.run_sync(lambda: caller(context=context, **arguments))
            return result
        except ApiError:
            raise
        except Exception as e:
            if failure_refuses(hook, self.on_error):
                raise ScriptFailed(f"ssa_{hook} hook failed: {type(e).__name__}") from None
            log.error("ssa_%s hook failed, skipped: %s: %s", hook, type(e).__name__, e)
            return None

    async def revoke(self, ssa_list: list[dict[str, Any]], context: dict[str, Any]) -> None:
        """Tell every implementation that ``ssa_list`` was revoked: the scripts' chain, then each
        trusted plugin on its own copy of the list.  Never raises (``Exception``): each failure
        is a log line and the revocation stands."""
        if self.scripts is not None:
            try:
                await self.scripts.run("revoke", ssa_list, context)  # sent as a copy, handed back unchanged
            except Exception as e:  # its adapters log the scripts' failures: not expected
                log.error("revoke scripts failed: %s: %s", type(e).__name__, e)
        impls = self._callers["revoke"].get_hookimpls()
        if impls:
            await anyio.to_thread.run_sync(_broadcast, impls, ssa_list, context)


def _broadcast(impls: list[pluggy.HookImpl], ssa_list: list[dict[str, Any]], context: dict[str, Any]) -> None:
    """Each ``ssa_revoke`` implementation in pluggy's call order (the last of the list first),
    with the arguments it names, on its own copies; a failure is logged and the next one runs."""
    for impl in reversed(impls):
        if impl.hookwrapper or impl.wrapper:
            log.error("plugin %s: ssa_revoke is a broadcast hook: its hook wrapper does not run",
                      impl.plugin_name)
            continue
        arguments = {"ssa_list": clone(ssa_list), "context": clone(context)}
        try:
            impl.function(*[arguments[name] for name in impl.argnames])
        except Exception as e:
            log.error("ssa_revoke hook of plugin %s failed: %s: %s", impl.plugin_name, type(e).__name__, e)
