"""POST /scripts/{name}/test (issue 17): a loaded script's hook run on a sample event in a fresh
sandbox, over a real server; and the configured custom attributes in /openapi.json (the text UI's
source for its form)."""

from __future__ import annotations

import time

import pytest

from conftest import PORTAL
from live_ssa import LiveServer

pytestmark = pytest.mark.slow

STAMP = ('def create(jwt, context):\n    print("stamping", jwt.claims["org_id"])\n'
         '    jwt.claims["stamped"] = "yes"\n    return True\n')
BROKEN = 'def create(jwt, context):\n    return 1 / 0\n'


@pytest.fixture
def live(tmp_path):
    server = LiveServer(tmp_path, SSA_CUSTOM_ATTRIBUTES="tier,region")
    (server.scripts / "stamp.py").write_text(STAMP)
    (server.scripts / "broken.py").write_text(BROKEN)
    server.start()
    yield server
    server.stop()


def _loaded(live, H, names):
    deadline = time.time() + 20
    while time.time() < deadline:
        listed = {s["name"]: s for s in live.http.get("/scripts", headers=H).json()}
        if all(listed.get(n, {}).get("state") == "loaded" for n in names):
            return listed
        time.sleep(0.1)
    raise AssertionError(f"scripts not loaded: {listed}")


def test_run_a_loaded_hook_on_the_sample(live):
    H = live.auth()
    listed = _loaded(live, H, ["stamp", "broken"])
    r = live.http.post("/scripts/stamp/test", json={"hook": "create"}, headers=H)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["name"], out["hook"], out["revision"]) == ("stamp", "create", listed["stamp"]["revision"])
    assert out["result"]["claims"]["stamped"] == "yes" and out["result"]["result"] is True
    assert any("stamping acme" in line for line in out["result"]["logs"])  # the sample's org_id
    r = live.http.post("/scripts/stamp/test", headers=H,
                       json={"hook": "create", "event": {"payload": {"header": {"typ": "jwt"},
                                                                     "claims": {"org_id": "given"}}}})
    assert r.status_code == 200 and any("stamping given" in x for x in r.json()["result"]["logs"])
    r = live.http.post("/scripts/broken/test", json={"hook": "create"}, headers=H)
    assert r.status_code == 200 and r.json()["error"]["kind"] and "ZeroDivisionError" in r.text
    # the serving copy was not touched: its counters show no call
    assert {s["name"]: s["calls"] for s in live.http.get("/scripts", headers=H).json()} == \
        {"broken": 0, "stamp": 0}


def test_refusals(live):
    H = live.auth()
    _loaded(live, H, ["stamp"])
    cases = [("/scripts/nope/test", {"hook": "create"}, 404), ("/scripts/stamp/test", {"hook": "get"}, 400),
             ("/scripts/stamp/test", {"hook": "drop"}, 400), ("/scripts/stamp/test", [1], 400),
             ("/scripts/stamp/test", {"hook": "create", "event": {"payload": 5}}, 400)]
    for path, body, status in cases:
        r = live.http.post(path, json=body, headers=H)
        assert r.status_code == status and set(r.json()) == {"error", "error_description"}, (body, r.text)
    assert "defines no get" in live.http.post("/scripts/stamp/test", json={"hook": "get"},
                                              headers=H).json()["error_description"]
    assert live.http.post("/scripts/stamp/test", json={"hook": "create"}).status_code == 401
    r = live.http.post("/scripts/stamp/test", json={"hook": "create"}, headers=live.auth(PORTAL))
    assert r.status_code == 401 and r.json()["error"] == "unauthorized_client"


def test_openapi_names_the_custom_attributes(live):
    doc = live.http.get("/openapi.json").json()
    props = doc["paths"]["/ssa"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert [n for n, p in props.items() if p.get("x-ssa-custom-attribute")] == ["tier", "region"]
