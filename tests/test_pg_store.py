"""What only the PostgreSQL store has: statement timeouts as 503, key set-up across processes."""

from __future__ import annotations

import asyncio

import pytest

psycopg = pytest.importorskip("psycopg", reason="pip install -e '.[test]' installs the PostgreSQL driver")

from conftest import truncate  # noqa: E402
from ssa_server.keys import KeyRing  # noqa: E402
from ssa_server.store.postgres import PgStore  # noqa: E402


def test_statement_timeout_is_503_json_and_nothing_is_stored(make_api, pg_url):
    api = make_api(store_url=pg_url, store_statement_timeout=0.3)
    H = api.auth()
    with psycopg.connect(pg_url) as blocker:  # holds the table so every write waits
        blocker.execute("LOCK TABLE ssa IN ACCESS EXCLUSIVE MODE")
        r = api.create(H, org_id="slow")
        assert r.status_code == 503, r.text
        assert r.json() == {"error": "temporarily_unavailable",
                            "error_description": "The store is not available; retry later."}
        blocker.rollback()
    assert api.call(api.server.store.count_ssas) == 0
    assert api.create(H, org_id="slow").status_code == 201


def test_concurrent_key_setup_creates_one_key_per_use(pg_url):
    truncate(pg_url)

    async def go():
        stores = [PgStore(pg_url) for _ in range(5)]
        for s in stores:
            await s.open()
        rings = [KeyRing(s, "ES256") for s in stores]
        await asyncio.gather(*[r.load() for r in rings])
        keys = await stores[0].list_keys()
        assert sorted(k["use"] for k in keys) == ["ssa", "token"]
        assert len({r.active()["kid"] for r in rings}) == 1  # every process signs with the same key
        # three rotations at once: three keys retired in turn
        await asyncio.gather(*[r.rotate() for r in rings[:3]])
        active = [k for k in await stores[0].list_keys() if k["use"] == "ssa" and k["status"] == "active"]
        assert len(active) == 1
        for s in stores:
            await s.close()
    asyncio.run(go())


@pytest.fixture
def store_kind():
    return "postgresql"


@pytest.mark.parametrize("url,shown", [
    ("postgresql://app:s3cr@t@db:5432/ssa", "postgresql://app:***@db:5432/ssa"),
    ("postgres://app:a/b@db/ssa", "postgres://app:***@db/ssa"),
    ("postgresql://db/ssa?user=app&password=s3cr", "postgresql://db/ssa?user=app&password=***"),
    ("postgresql://app@db/ssa", "postgresql://app@db/ssa"),
])
def test_messages_never_show_the_password(url, shown):
    from ssa_server.settings import redact_url as redact

    assert redact(url) == shown
