"""A real ``ssa-server serve`` on 127.0.0.1, with CLI processes beside it, and a kill -9."""

from __future__ import annotations

import base64
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

from conftest import ADMIN
from ports import free_port

pytestmark = pytest.mark.slow


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ssa_server", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60)


class Live:
    def __init__(self, tmp_path: Path) -> None:
        self.data = tmp_path / "data"
        self.tmp = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Live:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ssa_server", "serve", "--port", str(self.port),
             "--data-dir", str(self.data), "--scripts-dir", str(self.tmp / "scripts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=dict(os.environ, SSA_KEY_REFRESH_INTERVAL="0.5"))
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if self.http.get("/health/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("server did not become ready")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def client_token(self) -> dict[str, str]:
        made = json.loads(cli(self.data, "clients", "create", "--scope", ADMIN).stdout)
        r = self.http.post("/token", data={"grant_type": "client_credentials"},
                           auth=(made["client_id"], made["client_secret"]))
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}


def jti_of(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]


@pytest.fixture
def live(tmp_path):
    server = Live(tmp_path)
    yield server
    server.kill()


def test_walkthrough_and_cli_beside_the_server(live):
    live.start()
    second = subprocess.run([sys.executable, "-m", "ssa_server", "serve", "--port", str(free_port()),
                             "--data-dir", str(live.data)], capture_output=True, text=True, timeout=60)
    assert second.returncode != 0 and "in use by another ssa-server process" in second.stderr
    H = live.client_token()  # a client made by another process is usable at once
    r = live.http.post("/ssa", json={"org_id": "acme", "one_time_use": False}, headers=H)
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    jti = jti_of(r.json()["ssa"])
    assert live.http.get("/ssa", params={"org_id": "acme"}, headers=H).json()[0]["ssa"]["jti"] == jti
    assert live.http.get("/ssa/jwt", params={"jti": jti}, headers=H).status_code == 200
    assert live.http.post("/ssa/validation", headers={"jti": jti}).status_code == 200
    assert cli(live.data, "ssa", "revoke", "--jti", jti).returncode == 0  # revoked by the CLI...
    assert live.http.post("/ssa/validation", headers={"jti": jti}).status_code == 400  # ...seen at once
    rotated = json.loads(cli(live.data, "keys", "rotate", "--now").stdout)  # delayed: test_key_rotation_live
    deadline = time.time() + 5
    while rotated["kid"] not in [k["kid"] for k in live.http.get("/jwks").json()["keys"]]:
        assert time.time() < deadline, "rotated key not served"
        time.sleep(0.1)
    new = live.http.post("/ssa", json={"org_id": "acme"}, headers=H).json()["ssa"]
    header = json.loads(base64.urlsafe_b64decode(new.split(".")[0] + "=="))
    assert header["kid"] == rotated["kid"]
    other = live.http.post("/ssa", json={"org_id": "b"}, headers=H)
    assert live.http.delete("/ssa", params={"jti": jti_of(other.json()["ssa"])}, headers=H).status_code == 200


def test_kill_9_during_create_burst_keeps_acknowledged(live):
    live.start()
    H = live.client_token()
    acknowledged: list[str] = []
    stop = threading.Event()

    def burst():
        with httpx.Client(base_url=f"http://127.0.0.1:{live.port}", timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.post("/ssa", json={"org_id": "crash"}, headers=H)
                except httpx.TransportError:
                    return
                if r.status_code == 201:
                    acknowledged.append(jti_of(r.json()["ssa"]))

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while len(acknowledged) < 60 and time.time() < deadline:
        time.sleep(0.02)
    live.kill()  # kill -9 in the middle of the burst
    stop.set()
    for t in threads:
        t.join(timeout=15)
    assert len(acknowledged) >= 60
    live.start()  # the store opens again
    H = live.client_token()
    stored = {i["ssa"]["jti"] for i in live.http.get("/ssa", params={"org_id": "crash"}, headers=H).json()}
    assert set(acknowledged) <= stored
