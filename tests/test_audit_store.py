"""The audit trail in the store (both backends): the hash chain, concurrent appenders, filters and
pages, checkpoints, retention with an anchor, export/import, and ``audit_verify`` naming the first
bad event for each kind of tampering."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import pytest

from ssa_server.audit import AuditQuery, AuditTrail
from ssa_server.audit_verify import verify
from ssa_server.errors import InvalidRequest
from ssa_server.events import SSA_CREATED, SSA_REVOKED, Event, Events
from ssa_server.server import Server
from ssa_server.settings import Settings
from ssa_server.store.records import GENESIS, audit_hash
from ssa_server.store.transfer import export_records, import_records, parse_lines
from test_store import make_store, opened, run, ssa  # noqa: F401  (fixtures: both stores)


def ev(action=SSA_CREATED, jti=None, org_id=None, at=None, **details):
    return {"action": action, "actor": "c1", "outcome": "ok", "reason": None, "jti": jti, "org_id": org_id,
            "kid": None, "address": "127.0.0.1", "request_id": None, "time": at or time.time(),
            "details": details}


async def _walk(store):
    for e in await store.list_audit():
        yield e


async def _verify(store):
    return await verify(_walk(store), await store.list_audit_checkpoints(), await store.list_keys())


def test_append_chains_and_survives_reopen(make_store):
    async def go():
        s = await make_store()
        head = await s.append_audit([ev(jti="a"), ev(jti="b")])
        assert head["seq"] == 2 and head["jti"] == "b"
        head = await s.append_audit([ev(SSA_REVOKED, jti="a", org_id="acme")])
        assert head["seq"] == 3
        stored = await s.list_audit()
        assert [e["seq"] for e in stored] == [1, 2, 3] and stored[-1] == head
        assert stored[0]["prev_hash"] == GENESIS
        assert stored[1]["prev_hash"] == stored[0]["hash"] and stored[2]["prev_hash"] == stored[1]["hash"]
        assert all(audit_hash(dict(e)) == e["hash"] for e in stored)
        await s.close()
        s = await make_store()
        assert await s.list_audit() == stored  # as stored, field for field (hashes still verify)
        more = await s.append_audit([ev()])  # the head was found again after the reopen
        assert more["seq"] == 4 and more["prev_hash"] == stored[-1]["hash"]
        problem, summary = await _verify(s)
        assert problem is None and summary["events"] == 4
        await s.close()
    run(go())


def test_concurrent_appends_keep_one_chain(make_store):
    async def go():
        s = await make_store()
        await asyncio.gather(*(s.append_audit([ev(jti=f"j{i}"), ev(jti=f"k{i}")]) for i in range(40)))
        events = await s.list_audit()
        assert [e["seq"] for e in events] == list(range(1, 81))
        assert (await _verify(s))[0] is None
        await s.close()
    run(go())


def test_filters_and_pages(make_store):
    async def go():
        s = await make_store()
        await s.append_audit([ev(jti="a", org_id="acme", at=100.0), ev(SSA_REVOKED, jti="a", org_id="acme",
                                                                       at=200.0),
                              ev(jti="b", org_id="globex", at=300.0)])
        assert [e["seq"] for e in await s.list_audit(action=SSA_REVOKED)] == [2]
        assert [e["seq"] for e in await s.list_audit(jti="a")] == [1, 2]
        assert [e["seq"] for e in await s.list_audit(org_id="globex")] == [3]
        assert [e["seq"] for e in await s.list_audit(since=200.0)] == [2, 3]
        assert [e["seq"] for e in await s.list_audit(after=1, limit=1)] == [2]
        trail = AuditTrail(s)
        page = await trail.page(AuditQuery(limit=2))
        assert [e["seq"] for e in page["events"]] == [1, 2] and page["next"] == 2
        page = await trail.page(AuditQuery(after=page["next"], limit=2))
        assert [e["seq"] for e in page["events"]] == [3] and page["next"] is None
        await s.close()
    run(go())


def test_query_parsing_refuses_bad_parameters():
    assert AuditQuery.parse(since="1970-01-01T00:01:40Z").since == 100.0
    assert AuditQuery.parse(since="100", limit="5", next="7") == AuditQuery(after=7, since=100.0, limit=5)
    for bad in ({"action": "ssa.nope"}, {"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"next": "-1"},
                {"since": "yesterday"}):
        with pytest.raises(InvalidRequest):
            AuditQuery.parse(**bad)


def test_expire_and_purge_names_what_it_expired(make_store):
    async def go():
        s = await make_store()
        now = int(time.time())
        old, live = ssa("acme", exp=now - 5), ssa("acme")
        await s.add_ssas([old, live])
        noted: list[tuple[str, str]] = []
        assert (await s.expire_and_purge(now, 3600, noted))[0] == 1
        assert noted == [(old["jti"], "acme")]
        await s.close()
    run(go())


# --- tampering: verify names the first bad event ---
def _tamper_cases():
    def changed(events):
        events[2]["actor"] = "someone-else"
        return events, 3, "hash mismatch"

    def deleted(events):
        del events[3]
        return events, 4, "gap"

    def reordered(events):  # seq 3 and 4 swap places (each keeps its own hashes)
        events[2], events[3] = dict(events[3], seq=3, id="3"), dict(events[2], seq=4, id="4")
        return events, 3, "hash mismatch"

    def rechained(events):  # an event changed and every hash after it recomputed: only the checkpoint tells
        prev = events[1]["hash"]
        for e in events[2:]:
            e["prev_hash"] = prev
            if e["seq"] == 3:
                e["reason"] = "rewritten"
            e["hash"] = prev = audit_hash({k: v for k, v in e.items() if k != "hash"})
        return events, 5, "differs from its signed checkpoint"

    def cut_tail(events):
        return events[:-2], 5, "missing"

    return {"changed": changed, "deleted": deleted, "reordered": reordered, "rechained": rechained,
            "cut_tail": cut_tail}


@pytest.mark.parametrize("case", sorted(_tamper_cases()))
def test_verify_names_the_first_tampered_event(tmp_path, case):
    """The same walk ``audit verify`` runs, over a chain changed the way an intruder would."""
    async def go():
        server = Server.build(Settings(data_dir=tmp_path / "d", scripts_dir=tmp_path / "none",
                                       audit_checkpoint_events=5))
        await server.start(background=False, scripts=False, keys=True)
        try:
            assert server.audit is not None
            await server.events.emit(*(Event(SSA_CREATED, "c1", jti=f"j{i}") for i in range(6)))
            await server.audit.flush()
            checkpoints = await server.store.list_audit_checkpoints()
            assert [c["seq"] for c in checkpoints] == [6]  # (one append of 6 events: >= 5 since none)
            await server.audit.checkpoint((await server.store.list_audit(after=4, limit=1))[0], "interval")
            events = await server.store.list_audit()
            assert (await _verify(server.store))[0] is None
            tampered, seq, what = _tamper_cases()[case]([dict(e) for e in events])

            async def walk():
                for e in tampered:
                    yield e
            problem, _ = await verify(walk(), await server.store.list_audit_checkpoints(),
                                      await server.store.list_keys())
            assert problem is not None and problem.seq == seq and what in problem.what, problem
        finally:
            await server.stop()
    run(go())


def test_a_forged_checkpoint_is_refused(tmp_path):
    async def go():
        server = Server.build(Settings(data_dir=tmp_path / "d", scripts_dir=tmp_path / "none"))
        await server.start(background=False, scripts=False, keys=True)
        try:
            await server.events.emit(Event(SSA_CREATED, "c1"), Event(SSA_CREATED, "c1"))
            await server.audit.flush()
            head = (await server.store.list_audit())[-1]
            cp = await server.audit.checkpoint(head, "interval")
            await server.store.put_audit_checkpoint(dict(cp, hash="f" * 64))  # the record, not the JWS
            problem, _ = await _verify(server.store)
            assert problem.seq == 2 and "differs from what its signature covers" in problem.what
            header, payload, sig = cp["jws"].split(".")
            await server.store.put_audit_checkpoint(dict(cp, jws=f"{header}.{payload}.{sig[::-1]}"))
            problem, _ = await _verify(server.store)
            assert problem.seq == 2 and problem.what == "bad checkpoint signature"
        finally:
            await server.stop()
    run(go())


# --- retention, export/import (both stores) ---
def _server(tmp_path, store_kind, request, **settings):
    extra = {}
    if store_kind == "postgresql":
        from conftest import truncate

        url = request.getfixturevalue("pg_url")
        truncate(url)
        extra["store_url"] = url
    return Server.build(Settings(data_dir=tmp_path / "d", scripts_dir=tmp_path / "none", **extra, **settings))


@pytest.mark.parametrize("store_kind", ["tinydb", "postgresql"])
def test_retention_purge_keeps_the_chain_verifiable(tmp_path, store_kind, request):
    async def go():
        server = _server(tmp_path, store_kind, request, audit_retention_days=1)
        await server.start(background=False, scripts=False, keys=True)
        try:
            now = time.time()
            old = [Event(SSA_CREATED, "c1", jti=f"old{i}", time=now - 3 * 86400 + i) for i in range(5)]
            await server.events.emit(*old)
            await server.events.emit(Event(SSA_REVOKED, "c1", jti="new"))
            await server.audit.flush()
            await server.audit.maintain()  # the cleaner's call
            left = await server.store.list_audit()
            assert [e["seq"] for e in left] == [6]
            anchors = [c for c in await server.store.list_audit_checkpoints() if c["reason"] == "retention"]
            assert [c["seq"] for c in anchors] == [5] and anchors[0]["hash"] == left[0]["prev_hash"]
            problem, summary = await server.audit.verify()
            assert problem is None and summary["first_seq"] == 6
            await server.store.delete_audit_through(5)  # (nothing more to delete)
            await server.store.put_audit_checkpoint(dict(anchors[0], hash="0" * 64))  # a broken anchor
            problem, _ = await server.audit.verify()
            assert problem is not None and problem.seq == 5
        finally:
            await server.stop()
    run(go())


@pytest.mark.parametrize("store_kind", ["tinydb", "postgresql"])
def test_export_then_import_keeps_the_chain(tmp_path, store_kind, request):
    async def go():
        server = _server(tmp_path, store_kind, request, audit_checkpoint_events=2)
        await server.start(background=False, scripts=False, keys=True)
        try:
            await server.events.emit(*(Event(SSA_CREATED, "c1", jti=f"j{i}") for i in range(3)))
            await server.audit.flush()
            lines = [line.decode() for line in await export_records(server.store)]
        finally:
            await server.stop()
        target = await opened(tmp_path / "target")
        try:
            report = await import_records(target, parse_lines(lines), int(time.time()))
            assert report["audit"]["imported"] == 3 and report["audit_checkpoints"]["imported"] == 1
            problem, summary = await AuditTrail(target).verify()
            assert problem is None and summary["events"] == 3 and summary["checkpoints"] == 1
        finally:
            await target.close()
    run(go())


def test_events_off_build_nothing(tmp_path):
    server = Server.build(Settings(data_dir=tmp_path / "d", scripts_dir=tmp_path / "none",
                                   audit_enabled=False))

    async def go() -> None:
        await server.start(background=False, scripts=False)  # the webhook outbox reads its subscribers
        try:
            assert server.audit is None and not server.events.wanted  # no subscriber: nothing listens
        finally:
            await server.stop()

    run(go())
    assert not Events().wanted


# --- two processes appending to one embedded store (the server and CLI commands do) ---
def _append_many(path: str, tag: str, n: int) -> None:
    async def go():
        store = await opened(path, exclusive=False)
        try:
            for i in range(n):
                await store.append_audit([ev(jti=f"{tag}{i}")])
        finally:
            await store.close()
    asyncio.run(go())


def test_two_writer_processes_keep_one_chain(tmp_path):
    path = tmp_path / "d"
    run(_close_after(path))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), tag, 40)) for tag in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0

    async def check():
        store = await opened(path)
        try:
            events = await store.list_audit()
            assert [e["seq"] for e in events] == list(range(1, 122))
            assert (await _verify(store))[0] is None
        finally:
            await store.close()
    run(check())


async def _close_after(path):
    store = await opened(path)
    await store.append_audit([ev(jti="first")])
    await store.close()


@pytest.mark.parametrize("sync", [False, True])
def test_publish_waits_for_the_store_only_with_audit_sync(tmp_path, sync):
    """``audit_sync``: the event is in the store when emit returns; else it is once the queue is
    flushed (as ``Server.stop`` and a read of the trail do)."""
    async def go():
        server = Server.build(Settings(data_dir=tmp_path / "d", scripts_dir=tmp_path / "none",
                                       audit_sync=sync))
        await server.start(background=False, scripts=False, keys=False)
        try:
            await server.events.emit(Event(SSA_CREATED, "c1", jti="x"))
            if sync:
                assert [e["jti"] for e in await server.store.list_audit()] == ["x"]
            page = await server.audit.page(AuditQuery())  # flushes first
            assert [e["jti"] for e in page["events"]] == ["x"]
            await server.events.emit(Event(SSA_CREATED, "c1", jti="y"))
        finally:
            await server.stop()  # flushes the queue before the store closes
        store = await opened(tmp_path / "d")
        try:
            assert [e["jti"] for e in await store.list_audit()] == ["x", "y"]
        finally:
            await store.close()
    run(go())
