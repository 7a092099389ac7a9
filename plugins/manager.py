"""One plugin manager per server: the hook specs and the trusted entry-point plugins (group ``ssa_server``).

The scripts are not plugins: ``HookRunner`` runs their chain before it calls these.
"""

from __future__ import annotations

import importlib.metadata
import logging

import pluggy

from . import hookspecs

log = logging.getLogger("ssa_server.plugins")

ENTRY_POINT_GROUP = "ssa_server"


def build_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A manager with the hook specs and every installed trusted plugin.

    Each entry point is loaded in its own try, so one broken package is logged and skipped
    instead of stopping the server.
    """
    pm = pluggy.PluginManager("ssa_server")
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                pm.register(ep.load(), name=f"entrypoint:{ep.name}")
            except Exception as e:  # a third-party package: log it, keep serving
                log.error("plugin %s could not be loaded: %s: %s", ep.name, type(e).__name__, e)
    pm.check_pending()
    return pm
