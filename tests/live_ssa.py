"""``LiveServer``: a real ``ssa-server serve`` process on 127.0.0.1 (its own data dir, scripts
folder and environment), with admin clients made by the CLI beside it.  The templates API and the
text UI tests drive it over HTTP, as an operator's tools would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

from conftest import ADMIN
from ports import free_port


class LiveServer:
    def __init__(self, root: Path, **env: str) -> None:
        self.data = root / "data"
        self.scripts = root / "scripts"
        self.scripts.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, SSA_SCRIPT_RELOAD_INTERVAL="0.2", SSA_SCRIPT_WORKERS="1", **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ssa_server", *args, "--data-dir", str(self.data)],
                              capture_output=True, text=True, timeout=60, env=self.env)

    def start(self) -> LiveServer:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ssa_server", "serve", "--port", str(self.port),
             "--data-dir", str(self.data), "--scripts-dir", str(self.scripts)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        self.http = httpx.Client(base_url=self.url, timeout=10)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if self.http.get("/health/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, "the server exited"
            time.sleep(0.05)
        raise AssertionError("server did not become ready")

    def client(self, *scopes: str) -> tuple[str, str]:
        """A client registered by the CLI: (client_id, client_secret)."""
        r = self.cli("clients", "create", *[a for s in (scopes or (ADMIN,)) for a in ("--scope", s)])
        assert r.returncode == 0, r.stderr
        made = json.loads(r.stdout)
        return made["client_id"], made["client_secret"]

    def auth(self, *scopes: str) -> dict[str, str]:
        cid, secret = self.client(*scopes)
        r = self.http.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, secret))
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
