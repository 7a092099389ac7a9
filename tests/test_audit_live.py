"""The audit trail through real servers: ``ssa-server serve`` on 127.0.0.1 with CLI processes
beside it (the embedded store), two ``serve`` nodes on one PostgreSQL; GET /audit's scope, filters
and pages; no secret in any event; the chain kept by concurrent writers; tampering with the journal
file or a PostgreSQL row named by ``ssa-server audit verify``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from conftest import ADMIN, PORTAL
from ports import free_port
from ssa_server.store.datadir import JOURNAL
from test_live_server import jti_of

pytestmark = pytest.mark.slow

GOOD = 'def create(jwt, context):\n    jwt.claims["audited"] = "yes"\n'
BAD = "def create(:\n"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ssa_server", *args], capture_output=True, text=True,
                          timeout=60, env=env)


class Node:
    """One ``serve`` process (its environment names the store)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "ssa_server", "serve", "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if self.http.get("/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.http.close()


def _client(env: dict[str, str], scope: str = ADMIN) -> tuple[str, str]:
    made = json.loads(cli(env, "clients", "create", "--scope", scope).stdout)
    return made["client_id"], made["client_secret"]


def _token(node: Node, cid: str, secret: str) -> str:
    r = node.http.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, secret))
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def _all_events(node: Node, headers: dict[str, str], **params: str) -> list[dict]:
    """Every page of GET /audit, two events at a time (the cursor followed to the end)."""
    out: list[dict] = []
    cursor = None
    for _ in range(1000):
        query = dict(params, limit="2", **({"next": str(cursor)} if cursor is not None else {}))
        r = node.http.get("/audit", params=query, headers=headers)
        assert r.status_code == 200, r.text
        out += r.json()["events"]
        cursor = r.json()["next"]
        if cursor is None:
            return out
    raise AssertionError("GET /audit never ended")


@pytest.fixture
def tiny_env(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "good.py").write_text(GOOD)
    (scripts / "bad.py").write_text(BAD)
    return dict(os.environ, SSA_DATA_DIR=str(tmp_path / "data"), SSA_SCRIPTS_DIR=str(scripts),
                SSA_SCRIPT_RELOAD_INTERVAL="0.2", SSA_AUDIT_CHECKPOINT_EVENTS="10")


def test_a_live_server_records_every_action(tiny_env, tmp_path):
    empty = cli(tiny_env, "audit", "verify")  # nothing yet: a chain of none verifies
    assert empty.returncode == 0 and json.loads(empty.stdout)["events"] == 0, empty.stderr
    node = Node(tiny_env)
    try:
        cid, secret = _client(tiny_env)
        token = _token(node, cid, secret)
        admin = {"Authorization": f"Bearer {token}"}
        refused = node.http.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, "wrong"),
                                 headers={"X-Request-ID": "tok-fail-1"})
        assert refused.status_code == 401
        body = {"org_id": "acme", "software_id": "scan", "software_roles": ["password"],
                "grant_types": ["client_credentials"], "one_time_use": True}
        made = node.http.post("/ssa", json=body, headers=dict(admin, **{"X-Request-ID": "create-1"}))
        assert made.status_code == 201, made.text
        ssa_jwt = made.json()["ssa"]
        jti = jti_of(ssa_jwt)
        again = node.http.get("/ssa/jwt", params={"jti": jti}, headers=admin)
        assert again.status_code == 200
        assert node.http.post("/ssa/validation", headers={"jti": jti}).status_code == 200
        assert node.http.post("/ssa/validation", headers={"jti": jti}).status_code != 200
        other = jti_of(node.http.post("/ssa", json=body, headers=admin).json()["ssa"])
        assert node.http.request("DELETE", "/ssa", params={"jti": other}, headers=admin).status_code == 200
        rotated = cli(tiny_env, "keys", "rotate")
        assert rotated.returncode == 0, rotated.stderr
        new_kid = json.loads(rotated.stdout)["kid"]

        deadline = time.time() + 15
        while time.time() < deadline:  # the watcher's revisions task records the scripts
            scripts = _all_events(node, admin, action="script.refused") + \
                _all_events(node, admin, action="script.loaded")
            if len(scripts) >= 2:
                break
            time.sleep(0.2)
        by_script = {e["details"]["script"]: e for e in scripts}
        assert by_script["good"]["action"] == "script.loaded" and by_script["good"]["details"]["revision"]
        assert by_script["bad"]["action"] == "script.refused" and by_script["bad"]["outcome"] == "refused"
        assert all(e["actor"] == "server" for e in scripts)
        (Path(tiny_env["SSA_SCRIPTS_DIR"]) / "good.py").unlink()
        deadline = time.time() + 15
        while time.time() < deadline and not _all_events(node, admin, action="script.unloaded"):
            time.sleep(0.2)
        (gone,) = _all_events(node, admin, action="script.unloaded")
        assert gone["details"] == {"script": "good", "revision": by_script["good"]["details"]["revision"]}

        events = _all_events(node, admin)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # the pages cover all, once
        created = [e for e in events if e["action"] == "ssa.created" and e["jti"] == jti]
        assert len(created) == 1
        c = created[0]
        assert (c["actor"], c["address"], c["request_id"], c["org_id"]) == \
            (cid, "127.0.0.1", "create-1", "acme")
        assert c["kid"] and c["outcome"] == "ok"
        fail = [e for e in events if e["action"] == "token.refused"][0]
        assert (fail["reason"], fail["request_id"], fail["address"], fail["details"]) == \
            ("invalid_client", "tok-fail-1", "127.0.0.1", {"client_id": cid})
        this = [e["action"] for e in _all_events(node, admin, jti=jti)]
        assert this == ["ssa.created", "ssa.jwt_read", "ssa.used", "ssa.validation_failed"]
        failed = _all_events(node, admin, action="ssa.validation_failed")
        assert [(e["jti"], e["reason"], e["actor"]) for e in failed] == [(jti, "used", "anonymous")]
        revoked = _all_events(node, admin, action="ssa.revoked")
        assert [(e["jti"], e["actor"]) for e in revoked] == [(other, cid)]
        clients = _all_events(node, admin, action="client.created")
        assert clients[0]["actor"].startswith("cli:") and clients[0]["details"]["client_id"] == cid
        keys = _all_events(node, admin, action="key.rotated")
        assert [(e["kid"], e["actor"][:4]) for e in keys] == [(new_kid, "cli:")]
        assert _all_events(node, admin, org_id="acme", action="ssa.created")[0]["jti"] == jti
        assert len(_all_events(node, admin, since=str(c["time"]))) < len(events)

        # scope: an admin token only
        portal = _client(tiny_env, PORTAL)
        r = node.http.get("/audit", headers={"Authorization": f"Bearer {_token(node, *portal)}"})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized_client"
        r = node.http.get("/audit")
        assert r.status_code == 401 and "error" in r.json()
        for bad in ({"limit": "0"}, {"action": "ssa.nope"}, {"since": "soon"}, {"next": "x"}, {"where": "1"}):
            r = node.http.get("/audit", params=bad, headers=admin)
            assert r.status_code == 400 and r.json()["error"] == "invalid_request", (bad, r.text)
            assert r.json()["error_description"]

        # no secret in any event: the client secret, the access token, the SSA, a private key
        exported = cli(tiny_env, "audit", "export")
        assert exported.returncode == 0, exported.stderr
        text = exported.stdout
        assert len(text.splitlines()) >= len(events)
        for secret_text in (secret, token, ssa_jwt, ssa_jwt.split(".")[2], '"d":'):
            assert secret_text not in text
        verified = cli(tiny_env, "audit", "verify")
        assert verified.returncode == 0, verified.stderr
        assert json.loads(verified.stdout)["checkpoints"] >= 1  # every 10 events
        listed = cli(tiny_env, "audit", "list", "--action", "ssa.revoked")
        assert [e["jti"] for e in json.loads(listed.stdout)["events"]] == [other]
        assert cli(tiny_env, "audit", "list", "--limit", "0").returncode == 1
    finally:
        node.stop()


def _burst(node: Node, headers: dict[str, str], n: int, failures: list[str]) -> None:
    body = {"org_id": "burst", "software_roles": ["password"], "grant_types": ["client_credentials"]}
    with httpx.Client(base_url=f"http://127.0.0.1:{node.port}", timeout=20) as http:
        for _ in range(n):
            r = http.post("/ssa", json=body, headers=headers)
            if r.status_code != 201:
                failures.append(r.text)


def test_server_and_cli_writers_keep_one_chain_then_tampering_is_named(tiny_env, tmp_path):
    node = Node(tiny_env)
    try:
        admin = {"Authorization": f"Bearer {_token(node, *_client(tiny_env))}"}
        failures: list[str] = []
        threads = [threading.Thread(target=_burst, args=(node, admin, 15, failures)) for _ in range(3)]
        command = [sys.executable, "-m", "ssa_server", "clients", "create", "--scope", ADMIN]
        writers = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=tiny_env)
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for w in writers:
            assert w.wait(60) == 0
        assert not failures
        verified = cli(tiny_env, "audit", "verify")
        assert verified.returncode == 0, verified.stderr
        summary = json.loads(verified.stdout)
        assert summary["events"] >= 45 + 5 and summary["last_seq"] == summary["events"]
    finally:
        node.stop()

    journal = Path(tiny_env["SSA_DATA_DIR"]) / JOURNAL
    data = journal.read_bytes()

    def audit_line(seq: int) -> tuple[int, int]:
        start = 0
        for line in data.splitlines(keepends=True):
            entry = json.loads(line) if line.strip() else {}
            if entry.get("t") == "audit" and entry.get("id") == str(seq) and "doc" in entry:
                return start, len(line)
            start += len(line)
        raise AssertionError(f"no journal line for audit seq {seq}")

    # one field of event 7 changed in place (same length: the journal still opens)
    start, size = audit_line(7)
    line = data[start:start + size]
    changed = line.replace(b'"outcome":"ok"', b'"outcome":"no"', 1)
    assert changed != line and len(changed) == len(line)
    journal.write_bytes(data[:start] + changed + data[start + size:])
    broken = cli(tiny_env, "audit", "verify")
    assert broken.returncode == 1
    assert broken.stderr.strip().splitlines() == ["ssa-server: audit chain broken at seq 7: hash mismatch "
                                                  "(the event was changed)"]
    # event 4 deleted (its line blanked: the journal keeps its length); the first bad one is named
    start, size = audit_line(4)
    journal.write_bytes(journal.read_bytes()[:start] + b" " * (size - 1) + b"\n"
                        + journal.read_bytes()[start + size:])
    broken = cli(tiny_env, "audit", "verify")
    assert broken.returncode == 1 and "at seq 4: gap: events 4 to 4 are missing" in broken.stderr


@pytest.fixture
def pg_env(tmp_path, pg_url):
    from conftest import truncate

    truncate(pg_url)
    return dict(os.environ, SSA_STORE_URL=pg_url, SSA_DATA_DIR=str(tmp_path / "unused"),
                SSA_SCRIPTS_DIR=str(tmp_path / "no-scripts"), SSA_AUDIT_CHECKPOINT_EVENTS="25")


def test_two_postgresql_nodes_keep_one_chain_then_tampering_is_named(pg_env, pg_url):
    import psycopg

    nodes = [Node(pg_env), Node(pg_env)]
    try:
        cid, secret = _client(pg_env)
        failures: list[str] = []
        headers = [{"Authorization": f"Bearer {_token(node, cid, secret)}"} for node in nodes]
        threads = [threading.Thread(target=_burst, args=(node, h, 20, failures))
                   for node, h in zip(nodes, headers) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not failures
    finally:
        for node in nodes:
            node.stop()
    verified = cli(pg_env, "audit", "verify")
    assert verified.returncode == 0, verified.stderr
    summary = json.loads(verified.stdout)
    assert summary["events"] == summary["last_seq"] >= 81 and summary["checkpoints"] >= 1
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("""UPDATE audit SET doc = jsonb_set(doc, '{org_id}', '"elsewhere"') WHERE seq = 30""")
        broken = cli(pg_env, "audit", "verify")
        assert broken.returncode == 1 and "at seq 30: hash mismatch" in broken.stderr, broken.stderr
        conn.execute("UPDATE audit SET org_id = 'elsewhere' WHERE seq = 12")  # the column alone
        broken = cli(pg_env, "audit", "verify")
        assert broken.returncode == 1 and "at seq 12: hash mismatch" in broken.stderr, broken.stderr
        conn.execute("DELETE FROM audit WHERE seq = 9")
        broken = cli(pg_env, "audit", "verify")
        assert broken.returncode == 1 and "at seq 9: gap" in broken.stderr, broken.stderr
        conn.execute("DELETE FROM audit WHERE seq <= 12")
        broken = cli(pg_env, "audit", "verify")
        assert broken.returncode == 1 and "at seq 1: gap" in broken.stderr, broken.stderr
