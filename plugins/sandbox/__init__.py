"""The sandbox for user scripts: RestrictedPython (language layer) inside resource-limited
worker processes (process layer).  See ``docs/sandbox.md``."""

from .errors import ScriptError, ScriptRefused
from .limits import SandboxLimits
from .pool import SandboxPool

__all__ = ["SandboxLimits", "SandboxPool", "ScriptError", "ScriptRefused"]
