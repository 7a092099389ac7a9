"""A script's own sandbox settings: the ``[sandbox]`` table of its ``NAME.toml``.

``keep_state`` (issue 10), and per script ``on_error``, ``timeout``, ``cpu`` and ``memory_mb``
(issue 13), each never above the server's cap (``SSA_SCRIPT_TIMEOUT``, ``SSA_SCRIPT_CPU``,
``SSA_SCRIPT_MEMORY_MB``): a higher value refuses the script with the reason (a script that asks
for more than the server grants is a deploy mistake to see, not to hide by clamping).  The table
is not part of ``context.config``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import ScriptRefused
from .limits import SandboxLimits
from .state import KEEP_STATES

ON_ERRORS = ("fail", "skip")
MIN_TIMEOUT, MIN_CPU, MIN_MEMORY_MB = 0.01, 0.01, 1


@dataclass(frozen=True)
class ScriptOptions:
    """None: the server's setting applies."""

    keep_state: str = "none"
    on_error: str | None = None
    timeout: float | None = None
    cpu: float | None = None
    memory_mb: int | None = None

    def effective(self, limits: SandboxLimits, on_error: str) -> dict[str, Any]:
        """What applies to the script (GET /scripts): its own values, else the server's."""
        return {"keep_state": self.keep_state, "on_error": self.on_error or on_error,
                "timeout": self.timeout if self.timeout is not None else limits.timeout,
                "cpu": self.cpu if self.cpu is not None else limits.cpu,
                "memory_mb": self.memory_mb}


def split_options(name: str, config: dict[str, Any],
                  limits: SandboxLimits) -> tuple[ScriptOptions, dict[str, Any]]:
    """The script's options and its config without the ``[sandbox]`` table (a plain JSON copy).
    ScriptRefused naming the key when one is wrong or above the server's cap."""
    config = json.loads(json.dumps(config))
    table = config.pop("sandbox", {})
    where = f"{name}.toml: [sandbox]"
    if not isinstance(table, dict):
        raise ScriptRefused(f"{where} must be a table")
    unknown = sorted(set(table) - {"keep_state", "on_error", "timeout", "cpu", "memory_mb"})
    if unknown:
        raise ScriptRefused(f"{where} may only set keep_state, on_error, timeout, cpu and memory_mb "
                            f"(not {', '.join(unknown)})")
    keep_state = table.get("keep_state", "none")
    if keep_state not in KEEP_STATES:
        raise ScriptRefused(f"{where} keep_state must be one of {', '.join(KEEP_STATES)}")
    on_error = table.get("on_error")
    if on_error is not None and on_error not in ON_ERRORS:
        raise ScriptRefused(f"{where} on_error must be one of {', '.join(ON_ERRORS)}")
    timeout = _number(where, table, "timeout", MIN_TIMEOUT, limits.timeout, "SSA_SCRIPT_TIMEOUT")
    cpu = _number(where, table, "cpu", MIN_CPU, limits.cpu, "SSA_SCRIPT_CPU")
    memory = _number(where, table, "memory_mb", MIN_MEMORY_MB, limits.memory_mb, "SSA_SCRIPT_MEMORY_MB",
                     integer=True)
    memory_mb = int(memory) if memory is not None else None
    return ScriptOptions(keep_state, on_error, timeout, cpu, memory_mb), config


def _number(where: str, table: dict[str, Any], key: str, least: float, cap: float, setting: str, *,
            integer: bool = False) -> float | None:
    if key not in table:
        return None
    value = table[key]
    kinds = (int,) if integer else (int, float)
    if type(value) not in kinds or math.isnan(value):  # bool is not a number here; NaN is refused
        raise ScriptRefused(f"{where} {key} must be {'an integer' if integer else 'a number'}")
    if value < least:
        raise ScriptRefused(f"{where} {key} = {value} is below {least:g}")
    if value > cap:
        raise ScriptRefused(f"{where} {key} = {value} is above the server's {setting} ({cap:g}): "
                            "a script may only lower it")
    return float(value) if not integer else value
