"""Per-call and per-worker limits (settings ``script_*``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 1.0  # wall-clock seconds per call; the worker is killed past it
    cpu: float = 0.5  # CPU seconds per call (RLIMIT_CPU, whole seconds: rounded up)
    memory_mb: int = 256  # RLIMIT_AS of a worker
    output_kb: int = 64  # print output per call; a result may be its request's size plus this
    max_source_kb: int = 256  # a larger script is refused before compiling
    max_depth: int = 32  # nesting depth of a result
    lifetime_cpu: int = 600  # a worker's total CPU seconds (hard limit); it is recycled before
    recycle_after: int = 10_000  # calls before a worker is replaced (kept per-client states, leaks)
