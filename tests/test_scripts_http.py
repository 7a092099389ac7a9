"""Script semantics through HTTP: order, False, raise, deny, limits, skip mode, reload, /scripts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from jwcrypto import jwk, jwt
from starlette.testclient import TestClient

from ssa_server.app import create_app
from ssa_server.server import Server
from ssa_server.settings import Settings

ADMIN = "https://jans.io/auth/ssa.admin"


class Harness:
    def __init__(self, tmp_path: Path, **settings):
        self.scripts = tmp_path / "scripts"
        self.scripts.mkdir(exist_ok=True)
        settings = {"script_workers": 1, "script_reload_interval": 0.2, **settings}
        self.settings = Settings(data_dir=tmp_path / "data", scripts_dir=self.scripts, **settings)
        self.server = Server.build(self.settings)
        self.client = TestClient(create_app(server=self.server), raise_server_exceptions=False)

    def write(self, name: str, source: str) -> None:
        path = self.scripts / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(source)
        tmp.replace(path)

    def start(self) -> Harness:
        self.client.__enter__()
        record, secret = self.client.portal.call(self.server.clients.create, [ADMIN], "t")
        token = self.client.post("/token", data={"grant_type": "client_credentials"},
                                 auth=(record["client_id"], secret)).json()["access_token"]
        self.auth = {"Authorization": f"Bearer {token}"}
        return self

    def create(self, **body):
        return self.client.post("/ssa", json=body or {"org_id": "o"}, headers=self.auth)

    def claims(self, response) -> dict:
        keys = jwk.JWKSet.from_json(self.client.get("/jwks").text)
        return json.loads(jwt.JWT(jwt=response.json()["ssa"], key=keys).claims)

    def count(self) -> int:
        return self.client.portal.call(self.server.store.count_ssas)

    def wait_for(self, predicate, timeout: float = 5.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError("condition not met within %.1f s" % timeout)


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(scripts: dict[str, str] | None = None, **settings) -> Harness:
        h = Harness(tmp_path, **settings)
        for name, source in (scripts or {}).items():
            h.write(name, source)
        made.append(h.start())
        return h

    yield make
    for h in made:
        h.client.__exit__(None, None, None)


ADD = ('def create(jwt, context):\n    jwt.claims["trail"] = jwt.claims.get("trail", "") + "{tag}"\n'
       '    return {ret}\n')


def test_scripts_run_in_file_name_order(harness):
    h = harness({"b.py": ADD.format(tag="b", ret=True), "a.py": ADD.format(tag="a", ret=True),
                 "c.py": ADD.format(tag="c", ret=True)})
    assert h.claims(h.create())["trail"] == "abc"


def test_false_stops_the_create_chain_but_keeps_edits(harness):
    h = harness({"a.py": ADD.format(tag="a", ret=False), "b.py": ADD.format(tag="b", ret=True)})
    r = h.create()
    assert r.status_code == 201
    assert h.claims(r)["trail"] == "a"


def test_get_false_discards_list_changes(harness):
    h = harness({"a.py": 'def get(ssa_list, context):\n    ssa_list[0]["ssa"]["x"] = 1\n    return False\n'})
    h.create(org_id="g")
    item = h.client.get("/ssa", params={"org_id": "g"}, headers=h.auth).json()[0]
    assert "x" not in item["ssa"]


def test_get_true_keeps_list_changes(harness):
    h = harness({"a.py": 'def get(ssa_list, context):\n    ssa_list[0]["ssa"]["x"] = 1\n    return True\n'})
    h.create(org_id="g")
    assert h.client.get("/ssa", params={"org_id": "g"}, headers=h.auth).json()[0]["ssa"]["x"] == 1


def test_raising_create_script_refuses_and_stores_nothing(harness):
    h = harness({"boom.py": 'def create(jwt, context):\n    raise ValueError("no")\n'})
    r = h.create()
    assert r.status_code == 502
    assert r.json()["error"] == "script_failed"
    assert "boom" in r.json()["error_description"]
    assert "Traceback" not in r.text
    assert h.count() == 0


def test_skip_mode_logs_and_continues(harness):
    h = harness({"boom.py": 'def create(jwt, context):\n    raise ValueError("no")\n',
                 "z.py": ADD.format(tag="z", ret=True)}, on_script_error="skip")
    r = h.create()
    assert r.status_code == 201
    assert h.claims(r)["trail"] == "z"


def test_timeout_refuses_within_limit_and_server_keeps_serving(harness):
    h = harness({"loop.py": "def create(jwt, context):\n    while True:\n        pass\n"},
                script_timeout=0.5, script_cpu=0.3)
    started = time.time()
    r = h.create()
    assert r.status_code == 502
    assert "loop" in r.json()["error_description"]
    assert time.time() - started < 5
    h.write("loop.py", ADD.format(tag="ok", ret=True))
    h.wait_for(lambda: h.create().status_code == 201)


def test_deny_answers_403_and_stores_nothing(harness):
    h = harness({"deny.py": 'def create(jwt, context):\n    context.deny("access_denied", "not today")\n'
                            '    return False\n'})
    r = h.create()
    assert r.status_code == 403
    assert r.json() == {"error": "access_denied", "error_description": "not today"}
    assert h.count() == 0


def test_protected_claim_change_is_an_error(harness):
    h = harness({"jti.py": 'def create(jwt, context):\n    jwt.claims["jti"] = "mine"\n    return True\n'})
    r = h.create()
    assert r.status_code == 502
    assert h.count() == 0


def test_revoke_failure_is_logged_only(harness):
    h = harness({"r.py": 'def revoke(ssa_list, context):\n    raise ValueError("no")\n'})
    h.create(org_id="rv")
    assert h.client.delete("/ssa", params={"org_id": "rv"}, headers=h.auth).status_code == 200
    assert h.client.get("/ssa", params={"org_id": "rv"}, headers=h.auth).json() == []


def test_context_has_request_facts_but_no_authorization(harness):
    h = harness({"ctx.py": (
        "def create(jwt, context):\n"
        "    jwt.claims['seen'] = [context.client_id, context.hook, context.request['method'],\n"
        "                          'authorization' in context.request['headers']]\n"
        "    return True\n")})
    seen = h.claims(h.create())["seen"]
    assert seen[1:] == ["create", "POST", False]
    assert seen[0]


def test_hot_reload_add_change_remove(harness):
    h = harness()
    assert "trail" not in h.claims(h.create())
    h.write("a.py", ADD.format(tag="1", ret=True))
    h.wait_for(lambda: h.claims(h.create()).get("trail") == "1", timeout=3)
    h.write("a.py", ADD.format(tag="2", ret=True))
    h.wait_for(lambda: h.claims(h.create()).get("trail") == "2", timeout=3)
    (h.scripts / "a.py").unlink()
    h.wait_for(lambda: "trail" not in h.claims(h.create()), timeout=3)


def test_broken_file_next_to_good_ones_keeps_previous_version(harness):
    h = harness({"a.py": ADD.format(tag="a", ret=True), "b.py": ADD.format(tag="b", ret=True)})
    assert h.claims(h.create())["trail"] == "ab"
    h.write("b.py", "def create(jwt, context):\n    return jwt.__class__\n")  # refused at compile time
    h.write("c.py", "this is not python")

    def listed():
        scripts = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
        return scripts.get("b", {}).get("state") == "stale" and scripts.get("c", {}).get("state") == "error"

    h.wait_for(listed, timeout=3)
    scripts = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
    assert scripts["b"]["last_error"] and scripts["c"]["last_error"]
    assert h.claims(h.create())["trail"] == "ab"  # the previous b still serves; c never loaded


def test_scripts_listing_needs_admin_and_shows_stats(harness):
    h = harness({"a.py": ADD.format(tag="a", ret=True)})
    assert h.client.get("/scripts").status_code == 401
    h.create()
    (entry,) = h.client.get("/scripts", headers=h.auth).json()
    assert entry["name"] == "a" and entry["hooks"] == ["create"] and entry["state"] == "loaded"
    assert len(entry["revision"]) == 12 and entry["calls"] >= 1 and entry["p50_ms"] is not None
    assert entry["last_error"] is None


def test_policy_holds_during_reloads(harness):
    deny = 'def create(jwt, context):\n    context.deny("access_denied", "never")\n    return False\n# {n}\n'
    h = harness({"deny.py": deny.format(n=0)})
    stop = False

    def churn():
        n = 0
        while not stop:
            n += 1
            h.write("deny.py", deny.format(n=n))  # a new revision each time
            h.server.scripts.reload()

    import threading

    t = threading.Thread(target=churn)
    t.start()
    try:
        statuses = {h.create().status_code for _ in range(40)}
    finally:
        stop = True
        t.join()
    assert statuses == {403}
    assert h.count() == 0
