"""The sandbox pool's event-loop path: slow answers, a busy pool, cancellation, timeouts."""

from __future__ import annotations

import asyncio

import pytest

from ssa_server.plugins.sandbox import SandboxLimits, SandboxPool, ScriptError

SOURCE = """
def create(jwt, context):
    n = jwt.claims.get("spin", 0)
    total = 0
    for i in range(n):
        total += i
    if n < 0:
        while True:
            total += 1
    jwt.claims["echo"] = jwt.claims["jti"]
    return True
"""


def payload(jti: str, spin: int = 0) -> dict:
    return {"header": {"typ": "jwt", "alg": "RS256", "kid": "k"},
            "claims": {"jti": jti, "iss": "i", "iat": 1, "spin": spin}}


@pytest.fixture
def pool():
    p = SandboxPool(workers=2, limits=SandboxLimits(timeout=0.5))
    p.load("s", SOURCE, {})
    yield p
    p.close()


def test_each_concurrent_caller_gets_its_own_answer(pool):
    """20 callers on 2 workers, slow and fast mixed: waiting callers are handed a worker, and
    no answer reaches the wrong caller."""
    async def go():
        calls = [pool.call_async("s", "create", payload(f"j{i}", spin=20_000 if i % 3 == 0 else 0), {})
                 for i in range(20)]
        return await asyncio.gather(*calls)

    results = asyncio.run(go())
    assert [r["claims"]["echo"] for r in results] == [f"j{i}" for i in range(20)]


def test_a_cancelled_call_does_not_leak_its_answer(pool):
    async def go():
        slow = asyncio.ensure_future(pool.call_async("s", "create", payload("slow", spin=300_000), {}))
        await asyncio.sleep(0.01)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        return [await pool.call_async("s", "create", payload(f"after{i}"), {}) for i in range(6)]

    results = asyncio.run(go())
    assert [r["claims"]["echo"] for r in results] == [f"after{i}" for i in range(6)]


def test_a_timeout_on_the_loop_replaces_the_worker(pool):
    async def go():
        with pytest.raises(ScriptError) as e:
            await pool.call_async("s", "create", payload("hang", spin=-1), {})
        return e.value.kind, await pool.call_async("s", "create", payload("next"), {})

    kind, after = asyncio.run(go())
    assert kind in ("timeout", "limit")
    assert after["claims"]["echo"] == "next"


def test_the_blocking_and_the_loop_paths_agree(pool):
    blocking = pool.call("s", "create", payload("same", spin=10), {})
    on_loop = asyncio.run(pool.call_async("s", "create", payload("same", spin=10), {}))
    assert blocking == on_loop


CRASH = """
def create(jwt, context):
    x = ()
    i = 0
    while i < 1000000:
        x = (x,)
        i = i + 1
    jwt.claims["x"] = len({x})
    return True
"""

TAG = """
def create(jwt, context):
    jwt.claims["tags"] = jwt.claims.get("tags", []) + ["t"]
    return True
"""


@pytest.fixture
def round_trips(monkeypatch):
    """The frames the pool sent to its workers (each a round trip): op and number of jobs."""
    from ssa_server.plugins.sandbox import pool as pool_module

    sent: list[str] = []
    original = pool_module._Worker.request_async

    async def counting(self, message, *args, **kw):
        sent.append((message["op"], len(message.get("jobs", ()))))
        return await original(self, message, *args, **kw)

    monkeypatch.setattr(pool_module._Worker, "request_async", counting)
    return sent


def test_calls_of_one_loop_turn_share_one_round_trip(pool, round_trips):
    async def go():
        return await asyncio.gather(*(pool.call_async("s", "create", payload(f"j{i}"), {})
                                      for i in range(12)))

    results = asyncio.run(go())
    assert [r["claims"]["echo"] for r in results] == [f"j{i}" for i in range(12)]
    assert round_trips == [("batch", 12)]  # twelve calls, one frame each way


def test_a_lone_call_is_a_batch_of_one(pool, round_trips):
    asyncio.run(pool.call_async("s", "create", payload("alone"), {}))
    assert round_trips == [("batch", 1)]


def test_a_hanging_call_in_a_batch_fails_alone(pool, round_trips):
    """The worker is killed mid-batch: every call of the batch goes again alone (what the lost
    worker's progress counter said is not trusted), and the hanging one fails in its own lone
    call."""
    async def go():
        calls = [pool.call_async("s", "create", payload(f"j{i}", spin=-1 if i == 2 else 0), {})
                 for i in range(5)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(go())
    assert isinstance(results[2], ScriptError) and results[2].kind in ("timeout", "limit")
    assert [r["claims"]["echo"] for i, r in enumerate(results) if i != 2] == ["j0", "j1", "j3", "j4"]
    assert round_trips == [("batch", 5)] + [("batch", 1)] * 5  # each call of the lost batch went again alone


def test_a_crashing_script_in_a_batch_fails_alone():
    pool = SandboxPool(workers=1, limits=SandboxLimits(timeout=5))
    try:
        pool.load("s", SOURCE, {})
        pool.load("crash", CRASH, {})

        async def go():
            calls = [pool.call_async("crash" if i == 1 else "s", "create", payload(f"j{i}"), {})
                     for i in range(4)]
            return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(go())
        assert isinstance(results[1], ScriptError) and results[1].kind in ("crashed", "limit")
        assert [r["claims"]["echo"] for i, r in enumerate(results) if i != 1] == ["j0", "j2", "j3"]
        assert asyncio.run(pool.call_async("s", "create", payload("after"), {}))["claims"]["echo"] == "after"
    finally:
        pool.close()


def test_chains_and_calls_in_one_batch(pool, round_trips):
    pool.load("t", TAG, {})

    async def go():
        chain = pool.call_chain_async(["t", "s", "t"], "create", payload("c"), {}, skip_errors=False)
        calls = [pool.call_async("s", "create", payload(f"j{i}"), {}) for i in range(3)]
        return await asyncio.gather(chain, *calls)

    chain, *calls = asyncio.run(go())
    assert [step["claims"].get("tags") for step in chain] == [["t"], ["t"], ["t", "t"]]
    assert chain[1]["claims"]["echo"] == "c"
    assert [r["claims"]["echo"] for r in calls] == ["j0", "j1", "j2"]
    assert round_trips == [("batch", 4)]


def test_the_worker_speaks_one_data_mode(pool):
    """A data request is a batch whose jobs are chains, a call being a chain of one (issue 12,
    item 5); the ops ``call`` and ``chain`` are gone: refused, and the worker serves on."""
    worker = pool._idle[-1]

    def job(names: list[str], jti: str) -> dict:
        return {"names": names, "hook": "create", "payload": payload(jti), "context": {}}

    for op in ("call", "chain"):
        answer = worker.request({"op": op, "name": "s", **job(["s"], "old")}, 5.0)
        assert answer == {"error": {"kind": "invalid_result", "message": f"unknown op {op!r}"}}
    answer = worker.request({"op": "batch", "jobs": [job(["s"], "one"), job(["s", "s"], "two")]}, 5.0)
    one, two = answer["answers"]
    assert [step["ok"]["claims"]["echo"] for step in one["steps"]] == ["one"]
    assert [step["ok"]["claims"]["echo"] for step in two["steps"]] == ["two", "two"]


def test_cancelling_the_gathering_call_leaves_the_others_served(pool):
    """The call that gathers a batch is cancelled while every worker is busy: the calls it was
    gathering are still sent and answered."""
    async def go():
        busy = []
        for i in range(2):  # one after the other: two batches, both workers taken
            busy.append(asyncio.ensure_future(pool.call_async("s", "create",
                                                              payload(f"busy{i}", spin=300_000), {})))
            await asyncio.sleep(0.005)
        gathering = asyncio.ensure_future(pool.call_async("s", "create", payload("gone"), {}))
        others = [asyncio.ensure_future(pool.call_async("s", "create", payload(f"o{i}"), {}))
                  for i in range(3)]
        await asyncio.sleep(0.001)
        gathering.cancel()
        results = await asyncio.wait_for(asyncio.gather(*others), 10)
        await asyncio.gather(*busy)
        return gathering.cancelled(), results

    cancelled, results = asyncio.run(go())
    assert cancelled
    assert [r["claims"]["echo"] for r in results] == ["o0", "o1", "o2"]


def test_a_cancelled_call_in_a_batch_keeps_the_worker(pool, round_trips):
    async def go():
        calls = [asyncio.ensure_future(pool.call_async("s", "create", payload(f"j{i}", spin=50_000), {}))
                 for i in range(4)]
        await asyncio.sleep(0.005)
        calls[3].cancel()
        done = await asyncio.gather(*calls, return_exceptions=True)
        return done, await pool.call_async("s", "create", payload("after"), {})

    done, after = asyncio.run(go())
    assert isinstance(done[3], asyncio.CancelledError)
    assert [r["claims"]["echo"] for r in done[:3]] == ["j0", "j1", "j2"]
    assert after["claims"]["echo"] == "after"


def test_a_new_loop_is_served_after_one_ended_mid_batch(pool):
    """asyncio.run ends with calls still gathering and running (they are cancelled): the pool
    still serves the next loop, and nothing of the first one reaches it."""
    async def abandon():
        for i in range(2):  # both workers busy
            asyncio.ensure_future(pool.call_async("s", "create", payload(f"busy{i}", spin=300_000), {}))
            await asyncio.sleep(0.005)
        for i in range(3):  # gathering, waiting for a worker
            asyncio.ensure_future(pool.call_async("s", "create", payload(f"left{i}"), {}))
        await asyncio.sleep(0.002)

    asyncio.run(abandon())

    async def after():
        return await asyncio.wait_for(
            asyncio.gather(*(pool.call_async("s", "create", payload(f"next{i}"), {}) for i in range(3))), 10)

    assert [r["claims"]["echo"] for r in asyncio.run(after())] == ["next0", "next1", "next2"]


def test_a_pool_whose_pipes_are_above_descriptor_1024_loads_and_calls():
    """``serve`` raises its file-descriptor limit, so a busy server's sandbox pipes may get
    numbers above select()'s FD_SETSIZE (1024): the blocking path (loads, unloads, ``call``)
    must wait on them all the same."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        if hard < 1300:
            pytest.skip(f"the file-descriptor hard limit ({hard}) is below 1300")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1300, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # the pool's pipes come after these
    try:
        p = SandboxPool(workers=1, limits=SandboxLimits(timeout=2.0))
        try:
            assert min(w.from_child for w in p._idle) > 1024
            p.load("s", SOURCE, {})
            result = p.call("s", "create", payload("j-high"), {})
            assert result["claims"]["echo"] == "j-high"
            p.unload("s")
        finally:
            p.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
