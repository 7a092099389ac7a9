"""The PostgreSQL schema as an ordered list of migrations, and the version they lead to.

Each SSA, client, key and template is one row: the fields the store filters or changes on are
indexed columns, the rest of the record is a JSONB ``doc``.  ``schema_version`` holds one row.
A migration is appended, never edited: ``ssa-server store migrate`` applies the missing ones in
order, in one transaction, under an advisory lock (two nodes migrating at once are serialised).
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE ssa (
            jti text PRIMARY KEY,
            seq bigint GENERATED ALWAYS AS IDENTITY,
            org_id text NOT NULL,
            status text NOT NULL,
            expiration bigint NOT NULL,
            creator_id text NOT NULL,
            created_at bigint NOT NULL,
            one_time_use boolean NOT NULL,
            doc jsonb NOT NULL
        )""",
        "CREATE INDEX ssa_org_id ON ssa (org_id)",
        "CREATE INDEX ssa_creator_id ON ssa (creator_id)",
        "CREATE INDEX ssa_status_expiration ON ssa (status, expiration)",
        "CREATE INDEX ssa_created_at ON ssa (created_at, seq)",
        """CREATE TABLE clients (
            client_id text PRIMARY KEY,
            created_at bigint NOT NULL,
            doc jsonb NOT NULL
        )""",
        """CREATE TABLE keys (
            kid text PRIMARY KEY,
            use text NOT NULL,
            status text NOT NULL,
            created_at bigint NOT NULL,
            remove_after bigint,
            doc jsonb NOT NULL
        )""",
        """CREATE TABLE templates (
            name text PRIMARY KEY,
            created_at bigint NOT NULL,
            doc jsonb NOT NULL
        )""",
    ]),
    (2, [  # Token Status Lists (issue 14): the lists, and the query that rebuilds a list's bits
        """CREATE TABLE statuslists (
            id bigint PRIMARY KEY,
            size integer NOT NULL,
            next integer NOT NULL,
            created_at bigint NOT NULL,
            doc jsonb NOT NULL
        )""",
        "CREATE INDEX ssa_status_list ON ssa ((doc->'status_list'->>'list')) "
        "WHERE status IN ('USED', 'REVOKED')",
    ]),
    (3, [  # script revisions (issue 13): one row per (script, content hash), the last N per script
        """CREATE TABLE script_revisions (
            id text PRIMARY KEY,
            name text NOT NULL,
            seen_at double precision NOT NULL,
            seq bigint GENERATED ALWAYS AS IDENTITY,
            doc jsonb NOT NULL
        )""",
        "CREATE INDEX script_revisions_name ON script_revisions (name, seen_at DESC, seq DESC)",
    ]),
    (4, [  # client assertions' jtis (issue 16, private_key_jwt): the replay cache, purged by expires_at
        """CREATE TABLE assertion_jtis (
            id text PRIMARY KEY,
            client_id text NOT NULL,
            expires_at bigint NOT NULL
        )""",
        "CREATE INDEX assertion_jtis_expires_at ON assertion_jtis (expires_at)",
    ]),
    (5, [  # the audit trail (issue 15): a hash chain of events (appended under AUDIT_LOCK), checkpoints
        """CREATE TABLE audit (
            seq bigint PRIMARY KEY,
            time double precision NOT NULL,
            action text NOT NULL,
            jti text,
            org_id text,
            doc jsonb NOT NULL
        )""",
        "CREATE INDEX audit_time ON audit (time)",
        "CREATE INDEX audit_action ON audit (action, seq)",
        "CREATE INDEX audit_jti ON audit (jti, seq) WHERE jti IS NOT NULL",
        "CREATE INDEX audit_org_id ON audit (org_id, seq) WHERE org_id IS NOT NULL",
        """CREATE TABLE audit_checkpoints (
            seq bigint PRIMARY KEY,
            doc jsonb NOT NULL
        )""",
    ]),
    (6, [  # signed event webhooks (issue 15): the subscribers, and the outbox the nodes deliver from
        """CREATE TABLE webhooks (
            id text PRIMARY KEY,
            created_at bigint NOT NULL,
            doc jsonb NOT NULL
        )""",
        """CREATE TABLE webhook_deliveries (
            id text PRIMARY KEY,
            seq bigint GENERATED ALWAYS AS IDENTITY,
            subscriber text NOT NULL,
            state text NOT NULL,
            attempts integer NOT NULL,
            next_attempt_at double precision NOT NULL,
            lease_until double precision NOT NULL,
            last_error text,
            created_at double precision NOT NULL,
            delivered_at double precision,
            doc jsonb NOT NULL
        )""",
        "CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at, seq) "
        "WHERE state = 'pending'",
        "CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created_at, seq)",
    ]),
]

LATEST = MIGRATIONS[-1][0]

# Advisory lock ids (pg_advisory_lock takes a bigint): one for migrations, one for key setup.
MIGRATE_LOCK = 0x55A_0001
KEYS_LOCK = 0x55A_0002
AUDIT_LOCK = 0x55A_0003  # an audit append: the chain's head read and the new events written under it
LOCKS = {"keys": KEYS_LOCK}  # the names ``Store.lock`` accepts

VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    version integer NOT NULL
)"""
