"""What can go wrong with a script."""

from __future__ import annotations

ERROR_KINDS = ("exception", "timeout", "limit", "crashed", "invalid_result")


class ScriptRefused(Exception):
    """The script cannot be loaded (size, encoding, syntax, policy, or its top level failed)."""


class ScriptError(Exception):
    """A call failed; ``kind`` is one of ERROR_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ChainBroken(ScriptError):
    """A chain call lost its worker (timeout, crash, limit) while running script ``index``."""

    def __init__(self, kind: str, message: str, index: int) -> None:
        super().__init__(kind, message)
        self.index = index
