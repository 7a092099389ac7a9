"""A script worker: a fresh interpreter (``python -I -m ssa_server.plugins.sandbox.worker R W P``)
with an empty environment and working directory, OS limits, and JSON frames on two pipes (and
``P``, a memfd holding the running chain step's index).

Requests: ``{"op": "load", "name", "source", "config"}``, ``{"op": "unload", "name"}``,
``{"op": "call", "name", "hook", "payload", "context"}``, ``{"op": "chain", "names", "hook",
"payload", "context", "skip_errors"}``, ``{"op": "batch", "jobs": [call or chain, ...]}``.
Answers: ``{"ok": ...}`` or ``{"error": {"kind", "message"}}``; for a chain ``{"steps": [answer,
...]}``, for a batch ``{"answers": [answer, ...]}``.  Anything worse (CPU limit, segfault) ends the process; the
server sees the pipe close and starts a new worker.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from collections.abc import Callable
from typing import Any

from . import policy
from ssa_server.shared_counter import SharedCounter

from .errors import ScriptError, ScriptRefused
from .protocol import FrameError, dumps, loads, read_frame, write_raw_frame

MAX_REQUEST = 64 << 20


def _set_limits(memory_mb: int, lifetime_cpu: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (lifetime_cpu, lifetime_cpu))


def _pin_files(fds: tuple[int, ...]) -> None:
    """No new file descriptor can be opened: open(), sockets and imports fail from here on."""
    highest = max(fds + (2,)) + 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest, highest))


_soft_cpu = [-1]  # the RLIMIT_CPU soft limit last set (whole seconds: it rarely moves)


def _cpu_budget(seconds: float, hard: int) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = min(hard, math.ceil(usage.ru_utime + usage.ru_stime + seconds))
    if soft != _soft_cpu[0]:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        _soft_cpu[0] = soft


def main() -> None:
    rfd, wfd, progress_fd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    limits = json.loads(sys.argv[4])
    progress = SharedCounter(progress_fd)
    os.close(progress_fd)  # the mapping stays
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
        if request.get("op") == "batch":
            text = _batch(request, scripts, limits, output, progress)
        else:
            text = _one(request, scripts, limits, output, progress, 0)
        write_raw_frame(wfd, text)


def _one(request: dict[str, Any], scripts: dict[str, Any], limits: dict[str, Any], output: int,
         progress: SharedCounter, offset: int) -> bytes:
    if request.get("op") == "chain":
        return _chain(request, scripts, limits, output, progress, offset)
    _cpu_budget(limits["cpu"], limits["lifetime_cpu"])
    return _guarded(lambda: _handle(request, scripts, limits, output))


def _batch(request: dict[str, Any], scripts: dict[str, Any], limits: dict[str, Any], output: int,
           progress: SharedCounter) -> bytes:
    """Independent requests (calls and chains) in one round trip, in order, each as if it came
    alone; the progress counter counts their steps, so the server knows which one was running
    if this process dies.  Answer: ``{"answers": [answer, ...]}``."""
    answers, offset = [], 0
    for job in request["jobs"]:
        if job.get("op") not in ("call", "chain"):
            answers.append(_error("invalid_result", "a batch holds calls and chains only"))
            continue
        progress.set(offset)
        answers.append(_one(job, scripts, limits, output, progress, offset))
        offset += len(job["names"]) if job.get("op") == "chain" else 1
    return _joined(b'{"answers":[', answers, b"]}")


def _joined(head: bytes, texts: list[bytes], tail: bytes) -> bytes:
    """Answers in one JSON text, the stdlib marker (a leading space) moved to the front."""
    body = head + b",".join(t[1:] if t[:1] == b" " else t for t in texts) + tail
    return b" " + body if any(t[:1] == b" " for t in texts) else body


def _guarded(work: Callable[[], bytes]) -> bytes:
    """The answer for one piece of work: its JSON text, or the error it raised."""
    try:
        return _ok(work())
    except ScriptRefused as e:
        return _error("refused", str(e))
    except ScriptError as e:
        return _error(e.kind, str(e)[:1000])
    except MemoryError:
        return _error("limit", "memory limit exceeded")
    except RecursionError:
        return _error("limit", "recursion limit exceeded")
    except BaseException as e:  # the script's own exception, SystemExit included
        return _error("exception", f"{type(e).__name__}: {_text(e)}")


def _chain(request: dict[str, Any], scripts: dict[str, Any], limits: dict[str, Any], output: int,
           progress: SharedCounter, offset: int) -> bytes:
    """Several scripts' hook in one round trip, each on the previous one's output, each under
    its own CPU budget and a fresh copy of the context.  Stops where the server's chain would:
    a script answering False, a denial (not for revoke), or a failure unless ``skip_errors``
    (then that script's changes are dropped).  Answer: one step answer per script run."""
    hook, payload = request["hook"], request["payload"]
    original = dumps(payload) if hook == "revoke" else b""  # revoke scripts each see the list as revoked
    facts = dumps(request.get("context") or {})
    skip = bool(request.get("skip_errors"))
    steps: list[bytes] = []
    for index, name in enumerate(request["names"]):
        progress.set(offset + index)
        if hook == "revoke" and index:
            payload = loads(original)
        _cpu_budget(limits["cpu"], limits["lifetime_cpu"])
        kept = dumps(payload) if skip else b""
        outcome: list[dict[str, Any]] = []

        def step() -> bytes:
            result = _call(name, hook, payload, loads(facts), scripts, output)
            outcome.append(result)
            return policy.check_json(result, max_bytes=output, max_depth=limits["max_depth"])

        text = _guarded(step)
        steps.append(text)
        if text.startswith(b'{"error"') or not outcome:
            if not skip:
                break
            payload = loads(kept)
            continue
        result = outcome[0]
        payload = {"ssa_list": result["ssa_list"]} if hook == "get" else (
            {"header": result["header"], "claims": result["claims"]} if hook == "create" else payload)
        if result["result"] is False or (result.get("denied") and hook != "revoke"):
            break
    return _joined(b'{"steps":[', steps, b"]}")


def _call(name: str, hook: str, payload: dict[str, Any], facts: dict[str, Any], scripts: dict[str, Any],
          output: int) -> dict[str, Any]:
    if name not in scripts:
        raise ScriptError("invalid_result", f"script {name} is not loaded")
    env, config = scripts[name]
    return policy.call(env, hook, payload, facts, config, output_limit=output)


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
        result = _call(name, request["hook"], request["payload"], request.get("context") or {}, scripts, output)
        return policy.check_json(result, max_bytes=output, max_depth=limits["max_depth"])
    raise ScriptError("invalid_result", f"unknown op {op!r}")


if __name__ == "__main__":
    main()
