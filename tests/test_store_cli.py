"""``ssa-server store migrate | export | import`` and the PostgreSQL start-up checks, as processes."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg", reason="pip install -e '.[test]' installs the PostgreSQL driver")

from conftest import ADMIN, truncate, with_database  # noqa: E402
from ssa_server.store.pgschema import LATEST  # noqa: E402


def run(*args: str, env: dict[str, str] | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SSA_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "ssa_server", *args], capture_output=True, text=True,
                          timeout=120, env=full, input=stdin)


def ok(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    r = run(*args, **kw)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def fresh_db(pg_server):
    """An empty database of its own (no schema), dropped afterwards."""
    name = f"ssa_cli_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_server, name)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_workers_refused_on_tinydb(tmp_path):
    r = run("serve", "--workers", "2", "--data-dir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "ssa-server: configuration error: --workers 2 needs a shared store (SSA_STORE_URL=postgresql://...); "
        "the embedded TinyDB store serves one process"]


def test_postgres_url_without_psycopg_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['psycopg'] = None; from ssa_server.cli import main; "
            "sys.exit(main(['clients', 'list']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, SSA_STORE_URL="postgresql://u:secret@127.0.0.1:1/db"))
    assert r.returncode == 2
    assert r.stderr.strip() == ("ssa-server: configuration error: SSA_STORE_URL is a PostgreSQL URL but "
                                "psycopg is not installed: pip install 'ssa-server[postgres]'")


def test_unreachable_database_is_one_line_without_password(tmp_path):
    from ports import free_port

    r = run("clients", "list", "--store-url", f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db",
            env={"SSA_STORE_POOL_TIMEOUT": "0.5"})
    assert r.returncode == 1 and "Traceback" not in r.stderr and "hunter2" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert (line.startswith("ssa-server: PostgreSQL at postgresql://u:***@127.0.0.1:")
            and line.endswith("cannot be reached"))


def test_schema_behind_is_refused_until_migrate(fresh_db):
    with psycopg.connect(fresh_db, autocommit=True) as conn:  # an older server's schema: version 0
        conn.execute("CREATE TABLE schema_version (id boolean PRIMARY KEY DEFAULT true CHECK (id), "
                     "version integer NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (true, 0)")
    env = {"SSA_STORE_URL": fresh_db}
    r = run("clients", "list", env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"ssa-server: the database has schema version 0, this server needs {LATEST}: "
                                "run `ssa-server store migrate`")
    migrated = json.loads(ok("store", "migrate", env=env).stdout)
    assert (migrated["schema_version_before"], migrated["schema_version"]) == (0, LATEST)
    assert json.loads(ok("store", "migrate", env=env).stdout)["schema_version_before"] == LATEST  # idempotent
    assert json.loads(ok("clients", "list", env=env).stdout) == []


def test_newer_schema_is_refused(fresh_db):
    env = {"SSA_STORE_URL": fresh_db}
    ok("store", "migrate", env=env)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    r = run("keys", "list", env=env)
    assert r.returncode == 1
    assert f"schema version 99, newer than this server knows ({LATEST}): upgrade ssa-server" in r.stderr


def test_migration_2_keeps_the_ssas_of_a_version_1_database(fresh_db):
    """Migration 2 (Token Status Lists) on a database a version-1 server wrote: its SSAs keep
    every field, answer GET /ssa/status semantics through the CLI's store, and new ones get entries."""
    from ssa_server.store.pgschema import MIGRATIONS, VERSION_TABLE

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(VERSION_TABLE)
        for statement in MIGRATIONS[0][1]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (true, 1)")
    env = {"SSA_STORE_URL": fresh_db}
    assert run("ssa", "list", env=env).returncode == 1  # refused until migrated
    assert json.loads(ok("store", "migrate", env=env).stdout)["schema_version"] == LATEST
    with psycopg.connect(fresh_db, autocommit=True) as conn:  # an SSA the version-1 server stored
        conn.execute("INSERT INTO ssa (jti, org_id, status, expiration, creator_id, created_at, one_time_use,"
                     " doc) VALUES ('old', 'acme', 'REVOKED', 1, 'cli', 1, true, %s)",
                     (json.dumps({"description": "", "software_id": "s", "software_roles": [],
                                  "grant_types": [], "rotate_ssa": True, "custom": {},
                                  "iss": "http://127.0.0.1:8080"}),))
    token = json.loads(ok("ssa", "create", "--org-id", "acme", env=env).stdout)["ssa"]
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["status"]["status_list"]["uri"] == "http://127.0.0.1:8080/statuslists/1"
    export = ok("store", "export", env=env).stdout
    tables = [json.loads(line)["table"] for line in export.splitlines() if line.strip()]
    assert tables.count("statuslists") == 1 and tables.count("ssa") == 2  # the old SSA kept, without an entry


def _records(text: str) -> list[tuple[str, str]]:
    return sorted((json.loads(line)["table"], json.dumps(json.loads(line)["record"], sort_keys=True))
                  for line in text.splitlines() if line.strip())


def test_export_import_tinydb_to_postgresql_and_back_loses_nothing(tmp_path, pg_url):
    truncate(pg_url)
    tiny = ["--data-dir", str(tmp_path / "tiny")]
    ok("clients", "create", "--scope", ADMIN, "--name", "onboarding", *tiny)
    ok("ssa", "create", "--org-id", "acme", "--attr", "tier=gold", "--save-template", "gold", *tiny,
       env={"SSA_CUSTOM_ATTRIBUTES": "tier"})
    ok("ssa", "create", "--org-id", "acme", "--no-one-time-use", "--lifetime", "60", *tiny)
    ok("keys", "rotate", *tiny)
    revoked = ok("ssa", "create", "--org-id", "gone", *tiny)
    ok("ssa", "revoke", "--org-id", "gone", *tiny)
    assert revoked.stdout

    dump = tmp_path / "tiny.jsonl"
    ok("store", "export", "-o", str(dump), *tiny)
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600  # it holds the private keys
    original = _records(dump.read_text())
    tables = [t for t, _ in original]
    assert (tables.count("clients"), tables.count("keys"), tables.count("templates"),
            tables.count("ssa")) == (1, 3, 1, 3)  # token key, first and rotated SSA keys

    report = json.loads(ok("store", "import", str(dump), "--store-url", pg_url).stdout)
    assert report["ssa"] == {"read": 3, "imported": 3, "skipped": 0} and report["keys"]["imported"] == 3
    from_pg = ok("store", "export", "--store-url", pg_url).stdout
    assert _records(from_pg) == original

    again = json.loads(ok("store", "import", "-", "--store-url", pg_url, stdin=from_pg).stdout)
    assert all(r["imported"] == 0 and r["skipped"] == r["read"] for r in again.values())

    back = ["--data-dir", str(tmp_path / "back")]
    ok("store", "import", "-", *back, stdin=from_pg)
    assert _records(ok("store", "export", *back).stdout) == original

    # The PostgreSQL deployment signs with the key the TinyDB one used last.
    active = [json.loads(r) for t, r in original if t == "keys" and json.loads(r)["status"] == "active"
              and json.loads(r)["use"] == "ssa"]
    listed = json.loads(ok("keys", "list", "--data-dir", str(tmp_path / "x"),
                           env={"SSA_STORE_URL": pg_url}).stdout)
    assert [k["kid"] for k in listed if k["status"] == "active" and k["use"] == "ssa"] == [active[0]["kid"]]


def test_import_into_a_store_with_keys_keeps_one_active_key_per_use(tmp_path):
    a, b = ["--data-dir", str(tmp_path / "a")], ["--data-dir", str(tmp_path / "b")]
    ok("ssa", "create", "--org-id", "o", *a)
    ok("ssa", "create", "--org-id", "p", *b)
    report = json.loads(ok("store", "import", "-", *b, stdin=ok("store", "export", *a).stdout).stdout)
    assert report["keys"]["imported"] == 2 and report["ssa"]["imported"] == 1
    keys = json.loads(ok("keys", "list", *b).stdout)
    for use in ("ssa", "token"):
        assert len([k for k in keys if k["use"] == use and k["status"] == "active"]) == 1
        assert len([k for k in keys if k["use"] == use and k["status"] == "retiring"]) == 1


@pytest.mark.parametrize("line,message", [
    ("not json", "line 1 is not JSON"),
    ('{"table": "nope", "record": {}}', "line 1 is not"),
    ('{"table": "ssa", "record": {"org_id": "x"}}', "line 1: a ssa record without its jti"),
    ('{"table": "keys", "record": {"kid": "k", "alg": "RS256"}}',
     "line 1: a keys record without use, jwk, status"),
])
def test_bad_import_file_is_one_line_and_imports_nothing(tmp_path, line, message):
    r = run("store", "import", "-", "--data-dir", str(tmp_path), stdin=line + "\n")
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert not Path(tmp_path / "store.jsonl").exists() or Path(tmp_path / "store.jsonl").read_text() == ""


@pytest.mark.parametrize("missing", ["software_roles", "description", "iss"])
def test_an_exported_ssa_without_a_field_of_the_model_is_refused(tmp_path, missing):
    """An SSA line must hold every field of the model's record (``ssa.REQUIRED_RECORD_FIELDS``):
    one without its lists crashed the import, one without another field was imported and broke
    ``ssa list`` and GET /ssa on it."""
    import time

    now = int(time.time())
    record = {"jti": "j1", "org_id": "acme", "description": "", "software_id": "s", "software_roles": [],
              "grant_types": [], "one_time_use": False, "rotate_ssa": True, "lifetime": None, "custom": {},
              "created_at": now, "expiration": now + 3600, "status": "ACTIVE", "creator_id": "c",
              "iss": "http://x"}
    del record[missing]
    line = json.dumps({"table": "ssa", "record": record})
    r = run("store", "import", "-", "--data-dir", str(tmp_path), stdin=line)
    assert r.returncode == 1 and r.stderr == f"ssa-server: import: line 1: a ssa record without {missing}\n"
    assert json.loads(ok("ssa", "list", "--data-dir", str(tmp_path)).stdout) == []


def test_import_of_text_postgresql_cannot_hold_is_one_line(tmp_path, pg_url):
    truncate(pg_url)
    record = {"client_id": "c\u0000", "name": "", "secret_hash": "h", "scopes": [], "created_at": 1}
    r = run("store", "import", "-", "--store-url", pg_url,
            stdin=json.dumps({"table": "clients", "record": record}))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("ssa-server: import: a value cannot be stored in PostgreSQL")
