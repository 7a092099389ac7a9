"""What can go wrong with a script."""

from __future__ import annotations

# A worker's exit code when a step's finalizers kept making garbage (they would run in later steps).
EXIT_UNSETTLED = 70

# busy: no worker could take the call within the timeout (admission control); not the script's doing.
ERROR_KINDS = ("exception", "timeout", "limit", "crashed", "invalid_result", "busy")


class ScriptRefused(Exception):
    """The script cannot be loaded (size, encoding, syntax, policy, or its top level failed)."""


class ScriptError(Exception):
    """A call failed; ``kind`` is one of ERROR_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ChainBroken(ScriptError):
    """A chain call lost its worker (timeout, crash, limit).  ``index`` is the step the worker's
    progress counter named: a hint only (the worker can write the counter), never the blame;
    the chain's scripts run again one call each to find the one that fails alone."""

    def __init__(self, kind: str, message: str, index: int) -> None:
        super().__init__(kind, message)
        self.index = index
