"""Compaction under injected faults (no root needed): no room for the temp file, a temp file that
does not read back as written, a leftover temp file.  The journal that is installed is always
complete; when it cannot be, the server keeps serving on the old one and tries again later."""

from __future__ import annotations

import asyncio
import logging
import time

from ssa_server.store.tiny import TinyStore
from test_store import ssa

CLIENT = {"client_id": "c1", "name": "", "secret_hash": "h", "scopes": ["s"], "created_at": 1}
KEY = {"kid": "k1", "alg": "RS256", "use": "ssa", "jwk": {"kty": "RSA", "n": "x" * 300}, "status": "active",
       "created_at": 1}
TEMPLATE = {"name": "t", "fields": {"org_id": "x"}, "created_at": 1}


async def with_garbage(path, garbage: int, *, live: int = 50) -> list[dict]:
    """A journal with ``live`` SSAs, a client, a key and a template, and 1.5 x ``garbage`` dead lines."""
    s = TinyStore(path)
    await s.open()
    await s.add_client(CLIENT)
    await s.add_key(KEY)
    await s.put_template(TEMPLATE)
    kept = [ssa("kept", one_time=False) for _ in range(live)]
    await s.add_ssas(kept)
    await s.add_ssas([ssa("dead", exp=1) for _ in range(garbage // 2)])
    await s.revoke_ssas(org_id="dead", now=1)
    await s.expire_and_purge(int(time.time()) + 10, 0)  # deletes the revoked ones: 3 lines each
    await s.close()
    return kept


async def contents(path) -> tuple:
    s = TinyStore(path)
    await s.open()
    try:
        return (sorted(r["jti"] for r in await s.find_ssas(org_id="kept")), await s.get_client("c1"),
                await s.list_keys(), await s.get_template("t"))
    finally:
        await s.close()


def compaction_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "compact" in r.getMessage()]


def test_no_room_for_the_compacted_file_keeps_the_old_journal(tmp_path, disk_faults, caplog):
    kept = asyncio.run(with_garbage(tmp_path, 3000))
    before = (tmp_path / "store.jsonl").read_bytes()
    faults = disk_faults(tmp_path)
    faults.room = {"temp": 5000}  # the temp file is cut: a short write, then ENOSPC
    with caplog.at_level(logging.WARNING, logger="ssa_server"):
        jtis, client, keys, template = asyncio.run(contents(tmp_path))  # the open compacts (garbage > live)
    assert faults.written["temp"] == 5000
    assert (tmp_path / "store.jsonl").read_bytes() == before
    assert not (tmp_path / "store.jsonl.tmp").exists()
    assert jtis == sorted(r["jti"] for r in kept)
    assert client == CLIENT and [k["kid"] for k in keys] == ["k1"] and template == TEMPLATE
    assert len(compaction_warnings(caplog)) == 1


def test_a_temp_file_that_does_not_read_back_as_written_is_not_installed(tmp_path, disk_faults, caplog):
    kept = asyncio.run(with_garbage(tmp_path, 3000))
    before = (tmp_path / "store.jsonl").read_bytes()
    faults = disk_faults(tmp_path)
    faults.corrupt = {"temp"}  # every write reports its full length but one byte differs
    with caplog.at_level(logging.WARNING, logger="ssa_server"):
        jtis, client, _, template = asyncio.run(contents(tmp_path))
    assert (tmp_path / "store.jsonl").read_bytes() == before
    assert not (tmp_path / "store.jsonl.tmp").exists()
    assert jtis == sorted(r["jti"] for r in kept) and client == CLIENT and template == TEMPLATE
    assert len(compaction_warnings(caplog)) == 1


def test_a_failed_compaction_is_retried_later_not_at_every_cleanup(tmp_path, disk_faults, caplog):
    async def go():
        s = TinyStore(tmp_path, compact_retry_interval=0.5)
        await s.open()
        await s.add_client(CLIENT)
        kept = ssa("kept", one_time=False)
        await s.add_ssa(kept)
        await s.add_ssas([ssa("dead", exp=1) for _ in range(6000)])
        await s.revoke_ssas(org_id="dead", now=1)
        faults = disk_faults(tmp_path)
        faults.room = {"temp": 0}
        before = (tmp_path / "store.jsonl").stat().st_size
        now = int(time.time())
        assert await s.expire_and_purge(now, 0) == (0, 6000)  # 18,000 lines for 2 records: compacts, fails
        attempts = faults.attempts["temp"]
        assert attempts > 0 and (tmp_path / "store.jsonl").stat().st_size > before
        await s.expire_and_purge(now, 0)
        assert faults.attempts["temp"] == attempts  # not again right away
        assert len(compaction_warnings(caplog)) == 1
        await s.add_ssa(ssa("served"))  # the store keeps serving on the old journal
        await asyncio.sleep(0.6)
        faults.room = {}
        await s.expire_and_purge(now, 0)
        assert faults.attempts["temp"] > attempts
        assert (tmp_path / "store.jsonl").read_bytes().count(b"\n") == 3
        await s.close()
        s = TinyStore(tmp_path)
        await s.open()
        orgs = sorted(r["org_id"] for r in await s.find_ssas())
        assert orgs == ["kept", "served"] and await s.get_client("c1") == CLIENT
        await s.close()

    with caplog.at_level(logging.WARNING, logger="ssa_server"):
        asyncio.run(go())


def test_a_leftover_temp_file_is_removed_at_open(tmp_path):
    asyncio.run(with_garbage(tmp_path, 0, live=3))
    (tmp_path / "store.jsonl.tmp").write_bytes(b'{"t":"ssa","id":"half')  # a compaction killed midway
    jtis, client, _, _ = asyncio.run(contents(tmp_path))
    assert len(jtis) == 3 and client == CLIENT
    assert not (tmp_path / "store.jsonl.tmp").exists()


def test_writes_of_the_server_and_of_a_cli_process_during_a_compaction_are_kept(tmp_path):
    """A compaction runs in the writer thread where it was queued: writes applied before it are
    in its snapshot or in the tail it copies, writes after it land in the new file, and a CLI
    process appending meanwhile moves to the new file (its lines are copied or follow)."""

    async def go():
        server = TinyStore(tmp_path)
        await server.open()
        await server.add_client(CLIENT)
        await server.add_ssas([ssa("dead", exp=1) for _ in range(12_000)])
        await server.revoke_ssas(org_id="dead", now=1)
        cli = TinyStore(tmp_path, exclusive=False)
        await cli.open()
        mine = [ssa("server") for _ in range(30)]
        theirs = [ssa("cli") for _ in range(10)]

        async def cli_writes():
            for r in theirs:
                await cli.add_ssa(r)
                await asyncio.sleep(0.001)

        before = asyncio.gather(*[server.add_ssa(r) for r in mine[:15]])  # queued before the compaction
        cleanup = asyncio.ensure_future(server.expire_and_purge(int(time.time()) + 10, 0))
        await asyncio.sleep(0)
        after = asyncio.gather(*[server.add_ssa(r) for r in mine[15:]])  # queued behind it
        await asyncio.gather(before, cleanup, after, cli_writes())
        assert cleanup.result() == (0, 12_000)
        assert (tmp_path / "store.jsonl").stat().st_size < 200_000  # compacted
        assert len(await server.find_ssas(org_id="cli")) == 10  # the server sees the CLI's lines
        await cli.put_template(TEMPLATE)
        assert await server.get_template("t") == TEMPLATE
        await cli.close()
        await server.close()
        s = TinyStore(tmp_path)
        await s.open()
        got = {r["jti"] for r in await s.find_ssas()}
        assert got == {r["jti"] for r in mine + theirs}
        assert await s.get_client("c1") == CLIENT and await s.get_template("t") == TEMPLATE
        await s.close()

    asyncio.run(go())
