"""A real ``ssa-server serve`` for the fault tests, and raw-socket HTTP helpers.

The server gets its own environment (small limits keep the tests quick), optionally a lowered
file-descriptor limit (``prlimit`` on the child we started), and writes its log to a file (a
pipe nobody reads could fill and block it).  What it runs and uses is read from ``/proc``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

from ports import free_port

ADMIN = "https://jans.io/auth/ssa.admin"


class Served:
    def __init__(self, tmp_path: Path, *args: str, nofile: int | None = None, **env: str) -> None:
        self.tmp = tmp_path
        self.data = tmp_path / "data"
        self.scripts = tmp_path / "scripts"
        self.args = args
        self.env = env
        self.nofile = nofile
        self.log_path = tmp_path / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_children: set[int] = set()  # killed by kill() if still there (ours, by PID)

    def start(self, timeout: float = 60) -> Served:
        self.port = free_port()
        self.tmp.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ssa_server", "serve", "--port", str(self.port),
                 "--data-dir", str(self.data), "--scripts-dir", str(self.scripts), *self.args],
                stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ, **self.env))
        if self.nofile is not None:  # before the interpreter gets to our start-up code
            resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, self.log()
            try:
                if self.http.get("/health/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not become ready:\n" + self.log()
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self, key: str) -> int:
        """A number from /proc/PID/status, e.g. VmHWM (peak RSS, kB)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def descendants(self) -> list[int]:
        found = descendants(self.pid)
        self.seen_children.update(found)
        return found

    def token(self) -> dict[str, str]:
        made = subprocess.run([sys.executable, "-m", "ssa_server", "clients", "create", "--scope", ADMIN,
                               "--data-dir", str(self.data)], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, **self.env))
        assert made.returncode == 0, made.stderr
        client = json.loads(made.stdout)
        r = self.http.post("/token", data={"grant_type": "client_credentials"},
                           auth=(client["client_id"], client["client_secret"]))
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        for pid in self.seen_children:  # never leave a helper of the server behind
            if alive(pid) and b"ssa_server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants(root: int) -> list[int]:
    parents = {int(p): _parent(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


# --- raw HTTP ---
def connect(port: int, timeout: float = 10) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def closed_by_server(s: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closes the connection (reading and dropping what it sends), or
    None if it is still open after ``timeout``."""
    start = time.monotonic()
    s.settimeout(0.05)
    while time.monotonic() - start < timeout:
        try:
            if not s.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    return None
