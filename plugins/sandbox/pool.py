"""The server side of the sandbox: a pool of pre-started worker processes.

Each call takes an idle worker, sends one JSON frame, and waits for the answer with a wall-clock
timeout.  On timeout, crash, a limit or a broken frame the worker's process group is killed and
a fresh worker (with every loaded script) takes its place; the other workers keep serving.

Requests (``worker.py``): ``load`` and ``unload`` for the script set, and for calls one mode, a
batch whose jobs are chains of scripts on one hook; a lone call is a batch of one chain of one.
The workers are started, spoken to and killed through ``ssa_server.helper_process``.

What a worker says about other calls than its own is not trusted: when a worker is lost, only a
lone call's failure is pinned on its script (the calls of a lost batch go again one by one, a
lost chain's scripts one call each, see ``docs/sandbox.md``).  A worker is handed out only with
every loaded script in it, and a load reaches every worker or none.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ssa_server.frames import FrameError, LoneSurrogate, dumps, loads, read_frame, write_raw_frame
from ssa_server.helper_process import AnswerReader, HelperProcess, Job, LoopTurnBatcher
from ssa_server.shared_counter import SharedCounter

from .errors import EXIT_UNSETTLED, ChainBroken, ScriptError, ScriptRefused
from .http_allow import AllowEntry, parse_allow
from .http_broker import HttpBroker
from .limits import SandboxLimits
from .options import ScriptOptions, split_options

log = logging.getLogger("ssa_server.sandbox")

_WORKER = "ssa_server.plugins.sandbox.worker"
_LOAD_TIMEOUT_EXTRA = 5.0  # a fresh interpreter needs time to start before it can compile
# A worker's mid-step question (``context.http``), and how the server answers it: (the script the
# server sent that step to, the request, calls asked in this step so far, seconds left on the
# step's clock) -> the answer frame.
# (script, request, asked, seconds left) -> the answer to a context.http call
OnHttp = Callable[[str, Any, int, float], Coroutine[Any, Any, dict[str, Any]]]
_NO_HTTP_HERE = {"http_error": "http refused: this script has no [http] allow-list"}


class _Worker:
    """A worker process (``HelperProcess``) in an empty, read-only directory of its own, with the
    progress counter it shares with the server.  OSError if it cannot start (nothing is left)."""

    def __init__(self, limits: SandboxLimits) -> None:
        config = json.dumps({"memory_mb": limits.memory_mb, "lifetime_cpu": limits.lifetime_cpu,
                             "cpu": limits.cpu, "output_kb": limits.output_kb,
                             "max_source_kb": limits.max_source_kb, "max_depth": limits.max_depth})
        self.cwd = tempfile.mkdtemp(prefix="ssa-worker-")
        progress: SharedCounter | None = None
        try:
            os.chmod(self.cwd, 0o500)  # empty and not writable
            # The index of the step running, which the worker writes (a hint for the wall clock).
            progress, progress_fd = SharedCounter.in_memfd("ssa-sandbox-progress")
            try:
                self.process = HelperProcess(_WORKER, str(progress_fd), config, pass_fds=(progress_fd,),
                                             cwd=self.cwd)
            finally:
                os.close(progress_fd)
        except BaseException:
            if progress is not None:
                progress.close()
            shutil.rmtree(self.cwd, ignore_errors=True)
            raise
        self.progress = progress
        self.to_child, self.from_child = self.process.to_child, self.process.from_child
        self.calls = 0
        self.retiring = False  # its lifetime CPU is nearly spent: replaced when given back
        self.dead = False
        # An answer may be as large as the request plus a margin: a get result follows its input.
        self.max_answer = limits.output_kb * 1024 * 2 + 65536

    @property
    def pid(self) -> int:
        return self.process.pid

    def request(self, message: dict[str, Any], timeout: float, on_http: OnHttp | None = None,
                script: str = "") -> Any:
        """Send one request and wait for its answer; ScriptError(timeout|crashed) if none.
        ``on_http`` answers the ``context.http`` calls of a lone call's step, of ``script``
        (None: each is refused)."""
        self.calls += 1
        data = dumps(message)
        try:
            write_raw_frame(self.to_child, data)
        except OSError:
            raise ScriptError("crashed", "the script worker exited") from None
        poller = select.poll()  # not select(): a busy server's descriptors may pass FD_SETSIZE (1024)
        poller.register(self.from_child, select.POLLIN)
        deadline, asked = time.monotonic() + timeout, 0
        while True:
            if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                raise ScriptError("timeout", f"no answer within {timeout:g} s")
            try:
                answer = read_frame(self.from_child, self.max_answer + len(data))
            except FrameError as e:
                raise self._failure(e) from None
            if not (type(answer) is dict and "http" in answer and len(answer) == 1):
                return self._checked(answer)
            asked += 1  # a context.http call mid-step (see request_async)
            reply = _NO_HTTP_HERE if on_http is None else asyncio.run(
                on_http(script, answer["http"], asked, deadline - time.monotonic()))
            if time.monotonic() >= deadline:  # the wait used up the step's wall time
                raise ScriptError("timeout", f"no answer within {timeout:g} s")
            try:
                write_raw_frame(self.to_child, dumps(reply))
            except OSError:
                raise ScriptError("crashed", "the script worker exited") from None

    async def request_async(self, message: dict[str, Any], timeouts: list[float], *,
                            on_http: OnHttp | None = None, script: str = "") -> Any:
        """``request`` on the event loop: the answer is read when the pipe is readable, so no
        thread waits for it (a thread hop costs more than the whole round trip).  Each of its
        steps (the scripts of its chains) gets its own timeout: the clock restarts with the next
        step's when the worker reports it.  A ``context.http`` call mid-step (a frame
        ``{"http": ...}``) is answered by ``on_http`` for ``script`` (None: refused) while the
        step's clock runs on."""
        loop = asyncio.get_running_loop()
        steps = len(timeouts)
        self.calls += steps
        if steps > 1:
            self.progress.set(0)
        data = dumps(message)
        try:
            sending = self.process.send(data)
            if sending is not None:
                await sending
        except OSError:
            raise ScriptError("crashed", "the script worker exited") from None
        answers = AnswerReader(loop, self.from_child)  # for this answer only: ``request`` reads the pipe too
        try:
            raw = await answers.expect((self.max_answer + len(data)) * steps, timeouts[0], self.progress,
                                       steps, timeouts=timeouts if steps > 1 else None)
            asked = 0
            while raw[:8] == b'{"http":' or raw[:9] == b' {"http":':  # a context.http call mid-step
                asked += 1
                try:
                    question = loads(raw)["http"]
                except (ValueError, TypeError, KeyError):
                    raise FrameError("a malformed http request") from None
                reply = _NO_HTTP_HERE if on_http is None else await on_http(script, question, asked,
                                                                                   answers.time_left())
                try:
                    sending = self.process.send(dumps(reply))
                    if sending is not None:
                        await sending
                except OSError:  # (not around the awaits above: TimeoutError is an OSError)
                    raise FrameError("the script worker exited") from None
                raw = await answers.resume()
        except FrameError as e:
            raise await loop.run_in_executor(None, self._failure, e) from None
        except TimeoutError:
            raise ScriptError("timeout", f"no answer within {answers.timeout:g} s") from None
        finally:
            answers.close()
        try:
            decoded = loads(raw)
        except LoneSurrogate as e:
            raise ScriptError("invalid_result", str(e)) from None
        except ValueError:
            raise ScriptError("crashed", "the script worker failed: frame is not JSON") from None
        return self._checked(decoded)

    def _checked(self, answer: Any) -> dict[str, Any]:
        if not isinstance(answer, dict):
            raise ScriptError("crashed", "malformed answer from the script worker")
        if answer.get("retire") is True:
            self.retiring = True
        return answer

    def _failure(self, error: FrameError) -> ScriptError:
        """Why the worker stopped answering (it may take a moment to be reaped)."""
        code = self.process.proc.poll()
        if code is None:
            try:
                code = self.process.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        if code in (-signal.SIGXCPU, -signal.SIGKILL, -signal.SIGPROF):  # SIGPROF: a script's own cpu
            return ScriptError("limit", "CPU time limit exceeded")
        if code == EXIT_UNSETTLED:
            return ScriptError("limit", "its finalizers kept making garbage")
        if code is not None and code < 0:
            return ScriptError("crashed", f"the script worker died ({signal.Signals(-code).name})")
        if code is None and "surrogate" in str(error):
            return ScriptError("invalid_result", str(error))
        return ScriptError("crashed", f"the script worker failed: {error}")

    def kill(self) -> None:
        self.dead = True
        self.process.kill()
        self.progress.close()
        shutil.rmtree(self.cwd, ignore_errors=True)


@dataclass(frozen=True)
class _Entry:
    """A loaded revision of a script, as every worker must have it."""

    source: str
    config: dict[str, Any]
    options: ScriptOptions
    secrets: dict[str, str]  # the script's own, sent in its load frame only
    http: tuple[AllowEntry, ...] = ()  # its [http] allow-list: the server holds its HTTP calls to it
    revision: str = ""

    @classmethod
    def of(cls, name: str, source: str, config: dict[str, Any], limits: SandboxLimits, revision: str,
           secrets: dict[str, str]) -> _Entry:
        """The revision to load: ``config`` without its ``[sandbox]`` table (the sandbox's options
        for this script, ``options.py``) and its ``[http]`` allow-list.  ScriptRefused if they
        are wrong."""
        options, config = split_options(name, config, limits)
        http = parse_allow(name, config.pop("http")) if "http" in config else ()
        return cls(source, config, options, dict(secrets), http, revision)

    def message(self, name: str) -> dict[str, Any]:
        o = self.options
        message = {"op": "load", "name": name, "source": self.source, "config": self.config,
                   "keep_state": o.keep_state, "cpu": o.cpu, "memory_mb": o.memory_mb,
                   "revision": self.revision}
        if self.secrets:
            message["secrets"] = self.secrets
        return message


class SandboxPool:
    """``workers`` fresh-interpreter workers; ``load`` goes to all, ``call`` to one idle worker.

    ``on_failed(name, reason)`` is told when a script is dropped pool-wide because its top level
    failed in a replacement worker.  It is called from the thread that builds that worker,
    possibly while a ``load`` waits for the worker: it must not wait for a lock that a caller of
    ``load`` may hold.
    """

    def __init__(self, workers: int = 2, limits: SandboxLimits | None = None, *,
                 on_failed: Callable[[str, str], None] | None = None, http: HttpBroker | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.http = http or HttpBroker()
        self._scripts: dict[str, _Entry] = {}
        self._http_users: frozenset[str] = frozenset()  # scripts with an [http] allow-list (swapped whole)
        self.failed: dict[str, str] = {}  # scripts dropped pool-wide -> why
        self._on_failed = on_failed
        self._registry = threading.Lock()  # _scripts and failed (a replacement reads them in a thread)
        self._idle: collections.deque[_Worker] = collections.deque()
        # Event-loop callers waiting for a worker get one handed over, not a thread each.
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[_Worker | None]]] = \
            collections.deque()
        self._handover = threading.Lock()
        self._freed = threading.Condition(self._handover)  # blocking callers wait on it
        self._draining = False  # a load/unload is collecting every worker: waiters wait for it
        self._size = workers
        # Requests on the event loop, gathered per loop turn into one batch frame per worker.
        self._batches: LoopTurnBatcher[_Worker, _Job] = LoopTurnBatcher(
            idle=self._idle_worker, wait=self._worker_for, select=self._batch_size, serve_one=self._serve_one,
            serve=self._serve_batch, release=self._release)
        # Admission control: a call waited the timeout for a worker, and none since got one in
        # less than half of it: new calls would wait as long (refused at once while none is idle).
        self._saturated = False
        self._wary_until = 0.0  # a worker was lost lately: jobs go one per frame until then (loop clock)
        self._admin = threading.Lock()  # loads/unloads/close: one at a time
        self._closed = False
        for _ in range(workers):
            self._idle.append(_Worker(self.limits))

    # --- scripts ---
    def load(self, name: str, source: str, config: dict[str, Any], secrets: dict[str, str] | None = None,
             revision: str = "") -> list[str]:
        """Compile ``source`` in every worker, with the script's ``secrets`` (``context.secrets``);
        the hooks it defines.  ScriptRefused if it cannot load in any of them: then every worker
        keeps the previous revision (or none)."""
        if len(source.encode()) > self.limits.max_source_kb * 1024:
            raise ScriptRefused(f"{name}: larger than {self.limits.max_source_kb * 1024} bytes")
        entry = _Entry.of(name, source, config, self.limits, revision, secrets or {})
        with self._admin:
            workers = self._take_all()
            try:
                with self._registry:
                    previous = self._scripts.get(name)
                hooks: list[str] = []
                for i, worker in enumerate(workers):
                    hooks, error = self._load_into(worker, entry.message(name))
                    if error is not None:
                        if worker.dead:  # it died loading the script: its replacement has the previous set
                            workers[i] = self._fresh()
                            error = f"{name}: its top level exceeded a limit while loading ({error})"
                        self._restore(workers, i, name, previous)
                        raise ScriptRefused(error[:1000])
                with self._registry:
                    self._scripts[name] = entry
                    self.failed.pop(name, None)
                    self._http_users = frozenset(n for n, e in self._scripts.items() if e.http)
                return hooks
            finally:
                self._release_all(workers)

    def unload(self, name: str) -> None:
        with self._admin:
            with self._registry:
                self._scripts.pop(name, None)
                self.failed.pop(name, None)
            workers = self._take_all()
            try:
                for i, worker in enumerate(workers):
                    if self._load_into(worker, {"op": "unload", "name": name})[1] is not None:
                        workers[i] = self._rebuilt(worker)
            finally:
                self._release_all(workers)

    def _restore(self, workers: list[_Worker], count: int, name: str, previous: _Entry | None) -> None:
        """Put the previous revision of ``name`` (or no script of that name) back in the first
        ``count`` workers, which took the refused one; one that cannot take it is replaced."""
        message = previous.message(name) if previous is not None else {"op": "unload", "name": name}
        for i in range(count):
            if self._load_into(workers[i], message)[1] is not None:
                workers[i] = self._rebuilt(workers[i])

    def _rebuilt(self, worker: _Worker) -> _Worker:
        if not worker.dead:
            worker.kill()
        return self._fresh()

    def _load_into(self, worker: _Worker, message: dict[str, Any]) -> tuple[list[str], str | None]:
        """A load or unload in one worker: the hooks, and why it failed (None if it did not).
        A worker that did not answer is killed (``worker.dead``)."""
        try:
            answer = worker.request(message, self.limits.timeout + _LOAD_TIMEOUT_EXTRA)
        except ScriptError as e:
            worker.kill()
            return [], f"{e.kind}: {e}"
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            return [], str(error.get("message", "refused"))[:1000]
        hooks = (answer.get("ok") or {}).get("hooks") if isinstance(answer.get("ok"), dict) else None
        return [h for h in hooks if isinstance(h, str)] if isinstance(hooks, list) else [], None

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
        first out: the worker used last has the warmest caches).  After ``close``: killed."""
        if self._closed:
            worker.kill()
            return
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

    def _hand_over(self, waiter: asyncio.Future[_Worker | None], worker: _Worker) -> None:
        if waiter.done():  # the waiting request was cancelled (or gave up) meanwhile
            self._release(worker)
        else:
            waiter.set_result(worker)

    async def _acquire_async(self, until: float | None = None) -> _Worker | None:
        """An idle worker, waiting on the loop for one; None once the loop's clock passes ``until``."""
        loop = asyncio.get_running_loop()
        with self._handover:
            if self._idle:
                return self._idle.pop()
            waiter: asyncio.Future[_Worker | None] = loop.create_future()
            self._waiters.append((loop, waiter))
        timer = loop.call_at(until, _give_up, waiter) if until is not None else None
        try:
            return await waiter
        except asyncio.CancelledError:
            handed = waiter.result() if waiter.done() and not waiter.cancelled() else None
            if handed is not None:
                self._release(handed)  # handed over just as we were cancelled
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _fresh(self) -> _Worker:
        """A new worker with every loaded script.  A script whose top level fails in it is
        dropped pool-wide (``failed``, ``on_failed``) and the worker is built again without it:
        a worker is never handed out with part of the script set."""
        while True:
            worker = _Worker(self.limits)
            with self._registry:
                scripts = list(self._scripts.items())
            for name, entry in scripts:
                error = self._load_into(worker, entry.message(name))[1]
                if error is not None:
                    break
            else:
                return worker
            if not worker.dead:
                worker.kill()
            self._mark_failed(name, entry, f"its top level failed in a replacement worker ({error})"[:1000])

    def _mark_failed(self, name: str, entry: _Entry, reason: str) -> None:
        with self._registry:
            if self._scripts.get(name) is not entry:  # unloaded or replaced meanwhile
                return
            del self._scripts[name]
            self.failed[name] = reason
        if self._on_failed is not None:
            try:
                self._on_failed(name, reason)
            except Exception:  # the host's bookkeeping must not break the replacement
                pass

    def options(self, name: str) -> ScriptOptions:
        """The loaded revision's own sandbox settings (the defaults for a script not loaded)."""
        with self._registry:
            entry = self._scripts.get(name)
        return entry.options if entry is not None else ScriptOptions()

    def _timeout(self, name: str) -> float:
        """A step's wall clock: the script's own ``timeout``, else the server's (a dict lookup)."""
        entry = self._scripts.get(name)
        own = entry.options.timeout if entry is not None else None
        return own if own is not None else self.limits.timeout

    # --- context.http ---
    def uses_http(self, name: str) -> bool:
        """Whether ``name``'s revision has an ``[http]`` allow-list (its calls then go alone)."""
        return name in self._http_users

    async def _answer_http(self, name: str, request: Any, asked: int, time_left: float) -> dict[str, Any]:
        """A ``context.http`` call of the lone call's step of ``name``: the script is the one the
        server sent the step to (never the worker's say), held to that script's allow-list."""
        with self._registry:
            entry = self._scripts.get(name)
        cap = self.http.limits.calls_per_step
        if asked > cap:
            return self.http.refusal(name, f"more than {cap} calls per call of the script")
        return await self.http.perform(name, entry.http if entry is not None else (), request, time_left)

    # --- calls ---
    def call(self, name: str, hook: str, payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """Run one hook in an idle worker (blocking, thread-safe); ScriptError on any failure."""
        if self._closed:
            raise ScriptError("crashed", "the sandbox is closed")
        worker = self._take()
        try:
            try:
                message = _batch([_call_job(name, hook, payload, context)])
                answer = worker.request(message, self._timeout(name), self._answer_http, name)
                (job_answer,) = _job_answers(answer, 1)
            except ScriptError:  # no answer, or one no worker should send
                worker = self._replace(worker)
                raise
            try:
                return _call_result(hook, job_answer)
            except ScriptError as e:
                if e.kind in _WORKER_LOST:
                    worker = self._replace(worker)
                raise
        finally:
            if worker.calls >= self.limits.recycle_after or worker.retiring:
                worker = self._replace(worker)
            self._release(worker)

    async def call_async(self, name: str, hook: str, payload: dict[str, Any],
                         context: dict[str, Any]) -> dict[str, Any]:
        """``call`` on the event loop; only waiting for a busy pool or replacing a worker
        (a fresh interpreter) goes to a thread."""
        job = self._job(_call_job(name, hook, payload, context), [name],
                        lambda answer: _call_result(hook, answer))
        if name in self._http_users:
            job.alone = True  # its step may call context.http: the server must know which script asks
        return await self._batches.submit(job)

    async def call_chain_async(self, names: list[str], hook: str, payload: dict[str, Any],
                               context: dict[str, Any], *,
                               skip_errors: bool | list[bool]) -> list[dict[str, Any] | ScriptError]:
        """Several scripts' ``hook`` in one worker round trip, each on the previous one's output
        (see the worker's ``_chain``).  One outcome per script that ran: its checked result, or
        the ScriptError it ended with; ``skip_errors`` says for each script whether the chain goes
        on past its failure (its own on_error).  ChainBroken when the worker was lost (the caller runs
        the scripts again one call each: only a lone call's failure names a script)."""
        def outcomes(answer: dict[str, Any]) -> list[dict[str, Any] | ScriptError]:
            return [_outcome(hook, step) for step in _steps(answer, len(names))]

        chain = {"names": names, "hook": hook, "payload": payload, "context": context,
                 "skip_errors": skip_errors}
        return await self._batches.submit(self._job(chain, names, outcomes))

    def _job(self, message: dict[str, Any], names: list[str], check: Callable[[dict[str, Any]], Any]) -> _Job:
        """A job (a chain; a call is a chain of one) for the event loop, its answer to be
        checked while the worker is held.

        Jobs that reach the pool in the same loop turn, or while it waits for a worker, go to one
        worker together as one batch (``LoopTurnBatcher``): the first of them gathers the batch;
        the others wait for their answers.

        Admission control: a job still waiting for a worker when the timeout has passed is
        refused (ScriptError "busy"); after that, while no worker is idle, new jobs are refused
        at once, until one gets a worker within half the timeout."""
        if self._closed:
            raise ScriptError("crashed", "the sandbox is closed")
        if self._saturated and not self._idle:
            raise _busy(self.limits.timeout)
        loop = asyncio.get_running_loop()
        return _Job(loop.create_future(), loop.time(), message, len(names), check,
                    [self._timeout(n) for n in names])

    def _idle_worker(self) -> _Worker | None:
        with self._handover:
            return self._idle.pop() if self._idle else None

    async def _worker_for(self, own: _Job | None) -> _Worker | None:
        """The first worker freed, for the jobs gathered on this loop (none was idle).  Jobs that
        have waited the timeout are refused (busy) meanwhile; None when ``own`` was (the others
        get a gatherer of their own) or no job is left."""
        loop = asyncio.get_running_loop()
        worker = None
        while worker is None:
            pending = [j for j in self._batches.jobs if not j.future.done() and j.future.get_loop() is loop]
            if not pending:
                return None
            worker = await self._acquire_async(min(j.queued for j in pending) + self.limits.timeout)
            if worker is not None:
                break
            self._refuse_expired(loop)
            if own is not None and own.future.done():
                if any(not j.future.done() for j in self._batches.jobs):
                    self._batches.background(self._batches.gather_and_serve())
                return None
        return worker

    def _batch_size(self, jobs: list[_Job]) -> int:
        """How many of the gathered jobs go: all, or only the oldest while the pool is wary (a
        worker was lost lately) or when it must go alone."""
        now = jobs[0].future.get_loop().time()
        if now - jobs[0].queued < self.limits.timeout / 2:
            self._saturated = False
        if jobs[0].alone or now < self._wary_until:
            return 1
        for count, job in enumerate(jobs):  # a job that must go alone is not sent with the ones before it
            if job.alone:
                return count
        return len(jobs)

    def _refuse_expired(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for job in self._batches.jobs:
            if not job.future.done() and now - job.queued >= self.limits.timeout:
                self._saturated = True
                job.future.set_exception(_busy(self.limits.timeout))
        self._batches.jobs = [j for j in self._batches.jobs if not j.future.done()]

    def _lost(self, worker: _Worker) -> None:
        """A worker that will not answer right again: replaced, and the pool wary for a while
        (jobs go one per frame, so that a script crashing its worker takes no batch with it)."""
        self._wary_until = asyncio.get_running_loop().time() + self.limits.timeout
        self._retire_later(worker)

    async def _serve_one(self, worker: _Worker, job: _Job) -> None:
        """A batch of one, its future settled with the checked answer or the error.  The only
        failures the pool pins on a script: a worker lost during a lone job (for a chain, the
        caller runs its scripts again one call each).  A lost worker is replaced in the
        background; so is one left mid-call by a cancellation."""
        try:
            names = job.message["names"]
            answer = await worker.request_async(_batch([job.message]), job.timeouts,
                                                on_http=self._answer_http if len(names) == 1 else None,
                                                script=names[0])
            (answer,) = _job_answers(answer, 1)
        except asyncio.CancelledError:
            self._retire_later(worker)
            raise
        except Exception as e:
            error = e if isinstance(e, ScriptError) else ScriptError("crashed", f"the worker failed: {e}")
            hint = min(max(worker.progress.get(), 0), job.steps - 1)
            self._lost(worker)
            _fail(job, ChainBroken(error.kind, str(error), hint) if job.steps > 1 else error)
            return
        try:
            _settle(job, job.check(answer))
        except ScriptError as e:
            _fail(job, e)
            if e.kind in _WORKER_LOST:
                self._lost(worker)
                return
        self._give_back(worker)

    async def _serve_batch(self, worker: _Worker, jobs: list[_Job]) -> None:
        """Several jobs in one round trip, each job's future settled with its own checked answer
        or error.  When the worker is lost (or answers nonsense) every job of the batch goes
        again alone: which of them lost it is learnt only from a lone job, never from what the
        lost worker said."""
        try:
            try:
                answer = await worker.request_async(_batch([j.message for j in jobs]),
                                                    [t for j in jobs for t in j.timeouts])
                answers = _job_answers(answer, len(jobs))
            except asyncio.CancelledError:
                raise
            except Exception:
                self._lost(worker)
                now = asyncio.get_running_loop().time()
                again = [job for job in jobs if not job.future.done()]
                for job in again:
                    job.queued, job.alone = now, True
                self._batches.again(again)
                return
            lost = False
            for job, one in zip(jobs, answers):
                if job.future.done():  # its caller was cancelled
                    continue
                try:
                    _settle(job, job.check(one))
                except ScriptError as e:
                    lost = lost or e.kind in _WORKER_LOST
                    _fail(job, e)
            if lost:
                self._lost(worker)
            else:
                self._give_back(worker)
        except asyncio.CancelledError:  # the server is stopping
            for job in jobs:
                _fail(job, ScriptError("crashed", "the sandbox is closed"))
            self._retire_later(worker)
            raise

    def _retire_later(self, worker: _Worker) -> None:
        """Kill and replace a worker (lost, left mid-request, or due for recycling) in a thread:
        the caller answers without waiting for a fresh interpreter."""
        def retire() -> None:
            worker.kill()
            while not self._closed:
                try:
                    fresh = self._fresh()
                except (OSError, subprocess.SubprocessError) as e:  # no process, pipe or memfd now
                    log.error("a script worker could not be started (%s); trying again in 1 s", e)
                    time.sleep(1.0)
                    continue
                self._release(fresh)
                return

        asyncio.get_running_loop().run_in_executor(None, retire)

    def _give_back(self, worker: _Worker) -> None:
        if worker.calls >= self.limits.recycle_after or worker.retiring:  # recycled before it gets stale
            self._retire_later(worker)
        else:
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
class _Job(Job):
    """A job waiting for (or sent to) a worker: a chain of scripts on one hook (a call: of one)."""

    message: dict[str, Any]  # the job as the worker's batch takes it
    steps: int  # scripts it runs: the worker's progress counter moves once per step
    check: Callable[[dict[str, Any]], Any]  # the checked result of its answer; ScriptError if bad
    timeouts: list[float]  # each step's wall clock (the script's own timeout, else the server's)
    alone: bool = False  # must go in a frame of its own (its batch lost its worker)


def _settle(job: _Job, value: Any) -> None:
    if not job.future.done():
        job.future.set_result(value)


def _fail(job: _Job, error: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(error)


def _give_up(waiter: asyncio.Future[_Worker | None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _busy(timeout: float) -> ScriptError:
    return ScriptError("busy", f"no script worker free within {timeout:g} s")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _call_job(name: str, hook: str, payload: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """A call: a chain of one script."""
    return {"names": [name], "hook": hook, "payload": payload, "context": context}


def _batch(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """The one request frame of calls: ``{"op": "batch", "jobs": [chain, ...]}``."""
    return {"op": "batch", "jobs": jobs}


def _objects(value: Any, fewest: int, most: int) -> list[dict[str, Any]] | None:
    """``value`` if it is a list of ``fewest`` to ``most`` JSON objects (as the worker's answers
    and steps must be), else None."""
    if type(value) is not list or not fewest <= len(value) <= most:
        return None
    for item in value:
        if type(item) is not dict:
            return None
    return value


def _job_answers(answer: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """A batch answer's one answer per job; ScriptError (the worker is lost) if it is not that."""
    answers = answer.get("answers")
    if count == 1 and type(answers) is list and len(answers) == 1 and type(answers[0]) is dict:
        return answers  # (a lone job: the one check inline)
    answers = _objects(answers, count, count)
    if answers is None:
        raise ScriptError("crashed", "malformed batch answer from the script worker")
    return answers


def _steps(answer: dict[str, Any], most: int) -> list[dict[str, Any]]:
    """A chain's step answers: one per script that ran, at least one, at most ``most``."""
    steps = _objects(answer.get("steps"), 1, most)
    if steps is None:
        raise ScriptError("crashed", "malformed chain answer from the script worker")
    return steps


def _call_result(hook: str, answer: dict[str, Any]) -> dict[str, Any]:
    """The checked result of a call (a chain of one); ScriptError for a failure or a bad shape."""
    steps = answer.get("steps")
    if type(steps) is not list or len(steps) != 1 or type(steps[0]) is not dict:
        raise ScriptError("crashed", "malformed chain answer from the script worker")
    return _result(hook, steps[0])


def _result(hook: str, answer: dict[str, Any]) -> dict[str, Any]:
    """The checked result of a step answer; ScriptError for an error answer or a bad shape."""
    if "error" in answer:
        kind = answer["error"].get("kind", "exception")
        raise ScriptError(kind if kind in ("exception", "invalid_result", "limit") else "exception",
                          str(answer["error"].get("message", ""))[:1000])
    result = _validate(hook, answer.get("ok"))
    result.setdefault("denied", None)  # the worker leaves it out when nothing was denied
    return result


def _outcome(hook: str, step: dict[str, Any]) -> dict[str, Any] | ScriptError:
    try:
        return _result(hook, step)
    except ScriptError as e:
        return e


def _validate(hook: str, result: Any) -> dict[str, Any]:
    """``result``, its shape checked again by the server: the worker is not trusted."""
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
    if hook == "create" and not (isinstance(result.get("header"), dict)
                                 and isinstance(result.get("claims"), dict)):
        raise bad("create must leave header and claims as objects")
    if hook == "get" and not (isinstance(result.get("ssa_list"), list)
                              and all(isinstance(i, dict) for i in result["ssa_list"])):
        raise bad("get must leave a list of objects")
    return result
