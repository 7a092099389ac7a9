"""The PostgreSQL store: shared by every worker and node, correct under concurrency by statement.

Every state change is one SQL statement (or one transaction), so no read-modify-write can race
across processes: ``mark_used`` is a conditional ``UPDATE ... RETURNING`` (of N concurrent
validations of a one-time SSA, on any number of nodes, exactly one gets the row), a revoke by
org is one ``UPDATE``, ``update_key`` changes columns and merges the JSONB doc in place.

Connections come from a pool (``store_pool_min``/``store_pool_max``), are checked before use and
carry a ``statement_timeout``.  An unreachable database, a pool wait past ``store_pool_timeout``
or a timed-out statement become ``StoreUnavailable`` (503); the pool reconnects by itself.
"""

from __future__ import annotations

import contextlib
import json
import select
import uuid
from decimal import Decimal
from collections.abc import AsyncIterator
from typing import Any, cast

import psycopg
from psycopg.pq import ConnStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from ..settings import redact_url
from . import pgschema
from ..ssa import ACTIVE, EXPIRED, REVOKED, USED, SsaRecord
from .errors import StoreSchemaError, StoreUnavailable, UnstorableValue
from .records import (DELIVERY_DEAD, DELIVERY_DELIVERED, DELIVERY_PENDING, GENESIS, AssertionRecord,
                      AuditCheckpointRecord, AuditRecord, ClientRecord, DeliveryRecord, KeyRecord,
                      ScriptRevisionRecord, StatusListRecord, TemplateRecord, WebhookRecord, chain)
from .search import SsaFilter, to_sql

SSA_COLUMNS = ("jti", "org_id", "status", "expiration", "creator_id", "created_at", "one_time_use")
KEY_COLUMNS = ("kid", "use", "status", "created_at", "remove_after")
DELIVERY_COLUMNS = ("id", "subscriber", "state", "attempts", "next_attempt_at", "lease_until", "last_error",
                    "created_at", "delivered_at")
_DELIVERY_SELECT = f"SELECT {', '.join(DELIVERY_COLUMNS)}, doc FROM webhook_deliveries"
_SSA_SELECT = f"SELECT {', '.join(SSA_COLUMNS)}, seq, doc FROM ssa"
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, TooManyRequests, OSError)


def _dumps(value: Any) -> str:
    """JSON for a JSONB column that reads back as it was given.

    NaN and Infinity are refused (JSONB cannot hold them).  A float from 1e16 up is written by
    Python with an exponent (``1e+16``), which JSONB keeps as a numeric of scale 0 and gives back
    as an integer: such floats are written out in full with a ``.0``, which JSONB keeps.
    """
    try:
        text = json.dumps(value, allow_nan=False)
        if "e+" not in text:  # the common case: no large float (or only a string holding "e+")
            return text
        floats: dict[str, str] = {}
        marker = f"\x00{uuid.uuid4().hex}:"
        text = json.dumps(_mark_large_floats(value, marker, floats), allow_nan=False)
    except (ValueError, TypeError, RecursionError) as e:
        raise UnstorableValue(f"a value cannot be stored in PostgreSQL: {e}") from None
    for name, number in floats.items():
        text = text.replace(json.dumps(name), number)
    return text


def _mark_large_floats(value: Any, marker: str, floats: dict[str, str]) -> Any:
    if type(value) is float and abs(value) >= 1e16:
        name = f"{marker}{len(floats)}"
        floats[name] = f"{Decimal(repr(value)):f}.0"
        return name
    if type(value) is dict:
        return {k: _mark_large_floats(v, marker, floats) for k, v in value.items()}
    if type(value) is list:
        return [_mark_large_floats(v, marker, floats) for v in value]
    return value


def _jsonb(value: Any) -> Jsonb:
    return Jsonb(value, dumps=_dumps)


def _split(record: dict[str, Any], columns: tuple[str, ...]) -> tuple[list[Any], Jsonb]:
    return [record.get(c) for c in columns], _jsonb({k: v for k, v in record.items() if k not in columns})


async def _check_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Before a pooled connection is handed out.  An idle connection has nothing to read; one
    the server closed (a restart, an admin shutdown) has its farewell and EOF waiting, and only
    then does the round-trip check run, fail, and make the pool replace it.  So healthy
    checkouts cost no round trip and the first requests after an outage do not fail."""
    if conn.broken or conn.pgconn.status != ConnStatus.OK:
        raise psycopg.OperationalError("connection lost")
    poller = select.poll()  # not select(): a busy server's descriptors may pass FD_SETSIZE
    poller.register(conn.pgconn.socket, select.POLLIN)
    if poller.poll(0):
        await AsyncConnectionPool.check_connection(conn)


def _ssa(row: dict[str, Any]) -> SsaRecord:
    record = dict(row["doc"])
    record.update({c: row[c] for c in SSA_COLUMNS})
    return cast(SsaRecord, record)  # the doc and the columns: what add_ssas split


def _delivery(row: dict[str, Any]) -> DeliveryRecord:
    record = dict(row["doc"])
    record.update({c: row[c] for c in DELIVERY_COLUMNS})
    return cast(DeliveryRecord, record)


def _key(row: dict[str, Any]) -> KeyRecord:
    record = dict(row["doc"])
    record.update({c: row[c] for c in KEY_COLUMNS})
    return cast(KeyRecord, record)


_LIST_COLUMNS = "id, size, next, created_at, doc"


_AUDIT_INSERT = "INSERT INTO audit (seq, time, action, jti, org_id, doc) VALUES (%s, %s, %s, %s, %s, %s)"


def _audit_row(record: Any) -> tuple[Any, ...]:
    return (record["seq"], record["time"], record["action"], record.get("jti"), record.get("org_id"),
            _jsonb(dict(record)))


def _audit(row: dict[str, Any]) -> AuditRecord:
    """The doc (what the hash covers).  A row whose indexed columns disagree with its doc (one of
    them changed alone) shows both, ``{"column": ..., "doc": ...}``, for that field: the event no
    longer hashes to its ``hash`` and ``audit verify`` names it."""
    record = dict(row["doc"])
    for name in ("seq", "time", "action", "jti", "org_id"):
        if record.get(name) != row[name]:
            record[name] = {"column": row[name], "doc": record.get(name)}
    return cast(AuditRecord, record)


def _status_list(row: dict[str, Any]) -> StatusListRecord:
    return {"id": str(row["id"]), "size": row["size"], "next": row["next"], "key": row["doc"]["key"],
            "created_at": row["created_at"]}


class PgStore:
    def __init__(self, url: str, *, pool_min: int = 1, pool_max: int = 10, pool_timeout: float = 2.0,
                 statement_timeout: float = 5.0, create_schema: bool = True) -> None:
        self.url = url
        self.create_schema = create_schema
        self._pool_min, self._pool_max, self._pool_timeout = pool_min, pool_max, pool_timeout
        self._connect_kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, int(pool_timeout)),
            "options": f"-c statement_timeout={int(statement_timeout * 1000)}",
            "application_name": "ssa-server",
        }
        self._pool: AsyncConnectionPool | None = None

    # --- open / close / schema ---
    async def open(self) -> None:
        """Connect, create the schema in an empty database (``create_schema``), check its version."""
        await self.connect()
        try:
            version = await self.schema_version()
            if version is None and self.create_schema:
                await self.migrate()  # an empty database: nothing to upgrade, nothing to lose
            elif version != pgschema.LATEST:
                raise StoreSchemaError(schema_message(version or 0))
        except BaseException:
            await self.close()
            raise

    async def connect(self) -> None:
        """Open the pool only (``store migrate`` works on a schema ``open`` would refuse)."""
        self._pool = AsyncConnectionPool(
            self.url, min_size=self._pool_min, max_size=self._pool_max, timeout=self._pool_timeout,
            kwargs=self._connect_kwargs, check=_check_connection, open=False,
            name="ssa-store")
        try:
            await self._pool.open(wait=True, timeout=self._pool_timeout + 3)
        except PoolTimeout:
            await self._pool.close()
            raise StoreUnavailable(f"PostgreSQL at {redact_url(self.url)} cannot be reached") from None

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def schema_version(self) -> int | None:
        """The schema version in the database; None when it holds no schema yet."""
        async with self._connection() as conn:
            exists = await (await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")).fetchone()
            if not exists or not exists[0]:
                return None
            row = await (await conn.execute("SELECT version FROM schema_version")).fetchone()
            return int(row[0]) if row else 0

    async def migrate(self) -> tuple[int, int]:
        """Apply the missing migrations in one transaction; returns (version before, after)."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (pgschema.MIGRATE_LOCK,))
            await conn.execute(pgschema.VERSION_TABLE)
            row = await (await conn.execute("SELECT version FROM schema_version")).fetchone()
            before = int(row[0]) if row else 0
            if before > pgschema.LATEST:
                raise StoreSchemaError(schema_message(before))
            for version, statements in pgschema.MIGRATIONS:
                if version > before:
                    for sql in statements:
                        await conn.execute(sql)
            await conn.execute("INSERT INTO schema_version (id, version) VALUES (true, %s) "
                               "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
                               (pgschema.LATEST,))
            return before, pgschema.LATEST

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        try:
            async with self._pool.connection() as conn:
                yield conn
        except _UNAVAILABLE as e:
            first = str(e).strip().splitlines()[0] if str(e) else ""
            raise StoreUnavailable(f"PostgreSQL: {type(e).__name__}: {first}") from None
        except psycopg.DataError as e:  # a value PostgreSQL cannot hold (NUL) or of the wrong type
            first = str(e).strip().splitlines()[0]
            raise UnstorableValue(f"a value cannot be stored in PostgreSQL: {first}") from None

    async def _rows(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        async with self._connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, params)
            return await cur.fetchall() if cur.description else []

    @contextlib.asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        """Hold a cluster-wide lock (key set-up and rotation) on a connection of its own."""
        lock_id = pgschema.LOCKS[name]
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs)
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"PostgreSQL: {type(e).__name__}") from None
        try:
            try:
                await conn.execute("SELECT pg_advisory_lock(%s)", (lock_id,))
            except _UNAVAILABLE as e:
                raise StoreUnavailable(f"PostgreSQL: {type(e).__name__}") from None
            yield
        finally:
            await conn.close()  # ends the session, which releases the lock

    # --- SSAs ---
    async def add_ssa(self, record: SsaRecord) -> None:
        await self.add_ssas([record])

    async def add_ssas(self, records: list[SsaRecord]) -> None:
        if not records:
            return
        rows = []
        for r in records:
            values, doc = _split(dict(r), SSA_COLUMNS)
            rows.append((*values, doc))
        placeholders = ", ".join(["%s"] * (len(SSA_COLUMNS) + 1))
        sql = f"INSERT INTO ssa ({', '.join(SSA_COLUMNS)}, doc) VALUES ({placeholders})"
        try:
            async with self._connection() as conn:
                if len(rows) == 1:  # autocommit: one round trip
                    await conn.execute(sql, rows[0])
                    return
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.executemany(sql, rows)
        except psycopg.errors.UniqueViolation:
            raise ValueError("an SSA with one of these jtis exists") from None

    async def get_ssa(self, jti: str) -> SsaRecord | None:
        rows = await self._rows(f"{_SSA_SELECT} WHERE jti = %s", (jti,))
        return _ssa(rows[0]) if rows else None

    @staticmethod
    def _where(filters: dict[str, Any]) -> tuple[str, list[Any]]:
        given = [(k, v) for k, v in filters.items() if v is not None]
        if not given:
            return "", []
        return " WHERE " + " AND ".join(f"{k} = %s" for k, _ in given), [v for _, v in given]

    async def find_ssas(self, *, jti: str | None = None, org_id: str | None = None,
                        status: str | None = None, creator_id: str | None = None) -> list[SsaRecord]:
        where, params = self._where({"jti": jti, "org_id": org_id, "status": status,
                                     "creator_id": creator_id})
        return [_ssa(r) for r in await self._rows(f"{_SSA_SELECT}{where} ORDER BY created_at, seq", params)]

    async def search_ssas(self, where: SsaFilter, limit: int) -> list[SsaRecord]:
        """Parameterised SQL over the columns and the JSONB doc; the indexes serve its equality
        and range terms on columns."""
        condition, params = to_sql(where, SSA_COLUMNS)
        rows = await self._rows(f'{_SSA_SELECT} WHERE {condition} ORDER BY created_at, jti COLLATE "C" '
                                "LIMIT %s", [*params, limit])
        return [_ssa(r) for r in rows]

    async def mark_used(self, jti: str, now: int) -> SsaRecord | None:
        # One statement: a one-time SSA only ever leaves through the conditional UPDATE (the row
        # lock makes every other concurrent UPDATE see status USED and match nothing); a reusable
        # one (one_time_use never changes) is only read.
        rows = await self._rows(
            f"""WITH used AS (
                    UPDATE ssa SET status = %(used)s
                    WHERE jti = %(jti)s AND one_time_use AND status = %(active)s AND expiration > %(now)s
                    RETURNING {', '.join(SSA_COLUMNS)}, seq, doc)
                SELECT * FROM used
                UNION ALL
                {_SSA_SELECT} WHERE jti = %(jti)s AND NOT one_time_use AND status = %(active)s
                    AND expiration > %(now)s""",
            {"jti": jti, "now": now, "used": USED, "active": ACTIVE})
        return _ssa(rows[0]) if rows else None

    async def revoke_ssas(self, *, jti: str | None = None, org_id: str | None = None,
                          creator_id: str | None = None, now: int) -> list[SsaRecord]:
        if jti is None and org_id is None and creator_id is None:
            return []
        where, params = self._where({"jti": jti, "org_id": org_id, "creator_id": creator_id,
                                     "status": ACTIVE})
        rows = await self._rows(
            f"UPDATE ssa SET status = %s, expiration = %s{where} "
            f"RETURNING {', '.join(SSA_COLUMNS)}, seq, doc",
            [REVOKED, now, *params])
        return [_ssa(r) for r in sorted(rows, key=lambda r: (r["created_at"], r["seq"]))]

    async def expire_and_purge(self, now: int, grace: int,
                               expired_out: list[tuple[str, str]] | None = None) -> tuple[int, int]:
        async with self._connection() as conn, conn.transaction():
            # Purge first, so an SSA expired in this run is kept until a later one (as TinyStore).
            purged = await conn.execute(
                "DELETE FROM ssa WHERE status <> %(active)s AND expiration < %(cutoff)s"
                " AND COALESCE((doc->'status_list'->>'until')::bigint, 0) < %(cutoff)s",
                {"active": ACTIVE, "cutoff": now - grace})
            expired = await conn.execute("UPDATE ssa SET status = %s WHERE status = %s AND expiration <= %s"
                                         " RETURNING jti, org_id", (EXPIRED, ACTIVE, now))
            rows = await expired.fetchall()
            await conn.execute("DELETE FROM assertion_jtis WHERE expires_at < %s", (now,))
            if expired_out is not None:  # (the UPDATE's row locks: one node sees each SSA expire)
                expired_out.extend((r[0], r[1]) for r in rows)
            return len(rows), purged.rowcount

    async def count_ssas(self) -> int:
        rows = await self._rows("SELECT count(*) AS n FROM ssa")
        return int(rows[0]["n"])

    async def count_active_ssas(self, now: int) -> int:
        rows = await self._rows("SELECT count(*) AS n FROM ssa WHERE status = %s AND expiration > %s",
                                [ACTIVE, now])
        return int(rows[0]["n"])

    # --- Token Status Lists ---
    async def reserve_status_counters(self, count: int, size: int, key: str,
                                      now: int) -> tuple[StatusListRecord, int]:
        """One conditional UPDATE of the newest list (its row lock serialises the nodes, and the
        condition is checked again on the locked row); when it is full, an INSERT of the next id
        (a node that loses that race retries the UPDATE on the winner's list)."""
        while True:
            rows = await self._rows(
                f"UPDATE statuslists SET next = next + %(n)s WHERE id = (SELECT max(id) FROM statuslists)"
                f" AND next + %(n)s <= size RETURNING {_LIST_COLUMNS}", {"n": count})
            if rows:
                return _status_list(rows[0]), rows[0]["next"] - count
            rows = await self._rows(
                f"INSERT INTO statuslists (id, size, next, created_at, doc)"
                f" SELECT COALESCE(max(id), 0) + 1, %(size)s, %(n)s, %(now)s, %(doc)s FROM statuslists"
                f" ON CONFLICT (id) DO NOTHING RETURNING {_LIST_COLUMNS}",
                {"n": count, "size": size, "now": now, "doc": _jsonb({"key": key})})
            if rows:
                return _status_list(rows[0]), 0

    async def get_status_list(self, list_id: str) -> StatusListRecord | None:
        if not (list_id.isascii() and list_id.isdigit() and len(list_id) <= 18):
            return None
        rows = await self._rows(f"SELECT {_LIST_COLUMNS} FROM statuslists WHERE id = %s", (int(list_id),))
        return _status_list(rows[0]) if rows else None

    async def list_status_lists(self) -> list[StatusListRecord]:
        rows = await self._rows(f"SELECT {_LIST_COLUMNS} FROM statuslists ORDER BY id")
        return [_status_list(r) for r in rows]

    async def add_status_list(self, record: StatusListRecord) -> None:
        try:
            await self._rows("INSERT INTO statuslists (id, size, next, created_at, doc) "
                             "VALUES (%s, %s, %s, %s, %s)",
                             (int(record["id"]), record["size"], record["next"], record["created_at"],
                              _jsonb({"key": record["key"]})))
        except psycopg.errors.UniqueViolation:
            raise ValueError(f"a status list with id {record['id']} exists") from None

    async def invalid_status_indexes(self, list_id: str) -> list[int]:
        rows = await self._rows(
            "SELECT (doc->'status_list'->>'idx')::bigint AS idx FROM ssa WHERE status IN (%s, %s)"
            " AND doc->'status_list'->>'list' = %s", (USED, REVOKED, list_id))
        return [int(r["idx"]) for r in rows]

    # --- clients ---
    async def add_client(self, record: ClientRecord) -> None:
        try:
            await self._rows("INSERT INTO clients (client_id, created_at, doc) VALUES (%s, %s, %s)",
                             (record["client_id"], record["created_at"], _jsonb(dict(record))))
        except psycopg.errors.UniqueViolation:
            raise ValueError(f"a client with id {record['client_id']} exists") from None

    async def get_client(self, client_id: str) -> ClientRecord | None:
        rows = await self._rows("SELECT doc FROM clients WHERE client_id = %s", (client_id,))
        return rows[0]["doc"] if rows else None

    async def has_client(self, client_id: str) -> bool:
        return bool(await self._rows("SELECT 1 FROM clients WHERE client_id = %s", (client_id,)))

    async def list_clients(self) -> list[ClientRecord]:
        return [r["doc"] for r in await self._rows("SELECT doc FROM clients ORDER BY created_at, client_id")]

    async def delete_client(self, client_id: str) -> bool:
        return bool(await self._rows("DELETE FROM clients WHERE client_id = %s RETURNING client_id",
                                     (client_id,)))

    # --- client assertions' jtis ---
    async def use_assertion(self, record: AssertionRecord, now: int) -> bool:
        """One ``INSERT ... ON CONFLICT``: a live row for the id is left as it is (no row back: a
        replay), an expired one is taken over; of concurrent inserts one wins (the primary key)."""
        rows = await self._rows(
            "INSERT INTO assertion_jtis AS a (id, client_id, expires_at) VALUES (%s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET client_id = EXCLUDED.client_id, expires_at = EXCLUDED.expires_at "
            "WHERE a.expires_at < %s RETURNING id",
            (record["id"], record["client_id"], record["expires_at"], now))
        return bool(rows)

    async def list_assertions(self) -> list[AssertionRecord]:
        rows = await self._rows("SELECT id, client_id, expires_at FROM assertion_jtis ORDER BY id")
        return [cast(AssertionRecord, dict(r)) for r in rows]

    # --- keys ---
    async def add_key(self, record: KeyRecord) -> None:
        values, doc = _split(dict(record), KEY_COLUMNS)
        try:
            await self._rows(f"INSERT INTO keys ({', '.join(KEY_COLUMNS)}, doc) "
                             "VALUES (%s, %s, %s, %s, %s, %s)", (*values, doc))
        except psycopg.errors.UniqueViolation:
            raise ValueError(f"a key with kid {record['kid']} exists") from None

    async def update_key(self, kid: str, changes: dict[str, Any]) -> None:
        # One statement: columns set, other fields merged into the doc (jsonb ||), no read first.
        sets, params = [], []
        for name, value in changes.items():
            if name == "kid":
                continue
            if name in KEY_COLUMNS:
                sets.append(f"{name} = %s")
                params.append(value)
        extra = {k: v for k, v in changes.items() if k not in KEY_COLUMNS}
        if extra:
            sets.append("doc = doc || %s")
            params.append(_jsonb(extra))
        if not sets:
            sets.append("kid = kid")
        rows = await self._rows(f"UPDATE keys SET {', '.join(sets)} WHERE kid = %s RETURNING kid",
                                [*params, kid])
        if not rows:
            raise KeyError(kid)

    async def compact_keys(self) -> bool:
        await self._rows("VACUUM FULL keys")  # autocommit: VACUUM runs outside a transaction
        return True

    async def list_keys(self) -> list[KeyRecord]:
        return [_key(r) for r in await self._rows(
            f"SELECT {', '.join(KEY_COLUMNS)}, doc FROM keys ORDER BY created_at, kid")]

    # --- templates ---
    async def put_template(self, record: TemplateRecord) -> None:
        await self._rows("INSERT INTO templates (name, created_at, doc) VALUES (%s, %s, %s) "
                         "ON CONFLICT (name) DO UPDATE SET created_at = EXCLUDED.created_at, "
                         "doc = EXCLUDED.doc",
                         (record["name"], record["created_at"], _jsonb(dict(record))))

    async def get_template(self, name: str) -> TemplateRecord | None:
        rows = await self._rows("SELECT doc FROM templates WHERE name = %s", (name,))
        return rows[0]["doc"] if rows else None

    async def list_templates(self) -> list[TemplateRecord]:
        return [r["doc"] for r in await self._rows("SELECT doc FROM templates ORDER BY created_at, name")]

    async def delete_template(self, name: str) -> bool:
        return bool(await self._rows("DELETE FROM templates WHERE name = %s RETURNING name", (name,)))

    # --- script revisions ---
    async def put_script_revision(self, record: ScriptRevisionRecord, keep: int | None) -> bool:
        """One ``INSERT ... ON CONFLICT``: of several nodes recording the same revision, one inserts
        it; a state change merges ``state`` and ``reason`` into the stored doc.  Then one ``DELETE``
        prunes the script's revisions beyond the ``keep`` newest."""
        rows = await self._rows(
            "INSERT INTO script_revisions AS r (id, name, seen_at, doc) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET doc = r.doc || jsonb_build_object("
            "'state', EXCLUDED.doc->'state', 'reason', EXCLUDED.doc->'reason') "
            "WHERE (r.doc->'state', r.doc->'reason') IS DISTINCT FROM "
            "(EXCLUDED.doc->'state', EXCLUDED.doc->'reason') RETURNING (xmax = 0) AS inserted",
            (record["id"], record["name"], record["seen_at"], _jsonb(dict(record))))
        if keep is not None and rows:
            await self._rows(
                "DELETE FROM script_revisions WHERE name = %(name)s AND id NOT IN (SELECT id FROM "
                "script_revisions WHERE name = %(name)s ORDER BY seen_at DESC, seq DESC LIMIT %(keep)s)",
                {"name": record["name"], "keep": keep})
        return bool(rows and rows[0]["inserted"])

    async def get_script_revision(self, revision_id: str) -> ScriptRevisionRecord | None:
        rows = await self._rows("SELECT doc FROM script_revisions WHERE id = %s", (revision_id,))
        return rows[0]["doc"] if rows else None

    async def list_script_revisions(self, name: str | None = None) -> list[ScriptRevisionRecord]:
        where = "WHERE name = %s " if name is not None else ""
        rows = await self._rows(f"SELECT doc FROM script_revisions {where}ORDER BY seen_at DESC, seq DESC",
                                (name,) if name is not None else None)
        return [r["doc"] for r in rows]

    # --- webhooks: subscribers and the outbox (``webhooks.py``) ---
    async def add_webhook(self, record: WebhookRecord) -> None:
        try:
            await self._rows("INSERT INTO webhooks (id, created_at, doc) VALUES (%s, %s, %s)",
                             (record["id"], record["created_at"], _jsonb(dict(record))))
        except psycopg.errors.UniqueViolation:
            raise ValueError(f"a webhook with id {record['id']} exists") from None

    async def get_webhook(self, webhook_id: str) -> WebhookRecord | None:
        rows = await self._rows("SELECT doc FROM webhooks WHERE id = %s", (webhook_id,))
        return rows[0]["doc"] if rows else None

    async def list_webhooks(self) -> list[WebhookRecord]:
        return [r["doc"] for r in await self._rows("SELECT doc FROM webhooks ORDER BY created_at, id")]

    async def delete_webhook(self, webhook_id: str) -> bool:
        return bool(await self._rows("DELETE FROM webhooks WHERE id = %s RETURNING id", (webhook_id,)))

    async def add_deliveries(self, records: list[DeliveryRecord]) -> None:
        if not records:
            return
        rows = []
        for r in records:
            values, doc = _split(dict(r), DELIVERY_COLUMNS)
            rows.append((*values, doc))
        placeholders = ", ".join(["%s"] * (len(DELIVERY_COLUMNS) + 1))
        sql = f"INSERT INTO webhook_deliveries ({', '.join(DELIVERY_COLUMNS)}, doc) VALUES ({placeholders})"
        async with self._connection() as conn:
            if len(rows) == 1:
                await conn.execute(sql, rows[0])
                return
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(sql, rows)

    async def claim_deliveries(self, now: float, lease_until: float, limit: int) -> list[DeliveryRecord]:
        """One ``UPDATE ... RETURNING`` over rows picked ``FOR UPDATE SKIP LOCKED``: of nodes
        claiming at once each row goes to one; a lease that ran out (a dead node) is taken again."""
        rows = await self._rows(
            f"""UPDATE webhook_deliveries SET lease_until = %(lease)s WHERE id IN (
                    SELECT id FROM webhook_deliveries WHERE state = %(pending)s AND next_attempt_at <= %(now)s
                    AND lease_until <= %(now)s ORDER BY next_attempt_at, seq LIMIT %(n)s
                    FOR UPDATE SKIP LOCKED)
                RETURNING {', '.join(DELIVERY_COLUMNS)}, doc""",
            {"lease": lease_until, "pending": DELIVERY_PENDING, "now": now, "n": limit})
        return sorted((_delivery(r) for r in rows), key=lambda d: (d["next_attempt_at"], d["created_at"]))

    async def update_delivery(self, delivery_id: str, changes: dict[str, Any]) -> None:
        sets = [f"{name} = %s" for name in changes if name in DELIVERY_COLUMNS and name != "id"]
        params = [v for name, v in changes.items() if name in DELIVERY_COLUMNS and name != "id"]
        if not sets:
            sets.append("id = id")
        rows = await self._rows(f"UPDATE webhook_deliveries SET {', '.join(sets)} WHERE id = %s RETURNING id",
                                [*params, delivery_id])
        if not rows:
            raise KeyError(delivery_id)

    async def get_delivery(self, delivery_id: str) -> DeliveryRecord | None:
        rows = await self._rows(f"{_DELIVERY_SELECT} WHERE id = %s", (delivery_id,))
        return _delivery(rows[0]) if rows else None

    async def list_deliveries(self, *, state: str | None = None, subscriber: str | None = None,
                              limit: int = 1000) -> list[DeliveryRecord]:
        where, params = self._where({"state": state, "subscriber": subscriber})
        rows = await self._rows(f"{_DELIVERY_SELECT}{where} ORDER BY created_at, seq LIMIT %s",
                                [*params, limit])
        return [_delivery(r) for r in rows]

    async def purge_deliveries(self, before: float) -> int:
        rows = await self._rows("DELETE FROM webhook_deliveries WHERE state IN (%s, %s) AND created_at < %s "
                                "RETURNING id", (DELIVERY_DELIVERED, DELIVERY_DEAD, before))
        return len(rows)

    # --- health ---
    # --- the audit trail ---
    async def append_audit(self, events: list[dict[str, Any]], *, lazy: bool = False) -> AuditRecord | None:
        """One transaction under ``pg_advisory_xact_lock(AUDIT_LOCK)``: the head read and the new
        rows written as one step for every node and worker (the chain never forks).  ``lazy``
        changes nothing here (PostgreSQL's own group commit serves concurrent transactions)."""
        if not events:
            return None
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (pgschema.AUDIT_LOCK,))
            cur = conn.cursor()
            await cur.execute("SELECT seq, doc->>'hash' FROM audit ORDER BY seq DESC LIMIT 1")
            head = await cur.fetchone()
            records = chain(events, int(head[0]), str(head[1])) if head else chain(events, 0, GENESIS)
            await cur.executemany(_AUDIT_INSERT, [_audit_row(r) for r in records])
        return records[-1]

    async def add_audit_records(self, records: list[AuditRecord]) -> int:
        rows = [_audit_row(dict(r, id=str(r["seq"]))) for r in records]
        added = 0
        async with self._connection() as conn, conn.transaction():
            cur = conn.cursor()
            for row in rows:
                await cur.execute(_AUDIT_INSERT + " ON CONFLICT (seq) DO NOTHING", row)
                added += cur.rowcount
        return added

    async def list_audit(self, *, after: int = 0, since: float | None = None, action: str | None = None,
                         jti: str | None = None, org_id: str | None = None,
                         limit: int | None = None) -> list[AuditRecord]:
        where, params = ["seq > %s"], list[Any]([after])
        for column, value in (("time >=", since), ("action =", action), ("jti =", jti), ("org_id =", org_id)):
            if value is not None:
                where.append(f"{column} %s")
                params.append(value)
        sql = (f"SELECT seq, time, action, jti, org_id, doc FROM audit WHERE {' AND '.join(where)} "
               "ORDER BY seq")
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)
        return [_audit(r) for r in await self._rows(sql, params)]

    async def delete_audit_through(self, seq: int) -> int:
        async with self._connection() as conn:
            done = await conn.execute("DELETE FROM audit WHERE seq <= %s", (seq,))
            return done.rowcount

    async def put_audit_checkpoint(self, record: AuditCheckpointRecord) -> None:
        await self._rows("INSERT INTO audit_checkpoints (seq, doc) VALUES (%s, %s) "
                         "ON CONFLICT (seq) DO UPDATE SET doc = EXCLUDED.doc",
                         (record["seq"], _jsonb(dict(record))))

    async def list_audit_checkpoints(self) -> list[AuditCheckpointRecord]:
        rows = await self._rows("SELECT seq, doc FROM audit_checkpoints ORDER BY seq")
        return [cast(AuditCheckpointRecord, dict(r["doc"], seq=int(r["seq"]))) for r in rows]

    async def check(self) -> None:
        await self._rows("SELECT 1")


def schema_message(version: int) -> str:
    if version > pgschema.LATEST:
        return (f"the database has schema version {version}, newer than this server knows "
                f"({pgschema.LATEST}): upgrade ssa-server")
    return (f"the database has schema version {version}, this server needs {pgschema.LATEST}: "
            "run `ssa-server store migrate`")
