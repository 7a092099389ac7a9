"""The store's durable journal: an append-only file of JSON lines, each change one line.

The journal knows lines and positions, not what the lines mean: the store that keeps the
records (``JournalState``, the TinyDB store) applies each line read and undoes each change
whose write failed.  See ``docs/store.md``.

- Durable: ``commit`` returns after its lines are written whole and fsync'ed.  Concurrent writers
  share one fsync (group commit by a flusher thread).  A batch that fails (a short write, ENOSPC,
  EIO) is truncated away and rolled back, with every change queued behind it; the journal then
  refuses writes (``StoreDegraded``, 503) and probes the disk until writing works again.
- Canonical: a line is proven to read back as the entry it was made from (``entries.proven``).
- Crash-safe: a torn last line is cut at open (and before any append); compaction writes,
  fsyncs and verifies a temp file before it renames it over the journal (``compaction``).
- Checked: a journal shorter than its published end (``store.seq``) does not open; a journal
  deleted or replaced under the server stops its writes.
- Multi-process: the server (``exclusive``) holds ``server.lock``; CLI processes append under
  ``flock`` on the journal, publish its new end in ``store.seq`` (a ``SharedCounter``), and every
  process applies the lines others appended before each call (``catch_up``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson

from ..shared_counter import SharedCounter
from . import checks, compaction, datadir, entries
from .checks import JournalProblem
from .datadir import JOURNAL, SEQ, TEMP, Flock
from .errors import StoreDegraded, StoreUnavailable

log = logging.getLogger("ssa_server.store")

_COMPACT_MIN_GARBAGE = 10_000  # lines of garbage before the cleaner compacts (at open: 1,000)
_CHUNK = 8 << 20  # replay reads the journal in chunks: the file is never in memory whole
_PROBE_INTERVAL = 1.0  # seconds between two probes of a degraded journal
LAZY_DELAY = 0.005  # seconds a lazy commit waits at most for another commit to share its fsync

# One queued write: (journal bytes, loop, future of the caller, the state's changes to undo on failure).
_Write = tuple[bytes, asyncio.AbstractEventLoop, "asyncio.Future[None]", Any]


class JournalState(Protocol):
    """What the journal needs from the store whose changes it records."""

    def reset(self) -> None:
        """Forget every record (a full replay follows)."""

    def apply(self, table: str, doc_id: str, doc: dict[str, Any] | None) -> None:
        """A line read from the journal: ``doc`` stored under ``doc_id`` (None: deleted).
        ValueError, KeyError or TypeError: not a record of a known table (the line is corrupt)."""

    def undo(self, changes: Any) -> None:
        """Take back the changes of one write whose batch failed (called newest first)."""

    def live(self) -> int:
        """How many records are stored (the lines a compacted journal would hold)."""

    def snapshot(self) -> compaction.Snapshot:
        """The records as they are now, unchanged by later writes (for a compaction)."""


class _Compaction:
    """A compaction queued behind the writes whose changes its snapshot holds (see ``_flush``)."""

    __slots__ = ("snapshot", "offset", "loop", "future")

    def __init__(self, snapshot: compaction.Snapshot, offset: int, loop: asyncio.AbstractEventLoop) -> None:
        self.snapshot, self.offset, self.loop = snapshot, offset, loop
        self.future: asyncio.Future[bool] = loop.create_future()


class Journal:
    def __init__(self, data_dir: Path | str, state: JournalState, *, exclusive: bool = True,
                 accept_journal_loss: bool = False, compact_retry_interval: float = 60.0) -> None:
        """``exclusive``: the server's journal (``server.lock``); else a CLI process's.
        ``accept_journal_loss``: open a journal shorter than its published end (the operator's
        ``serve --accept-journal-loss``).  ``compact_retry_interval``: seconds before a compaction
        that failed (no room) is tried again."""
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / JOURNAL
        self.exclusive = exclusive
        self.accept_journal_loss = accept_journal_loss
        self.compact_retry_interval = compact_retry_interval
        self._state = state
        self._writer = uuid.uuid4().hex[:12]  # tags our journal lines so replay skips our own
        self._fd = -1
        self._inode = 0
        self._end: SharedCounter | None = None  # the journal's end after the last complete append (store.seq)
        self._offset = 0
        self._lines = 0
        self._lock_fd = -1
        self._pending: list[_Write | _Compaction] = []
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._offset_lock = threading.Lock()  # _fd, _offset, _lines: the event loop and the flusher move them
        self._wake = threading.Event()
        self._closing = False
        self._flusher: threading.Thread | None = None
        # Degraded: (public reason, message).  Writes are refused until a probe succeeds.
        self.degraded: tuple[str, str] | None = None
        self._rollback_due = False  # a failed batch's rollback is scheduled on the loop
        self._next_probe = 0.0
        self._truncate_to: int | None = None  # a failed batch whose bytes could not be cut yet
        self._compact_after = 0.0

    # --- open / close ---
    def open(self) -> None:
        """Open, check and replay the journal.  Every failure of the data dir is one
        StoreUnavailable whose message is one line (the CLI prints it as it is)."""
        try:
            self._open_files()
            self._replay_and_check()
        except OSError as e:
            self._close_files()
            where = f" ({e.filename})" if e.filename and str(e.filename) != str(self.data_dir) else ""
            message = f"the data dir {self.data_dir} cannot be used: {e.strerror}{where}"
            raise StoreUnavailable(message) from None
        except BaseException:
            self._close_files()
            raise
        if self.exclusive:
            if self._garbage() > max(self._state.live(), 1000):
                self._compact(self._state.snapshot(), self._offset)  # a failure only logs
            try:
                self._probe()
            except (OSError, JournalProblem) as e:
                # Serve reads; writes wait for room.  Not logged here: a start that fails for it
                # (no keys yet) says so in its one line, a start that goes on logs the store DOWN.
                self.degraded = self._describe(e)
        self._flusher = threading.Thread(target=self._flush_loop, name="ssa-store-flusher", daemon=True)
        self._flusher.start()

    async def close(self) -> None:
        if self._flusher is not None:
            self._closing = True
            self._wake.set()
            await asyncio.to_thread(self._flusher.join, 10)
            self._flusher = None
        self._close_files()

    def _close_files(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._end is not None:
            self._end.close()
            self._end = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _open_files(self) -> None:
        datadir.prepare(self.data_dir)
        if self.exclusive:
            self._lock_fd = datadir.take_server_lock(self.data_dir)
            temp = self.data_dir / TEMP
            if temp.exists():  # a compaction was interrupted: the journal is the old one, whole
                temp.unlink()
                log.info("%s: removed the temp file of an interrupted compaction", temp)
        self._end = SharedCounter.in_file(self.data_dir / SEQ)
        published = self._end.get()
        exists = self.path.exists()
        if not exists and published > 0 and not self.accept_journal_loss:
            raise StoreUnavailable(checks.missing(self.path, published))
        self._open_journal(create=not exists)

    def _open_journal(self, *, create: bool = False) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._fd = datadir.open_journal(self.path, create=create)
        self._inode = os.fstat(self._fd).st_ino

    def _replay_and_check(self) -> None:
        """Replay, then, under the journal's flock: check the length against the published end
        and cut a torn tail (a write that was never acknowledged)."""
        self._replay_all()  # unlocked: the server's writes go on meanwhile
        with self._locked_current_journal():
            if os.fstat(self._fd).st_ino != self._inode:  # compacted by the server meanwhile
                self._inode = os.fstat(self._fd).st_ino
                self._replay_all()
            else:
                self._read_new_lines(skip_own=False)
            assert self._end is not None
            published = self._end.get()
            if self._offset < published:
                missing = published - self._offset
                if not self.accept_journal_loss:
                    raise StoreUnavailable(checks.shorter(self.path, missing, published))
                log.warning("%s: %d bytes of acknowledged records are missing; accepted (--accept-journal-"
                            "loss): the store goes on with what is left", self.path, missing)
            size = os.fstat(self._fd).st_size
            if self._offset < size:
                os.ftruncate(self._fd, self._offset)
                os.fsync(self._fd)
                log.warning("%s: cut a torn last line (%d bytes after the last complete line, left by a "
                            "writer that died mid-write; it was never acknowledged)", self.path,
                            size - self._offset)
            if self.exclusive:  # (also the end an accepted loss leaves: the next open is normal)
                self._end.set(self._offset)
                self._end.flush()

    # --- replay ---
    def _replay_all(self) -> None:
        self._state.reset()
        self._offset = self._lines = 0
        # The cyclic GC would rescan every record read so far, again and again (replay takes
        # several times longer with it, bench/README.md).  Replayed records hold no cycles.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._read_new_lines(skip_own=False)
        finally:
            if enabled:
                gc.enable()

    def catch_up(self) -> None:
        """Apply lines other processes appended since our last look (cheap when there are none)."""
        if not self.exclusive:
            try:
                if os.stat(self.path).st_ino != self._inode:  # compacted by the server: start over
                    self._open_journal()
                    self._replay_all()
                    return
            except FileNotFoundError:
                raise StoreUnavailable(f"{self.path} is missing (deleted while this command ran)") from None
        elif self._end is not None and self._end.get() <= self._offset:
            return  # nobody appended since our last look (the common case: no syscall)
        self._read_new_lines()

    def _read_new_lines(self, *, skip_own: bool = True) -> None:
        """Apply the complete lines past our offset, chunk by chunk, skipping our own lines.

        Our own batches are normally skipped without a read: the flusher moves the offset past
        a batch it appended right at it (``_write_batch``).
        """
        with self._offset_lock:
            size = os.fstat(self._fd).st_size
            want = _CHUNK
            while self._offset < size:
                data = os.pread(self._fd, min(want, size - self._offset), self._offset)
                end = data.rfind(b"\n") + 1
                if not end:
                    if len(data) < want:
                        return  # a line still being written (or torn): not ours to apply yet
                    want *= 2  # one line longer than a chunk
                    continue
                self._apply_lines(data[:end], skip_own=skip_own)
                self._offset += end
                want = _CHUNK

    def _apply_lines(self, data: bytes, *, skip_own: bool) -> None:
        for number, line in enumerate(data.splitlines(), start=self._lines + 1):
            self._lines += 1
            if not line.strip():
                continue
            try:
                entry = entries.decode(line)
                if type(entry) is not dict:
                    raise ValueError
                if skip_own and entry.get("w") == self._writer:
                    continue
                name, doc_id = entry["t"], entry["id"]
                if type(name) is not str or type(doc_id) is not str:
                    raise ValueError
                doc = entry.get("doc")
                if "doc" in entry and type(doc) is not dict:
                    raise ValueError
                self._state.apply(name, doc_id, doc)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise StoreUnavailable(f"{self.path}: line {number} is corrupt; the store cannot be read") \
                    from None

    # --- writing ---
    def line(self, table: str, doc_id: str, doc: dict[str, Any] | None) -> bytes:
        """The journal line of a change (``doc`` None: a delete); UnstorableValue if it would
        not read back as given (nothing has changed yet)."""
        entry: dict[str, Any] = {"w": self._writer, "t": table, "id": doc_id}
        if doc is not None:
            entry["doc"] = doc
        return entries.proven(entry)

    async def writable(self) -> None:
        """Refuse a write at once while the store is degraded (after a probe, when one is due)."""
        if self.degraded is not None:
            await self._recover()
            if self.degraded is not None:
                raise StoreDegraded(self.degraded[1], self.degraded[0])

    async def commit(self, lines: Iterable[bytes], changes: Any, *, lazy: bool = False) -> None:
        """Append ``lines`` durably (group commit): returns once they are written whole and
        fsync'ed.  The state has applied ``changes`` already; if the batch fails they are undone
        (``JournalState.undo``) and this raises StoreDegraded.  ``lazy``: the lines wait (at
        most ``LAZY_DELAY``) for the next commit to be written and fsync'ed with it, instead
        of a batch of their own (the audit trail's events ride the requests' writes)."""
        data = b"".join(lines)
        if not data:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._pending_lock:
            self._pending.append((data, loop, future, changes))
        if lazy:
            loop.call_later(LAZY_DELAY, self._wake.set)
        else:
            self._wake.set()
        await future

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait()
            with self._pending_lock:
                self._wake.clear()
                if self.degraded is None:
                    batch, self._pending = self._pending, []
                else:
                    batch = []  # nothing is written while degraded; the rollback takes what is queued
            if batch:
                self._flush(batch)
            elif self._closing:
                return

    def _flush(self, batch: list[_Write | _Compaction]) -> None:
        """Write the batch in order; a compaction runs where it was queued (its snapshot holds
        the changes of every write before it, and of none after it)."""
        i = 0
        while i < len(batch):
            item = batch[i]
            if isinstance(item, _Compaction):
                done = self._compact(item.snapshot, item.offset)
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                    item.loop.call_soon_threadsafe(_set_result, item.future, done)
                i += 1
                continue
            writes = [item]  # the writes up to the next compaction
            j = i + 1
            while j < len(batch):
                entry = batch[j]
                if isinstance(entry, _Compaction):
                    break
                writes.append(entry)
                j += 1
            error = self._write_batch(writes)
            if error is not None:
                # Nothing of this batch is acknowledged, and what was queued behind it goes too:
                # its changes were applied on top of the failed ones.
                with contextlib.suppress(RuntimeError):
                    item[1].call_soon_threadsafe(self._roll_back, batch[i:], error)
                return
            i = j

    def _write_batch(self, batch: list[_Write]) -> StoreDegraded | None:
        data = b"".join(entry[0] for entry in batch)
        error: StoreDegraded | None = None
        try:
            with self._write_lock, self._locked_current_journal():
                assert self._end is not None
                st = os.fstat(self._fd)
                problem = self._journal_problem(st)  # per batch, not per request
                if problem is not None:
                    raise problem
                start = st.st_size
                if start != self._end.get():  # rare: a writer died mid-line, or before publishing its end
                    start = self._cut_torn_tail(start)
                try:
                    entries.write_all(self._fd, data)
                    os.fsync(self._fd)
                except OSError:
                    self._truncate_back(start)
                    raise
                if self.exclusive:
                    with self._offset_lock:
                        if self._offset == start:  # nothing unread before our batch: skip re-reading it
                            self._offset = start + len(data)
                            self._lines += data.count(b"\n")
                self._end.set(start + len(data))
        except (OSError, JournalProblem) as e:
            error = self._degrade_for(e)
        if error is None:
            by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
            for _, loop, future, _ in batch:
                by_loop.setdefault(loop, []).append(future)
            for loop, futures in by_loop.items():  # one wake-up per loop for the whole batch
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, futures, None)
        return error

    def _truncate_back(self, start: int) -> None:
        """Cut a failed batch's bytes (whatever part of it reached the file)."""
        try:
            os.ftruncate(self._fd, start)
            os.fsync(self._fd)
            self._truncate_to = None
        except OSError:
            self._truncate_to = start  # the probe cuts it before the store writes again

    def _cut_torn_tail(self, size: int) -> int:
        """Under the journal's flock: the end of the last complete line, after cutting what
        follows it (a fragment a writer left when it died mid-write; never acknowledged)."""
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return size  # complete lines a writer appended before it died, without publishing
        end = self._last_line_end(size)
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        log.warning("%s: cut a torn last line (%d bytes after the last complete line, left by a writer that "
                    "died mid-write; it was never acknowledged)", self.path, size - end)
        return end

    def _last_line_end(self, size: int) -> int:
        pos = size
        while pos > 0:
            n = min(1 << 16, pos)
            i = os.pread(self._fd, n, pos - n).rfind(b"\n")
            if i >= 0:
                return pos - n + i + 1
            pos -= n
        return 0

    @contextlib.contextmanager
    def _locked_current_journal(self) -> Iterator[None]:
        lock = self._lock_current_journal()
        try:
            yield
        finally:
            lock.release()

    def _lock_current_journal(self) -> Flock:
        """Hold the flock of the file that is the journal now.  A CLI process may still have
        the file the server compacted away open: it moves to the new file (the event-loop side
        notices the inode change and replays) and locks that one, never appending unlocked."""
        while True:
            lock = Flock(self._fd)
            lock.acquire()
            try:
                if self.exclusive or os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    return lock
            except BaseException:
                lock.release()
                raise
            lock.release()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            with self._offset_lock:
                old, self._fd = self._fd, fd
            os.close(old)

    # --- degraded mode: a write failed or the journal is not ours any more ---
    def _journal_problem(self, st: os.stat_result) -> JournalProblem | None:
        assert self._end is not None
        return checks.identity_problem(self.path, st, self._fd, self._end.get(), self.exclusive)

    def _describe(self, cause: OSError | JournalProblem) -> tuple[str, str]:
        return checks.describe(cause, self.path, self.exclusive, _PROBE_INTERVAL)

    def _degrade_for(self, cause: OSError | JournalProblem) -> StoreDegraded:
        return self._degrade(*self._describe(cause))

    def _degrade(self, reason: str, detail: str) -> StoreDegraded:
        """Refuse writes from now on; one ERROR line per cause (the server's, not a CLI's: a
        CLI command reports the failure as its one line)."""
        with self._pending_lock:  # the flusher takes nothing more
            self._rollback_due = True
            new_cause = self.degraded is None or self.degraded[0] != reason
            self.degraded = (reason, detail)
            self._next_probe = time.monotonic() + _PROBE_INTERVAL
        if new_cause and self.exclusive:
            log.error("%s", detail)
        return StoreDegraded(detail, reason)

    def _roll_back(self, failed: list[_Write | _Compaction], error: StoreDegraded) -> None:
        """On the event loop: undo, newest first, a failed batch and every change queued behind
        it; each of their callers gets ``error`` (503)."""
        with self._pending_lock:
            queued, self._pending = self._pending, []
            self._rollback_due = False
        entries = failed + queued
        for entry in reversed(entries):
            if not isinstance(entry, _Compaction):
                self._state.undo(entry[3])
        for entry in entries:
            if isinstance(entry, _Compaction):
                _set_result(entry.future, False)
            else:
                _, loop, future, _ = entry
                if loop is asyncio.get_running_loop():
                    _settle([future], error)
                else:
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(_settle, [future], error)

    async def _recover(self) -> None:
        """Probe (at most every _PROBE_INTERVAL, in a thread) and accept writes again if it works."""
        if self.degraded is None or self._rollback_due or time.monotonic() < self._next_probe:
            return
        self._next_probe = time.monotonic() + _PROBE_INTERVAL
        try:
            await asyncio.to_thread(self._probe)
        except (OSError, JournalProblem) as e:
            self._degrade_for(e)
            self._rollback_due = False  # nothing was queued: writes were refused before they were applied
            return
        if self.exclusive:
            log.info("%s can be written again: the store accepts writes", self.path)
        self.degraded = None

    def _probe(self) -> None:
        """Raise unless a write can succeed now: the journal is ours, a failed batch's bytes are
        cut, and a small file in the data dir can be written, fsync'ed and removed."""
        with self._write_lock, self._locked_current_journal():
            assert self._end is not None
            problem = self._journal_problem(os.fstat(self._fd))
            if problem is not None:
                raise problem
            st = os.fstat(self._fd)
            if self._truncate_to is not None:
                if st.st_size > self._truncate_to >= self._end.get():
                    os.ftruncate(self._fd, self._truncate_to)
                    os.fsync(self._fd)
                elif st.st_size > self._truncate_to:  # another process appended and published after them
                    log.warning("%s: the bytes of a failed batch (from offset %d) could not be cut and are "
                                "followed by other writes now: they stay, and a restart replays them",
                                self.path, self._truncate_to)
                self._truncate_to = None
            datadir.write_probe(self.data_dir)

    # --- compaction ---
    @property
    def lines(self) -> int:
        """Lines read or written (each counted once): what the journal holds, live or not."""
        return self._lines

    def _garbage(self) -> int:
        return self._lines - self._state.live()

    async def compact_if_due(self) -> None:
        """Compact when garbage outweighs the live records (the server only, not while degraded,
        not again before ``compact_retry_interval`` after a failure)."""
        if (self.exclusive and self._garbage() > max(self._state.live(), _COMPACT_MIN_GARBAGE)
                and self.degraded is None and time.monotonic() >= self._compact_after):
            await self._compact_soon()

    async def compact(self) -> bool:
        """Compact now (``Store.compact_keys``): the exclusive owner only, not while degraded."""
        if not self.exclusive or self.degraded is not None:
            return False
        return await self._compact_soon()

    async def _compact_soon(self) -> bool:
        """Queue a compaction behind the writes applied so far (exclusive owner only)."""
        loop = asyncio.get_running_loop()
        with self._offset_lock:
            offset = self._offset
        marker = _Compaction(self._state.snapshot(), offset, loop)  # in the same loop step as the append
        with self._pending_lock:
            self._pending.append(marker)
        self._wake.set()
        return await marker.future

    def _compact(self, snapshot: compaction.Snapshot, offset: int) -> bool:
        """Rewrite the journal as one line per record of ``snapshot`` (the state at ``offset`` of
        the journal and every write queued before the compaction), followed by what other
        processes appended after ``offset``.

        The temp file is written whole, fsync'ed and read back (length and CRC-32) before it is
        renamed over the journal; the directory is fsync'ed after.  Without room (or any other
        failure) the temp file is removed, the old journal stays, one WARNING is logged and the
        next try waits ``compact_retry_interval``.  Returns whether the journal was compacted.
        """
        tmp = self.data_dir / TEMP
        try:
            with self._write_lock:
                lock = self._lock_current_journal()  # no other process appends meanwhile
                try:
                    old = self._compact_locked(tmp, snapshot, offset)
                except BaseException:
                    lock.release()
                    raise
            os.close(old)  # releases the old file's flock: a waiting CLI writer moves to the new file...
            Flock(self._fd).release()  # ...and takes the new file's flock once we let it go
            return True
        except (OSError, compaction.Unverified, ValueError, TypeError) as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._compact_after = time.monotonic() + self.compact_retry_interval
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            log.warning("%s: compaction failed (%s): the store keeps serving on the old journal and tries "
                        "again in %g s at the earliest", self.path, why, self.compact_retry_interval)
            return False

    def _compact_locked(self, tmp: Path, snapshot: compaction.Snapshot, offset: int) -> int:
        """The compaction under the old journal's flock; returns the old journal's descriptor
        (closing it releases that flock; the new journal's is released after it)."""
        assert self._end is not None
        end = os.fstat(self._fd).st_size
        if end > offset and os.pread(self._fd, 1, end - 1) != b"\n":
            end = self._last_line_end(end)  # a torn fragment of a dead writer is not copied
        # The temp file's descriptor becomes the journal's (nothing can fail after the rename),
        # locked from the start: a CLI process that opens the new journal waits until it is ours.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            own = b'{"w":' + orjson.dumps(self._writer) + b","
            length, tail = compaction.write_compacted(fd, snapshot, self._fd, offset, end, own, _CHUNK)
            inode = os.fstat(fd).st_ino
            # Publish an end no longer than either file before the rename, so that a crash
            # between the two raises no false alarm at the next open; msync: not later.
            self._end.set(min(length, end))
            self._end.flush()
            # Under _offset_lock: the event loop (catch-up, readiness) sees the old file with its
            # offset or the new one with its own, never the path of one and the descriptor of the other.
            with self._offset_lock:
                # What the loop had read of the old file past the snapshot maps into the copied tail.
                moved = tail.moved(self._offset)
                try:
                    os.replace(tmp, self.path)
                except OSError:
                    self._end.set(end)
                    raise
                old, self._fd, self._inode = self._fd, fd, inode
                self._offset, self._lines = moved
                self._end.set(length)
        except BaseException:
            os.close(fd)
            raise
        try:
            datadir.fsync_dir(self.data_dir)
        except OSError as e:  # the rename is done; only its durability across a power loss is in doubt
            log.warning("%s: fsync of the data dir after compaction failed: %s", self.path, e.strerror)
        return old

    # --- health ---
    async def check(self) -> None:
        """Readiness: StoreDegraded (with its reason) while writes are refused; the journal's
        identity is checked here too, and a due probe runs."""
        if self._fd < 0 or self._flusher is None or not self._flusher.is_alive():
            raise StoreUnavailable("the store is not open")
        if self.exclusive and self.degraded is None:
            with self._offset_lock:  # not in the middle of a compaction's rename
                problem = self._journal_problem(os.fstat(self._fd))
            if problem is not None:
                self._roll_back([], self._degrade(problem.reason, problem.detail))  # what is queued fails too
        if self.degraded is not None:
            await self.writable()
        self.catch_up()


def _settle(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _set_result(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)
