"""Keys announced before use through real ``ssa-server serve`` processes: the embedded store with
a CLI rotation, two PostgreSQL nodes agreeing on the signing key, and a scheduled rotation done
once across two PostgreSQL nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx2 as httpx
import pytest
from conftest import ADMIN
from jwcrypto import jwk, jwt
from ports import free_port
from test_scale_out import cli as pg_cli
from test_scale_out import kid_of, nodes  # noqa: F401  (nodes: the fixture)

pytestmark = pytest.mark.slow

DELAY = 3  # key_activation_delay of these rotations, seconds


def verify_against(jwks: dict, token: str) -> None:
    jwt.JWT(jwt=token, key=jwk.JWKSet.from_json(json.dumps(jwks)), check_claims=False)


def run_cli(*args: str, **env: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "ssa_server", *args], check=False, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, **env))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def sample_until(deadline: float, create, jwks_of) -> list[tuple[float, float, str, set[str]]]:
    """SSAs made until ``deadline``: (time before, time after, kid, the kids /jwks published just before)."""
    out = []
    while time.time() < deadline:
        published = jwks_of()
        before = time.time()
        token = create()
        out.append((before, time.time(), kid_of(token), published))
    return out


def check_timeline(samples, old_kid: str, new_kid: str, activates_at: int) -> None:
    assert samples
    for before, after, kid, published in samples:
        assert kid in published  # announced before it signed
        if kid == new_kid:
            assert after >= activates_at  # never before its activation time
        else:
            assert kid == old_kid and before < activates_at + 1.0  # the old key stops by then (+ refresh)
    assert samples[-1][2] == new_kid


def test_a_rotation_is_announced_then_switches_on_a_real_server(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ssa_server", "serve", "--port", str(port), "--data-dir",
                             str(data), "--scripts-dir", str(tmp_path / "scripts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, SSA_KEY_REFRESH_INTERVAL="0.2"))
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        deadline = time.time() + 30
        while True:
            try:
                if http.get("/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not become ready"
            time.sleep(0.05)
        made = run_cli("clients", "create", "--scope", ADMIN, "--data-dir", str(data))
        token = http.post("/token", data={"grant_type": "client_credentials"},
                          auth=(made["client_id"], made["client_secret"])).json()["access_token"]
        H = {"Authorization": f"Bearer {token}"}

        def create() -> str:
            r = http.post("/ssa", json={"org_id": "o", "one_time_use": False}, headers=H)
            assert r.status_code == 201, r.text
            return r.json()["ssa"]

        old_token = create()
        old_kid = kid_of(old_token)
        rotated = run_cli("keys", "rotate", "--data-dir", str(data), SSA_KEY_ACTIVATION_DELAY=str(DELAY))
        assert rotated["status"] == "next" and rotated["activates_at"] >= int(time.time()) + DELAY - 1
        samples = sample_until(rotated["activates_at"] + 1.5, create,
                               lambda: {k["kid"] for k in http.get("/jwks").json()["keys"]})
        check_timeline(samples, old_kid, rotated["kid"], rotated["activates_at"])
        verify_against(http.get("/jwks").json(), old_token)  # old SSAs verify throughout
        listed = {k["kid"]: k for k in run_cli("keys", "list", "--data-dir", str(data)) if k["use"] == "ssa"}
        assert (listed[old_kid]["status"], listed[rotated["kid"]]["status"]) == ("retiring", "active")

        urgent = run_cli("keys", "rotate", "--now", "--data-dir", str(data))  # an emergency: at once
        assert urgent["status"] == "active"
        deadline = time.time() + 2  # the server re-reads keys every 0.2 s
        while kid_of(create()) != urgent["kid"]:
            assert time.time() < deadline, "--now did not switch"
        for t in (old_token, create()):
            verify_against(http.get("/jwks").json(), t)
    finally:
        http.close()
        proc.kill()
        proc.wait(timeout=10)


def test_two_postgresql_nodes_switch_keys_together(nodes, pg_url):  # noqa: F811
    a, b = nodes(), nodes()  # each re-reads the keys every 0.5 s
    H = a.token(pg_url)
    turn = [0]

    def create() -> str:
        node = (a, b)[turn[0] % 2]
        turn[0] += 1
        r = node.http.post("/ssa", json={"org_id": "o", "one_time_use": False}, headers=H)
        assert r.status_code == 201, r.text
        return r.json()["ssa"]

    old_token = create()
    old_kid = kid_of(old_token)
    rotated = run_cli("keys", "rotate", SSA_STORE_URL=pg_url, SSA_KEY_ACTIVATION_DELAY=str(DELAY))
    # The key each SSA names was in the /jwks of both nodes before that SSA was made.
    samples = sample_until(rotated["activates_at"] + 1.5, create, lambda: a.kids() & b.kids())
    check_timeline(samples, old_kid, rotated["kid"], rotated["activates_at"])
    assert {s[2] for s in samples[-4:]} == {rotated["kid"]}  # both nodes sign with it
    for node in (a, b):
        verify_against(node.http.get("/jwks").json(), old_token)


def test_scheduled_rotation_happens_once_across_two_postgresql_nodes(nodes, pg_url):  # noqa: F811
    import psycopg

    # (the clients' kept-alive connections idle through the waits below, longer than the default 5 s
    # idle limit: a server closing one just as the client reuses it is HTTP's keep-alive race, and a
    # POST is not retried through it)
    env = {"SSA_KEY_ROTATION_DAYS": "1", "SSA_CLEANUP_INTERVAL": "1", "SSA_KEY_ACTIVATION_DELAY": "2",
           "SSA_HTTP_IDLE_TIMEOUT": "120"}
    a, b = nodes(**env), nodes(**env)
    H = a.token(pg_url)
    old_kid = kid_of(a.http.post("/ssa", json={"org_id": "o"}, headers=H).json()["ssa"])
    with psycopg.connect(pg_url, autocommit=True) as conn:  # the key began signing two days ago
        conn.execute("UPDATE keys SET created_at = created_at - 172800, doc = doc || jsonb_build_object("
                     "'activates_at', (doc->>'activates_at')::bigint - 172800) WHERE use = 'ssa'")
    deadline = time.time() + 10
    while len([k for k in pg_cli(pg_url, "keys", "list") if k["use"] == "ssa"]) < 2:
        assert time.time() < deadline, "no scheduled rotation"
        time.sleep(0.2)
    time.sleep(4)  # several cleaner runs on each node: still one rotation, then the switch
    ssa_keys = [k for k in pg_cli(pg_url, "keys", "list") if k["use"] == "ssa"]
    assert len(ssa_keys) == 2
    (new,) = [k for k in ssa_keys if k["kid"] != old_kid]
    assert new["status"] == "active"
    for node in (a, b):
        assert kid_of(node.http.post("/ssa", json={"org_id": "o"}, headers=H).json()["ssa"]) == new["kid"]
    a.stop()
    b.stop()
    logs = a.proc.stderr.read().decode() + b.proc.stderr.read().decode()
    assert logs.count("scheduled key rotation:") == 1, logs
