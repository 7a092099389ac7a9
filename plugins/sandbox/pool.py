"""The server side of the sandbox: a pool of pre-started worker processes.

Each call takes an idle worker, sends one JSON frame, and waits for the answer with a wall-clock
timeout.  On timeout, crash, a limit or a broken frame the worker's process group is killed and
a fresh worker (with every loaded script) takes its place; the other workers keep serving.
"""

from __future__ import annotations

import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

from .errors import ScriptError, ScriptRefused
from .limits import SandboxLimits
from .protocol import FrameError, read_frame, write_frame

_WORKER = "ssa_server.plugins.sandbox.worker"
_LOAD_TIMEOUT_EXTRA = 5.0  # a fresh interpreter needs time to start before it can compile


class _Worker:
    def __init__(self, limits: SandboxLimits) -> None:
        self.cwd = tempfile.mkdtemp(prefix="ssa-worker-")
        os.chmod(self.cwd, 0o500)  # empty and not writable
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        config = json.dumps({"memory_mb": limits.memory_mb, "lifetime_cpu": limits.lifetime_cpu,
                             "cpu": limits.cpu, "output_kb": limits.output_kb,
                             "max_source_kb": limits.max_source_kb, "max_depth": limits.max_depth})
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-m", _WORKER, str(to_child_r), str(from_child_w), config],
            pass_fds=(to_child_r, from_child_w), env={"PATH": "/usr/bin:/bin"}, cwd=self.cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self.calls = 0
        self.max_answer = limits.output_kb * 1024 * 2 + 65536

    def request(self, message: dict[str, Any], timeout: float) -> Any:
        """Send one request and wait for its answer; ScriptError(timeout|crashed) if none."""
        self.calls += 1
        try:
            write_frame(self.to_child, message)
        except OSError:
            raise ScriptError("crashed", "the script worker exited") from None
        ready, _, _ = select.select([self.from_child], [], [], timeout)
        if not ready:
            raise ScriptError("timeout", f"no answer within {timeout:g} s")
        try:
            answer = read_frame(self.from_child, self.max_answer)
        except FrameError as e:
            code = self.proc.poll()
            if code is None:
                try:
                    code = self.proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
            if code == -signal.SIGXCPU or code == -signal.SIGKILL:
                raise ScriptError("limit", "CPU time limit exceeded") from None
            if code is not None and code < 0:
                raise ScriptError("crashed", f"the script worker died ({signal.Signals(-code).name})") from None
            raise ScriptError("crashed", f"the script worker failed: {e}") from None
        if not isinstance(answer, dict):
            raise ScriptError("crashed", "malformed answer from the script worker")
        return answer

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for fd in (self.to_child, self.from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.cwd, ignore_errors=True)


class SandboxPool:
    """``workers`` fresh-interpreter workers; ``load`` goes to all, ``call`` to one idle worker."""

    def __init__(self, workers: int = 2, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self._scripts: dict[str, tuple[str, dict[str, Any]]] = {}
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._size = workers
        self._admin = threading.Lock()  # loads/unloads/close: one at a time
        self._closed = False
        for _ in range(workers):
            self._idle.put(_Worker(self.limits))

    # --- scripts ---
    def load(self, name: str, source: str, config: dict[str, Any]) -> list[str]:
        """Compile ``source`` in every worker; the hooks it defines.  ScriptRefused if it cannot load."""
        if len(source.encode()) > self.limits.max_source_kb * 1024:
            raise ScriptRefused(f"{name}: larger than {self.limits.max_source_kb * 1024} bytes")
        config = json.loads(json.dumps(config))
        with self._admin:
            workers = self._take_all()
            try:
                hooks = None
                for i, worker in enumerate(workers):
                    answer = self._load_into(worker, name, source, config)
                    if answer is None:  # the worker died loading it: replace it, refuse the script
                        workers[i] = self._fresh()
                        raise ScriptRefused(f"{name}: its top level exceeded a limit while loading")
                    if "error" in answer:
                        raise ScriptRefused(str(answer["error"].get("message", "refused"))[:1000])
                    hooks = answer["ok"]["hooks"]
                self._scripts[name] = (source, config)
                return list(hooks or [])
            finally:
                for worker in workers:
                    self._idle.put(worker)

    def unload(self, name: str) -> None:
        with self._admin:
            self._scripts.pop(name, None)
            workers = self._take_all()
            try:
                for i, worker in enumerate(workers):
                    try:
                        worker.request({"op": "unload", "name": name}, self.limits.timeout + _LOAD_TIMEOUT_EXTRA)
                    except ScriptError:
                        workers[i] = self._fresh()
            finally:
                for worker in workers:
                    self._idle.put(worker)

    def _load_into(self, worker: _Worker, name: str, source: str, config: dict[str, Any]) -> Any:
        try:
            return worker.request({"op": "load", "name": name, "source": source, "config": config},
                                  self.limits.timeout + _LOAD_TIMEOUT_EXTRA)
        except ScriptError:
            worker.kill()
            return None

    def _take_all(self) -> list[_Worker]:
        return [self._idle.get() for _ in range(self._size)]

    def _fresh(self) -> _Worker:
        """A new worker with every loaded script (a script refused now is skipped)."""
        worker = _Worker(self.limits)
        for name, (source, config) in list(self._scripts.items()):
            if self._load_into(worker, name, source, config) is None:
                worker = _Worker(self.limits)
        return worker

    # --- calls ---
    def call(self, name: str, hook: str, payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Run one hook in an idle worker (blocking, thread-safe); ScriptError on any failure."""
        if self._closed:
            raise ScriptError("crashed", "the sandbox is closed")
        worker = self._idle.get()
        try:
            answer = worker.request({"op": "call", "name": name, "hook": hook, "payload": payload,
                                     "context": context}, self.limits.timeout)
            if "error" in answer:
                kind = answer["error"].get("kind", "exception")
                raise ScriptError(kind if kind in ("exception", "invalid_result", "limit") else "exception",
                                  str(answer["error"].get("message", ""))[:1000])
            result = answer.get("ok")
            _validate(hook, result)
            result.setdefault("denied", None)  # the worker leaves it out when nothing was denied
        except ScriptError as e:
            if e.kind in ("timeout", "crashed", "limit"):
                worker = self._replace(worker)
            raise
        finally:
            if worker.calls >= self.limits.recycle_after:  # script globals persist: start clean
                worker = self._replace(worker)
            self._idle.put(worker)
        return result  # type: ignore[no-any-return]

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        return self._fresh()  # not under _admin: a load may be waiting for this worker

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return


def _validate(hook: str, result: Any) -> None:
    """The server checks the shape again: the worker is not trusted."""
    def bad(why: str) -> ScriptError:
        return ScriptError("invalid_result", why)

    if not isinstance(result, dict) or not isinstance(result.get("result"), bool):
        raise bad("malformed result")
    if not isinstance(result.get("logs"), list) or not all(isinstance(x, str) for x in result["logs"]):
        raise bad("malformed logs")
    denied = result.get("denied")
    if denied is not None and not (isinstance(denied, dict) and isinstance(denied.get("error"), str)
                                   and isinstance(denied.get("description"), str)):
        raise bad("malformed denial")
    if hook == "create" and not (isinstance(result.get("header"), dict) and isinstance(result.get("claims"), dict)):
        raise bad("create must leave header and claims as objects")
    if hook == "get" and not (isinstance(result.get("ssa_list"), list)
                              and all(isinstance(i, dict) for i in result["ssa_list"])):
        raise bad("get must leave a list of objects")
