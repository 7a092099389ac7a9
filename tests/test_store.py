"""The store contract, run against both stores (TinyDB and PostgreSQL), then the embedded store's
own rules: durability, multi-process journal, crash safety."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from ssa_server.store import StoreLocked, StoreUnavailable
from ssa_server.store.tiny import TinyStore


def ssa(org="o", *, one_time=True, exp=None, creator="c", **extra):
    now = int(time.time())
    return dict({"jti": str(uuid.uuid4()), "org_id": org, "description": "", "software_id": "s",
                 "software_roles": [], "grant_types": [], "one_time_use": one_time, "rotate_ssa": True,
                 "lifetime": None, "custom": {"k": [1]}, "created_at": now,
                 "expiration": exp if exp is not None else now + 3600, "status": "ACTIVE",
                 "creator_id": creator, "iss": "http://x"}, **extra)


def run(coro):
    return asyncio.run(coro)


async def opened(path, exclusive=True) -> TinyStore:
    store = TinyStore(path, exclusive=exclusive)
    await store.open()
    return store


@pytest.fixture(params=["tinydb", "postgresql"])
def make_store(request, tmp_path):
    """``await make_store()`` opens (or reopens) the store under test; PostgreSQL starts empty."""
    if request.param == "tinydb":
        return lambda: opened(tmp_path)
    from conftest import truncate
    from ssa_server.store.postgres import PgStore

    url = request.getfixturevalue("pg_url")
    truncate(url)

    async def open_pg():
        store = PgStore(url)
        await store.open()
        return store
    return open_pg


# --- the contract (both stores) ---
def test_delete_template(make_store):
    async def go():
        s = await make_store()
        await s.put_template({"name": "t", "fields": {"org_id": "x"}, "created_at": 1})
        await s.put_template({"name": "u", "fields": {}, "created_at": 2})
        assert await s.delete_template("t") is True
        assert await s.get_template("t") is None
        assert await s.delete_template("t") is False
        assert [t["name"] for t in await s.list_templates()] == ["u"]
        await s.close()
        s = await make_store()  # the deletion is durable
        assert await s.get_template("t") is None and [t["name"] for t in await s.list_templates()] == ["u"]
        await s.close()
    run(go())


def test_crud_and_copies(make_store):
    async def go():
        s = await make_store()
        r = ssa("a")
        await s.add_ssa(r)
        with pytest.raises(ValueError):
            await s.add_ssa(r)
        got = await s.get_ssa(r["jti"])
        assert got == r
        got["custom"]["k"].append(2)
        r["org_id"] = "changed"
        assert (await s.get_ssa(r["jti"]))["custom"] == {"k": [1]}
        assert (await s.get_ssa(r["jti"]))["org_id"] == "a"
        await s.add_ssas([ssa("a", creator="d"), ssa("b")])
        assert len(await s.find_ssas(org_id="a")) == 2
        assert len(await s.find_ssas(org_id="a", creator_id="d")) == 1
        assert await s.find_ssas(jti=r["jti"], org_id="b") == []
        assert await s.count_ssas() == 3
        await s.add_client({"client_id": "c1", "name": "", "secret_hash": "h", "scopes": [], "created_at": 1})
        assert (await s.get_client("c1"))["secret_hash"] == "h"
        assert await s.has_client("c1") and not await s.has_client("c2")
        assert await s.delete_client("c1") and not await s.delete_client("c1")
        assert not await s.has_client("c1")
        await s.add_key({"kid": "k", "alg": "RS256", "use": "ssa", "jwk": {}, "status": "active",
                         "created_at": 1})
        await s.update_key("k", {"status": "retiring"})
        assert (await s.list_keys())[0]["status"] == "retiring"
        await s.put_template({"name": "t", "fields": {"org_id": "x"}, "created_at": 1})
        assert (await s.get_template("t"))["fields"] == {"org_id": "x"}
        await s.close()
        s = await make_store()  # everything survives a reopen
        assert await s.count_ssas() == 3 and (await s.get_template("t")) and not await s.get_client("c1")
        assert len(await s.find_ssas(org_id="a")) == 2
        await s.close()
    run(go())


def test_mark_used_is_atomic(make_store):
    async def go():
        s = await make_store()
        once, many, old = ssa(), ssa(one_time=False), ssa(exp=int(time.time()) - 1)
        await s.add_ssas([once, many, old])
        now = int(time.time())
        results = await asyncio.gather(*[s.mark_used(once["jti"], now) for _ in range(50)])
        assert sum(r is not None for r in results) == 1
        assert (await s.get_ssa(once["jti"]))["status"] == "USED"
        assert all(await asyncio.gather(*[s.mark_used(many["jti"], now) for _ in range(5)]))
        assert (await s.get_ssa(many["jti"]))["status"] == "ACTIVE"
        assert await s.mark_used(old["jti"], now) is None and await s.mark_used("nope", now) is None
        await s.close()
    run(go())


def test_revoke_and_cleanup(make_store):
    async def go():
        s = await make_store()
        a, b, c = ssa("x"), ssa("x"), ssa("y")
        await s.add_ssas([a, b, c])
        assert await s.revoke_ssas(jti=a["jti"], org_id="y", now=5) == []
        (r,) = await s.revoke_ssas(jti=a["jti"], now=5)
        assert r["status"] == "REVOKED" and r["expiration"] == 5
        assert [x["jti"] for x in await s.revoke_ssas(org_id="x", now=6)] == [b["jti"]]
        expiring = ssa("z", exp=100)
        await s.add_ssa(expiring)
        assert await s.expire_and_purge(now=200, grace=1000) == (1, 0)
        assert (await s.get_ssa(expiring["jti"]))["status"] == "EXPIRED"
        assert await s.expire_and_purge(now=5000, grace=1000) == (0, 3)
        assert await s.count_ssas() == 1
        await s.close()
    run(go())


# --- the embedded store ---
def test_files_are_private_and_compaction_keeps_records(tmp_path):
    async def go():
        s = await opened(tmp_path / "d")
        keep = ssa(one_time=False)
        await s.add_ssa(keep)
        for _ in range(1200):
            r = ssa(exp=1)
            await s.add_ssa(r)
            await s.revoke_ssas(jti=r["jti"], now=1)
        await s.expire_and_purge(now=10_000, grace=0)  # purges, leaving garbage lines
        await s.close()
        s = await opened(tmp_path / "d")  # compacts at open: garbage > live
        lines = (tmp_path / "d" / "store.jsonl").read_bytes().count(b"\n")
        assert lines == 1 and await s.get_ssa(keep["jti"]) == keep
        await s.close()
    run(go())
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o700
    for f in (tmp_path / "d").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_torn_last_line_is_dropped(tmp_path):
    async def go():
        s = await opened(tmp_path)
        r = ssa()
        await s.add_ssa(r)
        await s.close()
        with open(tmp_path / "store.jsonl", "ab") as f:
            f.write(b'{"t":"ssa","id":"half')
        s = await opened(tmp_path)
        assert await s.count_ssas() == 1
        await s.add_ssa(ssa())
        await s.close()
        s = await opened(tmp_path)
        assert await s.count_ssas() == 2
        await s.close()
    run(go())


def test_corrupt_middle_line_is_a_clear_error(tmp_path):
    (tmp_path / "store.jsonl").write_bytes(b'garbage\n{"t":"ssa"}\n')
    with pytest.raises(StoreUnavailable, match="line 1 is corrupt"):
        run(TinyStore(tmp_path).open())


def test_second_exclusive_open_is_refused_and_other_processes_are_seen(tmp_path):
    async def go():
        s = await opened(tmp_path)
        with pytest.raises(StoreLocked, match="in use by another ssa-server process"):
            await opened(tmp_path)
        # Another process appends while this one runs; it is seen without reopening.
        code = textwrap.dedent(f"""
            import asyncio
            from ssa_server.store.tiny import TinyStore
            async def go():
                s = TinyStore({str(tmp_path)!r}, exclusive=False)
                await s.open()
                await s.add_client({{"client_id": "cli", "name": "", "secret_hash": "h", "scopes": [],
                                     "created_at": 1}})
                await s.close()
            asyncio.run(go())
        """)
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert (await s.get_client("cli"))["client_id"] == "cli"
        await s.add_ssa(ssa())  # our own writes keep working after theirs
        await s.close()
        s = await opened(tmp_path)
        assert await s.get_client("cli") and await s.count_ssas() == 1
        await s.close()
    run(go())


def test_kill_9_mid_burst_keeps_every_acknowledged_write(tmp_path):
    code = textwrap.dedent(f"""
        import asyncio, sys, time, uuid
        from ssa_server.store.tiny import TinyStore
        async def one(s):
            now = int(time.time())
            r = {{"jti": str(uuid.uuid4()), "org_id": "o", "description": "x" * 200, "software_id": "s",
                  "software_roles": [], "grant_types": [], "one_time_use": True, "rotate_ssa": True,
                  "lifetime": None, "custom": {{}}, "created_at": now, "expiration": now + 99,
                  "status": "ACTIVE", "creator_id": "c", "iss": "i"}}
            await s.add_ssa(r)
            print(r["jti"], flush=True)
        async def go():
            s = TinyStore({str(tmp_path)!r})
            await s.open()
            while True:
                await asyncio.gather(*[one(s) for _ in range(8)])
        asyncio.run(go())
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    try:
        while len(acknowledged) < 300:
            line = proc.stdout.readline()
            assert line, "writer died"
            acknowledged.append(line.strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    async def check():
        s = await opened(tmp_path)
        missing = [j for j in acknowledged if await s.get_ssa(j) is None]
        await s.close()
        return missing

    assert run(check()) == []


def test_concurrent_revokes_and_key_updates_lose_nothing(make_store):
    async def go():
        s = await make_store()
        records = [ssa("many") for _ in range(30)]
        await s.add_ssas(records)
        first, second = await asyncio.gather(s.revoke_ssas(org_id="many", now=7),
                                             s.revoke_ssas(org_id="many", now=8))
        revoked = [r["jti"] for r in first + second]
        assert sorted(revoked) == sorted(r["jti"] for r in records)  # each revoked once, by one of them
        await s.add_key({"kid": "k", "alg": "RS256", "use": "ssa", "jwk": {"kty": "RSA"}, "status": "active",
                         "created_at": 1})
        await asyncio.gather(s.update_key("k", {"status": "retiring", "remove_after": 9}),
                             s.update_key("k", {"note": "x"}))
        (key,) = await s.list_keys()
        assert (key["status"], key["remove_after"], key["note"], key["jwk"]) == ("retiring", 9, "x",
                                                                                 {"kty": "RSA"})
        with pytest.raises(KeyError):
            await s.update_key("nope", {"status": "retired"})
        await s.close()
    run(go())
