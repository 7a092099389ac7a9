"""CPU seconds and RSS of a process tree from /proc (Linux): the server and its script workers."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Child processes (recursively) of ``pid``; [] where /proc has no ``children`` files."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            for kid in kids:
                if kid not in out:
                    out.append(kid)
                    todo.append(kid)
    return out


def _cpu(pid: int) -> float:
    """utime + stime + cutime + cstime (reaped children) of one process, in seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return sum(int(x) for x in fields[11:15]) / _TICK


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and every live descendant (reaped ones via cutime)."""
    return _cpu(pid) + sum(_cpu(kid) for kid in descendants(pid))


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss(pid: int) -> dict[str, float]:
    """MiB: ``peak`` = VmHWM of the process + VmHWM of each live descendant (script workers);
    ``current`` = the sum of VmRSS; ``children`` = how many descendants were counted."""
    kids = descendants(pid)
    peak = _status_kib(pid, "VmHWM") + sum(_status_kib(k, "VmHWM") for k in kids)
    current = _status_kib(pid, "VmRSS") + sum(_status_kib(k, "VmRSS") for k in kids)
    return {"peak": round(peak / 1024, 1), "current": round(current / 1024, 1), "children": len(kids)}
