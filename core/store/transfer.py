"""``store export`` / ``store import``: every record of a store as JSON lines, and back.

One line per record: ``{"table": "ssa"|"clients"|"keys"|"templates"|"statuslists"|"script_revisions"|
"assertion_jtis", "record": {...}}`` (a private_key_jwt client's record carries its public ``jwks`` or
its ``jwks_uri``; ``assertion_jtis`` are the client assertions' replay cache).  The
same format leaves and enters both stores, so a deployment moves from TinyDB to PostgreSQL and
back without losing anything.  Exports hold the private signing keys as the store holds them
(encrypted under ``key_encryption_key``, or in the clear without one): they are written 0600.
``private_keys=False`` (``store export --no-private-keys``) leaves every private part out: each
key keeps only its public JWK, and the access-token HMAC key (no public part) is left out.

Import into an empty store recreates it exactly.  Into a store that already has records, a record
whose id exists there is skipped (counted), and imported signing keys that would make a second
active key of their use are stored as retiring instead (still published in ``/jwks`` until the
imported SSAs they signed expire), so the target keeps exactly one active key per use.  A key
without its private part (an export made with ``--no-private-keys``) is imported verify-only: as
retiring if it was next or active, so a store made from such an export publishes and verifies with
it until the imported SSAs expire, and makes new keys of its own to sign with.

Lines are read by the request bodies' rules (``jsonvalues``: no NaN or Infinity, exact integers,
UTF-8), nesting at most two levels more than a body (the line's object and the record around a
custom attribute or a template's fields), checked before anything recursive reads the line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, BinaryIO, cast

from .. import jsonvalues
from ..ssa import ACTIVE, REQUIRED_RECORD_FIELDS, SsaRecord, hook_changes_problem
from .base import Store
from .records import (ENCRYPTED_FIELD, ID_FIELDS, KEY_ACTIVE, KEY_NEXT, KEY_RETIRING, REVISION_CONFIG_MAX,
                      REVISION_SOURCE_MAX, REVISION_STATES, NOT_EXPORTED, TABLES, AssertionRecord,
                      AuditCheckpointRecord, AuditRecord, KeyRecord, can_sign, public_jwk)

_REQUIRED = {
    "ssa": REQUIRED_RECORD_FIELDS,  # every field of ssa.SsaRecord but the optional ones
    "clients": ("secret_hash", "scopes", "created_at"),
    "keys": ("alg", "use", "jwk", "status", "created_at"),
    "templates": ("fields", "created_at"),
    "statuslists": ("size", "next", "key", "created_at"),
    "script_revisions": ("name", "revision", "seen_at", "state", "reason", "source", "config", "seen_by"),
    "assertion_jtis": ("client_id", "expires_at"),
    "audit": ("seq", "time", "action", "actor", "prev_hash", "hash"),
    "audit_checkpoints": ("seq", "hash", "time", "kid", "jws"),
    "webhooks": ("url", "events", "created_at"),
}
EXPORTED = tuple(t for t in TABLES if t not in NOT_EXPORTED)  # the outbox's deliveries stay behind
_BATCH = 1000
MAX_LINE_DEPTH = jsonvalues.MAX_DEPTH + 2


class TransferError(ValueError):
    """The import file is not a valid export (the message names the line)."""


async def export_records(store: Store, *, private_keys: bool = True) -> Iterator[bytes]:
    """The store as JSON lines, UTF-8 (the keys first: an importer can verify SSAs as it goes)."""
    out: list[bytes] = []
    for table in EXPORTED:
        for record in await _all(store, table):
            if table == "keys" and not private_keys:
                if record["jwk"].get("kty") == "oct":  # an HMAC key (access tokens) has no public part
                    continue
                record = {k: v for k, v in record.items() if k != ENCRYPTED_FIELD}
                record["jwk"] = public_jwk(record["jwk"])
            out.append(jsonvalues.dumps({"table": table, "record": record}, sort_keys=True))
    return iter(out)


async def _all(store: Store, table: str) -> list[Any]:
    if table == "ssa":
        return await store.find_ssas()
    if table == "clients":
        return await store.list_clients()
    if table == "keys":
        return await store.list_keys()
    if table == "statuslists":
        return await store.list_status_lists()
    if table == "script_revisions":
        return await store.list_script_revisions()
    if table == "assertion_jtis":
        return await store.list_assertions()
    if table == "audit":
        return await store.list_audit()
    if table == "audit_checkpoints":
        return await store.list_audit_checkpoints()
    if table == "webhooks":
        return await store.list_webhooks()
    return await store.list_templates()


async def counts(store: Store) -> dict[str, int]:
    return {table: len(await _all(store, table)) for table in EXPORTED}


def parse_lines(lines: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """The records of an export, by table; TransferError on the first bad line."""
    tables: dict[str, list[dict[str, Any]]] = {t: [] for t in EXPORTED}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:  # (surrogateescape: what a file that is not UTF-8 was read as; refused as not JSON)
            entry = jsonvalues.loads(line.encode("utf-8", "surrogateescape"), max_depth=MAX_LINE_DEPTH)
        except jsonvalues.NotJson:
            raise TransferError(f"line {number} is not JSON") from None
        except jsonvalues.JsonValueError as e:
            raise TransferError(f"line {number} {e}") from None
        if (not isinstance(entry, dict) or entry.get("table") not in tables
                or not isinstance(entry.get("record"), dict)):
            raise TransferError(f'line {number} is not {{"table": ..., "record": {{...}}}} of a known table')
        table, id_field = entry["table"], ID_FIELDS[entry["table"]]
        if not isinstance(entry["record"].get(id_field), str):
            raise TransferError(f"line {number}: a {table} record without its {id_field}")
        missing = [f for f in _REQUIRED[entry["table"]] if f not in entry["record"]]
        if missing:
            raise TransferError(f"line {number}: a {entry['table']} record without {', '.join(missing)}")
        problem = (hook_changes_problem(entry["record"].get("hook_changes")) if table == "ssa"
                   else _revision_problem(entry["record"]) if table == "script_revisions"
                   else _client_problem(entry["record"]) if table == "clients"
                   else _assertion_problem(entry["record"]) if table == "assertion_jtis" else None)
        if problem is not None:
            raise TransferError(f"line {number}: {problem}")
        tables[entry["table"]].append(entry["record"])
    return tables


def _revision_problem(record: dict[str, Any]) -> str | None:
    """A script revision must be what the server would have stored: texts, a known state."""
    if not (isinstance(record["source"], str) and isinstance(record["config"], (str, type(None)))
            and isinstance(record["name"], str) and isinstance(record["revision"], str)
            and record["id"] == f"{record['name']}@{record['revision']}"
            and type(record["seen_at"]) in (int, float) and record["state"] in REVISION_STATES
            and isinstance(record["reason"], (str, type(None))) and isinstance(record["seen_by"], str)):
        return "a script_revisions record whose fields are not as the server stores them"
    if (len(record["source"].encode("utf-8", "surrogatepass")) > REVISION_SOURCE_MAX
            or len((record["config"] or "").encode("utf-8", "surrogatepass")) > REVISION_CONFIG_MAX):
        return "a script_revisions record larger than the scripts folder's caps"
    return None


def _client_problem(record: dict[str, Any]) -> str | None:
    """One authentication method: a secret hash, or private_key_jwt with a JWK set or a jwks_uri."""
    method = record.get("token_endpoint_auth_method")
    if method is None:
        return None if isinstance(record["secret_hash"], str) and record["secret_hash"] else \
            "a clients record without its secret_hash"
    keys = record.get("jwks")
    has_keys = isinstance(keys, dict) and isinstance(keys.get("keys"), list)
    has_uri = isinstance(record.get("jwks_uri"), str)
    if method != "private_key_jwt" or has_keys == has_uri or record["secret_hash"] != "":
        return "a clients record with private_key_jwt needs jwks or jwks_uri (one) and no secret"
    return None


def _assertion_problem(record: dict[str, Any]) -> str | None:
    if not isinstance(record["client_id"], str) or type(record["expires_at"]) is not int:
        return "an assertion_jtis record whose fields are not as the server stores them"
    return None


async def import_records(store: Store, tables: dict[str, list[dict[str, Any]]],
                         now: int) -> dict[str, dict[str, int]]:
    """Add the records; returns per table {"read", "imported", "skipped"} after checking that
    the store grew by exactly the imported count."""
    before = await counts(store)
    report: dict[str, dict[str, int]] = {}
    for table in EXPORTED:
        records = tables.get(table, [])
        imported = await _import_table(store, table, records, tables, now)
        report[table] = {"read": len(records), "imported": imported, "skipped": len(records) - imported}
    after = await counts(store)
    for table in EXPORTED:
        if after[table] - before[table] != report[table]["imported"]:
            raise RuntimeError(f"{table}: {report[table]['imported']} imported but the store holds "
                               f"{after[table] - before[table]} more than before")
    return report


async def _add_missing(records: list[dict[str, Any]], key: str, get: Callable[[str], Awaitable[Any]],
                       add: Callable[[Any], Awaitable[None]]) -> int:
    """Add the records the store does not hold yet (by ``key``); how many were added."""
    added = 0
    for r in records:
        if await get(r[key]) is None:
            await add(r)
            added += 1
    return added


async def _import_table(store: Store, table: str, records: list[dict[str, Any]],
                        tables: dict[str, list[dict[str, Any]]], now: int) -> int:
    # (The records hold their table's required fields: parse_lines checked them.)
    if table == "ssa":
        fresh = records
        if await store.count_ssas():
            fresh = [r for r in records if await store.get_ssa(r["jti"]) is None]
        for i in range(0, len(fresh), _BATCH):
            await store.add_ssas(cast("list[SsaRecord]", fresh[i:i + _BATCH]))
        return len(fresh)
    if table == "clients":
        return await _add_missing(records, "client_id", store.get_client, store.add_client)
    if table == "templates":
        return await _add_missing(records, "name", store.get_template, store.put_template)
    if table == "assertion_jtis":  # a jti held already stays as it is
        return sum([await store.use_assertion(cast(AssertionRecord, r), now) for r in records])
    if table == "script_revisions":  # nothing pruned: the counts are checked
        return await _add_missing(records, "id", store.get_script_revision,
                                  lambda r: _put_revision(store, r))
    if table == "audit":  # as they were (seq and hashes): the chain verifies in the target too
        return await store.add_audit_records(cast("list[AuditRecord]", records))
    if table == "audit_checkpoints":
        held = {c["seq"] for c in await store.list_audit_checkpoints()}
        fresh = [r for r in records if r["seq"] not in held]
        for r in fresh:
            await store.put_audit_checkpoint(cast(AuditCheckpointRecord, r))
        return len(fresh)
    if table == "webhooks":  # a subscriber held already stays as it is
        return await _add_missing(records, "id", store.get_webhook, store.add_webhook)
    if table == "statuslists":  # a list the store holds already keeps its counters (they only grow)
        return await _add_missing(records, "id", store.get_status_list, store.add_status_list)
    existing = await store.list_keys()
    kids = {k["kid"] for k in existing}
    active_uses = {k["use"] for k in existing if k["status"] == KEY_ACTIVE}
    valid_until = max([now] + [s["expiration"] for s in tables.get("ssa", []) if s.get("status") == ACTIVE])
    imported = 0
    for r in records:
        if r["kid"] in kids:
            continue
        if r["status"] in (KEY_ACTIVE, KEY_NEXT) and (r["use"] in active_uses  # no 2nd timeline
                                                       or not _can_sign(r)):  # verify-only
            r = dict(r, status=KEY_RETIRING, remove_after=valid_until)
        await store.add_key(cast(KeyRecord, r))
        imported += 1
    return imported


def _can_sign(record: dict[str, Any]) -> bool:
    return isinstance(record["jwk"], dict) and can_sign(record)


async def _put_revision(store: Store, record: Any) -> None:
    await store.put_script_revision(record, keep=None)


def write_lines(lines: Iterable[bytes], out: BinaryIO) -> int:
    """Write the lines as they are (UTF-8 whatever the locale), each ended by a newline."""
    n = 0
    for line in lines:
        out.write(line + b"\n")
        n += 1
    return n
