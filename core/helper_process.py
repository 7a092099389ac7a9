"""The server's side of its helper processes (the signing helper, the sandbox workers): each
started hardened, spoken to in frames (``frames.py``), its answers awaited on the event loop,
killed and reaped; and the batcher that sends the requests of one event-loop turn in one frame.

A helper imports ``frames.py`` only, nothing of this.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .frames import PIPE_SAFE, FrameBuffer, FrameError, read_ready, write_raw_frame

if TYPE_CHECKING:
    from .shared_counter import SharedCounter

HELPER_ENV = {"PATH": "/usr/bin:/bin"}  # nothing of the server's environment (secrets, tokens, URLs)


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class HelperProcess:
    """A fresh interpreter, ``python -I -m MODULE R W ARGS...``: requests on descriptor R, answers
    on W.  Never a fork of the server, which holds keys and the store.

    Hardened from its start: isolated mode (``-I``: no ``PYTHON*`` variables, no user site, no
    current directory on ``sys.path``), an environment of PATH only, stdin/stdout/stderr on
    /dev/null, no descriptor of the server's but its two pipes (and ``pass_fds``), a session of
    its own (a signal to the server's process group or terminal stays the server's, which stops
    its helpers itself), no core file (RLIMIT_CORE 0, set before it is sent anything), and
    ``cwd`` when given (the sandbox's empty directory).  OSError if it cannot start; then nothing
    of it is left open.
    """

    def __init__(self, module: str, *args: str, pass_fds: tuple[int, ...] = (),
                 cwd: str | None = None) -> None:
        to_child_r, self.to_child = os.pipe()
        try:
            self.from_child, from_child_w = os.pipe()
        except OSError:
            _close(to_child_r, self.to_child)
            raise
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-m", module, str(to_child_r), str(from_child_w), *args],
                pass_fds=(to_child_r, from_child_w, *pass_fds), env=HELPER_ENV, cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
        except BaseException:
            _close(self.to_child, self.from_child)
            raise
        finally:
            _close(to_child_r, from_child_w)
        self._killed = False
        try:
            resource.prlimit(self.proc.pid, resource.RLIMIT_CORE, (0, 0))
        except OSError:  # a helper that could dump its memory (keys, requests) does not run
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, frame: bytes) -> asyncio.Future[None] | None:
        """One frame's JSON text to the helper, from the event loop: written at once when it fits
        in the pipe (the write cannot block; None), else from a thread (the future to await).
        OSError once the helper exited."""
        if len(frame) < PIPE_SAFE:
            write_raw_frame(self.to_child, frame)
            return None
        return asyncio.get_running_loop().run_in_executor(None, write_raw_frame, self.to_child, frame)

    def kill(self) -> None:
        """SIGKILL to its process group (whatever it started too), reaped, its pipes closed.
        Once only: the descriptor numbers may belong to other files afterwards."""
        if self._killed:
            return
        self._killed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        _close(self.to_child, self.from_child)


class AnswerReader:
    """A helper's answer pipe, read by the event loop whenever it is readable: no thread waits for
    an answer (a thread hop costs more than the whole round trip).

    ``expect`` returns the future of the next answer frame.  It fails with FrameError when the
    pipe closes, the frame is larger than ``max_bytes`` or a frame came that nobody awaited, and
    with TimeoutError when the wall clock runs out; for a request of several ``steps`` the clock
    restarts each time the helper's ``progress`` counter names a later step (a hint: it only
    gives more time).  The signing helper's reader lasts as long as the helper; a sandbox
    worker's one answer (the pool's blocking path reads the same pipe).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop, self.fd = loop, fd
        self.frames = FrameBuffer()
        self.future: asyncio.Future[bytes] | None = None
        self.max_bytes, self.timeout = 0, 0.0
        self.progress: SharedCounter | None = None
        self.steps = self.step = 0
        self.timeouts: Sequence[float] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0  # when the clock stopped by the last frame would have run out
        self.reading = True
        self.unasked = False  # a frame came while no answer was awaited
        loop.add_reader(fd, self._on_readable)

    def expect(self, max_bytes: int, timeout: float, progress: SharedCounter | None = None,
               steps: int = 1, *, timeouts: Sequence[float] | None = None) -> asyncio.Future[bytes]:
        """``timeouts``: each step's own wall clock (else ``timeout`` for every step)."""
        future = self.future = self.loop.create_future()
        self.max_bytes, self.timeout, self.progress = max_bytes, timeout, progress
        self.timeouts = timeouts
        self.steps, self.step = steps, 0
        if self.unasked:
            future.set_exception(FrameError("a frame nobody asked for"))
        elif not self.reading:
            future.set_exception(FrameError("pipe closed"))
        else:
            self.timer = self.loop.call_later(timeout, self._expire)
        return future

    def _on_readable(self) -> None:
        chunk = read_ready(self.fd)
        if chunk is None:
            return
        future = self.future
        if not chunk:
            self._stop_reading()  # a closed pipe stays readable: the loop would call this forever
            self._fail(FrameError("pipe closed"))
            return
        self.frames.feed(chunk)
        if future is None or future.done():
            self.unasked = True
            return
        size = self.frames.next_size()
        if size is not None and size > self.max_bytes:
            self._fail(FrameError(f"frame of {size} bytes is over the {self.max_bytes} byte limit"))
            return
        frame = self.frames.pop()
        if frame is not None:
            if self.timer is not None:
                self.deadline = self.timer.when()
                self.timer.cancel()
                self.timer = None
            future.set_result(frame)

    def time_left(self) -> float:
        """Seconds left on the clock of the step whose frame came last (``resume``)."""
        return self.deadline - self.loop.time()

    def resume(self) -> asyncio.Future[bytes]:
        """The next frame of the same request (the helper asked the server something mid-step
        and got its answer): the step's clock goes on from where the last frame stopped it, so
        the time the server spent answering counts against the step."""
        future = self.future = self.loop.create_future()
        if self.unasked:
            future.set_exception(FrameError("a frame nobody asked for"))
        elif not self.reading:
            future.set_exception(FrameError("pipe closed"))
        elif self.time_left() <= 0:
            future.set_exception(TimeoutError())
        else:
            self.timer = self.loop.call_at(self.deadline, self._expire)
        return future

    def _expire(self) -> None:
        self.timer = None
        if self.future is None or self.future.done():
            return
        step = self.progress.get() if self.progress is not None and self.steps > 1 else 0
        if step != self.step and 0 <= step < self.steps:  # the helper moved on to the next step
            self.step = step
            if self.timeouts is not None:
                self.timeout = self.timeouts[step]
            self.timer = self.loop.call_later(self.timeout, self._expire)
        else:
            self.future.set_exception(TimeoutError())

    def _fail(self, error: Exception) -> None:
        self._cancel_timer()
        if self.future is not None and not self.future.done() and not self.loop.is_closed():
            self.future.set_exception(error)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            if not self.loop.is_closed():
                self.loop.remove_reader(self.fd)

    def close(self) -> None:
        """Stop reading (before the pipe is closed); an answer still awaited fails."""
        if self.future is not None and not self.future.done():
            self._fail(FrameError("pipe closed"))
        if self.reading:
            self._stop_reading()


@dataclass(eq=False)
class Job:
    """A request waiting for a helper, or sent to one; ``future`` gets its answer."""

    future: asyncio.Future[Any]
    queued: float  # the loop's clock when it was queued (or queued again)


H = TypeVar("H")  # what serves a batch: a sandbox worker, the signing helper's turn
J = TypeVar("J", bound=Job)


class LoopTurnBatcher(Generic[H, J]):
    """The requests of one event-loop turn, and those that come while it waits for a helper, go
    to that helper in one frame: the fixed cost of a round trip (both processes waking, the pipe
    I/O, the loop's reader and timer) is paid once for all of them.

    The first request that finds nobody gathering on its loop gathers: it lets the loop turn
    finish, so that the requests of this turn join, then takes a free helper (``idle``) or waits
    for one (``wait``, which may answer None: stop gathering, e.g. its own request was refused
    meanwhile).  ``select`` says how many of the waiting requests go (all, or the first only);
    ``serve_one`` sends a lone request, ``serve`` several, and each settles their futures: in the
    gatherer's own task when the batch is its own request alone (no task to make), else in a
    task of its own, so that a cancelled caller cancels nobody else's answer.  ``release`` takes
    back a helper that got nothing to do.
    """

    def __init__(self, *, idle: Callable[[], H | None], wait: Callable[[J | None], Awaitable[H | None]],
                 select: Callable[[list[J]], int], serve_one: Callable[[H, J], Awaitable[None]],
                 serve: Callable[[H, list[J]], Awaitable[None]], release: Callable[[H], None]) -> None:
        self.jobs: list[J] = []  # requests not yet sent to a helper
        self.gathering: asyncio.AbstractEventLoop | None = None  # the loop on which one of them gathers
        self._idle, self._wait, self._select, self._release = idle, wait, select, release
        self._serve_one, self._serve_many = serve_one, serve
        self._tasks: set[asyncio.Task[None]] = set()  # batches served for callers other than their gatherer

    def submit(self, job: J) -> Awaitable[Any]:
        """Queue ``job``; what to await for its answer (or its error).  While another request
        gathers on this loop, that is the job's future itself (no coroutine to run)."""
        self.jobs.append(job)
        loop = job.future.get_loop()  # (asyncio.get_running_loop() costs a getpid() system call)
        if self.gathering is loop:
            return job.future
        return self._gather_and_answer(loop, job)

    async def _gather_and_answer(self, loop: asyncio.AbstractEventLoop, job: J) -> Any:
        try:
            gathered = await self._gather(loop, job)
        except BaseException:  # cancelled while waiting for a helper
            job.future.cancel()
            if any(not j.future.done() for j in self.jobs):  # the others need someone to gather them
                self.background(self.gather_and_serve())
            raise
        if gathered is not None:
            helper, jobs = gathered
            if len(jobs) == 1 and jobs[0] is job:
                await self._serve_one(helper, job)  # in the caller's own task
            else:
                self.background(self._serve(helper, jobs))
        return await job.future

    def again(self, jobs: list[J]) -> None:
        """Queue jobs again (their batch lost its helper), with a gatherer if none is at work."""
        self.jobs.extend(jobs)
        if self.gathering is None:
            self.background(self.gather_and_serve())

    async def gather_and_serve(self) -> None:
        if self.jobs and self.gathering is None:
            gathered = await self._gather(asyncio.get_running_loop())
            if gathered is not None:
                await self._serve(*gathered)

    async def _serve(self, helper: H, jobs: list[J]) -> None:
        if len(jobs) == 1:
            await self._serve_one(helper, jobs[0])
        else:
            await self._serve_many(helper, jobs)

    async def _gather(self, loop: asyncio.AbstractEventLoop,
                      own: J | None = None) -> tuple[H, list[J]] | None:
        self.gathering = loop
        try:
            await asyncio.sleep(0)  # the requests of this loop turn join
            helper = self._idle()
            if helper is None:
                helper = await self._wait(own)
        finally:
            self.gathering = None
        if helper is None:
            return None
        # (a job of another loop is one whose loop ended before it was sent: nobody awaits it)
        jobs = [j for j in self.jobs if not j.future.done() and j.future.get_loop() is loop]
        if not jobs:
            self.jobs = []
            self._release(helper)
            return None
        count = self._select(jobs)
        if count < len(jobs):
            jobs = jobs[:count]
            self.jobs = [j for j in self.jobs if not j.future.done() and not any(j is s for s in jobs)]
            if self.jobs:
                self.background(self.gather_and_serve())
        else:
            self.jobs = []
        return helper, jobs

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)
