"""The embedded store: TinyDB tables kept in memory over an fsync'ed, append-only JSON-lines journal.

Why not stock TinyDB storage: ``JSONStorage`` rewrites and re-reads the whole file on every
operation (20 ms per insert at 1k documents, 2 s at 100k) and a crash mid-write corrupts it;
even ``MemoryStorage`` rebuilds the whole table dict on every write.  Here TinyDB holds the
tables (dicts of documents, queryable with ``Query``), but writes change the documents in place
and append one line per change to ``store.jsonl``; indexes on ``org_id`` and ``creator_id``
keep lookups from scanning.  See ``docs/store.md``.

- Durable: a write returns after its line is written whole and fsync'ed.  Concurrent writers
  share one fsync (group commit by a flusher thread).  A write that fails (a short write, ENOSPC,
  EIO) is truncated away and rolled back in memory with every change queued behind it; the
  store then refuses writes (503) and probes the disk until writing works again.
- Canonical: a line is proven to read back as the record it was made from before it is queued.
- Crash-safe: a torn last line is cut at open (and before any append); compaction writes,
  fsyncs and verifies a temp file before it renames it over the journal.
- Checked: a journal shorter than its published end (``store.seq``) does not open; a journal
  deleted or replaced under the server stops its writes.
- Multi-process: the server (``exclusive``) holds ``server.lock``; CLI processes append under
  ``flock`` on the journal, and every process replays lines others appended before each call.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import fcntl
import gc
import json
import logging
import os
import stat
import sys
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
from tinydb import TinyDB
from tinydb.storages import MemoryStorage
from tinydb.table import Table

from .shared_counter import SharedCounter
from .ssa import ACTIVE, EXPIRED, LIST_FIELDS, REVOKED, USED, SsaRecord
from .store import (clone, ClientRecord, KeyRecord, StoreDegraded, StoreLocked, StoreUnavailable,
                    TemplateRecord, UnstorableValue)

log = logging.getLogger("ssa_server.store")

JOURNAL = "store.jsonl"
TEMP = "store.jsonl.tmp"  # a compaction in progress (removed at open when one was interrupted)
LOCK = "server.lock"
SEQ = "store.seq"
PROBE = ".write-probe"  # written, fsync'ed and removed to learn whether the disk takes writes again
TABLES = ("ssa", "clients", "keys", "templates")
_ID_FIELD = {"ssa": "jti", "clients": "client_id", "keys": "kid", "templates": "name"}
_COMPACT_MIN_GARBAGE = 10_000
_CHUNK = 8 << 20  # replay reads the journal in chunks: the file is never in memory whole
_PROBE_INTERVAL = 1.0  # seconds between two probes of a degraded store
_PROBE_SIZE = 16 << 10  # a few pages: the probe needs real room, more than a freed partial page
_ACCEPT_FLAG = "ssa-server serve --accept-journal-loss"

# One change in memory and how to take it back: (table, id, document before, document after).
_Change = tuple[str, str, Any, Any]
# One queued write: (journal bytes, loop, future of the caller, its changes).
_Write = tuple[bytes, asyncio.AbstractEventLoop, "asyncio.Future[None]", list[_Change]]


class _LiveTable(Table):
    """A TinyDB table whose documents are read from the live in-memory dict (no copy, no rebuild)."""

    document_id_class = str  # type: ignore[assignment]

    def _read_table(self) -> dict[str, Any]:
        return self._storage.read()[self.name]  # type: ignore[no-any-return]


class _Db(TinyDB):
    table_class = _LiveTable


def _encode(entry: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The journal line of ``entry``, and the entry as that line holds it."""
    try:
        return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE), entry
    except TypeError:
        # An integer beyond 64 bits (orjson refuses it, and would read it back as a float):
        # the line is written by the stdlib and flagged to be read back by it.
        entry = dict(entry, j=1)
        text = json.dumps(entry, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode() + b"\n", entry


def _load(line: bytes) -> Any:
    entry = orjson.loads(line)
    return json.loads(line) if type(entry) is dict and entry.get("j") else entry


def _dump(entry: dict[str, Any]) -> bytes:
    """The journal line of ``entry``, proven to read back (``_load``) as ``entry``: what the store
    acknowledges is what replay returns (orjson writes NaN as null, the stdlib turns int keys
    into strings; both are refused here, before anything is changed)."""
    try:
        line, written = _encode(entry)
        same = _load(line) == written
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError: text that is not UTF-8
        same = False
    if not same:
        raise UnstorableValue("a value would not read back from the journal as it was given "
                              "(NaN or Infinity, a key that is not a string, text that is not UTF-8)")
    return line


_intern = sys.intern
_SHARED_STRINGS = ("org_id", "status", "creator_id", "iss", "software_id")


def _compact_ssa(doc: dict[str, Any]) -> dict[str, Any]:
    """Share the strings that repeat across SSAs (about a third less memory at 100k SSAs)."""
    for name in _SHARED_STRINGS:
        value = doc.get(name)
        if type(value) is str:
            doc[name] = _intern(value)
    for name in LIST_FIELDS:
        doc[name] = [_intern(v) if type(v) is str else v for v in doc[name]]
    return doc


def _copy_ssa(doc: dict[str, Any]) -> Any:
    """A caller's copy of a stored SSA: its only mutable parts are its lists and ``custom``."""
    out = doc.copy()
    for name in LIST_FIELDS:
        out[name] = list(doc[name])
    out["custom"] = clone(doc["custom"]) if doc["custom"] else {}
    return out


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written: a write may be short without raising (the
    disk filled up in the middle); the next one then raises (ENOSPC)."""
    n = os.write(fd, data)
    if n == len(data):
        return
    view = memoryview(data)[n:]
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


class _JournalProblem(Exception):
    """The journal is not the file the store writes (deleted, replaced) or lost acknowledged bytes."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Unverified(Exception):
    """A compacted temp file that does not read back as it was written."""


class _Compaction:
    """A compaction queued behind the writes whose changes its snapshot holds (see ``_flush``)."""

    __slots__ = ("snapshot", "offset", "loop", "future")

    def __init__(self, snapshot: dict[str, dict[str, Any]], offset: int, loop: asyncio.AbstractEventLoop) -> None:
        self.snapshot, self.offset, self.loop = snapshot, offset, loop
        self.future: asyncio.Future[bool] = loop.create_future()


class TinyStore:
    def __init__(self, data_dir: Path | str, *, exclusive: bool = True, accept_journal_loss: bool = False,
                 compact_retry_interval: float = 60.0) -> None:
        """``accept_journal_loss``: open a journal shorter than its published end (the operator's
        ``serve --accept-journal-loss``).  ``compact_retry_interval``: seconds before a compaction
        that failed (no room) is tried again."""
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / JOURNAL
        self.exclusive = exclusive
        self.accept_journal_loss = accept_journal_loss
        self.compact_retry_interval = compact_retry_interval
        self._writer = uuid.uuid4().hex[:12]  # tags our journal lines so replay skips our own
        self._db = _Db(storage=MemoryStorage)
        self._db.storage.write({name: {} for name in TABLES})
        self.tables: dict[str, dict[str, Any]] = self._db.storage.read()  # type: ignore[assignment]
        self._by_org: dict[str, dict[str, None]] = {}
        self._by_creator: dict[str, dict[str, None]] = {}
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
        self._degraded: tuple[str, str] | None = None
        self._rollback_due = False  # a failed batch's rollback is scheduled on the loop
        self._next_probe = 0.0
        self._truncate_to: int | None = None  # a failed batch whose bytes could not be cut yet
        self._compact_after = 0.0

    # --- TinyDB access (ad-hoc queries: ``store.table("ssa").search(Query().org_id == "x")``) ---
    def table(self, name: str) -> Table:
        return self._db.table(name, cache_size=0)

    # --- open / close ---
    async def open(self) -> None:
        """Open, check and replay the journal.  Every failure of the data dir is one
        StoreUnavailable whose message is one line (the CLI prints it as it is)."""
        try:
            self._open_files()
            self._load()
        except OSError as e:
            self._close_files()
            where = f" ({e.filename})" if e.filename and str(e.filename) != str(self.data_dir) else ""
            message = f"the data dir {self.data_dir} cannot be used: {e.strerror}{where}"
            raise StoreUnavailable(message) from None
        except BaseException:
            self._close_files()
            raise
        if self.exclusive:
            if self._garbage() > max(self._live(), 1000):
                self._compact(self._snapshot(), self._offset)  # a failure only logs
            try:
                self._probe()
            except (OSError, _JournalProblem) as e:
                # Serve reads; writes wait for room.  Not logged here: a start that fails for it
                # (no keys yet) says so in its one line, a start that goes on logs the store DOWN.
                self._degraded = self._describe(e)
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
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if stat.S_IMODE(os.stat(self.data_dir).st_mode) != 0o700:
            os.chmod(self.data_dir, 0o700)
        if self.exclusive:
            self._take_server_lock()
            temp = self.data_dir / TEMP
            if temp.exists():  # a compaction was interrupted: the journal is the old one, whole
                temp.unlink()
                log.info("%s: removed the temp file of an interrupted compaction", temp)
        self._end = SharedCounter.in_file(self.data_dir / SEQ)
        published = self._end.get()
        exists = self.path.exists()
        if not exists and published > 0 and not self.accept_journal_loss:
            raise StoreUnavailable(
                f"{self.path} is missing, but {published} bytes of acknowledged records were written to it "
                f"(its end is published in {SEQ}): restore it from a backup, or start `{_ACCEPT_FLAG}` "
                "to begin again with an empty store")
        self._open_journal(create=not exists)

    def _take_server_lock(self) -> None:
        fd = os.open(self.data_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreLocked(f"data dir {self.data_dir} is in use by another ssa-server process (pid {holder})") from None
        try:  # the pid is for the message above only: a full disk must not stop the start
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass
        self._lock_fd = fd

    def _open_journal(self, *, create: bool = False) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        self._fd = os.open(self.path, flags, 0o600)
        if stat.S_IMODE(os.fstat(self._fd).st_mode) != 0o600:
            os.fchmod(self._fd, 0o600)
        self._inode = os.fstat(self._fd).st_ino

    def _load(self) -> None:
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
                    raise StoreUnavailable(
                        f"{self.path} ends {missing} bytes before its last acknowledged end ({published} "
                        f"bytes, published in {SEQ}): acknowledged records are missing; restore the journal "
                        f"from a backup, or start `{_ACCEPT_FLAG}` to go on without them")
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
    def _reset(self) -> None:
        for table in self.tables.values():
            table.clear()
        self._by_org.clear()
        self._by_creator.clear()
        self._offset = self._lines = 0

    def _replay_all(self) -> None:
        self._reset()
        # The cyclic GC would rescan every record read so far, again and again: 100k SSAs
        # replay in ~1 s without it and in 2-4 s with it.  Replayed records hold no cycles.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._read_new_lines(skip_own=False)
        finally:
            if enabled:
                gc.enable()

    def _catch_up(self) -> None:
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
                entry = _load(line)
                if type(entry) is not dict:
                    raise ValueError
                if skip_own and entry.get("w") == self._writer:
                    continue
                name, doc_id = entry["t"], entry["id"]
                if type(doc_id) is not str or name not in _ID_FIELD:
                    raise ValueError
                if "doc" in entry:
                    doc = entry["doc"]
                    if type(doc) is not dict or type(doc.get(_ID_FIELD[name])) is not str:
                        raise ValueError
                    self._put(name, doc_id, doc)
                else:
                    self._delete(name, doc_id)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise StoreUnavailable(f"{self.path}: line {number} is corrupt; the store cannot be read") from None

    # --- in-memory changes (always paired with a journal line); each returns how to undo it ---
    def _put(self, name: str, doc_id: str, doc: dict[str, Any]) -> _Change:
        if name == "ssa":
            doc = _compact_ssa(doc)
            doc_id = doc["jti"]
        return self._install(name, doc_id, doc)

    def _install(self, name: str, doc_id: str, doc: dict[str, Any]) -> _Change:
        table = self.tables[name]
        old = table.get(doc_id)
        if name == "ssa":
            if old is not None:
                self._unindex(old)
            self._by_org.setdefault(doc["org_id"], {})[doc_id] = None
            self._by_creator.setdefault(doc["creator_id"], {})[doc_id] = None
        table[doc_id] = doc
        return name, doc_id, old, doc

    def _delete(self, name: str, doc_id: str) -> _Change:
        doc = self.tables[name].pop(doc_id, None)
        if doc is not None and name == "ssa":
            self._unindex(doc)
        return name, doc_id, doc, None

    def _unindex(self, doc: dict[str, Any]) -> None:
        for index, key in ((self._by_org, doc["org_id"]), (self._by_creator, doc["creator_id"])):
            ids = index.get(key)
            if ids is not None:
                ids.pop(doc["jti"], None)
                if not ids:
                    del index[key]

    def _undo(self, changes: list[_Change]) -> None:
        """Take changes back, newest first.  A document another process changed since (a line
        read from the journal, which is durable) keeps that change."""
        for name, doc_id, old, new in reversed(changes):
            if self.tables[name].get(doc_id) is not new:
                continue
            if old is None:
                self._delete(name, doc_id)
            else:
                self._install(name, doc_id, old)

    def _line(self, name: str, doc_id: str, doc: dict[str, Any] | None) -> bytes:
        entry: dict[str, Any] = {"w": self._writer, "t": name, "id": doc_id}
        if doc is not None:
            entry["doc"] = doc
        return _dump(entry)

    # --- durability: group commit ---
    async def _writable(self) -> None:
        """Refuse a write at once while the store is degraded (after a probe, when one is due)."""
        if self._degraded is not None:
            await self._recover()
            if self._degraded is not None:
                raise StoreDegraded(self._degraded[1], self._degraded[0])

    async def _commit(self, lines: Iterable[bytes], changes: list[_Change]) -> None:
        data = b"".join(lines)
        if not data:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._pending_lock:
            self._pending.append((data, loop, future, changes))
        self._wake.set()
        await future

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait()
            with self._pending_lock:
                self._wake.clear()
                if self._degraded is None:
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
            j = i + 1
            while j < len(batch) and not isinstance(batch[j], _Compaction):
                j += 1
            error = self._write_batch(batch[i:j])  # type: ignore[arg-type]
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
                    _write_all(self._fd, data)
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
        except (OSError, _JournalProblem) as e:
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

    def _lock_current_journal(self) -> _Flock:
        """Hold the flock of the file that is the journal now.  A CLI process may still have
        the file the server compacted away open: it moves to the new file (the event-loop side
        notices the inode change and replays) and locks that one, never appending unlocked."""
        while True:
            lock = _Flock(self._fd)
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
    def _journal_problem(self, st: os.stat_result) -> _JournalProblem | None:
        """Is the journal still the file at its path (the server's only: a CLI process follows a
        compaction to the new file), and not shorter than its published end?"""
        assert self._end is not None
        try:
            at_path = os.stat(self.path).st_ino if self.exclusive else st.st_ino
        except FileNotFoundError:
            at_path = None
        if at_path != st.st_ino:  # (a deleted journal also has st_nlink == 0)
            here = f"/proc/{os.getpid()}/fd/{self._fd}"
            refused = "writes are refused (503) and /health/ready is DOWN until the path is its journal again"
            if at_path is None:
                return _JournalProblem("the journal was deleted", (
                    f"{self.path} was deleted (or moved away) while the server runs: {refused}; the journal "
                    f"the server was writing is still readable at {here}: copy it back (cp {here} "
                    f"{self.path}) and restart the server"))
            return _JournalProblem("the journal was replaced by another file", (
                f"{self.path} was replaced by another file while the server runs: {refused}; restart the "
                f"server to use the file now there, or first copy back the journal the server was writing, "
                f"still readable at {here}"))
        if st.st_size < self._end.get():
            who = ("the server runs: writes are refused (503) and /health/ready is DOWN" if self.exclusive
                   else "this command ran")
            return _JournalProblem(
                "the journal was truncated",
                f"{self.path} was truncated while {who} ({st.st_size} bytes, {self._end.get()} "
                "acknowledged); restore the journal from a backup")
        return None

    def _describe(self, cause: OSError | _JournalProblem) -> tuple[str, str]:
        """(public reason, message) of a failure to write."""
        if isinstance(cause, _JournalProblem):
            return cause.reason, cause.detail
        what = cause.strerror or type(cause).__name__
        if not self.exclusive:  # a CLI command: its one line
            return f"the journal cannot be written ({what})", f"{self.path} cannot be written: {what}"
        return (f"the journal cannot be written ({what})",
                f"{self.path} cannot be written: {what}: writes are refused (503) and /health/ready is DOWN "
                f"until a probe write succeeds (tried at most every {_PROBE_INTERVAL:g} s)")

    def _degrade_for(self, cause: OSError | _JournalProblem) -> StoreDegraded:
        return self._degrade(*self._describe(cause))

    def _degrade(self, reason: str, detail: str) -> StoreDegraded:
        """Refuse writes from now on; one ERROR line per cause (the server's, not a CLI's: a
        CLI command reports the failure as its one line)."""
        with self._pending_lock:  # the flusher takes nothing more
            self._rollback_due = True
            new_cause = self._degraded is None or self._degraded[0] != reason
            self._degraded = (reason, detail)
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
                self._undo(entry[3])
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
        if self._degraded is None or self._rollback_due or time.monotonic() < self._next_probe:
            return
        self._next_probe = time.monotonic() + _PROBE_INTERVAL
        try:
            await asyncio.to_thread(self._probe)
        except (OSError, _JournalProblem) as e:
            self._degrade_for(e)
            self._rollback_due = False  # nothing was queued: writes were refused before they were applied
            return
        if self.exclusive:
            log.info("%s can be written again: the store accepts writes", self.path)
        self._degraded = None

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
            probe = self.data_dir / PROBE
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, b"\0" * _PROBE_SIZE)
                os.fsync(fd)
            finally:
                os.close(fd)
                with contextlib.suppress(OSError):
                    probe.unlink()

    # --- compaction ---
    def _live(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def _garbage(self) -> int:
        return self._lines - self._live()

    def _snapshot(self) -> dict[str, dict[str, Any]]:
        """The tables as they are now (documents are replaced, never changed in place)."""
        return {name: dict(table) for name, table in self.tables.items()}

    async def _compact_soon(self) -> bool:
        """Queue a compaction behind the writes applied so far (exclusive owner only)."""
        loop = asyncio.get_running_loop()
        with self._offset_lock:
            offset = self._offset
        marker = _Compaction(self._snapshot(), offset, loop)  # in the same loop step as the append
        with self._pending_lock:
            self._pending.append(marker)
        self._wake.set()
        return await marker.future

    def _compact(self, snapshot: dict[str, dict[str, Any]], offset: int) -> bool:
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
            _Flock(self._fd).release()  # ...and takes the new file's flock once we let it go
            return True
        except (OSError, _Unverified, ValueError, TypeError) as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._compact_after = time.monotonic() + self.compact_retry_interval
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            log.warning("%s: compaction failed (%s): the store keeps serving on the old journal and tries "
                        "again in %g s at the earliest", self.path, why, self.compact_retry_interval)
            return False

    def _compact_locked(self, tmp: Path, snapshot: dict[str, dict[str, Any]], offset: int) -> int:
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
            length, tail = self._write_compacted(fd, snapshot, offset, end)
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
            dir_fd = os.open(self.data_dir, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:  # the rename is done; only its durability across a power loss is in doubt
            log.warning("%s: fsync of the data dir after compaction failed: %s", self.path, e.strerror)
        return old

    def _write_compacted(self, fd: int, snapshot: dict[str, dict[str, Any]], offset: int,
                         end: int) -> tuple[int, int, int]:
        """Write and verify the compacted file; (its length, the end of the records, their lines)."""
        crc = length = lines = 0

        def put(data: bytes) -> None:
            nonlocal crc, length
            _write_all(fd, data)
            crc = zlib.crc32(data, crc)
            length += len(data)

        chunk: list[bytes] = []
        for name, table in snapshot.items():
            for doc_id, doc in table.items():
                chunk.append(_encode({"t": name, "id": doc_id, "doc": doc})[0])  # checked when written
                if len(chunk) >= 5000:
                    put(b"".join(chunk))
                    lines += len(chunk)
                    chunk.clear()
        put(b"".join(chunk))
        lines += len(chunk)
        # Lines appended after the snapshot: other processes' are copied as they are; ours are in
        # the snapshot already (written before the compaction was queued) and are dropped, or the
        # compacted file would hold each change made meanwhile twice (a purge's deletions, say).
        own = b'{"w":' + orjson.dumps(self._writer) + b","
        tail = _Tail(offset, length, lines)
        pos, rest = offset, b""
        while pos < end:
            data = os.pread(self._fd, min(_CHUNK, end - pos), pos)
            if not data:
                raise OSError(errno.EIO, "the journal ended while it was copied")
            pos += len(data)
            data, rest = rest + data, b""
            cut = data.rfind(b"\n") + 1
            data, rest = data[:cut], data[cut:]
            kept = [line for line in data.splitlines(keepends=True) if tail.line(line, not line.startswith(own))]
            put(b"".join(kept))
        os.fsync(fd)
        if os.fstat(fd).st_size != length:
            raise _Unverified(f"the compacted file holds {os.fstat(fd).st_size} bytes, {length} were written")
        check, pos = 0, 0
        while pos < length:
            data = os.pread(fd, min(_CHUNK, length - pos), pos)
            if not data:
                break
            check = zlib.crc32(data, check)
            pos += len(data)
        if check != crc:
            raise _Unverified("the compacted file does not read back as it was written (CRC-32)")
        return length, tail

    # --- SSAs ---
    async def add_ssa(self, record: SsaRecord) -> None:
        await self.add_ssas([record])

    async def add_ssas(self, records: list[SsaRecord]) -> None:
        if self._degraded is not None:
            await self._writable()
        self._catch_up()
        table = self.tables["ssa"]
        seen: set[str] = set()
        for r in records:
            if r["jti"] in table or r["jti"] in seen:
                raise ValueError(f"an SSA with jti {r['jti']} exists")
            seen.add(r["jti"])
        docs = [_copy_ssa(r) for r in records]  # type: ignore[arg-type]
        lines = [self._line("ssa", doc["jti"], doc) for doc in docs]  # refuses before anything changes
        await self._commit(lines, [self._put("ssa", doc["jti"], doc) for doc in docs])

    async def get_ssa(self, jti: str) -> SsaRecord | None:
        self._catch_up()
        doc = self.tables["ssa"].get(jti)
        return _copy_ssa(doc) if doc is not None else None

    def _matching(self, jti: str | None, org_id: str | None, status: str | None,
                  creator_id: str | None) -> list[dict[str, Any]]:
        table = self.tables["ssa"]
        if jti is not None:
            candidates: Iterable[str] = [jti] if jti in table else []
        elif org_id is not None:
            candidates = list(self._by_org.get(org_id, {}))
        elif creator_id is not None:
            candidates = list(self._by_creator.get(creator_id, {}))
        else:
            candidates = list(table)
        out = []
        for doc_id in candidates:
            doc = table[doc_id]
            if ((org_id is None or doc["org_id"] == org_id) and (status is None or doc["status"] == status)
                    and (creator_id is None or doc["creator_id"] == creator_id)):
                out.append(doc)
        out.sort(key=lambda d: d["created_at"])  # stable: insertion order among equals
        return out

    async def find_ssas(self, *, jti: str | None = None, org_id: str | None = None,
                        status: str | None = None, creator_id: str | None = None) -> list[SsaRecord]:
        self._catch_up()
        return [_copy_ssa(doc) for doc in self._matching(jti, org_id, status, creator_id)]

    async def mark_used(self, jti: str, now: int) -> SsaRecord | None:
        self._catch_up()
        doc = self.tables["ssa"].get(jti)
        if doc is None or doc["status"] != ACTIVE or doc["expiration"] <= now:
            return None
        if not doc["one_time_use"]:
            return _copy_ssa(doc)  # type: ignore[no-any-return]  (a read: served while degraded too)
        if self._degraded is not None:
            await self._writable()  # raises unless the store recovered
            return await self.mark_used(jti, now)  # the SSA may have changed while the probe ran
        # Check and change happen in one synchronous step: no other coroutine can interleave.
        doc = dict(doc, status=USED)
        line = self._line("ssa", jti, doc)
        await self._commit([line], [self._put("ssa", jti, doc)])
        return _copy_ssa(doc)  # type: ignore[no-any-return]

    async def revoke_ssas(self, *, jti: str | None = None, org_id: str | None = None,
                          creator_id: str | None = None, now: int) -> list[SsaRecord]:
        if self._degraded is not None:
            await self._writable()
        self._catch_up()
        if jti is None and org_id is None and creator_id is None:
            return []
        matching = self._matching(jti, org_id, ACTIVE, creator_id)
        changed = [dict(doc, status=REVOKED, expiration=now) for doc in matching]
        lines = [self._line("ssa", new["jti"], new) for new in changed]
        await self._commit(lines, [self._put("ssa", new["jti"], new) for new in changed])
        return [_copy_ssa(doc) for doc in changed]

    async def expire_and_purge(self, now: int, grace: int) -> tuple[int, int]:
        if self._degraded is not None:
            await self._writable()
        self._catch_up()
        expired: list[dict[str, Any]] = []
        purged: list[str] = []
        for doc_id, doc in self.tables["ssa"].items():
            if doc["status"] == ACTIVE and doc["expiration"] <= now:
                expired.append(dict(doc, status=EXPIRED))
            elif doc["status"] != ACTIVE and doc["expiration"] < now - grace:
                purged.append(doc_id)
        lines = [self._line("ssa", new["jti"], new) for new in expired]  # every line before any change
        lines += [self._line("ssa", doc_id, None) for doc_id in purged]
        changes = [self._put("ssa", new["jti"], new) for new in expired]
        changes += [self._delete("ssa", doc_id) for doc_id in purged]
        await self._commit(lines, changes)
        if (self.exclusive and self._garbage() > max(self._live(), _COMPACT_MIN_GARBAGE)
                and self._degraded is None and time.monotonic() >= self._compact_after):
            await self._compact_soon()
        return len(expired), len(purged)

    async def count_ssas(self) -> int:
        self._catch_up()
        return len(self.tables["ssa"])

    # --- generic records ---
    async def _put_record(self, name: str, doc_id: str, record: dict[str, Any]) -> None:
        """Store a record (the caller has awaited ``_writable`` and caught up, with no await since)."""
        doc = clone(dict(record))
        line = self._line(name, doc_id, doc)
        await self._commit([line], [self._put(name, doc_id, doc)])

    def _get(self, name: str, doc_id: str) -> Any:
        self._catch_up()
        doc = self.tables[name].get(doc_id)
        return clone(doc) if doc is not None else None

    def _all(self, name: str) -> list[Any]:
        self._catch_up()
        return clone(sorted(self.tables[name].values(), key=lambda d: d.get("created_at", 0)))

    # --- clients ---
    async def add_client(self, record: ClientRecord) -> None:
        if self._degraded is not None:
            await self._writable()
        self._catch_up()
        if record["client_id"] in self.tables["clients"]:
            raise ValueError(f"a client with id {record['client_id']} exists")
        await self._put_record("clients", record["client_id"], dict(record))

    async def get_client(self, client_id: str) -> ClientRecord | None:
        return self._get("clients", client_id)  # type: ignore[no-any-return]

    async def has_client(self, client_id: str) -> bool:
        self._catch_up()
        return client_id in self.tables["clients"]

    async def list_clients(self) -> list[ClientRecord]:
        return self._all("clients")

    async def delete_client(self, client_id: str) -> bool:
        if self._degraded is not None:
            await self._writable()
        self._catch_up()
        if client_id not in self.tables["clients"]:
            return False
        line = self._line("clients", client_id, None)
        await self._commit([line], [self._delete("clients", client_id)])
        return True

    # --- keys ---
    async def add_key(self, record: KeyRecord) -> None:
        if self._degraded is not None:
            await self._writable()
        self._catch_up()
        await self._put_record("keys", record["kid"], dict(record))

    async def update_key(self, kid: str, changes: dict[str, Any]) -> None:
        if self._degraded is not None:
            await self._writable()
        self._catch_up()
        doc = self.tables["keys"].get(kid)
        if doc is None:
            raise KeyError(kid)
        await self._put_record("keys", kid, dict(doc, **changes))

    async def list_keys(self) -> list[KeyRecord]:
        return self._all("keys")

    # --- templates ---
    async def put_template(self, record: TemplateRecord) -> None:
        if self._degraded is not None:
            await self._writable()
        self._catch_up()
        await self._put_record("templates", record["name"], dict(record))

    async def get_template(self, name: str) -> TemplateRecord | None:
        return self._get("templates", name)  # type: ignore[no-any-return]

    async def list_templates(self) -> list[TemplateRecord]:
        return self._all("templates")

    # --- coordination ---
    @contextlib.asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        """Nothing to hold: a data dir has one server process (``server.lock``)."""
        yield

    # --- health ---
    async def check(self) -> None:
        """Readiness: StoreDegraded (with its reason) while writes are refused; the journal's
        identity is checked here too, and a due probe runs."""
        if self._fd < 0 or self._flusher is None or not self._flusher.is_alive():
            raise StoreUnavailable("the store is not open")
        if self.exclusive and self._degraded is None:
            with self._offset_lock:  # not in the middle of a compaction's rename
                problem = self._journal_problem(os.fstat(self._fd))
            if problem is not None:
                self._roll_back([], self._degrade(problem.reason, problem.detail))  # what is queued fails too
        if self._degraded is not None:
            await self._writable()
        self._catch_up()


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


class _Tail:
    """Where the lines of the old journal past a compaction's snapshot land in the new one: a
    position of the old file (a line end the event loop had read up to) maps to the new file."""

    def __init__(self, offset: int, head: int, head_lines: int) -> None:
        self._old, self._new, self._lines = [offset], [head], [head_lines]  # at each line end

    def line(self, line: bytes, kept: bool) -> bool:
        self._old.append(self._old[-1] + len(line))
        self._new.append(self._new[-1] + (len(line) if kept else 0))
        self._lines.append(self._lines[-1] + kept)
        return kept

    def moved(self, old_offset: int) -> tuple[int, int]:
        """The new file's offset and line count for ``old_offset`` of the old file."""
        i = bisect.bisect_left(self._old, old_offset)
        if i == len(self._old) or self._old[i] != old_offset:  # not a line end: cannot happen
            raise _Unverified(f"offset {old_offset} is not a line end of the copied tail")
        return self._new[i], self._lines[i]


class _Flock:
    """An exclusive flock on the journal (``acquire``/``release``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def acquire(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # compaction closed this fd; closing released the lock
