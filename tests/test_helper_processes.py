"""The server's helper processes (the signing helper, the sandbox workers), started and stopped by
one module (``helper_process.py``): each loads only what it needs, starts hardened, and a helper
that cannot start leaves nothing behind (issue 12, item 5)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ssa_server.keys import generate_key
from ssa_server.plugins.sandbox import SandboxLimits, SandboxPool, ScriptError
from ssa_server.signing import Signer
from ssa_server.signing_process import SigningProcess, SigningUnavailable

WORKER = "ssa_server.plugins.sandbox.worker"
SIGNER = "ssa_server.signing_process"

# What the untrusted worker loads: its wall, the language policy, the rules a result is held to,
# the frames.  Not the pool, the host, the plugin manager, keys, signing or the spawner.
WORKER_NEEDS = {
    "ssa_server", "ssa_server.frames", "ssa_server.jsonvalues", "ssa_server.shared_counter",
    "ssa_server.plugins", "ssa_server.jwt_draft", "ssa_server.script_rules",
    "ssa_server.plugins.sandbox", "ssa_server.plugins.sandbox.errors", "ssa_server.plugins.sandbox.limits",
    "ssa_server.plugins.sandbox.janssen", "ssa_server.plugins.sandbox.janssen_objects",
    "ssa_server.plugins.sandbox.policy", "ssa_server.plugins.sandbox.refusals",
    "ssa_server.plugins.sandbox.state",
    "ssa_server.plugins.sandbox.worker",
}
# What the key-holding signing helper loads: nothing of the plugins or the sandbox.
SIGNER_NEEDS = {"ssa_server", "ssa_server.frames", "ssa_server.helper_process", "ssa_server.signing",
                "ssa_server.signing_process"}


def loaded_by(module: str) -> set[str]:
    """The modules ``python -I -m module`` has loaded before its ``main()`` runs."""
    probe = f"import {module}, sys; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def ours(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "ssa_server" or m.startswith("ssa_server.")}


def test_the_sandbox_worker_loads_only_what_it_needs():
    modules = loaded_by(WORKER)
    assert ours(modules) == WORKER_NEEDS
    # Nothing that spawns, waits on an event loop or handles keys is there for a bypass to reach.
    assert not modules & {"asyncio", "subprocess", "threading", "jwcrypto", "cryptography", "starlette"}


def test_the_sandbox_worker_does_not_load_pluggy():
    assert "pluggy" not in loaded_by(WORKER)


def test_the_signing_helper_loads_nothing_of_the_sandbox():
    modules = loaded_by(SIGNER)
    assert ours(modules) == SIGNER_NEEDS
    assert not modules & {"RestrictedPython", "pluggy", "tinydb", "starlette"}


# --- started hardened ---

def _proc(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_text()


def _core_limit(pid: int) -> list[str]:
    line = next(x for x in _proc(pid, "limits").splitlines() if x.startswith("Max core file size"))
    return line.split()[4:6]


def _session_and_group(pid: int) -> tuple[int, int]:
    fields = _proc(pid, "stat").rsplit(")", 1)[1].split()
    return int(fields[3]), int(fields[2])  # session, process group


def _descriptors(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def _assert_hardened(pid: int, module: str, also: dict[int, str] | None = None) -> dict[int, str]:
    """``also``: descriptors above 2 that are not pipes, and what each must be."""
    argv = _proc(pid, "cmdline").split("\0")
    assert argv[:4] == [sys.executable, "-I", "-m", module], argv
    assert _proc(pid, "environ").split("\0")[:-1] == ["PATH=/usr/bin:/bin"]
    assert _session_and_group(pid) == (pid, pid)  # its own session: the server's signals stay the server's
    assert _core_limit(pid) == ["0", "0"]  # no core file
    fds = _descriptors(pid)
    assert [fds[fd] for fd in (0, 1, 2)] == ["/dev/null"] * 3
    also = also or {}
    assert all(target.startswith("pipe:") for fd, target in fds.items() if fd > 2 and fd not in also), fds
    assert all(fds.get(fd) == target for fd, target in also.items()), fds
    return fds


SOURCE = 'def create(jwt, context):\n    jwt.claims["ran"] = True\n    return True\n'
PAYLOAD = {"header": {"alg": "RS256", "kid": "k"}, "claims": {"jti": "j", "iss": "i", "iat": 1}}


def test_the_sandbox_worker_starts_hardened_in_an_empty_directory():
    pool = SandboxPool(workers=1, limits=SandboxLimits(timeout=5))
    try:
        pool.load("s", SOURCE, {})
        assert pool.call("s", "create", PAYLOAD, {})["claims"]["ran"] is True  # its wall is up
        (worker,) = pool._idle
        # 5: its own /proc/self/statm, read-only (a script's own memory budget is measured from it)
        fds = _assert_hardened(worker.pid, WORKER, also={5: f"/proc/{worker.pid}/statm"})
        assert sorted(fds) == [0, 1, 2, 3, 4, 5]
        cwd = os.readlink(f"/proc/{worker.pid}/cwd")
        assert Path(cwd).name.startswith("ssa-worker-") and os.listdir(cwd) == []
    finally:
        pool.close()


def test_the_signing_helper_starts_hardened():
    record = generate_key("ES256", "ssa", int(time.time()))
    data = Signer(record["jwk"], record["alg"], record["kid"]).signing_input({}, {"x": 1})
    process = SigningProcess(timeout=5.0)

    async def go() -> None:
        await process.sign(record["kid"], record["alg"], record["jwk"], data)
        assert process.pid is not None
        fds = _assert_hardened(process.pid, SIGNER)
        assert len(fds) == 5  # /dev/null on 0-2 and its two pipes

    try:
        asyncio.run(go())
    finally:
        process.close()


# --- a helper that cannot start ---

def _open_descriptors() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _worker_dirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("ssa-worker-")}


@pytest.fixture
def no_spawn(monkeypatch, tmp_path):
    """subprocess.Popen fails as it does when the server is out of descriptors or processes.
    Workers' directories go to ``tmp_path`` (other test runs on the machine share /tmp)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def refuse(*args, **kwargs):
        raise OSError(24, "Too many open files")

    def stop() -> None:
        monkeypatch.setattr(subprocess, "Popen", refuse)

    return stop


def test_a_helper_that_cannot_start_leaves_no_descriptor_or_directory(no_spawn):
    fds, dirs = _open_descriptors(), _worker_dirs()
    no_spawn()
    for _ in range(3):
        with pytest.raises(OSError):
            SandboxPool(workers=1)
    process = SigningProcess()

    async def go() -> None:
        for _ in range(3):
            with pytest.raises(SigningUnavailable):
                process.start()

    asyncio.run(go())
    assert _open_descriptors() == fds
    assert _worker_dirs() == dirs


HANG = "def create(jwt, context):\n    while True:\n        pass\n"


def test_a_replacement_retried_while_it_cannot_start_leaks_nothing(no_spawn, monkeypatch):
    """A worker is lost while no process can be started: its replacement is retried every second
    (issue 10) and each failed attempt leaves nothing open; once processes start again the pool
    serves."""
    real = subprocess.Popen
    pool = SandboxPool(workers=1, limits=SandboxLimits(timeout=0.3, cpu=2.0))
    try:
        pool.load("s", SOURCE, {})
        pool.load("hang", HANG, {})
        dirs = _worker_dirs()

        async def go() -> tuple[dict, int, set[str]]:
            fds = _open_descriptors()  # the event loop's included
            no_spawn()
            try:
                with pytest.raises(ScriptError):
                    await pool.call_async("hang", "create", PAYLOAD, {})  # the worker is lost
                await asyncio.sleep(2.5)  # about three failed attempts to replace it
                # The lost worker's two pipes are closed; the failed attempts should open nothing.
                leaked, left = len(_open_descriptors()) - (len(fds) - 2), _worker_dirs()
            finally:
                monkeypatch.setattr(subprocess, "Popen", real)
            for _ in range(100):
                try:
                    return await pool.call_async("s", "create", PAYLOAD, {}), leaked, left
                except ScriptError as e:  # busy until the replacement is in
                    assert e.kind == "busy", e
                    await asyncio.sleep(0.1)
            raise AssertionError("the pool did not recover")

        result, leaked, left = asyncio.run(go())
        assert leaked <= 0, f"failed starts left {leaked} descriptors open"
        assert left < dirs  # the lost worker's directory went, no other came
        assert result["claims"]["ran"] is True
    finally:
        pool.close()
