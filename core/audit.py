"""The audit trail: every event (``events.py``) appended to a hash chain in the store, anchored by
signed checkpoints, purged by retention, listed by ``GET /audit`` and ``ssa-server audit list``.

Why a chain: each stored event carries the SHA-256 of the previous one (``prev_hash``) and its own
(``hash``, over its canonical JSON: ``records.audit_hash``), so changing, removing or reordering
an event breaks the chain at that event (``audit_verify.py`` names it).  Rewriting the whole chain
from some event on would go unnoticed but for the **checkpoints**: every
``audit_checkpoint_events`` events or ``audit_checkpoint_interval`` seconds, a JWS over
(seq, hash, time) signed with the SSA signing key; the chain up to a checkpoint is as signed.

Why here and not in the services: the services say what happened (``Events.emit``); this sink makes
it durable before ``emit`` returns.  The store serialises the appends (``Store.append_audit``:
``audit.lock`` + the journal for the embedded store, an advisory lock and one transaction for
PostgreSQL), so the chain is one line whatever the number of processes and nodes.

Cost on the create path, and what a crash may cost: an event is published after its action
succeeded (never an event of an action that did not happen).  ``publish`` queues it and returns;
a background task appends what is queued as one append (concurrent requests' events coalesced:
one lock hold, one commit), which the embedded journal's group commit writes in its next batch,
in the same fsync as the other requests' writes.  So the request does not wait for a second
fsync round of its own: a create answered at fixed concurrency costs one fsync round, not two
(measured: awaiting its event halved the creates per second, one request or 32 at a time).
The price: a crash (kill -9, power) in the few milliseconds between the answer and that next
batch loses the events of the actions answered meanwhile; the chain stays whole (their seqs are
taken again).  ``audit_sync = true`` makes every request wait until its event is durable
(``publish`` awaits the append): no event of an answered action is ever lost.  A CLI command's
events are durable before it exits either way (``Server.stop`` flushes the queue), and a read
of the trail in the same process (``GET /audit``) flushes it first.
``audit_enabled = false`` removes the sink (``Events.wanted`` is then False: no event is built).
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequest
from .events import ACTIONS, Event
from .store import AuditCheckpointRecord, AuditRecord, Store, StoreUnavailable, UnstorableValue

if TYPE_CHECKING:
    from .keys import KeyRing

log = logging.getLogger("ssa_server.audit")

CHECKPOINT_TYP = "audit-checkpoint+jwt"
PAGE_DEFAULT, PAGE_MAX = 100, 1000
_SCAN_PAGE = 5000  # events read at a time by a walk of the whole chain (verify, export, retention)


def event_fields(e: Event) -> dict[str, Any]:
    """The fields an event is stored with (``records.AuditRecord`` without seq and hashes); by
    hand, not ``dataclasses.asdict`` (its deep copy was the sink's largest cost per create)."""
    return {"time": e.time, "action": e.action, "actor": e.actor, "outcome": e.outcome, "reason": e.reason,
            "jti": e.jti, "org_id": e.org_id, "kid": e.kid, "address": e.address, "request_id": e.request_id,
            "details": dict(e.details)}


@dataclass(frozen=True)
class AuditQuery:
    """A page of ``GET /audit`` / ``audit list``: events with seq > ``after`` (the cursor) and
    the filters, at most ``limit``."""

    after: int = 0
    since: float | None = None
    action: str | None = None
    jti: str | None = None
    org_id: str | None = None
    limit: int = PAGE_DEFAULT

    @classmethod
    def parse(cls, *, next: str | None = None, since: str | None = None, action: str | None = None,
              jti: str | None = None, org_id: str | None = None, limit: str | None = None) -> AuditQuery:
        """From text (query parameters, CLI flags; ``next`` is a page's cursor); InvalidRequest
        (400) naming the bad one."""
        if action is not None and action not in ACTIONS:
            raise InvalidRequest(f"'action' must be one of {', '.join(sorted(ACTIONS))}.")
        return cls(after=_count("next", next, 0, 0, 2**62), since=_time(since), action=action,
                   jti=jti, org_id=org_id, limit=_count("limit", limit, PAGE_DEFAULT, 1, PAGE_MAX))


def _count(name: str, text: str | None, default: int, low: int, high: int) -> int:
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and low <= int(text) <= high):
        raise InvalidRequest(f"'{name}' must be an integer from {low} to {high}.")
    return int(text)


def _time(text: str | None) -> float | None:
    """Epoch seconds, or an ISO 8601 date-time (UTC when it names no offset)."""
    if text is None:
        return None
    try:
        if text.isascii() and text.replace(".", "", 1).isdigit() and len(text) <= 20:
            return float(text)
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest("'since' must be epoch seconds or an ISO 8601 date-time.") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


class AuditTrail:
    """The audit sink (``events.EventSink``) and the trail's service: list, checkpoints, retention."""

    def __init__(self, store: Store, keys: KeyRing | None = None, *, checkpoint_events: int = 1000,
                 checkpoint_interval: float = 3600.0, retention_days: int = 0, sync: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        """``sync``: ``publish`` returns once its events are durable (``audit_sync``); else once
        they are queued for the next append (see the module's docstring)."""
        self.store = store
        self.sync = sync
        self.keys = keys
        self.checkpoint_events = checkpoint_events
        self.checkpoint_interval = checkpoint_interval
        self.retention_days = retention_days
        self._clock = clock
        self._queue: list[tuple[list[dict[str, Any]], asyncio.Future[None] | None]] = []
        self._draining: asyncio.Task[None] | None = None
        self._checkpointed: tuple[int, float] | None = None  # the newest checkpoint's (seq, time)

    # --- the sink ---
    async def publish(self, events: Sequence[Event]) -> None:
        """Queue the events for the next append (concurrent calls share one); with ``sync``,
        return once they are durable in the chain."""
        future = asyncio.get_running_loop().create_future() if self.sync else None
        self._queue.append(([event_fields(e) for e in events], future))
        if self._draining is None or self._draining.done():
            # (a context of its own: not the request's, whose id would tag the task's log lines)
            self._draining = asyncio.create_task(self._drain(), name="ssa-audit-append",
                                                 context=contextvars.Context())
        if future is not None:
            await future

    async def flush(self) -> None:
        """Return once every event published so far is in the store (a read of the trail in
        this process sees them; ``Server.stop`` calls it before the store closes)."""
        while self._draining is not None and not self._draining.done():
            await asyncio.shield(self._draining)

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            head = await self._append(batch)
            if isinstance(head, UnstorableValue) and len(batch) > 1:  # one publisher's events are the cause
                for one in batch:
                    alone = await self._append([one])
                    head = alone if not isinstance(alone, Exception) else head
            if head is not None and not isinstance(head, Exception):
                await self._checkpoint_if_due(head, by_count=True)

    async def _append(self, batch: list[tuple[list[dict[str, Any]], asyncio.Future[None] | None]]
                      ) -> AuditRecord | Exception | None:
        """One append of the batch's events: the new head, or what the store raised (the
        futures failed, or the failure logged).  (A value the store cannot hold, say text
        PostgreSQL refuses, in one request's event must not cost the others theirs: ``_drain``
        retries each publisher's events alone after an ``UnstorableValue``.)"""
        fields = [f for part, _ in batch for f in part]
        try:
            head = await self.store.append_audit(fields, lazy=not self.sync)
        except Exception as e:
            if len(batch) == 1 or not isinstance(e, UnstorableValue):
                for _, future in batch[1:]:
                    if future is not None and not future.done():
                        future.set_exception(e)
                _, future = batch[0]
                if future is not None and not future.done():
                    future.set_exception(e)  # the publisher's emit logs it (events.Events)
                elif isinstance(e, StoreUnavailable):  # (it logged why, once: a full disk, a lost journal)
                    log.warning("%d audit events not stored: the store refuses writes (%s)", len(fields),
                                type(e).__name__)
                else:
                    log.error("%d audit events not stored: %s: %s", len(fields), type(e).__name__, e)
            return e
        for _, future in batch:
            if future is not None and not future.done():
                future.set_result(None)
        return head

    # --- checkpoints ---
    async def _last_checkpoint(self) -> tuple[int, float]:
        if self._checkpointed is None:
            found = await self.store.list_audit_checkpoints()
            self._checkpointed = (found[-1]["seq"], found[-1]["time"]) if found else (0, 0.0)
        return self._checkpointed

    async def _checkpoint_if_due(self, head: AuditRecord, *, by_count: bool,
                                 oldest: float | None = None) -> None:
        """By count (after an append), or by time (the cleaner: the oldest event no checkpoint
        covers, at ``oldest``, has waited ``checkpoint_interval``)."""
        seq, _ = await self._last_checkpoint()
        if head["seq"] <= seq:
            return
        due = (head["seq"] - seq >= self.checkpoint_events if by_count
               else oldest is not None and self._clock() - oldest >= self.checkpoint_interval)
        if due:
            try:
                await self.checkpoint(head, "interval")
            except Exception as e:  # the next append or cleaner run retries
                log.warning("audit checkpoint at seq %d not written yet: %s", head["seq"], type(e).__name__)

    async def checkpoint(self, event: AuditRecord, reason: str) -> AuditCheckpointRecord | None:
        """Sign and store a checkpoint of ``event``; None where no SSA key can sign (a CLI
        command that loaded no keys: the server checkpoints later)."""
        if self.keys is None:
            return None
        try:
            self.keys.active()
        except RuntimeError:
            return None
        now = self._clock()
        claims = {"seq": event["seq"], "hash": event["hash"], "time": now}
        jws = await self.keys.sign({"typ": CHECKPOINT_TYP}, claims)
        from .audit_verify import jws_kid

        record = AuditCheckpointRecord(id=str(event["seq"]), seq=event["seq"], hash=event["hash"], time=now,
                                       kid=jws_kid(jws), jws=jws, reason=reason)
        await self.store.put_audit_checkpoint(record)
        if self._checkpointed is None or event["seq"] > self._checkpointed[0]:
            self._checkpointed = (event["seq"], now)
        return record

    # --- the cleaner's work ---
    async def maintain(self) -> None:
        """A checkpoint once the oldest event none covers is ``audit_checkpoint_interval`` old;
        retention."""
        seq, _ = await self._last_checkpoint()
        newer = await self.store.list_audit(after=seq)
        if newer:
            await self._checkpoint_if_due(newer[-1], by_count=False, oldest=newer[0]["time"])
        if self.retention_days > 0:
            await self.purge(self._clock() - self.retention_days * 86400)

    async def purge(self, before: float) -> int:
        """Delete the events older than ``before`` (the newest event is always kept, so the chain
        goes on from it), after a checkpoint of the last one deleted: the first event kept then
        verifies from that anchor (its ``prev_hash`` is the checkpoint's ``hash``)."""
        cut: AuditRecord | None = None
        newest_seq = 0
        after = 0
        while True:
            page = await self.store.list_audit(after=after, limit=_SCAN_PAGE)
            if not page:
                break
            newest_seq = page[-1]["seq"]
            old = [e for e in page if e["time"] < before]
            if old:
                cut = old[-1]
            if len(old) < len(page):
                break
            after = newest_seq
        if cut is None:
            return 0
        if cut["seq"] >= newest_seq:  # keep the head
            kept = await self.store.list_audit(after=cut["seq"] - 2, limit=1)
            if not kept or kept[0]["seq"] >= cut["seq"]:
                return 0
            cut = kept[0]
        if await self.checkpoint(cut, "retention") is None:
            return 0  # without an anchor the rest would not verify: keep everything
        gone = await self.store.delete_audit_through(cut["seq"])
        log.info("audit retention: %d events before seq %d purged (checkpoint at seq %d)",
                 gone, cut["seq"] + 1, cut["seq"])
        return gone

    # --- reading ---
    async def page(self, query: AuditQuery) -> dict[str, Any]:
        """``{"events": [...], "next": cursor or None}``: ``next`` is given back as ``next`` for
        the following page (None: no more)."""
        await self.flush()
        found = await self.store.list_audit(after=query.after, since=query.since, action=query.action,
                                            jti=query.jti, org_id=query.org_id, limit=query.limit + 1)
        more = len(found) > query.limit
        events = found[:query.limit]
        return {"events": events, "next": events[-1]["seq"] if more and events else None}

    async def walk(self) -> Any:
        """Every event, by seq, a page at a time (an async iterator)."""
        after = 0
        while True:
            page = await self.store.list_audit(after=after, limit=_SCAN_PAGE)
            if not page:
                return
            for event in page:
                yield event
            after = page[-1]["seq"]

    async def verify(self) -> tuple[Any, dict[str, Any]]:
        """``audit_verify.verify`` over the whole chain, its checkpoints and the stored keys."""
        from .audit_verify import verify

        await self.flush()
        checkpoints = await self.store.list_audit_checkpoints()
        return await verify(self.walk(), checkpoints, await self.store.list_keys())
