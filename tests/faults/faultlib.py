"""Helpers of the fault suite: real ``serve`` processes, CLI runs, tmpfs mounts and disk filling,
in-process disk faults (the fixtures that hand them out are in ``conftest.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from conftest import ADMIN
from ports import free_port

IS_ROOT = os.geteuid() == 0
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSA_")}
    env.update(extra or {})
    return env


def run_cli(data_dir: Path, *args: str, prefix: list[str] | None = None, env: dict[str, str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``ssa-server`` CLI on ``data_dir`` (``prefix``: e.g. :data:`NOBODY`)."""
    argv = [*(prefix or []), sys.executable, "-m", "ssa_server", *args, "--data-dir", str(data_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=clean_env(env), input=stdin)


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The failure of a CLI or serve process: non-zero, no traceback, exactly one line on stderr."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def serve_once(data_dir: Path, *extra: str, prefix: list[str] | None = None, timeout: float = 30
               ) -> subprocess.CompletedProcess[str]:
    """``serve`` expected to exit by itself (a start-up failure)."""
    argv = [*(prefix or []), sys.executable, "-m", "ssa_server", "serve", "--port", str(free_port()),
            "--data-dir", str(data_dir), "--scripts-dir", str(data_dir.parent / "no-scripts"), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=clean_env())


class Serve:
    """A real ``ssa-server serve`` on 127.0.0.1 whose stderr goes to a file (read with :meth:`log`)."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.data = data_dir
        self.log_path = log_dir / f"serve-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, ready: bool = True) -> Serve:
        """Start and wait until it answers (``ready``: until /health/ready is 200, else /health/live)."""
        self.port = free_port()
        self.log_path = self.log_path.with_name(f"serve-{time.monotonic_ns()}.log")
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ssa_server", "serve", "--port", str(self.port),
                 "--data-dir", str(self.data), "--scripts-dir", str(self.data.parent / "no-scripts"), *extra],
                stdout=subprocess.DEVNULL, stderr=err,
                env=clean_env({"SSA_KEY_REFRESH_INTERVAL": "0.5", "SSA_CUSTOM_ATTRIBUTES": "myattr"}))
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        path = "/health/ready" if ready else "/health/live"
        deadline = time.time() + 30
        while time.time() < deadline:
            assert self.proc.poll() is None, f"serve exited: {self.log()}"
            try:
                if self.http.get(path).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"serve did not answer {path}: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> httpx.Response:
        return self.http.get("/health/ready")

    def wait_ready(self, timeout: float = 10) -> float:
        """Seconds until /health/ready answers 200."""
        start = time.monotonic()
        while self.ready().status_code != 200:
            assert time.monotonic() - start < timeout, self.ready().text
            time.sleep(0.02)
        return time.monotonic() - start

    def token(self) -> dict[str, str]:
        made = json.loads(run_cli(self.data, "clients", "create", "--scope", ADMIN).stdout)
        return self.token_for(made)

    def token_for(self, made: dict[str, str]) -> dict[str, str]:
        r = self.http.post("/token", data={"grant_type": "client_credentials"},
                           auth=(made["client_id"], made["client_secret"]))
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc is not None:
            self.http.close()
        self.proc = None


def mount_tmpfs(size: str) -> Path:
    """A tmpfs of ``size`` (e.g. "4m") on a new directory (skips the test unless root)."""
    needs_root("this test mounts a tmpfs, which")
    point = Path(tempfile.mkdtemp(prefix="ssa-fault-"))
    os.chmod(point, 0o755)
    options = f"size={size},mode=0755"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
    return point


def unmount(point: Path) -> None:
    """Unmount (lazily if still busy) and remove a :func:`mount_tmpfs` mount."""
    if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
    os.rmdir(point)


def needs_root(what: str) -> None:
    if not IS_ROOT:
        pytest.skip(f"{what} needs root")


def fill(mount: Path, leave: int = 0) -> Path:
    """Fill the file system of ``mount`` with a filler file, then give back ``leave`` bytes
    (rounded to pages); returns the filler (truncate or delete it to free space)."""
    filler = mount / "filler.bin"
    chunk = b"\0" * (1 << 16)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:  # a write past the end of the room is short, then the next one fails
            try:
                if os.write(fd, chunk) == 0:
                    break
            except OSError:
                break
    finally:
        os.close(fd)
    free(filler, leave)
    return filler


def free(filler: Path, amount: int) -> None:
    """Give back ``amount`` bytes of the filler."""
    if amount > 0:
        size = os.path.getsize(filler)
        os.truncate(filler, max(0, size - amount))


def free_bytes(mount: Path) -> int:
    st = os.statvfs(mount)
    return st.f_bavail * st.f_frsize


class DiskFaults:
    """In-process faults for the files of one data dir, by wrapping ``os.write`` and ``os.fsync``.

    Files are told apart by kind: ``journal`` (store.jsonl), ``temp`` (the compaction's
    store.jsonl.tmp) and ``other`` (any other file of the data dir, e.g. the write probe).
    ``room[kind]``: bytes that can still be written to files of that kind (absent: no limit); a
    write larger than the room is short (what fits), the next one fails with ENOSPC, as on a full
    disk.  ``fsync_errors[kind]``: errnos the next fsyncs raise, in turn.  ``corrupt``: kinds whose
    writes change one byte and still report the full length.  ``gate``: journal writes wait for it.
    Other descriptors pass through untouched.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
        import threading

        self.data_dir = str(Path(data_dir).resolve())
        self.room: dict[str, int] = {}
        self.fsync_errors: dict[str, list[int]] = {}
        self.corrupt: set[str] = set()
        self.gate: threading.Event | None = None
        self.written: dict[str, int] = {"journal": 0, "temp": 0, "other": 0}
        self.attempts: dict[str, int] = {"journal": 0, "temp": 0, "other": 0}
        self._write, self._fsync = os.write, os.fsync
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "fsync", self.fsync)

    def kind(self, fd: int) -> str | None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")
        except OSError:
            return None
        if not path.startswith(self.data_dir + "/"):
            return None
        if path.endswith("/store.jsonl"):
            return "journal"
        if path.endswith(".jsonl.tmp"):
            return "temp"
        return "other"

    def write(self, fd: int, data: bytes) -> int:
        import errno

        kind = self.kind(fd)
        if kind is None:
            return self._write(fd, data)
        self.attempts[kind] += 1
        if kind == "journal" and self.gate is not None:
            self.gate.wait(10)
        data = bytes(data)
        if kind in self.room:
            if self.room[kind] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data = data[:self.room[kind]]
            self.room[kind] -= len(data)
        if kind in self.corrupt and data:
            n = self._write(fd, bytes([data[0] ^ 1]) + data[1:])
        else:
            n = self._write(fd, data)
        self.written[kind] += n
        return n

    def fsync(self, fd: int) -> None:
        kind = self.kind(fd)
        if kind is not None and self.fsync_errors.get(kind):
            code = self.fsync_errors[kind].pop(0)
            raise OSError(code, os.strerror(code))
        self._fsync(fd)


def journal_lines(data_dir: Path) -> list[bytes]:
    return (data_dir / "store.jsonl").read_bytes().splitlines(keepends=True)


def add_garbage(data_dir: Path, count: int) -> None:
    """Append ``3 * count`` dead journal lines (SSAs added, revoked, purged) with the server stopped:
    the next open compacts (garbage > live)."""
    import asyncio
    import uuid

    from ssa_server.store.tiny import TinyStore

    async def go() -> None:
        store = TinyStore(data_dir)
        await store.open()
        now = int(time.time())
        await store.add_ssas([{"jti": str(uuid.uuid4()), "org_id": "dead", "description": "x" * 100,
                               "software_id": "s", "software_roles": [], "grant_types": [],
                               "one_time_use": True, "rotate_ssa": True, "lifetime": None, "custom": {},
                               "created_at": now,
                               "expiration": 1, "status": "ACTIVE", "creator_id": "c", "iss": "i"}
                              for _ in range(count)])
        await store.revoke_ssas(org_id="dead", now=1)
        await store.expire_and_purge(now, 0)
        await store.close()

    asyncio.run(go())


def verify(token: str, jwks: dict) -> dict:
    """The claims of ``token`` if its signature verifies against ``jwks``."""
    from jwcrypto import jwk, jwt

    keys = jwk.JWKSet.from_json(json.dumps(jwks))
    return json.loads(jwt.JWT(jwt=token, key=keys, check_claims=False).claims)
