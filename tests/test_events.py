"""core/events.py: every sink gets every event, stamped; one sink's failure reaches neither the
caller nor the next sink."""

import asyncio
import logging

from ssa_server.events import ACTIONS, SSA_CREATED, Event, Events
from ssa_server.observe import CURRENT, RequestInfo


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.got: list[Event] = []

    async def publish(self, events):
        if self.fail:
            raise RuntimeError("sink down")
        self.got.extend(events)


def test_every_sink_gets_stamped_events_and_a_failing_sink_is_logged(caplog):
    events = Events(clock=lambda: 1234.5)
    broken, kept = Recorder(fail=True), Recorder()
    events.add_sink(broken)
    events.add_sink(kept)
    assert events.wanted

    async def go():
        token = CURRENT.set(RequestInfo("req-1"))
        try:
            await events.emit(Event(SSA_CREATED, "c1", jti="j1"),
                              Event(SSA_CREATED, "c1", jti="j2", time=7.0))
        finally:
            CURRENT.reset(token)

    with caplog.at_level(logging.ERROR, logger="ssa_server.events"):
        asyncio.run(go())
    assert [(e.jti, e.time, e.request_id) for e in kept.got] == [("j1", 1234.5, "req-1"),
                                                                  ("j2", 7.0, "req-1")]
    assert any("Recorder" in r.getMessage() and SSA_CREATED in r.getMessage() for r in caplog.records)


def test_no_sink_no_work():
    events = Events()
    assert not events.wanted
    asyncio.run(events.emit(Event(SSA_CREATED, "c1")))  # nothing to do, nothing raised
    assert SSA_CREATED in ACTIONS


def test_a_sink_that_is_not_listening_builds_nothing():
    class Quiet(Recorder):
        listening = False

    events = Events()
    quiet = Quiet()
    events.add_sink(quiet)
    assert not events.wanted
    quiet.listening = True
    assert events.wanted
