"""context.http through servers: the call is the server's, pinned to the script that runs the
step (not the worker's say), counted per script in GET /scripts; a real `serve` under a small
bounded load, with and without one allow-listed call per create (the overhead figures)."""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import time

import pytest

from http_service import start_server
from test_live_server import Live
from test_scripts_http import Harness

REGISTRY_CHECK = '''
def create(jwt, context):
    org = jwt.claims.get("org_id", "")
    r = context.http.get(context.config["registry"] + org)
    jwt.claims["registry_status"] = r["status"]
    if r["status"] != 200:
        context.deny("access_denied", "unknown org %s" % org)
        return False
'''

ASKS_ANYWAY = '''
def create(jwt, context):
    try:
        context.http.get(context.config["registry"] + "acme")
        jwt.claims["b_reached"] = True
    except HttpError as e:
        jwt.claims["b_refused"] = str(e)
'''


@pytest.fixture
def service():
    server = start_server()
    yield server
    server.shutdown()
    server.server_close()


def base(service) -> str:
    return f"http://127.0.0.1:{service.server_address[1]}/v1/ok/"


def test_server_performs_allow_listed_calls_and_counts_them(tmp_path, service):
    h = Harness(tmp_path)
    h.write("a_check.py", REGISTRY_CHECK)
    h.write("a_check.toml", f'registry = "{base(service)}"\n[http]\nallow = ["{base(service)}"]\n')
    h.start()
    try:
        r = h.create(org_id="acme")
        assert r.status_code == 201, r.text
        assert h.claims(r)["registry_status"] == 200
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # requests of one loop turn: never one batch
            codes = list(pool.map(lambda i: h.create(org_id=f"org{i}").status_code, range(8)))
        assert codes == [201] * 8
        listed = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
        assert listed["a_check"]["http"] == {"calls": 9, "refused": 0, "failed": 0}
        assert len(service.hits) == 9
    finally:
        h.client.__exit__(None, None, None)


def test_the_allow_list_is_the_running_scripts_not_its_neighbours(tmp_path, service):
    """Two scripts in one chain: b has no allow-list and asks for a's allowed URL: refused (the
    server answers for the script it sent the step to)."""
    h = Harness(tmp_path)
    h.write("a_check.py", REGISTRY_CHECK)
    h.write("a_check.toml", f'registry = "{base(service)}"\n[http]\nallow = ["{base(service)}"]\n')
    h.write("b_asks.py", ASKS_ANYWAY)
    h.write("b_asks.toml", f'registry = "{base(service)}"\n')
    h.start()
    try:
        r = h.create(org_id="acme")
        assert r.status_code == 201, r.text
        claims = h.claims(r)
        assert "b_reached" not in claims and "no [http] allow-list" in claims["b_refused"]
        assert len(service.hits) == 1  # a's call only
        listed = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
        assert listed["b_asks"]["http"]["refused"] == 1
    finally:
        h.client.__exit__(None, None, None)


def _timed_creates(live: Live, auth: dict, count: int) -> list[float]:
    took = []
    for _ in range(count):
        started = time.perf_counter()
        r = live.http.post("/ssa", json={"org_id": "acme"}, headers=auth)
        took.append((time.perf_counter() - started) * 1000)
        assert r.status_code == 201, r.text
    return took


def _figures(took: list[float]) -> dict:
    ordered = sorted(took)
    return {"p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 2)}


@pytest.mark.slow
def test_real_server_overhead_of_one_http_call(tmp_path, service, capsys, monkeypatch):
    """A bounded load (2 x 150 sequential creates) against a real `serve`: a create script with one
    allow-listed call next to the same script without it.  Prints the figures for the report."""
    monkeypatch.setenv("SSA_SCRIPT_HTTP_CALLS_PER_SECOND", "10000")  # the load is above the default rate cap
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "a_check.py").write_text(REGISTRY_CHECK.replace(
        'r = context.http.get(context.config["registry"] + org)', 'r = {"status": 200}'))
    live = Live(tmp_path).start()
    try:
        auth = live.client_token()
        _timed_creates(live, auth, 20)  # warm up
        without = _timed_creates(live, auth, 150)
        (scripts / "a_check.toml").write_text(
            f'registry = "{base(service)}"\n[http]\nallow = ["{base(service)}"]\n')
        (scripts / "a_check.py").write_text(REGISTRY_CHECK)
        deadline = time.time() + 10
        while not service.hits and time.time() < deadline:  # hot reload serves the new revision
            live.http.post("/ssa", json={"org_id": "acme"}, headers=auth)
            time.sleep(0.1)
        assert service.hits, "the revision with the http call did not load"
        _timed_creates(live, auth, 20)
        with_call = _timed_creates(live, auth, 150)
        listed = {s["name"]: s for s in live.http.get("/scripts", headers=auth).json()}
        assert listed["a_check"]["http"]["calls"] >= 170 and listed["a_check"]["http"]["failed"] == 0
    finally:
        live.kill()
    with capsys.disabled():
        figures = {"without": _figures(without), "with_one_call": _figures(with_call)}
        print("\ncontext.http overhead:", json.dumps(figures))
