"""SIGTERM and SIGINT run the server's whole shutdown (issue 10, finding 8): the cleaner, the signing
process, the script pool and the store are stopped by ``Server.stop``, no child process outlives the
server, and the process ends by the signal it got (the status a supervisor expects).

Each server has a script loaded (so script workers run) and signs with ES256 (so the signing
process runs); the test reads the server's descendants from /proc before the signal.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from .served import Served, alive

pytestmark = pytest.mark.slow

SCRIPT = "def create(jwt, context):\n    return True\n"


def _helpers_running(server: Served, expected: int, timeout: float = 20) -> list[int]:
    deadline = time.time() + timeout
    while True:
        found = [p for p in server.descendants() if alive(p)]
        if len(found) >= expected:
            return found
        assert time.time() < deadline, f"expected {expected} helper processes, found {found}:\n{server.log()}"
        time.sleep(0.1)


def _stop_by(server: Served, sig: signal.Signals, helpers: list[int], stopped_lines: int = 1) -> None:
    start = time.monotonic()
    os.kill(server.pid, sig)
    assert server.proc is not None
    code = server.proc.wait(timeout=15)
    took = time.monotonic() - start
    left = [p for p in helpers if alive(p)]  # at the moment the server is gone
    log = server.log()
    assert left == [], f"{len(left)} child processes outlived the server:\n{log}"
    assert code == -sig, f"exit status {code} after {sig.name}:\n{log}"
    assert took < 5, f"the server took {took:.1f} s to stop"
    assert log.count("server stopped") == stopped_lines, log
    assert "Traceback" not in log


@pytest.fixture
def scripted(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "allow.py").write_text(SCRIPT)
    servers: list[Served] = []

    def make(*args: str, **env: str) -> Served:
        server = Served(tmp_path, *args, SSA_SIGNING_ALG="ES256", **env)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_and_every_child(scripted, sig):
    server = scripted()
    auth = server.token()
    assert server.http.post("/ssa", json={"org_id": "o"}, headers=auth).status_code == 201
    helpers = _helpers_running(server, 3)  # two script workers and the signing process
    _stop_by(server, sig, helpers)


def test_with_workers_every_worker_stops_its_server(scripted, pg_url):
    from conftest import truncate

    truncate(pg_url)
    server = scripted("--workers", "2", SSA_STORE_URL=pg_url)
    auth = server.token()
    for _ in range(4):
        assert server.http.post("/ssa", json={"org_id": "o"}, headers=auth).status_code == 201
    # Two workers, each with two script workers; a worker's signing process starts with it.
    helpers = _helpers_running(server, 2 + 2 * 2 + 2)
    _stop_by(server, signal.SIGTERM, helpers, stopped_lines=2)
