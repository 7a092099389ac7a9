"""The rotation timeline: which key signs at a given time, and each key's state (``docs/keys.md``).

A rotated key is stored as *next* with the time it starts to sign (``activates_at``); it is in
``/jwks`` from the moment it is stored.  Which key signs is decided by the clock against the stored
``activates_at``, never by a write at the switch: every process holding the same records (nodes,
workers, the CLI) signs with the same key at a given second, and since a key is published
``key_activation_delay`` before it signs, each has read it long before (``key_refresh_interval``).
The statuses are written afterwards by the cleaner (``KeyRing.settle``).
"""

from __future__ import annotations

from collections.abc import Iterable

from .store import KEY_ACTIVE, KEY_NEXT, KEY_RETIRED, KEY_RETIRING, KeyRecord

SIGNING_STATUSES = (KEY_NEXT, KEY_ACTIVE)  # the stored statuses of keys that sign now or later


def activates_at(record: KeyRecord) -> int:
    """When the key signs from (keys made before rotation had a delay: when they were made)."""
    at = record.get("activates_at")
    return record["created_at"] if at is None else at


def _candidates(records: Iterable[KeyRecord], use: str) -> list[KeyRecord]:
    return [r for r in records if r["use"] == use and r["status"] in SIGNING_STATUSES]


def signing_key(records: Iterable[KeyRecord], use: str, now: float) -> KeyRecord | None:
    """The key of ``use`` that signs at ``now``: of the next and active keys whose activation time
    has come, the latest activated (then the newest)."""
    ready = [r for r in _candidates(records, use) if activates_at(r) <= now]
    return max(ready, key=lambda r: (activates_at(r), r["created_at"], r["kid"])) if ready else None


def pending(records: Iterable[KeyRecord], use: str, now: float) -> list[KeyRecord]:
    """Keys of ``use`` announced but not signing yet at ``now``."""
    return [r for r in _candidates(records, use) if activates_at(r) > now]


def next_switch(records: Iterable[KeyRecord], now: float) -> float:
    """The next time the signing key of any use changes (infinity: none is pending)."""
    times = [activates_at(r) for r in records if r["status"] in SIGNING_STATUSES and activates_at(r) > now]
    return float(min(times)) if times else float("inf")


def superseded(records: Iterable[KeyRecord], use: str, now: float) -> list[KeyRecord]:
    """Keys stored as next or active that signed before the key signing at ``now`` took over:
    verify only (retiring), whatever their stored status says until ``settle`` writes it."""
    current = signing_key(records, use, now)
    if current is None:
        return []
    return [r for r in _candidates(records, use) if r is not current and activates_at(r) <= now]


def state(record: KeyRecord, records: Iterable[KeyRecord], now: float) -> str:
    """The key's state at ``now``: next, active, retiring or retired (``keys list``)."""
    if record["status"] in (KEY_RETIRING, KEY_RETIRED):
        return record["status"]
    if activates_at(record) > now:
        return KEY_NEXT
    current = signing_key(records, record["use"], now)
    return KEY_ACTIVE if current is not None and current["kid"] == record["kid"] else KEY_RETIRING
