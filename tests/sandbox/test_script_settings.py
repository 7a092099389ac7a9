"""Per-script sandbox settings (issue 13, part A, item 3): ``on_error``, ``timeout``, ``cpu`` and
``memory_mb`` in the ``[sandbox]`` table of ``NAME.toml`` apply to that script only, never above
the server's caps; GET /scripts shows each script's effective settings.  And a Janssen-format
script through a live server (create, get, revoke)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from ssa_server.plugins.sandbox import ScriptError

from tests.sandbox.test_janssen import JANSSEN, TOML
from tests.test_live_server import Live

SPIN = 30_000_000  # a loop of about half a second of CPU (more on a loaded machine)


def spinner(tag: str) -> str:
    return (f"def create(jwt, context):\n"
            f"    if jwt.claims.get('org_id') == 'spin-{tag}':\n"
            f"        for i in range({SPIN}):\n            pass\n"
            f"    jwt.claims['{tag}'] = 1\n    return True\n")


def claims_of(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("SSA_SCRIPT_TIMEOUT", "4")
    monkeypatch.setenv("SSA_SCRIPT_CPU", "3")
    server = Live(tmp_path)
    yield server
    server.kill()


@pytest.mark.slow
def test_each_scripts_own_timeout_cpu_and_on_error_through_a_live_server(served, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "a_quick.py").write_text(spinner("a"))
    (scripts / "a_quick.toml").write_text('[sandbox]\ntimeout = 0.3\non_error = "skip"\n')
    (scripts / "b_cpu.py").write_text(spinner("b"))
    (scripts / "b_cpu.toml").write_text("[sandbox]\ncpu = 0.1\n")
    (scripts / "c_plain.py").write_text(spinner("c"))
    served.start()
    auth = served.client_token()

    settings = {s["name"]: s["settings"] for s in served.http.get("/scripts", headers=auth).json()}
    assert settings["a_quick"] == {"keep_state": "none", "on_error": "skip", "timeout": 0.3, "cpu": 3.0,
                                   "memory_mb": None}
    assert settings["b_cpu"] == {"keep_state": "none", "on_error": "fail", "timeout": 4.0, "cpu": 0.1,
                                 "memory_mb": None}
    assert settings["c_plain"] == {"keep_state": "none", "on_error": "fail", "timeout": 4.0, "cpu": 3.0,
                                   "memory_mb": None}

    # a's own 0.3 s wall clock ends its spin; its own on_error = "skip" lets the others sign
    r = served.http.post("/ssa", json={"org_id": "spin-a"}, headers=auth)
    assert r.status_code == 201, r.text
    claims = claims_of(r.json()["ssa"])
    assert "a" not in claims and claims["b"] == 1 and claims["c"] == 1
    # b's own 0.1 s CPU budget ends its spin, and fails the request (its on_error is the server's)
    r = served.http.post("/ssa", json={"org_id": "spin-b"}, headers=auth)
    assert r.status_code == 502 and "b_cpu" in r.json()["error_description"], r.text
    # the same spin in c, under the server's limits, signs
    r = served.http.post("/ssa", json={"org_id": "spin-c"}, headers=auth)
    assert r.status_code == 201, r.text
    assert claims_of(r.json()["ssa"])["c"] == 1
    listing = {s["name"]: s for s in served.http.get("/scripts", headers=auth).json()}
    assert "timeout" in listing["a_quick"]["last_error"]
    assert "limit" in listing["b_cpu"]["last_error"]
    assert listing["c_plain"]["failures"] == 0


@pytest.mark.slow
def test_a_setting_above_the_servers_cap_refuses_the_script(served, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "greedy.py").write_text(spinner("g"))
    (scripts / "greedy.toml").write_text("[sandbox]\ntimeout = 10\n")
    (scripts / "fine.py").write_text(spinner("f"))
    served.start()
    auth = served.client_token()
    listing = {s["name"]: s for s in served.http.get("/scripts", headers=auth).json()}
    assert listing["greedy"]["state"] == "error"
    assert "timeout = 10 is above the server's SSA_SCRIPT_TIMEOUT (4)" in listing["greedy"]["last_error"]
    r = served.http.post("/ssa", json={"org_id": "x"}, headers=auth)
    assert r.status_code == 201 and "g" not in claims_of(r.json()["ssa"])


@pytest.mark.parametrize("table,why", [
    ("cpu = 0.9", "cpu = 0.9 is above the server's SSA_SCRIPT_CPU (0.5)"),
    ("memory_mb = 512", "memory_mb = 512 is above the server's SSA_SCRIPT_MEMORY_MB (256)"),
    ("memory_mb = 1.5", "memory_mb must be an integer"),
    ("timeout = true", "timeout must be a number"),
    ("timeout = 0", "timeout = 0 is below 0.01"),
    ('on_error = "ignore"', "on_error must be one of fail, skip"),
    ("workers = 3", "not workers"),
])
def test_bad_settings_are_refused_with_the_reason(tmp_path, table, why):
    (tmp_path / "s.py").write_text(spinner("s"))
    (tmp_path / "s.toml").write_text(f"[sandbox]\n{table}\n")
    done = subprocess.run([sys.executable, "-m", "ssa_server", "scripts", "check", str(tmp_path / "s.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and why in done.stderr, done.stderr


ALLOCATE = ("def create(jwt, context):\n"
            "    block = 'x' * (context.config.get('mib', 1) << 20)\n"
            "    jwt.claims['size'] = len(block) >> 20\n    return True\n")


def test_memory_mb_is_a_budget_per_step_of_that_script_only(ssa_script, tmp_path):
    (tmp_path / "small.py").write_text(ALLOCATE)
    (tmp_path / "small.toml").write_text("mib = 48\n[sandbox]\nmemory_mb = 32\n")
    (tmp_path / "roomy.py").write_text(ALLOCATE)
    (tmp_path / "roomy.toml").write_text("mib = 48\n")
    small = ssa_script(tmp_path / "small.py")
    with pytest.raises(ScriptError, match="memory limit exceeded"):
        small.create()
    roomy = ssa_script(tmp_path / "roomy.py")
    assert roomy.create()["claims"]["size"] == 48  # the worker's own cap (256 MiB) applies
    (tmp_path / "fits.py").write_text(ALLOCATE)
    (tmp_path / "fits.toml").write_text("mib = 8\n[sandbox]\nmemory_mb = 32\n")
    fits = ssa_script(tmp_path / "fits.py")
    for _ in range(5):  # the budget follows the worker's address space now: calls do not add up
        assert fits.create()["claims"]["size"] == 8


def test_cpu_of_one_script_in_a_worker_with_another(tmp_path):
    """Both scripts in one pool: the low CPU budget ends only its own script's step."""
    from ssa_server.plugins.sandbox import SandboxLimits, SandboxPool

    pool = SandboxPool(workers=1, limits=SandboxLimits(timeout=5, cpu=3))
    try:
        pool.load("low", spinner("l"), {"sandbox": {"cpu": 0.05}})
        pool.load("high", spinner("h"), {})
        payload = {"header": {"alg": "RS256", "kid": "k"}, "claims": {"jti": "j", "iss": "i", "iat": 1,
                                                                     "org_id": "spin-l"}}
        with pytest.raises(ScriptError) as failed:
            pool.call("low", "create", payload, {})
        assert failed.value.kind == "limit"
        payload["claims"]["org_id"] = "spin-h"
        assert pool.call("high", "create", payload, {})["claims"]["h"] == 1
    finally:
        pool.close()


@pytest.mark.slow
def test_a_janssen_script_through_a_live_server(served, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "modify_ssa.py").write_text(JANSSEN)
    (scripts / "modify_ssa.toml").write_text(TOML)
    served.start()
    auth = served.client_token()
    r = served.http.post("/ssa", json={"org_id": "acme", "one_time_use": False}, headers=dict(auth, **{
        "User-Agent": "janssen-test/1"}))
    assert r.status_code == 201, r.text
    token = r.json()["ssa"]
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    claims = claims_of(token)
    assert header["custom_header_name"] == "custom_header_value"
    assert claims["custom_claim_name"] == "custom_claim_value" and claims["tenant"] == "acme-prod"
    assert claims["ua"] == "janssen-test/1" and claims["script"] == "modify_ssa"
    got = served.http.get("/ssa", params={"org_id": "acme"}, headers=auth).json()
    assert got[0]["ssa"]["tenant"] == "acme-prod:acme" and got[0]["seen"] is True
    assert served.http.delete("/ssa", params={"jti": claims["jti"]}, headers=auth).status_code == 200
    listing = {s["name"]: s for s in served.http.get("/scripts", headers=auth).json()}
    assert listing["modify_ssa"]["calls"] == 3 and listing["modify_ssa"]["failures"] == 0, listing
    assert listing["modify_ssa"]["hooks"] == ["create", "get", "revoke"]
