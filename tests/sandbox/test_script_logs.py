"""What scripts log is bounded: a few short lines per call (``context.log`` and ``print``
together) and a per-script rate on the server; what is dropped is counted in one summary line
per script per interval."""

from __future__ import annotations

import logging
import time

from tests.test_scripts_http import harness  # noqa: F401  (pytest fixture)

# 200 log calls and 20 prints of 600 characters (the unfixed worker keeps 70 lines: 42 kB, under
# the 64 KiB result cap that its logs count against).
NOISY = ('def create(jwt, context):\n'
         '    for i in range(200):\n'
         '        context.log("L" * 600)\n'
         '        if i < 20:\n'
         '            print("P" * 600)\n'
         '    return True\n')
PER_CALL = 220
QUIET = 'def create(jwt, context):\n    context.log("quiet " + jwt.claims["org_id"])\n    return True\n'
REQUESTS = 60


def script_lines(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ssa_server.scripts" and r.getMessage().startswith(f"script {name}@")]


def test_a_logging_script_writes_a_bounded_log(harness, caplog):
    h = harness({"noisy.py": NOISY})
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="ssa_server.scripts"):
        for _ in range(REQUESTS):
            assert h.create().status_code == 201
    elapsed = time.monotonic() - started
    lines = [m for m in script_lines(caplog, "noisy") if ": " in m and "dropped" not in m]
    allowed = 100 * (1 + elapsed / 10) + 1  # the defaults: 100 lines per script per 10 s
    assert len(lines) <= allowed, (len(lines), allowed)  # unfixed: 100 lines of 1000 characters per call
    assert sum(len(m) for m in lines) <= allowed * 600
    assert all(len(m) <= 600 for m in lines)


def test_dropped_lines_are_summarised_once_per_interval(harness, caplog):
    h = harness({"noisy.py": NOISY, "quiet.py": QUIET}, script_log_lines=10, script_log_interval=0.5)
    started = time.monotonic()

    def accounted() -> tuple[int, list[str]]:
        noisy = script_lines(caplog, "noisy")
        summaries = [m for m in noisy if "log lines dropped" in m]
        dropped = sum(int(m.split(": ", 1)[1].split()[0]) for m in summaries)
        return len(noisy) - len(summaries) + dropped, summaries

    with caplog.at_level(logging.INFO, logger="ssa_server.scripts"):
        for _ in range(20):
            assert h.create(org_id="q").status_code == 201
        # The last interval ends after the requests: the folder watcher writes its summary.
        h.wait_for(lambda: accounted()[0] == 20 * PER_CALL, timeout=5)  # every line written or counted
    elapsed = time.monotonic() - started
    total, summaries = accounted()
    assert 1 <= len(summaries) <= elapsed / 0.5 + 1, summaries  # at most one per interval
    assert "(kept: 20 lines of 500 characters per call, 10 lines per 0.5 s per script)" in summaries[0]
    # One script's flood does not silence another's log.
    assert len([m for m in script_lines(caplog, "quiet") if "quiet q" in m]) >= 10
