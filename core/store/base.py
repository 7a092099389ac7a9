"""The store interface: what the service needs from persistence, and nothing more.

Records are the plain dicts of ``records``; callers get copies they may change freely.  Every
write method returns only after the change is durable (on disk or committed).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

from .records import (AssertionRecord, AuditCheckpointRecord, AuditRecord, ClientRecord, DeliveryRecord,
                      KeyRecord, ScriptRevisionRecord, StatusListRecord, TemplateRecord, WebhookRecord)

if TYPE_CHECKING:  # the SSA record is the model's (``ssa.py``, which imports this package)
    from ..ssa import SsaRecord
    from .search import SsaFilter


class Store(Protocol):
    """Persistence for SSAs, clients, keys and templates.

    Lookups by jti, org_id, creator_id and client_id do not scan.  All methods are coroutines so
    that a networked backend fits the same interface; the embedded store answers reads from memory.
    """

    async def open(self) -> None:
        """Load or connect; the server calls it once at start-up (the CLI too)."""

    async def close(self) -> None:
        """Flush and release files, locks and connections."""

    # --- SSAs ---
    async def add_ssa(self, record: SsaRecord) -> None:
        """Store a new SSA; ValueError if its jti exists."""

    async def add_ssas(self, records: list[SsaRecord]) -> None:
        """Bulk insert (benchmark preload, import) with one durable write."""

    async def get_ssa(self, jti: str) -> SsaRecord | None:
        """The SSA with this jti, whatever its status."""

    async def find_ssas(self, *, jti: str | None = None, org_id: str | None = None,
                        status: str | None = None, creator_id: str | None = None) -> list[SsaRecord]:
        """SSAs matching every given filter (AND), oldest first."""

    async def search_ssas(self, where: SsaFilter, limit: int) -> list[SsaRecord]:
        """The first ``limit`` SSAs, oldest first, matching every term of ``where`` (the admin
        search; ``search.py`` defines what a term matches, the same on every store)."""

    async def mark_used(self, jti: str, now: int) -> SsaRecord | None:
        """Atomically: if the SSA is ACTIVE and expiration > now, set USED (one-time) and return it.

        Returns the record (after the change) when validation succeeds, else None.  A reusable
        SSA (one_time_use false) is returned unchanged.  Of many concurrent calls for one
        one-time SSA, exactly one gets the record.
        """

    async def revoke_ssas(self, *, jti: str | None = None, org_id: str | None = None,
                          creator_id: str | None = None, now: int) -> list[SsaRecord]:
        """Set every ACTIVE SSA matching the filters (AND) to REVOKED with expiration = now.

        Returns the revoked records (after the change); [] when nothing matched.
        """

    async def expire_and_purge(self, now: int, grace: int,
                               expired_out: list[tuple[str, str]] | None = None) -> tuple[int, int]:
        """ACTIVE SSAs with expiration <= now become EXPIRED; SSAs not ACTIVE whose expiration
        is older than now - grace are deleted, except those whose status list entry's ``until``
        (the JWT's own exp: a revocation sets ``expiration`` to now) is not older yet, since the
        list must keep their bit while their JWT verifies.  Client assertion jtis past their
        ``expires_at`` are deleted too.  Returns (expired, purged) SSAs; ``expired_out`` gets the
        (jti, org_id) of each SSA this call expired (of processes sharing the store, only the
        one that changed it)."""

    async def count_ssas(self) -> int:
        """How many SSAs are stored, whatever their status."""

    async def count_active_ssas(self, now: int) -> int:
        """How many SSAs are ACTIVE with an expiration after ``now`` (the ``ssa_active`` gauge)."""

    # --- Token Status Lists (``status_list.py``, ``status_issuer.py``) ---
    async def reserve_status_counters(self, count: int, size: int, key: str,
                                      now: int) -> tuple[StatusListRecord, int]:
        """Atomically (across every process sharing the store) hand out ``count`` counters of the
        newest list that still has them, else of a new list (``size``, ``key``); returns the list
        after the change and the first counter.  A full list is never changed again."""

    async def get_status_list(self, list_id: str) -> StatusListRecord | None: ...
    async def list_status_lists(self) -> list[StatusListRecord]: ...
    async def add_status_list(self, record: StatusListRecord) -> None:
        """Import: store a list as it is (ValueError if its id exists)."""

    async def invalid_status_indexes(self, list_id: str) -> list[int]:
        """The indexes of the list's SSAs that are USED or REVOKED (their status list bit is 1)."""

    # --- clients ---
    async def add_client(self, record: ClientRecord) -> None: ...
    async def get_client(self, client_id: str) -> ClientRecord | None: ...
    async def has_client(self, client_id: str) -> bool:
        """Whether the client exists (asked on every authenticated request: no copy)."""

    async def list_clients(self) -> list[ClientRecord]: ...
    async def delete_client(self, client_id: str) -> bool: ...

    # --- client assertions' jtis (``client_assertions.py``: the replay cache) ---
    async def use_assertion(self, record: AssertionRecord, now: int) -> bool:
        """Keep the assertion's jti until ``expires_at``: True if its id was not held (or only by an
        entry expired by ``now``), False for a replay.  Of concurrent calls with one id, in any
        number of processes sharing the store, exactly one gets True."""

    async def list_assertions(self) -> list[AssertionRecord]:
        """Every kept jti (the export)."""

    # --- keys ---
    async def add_key(self, record: KeyRecord) -> None: ...
    async def update_key(self, kid: str, changes: dict[str, Any]) -> None: ...
    async def list_keys(self) -> list[KeyRecord]: ...

    # --- templates ---
    async def put_template(self, record: TemplateRecord) -> None: ...
    async def get_template(self, name: str) -> TemplateRecord | None: ...
    async def list_templates(self) -> list[TemplateRecord]: ...
    async def delete_template(self, name: str) -> bool:
        """Delete the template; whether it existed."""

    # --- script revisions (``script_revisions.py``) ---
    async def put_script_revision(self, record: ScriptRevisionRecord, keep: int | None) -> bool:
        """Record a revision once (by its id, atomically across processes): True when it is new.
        A revision stored already keeps its ``seen_at``, ``seen_by`` and texts; only its ``state``
        and ``reason`` take the new values.  With ``keep``, the script's revisions beyond the
        ``keep`` newest (by ``seen_at``) are deleted; ``None`` (import) deletes nothing."""

    async def get_script_revision(self, revision_id: str) -> ScriptRevisionRecord | None: ...
    async def list_script_revisions(self, name: str | None = None) -> list[ScriptRevisionRecord]:
        """``name``'s revisions newest first (every script's, for the export, without ``name``)."""

    # --- the audit trail (``audit.py``) ---
    async def append_audit(self, events: list[dict[str, Any]], *, lazy: bool = False) -> AuditRecord | None:
        """Append events (an ``Event``'s fields) to the hash chain (``records.chain``): the head
        is read and the new records written in one step serialised across every process sharing
        the store, so two writers never fork the chain.  Returns the new head (the last record
        appended; None for no events).  ``lazy``: the write may wait a few milliseconds to share
        the durable write of another change (the embedded store's journal)."""

    async def add_audit_records(self, records: list[AuditRecord]) -> int:
        """Import: store records as they are (their seq and hashes), skipping seqs held; how many."""

    async def list_audit(self, *, after: int = 0, since: float | None = None, action: str | None = None,
                         jti: str | None = None, org_id: str | None = None,
                         limit: int | None = None) -> list[AuditRecord]:
        """Events with seq > ``after`` (and time >= ``since``, the given fields equal), by seq."""

    async def delete_audit_through(self, seq: int) -> int:
        """Retention: delete the events with seq <= ``seq``; how many."""

    async def put_audit_checkpoint(self, record: AuditCheckpointRecord) -> None:
        """Store a checkpoint (one per seq: a second one for the same seq replaces it)."""

    async def list_audit_checkpoints(self) -> list[AuditCheckpointRecord]:
        """Every checkpoint, by seq."""

    # --- webhooks: subscribers and the outbox (``webhooks.py``) ---
    async def add_webhook(self, record: WebhookRecord) -> None:
        """ValueError if its id exists."""

    async def get_webhook(self, webhook_id: str) -> WebhookRecord | None: ...
    async def list_webhooks(self) -> list[WebhookRecord]: ...
    async def delete_webhook(self, webhook_id: str) -> bool: ...
    async def add_deliveries(self, records: list[DeliveryRecord]) -> None:
        """The outbox rows of one event batch, in one durable write."""

    async def claim_deliveries(self, now: float, lease_until: float, limit: int) -> list[DeliveryRecord]:
        """Up to ``limit`` pending deliveries due by ``now`` that no claim holds (or whose claim
        ended by ``now``), oldest due first, each now claimed until ``lease_until``.  Of concurrent
        claims, in any number of processes sharing the store, each delivery goes to one."""

    async def update_delivery(self, delivery_id: str, changes: dict[str, Any]) -> None:
        """Set fields (state, attempts, next_attempt_at, lease_until, last_error, delivered_at);
        KeyError if there is no such delivery."""

    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None: ...
    async def list_deliveries(self, *, state: str | None = None, subscriber: str | None = None,
                              limit: int = 1000) -> list[DeliveryRecord]:
        """Deliveries matching the filters, oldest first, at most ``limit``."""

    async def purge_deliveries(self, before: float) -> int:
        """Delete the delivered and dead deliveries created before ``before``; how many."""

    async def compact_keys(self) -> bool:
        """Drop the superseded versions of key records the store still holds (after they were
        encrypted or re-encrypted): the embedded store compacts its journal (the exclusive owner
        only), PostgreSQL rewrites the keys table (``VACUUM FULL keys``).  Whether it ran."""

    # --- coordination ---
    def lock(self, name: str) -> AbstractAsyncContextManager[None]:
        """``async with store.lock("keys"):`` serialises key set-up and rotation across every
        process sharing the store (one active key per use even when workers start together)."""

    # --- health ---
    async def check(self) -> None:
        """Raise StoreUnavailable if reads or writes cannot be served now."""
