"""A script worker with a deliberate hole, for tests only: what a language-layer bypass would
give a script.  It is the real worker (``worker.main()``: the same renumbered pipes, limits and
frames) whose scripts also get the real ``open`` and ``__import__``, the ``socket`` module
(imported before the walls go up, as an attacker holding a module reference would have it) and
``forge_progress(n)``, which writes the progress counter shared with the server.

Nothing in the production code can select it: the tests start it by rewriting the worker's
command line (``python -I holey_worker.py ...`` instead of ``python -I -m ...worker``).
"""

from __future__ import annotations

import builtins
import socket  # noqa: F401  (imported before the wall: reachable through __import__ afterwards)

from ssa_server import shared_counter
from ssa_server.plugins.sandbox import policy, worker

_counters: list[shared_counter.SharedCounter] = []


class _RecordedCounter(shared_counter.SharedCounter):
    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        _counters.append(self)


def _forge_progress(value: int) -> None:
    _counters[0].set(value)


_plain_builtins = policy._builtins


def _holey_builtins() -> dict:
    b = _plain_builtins()
    b.update({"__import__": builtins.__import__, "open": builtins.open, "forge_progress": _forge_progress})
    return b


worker.SharedCounter = _RecordedCounter  # type: ignore[misc]
policy._builtins = _holey_builtins

if __name__ == "__main__":
    worker.main()
