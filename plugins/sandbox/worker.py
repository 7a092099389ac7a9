"""A script worker: a fresh interpreter (``python -I -m ssa_server.plugins.sandbox.worker R W P``,
started by ``ssa_server.helper_process``) with an empty environment and working directory, OS
limits, and JSON frames on two pipes (and ``P``, a memfd holding the index of the step running,
see ``docs/sandbox.md``).  It loads only what it needs: the frames, the language policy, the
result rules; nothing of the pool, the plugin manager or the server's process machinery.

Requests: ``{"op": "load", "name", "source", "config", "keep_state", "secrets"}`` and ``{"op": "unload",
"name"}`` for the script set, and one mode for calls, ``{"op": "batch", "jobs": [chain, ...]}``
where a chain is ``{"names", "hook", "payload", "context", "skip_errors"}`` (a call is a chain of
one script).  Answers: ``{"ok": ...}`` or ``{"error": {"kind", "message"}}`` (a step's, a load's),
for a batch ``{"answers": [{"steps": [step answer, ...]}, ...]}``; ``"retire": true`` in front
when the worker's lifetime CPU is nearly spent.  Mid-step, ``context.http`` writes ``{"http":
request}`` on the answer pipe and reads the server's answer on the request pipe (``_ask_host``).
Anything worse (CPU limit, segfault) ends the process; the server sees the pipe close and starts
a new worker.

Every script call is a *step* of its own: its own CPU budget, a fresh copy of its input and of
the script's module state, and at its end its objects dropped and the garbage collected (the
cyclic GC is off otherwise), so that its finalizers run, and fail, inside its own step.
"""

from __future__ import annotations

import fcntl
import gc
import json
import math
import os
import resource
import signal
import stat
import sys
import tracemalloc
import unicodedata  # noqa: F401  (the compiler imports it for non-ASCII names: no file can be opened later)
import warnings
from types import MappingProxyType
from typing import Any

from ssa_server.frames import FrameError, dumps, loads, read_frame_bytes, write_raw_frame
from ssa_server.script_rules import next_payload, replays_input, stops_chain
from ssa_server.shared_counter import SharedCounter

from . import policy
from .errors import EXIT_UNSETTLED, ScriptError, ScriptRefused
from .janssen_objects import CustomScript
from .state import ModuleTemplate, ScriptWorlds

MAX_REQUEST = 64 << 20
# 0-2 are /dev/null, 3 and 4 the pipes, 5 /proc/self/statm read-only (a step's own memory budget
# is measured from it); nothing else is open, nothing more can be
REQUESTS_FD, ANSWERS_FD, STATM_FD = 3, 4, 5
_PAGE = os.sysconf("SC_PAGE_SIZE")
_GC_ROUNDS = 16  # collections per step before its garbage counts as never settling
LOAD_MEMORY_SHARE = 8  # a script's top level may keep 1/8 of the worker's memory limit
_NOBODY = 65534


def _wall(rfd: int, wfd: int) -> None:
    """The pipes on fixed low descriptors, everything else closed: requests on 3, answers on 4,
    /dev/null on 0-2 (as the pool starts the process)."""
    high_r = fcntl.fcntl(rfd, fcntl.F_DUPFD_CLOEXEC, 16)
    high_w = fcntl.fcntl(wfd, fcntl.F_DUPFD_CLOEXEC, 16)
    for fd in range(3):
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                raise OSError
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    os.dup2(high_r, REQUESTS_FD)
    os.dup2(high_w, ANSWERS_FD)
    os.closerange(ANSWERS_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    if statm != STATM_FD:
        os.dup2(statm, STATM_FD)
        os.close(statm)


def _set_limits(memory_mb: int, lifetime_cpu: int) -> None:
    # (no core file: the server set RLIMIT_CORE to 0 when it started this process)
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    _address_space[0] = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_CPU, (lifetime_cpu, lifetime_cpu))
    # No descriptor is free: open(), sockets, pipes and new imports fail with EMFILE.
    resource.setrlimit(resource.RLIMIT_NOFILE, (STATM_FD + 1, STATM_FD + 1))
    if os.geteuid() == 0:  # root could raise these limits again: not once it is nobody
        try:
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
        except OSError:
            pass


_soft_cpu = [-1]  # the RLIMIT_CPU soft limit last set (whole seconds: it rarely moves)


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_budget(seconds: float, hard: int) -> None:
    soft = min(hard, math.ceil(_cpu_used() + seconds))
    if soft != _soft_cpu[0]:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        _soft_cpu[0] = soft


_Own = tuple[float | None, int | None]  # a script's own per-step cpu seconds and memory MiB
# A loaded script: its worlds, config (context.config), secrets (context.secrets), what
# context.getScript() names, and its own per-step limits (None: the worker's).
_Loaded = tuple[ScriptWorlds, dict[str, Any], MappingProxyType[str, str], CustomScript, _Own | None]
_address_space = [0]  # the worker's RLIMIT_AS (bytes): a step's own memory budget is set below it


def _own_limits(cpu: float | None, memory_mb: int | None) -> None:
    """A script's own per-step budgets, finer than the worker's: its CPU seconds as a profiling
    timer (SIGPROF, whose default action ends the process, as SIGXCPU does: the pool reports
    ``limit``); its memory as the address space now plus ``memory_mb`` (RLIMIT_AS soft limit:
    an allocation past it is a MemoryError in that step).  The address space now is read from
    /proc/self/statm through the descriptor the wall kept (STATM_FD): nothing is opened."""
    if cpu is not None:
        signal.setitimer(signal.ITIMER_PROF, cpu)
    if memory_mb is not None:
        used = int(os.pread(STATM_FD, 64, 0).split()[0]) * _PAGE
        soft = min(_address_space[0], used + (memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_AS, (soft, _address_space[0]))


def _end_own_limits(cpu: float | None, memory_mb: int | None) -> None:
    if cpu is not None:
        signal.setitimer(signal.ITIMER_PROF, 0)
    if memory_mb is not None:
        resource.setrlimit(resource.RLIMIT_AS, (_address_space[0], _address_space[0]))


_finalizer_errors: list[str] = []  # what finalizers raised since the step began (sys.unraisablehook)


def _unraisable(report: Any) -> None:
    if not _finalizer_errors:
        _finalizer_errors.append(_describe(report.exc_value) if report.exc_value is not None else "?")


def _settle(careful: bool = True) -> None:
    """Collect the garbage, so that finalizers run now, in the step that made it.

    ``careful=False`` after a step of a script that keeps no state and has no code a finalizer
    could run (see ``ModuleTemplate.finalizers``): what it made is all in the youngest
    generation (the collector runs nowhere else, and loads freeze what they leave) and freeing
    it runs nothing, so collecting that generation is enough (and cheap).  Otherwise full
    collections until one finds nothing (a finalizer may bring objects back, which moves them
    to an older generation; a full collection also empties the interpreter's free lists, which
    slows the next call).  Finalizers that keep making garbage would run in a later
    step: this process ends instead."""
    if not careful:
        gc.collect(0)
        return
    for _ in range(_GC_ROUNDS):
        if not gc.collect():
            return
    os._exit(EXIT_UNSETTLED)


def _refreeze(replaced: bool) -> None:
    """After a load or unload: the garbage is collected (when a revision went, also what it
    left, which was frozen), and what lives now (the scripts' templates above all) moves out of
    the collector's scans."""
    if replaced:
        gc.unfreeze()  # a full collection of everything (costly): only when a revision goes
    _settle()
    gc.freeze()
    _finalizer_errors.clear()  # a revision that went: its finalizers are no step's failure


def main() -> None:
    rfd, wfd, progress_fd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    limits = json.loads(sys.argv[4])
    progress = SharedCounter(progress_fd)
    os.close(progress_fd)  # the mapping stays
    _wall(rfd, wfd)
    _set_limits(limits["memory_mb"], limits["lifetime_cpu"])
    sys.setrecursionlimit(400)
    warnings.simplefilter("ignore")  # a warning's display would try to import and open files
    sys.unraisablehook = _unraisable
    gc.disable()  # garbage is collected at the end of each step, never in the middle of another
    gc.collect()
    gc.freeze()
    worker = Worker(limits, progress)
    while True:
        try:
            body = read_frame_bytes(REQUESTS_FD, MAX_REQUEST)
            request = loads(body)
        except (FrameError, ValueError):
            return
        write_raw_frame(ANSWERS_FD, worker.answer(request, len(body)))


class Worker:
    """The scripts loaded in this process and the steps that run them."""

    def __init__(self, limits: dict[str, Any], progress: SharedCounter) -> None:
        # name -> its worlds, its config (context.config), its secrets (context.secrets), what
        # context.getScript() names, and its own per-step (cpu, memory_mb) when its NAME.toml sets
        # either (None: the worker's limits)
        self.scripts: dict[str, _Loaded] = {}
        self.output = limits["output_kb"] * 1024
        self.max_depth = limits["max_depth"]
        self.max_source = limits["max_source_kb"] * 1024
        self.cpu, self.hard = limits["cpu"], limits["lifetime_cpu"]
        self.load_budget = (limits["memory_mb"] << 20) // LOAD_MEMORY_SHARE
        # Recycled once less CPU than this is left: a lone call (soft limit at most its budget
        # plus a second, for the rounding) must never meet the hard cap.  A batch may: then it
        # is lost and each of its jobs goes again alone, to a fresh worker.
        self.reserve = math.ceil(self.cpu) + 1
        self.progress = progress

    def answer(self, request: dict[str, Any], size: int) -> bytes:
        """The answer frame's JSON text for one request frame of ``size`` bytes."""
        op = request.get("op")
        if op == "batch":
            text = self._batch(request["jobs"], size)
        elif op == "load":
            text = self._load(request)
        elif op == "unload":
            gone = self.scripts.pop(request.get("name", ""), None)
            if gone is not None:
                self._destroy(gone)
            _refreeze(replaced=gone is not None)
            text = _ok(b"{}")
        else:
            text = _error("invalid_result", f"unknown op {op!r}")
        if self.hard - _cpu_used() < self.reserve:
            return _with_retire(text)
        return text

    def _batch(self, jobs: list[dict[str, Any]], size: int) -> bytes:
        """Independent chains (a call is a chain of one) in one round trip, in order, each as if
        it came alone; the progress counter counts their steps (a hint for the server's wall
        clock).  Answer: ``{"answers": [{"steps": [...]}, ...]}``."""
        answers, offset = [], 0
        for job in jobs:
            answers.append(self._chain(job, size, offset))
            offset += len(job["names"])
        return _joined(b'{"answers":[', answers, b"]}")

    def _chain(self, job: dict[str, Any], size: int, offset: int) -> bytes:
        """Scripts' hook in a row, each a step of its own, by the server's chain rules
        (``script_rules``).  A call (a chain of one) runs on the frame's own parse of its input
        (nothing else holds it); in a longer chain each step gets a fresh parse of the previous
        step's serialised output and of the request facts.  It stops at an answer that
        ``stops_chain`` or at a failure unless ``skip_errors`` (the server's ``failure_refuses``;
        a skipped step's changes are dropped).  Answer: ``{"steps": [...]}``, one step answer
        per script run."""
        hook, names = job["hook"], job["names"]
        if len(names) == 1:
            self.progress.set(offset)
            text = self._step(names[0], hook, [job.pop("payload")], [job.pop("context", None) or {}],
                              self.output + size)
            return _joined(b'{"steps":[', [text], b"]}")
        facts = dumps(job.get("context") or {})
        skips = job.get("skip_errors")  # per script (its own on_error); a bool for all of them
        skip_each = [bool(x) for x in skips] if isinstance(skips, list) else [bool(skips)] * len(names)
        skip = any(skip_each)
        box = [job.pop("payload")]
        # ``replay``: the JSON text of the input a later step may get again (``replays_input``),
        # the payload itself or the answer of the step that made it.
        replay = dumps(box[0]) if replays_input(hook, skip) else b""
        replay_is_answer = False
        steps: list[bytes] = []
        for index, name in enumerate(names):
            if not box:  # a fresh copy of the input this step gets
                parsed = loads(replay)
                box.append(next_payload(hook, parsed["ok"]) if replay_is_answer else parsed)
                parsed = None
            self.progress.set(offset + index)
            text = self._step(name, hook, box, [loads(facts)], self.output + size)
            steps.append(text)
            if text.startswith(b'{"error"'):  # (an error's text never has the stdlib marker)
                if not (skip_each[index] if index < len(skip_each) else False):
                    break
                continue
            if index + 1 == len(names):
                break
            done = loads(text)["ok"]
            if stops_chain(hook, done):
                break
            passed = next_payload(hook, done)
            if passed is not None:
                box.append(passed)
                size, replay, replay_is_answer = len(text), text, True
        return _joined(b'{"steps":[', steps, b"]}")

    def _step(self, name: str, hook: str, box: list[dict[str, Any]], facts_box: list[dict[str, Any]],
              cap: int) -> bytes:
        """One script call on the payload and request facts in the boxes (taken out: nothing
        else holds them), under its own CPU budget; its answer text.  Everything the call made
        is dropped and collected before the answer is returned, and a finalizer that raised
        fails the step."""
        loaded = self.scripts.get(name)
        own = loaded[4] if loaded is not None else None  # the script's own cpu / memory_mb, if any
        _cpu_budget(self.cpu, self.hard)
        if own is not None:
            _own_limits(*own)
        _finalizer_errors.clear()
        payload: dict[str, Any] | None
        facts: dict[str, Any] | None
        result: dict[str, Any] | None
        payload, facts = box.pop(), facts_box.pop()
        world: dict[str, Any] | None = None
        client = ""
        try:
            if loaded is None:
                raise ScriptError("invalid_result", f"script {name} is not loaded")
            client = str(facts.get("client_id", ""))
            world = loaded[0].take(client)
            result = policy.call(world, hook, payload, facts, loaded[1], output_limit=self.output,
                                 ask=_ask_host, secrets=loaded[2], script=loaded[3])
            payload = facts = None
            text = _ok(policy.check_json(result, max_bytes=cap, max_depth=self.max_depth))
        except BaseException as e:  # the script's own exception, SystemExit included
            text = _error_of(e)
        result = payload = facts = None
        if world is not None and loaded is not None:  # (a world is taken from a loaded script only)
            loaded[0].done(client, world)
            world = None
        _settle(careful=loaded is not None and loaded[0].careful)
        if own is not None:
            _end_own_limits(*own)
        if _finalizer_errors:
            text = _error("exception", f"a finalizer of this script raised {_finalizer_errors[0]}")
        return text

    def _load(self, request: dict[str, Any]) -> bytes:
        """Compile and run a script's top level under a call's CPU budget; refused if it
        fails, leaves state that cannot be reset between calls, a finalizer raises, or it keeps
        more than its share of the worker's memory."""
        name = request.get("name", "")
        _cpu_budget(self.cpu, self.hard)
        _finalizer_errors.clear()
        tracemalloc.start()
        env: dict[str, Any] | None = None
        template = None
        try:
            env = policy.load(name, request["source"], max_source=self.max_source, output_limit=self.output,
                              config=request.get("config") or {}, revision=str(request.get("revision") or ""))
            template = ModuleTemplate(name, env)
            hooks = policy.hooks_of(env)
            env = None
            _settle()
            kept = tracemalloc.get_traced_memory()[0]
            if _finalizer_errors:
                raise ScriptRefused(f"{name}: a finalizer of its top level raised {_finalizer_errors[0]}")
            if kept > self.load_budget:
                raise ScriptRefused(f"{name}: its top level keeps {kept / 2**20:.1f} MiB of memory, over the "
                                    f"{self.load_budget >> 20} MiB a script may keep")
            text = _ok(json.dumps({"hooks": hooks}).encode())
        except BaseException as e:
            text, template = _error_of(e), None
        finally:
            tracemalloc.stop()
        env = None
        replaced = False
        if template is not None:
            previous = self.scripts.get(name)
            replaced = previous is not None
            if previous is not None:
                self._destroy(previous)
            cpu, memory_mb = request.get("cpu"), request.get("memory_mb")
            own = ((float(cpu) if cpu else None, int(memory_mb) if memory_mb else None)
                   if cpu or memory_mb else None)
            secrets = request.get("secrets") or {}
            self.scripts[name] = (ScriptWorlds(template, str(request.get("keep_state") or "none")),
                                  request.get("config") or {},
                                  MappingProxyType({k: v for k, v in secrets.items() if type(v) is str}),
                                  CustomScript(name, str(request.get("revision") or "")), own)
        _refreeze(replaced)
        return text

    def _destroy(self, loaded: _Loaded) -> None:
        """A Janssen script's ``destroy`` as its revision leaves, on a fresh copy of its state,
        under a call's CPU budget (a plain script has none: nothing runs)."""
        world = loaded[0].template.world()
        if "destroy" in world:
            _cpu_budget(self.cpu, self.hard)
            policy.destroy(world, loaded[1])


def _ask_host(request: dict[str, Any]) -> dict[str, Any]:
    """``context.http``: the request as a frame on the answer pipe, ``{"http": request}``, then
    the server's answer on the request pipe (``http_broker.py``); the step waits meanwhile (its
    wall clock runs in the server, its CPU budget does not).  A server gone: this process ends."""
    text = dumps(request)
    lead = b" " if text[:1] == b" " else b""
    write_raw_frame(ANSWERS_FD, lead + b'{"http":' + text.lstrip(b" ") + b"}")
    try:
        answer = loads(read_frame_bytes(REQUESTS_FD, MAX_REQUEST))
    except (FrameError, ValueError):
        os._exit(1)
    return answer if isinstance(answer, dict) else {"http_error": "http failed: a malformed answer"}


def _joined(head: bytes, texts: list[bytes], tail: bytes) -> bytes:
    """Answers in one JSON text, the stdlib marker (a leading space) moved to the front."""
    if len(texts) == 1:  # a call, a batch of one
        text = texts[0]
        return b" " + head + text[1:] + tail if text[:1] == b" " else head + text + tail
    body = head + b",".join(t[1:] if t[:1] == b" " else t for t in texts) + tail
    return b" " + body if any(t[:1] == b" " for t in texts) else body


def _with_retire(text: bytes) -> bytes:
    """The answer with ``"retire": true`` in front of its first key."""
    lead = b" " if text[:1] == b" " else b""
    return lead + b'{"retire":true,' + text[len(lead) + 1:]


def _error_of(error: BaseException) -> bytes:
    if isinstance(error, ScriptRefused):
        return _error("refused", str(error)[:1000])
    if isinstance(error, ScriptError):
        return _error(error.kind, str(error)[:1000])
    if isinstance(error, MemoryError):
        return _error("limit", "memory limit exceeded")
    if isinstance(error, RecursionError):
        return _error("limit", "recursion limit exceeded")
    return _error("exception", _describe(error))


def _describe(error: BaseException) -> str:
    try:
        return f"{type(error).__name__}: {policy._printable(str(error))[:500]}"
    except BaseException:  # a hostile __str__
        return type(error).__name__


def _ok(text: bytes) -> bytes:
    # A leading space marks stdlib JSON (see frames.dumps): keep it at the front of the frame.
    return (b" " if text[:1] == b" " else b"") + b'{"ok":' + text.lstrip(b" ") + b"}"


def _error(kind: str, message: str) -> bytes:
    return json.dumps({"error": {"kind": kind, "message": message}}).encode()


if __name__ == "__main__":
    main()
