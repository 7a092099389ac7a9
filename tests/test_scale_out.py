"""Several real ``ssa-server serve`` processes over one PostgreSQL database, and a database outage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx2 as httpx
import pytest

psycopg = pytest.importorskip("psycopg", reason="pip install -e '.[test]' installs the PostgreSQL driver")

from conftest import ADMIN, truncate, with_database  # noqa: E402
from pg_cluster import start_cluster  # noqa: E402
from ports import free_port  # noqa: E402
from test_live_server import jti_of  # noqa: E402

pytestmark = pytest.mark.slow


def cli(url: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "ssa_server", *args], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, SSA_STORE_URL=url))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def kid_of(token: str) -> str:
    import base64

    head = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"]


class Node:
    """One ``serve`` process (its own session, so its workers are stopped with it)."""

    def __init__(self, url: str, tmp_path, *args: str, **env: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ssa_server", "serve", "--port", str(self.port), "--scripts-dir",
             str(tmp_path / "no-scripts"), "--data-dir", str(tmp_path / f"unused{self.port}"), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            env=dict(os.environ, SSA_STORE_URL=url, SSA_KEY_REFRESH_INTERVAL="0.5",
                     SSA_ISSUER="https://ssa.example.test", **env))  # one issuer behind the balancer
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=15)
        deadline = time.time() + 60
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                if self.http.get("/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "node did not become ready"
            time.sleep(0.1)

    def token(self, url: str) -> dict[str, str]:
        made = cli(url, "clients", "create", "--scope", ADMIN)
        r = self.http.post("/token", data={"grant_type": "client_credentials"},
                           auth=(made["client_id"], made["client_secret"]))
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}

    def kids(self) -> set[str]:
        return {k["kid"] for k in self.http.get("/jwks").json()["keys"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.http.close()


@pytest.fixture
def nodes(pg_url, tmp_path):
    truncate(pg_url)
    started: list[Node] = []

    def start(*args: str, url: str = pg_url, **env: str) -> Node:
        node = Node(url, tmp_path, *args, **env)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def test_two_nodes_share_ssas_validations_and_keys(nodes, pg_url):
    a = nodes()
    b = nodes("--workers", "2")  # two worker processes behind one port: three processes in all
    H = a.token(pg_url)  # a token from one node is accepted by the other (shared HS256 key)
    assert len([k for k in cli(pg_url, "keys", "list") if k["status"] == "active"]) == 2  # one ssa, one token

    # Concurrent validations of one one-time SSA, split across both nodes: exactly one wins.
    jti = jti_of(a.http.post("/ssa", json={"org_id": "race"}, headers=H).json()["ssa"])
    results: list[int] = []
    barrier = threading.Barrier(24)

    def validate(node: Node) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{node.port}", timeout=15) as http:
            barrier.wait()
            results.append(http.post("/ssa/validation", headers={"jti": jti}).status_code)

    threads = [threading.Thread(target=validate, args=(a if i % 2 else b,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [400] * 23

    # Created on one, fetched, validated and revoked on the other.
    token = a.http.post("/ssa", json={"org_id": "acme", "one_time_use": False}, headers=H).json()["ssa"]
    jti = jti_of(token)
    assert [i["ssa"]["jti"] for i in b.http.get("/ssa", params={"org_id": "acme"}, headers=H).json()] == [jti]
    assert jti_of(b.http.get("/ssa/jwt", params={"jti": jti}, headers=H).json()["ssa"]) == jti
    assert b.http.post("/ssa/validation", headers={"jti": jti}).status_code == 200
    assert b.http.delete("/ssa", params={"org_id": "acme"}, headers=H).status_code == 200
    assert a.http.post("/ssa/validation", headers={"jti": jti}).status_code == 400
    assert a.http.get("/ssa", params={"org_id": "acme"}, headers=H).json() == []

    # Both publish the same keys; a key rotated on one node's machine is served by the other.
    old_kid = kid_of(token)
    a.http.post("/ssa", json={"org_id": "still-valid"}, headers=H)  # keeps the old key in /jwks
    assert a.kids() == b.kids() == {old_kid}
    rotated = cli(pg_url, "keys", "rotate", "--now")["kid"]  # delayed: test_key_rotation_live
    deadline = time.time() + 10
    while not (rotated in a.kids() and rotated in b.kids()):
        assert time.time() < deadline, "the rotated key was not served by both nodes"
        time.sleep(0.1)
    for node in (a, b, b):
        assert kid_of(node.http.post("/ssa", json={"org_id": "k"}, headers=H).json()["ssa"]) == rotated
    assert a.kids() == b.kids() == {old_kid, rotated}  # the old key stays published


def test_workers_starting_together_make_one_key_per_use(nodes, pg_url):
    for node in [nodes("--workers", "3"), nodes("--workers", "2")]:
        assert node.http.get("/health/ready").json()["checks"][0] == {"name": "store", "status": "UP",
                                                                      "backend": "postgresql"}
    keys = cli(pg_url, "keys", "list")
    assert sorted(k["use"] for k in keys if k["status"] == "active") == ["ssa", "token"]
    assert len(keys) == 2
    with psycopg.connect(pg_url) as conn:  # five workers, each with its own pool
        open_ = conn.execute("SELECT count(DISTINCT client_port) FROM pg_stat_activity "
                             "WHERE datname = current_database() "
                             "AND application_name = 'ssa-server'").fetchone()
    assert open_[0] >= 5


@pytest.fixture
def own_cluster():
    """A PostgreSQL cluster of this test alone (it is stopped under load)."""
    from pg_cluster import ClusterError

    try:
        cluster = start_cluster()
    except (ClusterError, OSError) as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the fault test needs its own PostgreSQL cluster: {e}")
        pytest.skip(f"the fault test needs initdb/pg_ctl to start its own cluster: {e}")
    name = f"ssa_fault_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield cluster, with_database(cluster.url, name)
    cluster.destroy()


def test_database_outage_is_503_json_and_the_server_recovers(nodes, own_cluster):
    cluster, url = own_cluster
    node = nodes(url=url, SSA_STORE_POOL_TIMEOUT="0.5", SSA_STORE_STATEMENT_TIMEOUT="2")
    H = node.token(url)
    kept = [jti_of(node.http.post("/ssa", json={"org_id": "keep"}, headers=H).json()["ssa"])
            for _ in range(5)]

    acknowledged: list[str] = []
    failures: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{node.port}", timeout=15) as http:
            while not stop.is_set():
                r = http.post("/ssa", json={"org_id": "load"}, headers=H)
                if r.status_code == 201:
                    acknowledged.append(jti_of(r.json()["ssa"]))
                else:
                    failures.append((r.status_code, r.text))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 30
        while len(acknowledged) < 40:
            assert time.time() < deadline, "no load"
            time.sleep(0.02)
        cluster.stop("fast")  # PostgreSQL goes away under load
        before = len(acknowledged)
        deadline = time.time() + 30
        while len(failures) < 8:
            assert time.time() < deadline, "requests did not fail while the database was down"
            time.sleep(0.05)
        ready = node.http.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"][0] == {"name": "store", "status": "DOWN", "backend": "postgresql",
                                             "detail": "StoreUnavailable"}
        revoke = node.http.delete("/ssa", params={"org_id": "keep"}, headers=H)
        validate = node.http.post("/ssa/validation", headers={"jti": kept[0]})
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    for status, body in failures + [(revoke.status_code, revoke.text), (validate.status_code, validate.text)]:
        assert status == 503, body
        assert json.loads(body) == {"error": "temporarily_unavailable",
                                    "error_description": "The store is not available; retry later."}
    assert len(acknowledged) - before <= len(threads)  # only requests already past the store

    cluster.start()  # back again: the same server process recovers by itself
    deadline = time.time() + 30
    while True:
        try:
            r = node.http.post("/ssa", json={"org_id": "after"}, headers=H)
        except httpx.TransportError:
            r = None
        if r is not None and r.status_code == 201:
            break
        assert r is None or r.status_code == 503, r.text
        assert time.time() < deadline, "the server did not recover"
        time.sleep(0.2)
    assert node.proc.poll() is None
    # Connections the outage closed are replaced before use: no request fails on a stale one.
    assert [node.http.post("/ssa", json={"org_id": "after"}, headers=H).status_code
            for _ in range(20)] == [201] * 20
    assert node.http.get("/health/ready").status_code == 200

    stored = {i["ssa"]["jti"] for i in node.http.get("/ssa", params={"org_id": "load"}, headers=H).json()}
    assert set(acknowledged) <= stored  # every acknowledged create was committed
    assert len(stored - set(acknowledged)) <= len(threads)  # at most the ones in flight when it stopped
    # Nothing half-done: the refused revoke and validation changed nothing.
    keep = {i["ssa"]["jti"] for i in node.http.get("/ssa", params={"org_id": "keep"}, headers=H).json()}
    assert keep == set(kept)
    assert node.http.delete("/ssa", params={"org_id": "keep"}, headers=H).status_code == 200
    assert node.http.get("/ssa", params={"org_id": "keep"}, headers=H).json() == []
