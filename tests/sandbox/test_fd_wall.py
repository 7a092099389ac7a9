"""The second wall, measured from inside a live worker through a deliberate hole in a test-only
worker (``holey_worker.py``: real ``open``/``__import__``): no file descriptor is free, so files,
sockets and new imports fail with EMFILE; and a forged progress counter cannot put the blame on
another script (issue 10, finding 7)."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssa_server.plugins.sandbox import SandboxLimits, SandboxPool, ScriptError
from tests.test_scripts_http import harness  # noqa: F401  (pytest fixture)

HOLEY = str(Path(__file__).with_name("holey_worker.py"))
WORKER_MODULE = "ssa_server.plugins.sandbox.worker"


@pytest.fixture
def holey(monkeypatch):
    """Every sandbox worker started during the test is the holey one."""
    real = subprocess.Popen

    def popen(args, *a, **kw):
        if isinstance(args, list) and WORKER_MODULE in args:
            i = args.index(WORKER_MODULE)
            assert args[i - 1] == "-m"
            args = args[:i - 1] + [HOLEY] + args[i + 1:]
        return real(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", popen)


PROBE = '''
def create(jwt, context):
    import os
    import resource
    import socket
    import stat
    seen = {}
    def attempt(name, action):
        try:
            action()
            seen[name] = "worked"
        except OSError as e:
            seen[name] = e.errno
    attempt("open_read", lambda: open("/etc/hostname"))
    attempt("open_write", lambda: open("/tmp/ssa-holey-canary", "w"))
    attempt("os_open", lambda: os.open("/etc/hostname", os.O_RDONLY))
    attempt("socket", lambda: socket.socket())
    attempt("pipe", lambda: os.pipe())
    attempt("dup", lambda: os.dup(0))
    def import_new_module():
        import xml.dom.minidom
    attempt("import_new_module", import_new_module)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    open_fds, kinds = [], []
    for fd in range(limit):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        open_fds.append(fd)
        kinds.append("fifo" if stat.S_ISFIFO(mode) else "chr" if stat.S_ISCHR(mode) else "other")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        jwt.claims["raise_limit"] = "worked"
    except (ValueError, OSError):
        jwt.claims["raise_limit"] = "refused"
    jwt.claims["uid"] = os.getuid()
    jwt.claims["seen"] = seen
    jwt.claims["fds"] = {"limit": limit, "open": open_fds, "kinds": kinds,
                         "null": os.fstat(0).st_rdev == os.stat("/dev/null").st_rdev}
    return True
'''


def test_no_descriptor_is_free_in_a_worker(holey, harness):
    h = harness({"probe.py": PROBE})
    r = h.create()
    assert r.status_code == 201, r.text
    claims = h.claims(r)
    assert claims["seen"] == {name: errno.EMFILE for name in claims["seen"]}, claims["seen"]
    fds = claims["fds"]
    assert fds["open"] == list(range(fds["limit"])), fds  # every descriptor below the limit is taken
    # 0-2 /dev/null, the two pipes, and /proc/self/statm read-only (a step's own memory budget)
    assert fds["kinds"] == ["chr", "chr", "chr", "fifo", "fifo", "other"] and fds["null"], fds
    assert claims["raise_limit"] == "refused"  # not even a worker started as root can lift the wall
    if os.geteuid() == 0:
        assert claims["uid"] == 65534  # it runs as nobody
    assert not Path("/tmp/ssa-holey-canary").exists()


INNOCENT = 'def create(jwt, context):\n    jwt.claims["innocent"] = "ran"\n    return True\n'
# After a bypass: points the progress counter at the first script, then kills its worker.
FORGER = '''
def create(jwt, context):
    import os
    forge_progress({step})
    os.kill(os.getpid(), 9)
'''


def test_a_forged_progress_counter_cannot_blame_another_script_of_the_chain(holey, harness):
    h = harness({"1_innocent.py": INNOCENT, "2_forger.py": FORGER.format(step=0)})
    r = h.create()
    assert r.status_code == 502, r.text
    assert "2_forger" in r.json()["error_description"], r.text
    listing = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
    assert listing["1_innocent"]["failures"] == 0 and listing["2_forger"]["failures"] == 1


def test_a_forged_progress_counter_cannot_blame_another_request_of_a_batch(holey):
    pool = SandboxPool(workers=1, limits=SandboxLimits(timeout=5))
    try:
        pool.load("innocent", INNOCENT, {})
        pool.load("forger", FORGER.format(step=0), {})
        payload = {"header": {"alg": "RS256", "kid": "k"}, "claims": {"jti": "j", "iss": "i", "iat": 1}}

        async def go():
            return await asyncio.gather(pool.call_async("innocent", "create", payload, {}),
                                        pool.call_async("forger", "create", payload, {}),
                                        return_exceptions=True)

        innocent, forger = asyncio.run(go())
        assert not isinstance(innocent, BaseException), innocent
        assert innocent["claims"]["innocent"] == "ran"
        assert isinstance(forger, ScriptError) and forger.kind in ("crashed", "limit"), forger
    finally:
        pool.close()


def test_the_holey_worker_is_not_reachable_from_the_package():
    """The hole exists only in the tests folder: the installed package cannot start it."""
    probe = "import ssa_server.plugins.sandbox.pool as p, inspect; print('holey' in inspect.getsource(p))"
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
