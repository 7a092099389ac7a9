"""The embedded store: tables of documents in memory, every change recorded by the durable journal,
the admin search run by TinyDB's query engine.

Why not TinyDB's storage and tables: ``JSONStorage`` rewrites and re-reads the whole file on every
operation and a crash mid-write corrupts it; even ``MemoryStorage`` rebuilds the whole table dict
on every write.  So the tables are plain dicts (id -> document) whose documents are replaced,
never changed in place; the journal (``journal.py``: durability, replay, compaction, degraded
mode) appends one line per change; indexes on ``org_id`` and ``creator_id`` (and the jti, the
table's key) keep the hot lookups from scanning; and a search's filter becomes a TinyDB ``Query``
(``search.py``) tested on the documents.  See ``docs/store.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, cast

from tinydb.queries import QueryInstance

from .journal import Journal
from .search import INDEXED, SsaFilter, tinydb_query
from ..jsonvalues import clone
from ..ssa import ACTIVE, EXPIRED, LIST_FIELDS, REVOKED, USED, SsaRecord
from .records import (DELIVERY_DEAD, DELIVERY_DELIVERED, DELIVERY_PENDING, GENESIS, ID_FIELDS, TABLES,
                      AssertionRecord, AuditCheckpointRecord, AuditRecord, ClientRecord, DeliveryRecord,
                      KeyRecord, ScriptRevisionRecord, StatusListRecord, TemplateRecord, WebhookRecord, chain)

# One change in memory and how to take it back: (table, id, document before, document after).
_Change = tuple[str, str, Any, Any]


_SCAN_SLICE = 5000  # documents a search tests between two turns of the event loop
_intern = sys.intern
_SHARED_STRINGS = ("org_id", "status", "creator_id", "iss", "software_id")


def _compact_ssa(doc: dict[str, Any]) -> dict[str, Any]:
    """Share the strings that repeat across SSAs (a large store holds each once, not per SSA)."""
    for name in _SHARED_STRINGS:
        value = doc.get(name)
        if type(value) is str:
            doc[name] = _intern(value)
    for name in LIST_FIELDS:
        doc[name] = [_intern(v) if type(v) is str else v for v in doc[name]]
    return doc


async def _scan(docs: list[dict[str, Any]], query: QueryInstance | None) -> list[dict[str, Any]]:
    """The documents ``query`` matches, tested a slice at a time with a turn of the event loop in
    between: a search of a large store does not hold up the requests around it, and the
    documents taken at its start are its snapshot (they are replaced, never changed)."""
    if query is None:
        return docs
    found: list[dict[str, Any]] = []
    for start in range(0, len(docs), _SCAN_SLICE):
        if start:
            await asyncio.sleep(0)
        found.extend(doc for doc in docs[start:start + _SCAN_SLICE] if query(doc))
    return found


def _kept_until(doc: dict[str, Any]) -> int:
    """When the SSA's status list entry may go: its JWT's exp (0 without an entry)."""
    ref = doc.get("status_list")
    return ref["until"] if ref else 0


def _newest_first(doc: dict[str, Any]) -> tuple[float, str]:
    return -doc["seen_at"], doc["id"]


def _oldest_first(doc: dict[str, Any]) -> tuple[int, str]:
    return doc["created_at"], doc["jti"]


def _copy_ssa(doc: dict[str, Any]) -> Any:
    """A caller's copy of a stored SSA: its only mutable parts are its lists, ``custom`` and
    ``hook_changes``."""
    out = doc.copy()
    for name in LIST_FIELDS:
        out[name] = list(doc[name])
    out["custom"] = clone(doc["custom"]) if doc["custom"] else {}
    if doc.get("hook_changes"):
        out["hook_changes"] = clone(doc["hook_changes"])
    return out


class TinyStore:
    def __init__(self, data_dir: Path | str, *, exclusive: bool = True, accept_journal_loss: bool = False,
                 compact_retry_interval: float = 60.0) -> None:
        """``exclusive``: the server's store (it holds ``server.lock``); else a CLI process's.
        ``accept_journal_loss`` and ``compact_retry_interval``: the journal's (``Journal``)."""
        self.journal = Journal(data_dir, self, exclusive=exclusive, accept_journal_loss=accept_journal_loss,
                               compact_retry_interval=compact_retry_interval)
        self.data_dir, self.path, self.exclusive = self.journal.data_dir, self.journal.path, exclusive
        self.tables: dict[str, dict[str, Any]] = {name: {} for name in TABLES}
        self._by_org: dict[str, dict[str, None]] = {}
        self._by_creator: dict[str, dict[str, None]] = {}
        self._audit_head: tuple[int, str] = (0, GENESIS)  # the newest event's (seq, hash)
        self._audit_lock = asyncio.Lock()  # one append at a time in this process (see append_audit)
        # The outbox's pending deliveries (an index: the delivery task's poll does not scan the
        # delivered ones), and this process's claims on them (``claim_deliveries``).
        self._pending: dict[str, None] = {}
        self._leases: dict[str, float] = {}

    # --- open / close ---
    async def open(self) -> None:
        """Open, check and replay the journal (one StoreUnavailable line for any data-dir failure)."""
        self.journal.open()

    async def close(self) -> None:
        await self.journal.close()

    # --- what the journal needs (JournalState) ---
    def reset(self) -> None:
        for table in self.tables.values():
            table.clear()
        self._by_org.clear()
        self._by_creator.clear()
        self._audit_head = (0, GENESIS)
        self._pending.clear()

    def apply(self, table: str, doc_id: str, doc: dict[str, Any] | None) -> None:
        if doc is None:
            self._delete(table, doc_id)
        elif type(doc.get(ID_FIELDS[table])) is not str:
            raise ValueError(f"a {table} record without its {ID_FIELDS[table]}")
        else:
            self._put(table, doc_id, doc)

    def live(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The tables as they are now (documents are replaced, never changed in place)."""
        return {name: dict(table) for name, table in self.tables.items()}

    # --- in-memory changes (each paired with a journal line); each returns how to undo it ---
    def _put(self, name: str, doc_id: str, doc: dict[str, Any]) -> _Change:
        if name == "ssa":
            doc = _compact_ssa(doc)
            doc_id = doc["jti"]
        return self._install(name, doc_id, doc)

    def _install(self, name: str, doc_id: str, doc: dict[str, Any]) -> _Change:
        table = self.tables[name]
        old = table.get(doc_id)
        if name == "statuslists" and old is not None and old["next"] > doc["next"]:
            # Counters only grow: a line written by another process from an older view of the
            # list must not hand its counters out again.
            doc = dict(doc, next=old["next"])
        if name == "ssa":
            if old is not None:
                self._unindex(old)
            self._by_org.setdefault(doc["org_id"], {})[doc_id] = None
            self._by_creator.setdefault(doc["creator_id"], {})[doc_id] = None
        elif name == "webhook_deliveries":
            if doc["state"] == DELIVERY_PENDING:
                self._pending[doc_id] = None
            else:
                self._pending.pop(doc_id, None)
        table[doc_id] = doc
        if name == "audit" and doc["seq"] > self._audit_head[0]:
            self._audit_head = (doc["seq"], doc["hash"])
        return name, doc_id, old, doc

    def _delete(self, name: str, doc_id: str) -> _Change:
        doc = self.tables[name].pop(doc_id, None)
        if doc is not None and name == "ssa":
            self._unindex(doc)
        elif name == "webhook_deliveries":
            self._pending.pop(doc_id, None)
        return name, doc_id, doc, None

    def _unindex(self, doc: dict[str, Any]) -> None:
        for index, key in ((self._by_org, doc["org_id"]), (self._by_creator, doc["creator_id"])):
            ids = index.get(key)
            if ids is not None:
                ids.pop(doc["jti"], None)
                if not ids:
                    del index[key]

    def undo(self, changes: list[_Change]) -> None:
        """Take changes back, newest first.  A document another process changed since (a line
        read from the journal, which is durable) keeps that change."""
        for name, doc_id, old, new in reversed(changes):
            if self.tables[name].get(doc_id) is not new:
                continue
            if old is None:
                self._delete(name, doc_id)
            else:
                self._install(name, doc_id, old)
            if name == "audit":  # (rare: a failed batch) the head is the newest event left
                newest = max(self.tables["audit"].values(), key=lambda d: d["seq"], default=None)
                self._audit_head = (newest["seq"], newest["hash"]) if newest else (0, GENESIS)

    # --- SSAs ---
    async def add_ssa(self, record: SsaRecord) -> None:
        await self.add_ssas([record])

    async def add_ssas(self, records: list[SsaRecord]) -> None:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        table = self.tables["ssa"]
        seen: set[str] = set()
        for r in records:
            if r["jti"] in table or r["jti"] in seen:
                raise ValueError(f"an SSA with jti {r['jti']} exists")
            seen.add(r["jti"])
        docs = [_copy_ssa(cast("dict[str, Any]", r)) for r in records]  # (a record is a plain dict)
        lines = [self.journal.line("ssa", doc["jti"], doc) for doc in docs]  # refuses before anything changes
        await self.journal.commit(lines, [self._put("ssa", doc["jti"], doc) for doc in docs])

    async def get_ssa(self, jti: str) -> SsaRecord | None:
        self.journal.catch_up()
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
        self.journal.catch_up()
        return [_copy_ssa(doc) for doc in self._matching(jti, org_id, status, creator_id)]

    async def search_ssas(self, where: SsaFilter, limit: int) -> list[SsaRecord]:
        """The filter's TinyDB query tested on the candidates of an index (a term ``jti=``,
        ``org_id=`` or ``creator_id=``), else on every SSA (``_scan``)."""
        self.journal.catch_up()
        query = tinydb_query(where)
        table = self.tables["ssa"]
        jti, org_id, creator_id = (where.equal_to(field) for field in INDEXED)
        if jti is not None:
            docs = [table[jti]] if jti in table else []
        elif org_id is not None:
            docs = [table[i] for i in self._by_org.get(org_id, ())]
        elif creator_id is not None:
            docs = [table[i] for i in self._by_creator.get(creator_id, ())]
        else:
            docs = await _scan(list(table.values()), query)
            query = None
        if query is not None:
            docs = [doc for doc in docs if query(doc)]
        docs.sort(key=_oldest_first)
        return [_copy_ssa(doc) for doc in docs[:limit]]

    async def mark_used(self, jti: str, now: int) -> SsaRecord | None:
        self.journal.catch_up()
        doc = self.tables["ssa"].get(jti)
        if doc is None or doc["status"] != ACTIVE or doc["expiration"] <= now:
            return None
        if not doc["one_time_use"]:
            return _copy_ssa(doc)  # a read: served while degraded too
        if self.journal.degraded is not None:
            await self.journal.writable()  # raises unless the store recovered
            return await self.mark_used(jti, now)  # the SSA may have changed while the probe ran
        # Check and change happen in one synchronous step: no other coroutine can interleave.
        doc = dict(doc, status=USED)
        line = self.journal.line("ssa", jti, doc)
        await self.journal.commit([line], [self._put("ssa", jti, doc)])
        return _copy_ssa(doc)

    async def revoke_ssas(self, *, jti: str | None = None, org_id: str | None = None,
                          creator_id: str | None = None, now: int) -> list[SsaRecord]:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        if jti is None and org_id is None and creator_id is None:
            return []
        matching = self._matching(jti, org_id, ACTIVE, creator_id)
        changed = [dict(doc, status=REVOKED, expiration=now) for doc in matching]
        lines = [self.journal.line("ssa", new["jti"], new) for new in changed]
        await self.journal.commit(lines, [self._put("ssa", new["jti"], new) for new in changed])
        return [_copy_ssa(doc) for doc in changed]

    async def expire_and_purge(self, now: int, grace: int,
                               expired_out: list[tuple[str, str]] | None = None) -> tuple[int, int]:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        expired: list[dict[str, Any]] = []
        purged: list[str] = []
        for doc_id, doc in self.tables["ssa"].items():
            if doc["status"] == ACTIVE and doc["expiration"] <= now:
                expired.append(dict(doc, status=EXPIRED))
            elif (doc["status"] != ACTIVE and doc["expiration"] < now - grace
                  and _kept_until(doc) < now - grace):
                purged.append(doc_id)
        spent = [doc_id for doc_id, doc in self.tables["assertion_jtis"].items() if doc["expires_at"] < now]
        lines = [self.journal.line("ssa", new["jti"], new) for new in expired]  # every line before any change
        lines += [self.journal.line("ssa", doc_id, None) for doc_id in purged]
        lines += [self.journal.line("assertion_jtis", doc_id, None) for doc_id in spent]
        changes = [self._put("ssa", new["jti"], new) for new in expired]
        changes += [self._delete("ssa", doc_id) for doc_id in purged]
        changes += [self._delete("assertion_jtis", doc_id) for doc_id in spent]
        await self.journal.commit(lines, changes)
        await self.journal.compact_if_due()
        if expired_out is not None:
            expired_out.extend((doc["jti"], doc["org_id"]) for doc in expired)
        return len(expired), len(purged)

    async def count_ssas(self) -> int:
        self.journal.catch_up()
        return len(self.tables["ssa"])

    async def count_active_ssas(self, now: int) -> int:
        self.journal.catch_up()
        return sum(1 for doc in self.tables["ssa"].values()
                   if doc["status"] == ACTIVE and doc["expiration"] > now)

    # --- Token Status Lists ---
    async def reserve_status_counters(self, count: int, size: int, key: str,
                                      now: int) -> tuple[StatusListRecord, int]:
        """Check and change in one synchronous step (no other coroutine interleaves); the list's
        line is durable before the counters are used."""
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        newest = max(self.tables["statuslists"].values(), key=lambda d: int(d["id"]), default=None)
        if newest is not None and newest["next"] + count <= newest["size"]:
            first, doc = newest["next"], dict(newest, next=newest["next"] + count)
        else:
            first = 0
            doc = {"id": str(int(newest["id"]) + 1 if newest else 1), "size": size, "next": count, "key": key,
                   "created_at": now}
        line = self.journal.line("statuslists", doc["id"], doc)
        await self.journal.commit([line], [self._put("statuslists", doc["id"], doc)])
        return dict(doc), first  # type: ignore[return-value]

    async def get_status_list(self, list_id: str) -> StatusListRecord | None:
        return self._get("statuslists", list_id)

    async def list_status_lists(self) -> list[StatusListRecord]:
        self.journal.catch_up()
        return clone(sorted(self.tables["statuslists"].values(), key=lambda d: int(d["id"])))

    async def add_status_list(self, record: StatusListRecord) -> None:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        if record["id"] in self.tables["statuslists"]:
            raise ValueError(f"a status list with id {record['id']} exists")
        await self._put_record("statuslists", record["id"], dict(record))

    async def invalid_status_indexes(self, list_id: str) -> list[int]:
        """A scan of every SSA (the token is rebuilt at most every ``status_list_refresh`` seconds)."""
        self.journal.catch_up()
        out = []
        for doc in self.tables["ssa"].values():
            if doc["status"] in (USED, REVOKED):
                ref = doc.get("status_list")
                if ref and ref["list"] == list_id:
                    out.append(ref["idx"])
        return out

    # --- generic records ---
    async def _put_record(self, name: str, doc_id: str, record: dict[str, Any]) -> None:
        """Store a record (the caller has awaited ``writable`` and caught up, with no await since)."""
        doc = clone(dict(record))
        line = self.journal.line(name, doc_id, doc)
        await self.journal.commit([line], [self._put(name, doc_id, doc)])

    def _get(self, name: str, doc_id: str) -> Any:
        self.journal.catch_up()
        doc = self.tables[name].get(doc_id)
        return clone(doc) if doc is not None else None

    def _all(self, name: str) -> list[Any]:
        self.journal.catch_up()
        return clone(sorted(self.tables[name].values(), key=lambda d: d.get("created_at", 0)))

    # --- clients ---
    async def add_client(self, record: ClientRecord) -> None:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        if record["client_id"] in self.tables["clients"]:
            raise ValueError(f"a client with id {record['client_id']} exists")
        await self._put_record("clients", record["client_id"], dict(record))

    async def get_client(self, client_id: str) -> ClientRecord | None:
        return self._get("clients", client_id)

    async def has_client(self, client_id: str) -> bool:
        self.journal.catch_up()
        return client_id in self.tables["clients"]

    async def list_clients(self) -> list[ClientRecord]:
        return self._all("clients")

    async def delete_client(self, client_id: str) -> bool:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        if client_id not in self.tables["clients"]:
            return False
        line = self.journal.line("clients", client_id, None)
        await self.journal.commit([line], [self._delete("clients", client_id)])
        return True

    # --- client assertions' jtis ---
    async def use_assertion(self, record: AssertionRecord, now: int) -> bool:
        """Check and record in one synchronous step (no other coroutine interleaves); the line is
        durable before the assertion is accepted."""
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        held = self.tables["assertion_jtis"].get(record["id"])
        if held is not None and held["expires_at"] >= now:
            return False
        await self._put_record("assertion_jtis", record["id"], dict(record))
        return True

    async def list_assertions(self) -> list[AssertionRecord]:
        self.journal.catch_up()
        return clone(sorted(self.tables["assertion_jtis"].values(), key=lambda d: d["id"]))

    # --- keys ---
    async def add_key(self, record: KeyRecord) -> None:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        await self._put_record("keys", record["kid"], dict(record))

    async def update_key(self, kid: str, changes: dict[str, Any]) -> None:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        doc = self.tables["keys"].get(kid)
        if doc is None:
            raise KeyError(kid)
        await self._put_record("keys", kid, dict(doc, **changes))

    async def list_keys(self) -> list[KeyRecord]:
        return self._all("keys")

    async def compact_keys(self) -> bool:
        return await self.journal.compact()

    # --- templates ---
    async def put_template(self, record: TemplateRecord) -> None:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        await self._put_record("templates", record["name"], dict(record))

    async def get_template(self, name: str) -> TemplateRecord | None:
        return self._get("templates", name)

    async def list_templates(self) -> list[TemplateRecord]:
        return self._all("templates")

    async def delete_template(self, name: str) -> bool:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        if name not in self.tables["templates"]:
            return False
        line = self.journal.line("templates", name, None)
        await self.journal.commit([line], [self._delete("templates", name)])
        return True

    # --- script revisions ---
    async def put_script_revision(self, record: ScriptRevisionRecord, keep: int | None) -> bool:
        """Check, change and prune in one synchronous step (no other coroutine interleaves)."""
        self.journal.catch_up()
        table = self.tables["script_revisions"]
        old = table.get(record["id"])
        if old is not None and (old["state"], old["reason"]) == (record["state"], record["reason"]):
            return False  # seen before, nothing new: no write
        if self.journal.degraded is not None:
            await self.journal.writable()
            return await self.put_script_revision(record, keep)  # it may have changed meanwhile
        doc = clone(dict(record) if old is None
                    else dict(old, state=record["state"], reason=record["reason"]))
        lines = [self.journal.line("script_revisions", doc["id"], doc)]
        pruned: list[str] = []
        if keep is not None:
            mine = [d for d in table.values() if d["name"] == doc["name"] and d["id"] != doc["id"]] + [doc]
            pruned = [d["id"] for d in sorted(mine, key=_newest_first)[keep:]]
            lines += [self.journal.line("script_revisions", doc_id, None) for doc_id in pruned]
        changes = [self._put("script_revisions", doc["id"], doc)]
        changes += [self._delete("script_revisions", doc_id) for doc_id in pruned]
        await self.journal.commit(lines, changes)
        return old is None

    async def get_script_revision(self, revision_id: str) -> ScriptRevisionRecord | None:
        return self._get("script_revisions", revision_id)

    async def list_script_revisions(self, name: str | None = None) -> list[ScriptRevisionRecord]:
        self.journal.catch_up()
        docs = [d for d in self.tables["script_revisions"].values() if name is None or d["name"] == name]
        return clone(sorted(docs, key=_newest_first))

    # --- the audit trail ---
    @contextlib.asynccontextmanager
    async def _audit_flock(self) -> AsyncIterator[None]:
        """``audit.lock`` in the data dir: held from reading the chain's head until the new
        events are durable and published, so a CLI process and the server never both append
        after the same head.  Taken without waiting when free (the common case: nobody else
        appends); else waited for in a thread (another process's append is one fsync, but a
        compaction may hold its journal longer: the event loop goes on serving)."""
        fd = os.open(self.data_dir / "audit.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    async def append_audit(self, events: list[dict[str, Any]], *, lazy: bool = False) -> AuditRecord | None:
        """Under the process's lock and ``audit.lock``: catch up (another process's events), chain
        after the head, commit (the journal's group commit: the lines share the fsync of whatever
        else is written in that batch; ``lazy``: they wait a few milliseconds for the next other
        write, ``Journal.commit``)."""
        if not events:
            return None
        async with self._audit_lock, self._audit_flock():
            if self.journal.degraded is not None:
                await self.journal.writable()
            self.journal.catch_up()
            docs = chain(events, *self._audit_head)
            lines = [self.journal.line("audit", d["id"], cast("dict[str, Any]", d)) for d in docs]
            await self.journal.commit(lines, [self._put("audit", d["id"], cast("dict[str, Any]", d))
                                              for d in docs], lazy=lazy)
        return clone(docs[-1])

    async def add_audit_records(self, records: list[AuditRecord]) -> int:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        table = self.tables["audit"]
        fresh = [clone(dict(r)) for r in records if str(r["seq"]) not in table]
        for doc in fresh:
            doc["id"] = str(doc["seq"])
        lines = [self.journal.line("audit", doc["id"], doc) for doc in fresh]
        await self.journal.commit(lines, [self._put("audit", doc["id"], doc) for doc in fresh])
        return len(fresh)

    async def list_audit(self, *, after: int = 0, since: float | None = None, action: str | None = None,
                         jti: str | None = None, org_id: str | None = None,
                         limit: int | None = None) -> list[AuditRecord]:
        self.journal.catch_up()
        docs = self.tables["audit"].values()
        found = [d for d in docs if d["seq"] > after and (since is None or d["time"] >= since)
                 and (action is None or d["action"] == action) and (jti is None or d["jti"] == jti)
                 and (org_id is None or d["org_id"] == org_id)]
        found.sort(key=lambda d: d["seq"])
        return clone(found[:limit] if limit is not None else found)

    async def delete_audit_through(self, seq: int) -> int:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        gone = [doc_id for doc_id, doc in self.tables["audit"].items() if doc["seq"] <= seq]
        lines = [self.journal.line("audit", doc_id, None) for doc_id in gone]
        await self.journal.commit(lines, [self._delete("audit", doc_id) for doc_id in gone])
        return len(gone)

    async def put_audit_checkpoint(self, record: AuditCheckpointRecord) -> None:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        await self._put_record("audit_checkpoints", record["id"], dict(record))

    async def list_audit_checkpoints(self) -> list[AuditCheckpointRecord]:
        self.journal.catch_up()
        return clone(sorted(self.tables["audit_checkpoints"].values(), key=lambda d: d["seq"]))

    # --- webhooks: subscribers and the outbox (``webhooks.py``) ---
    async def add_webhook(self, record: WebhookRecord) -> None:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        if record["id"] in self.tables["webhooks"]:
            raise ValueError(f"a webhook with id {record['id']} exists")
        await self._put_record("webhooks", record["id"], dict(record))

    async def get_webhook(self, webhook_id: str) -> WebhookRecord | None:
        return self._get("webhooks", webhook_id)

    async def list_webhooks(self) -> list[WebhookRecord]:
        return self._all("webhooks")

    async def delete_webhook(self, webhook_id: str) -> bool:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        if webhook_id not in self.tables["webhooks"]:
            return False
        line = self.journal.line("webhooks", webhook_id, None)
        await self.journal.commit([line], [self._delete("webhooks", webhook_id)])
        return True

    async def add_deliveries(self, records: list[DeliveryRecord]) -> None:
        if not records:
            return
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        docs = [clone(dict(r)) for r in records]
        lines = [self.journal.line("webhook_deliveries", doc["id"], doc) for doc in docs]
        await self.journal.commit(lines, [self._put("webhook_deliveries", doc["id"], doc) for doc in docs])

    async def claim_deliveries(self, now: float, lease_until: float, limit: int) -> list[DeliveryRecord]:
        """In one synchronous step, and in memory only: one server process owns a data dir
        (``server.lock``), so its claims need no line; after a crash nothing is claimed."""
        self.journal.catch_up()
        table = self.tables["webhook_deliveries"]
        due = []
        for doc_id in self._pending:
            doc = table[doc_id]
            if doc["next_attempt_at"] <= now and self._leases.get(doc_id, 0.0) <= now:
                due.append(doc)
        due.sort(key=lambda d: (d["next_attempt_at"], d["created_at"]))
        for doc in due[:limit]:
            self._leases[doc["id"]] = lease_until
        return [dict(clone(doc), lease_until=lease_until) for doc in due[:limit]]  # type: ignore[misc]

    async def update_delivery(self, delivery_id: str, changes: dict[str, Any]) -> None:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        doc = self.tables["webhook_deliveries"].get(delivery_id)
        if doc is None:
            raise KeyError(delivery_id)
        self._leases.pop(delivery_id, None)
        await self._put_record("webhook_deliveries", delivery_id, dict(doc, **changes))

    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None:
        return self._get("webhook_deliveries", delivery_id)

    async def list_deliveries(self, *, state: str | None = None, subscriber: str | None = None,
                              limit: int = 1000) -> list[DeliveryRecord]:
        self.journal.catch_up()
        docs = [d for d in self.tables["webhook_deliveries"].values()
                if (state is None or d["state"] == state)
                and (subscriber is None or d["subscriber"] == subscriber)]
        docs.sort(key=lambda d: (d["created_at"], d["id"]))
        return clone(docs[:limit])

    async def purge_deliveries(self, before: float) -> int:
        if self.journal.degraded is not None:
            await self.journal.writable()
        self.journal.catch_up()
        old = [doc_id for doc_id, d in self.tables["webhook_deliveries"].items()
               if d["state"] in (DELIVERY_DELIVERED, DELIVERY_DEAD) and d["created_at"] < before]
        if old:
            lines = [self.journal.line("webhook_deliveries", doc_id, None) for doc_id in old]
            await self.journal.commit(lines, [self._delete("webhook_deliveries", doc_id) for doc_id in old])
        return len(old)

    # --- coordination ---
    @contextlib.asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        """Nothing to hold: a data dir has one server process (``server.lock``)."""
        yield

    # --- health ---
    async def check(self) -> None:
        """Readiness: StoreDegraded (with its reason) while writes are refused; the journal's
        identity is checked here too, and a due probe runs."""
        await self.journal.check()
