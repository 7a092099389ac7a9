"""The store interface: what the service needs from persistence, and nothing more.

Records are plain JSON-ready dicts (TypedDicts: below, and the SSA's in ``ssa.py``), so every
backend stores them as they are and every caller gets copies it may change freely.  Every write
method returns only after the change is durable (on disk or committed).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, NotRequired, Protocol, TypedDict

if TYPE_CHECKING:  # the SSA record is the model's (``ssa.py``, which imports ``clone`` from here)
    from .ssa import SsaRecord


class ClientRecord(TypedDict):
    client_id: str
    name: str
    secret_hash: str  # "sha256$<salt hex>$<digest hex>"; the secret itself is never stored
    scopes: list[str]
    created_at: int


class KeyRecord(TypedDict):
    kid: str
    alg: str  # RS256 ... EdDSA for SSA keys, HS256 for the access-token key
    use: str  # "ssa" (signs SSAs, published in /jwks) or "token" (signs access tokens, never published)
    jwk: dict[str, Any]  # the private JWK; lives only in the store, which is 0600
    status: str  # "active" (signs), "retiring" (verify only, published until remove_after), "retired"
    created_at: int
    remove_after: NotRequired[int | None]  # epoch seconds after which a retiring key leaves /jwks


class TemplateRecord(TypedDict):
    name: str
    fields: dict[str, Any]  # the POST /ssa body to reuse
    created_at: int


def clone(value: Any) -> Any:
    """A deep copy of a JSON value (several times faster than ``copy.deepcopy``)."""
    if type(value) is dict:
        return {k: clone(v) for k, v in value.items()}
    if type(value) is list:
        return [clone(v) for v in value]
    return value


class StoreLocked(RuntimeError):
    """Another server process holds this data dir."""


class StoreUnavailable(RuntimeError):
    """The backend cannot be reached right now (maps to 503)."""


class StoreDegraded(StoreUnavailable):
    """The embedded store refuses writes until its cause is gone (a full disk, an I/O error, a
    journal deleted or replaced); reads go on.  The message names the file and the cause (for the
    CLI and the one log line the store writes when it degrades); ``reason`` is the short public
    form (``/health/ready``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnstorableValue(ValueError):
    """A value the store would not read back exactly as it was given (NaN, a key that is not a
    string, text that is not UTF-8, text PostgreSQL cannot hold); nothing was stored."""


class StoreSchemaError(RuntimeError):
    """The database schema is not the version this server needs (run ``ssa-server store migrate``)."""


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

    async def expire_and_purge(self, now: int, grace: int) -> tuple[int, int]:
        """ACTIVE SSAs with expiration <= now become EXPIRED; SSAs not ACTIVE whose expiration
        is older than now - grace are deleted.  Returns (expired, purged)."""

    async def count_ssas(self) -> int:
        """How many SSAs are stored, whatever their status."""

    # --- clients ---
    async def add_client(self, record: ClientRecord) -> None: ...
    async def get_client(self, client_id: str) -> ClientRecord | None: ...
    async def has_client(self, client_id: str) -> bool:
        """Whether the client exists (asked on every authenticated request: no copy)."""

    async def list_clients(self) -> list[ClientRecord]: ...
    async def delete_client(self, client_id: str) -> bool: ...

    # --- keys ---
    async def add_key(self, record: KeyRecord) -> None: ...
    async def update_key(self, kid: str, changes: dict[str, Any]) -> None: ...
    async def list_keys(self) -> list[KeyRecord]: ...

    # --- templates ---
    async def put_template(self, record: TemplateRecord) -> None: ...
    async def get_template(self, name: str) -> TemplateRecord | None: ...
    async def list_templates(self) -> list[TemplateRecord]: ...

    # --- coordination ---
    def lock(self, name: str) -> AbstractAsyncContextManager[None]:
        """``async with store.lock("keys"):`` serialises key set-up and rotation across every
        process sharing the store (one active key per use even when workers start together)."""

    # --- health ---
    async def check(self) -> None:
        """Raise StoreUnavailable if reads or writes cannot be served now."""
