"""The server side of the sandbox: a pool of pre-started worker processes.

Each call takes an idle worker, sends one JSON frame, and waits for the answer with a wall-clock
timeout.  On timeout, crash, a limit or a broken frame the worker's process group is killed and
a fresh worker (with every loaded script) takes its place; the other workers keep serving.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from ssa_server.shared_counter import SharedCounter

from .errors import ChainBroken, ScriptError, ScriptRefused
from .limits import SandboxLimits
from .protocol import FrameBuffer, FrameError, dumps, loads, read_frame, read_ready, write_frame, write_raw_frame

_WORKER = "ssa_server.plugins.sandbox.worker"
_LOAD_TIMEOUT_EXTRA = 5.0  # a fresh interpreter needs time to start before it can compile
_T = TypeVar("_T")
_PIPE_SAFE = 60 << 10  # a frame this small fits in an empty pipe buffer (64 KiB on Linux)


class _Worker:
    def __init__(self, limits: SandboxLimits) -> None:
        self.cwd = tempfile.mkdtemp(prefix="ssa-worker-")
        os.chmod(self.cwd, 0o500)  # empty and not writable
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        self.progress, progress_fd = SharedCounter.in_memfd("ssa-sandbox-progress")  # the chain step running
        config = json.dumps({"memory_mb": limits.memory_mb, "lifetime_cpu": limits.lifetime_cpu,
                             "cpu": limits.cpu, "output_kb": limits.output_kb,
                             "max_source_kb": limits.max_source_kb, "max_depth": limits.max_depth})
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-m", _WORKER, str(to_child_r), str(from_child_w), str(progress_fd), config],
            pass_fds=(to_child_r, from_child_w, progress_fd), env={"PATH": "/usr/bin:/bin"}, cwd=self.cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
        os.close(to_child_r)
        os.close(from_child_w)
        os.close(progress_fd)
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
            raise self._failure(e) from None
        if not isinstance(answer, dict):
            raise ScriptError("crashed", "malformed answer from the script worker")
        return answer

    async def request_async(self, message: dict[str, Any], timeout: float, *, steps: int = 1) -> Any:
        """``request`` on the event loop: the answer is read when the pipe is readable, so no
        thread waits for it (a thread hop costs more than the whole round trip).  A chain of
        ``steps`` scripts gets ``timeout`` per script: the clock restarts when the worker
        reports the next step."""
        loop = asyncio.get_running_loop()
        self.calls += steps
        if steps > 1:
            self.progress.set(0)
        data = dumps(message)
        try:
            if len(data) < _PIPE_SAFE:  # fits in the pipe buffer: the write cannot block
                write_raw_frame(self.to_child, data)
            else:
                await loop.run_in_executor(None, write_raw_frame, self.to_child, data)
        except OSError:
            raise ScriptError("crashed", "the script worker exited") from None
        answer = _PendingAnswer(loop, self.from_child, self.max_answer * steps, timeout, self.progress, steps)
        try:
            raw = await answer.future
        except FrameError as e:
            raise await loop.run_in_executor(None, self._failure, e) from None
        except TimeoutError:
            raise ScriptError("timeout", f"no answer within {timeout:g} s") from None
        finally:
            answer.close()
        try:
            decoded = loads(raw)
        except ValueError:
            raise ScriptError("crashed", "the script worker failed: frame is not JSON") from None
        if not isinstance(decoded, dict):
            raise ScriptError("crashed", "malformed answer from the script worker")
        return decoded

    def _failure(self, error: FrameError) -> ScriptError:
        """Why the worker stopped answering (it may take a moment to be reaped)."""
        code = self.proc.poll()
        if code is None:
            try:
                code = self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        if code == -signal.SIGXCPU or code == -signal.SIGKILL:
            return ScriptError("limit", "CPU time limit exceeded")
        if code is not None and code < 0:
            return ScriptError("crashed", f"the script worker died ({signal.Signals(-code).name})")
        return ScriptError("crashed", f"the script worker failed: {error}")

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
        self.progress.close()
        shutil.rmtree(self.cwd, ignore_errors=True)


class SandboxPool:
    """``workers`` fresh-interpreter workers; ``load`` goes to all, ``call`` to one idle worker."""

    def __init__(self, workers: int = 2, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self._scripts: dict[str, tuple[str, dict[str, Any]]] = {}
        self._idle: collections.deque[_Worker] = collections.deque()
        # Event-loop callers waiting for a worker get one handed over, not a thread each.
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[_Worker]]] = collections.deque()
        self._handover = threading.Lock()
        self._freed = threading.Condition(self._handover)  # blocking callers wait on it
        self._draining = False  # a load/unload is collecting every worker: waiters wait for it
        self._size = workers
        self._jobs: list[_Job] = []  # requests on the event loop not yet sent to a worker
        # The loop on which one of them is collecting a batch (waiting a loop turn or for a worker).
        self._gathering: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # batches served for callers other than their gatherer
        self._admin = threading.Lock()  # loads/unloads/close: one at a time
        self._closed = False
        for _ in range(workers):
            self._idle.append(_Worker(self.limits))

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
                self._release_all(workers)

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
                self._release_all(workers)

    def _load_into(self, worker: _Worker, name: str, source: str, config: dict[str, Any]) -> Any:
        try:
            return worker.request({"op": "load", "name": name, "source": source, "config": config},
                                  self.limits.timeout + _LOAD_TIMEOUT_EXTRA)
        except ScriptError:
            worker.kill()
            return None

    def _take_all(self) -> list[_Worker]:
        with self._handover:
            self._draining = True
        return [self._take() for _ in range(self._size)]

    def _take(self) -> _Worker:
        """An idle worker, waiting (blocking) for one."""
        with self._freed:
            while not self._idle:
                self._freed.wait()
            return self._idle.pop()

    def _release_all(self, workers: list[_Worker]) -> None:
        with self._handover:
            self._draining = False
        for worker in workers:
            self._release(worker)

    def _release(self, worker: _Worker) -> None:
        """An idle worker: to the first event-loop waiter, else back to the pool (last in,
        first out: the worker used last has the warmest caches)."""
        with self._handover:
            while self._waiters and not self._draining:
                loop, waiter = self._waiters.popleft()
                if not waiter.done():
                    if _running_loop() is loop:  # the usual case: no wake-up through the self-pipe
                        loop.call_soon(self._hand_over, waiter, worker)
                    else:
                        loop.call_soon_threadsafe(self._hand_over, waiter, worker)
                    return
            self._idle.append(worker)
            self._freed.notify()

    def _hand_over(self, waiter: asyncio.Future[_Worker], worker: _Worker) -> None:
        if waiter.done():  # the waiting request was cancelled meanwhile
            self._release(worker)
        else:
            waiter.set_result(worker)

    async def _acquire_async(self) -> _Worker:
        with self._handover:
            if self._idle:
                return self._idle.pop()
            waiter: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
            self._waiters.append((asyncio.get_running_loop(), waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed over just as we were cancelled
                self._release(waiter.result())
            raise

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
        worker = self._take()
        try:
            answer = worker.request(_call_message(name, hook, payload, context), self.limits.timeout)
            return _result(hook, answer)
        except ScriptError as e:
            if e.kind in ("timeout", "crashed", "limit"):
                worker = self._replace(worker)
            raise
        finally:
            if worker.calls >= self.limits.recycle_after:  # script globals persist: start clean
                worker = self._replace(worker)
            self._release(worker)

    async def call_async(self, name: str, hook: str, payload: dict[str, Any],
                         context: dict[str, Any]) -> dict[str, Any]:
        """``call`` on the event loop; only waiting for a busy pool or replacing a worker
        (a fresh interpreter) goes to a thread."""
        return await self._request_async(_call_message(name, hook, payload, context), 1,
                                         lambda answer: _result(hook, answer))

    async def call_chain_async(self, names: list[str], hook: str, payload: dict[str, Any],
                               context: dict[str, Any], *, skip_errors: bool) -> list[dict[str, Any] | ScriptError]:
        """Several scripts' ``hook`` in one worker round trip, each on the previous one's output
        (see the worker's ``_chain``).  One outcome per script that ran: its checked result, or
        the ScriptError it ended with.  ChainBroken when the worker was lost, naming the step."""
        def outcomes(answer: dict[str, Any]) -> list[dict[str, Any] | ScriptError]:
            steps = answer.get("steps")
            if not isinstance(steps, list) or not 0 < len(steps) <= len(names) or not all(isinstance(x, dict) for x in steps):
                raise ScriptError("crashed", "malformed chain answer from the script worker")
            return [_outcome(hook, step) for step in steps]

        message = {"op": "chain", "names": names, "hook": hook, "payload": payload, "context": context,
                   "skip_errors": skip_errors}
        return await self._request_async(message, len(names), outcomes)

    async def _request_async(self, message: dict[str, Any], steps: int, check: Callable[[dict[str, Any]], _T]) -> _T:
        """One request on the event loop, its answer checked while the worker is held.

        Requests that reach the pool in the same loop turn, or while it waits for a worker, go
        to one worker together as one batch: the fixed cost of a round trip (both processes
        waking, the pipe I/O, the loop's reader and timer) is paid once for all of them.  The
        first of them gathers the batch; the others wait for their answers."""
        if self._closed:
            raise ScriptError("crashed", "the sandbox is closed")
        loop = asyncio.get_running_loop()
        job = _Job(message, steps, check, loop.create_future())
        self._jobs.append(job)
        if self._gathering is loop:
            return await job.future  # type: ignore[no-any-return]
        try:
            worker, jobs = await self._gather()
        except BaseException:  # cancelled while waiting for a worker
            job.future.cancel()
            if any(not j.future.done() for j in self._jobs):  # the others need someone to gather them
                self._background(self._gather_and_serve())
            raise
        if jobs == [job]:
            return await self._serve_one(worker, job)  # type: ignore[no-any-return]
        self._background(self._serve_batch(worker, jobs))
        return await job.future  # type: ignore[no-any-return]

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    async def _gather(self) -> tuple[_Worker, list[_Job]]:
        """A worker and every waiting job (after one loop turn, so that the requests of this
        turn join)."""
        loop = self._gathering = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0)
            worker = await self._acquire_async()
        finally:
            self._gathering = None
        # (a job of another loop is one whose loop ended before it was sent: nobody awaits it)
        jobs = [j for j in self._jobs if not j.future.done() and j.future.get_loop() is loop]
        self._jobs = []
        return worker, jobs

    async def _gather_and_serve(self) -> None:
        if self._jobs and self._gathering is None:
            worker, jobs = await self._gather()
            await self._serve_batch(worker, jobs)

    async def _serve_one(self, worker: _Worker | None, job: _Job) -> Any:
        """A batch of one: the caller's own request, answered in the caller's task.  A worker
        that timed out, crashed, hit a limit or was left mid-call by a cancellation is replaced;
        for a chain the error names the step it was lost on."""
        loop = asyncio.get_running_loop()
        try:
            return job.check(await worker.request_async(job.message, self.limits.timeout, steps=job.steps))  # type: ignore[union-attr]
        except ScriptError as e:
            if e.kind in _WORKER_LOST:
                index = min(max(worker.progress.get(), 0), job.steps - 1)  # type: ignore[union-attr]
                worker = await loop.run_in_executor(None, self._replace, worker)
                if job.steps > 1:
                    raise ChainBroken(e.kind, str(e), index) from None
            raise
        except asyncio.CancelledError:
            self._retire_later(worker)  # type: ignore[arg-type]
            worker = None
            raise
        finally:
            if worker is not None:
                await self._give_back(worker)

    async def _serve_batch(self, worker: _Worker, jobs: list[_Job]) -> None:
        """Several jobs in one round trip (the worker's ``batch`` op), each job's future settled
        with its own checked answer or error.  When the worker is lost, the job it was running
        (the progress counter says which) gets the error and is not retried; the others, whose
        answers were lost with the worker, go again to its replacement."""
        loop = asyncio.get_running_loop()
        try:
            while jobs:
                total = sum(j.steps for j in jobs)
                message = {"op": "batch", "jobs": [j.message for j in jobs]}
                try:
                    answers = (await worker.request_async(message, self.limits.timeout, steps=total)).get("answers")
                except ScriptError as e:
                    step = min(max(worker.progress.get(), 0), total - 1)
                    worker = await loop.run_in_executor(None, self._replace, worker)
                    culprit, index = _job_at(jobs, step)
                    if not culprit.future.done():
                        culprit.future.set_exception(
                            ChainBroken(e.kind, str(e), index) if culprit.steps > 1 else ScriptError(e.kind, str(e)))
                    jobs = [j for j in jobs if j is not culprit and not j.future.done()]
                    continue
                if not isinstance(answers, list) or len(answers) != len(jobs) or not all(isinstance(a, dict) for a in answers):
                    answers = [{"error": {"kind": "crashed", "message": "malformed batch answer from the script worker"}}] * len(jobs)
                lost = False
                for job, answer in zip(jobs, answers):
                    if job.future.done():  # its caller was cancelled
                        continue
                    try:
                        job.future.set_result(job.check(answer))
                    except ScriptError as e:
                        lost = lost or e.kind in _WORKER_LOST
                        job.future.set_exception(e)
                if lost:
                    worker = await loop.run_in_executor(None, self._replace, worker)
                return
        except asyncio.CancelledError:  # the server is stopping
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(ScriptError("crashed", "the sandbox is closed"))
            self._retire_later(worker)
            worker = None  # type: ignore[assignment]
            raise
        finally:
            if worker is not None:
                await self._give_back(worker)

    def _retire_later(self, worker: _Worker) -> None:
        """Replace a worker left mid-request: it may still answer, and nobody may read that."""
        asyncio.get_running_loop().run_in_executor(None, lambda: self._release(self._replace(worker)))

    async def _give_back(self, worker: _Worker) -> None:
        if worker.calls >= self.limits.recycle_after:  # script globals persist: start clean
            worker = await asyncio.get_running_loop().run_in_executor(None, self._replace, worker)
        self._release(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        return self._fresh()  # not under _admin: a load may be waiting for this worker

    def close(self) -> None:
        self._closed = True
        while True:
            with self._handover:
                if not self._idle:
                    return
                worker = self._idle.popleft()
            worker.kill()


_WORKER_LOST = ("timeout", "crashed", "limit")  # the worker is replaced after these


@dataclass(eq=False)
class _Job:
    """A request waiting for (or sent to) a worker: a call or a chain."""

    message: dict[str, Any]
    steps: int  # scripts it runs: the worker's progress counter moves once per step
    check: Callable[[dict[str, Any]], Any]  # the checked result of its answer; ScriptError if bad
    future: asyncio.Future[Any]


def _job_at(jobs: list[_Job], step: int) -> tuple[_Job, int]:
    """The job running at a batch's ``step``, and the step within that job."""
    for job in jobs:
        if step < job.steps:
            return job, step
        step -= job.steps
    return jobs[-1], jobs[-1].steps - 1


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _call_message(name: str, hook: str, payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    return {"op": "call", "name": name, "hook": hook, "payload": payload, "context": context}


def _result(hook: str, answer: dict[str, Any]) -> dict[str, Any]:
    """The checked result of a call answer; ScriptError for an error answer or a bad shape."""
    if "error" in answer:
        kind = answer["error"].get("kind", "exception")
        raise ScriptError(kind if kind in ("exception", "invalid_result", "limit") else "exception",
                          str(answer["error"].get("message", ""))[:1000])
    result = answer.get("ok")
    _validate(hook, result)
    result.setdefault("denied", None)  # the worker leaves it out when nothing was denied
    return result  # type: ignore[no-any-return]


def _outcome(hook: str, step: dict[str, Any]) -> dict[str, Any] | ScriptError:
    try:
        return _result(hook, step)
    except ScriptError as e:
        return e


class _PendingAnswer:
    """One answer frame awaited on the event loop: collected from the pipe when it is readable,
    failed by the wall clock, which restarts each time a chain's worker reports its next step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, max_bytes: int, timeout: float,
                 progress: SharedCounter, steps: int) -> None:
        self.loop, self.fd, self.max_bytes = loop, fd, max_bytes
        self.timeout, self.progress, self.steps, self.step = timeout, progress, steps, 0
        self.future: asyncio.Future[bytes] = loop.create_future()
        self.frames = FrameBuffer()
        loop.add_reader(fd, self.on_readable)
        self.timer = loop.call_later(timeout, self.expire)

    def on_readable(self) -> None:
        if self.future.done():
            return
        chunk = read_ready(self.fd)
        if chunk is None:
            return
        if not chunk:
            self.future.set_exception(FrameError("pipe closed"))
            return
        self.frames.feed(chunk)
        size = self.frames.next_size()
        if size is not None and size > self.max_bytes:
            self.future.set_exception(FrameError(f"frame of {size} bytes is over the {self.max_bytes} byte limit"))
            return
        frame = self.frames.pop()
        if frame is not None:
            self.future.set_result(frame)

    def expire(self) -> None:
        if self.future.done():
            return
        step = self.progress.get() if self.steps > 1 else 0
        if step != self.step and step < self.steps:  # the worker moved on to the next script
            self.step = step
            self.timer = self.loop.call_later(self.timeout, self.expire)
        else:
            self.future.set_exception(TimeoutError())

    def close(self) -> None:
        self.timer.cancel()
        self.loop.remove_reader(self.fd)


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
