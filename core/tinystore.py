"""The embedded store: TinyDB tables kept in memory over an fsync'ed, append-only JSON-lines journal.

Why not stock TinyDB storage: ``JSONStorage`` rewrites and re-reads the whole file on every
operation (20 ms per insert at 1k documents, 2 s at 100k) and a crash mid-write corrupts it;
even ``MemoryStorage`` rebuilds the whole table dict on every write.  Here TinyDB holds the
tables (dicts of documents, queryable with ``Query``), but writes change the documents in place
and append one line per change to ``store.jsonl``; indexes on ``org_id`` and ``creator_id``
keep lookups from scanning.  See ``docs/store.md``.

- Durable: a write returns after its line is written and fsync'ed.  Concurrent writers share
  one fsync (group commit by a flusher thread).
- Crash-safe: a torn last line is dropped at open; compaction writes a temp file, fsyncs it,
  renames it over the journal and fsyncs the directory.
- Multi-process: the server (``exclusive``) holds ``server.lock``; CLI processes append under
  ``flock`` on the journal, and every process replays lines others appended before each call.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
from tinydb import TinyDB
from tinydb.storages import MemoryStorage
from tinydb.table import Table

from .shared_counter import SharedCounter
from .store import (ACTIVE, clone, EXPIRED, REVOKED, USED, ClientRecord, KeyRecord, SsaRecord, StoreLocked,
                    StoreUnavailable, TemplateRecord)

JOURNAL = "store.jsonl"
LOCK = "server.lock"
SEQ = "store.seq"
TABLES = ("ssa", "clients", "keys", "templates")
_COMPACT_MIN_GARBAGE = 10_000
_CHUNK = 8 << 20  # replay reads the journal in chunks: the file is never in memory whole


class _LiveTable(Table):
    """A TinyDB table whose documents are read from the live in-memory dict (no copy, no rebuild)."""

    document_id_class = str  # type: ignore[assignment]

    def _read_table(self) -> dict[str, Any]:
        return self._storage.read()[self.name]  # type: ignore[no-any-return]


class _Db(TinyDB):
    table_class = _LiveTable


def _dump(entry: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        # An integer beyond 64 bits (orjson refuses it, and would read it back as a float):
        # the line is written by the stdlib and flagged to be read back by it.
        entry = dict(entry, j=1)
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _load(line: bytes) -> Any:
    entry = orjson.loads(line)
    return json.loads(line) if entry.get("j") else entry


_intern = sys.intern
_SHARED_STRINGS = ("org_id", "status", "creator_id", "iss", "software_id")


def _compact_ssa(doc: dict[str, Any]) -> dict[str, Any]:
    """Share the strings that repeat across SSAs (about a third less memory at 100k SSAs)."""
    for name in _SHARED_STRINGS:
        value = doc.get(name)
        if type(value) is str:
            doc[name] = _intern(value)
    doc["software_roles"] = [_intern(v) if type(v) is str else v for v in doc["software_roles"]]
    doc["grant_types"] = [_intern(v) if type(v) is str else v for v in doc["grant_types"]]
    return doc


def _copy_ssa(doc: dict[str, Any]) -> Any:
    """A caller's copy of a stored SSA: its only mutable parts are the two lists and ``custom``."""
    out = doc.copy()
    out["software_roles"] = list(doc["software_roles"])
    out["grant_types"] = list(doc["grant_types"])
    out["custom"] = clone(doc["custom"]) if doc["custom"] else {}
    return out


class TinyStore:
    def __init__(self, data_dir: Path | str, *, exclusive: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / JOURNAL
        self.exclusive = exclusive
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
        self._pending: list[tuple[bytes, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._offset_lock = threading.Lock()  # _offset and _lines: the event loop and the flusher move them
        self._wake = threading.Event()
        self._closing = False
        self._flusher: threading.Thread | None = None
        self._broken: str | None = None

    # --- TinyDB access (ad-hoc queries: ``store.table("ssa").search(Query().org_id == "x")``) ---
    def table(self, name: str) -> Table:
        return self._db.table(name, cache_size=0)

    # --- open / close ---
    async def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        if self.exclusive:
            self._take_server_lock()
        self._end = SharedCounter.in_file(self.data_dir / SEQ)
        self._open_journal()
        self._replay_all()
        if self.exclusive:
            with self._file_lock():
                self._end.set(os.fstat(self._fd).st_size)
            if self._garbage() > max(self._live(), 1000):
                self._compact()
        self._flusher = threading.Thread(target=self._flush_loop, name="ssa-store-flusher", daemon=True)
        self._flusher.start()

    async def close(self) -> None:
        if self._flusher is not None:
            self._closing = True
            self._wake.set()
            await asyncio.to_thread(self._flusher.join, 10)
            self._flusher = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._end is not None:
            self._end.close()
            self._end = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _take_server_lock(self) -> None:
        fd = os.open(self.data_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreLocked(f"data dir {self.data_dir} is in use by another ssa-server process (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _open_journal(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(self._fd, 0o600)
        self._inode = os.fstat(self._fd).st_ino

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
        if self._offset < os.fstat(self._fd).st_size and self.exclusive:
            # A torn last line: the write was never acknowledged.  Drop it.
            with self._file_lock():
                os.ftruncate(self._fd, self._offset)
                os.fsync(self._fd)

    def _catch_up(self) -> None:
        """Apply lines other processes appended since our last look (cheap when there are none)."""
        if self._broken:
            raise StoreUnavailable(self._broken)
        if not self.exclusive:
            try:
                if os.stat(self.path).st_ino != self._inode:  # compacted by the server: start over
                    self._open_journal()
                    self._replay_all()
                    return
            except FileNotFoundError:
                raise StoreUnavailable(f"{self.path} disappeared") from None
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
                if skip_own and entry.get("w") == self._writer:
                    continue
                name, doc_id = entry["t"], entry["id"]
                if "doc" in entry:
                    self._put(name, doc_id, entry["doc"])
                else:
                    self._delete(name, doc_id)
            except (ValueError, KeyError, TypeError):
                raise StoreUnavailable(f"{self.path}: line {number} is corrupt; the store cannot be read") from None

    # --- in-memory changes (always paired with a journal line) ---
    def _put(self, name: str, doc_id: str, doc: dict[str, Any]) -> None:
        table = self.tables[name]
        if name == "ssa":
            doc = _compact_ssa(doc)
            doc_id = doc["jti"]
            old = table.get(doc_id)
            if old is not None:
                self._unindex(old)
            self._by_org.setdefault(doc["org_id"], {})[doc_id] = None
            self._by_creator.setdefault(doc["creator_id"], {})[doc_id] = None
        table[doc_id] = doc

    def _delete(self, name: str, doc_id: str) -> None:
        doc = self.tables[name].pop(doc_id, None)
        if doc is not None and name == "ssa":
            self._unindex(doc)

    def _unindex(self, doc: dict[str, Any]) -> None:
        for index, key in ((self._by_org, doc["org_id"]), (self._by_creator, doc["creator_id"])):
            ids = index.get(key)
            if ids is not None:
                ids.pop(doc["jti"], None)
                if not ids:
                    del index[key]

    def _line(self, name: str, doc_id: str, doc: dict[str, Any] | None) -> bytes:
        entry: dict[str, Any] = {"w": self._writer, "t": name, "id": doc_id}
        if doc is not None:
            entry["doc"] = doc
        return _dump(entry)

    # --- durability: group commit ---
    async def _commit(self, lines: Iterable[bytes]) -> None:
        data = b"".join(lines)
        if not data:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._pending_lock:
            self._pending.append((data, loop, future))
        self._wake.set()
        await future

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait()
            with self._pending_lock:
                batch, self._pending = self._pending, []
                self._wake.clear()
            if batch:
                self._write_batch(batch)
            elif self._closing:
                return

    def _write_batch(self, batch: list[tuple[bytes, asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
        error: Exception | None = None
        try:
            data = b"".join(data for data, _, _ in batch)
            with self._write_lock, self._locked_current_journal():
                start = os.fstat(self._fd).st_size
                os.write(self._fd, data)
                os.fsync(self._fd)
                if self.exclusive:
                    with self._offset_lock:
                        if self._offset == start:  # nothing unread before our batch: skip re-reading it
                            self._offset = start + len(data)
                            self._lines += data.count(b"\n")
                if self._end is not None:
                    self._end.set(start + len(data))
        except OSError as e:
            self._broken = f"{self.path} cannot be written: {e.strerror}"
            error = StoreUnavailable(self._broken)
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, loop, future in batch:
            by_loop.setdefault(loop, []).append(future)
        for loop, futures in by_loop.items():  # one wake-up per loop for the whole batch
            loop.call_soon_threadsafe(_settle, futures, error)

    @contextlib.contextmanager
    def _locked_current_journal(self) -> Iterator[None]:
        """Hold the flock of the file that is the journal now.  A CLI process may still have
        the file the server compacted away open: it moves to the new file (the event-loop side
        notices the inode change and replays) and locks that one, never appending unlocked."""
        while True:
            lock = self._file_lock()
            lock.__enter__()
            if self.exclusive or os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                break
            lock.__exit__()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND, 0o600)
            os.close(self._fd)
            self._fd = fd
        try:
            yield
        finally:
            lock.__exit__()

    def _file_lock(self) -> _Flock:
        return _Flock(self._fd)

    # --- compaction ---
    def _live(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def _garbage(self) -> int:
        return self._lines - self._live()

    def _compact(self) -> None:
        """Rewrite the journal as one line per live record (exclusive owner only)."""
        tmp = self.path.with_suffix(".jsonl.tmp")
        with self._write_lock, self._file_lock():
            self._read_new_lines()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            written = lines = 0
            try:
                chunk: list[bytes] = []
                for name, table in self.tables.items():
                    # A snapshot: the event loop goes on changing the table while this thread
                    # writes (those changes' lines are queued behind _write_lock).
                    for doc_id, doc in list(table.items()):
                        chunk.append(_dump({"t": name, "id": doc_id, "doc": doc}))
                        if len(chunk) >= 5000:
                            written += os.write(fd, b"".join(chunk))
                            lines += len(chunk)
                            chunk.clear()
                written += os.write(fd, b"".join(chunk))
                lines += len(chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.data_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            with self._offset_lock:  # the event loop reads _fd and _offset under this lock
                self._open_journal()  # closes the old fd, which releases its flock after the rename
                # What we wrote, not the file's size now: a CLI may already have appended to it.
                self._offset, self._lines = written, lines
                if self._end is not None:
                    self._end.set(os.fstat(self._fd).st_size)

    # --- SSAs ---
    async def add_ssa(self, record: SsaRecord) -> None:
        await self.add_ssas([record])

    async def add_ssas(self, records: list[SsaRecord]) -> None:
        self._catch_up()
        table = self.tables["ssa"]
        seen: set[str] = set()
        for r in records:
            if r["jti"] in table or r["jti"] in seen:
                raise ValueError(f"an SSA with jti {r['jti']} exists")
            seen.add(r["jti"])
        lines = []
        for r in records:
            doc = _copy_ssa(r)  # type: ignore[arg-type]
            self._put("ssa", doc["jti"], doc)
            lines.append(self._line("ssa", doc["jti"], doc))
        await self._commit(lines)

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
            return _copy_ssa(doc)  # type: ignore[no-any-return]
        # Check and change happen in one synchronous step: no other coroutine can interleave.
        doc = dict(doc, status=USED)
        self._put("ssa", jti, doc)
        await self._commit([self._line("ssa", jti, doc)])
        return _copy_ssa(doc)  # type: ignore[no-any-return]

    async def revoke_ssas(self, *, jti: str | None = None, org_id: str | None = None,
                          creator_id: str | None = None, now: int) -> list[SsaRecord]:
        self._catch_up()
        if jti is None and org_id is None and creator_id is None:
            return []
        changed, lines = [], []
        for doc in self._matching(jti, org_id, ACTIVE, creator_id):
            new = dict(doc, status=REVOKED, expiration=now)
            self._put("ssa", new["jti"], new)
            lines.append(self._line("ssa", new["jti"], new))
            changed.append(new)
        await self._commit(lines)
        return [_copy_ssa(doc) for doc in changed]

    async def expire_and_purge(self, now: int, grace: int) -> tuple[int, int]:
        self._catch_up()
        lines, expired, purged = [], 0, 0
        for doc_id, doc in list(self.tables["ssa"].items()):
            if doc["status"] == ACTIVE and doc["expiration"] <= now:
                new = dict(doc, status=EXPIRED)
                self._put("ssa", doc_id, new)
                lines.append(self._line("ssa", doc_id, new))
                expired += 1
            elif doc["status"] != ACTIVE and doc["expiration"] < now - grace:
                self._delete("ssa", doc_id)
                lines.append(self._line("ssa", doc_id, None))
                purged += 1
        await self._commit(lines)
        if self.exclusive and self._garbage() > max(self._live(), _COMPACT_MIN_GARBAGE):
            # Queued lines need no flush first: _compact holds _write_lock, so they land in the
            # old file before the snapshot or in the new one after it (replay is idempotent).
            await asyncio.to_thread(self._compact)
        return expired, purged

    async def count_ssas(self) -> int:
        self._catch_up()
        return len(self.tables["ssa"])

    # --- generic records ---
    async def _put_record(self, name: str, doc_id: str, record: dict[str, Any]) -> None:
        self._catch_up()
        doc = clone(dict(record))
        self._put(name, doc_id, doc)
        await self._commit([self._line(name, doc_id, doc)])

    def _get(self, name: str, doc_id: str) -> Any:
        self._catch_up()
        doc = self.tables[name].get(doc_id)
        return clone(doc) if doc is not None else None

    def _all(self, name: str) -> list[Any]:
        self._catch_up()
        return clone(sorted(self.tables[name].values(), key=lambda d: d.get("created_at", 0)))

    # --- clients ---
    async def add_client(self, record: ClientRecord) -> None:
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
        self._catch_up()
        if client_id not in self.tables["clients"]:
            return False
        self._delete("clients", client_id)
        await self._commit([self._line("clients", client_id, None)])
        return True

    # --- keys ---
    async def add_key(self, record: KeyRecord) -> None:
        await self._put_record("keys", record["kid"], dict(record))

    async def update_key(self, kid: str, changes: dict[str, Any]) -> None:
        self._catch_up()
        doc = self.tables["keys"].get(kid)
        if doc is None:
            raise KeyError(kid)
        await self._put_record("keys", kid, dict(doc, **changes))

    async def list_keys(self) -> list[KeyRecord]:
        return self._all("keys")

    # --- templates ---
    async def put_template(self, record: TemplateRecord) -> None:
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
        self._catch_up()
        if self._fd < 0 or self._flusher is None or not self._flusher.is_alive():
            raise StoreUnavailable("the store is not open")


def _settle(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class _Flock:
    """``with _Flock(fd):`` holds an exclusive flock on the journal."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # compaction closed this fd; closing released the lock
