"""The HTTP edge under hostile clients (issue 11, findings 10-12): time limits for the request head,
the body and idle connections; a cap on connections that keeps the server inside its file-descriptor
limit; request heads and bodies bounded while they are read; every refusal a JSON error; and the
token endpoint's throttling of failed client authentication.

The real-server tests run ``ssa-server serve`` on 127.0.0.1 with limits of about a second (set by
environment) and talk to it over raw sockets, so what a slow or silent client does is exactly what
the server sees.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from conftest import ADMIN
from .served import Served, closed_by_server, connect, read_response
from ssa_server.app import create_app
from ssa_server.settings import Settings

FAST = {"SSA_HTTP_HEAD_TIMEOUT": "1", "SSA_HTTP_BODY_TIMEOUT": "1", "SSA_HTTP_IDLE_TIMEOUT": "1"}
MB = 1024 * 1024


@pytest.fixture
def serve(tmp_path):
    started: list[Served] = []

    def make(*args: str, nofile: int | None = None, **env: str) -> Served:
        server = Served(tmp_path / f"s{len(started)}", *args, nofile=nofile, **env)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.kill()


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int, error: str) -> dict:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    decoded = json.loads(body)
    assert set(decoded) == {"error", "error_description"} and decoded["error"] == error
    return decoded


# --- finding 10: time limits ---
@pytest.mark.slow
def test_silent_and_idle_connections_are_closed(serve):
    server = serve(**FAST)
    silent = connect(server.port)
    lived = closed_by_server(silent, timeout=5)
    assert lived is not None and 0.8 < lived < 2.5, f"a silent connection lived {lived} s"
    kept = connect(server.port)
    kept.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(kept)[0] == 200
    lived = closed_by_server(kept, timeout=5)  # idle after its response: the keep-alive limit
    assert lived is not None and 0.8 < lived < 2.5, f"an idle connection lived {lived} s"


def _trickle(s: socket.socket, data: bytes, every: float, limit: float) -> float:
    """Send ``data`` one byte per ``every`` s until the server answers or ``limit`` s pass."""
    start = time.monotonic()
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    for byte in data:
        if sel.select(timeout=every) or time.monotonic() - start > limit:
            break
        try:
            s.send(bytes([byte]))
        except OSError:
            break
    sel.close()
    return time.monotonic() - start


@pytest.mark.slow
def test_slowloris_head_gets_408_then_close(serve):
    server = serve(**FAST)
    s = connect(server.port)
    took = _trickle(s, b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100, every=0.1, limit=6)
    assert took < 2.5, f"a head sent one byte per 0.1 s was accepted for {took:.1f} s"
    assert_json_error(*read_response(s), 408, "invalid_request")
    assert closed_by_server(s, timeout=3) is not None


@pytest.mark.slow
def test_slow_body_gets_408_and_an_unread_body_cannot_hold_the_connection(serve):
    server = serve(**FAST)
    s = connect(server.port)
    s.sendall(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
              b"Content-Length: 1000\r\n\r\n")
    took = _trickle(s, b"grant_type=client_credentials&" + b"x" * 900, every=0.1, limit=6)
    assert took < 2.5
    status, headers, body = read_response(s)
    assert_json_error(status, headers, body, 408, "invalid_request")
    assert headers["connection"] == "close"
    # Answered before its body (401: no token): trickling the body on does not keep it open.
    s = connect(server.port)
    s.sendall(b"POST /ssa HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    assert read_response(s)[0] == 401
    took = _trickle(s, b"{" + b" " * 998 + b"}", every=0.1, limit=6)
    assert took < 2.5 and closed_by_server(s, timeout=3) is not None
    assert "Traceback" not in server.log()


class Attackers:
    """Hundreds of bad connections from one thread, each replaced when the server closes it:
    silent ones, slowloris heads and slow bodies.  Records how long the server let each live."""

    def __init__(self, port: int, silent: int, heads: int, bodies: int) -> None:
        self.port = port
        self.plan = ["silent"] * silent + ["head"] * heads + ["body"] * bodies
        self.lifetimes: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, kind: str, sel: selectors.BaseSelector) -> None:
        s = connect(self.port)
        s.setblocking(False)
        if kind == "body":
            s.send(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n")
        elif kind == "head":
            s.send(b"GET /health/live HTTP/1.1\r\n")
        sel.register(s, selectors.EVENT_READ, (kind, time.monotonic()))

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for kind in self.plan:
            self._open(kind, sel)
        last_trickle = time.monotonic()
        while not self.stop.is_set():
            for key, _ in sel.select(timeout=0.05):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                kind, opened = key.data
                try:
                    if s.recv(65536):
                        continue  # an answer (408); the close follows
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    pass
                self.lifetimes.append(time.monotonic() - opened)
                sel.unregister(s)
                s.close()
                self._open(kind, sel)
            if time.monotonic() - last_trickle > 0.25:  # a byte per 0.25 s: never an idle timeout
                last_trickle = time.monotonic()
                for key in list(sel.get_map().values()):
                    if key.data[0] != "silent":
                        try:
                            key.fileobj.send(b"x")  # type: ignore[union-attr]
                        except OSError:
                            pass
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()


@pytest.mark.slow
def test_a_normal_client_is_served_while_hundreds_of_slow_connections_are_held(serve):
    server = serve(**FAST)
    attack = Attackers(server.port, silent=150, heads=150, bodies=100)
    attack.thread.start()
    try:
        time.sleep(0.5)
        ok = total = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            total += 1
            try:  # a new connection for every request, like the clients of the finding
                with httpx.Client(timeout=5) as fresh:
                    ok += fresh.get(f"http://127.0.0.1:{server.port}/health/ready").status_code == 200
            except httpx.TransportError:
                pass
    finally:
        attack.stop.set()
        attack.thread.join(timeout=10)
    assert total >= 50 and ok / total >= 0.99, f"{ok} of {total} requests served"
    assert len(attack.lifetimes) >= 400, f"only {len(attack.lifetimes)} bad connections were closed"
    assert max(attack.lifetimes) < 2.5, f"a bad connection lived {max(attack.lifetimes):.1f} s"


# --- finding 10: the connection cap ---
@pytest.mark.slow
def test_connections_above_the_cap_get_a_json_503_and_are_closed(serve):
    server = serve(SSA_HTTP_MAX_CONNECTIONS="20", SSA_HTTP_HEAD_TIMEOUT="10")
    held = [connect(server.port) for _ in range(20)]
    time.sleep(0.3)
    extra = connect(server.port)
    extra.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = read_response(extra)
    assert_json_error(status, headers, body, 503, "temporarily_unavailable")
    assert int(headers["retry-after"]) >= 1 and headers["connection"] == "close"
    assert closed_by_server(extra, timeout=3) is not None
    for s in held:
        s.close()
    time.sleep(0.3)
    assert httpx.get(f"http://127.0.0.1:{server.port}/health/live").status_code == 200


def _own_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the test process needs {needed} file descriptors (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.mark.slow
def test_a_1024_fd_limit_is_never_exhausted_by_connections(serve, tmp_path):
    _own_fd_limit(4096)
    scripts = tmp_path / "s0" / "scripts"
    scripts.mkdir(parents=True)
    server = serve(nofile=1024, SSA_HTTP_HEAD_TIMEOUT="3", SSA_SCRIPT_RELOAD_INTERVAL="0.2")
    auth = server.token()
    keep = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5)  # opened before the flood
    assert keep.get("/scripts", headers=auth).json() == []
    flood = [connect(server.port) for _ in range(1500)]
    try:
        time.sleep(0.5)
        served = sum(keep.get("/health/ready").status_code == 200 for _ in range(100))
        assert served >= 99, f"{served} of 100 requests on an open connection served during the flood"
        assert server.open_fds() < 1000
        (scripts / "late.py").write_text("def create(jwt, context):\n    return True\n")
        deadline = time.time() + 5  # the folder is read again: the server still opens files
        while [s["name"] for s in keep.get("/scripts", headers=auth).json()] != ["late"]:
            assert time.time() < deadline, "a script added during the flood was not loaded"
            time.sleep(0.1)
        refused = 0
        for s in flood[-100:]:  # the last ones came above the cap
            s.settimeout(3)
            try:
                status, headers, body = read_response(s)
            except OSError:
                continue  # closed without an answer: above the cap and its allowance for answers
            assert_json_error(status, headers, body, 503, "temporarily_unavailable")
            refused += 1
        assert refused > 0
    finally:
        for s in flood:
            s.close()
    time.sleep(0.5)
    url = f"http://127.0.0.1:{server.port}/health/live"
    assert [httpx.get(url, timeout=5).status_code for _ in range(20)] == [200] * 20
    assert "Too many open files" not in server.log() and "Traceback" not in server.log()


# --- finding 12: uvicorn's own answers are JSON too ---
@pytest.mark.slow
@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\x01 / HTTP/1.1\r\n\r\n",
    b"GET /health/live HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"POST /token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_requests_get_a_json_400(serve, request_bytes):
    server = serve(**FAST)
    s = connect(server.port)
    s.sendall(request_bytes)
    status, headers, body = read_response(s)
    assert_json_error(status, headers, body, 400, "invalid_request")
    assert headers["connection"] == "close"
    assert closed_by_server(s, timeout=3) is not None


@pytest.mark.slow
@pytest.mark.parametrize("head", [
    b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",  # arrives in one read
    b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200_000 + b"\r\n",  # many reads
    b"GET /health/live?" + b"q" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_oversized_request_heads_get_a_json_431(serve, head):
    server = serve(**FAST)
    s = connect(server.port)
    try:
        s.sendall(head)
    except OSError:
        pass  # cut while sending: the answer is already waiting
    assert_json_error(*read_response(s), 431, "invalid_request")


# --- finding 11: bodies bounded while they are read ---
def _peak_rss_kb(server: Served) -> int:
    return server.status("VmHWM")


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/ssa", "/token"])
def test_a_200_mb_body_is_refused_at_once_and_never_buffered(serve, path):
    server = serve(**FAST)
    auth = server.token()
    for _ in range(3):  # warm: the idle figure includes what serving any request needs
        server.http.post("/ssa", json={"org_id": "warm"}, headers=auth)
    idle = _peak_rss_kb(server)
    size = 200 * MB
    # Content-Length over the limit: 413 before a byte of the body is sent.
    s = connect(server.port)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth['Authorization']}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode())
    s.settimeout(3)
    status, headers, body = read_response(s)
    assert_json_error(status, headers, body, 413, "invalid_request")
    assert headers["connection"] == "close"
    sent = _send_until_cut(s, b"x" * 65536, size)
    assert sent < size, "the server read a refused 200 MB body to its end"
    # Chunked: cut as soon as more than the limit has arrived.
    s = connect(server.port)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth['Authorization']}\r\n"
              "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"x" * 65536
    sent = _send_until_cut(s, b"%x\r\n%s\r\n" % (len(chunk), chunk), size)
    assert sent < size
    s.settimeout(3)
    status, headers, body = read_response(s)
    assert_json_error(status, headers, body, 413, "invalid_request")
    peak = _peak_rss_kb(server)
    assert peak - idle < 16 * 1024, f"peak RSS {peak} kB against {idle} kB idle"
    assert server.http.post("/ssa", json={"org_id": "after"}, headers=auth).status_code == 201
    assert "Traceback" not in server.log()


def _send_until_cut(s: socket.socket, piece: bytes, total: int) -> int:
    """Send ``piece`` until ``total`` bytes went out or the server stops reading (5 s at most)."""
    s.settimeout(0.5)
    sent = 0
    deadline = time.monotonic() + 5
    try:
        while sent < total and time.monotonic() < deadline:
            s.sendall(piece)
            sent += len(piece)
    except OSError:
        pass
    return sent


# --- finding 12: headers on every response ---
def test_the_generic_500_is_no_store_json(api, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api.server.service, "list_ssas", broken)
    r = api.client.get("/ssa", headers=api.auth())
    assert r.status_code == 500 and r.json()["error"] == "server_error"
    assert r.headers["cache-control"] == "no-store" and "a bug" not in r.text


@pytest.mark.parametrize("method,path,allowed", [
    ("PUT", "/ssa", {"GET", "POST", "DELETE"}),
    ("PATCH", "/ssa", {"GET", "POST", "DELETE"}),
    ("GET", "/token", {"POST"}),
    ("DELETE", "/ssa/validation", {"POST"}),
])
def test_405_lists_every_method_of_the_path(api, method, path, allowed):
    r = api.client.request(method, path)
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    assert {m.strip() for m in r.headers["allow"].split(",")} - {"HEAD"} == allowed


# --- finding 12: /token throttling and timing ---
def _token(client: TestClient, cid: str, secret: str):
    return client.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, secret))


def test_failed_client_authentication_is_throttled_per_client_id(make_api):
    now = [1_800_000_000.0]
    api = make_api(clock=lambda: now[0], token_failures_per_client=3, token_failures_per_address=1000,
                   token_failure_window=60)
    cid, secret = api.register(ADMIN)
    for _ in range(5):  # successes do not count
        assert _token(api.client, cid, secret).status_code == 200
    for _ in range(3):
        assert _token(api.client, cid, "wrong").status_code == 401
    for secret_tried in ("wrong", secret):  # refused before the secret is checked, right or wrong
        r = _token(api.client, cid, secret_tried)
        assert r.status_code == 429 and r.json()["error"] == "slow_down"
        assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["cache-control"] == "no-store"
    other, other_secret = api.register(ADMIN)
    assert _token(api.client, other, other_secret).status_code == 200  # another client is not affected
    now[0] += 61
    assert _token(api.client, cid, secret).status_code == 200


def test_failed_client_authentication_is_throttled_per_address(make_api):
    now = [1_800_000_000.0]
    api = make_api(clock=lambda: now[0], token_failures_per_client=1000, token_failures_per_address=5,
                   token_failure_window=30)
    cid, secret = api.register(ADMIN)
    for i in range(5):
        assert _token(api.client, f"guess-{i}", "x").status_code == 401
    r = _token(api.client, cid, secret)  # any id, from that address
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 30
    elsewhere = TestClient(create_app(server=api.server), client=("192.0.2.7", 40000))
    assert _token(elsewhere, cid, secret).status_code == 200
    now[0] += 31
    assert _token(api.client, cid, secret).status_code == 200


def test_behind_a_trusted_proxy_the_address_is_the_forwarded_one(make_api):
    api = make_api(token_failures_per_client=1000, token_failures_per_address=2,
                   trusted_proxies=("10.0.0.0/8",))
    proxy = TestClient(create_app(server=api.server), client=("10.1.2.3", 40000))
    cid, secret = api.register(ADMIN)

    def via(forwarded: str, secret_tried: str):
        return proxy.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, secret_tried),
                          headers={"X-Forwarded-For": forwarded})

    assert via("198.51.100.1", "wrong").status_code == 401
    assert via("198.51.100.1, 10.0.0.9", "wrong").status_code == 401  # the proxy chain is skipped
    assert via("198.51.100.1", secret).status_code == 429
    assert via("198.51.100.2", secret).status_code == 200  # another client behind the same proxy
    # A client cannot hide behind a forged X-Forwarded-For when it is not a trusted proxy itself.
    direct = TestClient(create_app(server=api.server), client=("203.0.113.5", 40000))
    for forged in ("1.1.1.1", "2.2.2.2"):
        direct.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, "wrong"),
                    headers={"X-Forwarded-For": forged})
    assert direct.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, secret),
                       headers={"X-Forwarded-For": "3.3.3.3"}).status_code == 429


def test_throttle_memory_is_bounded():
    from ssa_server.throttle import MAX_TRACKED, FailureThrottle

    throttle = FailureThrottle(limit=3, window=60, clock=lambda: 1000.0)
    for i in range(MAX_TRACKED * 2):
        throttle.failed(f"id-{i}")
    assert len(throttle) == MAX_TRACKED


def test_unknown_and_known_client_ids_compute_one_hash_each(api, monkeypatch):
    import ssa_server.clients as clients

    cid, _ = api.register(ADMIN)
    calls: list[str] = []
    real = clients.hash_secret

    def counting(secret, salt=None):
        calls.append(secret)
        return real(secret, salt)

    monkeypatch.setattr(clients, "hash_secret", counting)
    for client_id in (cid, "no-such-client", ""):
        calls.clear()
        r = api.client.post("/token", data={"grant_type": "client_credentials", "client_id": client_id,
                                            "client_secret": "wrong"})
        assert r.status_code == 401 and calls == ["wrong"], client_id


# --- settings and the missing-httptools refusal ---
def test_edge_settings_defaults_and_errors():
    from ssa_server.settings import SettingsError, load_settings

    s = load_settings({}, {})
    assert (s.http_head_timeout, s.http_body_timeout, s.http_idle_timeout, s.http_max_connections) == \
        (10.0, 30.0, 5.0, 0)
    for env in ({"SSA_HTTP_HEAD_TIMEOUT": "0"}, {"SSA_HTTP_BODY_TIMEOUT": "-1"},
                {"SSA_HTTP_IDLE_TIMEOUT": "0"}, {"SSA_HTTP_MAX_CONNECTIONS": "-1"},
                {"SSA_TRUSTED_PROXIES": "not-an-address"}, {"SSA_TOKEN_FAILURES_PER_CLIENT": "0"},
                {"SSA_TOKEN_FAILURE_WINDOW": "0"}):
        with pytest.raises(SettingsError):
            load_settings({}, env)


def test_the_default_cap_follows_the_file_descriptor_limit():
    from ssa_server.edge import max_connections

    settings = Settings()
    assert max_connections(settings, 1024) < 1024 - 100
    assert max_connections(settings, 1024) >= 512
    assert max_connections(settings, 1_048_576) == max_connections(settings, 10_000_000)  # a memory ceiling
    assert max_connections(settings.replace(http_max_connections=50), 1024) == 50


def test_serve_without_httptools_is_refused_in_one_line(tmp_path):
    code = ("import sys; sys.modules['httptools'] = None\n"
            "from ssa_server.cli import main\n"
            f"sys.exit(main(['serve', '--data-dir', {str(tmp_path / 'd')!r}, '--port', '1']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "ssa-server: configuration error: serve needs httptools (pip install 'uvicorn[standard]'): "
        "its HTTP edge bounds request heads, bodies and connections, uvicorn's h11 fallback cannot"]


def test_every_setting_is_documented():
    from dataclasses import fields
    from pathlib import Path

    from ssa_server.settings import Settings

    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    names = [f.name for f in fields(Settings)]
    assert [n for n in names if f"| `{n}` | `SSA_{n.upper()}` |" not in doc] == []
