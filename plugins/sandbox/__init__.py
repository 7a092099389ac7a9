"""The sandbox for user scripts: RestrictedPython (language layer) inside resource-limited
worker processes (process layer).  See ``docs/sandbox.md``.

``SandboxPool`` is imported on first use: the worker process imports this package too, and
must not load the pool (nor what the pool needs to start and watch processes)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ScriptError, ScriptRefused
from .limits import SandboxLimits

if TYPE_CHECKING:
    from .pool import SandboxPool

__all__ = ["SandboxLimits", "SandboxPool", "ScriptError", "ScriptRefused"]


def __getattr__(name: str) -> Any:
    if name == "SandboxPool":
        from .pool import SandboxPool

        return SandboxPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
