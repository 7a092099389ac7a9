"""Server.stop ends its background tasks, always: the webhook delivery loop honours every
cancellation (on Python 3.11 ``asyncio.wait_for`` could swallow one that landed as its timeout
fired, and the loop outlived the stop: a CI run hung in a test's teardown), and a task that
ignores its cancellation costs the stop a bounded wait and an ERROR line, never a hang."""

from __future__ import annotations

import asyncio
import logging
import random

from ssa_server.server import Server
from ssa_server.settings import Settings


def _server(tmp_path, **settings) -> Server:
    return Server.build(Settings(data_dir=tmp_path / "data", scripts_dir=tmp_path / "none", **settings))


def test_the_delivery_loop_ends_at_every_cancellation(tmp_path):
    server = _server(tmp_path, webhook_poll_interval=0.001)  # its timeout fires all the time

    async def go() -> None:
        await server.start(background=False, scripts=False)
        try:
            assert server.deliverer is not None
            rng = random.Random(7)
            for _ in range(300):
                task = asyncio.create_task(server.deliverer.run())
                await asyncio.sleep(rng.uniform(0, 0.003))
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=2)
                assert task in done, "the delivery loop went on after its cancellation"
        finally:
            await server.stop()

    asyncio.run(go())


def test_a_task_that_ignores_its_cancellation_does_not_hang_the_stop(tmp_path, caplog):
    server = _server(tmp_path)

    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    async def go() -> float:
        await server.start(background=False, scripts=False)
        server._tasks.append(asyncio.create_task(stubborn(), name="stubborn"))
        await asyncio.sleep(0)  # inside its try: a task cancelled before its first step just ends
        loop = asyncio.get_running_loop()
        started = loop.time()
        task = server._tasks[-1]
        await server.stop(task_timeout=0.5)
        took = loop.time() - started
        released.set()  # (asyncio.run would wait for it forever)
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        return took

    with caplog.at_level(logging.ERROR, logger="ssa_server"):
        took = asyncio.run(go())
    assert took < 5
    assert any("stubborn" in r.getMessage() and "did not stop" in r.getMessage() for r in caplog.records)
