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
