"""A script worker: a fresh interpreter (``python -I -m ssa_server.plugins.sandbox.worker R W``)
with an empty environment and working directory, OS limits, and JSON frames on two pipes.

Requests: ``{"op": "load", "name", "source", "config"}``, ``{"op": "unload", "name"}``,
``{"op": "call", "name", "hook", "payload", "context"}``.  Answers: ``{"ok": ...}`` or
``{"error": {"kind", "message"}}``.  Anything worse (CPU limit, segfault) ends the process; the
server sees the pipe close and starts a new worker.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from typing import Any

from . import policy
from .errors import ScriptError, ScriptRefused
from .protocol import FrameError, read_frame, write_raw_frame

MAX_REQUEST = 64 << 20


def _set_limits(memory_mb: int, lifetime_cpu: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (lifetime_cpu, lifetime_cpu))


def _pin_files(fds: tuple[int, ...]) -> None:
    """No new file descriptor can be opened: open(), sockets and imports fail from here on."""
    highest = max(fds + (2,)) + 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest, highest))


def _cpu_budget(seconds: float, hard: int) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = min(hard, math.ceil(usage.ru_utime + usage.ru_stime + seconds))
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def main() -> None:
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    limits = json.loads(sys.argv[3])
    _set_limits(limits["memory_mb"], limits["lifetime_cpu"])
    sys.setrecursionlimit(400)
    scripts: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    output = limits["output_kb"] * 1024
    _pin_files((rfd, wfd))
    while True:
        try:
            request = read_frame(rfd, MAX_REQUEST)
        except FrameError:
            return
        _cpu_budget(limits["cpu"], limits["lifetime_cpu"])
        try:
            text = _ok(_handle(request, scripts, limits, output))
        except ScriptRefused as e:
            text = _error("refused", str(e))
        except ScriptError as e:
            text = _error(e.kind, str(e)[:1000])
        except MemoryError:
            text = _error("limit", "memory limit exceeded")
        except RecursionError:
            text = _error("limit", "recursion limit exceeded")
        except BaseException as e:  # the script's own exception, SystemExit included
            text = _error("exception", f"{type(e).__name__}: {_text(e)}")
        write_raw_frame(wfd, text)


def _ok(text: bytes) -> bytes:
    # A leading space marks stdlib JSON (see protocol.dumps): keep it at the front of the frame.
    return (b" " if text[:1] == b" " else b"") + b'{"ok":' + text + b"}"


def _error(kind: str, message: str) -> bytes:
    return json.dumps({"error": {"kind": kind, "message": message}}).encode()


def _text(error: BaseException) -> str:
    try:
        return policy._printable(str(error))[:500]
    except BaseException:  # a hostile __str__
        return "?"


def _handle(request: dict[str, Any], scripts: dict[str, Any], limits: dict[str, Any], output: int) -> bytes:
    """The answer's JSON text (results are checked and serialised once, by check_json)."""
    op, name = request.get("op"), request.get("name", "")
    if op == "load":
        env = policy.load(name, request["source"], max_source=limits["max_source_kb"] * 1024, output_limit=output)
        scripts[name] = (env, request.get("config") or {})
        return json.dumps({"hooks": policy.hooks_of(env)}).encode()
    if op == "unload":
        scripts.pop(name, None)
        return b"{}"
    if op == "call":
        if name not in scripts:
            raise ScriptError("invalid_result", f"script {name} is not loaded")
        env, config = scripts[name]
        result = policy.call(env, request["hook"], request["payload"], request.get("context") or {}, config,
                             output_limit=output)
        return policy.check_json(result, max_bytes=output, max_depth=limits["max_depth"])
    raise ScriptError("invalid_result", f"unknown op {op!r}")


if __name__ == "__main__":
    main()
