"""One home per store concept: the tables every store holds, the one URL masker, the export's
encoding, and a store package that costs its importers (the sandbox worker among them) nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from ssa_server.settings import Settings, redact_url
from ssa_server.store import TABLES


def test_every_store_holds_the_tables_of_the_records_module(tmp_path, pg_url):
    import psycopg

    from ssa_server.store.tiny import TinyStore

    assert tuple(TinyStore(tmp_path).tables) == TABLES
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        assert {r[0] for r in rows} == {*TABLES, "schema_version"}


@pytest.mark.parametrize("url,shown", [
    ("postgresql://app:hunter2@db/ssa", "postgresql://app:***@db/ssa"),
    ("postgresql://app:s3cr@t@db:5432/ssa", "postgresql://app:***@db:5432/ssa"),
    ("postgresql://db/ssa?user=app&password=s3cr", "postgresql://db/ssa?user=app&password=***"),
    ("postgresql://app@db/ssa", "postgresql://app@db/ssa"),
    ("tinydb://app:pw@x", "tinydb://app:***@x"),
    ("tinydb:///srv/ssa", "tinydb:///srv/ssa"),
])
def test_config_show_masks_a_url_as_every_message_does(url, shown):
    assert Settings(store_url=url).public_dict()["store_url"] == shown == redact_url(url)


def test_an_export_is_utf8_whatever_the_locale_of_its_stdout(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSA_")}

    def cli(*args: str, data: str, extra: dict[str, str] | None = None, stdin: bytes | None = None) -> bytes:
        r = subprocess.run([sys.executable, "-m", "ssa_server", *args, "--data-dir", str(tmp_path / data)],
                           capture_output=True, env=dict(env, **(extra or {})), input=stdin, timeout=120)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        return r.stdout

    cli("ssa", "create", "--org-id", "żółw ✓", "--description", "naïve", data="a")
    exported = cli("store", "export", data="a", extra={"PYTHONIOENCODING": "ascii", "LC_ALL": "C"})
    assert "żółw ✓".encode() in exported  # UTF-8, not escapes (and not refused by an ASCII stdout)
    cli("store", "import", "-", data="b", stdin=exported)
    (item,) = json.loads(cli("ssa", "list", data="b"))
    assert (item["ssa"]["org_id"], item["ssa"]["description"]) == ("żółw ✓", "naïve")


def test_the_store_package_loads_no_backend():
    """``ssa_server.store`` gives records, statuses and errors without loading the journal,
    TinyDB, orjson or psycopg."""
    heavy = ("tinydb", "orjson", "psycopg", "ssa_server.settings", "ssa_server.store.journal",
             "ssa_server.store.tiny", "ssa_server.store.postgres")
    code = f"import sys, ssa_server.store; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_open_store_for_store_migrate_takes_two_connections_and_long_statements():
    from ssa_server.store.backends import MIGRATE_STATEMENT_TIMEOUT, open_store

    settings = Settings(store_url="postgresql://app@127.0.0.1:1/ssa", store_pool_max=20,
                        store_statement_timeout=5)
    store = open_store(settings, exclusive=False, migration=True)
    assert (store._pool_min, store._pool_max) == (1, 2)
    assert f"statement_timeout={int(MIGRATE_STATEMENT_TIMEOUT * 1000)}" in store._connect_kwargs["options"]
    served = open_store(settings, exclusive=False)
    assert served._pool_max == 20 and "statement_timeout=5000" in served._connect_kwargs["options"]
    asyncio.run(store.close())
