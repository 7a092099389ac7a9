"""The embedded store's writer under injected faults (no root needed): short writes and ENOSPC,
EIO from fsync, a torn fragment left by a dead writer.  Nothing that is not on disk whole is
acknowledged, a failed batch and every change queued behind it are rolled back, and the store
recovers by itself once writing works again."""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time

import pytest

from conftest import ADMIN
from ssa_server.store import StoreUnavailable
from ssa_server.store.tiny import TinyStore
from test_store import ssa


def journal(data_dir) -> bytes:
    return (data_dir / "store.jsonl").read_bytes()


def assert_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "temporarily_unavailable"
    assert set(response.json()) == {"error", "error_description"}
    assert response.headers["retry-after"].isdigit()


def wait_ready(api, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while api.client.get("/health/ready").status_code != 200:
        assert time.monotonic() - start < timeout, api.client.get("/health/ready").text
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_short_write_then_enospc_acknowledges_nothing_and_recovers(make_api, tmp_path, disk_faults):
    data = tmp_path / "d"
    api = make_api(data_dir=data)
    H = api.auth(ADMIN)
    assert api.create(H, org_id="before").status_code == 201
    faults = disk_faults(data)
    before = journal(data)
    faults.room = {"journal": 300, "other": 0}  # less than one SSA line: a short write, then ENOSPC

    results: list = []
    def create() -> None:
        results.append(api.create(H, org_id="during"))

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert_unavailable(r)
    assert journal(data) == before  # the cut batch was truncated away
    assert api.client.get("/ssa", params={"org_id": "during"}, headers=H).json() == []  # rolled back
    assert len(api.client.get("/ssa", params={"org_id": "before"}, headers=H).json()) == 1  # reads work
    ready = api.client.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "DOWN"
    (store,) = [c for c in ready.json()["checks"] if c["name"] == "store"]
    assert store["status"] == "DOWN" and "No space left on device" in store["reason"]
    attempts = faults.attempts["journal"]
    assert_unavailable(api.create(H, org_id="refused"))  # refused at once: nothing applied, nothing written
    assert faults.attempts["journal"] == attempts
    assert api.client.get("/ssa", params={"org_id": "refused"}, headers=H).json() == []

    faults.room = {}  # space is back
    assert wait_ready(api) < 3
    assert api.create(H, org_id="after").status_code == 201
    api.client.__exit__(None, None, None)

    async def reopen():
        s = TinyStore(data)
        await s.open()
        orgs = sorted(r["org_id"] for r in await s.find_ssas())
        await s.close()
        return orgs
    assert asyncio.run(reopen()) == ["after", "before"]


@pytest.mark.parametrize("code", [errno.EIO, errno.EDQUOT])
def test_an_error_from_fsync_is_not_acknowledged(make_api, tmp_path, disk_faults, code):
    data = tmp_path / "d"
    api = make_api(data_dir=data)
    H = api.auth(ADMIN)
    faults = disk_faults(data)
    before = journal(data)
    faults.fsync_errors = {"journal": [code]}
    assert_unavailable(api.create(H, org_id="lost"))
    assert journal(data) == before
    assert api.client.get("/ssa", params={"org_id": "lost"}, headers=H).json() == []
    assert wait_ready(api) < 3  # the next fsync works: the probe succeeds within about a second
    assert api.create(H, org_id="kept").status_code == 201


def test_changes_queued_behind_a_failed_batch_are_rolled_back_newest_first(tmp_path, disk_faults):
    """The failed batch and every change applied in memory after it (queued behind it) are undone."""

    async def go():
        s = TinyStore(tmp_path)
        await s.open()
        kept = ssa("kept", one_time=False)
        await s.add_ssa(kept)
        before = journal(tmp_path)
        faults = disk_faults(tmp_path)
        faults.gate = threading.Event()
        first = ssa("first")
        t1 = asyncio.create_task(s.add_ssa(first))  # the flusher takes it and waits at the gate
        await asyncio.sleep(0.1)
        queued = [asyncio.create_task(c) for c in (
            s.mark_used(first["jti"], int(time.time())),  # depends on the failed create
            s.revoke_ssas(jti=kept["jti"], now=5),  # a durable SSA changed behind it
            s.add_client({"client_id": "c", "name": "", "secret_hash": "h", "scopes": [], "created_at": 1}),
            s.add_ssa(ssa("second")),
        )]
        await asyncio.sleep(0.05)
        assert (await s.get_ssa(first["jti"]))["status"] == "USED"  # applied in memory, not yet on disk
        faults.room = {"journal": 0, "other": 0}
        faults.gate.set()
        results = await asyncio.gather(t1, *queued, return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert await s.get_ssa(first["jti"]) is None
        assert (await s.get_ssa(kept["jti"]))["status"] == "ACTIVE"
        assert await s.get_client("c") is None and await s.count_ssas() == 1
        assert journal(tmp_path) == before
        with pytest.raises(StoreUnavailable):  # degraded: refused before anything is applied
            await s.add_ssa(ssa("refused"))
        assert await s.count_ssas() == 1

        faults.room = {}
        faults.gate = None
        await asyncio.sleep(1.1)  # the next write attempt probes again
        late = ssa("late")
        await s.add_ssa(late)
        now = int(time.time())
        results = await asyncio.gather(*[s.mark_used(late["jti"], now) for _ in range(20)])
        assert sum(r is not None for r in results) == 1  # still exactly one
        await s.close()
        s = TinyStore(tmp_path)
        await s.open()
        assert sorted(r["org_id"] for r in await s.find_ssas()) == ["kept", "late"]
        assert (await s.get_ssa(kept["jti"]))["status"] == "ACTIVE"
        assert (await s.get_ssa(late["jti"]))["status"] == "USED"
        await s.close()
    asyncio.run(go())


def test_a_one_time_validation_that_cannot_be_written_is_refused_and_undone(make_api, tmp_path, disk_faults):
    data = tmp_path / "d"
    api = make_api(data_dir=data)
    H = api.auth(ADMIN)
    jti = api.jti(api.create(H, org_id="o"))
    faults = disk_faults(data)
    faults.room = {"journal": 10, "other": 0}
    assert_unavailable(api.client.post("/ssa/validation", headers={"jti": jti}))
    faults.room = {}
    wait_ready(api)
    assert api.client.post("/ssa/validation", headers={"jti": jti}).status_code == 200  # it was still ACTIVE
    assert api.client.post("/ssa/validation", headers={"jti": jti}).status_code == 400


def test_a_torn_fragment_of_a_dead_writer_is_cut_before_the_next_append(tmp_path, caplog):
    async def go():
        s = TinyStore(tmp_path)
        await s.open()
        await s.add_ssa(ssa("a"))
        with open(tmp_path / "store.jsonl", "ab") as f:  # a CLI process killed in the middle of its write
            f.write(b'{"w":"dead","t":"ssa","id":"x","doc":{"jti":')
        await s.add_ssa(ssa("b"))
        await s.close()
        s = TinyStore(tmp_path)
        await s.open()
        orgs = sorted(r["org_id"] for r in await s.find_ssas())
        await s.close()
        return orgs

    with caplog.at_level(logging.WARNING, logger="ssa_server"):
        assert asyncio.run(go()) == ["a", "b"]
    assert any("torn" in r.getMessage() for r in caplog.records)
