"""The embedded store's journal encoding and tail reading (TinyStore only)."""

from __future__ import annotations

import asyncio
import time
import uuid

from ssa_server.jsonvalues import clone
from ssa_server.store.tiny import TinyStore


def ssa(**extra):
    now = int(time.time())
    return dict({"jti": str(uuid.uuid4()), "org_id": "o", "description": "", "software_id": "s",
                 "software_roles": ["password"], "grant_types": ["client_credentials"], "one_time_use": True,
                 "rotate_ssa": True, "lifetime": None, "custom": {}, "created_at": now,
                 "expiration": now + 3600, "status": "ACTIVE", "creator_id": "c", "iss": "http://x"}, **extra)


async def opened(path, exclusive=True) -> TinyStore:
    store = TinyStore(path, exclusive=exclusive)
    await store.open()
    return store


def test_values_survive_a_restart_exactly(tmp_path):
    """Integers beyond 64 bits, floats, unicode and nesting come back as they were stored."""
    custom = {"big": 2**70, "neg": -(2**65), "f": 0.1, "u": "żółw ✓", "deep": {"a": [1, {"b": None}]}}
    record = ssa(custom=custom)

    async def go():
        s = await opened(tmp_path)
        await s.add_ssa(record)
        await s.put_template({"name": "t", "fields": {"n": 2**80}, "created_at": 1})
        await s.close()
        s = await opened(tmp_path)
        got = await s.get_ssa(record["jti"])
        template = await s.get_template("t")
        await s.close()
        return got, template

    got, template = asyncio.run(go())
    assert got == record and type(got["custom"]["big"]) is int
    assert template["fields"]["n"] == 2**80


def test_server_sees_appends_of_another_process_but_not_its_own_twice(tmp_path):
    async def go():
        server = await opened(tmp_path)
        mine = ssa()
        await server.add_ssa(mine)
        cli = await opened(tmp_path, exclusive=False)
        theirs = ssa(org_id="other")
        await cli.add_ssa(theirs)
        await cli.revoke_ssas(jti=mine["jti"], now=int(time.time()))
        await cli.close()
        seen = await server.get_ssa(theirs["jti"])
        revoked = await server.get_ssa(mine["jti"])
        lines = server.journal.lines
        await server.close()
        return seen, revoked, lines

    seen, revoked, lines = asyncio.run(go())
    assert seen is not None and seen["org_id"] == "other"
    assert revoked["status"] == "REVOKED"
    assert lines == 3  # each journal line counted once (garbage accounting drives compaction)


def test_replay_reads_a_journal_larger_than_one_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr("ssa_server.store.journal._CHUNK", 1024)  # lines straddle many chunk borders
    records = [ssa(description="x" * 700) for _ in range(50)]

    async def go():
        s = await opened(tmp_path)
        await s.add_ssas(records)
        await s.close()
        s = await opened(tmp_path)
        count = await s.count_ssas()
        last = await s.get_ssa(records[-1]["jti"])
        await s.close()
        return count, last

    count, last = asyncio.run(go())
    assert count == 50 and last == records[-1]


def test_copies_are_independent_of_the_store(tmp_path):
    async def go():
        s = await opened(tmp_path)
        r = ssa(custom={"k": [1]})
        await s.add_ssa(r)
        for got in (await s.get_ssa(r["jti"]), (await s.find_ssas(org_id="o"))[0]):
            got["software_roles"].append("x")
            got["custom"]["k"].append(2)
        again = await s.get_ssa(r["jti"])
        await s.close()
        return again

    again = asyncio.run(go())
    assert again["software_roles"] == ["password"] and again["custom"] == {"k": [1]}


def test_clone_is_deep():
    value = {"a": [1, {"b": [2]}]}
    copied = clone(value)
    copied["a"][1]["b"].append(3)
    assert value == {"a": [1, {"b": [2]}]}

