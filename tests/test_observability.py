"""GET /metrics and the JSON logs with request ids (issue 15), through real ``serve`` processes:
one process on the embedded store, and ``--workers 2`` on PostgreSQL (figures summed over the
workers, on the main port and on a ``metrics_port``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN, DEVELOPER
from faults.served import Served
from ports import free_port
from test_live_server import jti_of

pytestmark = pytest.mark.slow

TAG = 'def create(jwt, context):\n    jwt.claims["tagged"] = True\n    return True\n'
FAIL_ON_REVOKE = 'def revoke(ssa_list, context):\n    raise ValueError("boom")\n'


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def label_values(found: dict) -> set[str]:
    return {v for (_, labels) in found for _, v in labels}


def client(served: Served, *scopes: str) -> tuple[str, str]:
    args = [a for s in scopes for a in ("--scope", s)]
    made = subprocess.run([sys.executable, "-m", "ssa_server", "clients", "create", *args,
                           "--data-dir", str(served.data)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **served.env))
    assert made.returncode == 0, made.stderr
    body = json.loads(made.stdout)
    return body["client_id"], body["client_secret"]


def private_members(data_dir: Path) -> set[str]:
    """The private JWK members (RSA d/p/q/dp/dq/qi, the token key's k) of every stored key."""
    found = set()
    for path in data_dir.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            found |= set(re.findall(r'"(?:d|p|q|dp|dq|qi|k)":\s*"([A-Za-z0-9_-]{16,})"', text))
    return found


@pytest.fixture
def served(tmp_path):
    started: list[Served] = []

    def start(*args: str, **env: str) -> Served:
        s = Served(tmp_path / f"s{len(started)}", *args, **env)
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.kill()


def test_metrics_and_json_logs_after_traffic(served, tmp_path):
    scripts = tmp_path / "s0" / "scripts"
    scripts.mkdir(parents=True)
    (scripts / "a_tag.py").write_text(TAG)
    (scripts / "b_fail.py").write_text(FAIL_ON_REVOKE)
    s = served(SSA_LOG_FORMAT="json", SSA_ACCESS_LOG="true")
    cid, secret = client(s, ADMIN)
    http = s.http
    wrong = http.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, "wrong"))
    assert wrong.status_code == 401
    r = http.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, secret))
    access_token = r.json()["access_token"]
    H = {"Authorization": f"Bearer {access_token}"}
    created = []
    for i in range(2):
        r = http.post("/ssa", json={"org_id": f"org-{i}", "one_time_use": False}, headers=H)
        assert r.status_code == 201, r.text
        created.append(r.json()["ssa"])
    jtis = [jti_of(t) for t in created]
    r = http.post("/ssa/validation", headers={"jti": jtis[0], "X-Request-ID": "trace-42.a:b"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42.a:b"
    assert http.post("/ssa/validation", headers={"jti": "no-such-jti"}).status_code == 400
    jwt_answer = http.get("/ssa/jwt", params={"jti": jtis[0]}, headers=H).json()["ssa"]
    assert http.get("/scripts/a_tag/logs", headers=H).status_code == 200
    revoked = http.delete("/ssa", params={"jti": jtis[1]}, headers={**H, "X-Request-ID": "x" * 65})
    assert revoked.status_code == 200
    made_id = revoked.headers["x-request-id"]
    assert made_id != "x" * 65 and re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", made_id)  # too long: a new one
    assert http.get("/no/such/path").status_code == 404

    assert http.get("/metrics").status_code == 401  # admin token on the main port
    dev_id, dev_secret = client(s, DEVELOPER)
    dev = http.post("/token", data={"grant_type": "client_credentials"}, auth=(dev_id, dev_secret)).json()
    assert http.get("/metrics", headers={"Authorization": f"Bearer {dev['access_token']}"}).status_code == 401
    r = http.get("/metrics", headers=H)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert r.headers["cache-control"] == "no-store"
    found = samples(r.text)

    duration = "http_server_request_duration_seconds_count"
    assert value(found, duration, method="POST", route="/ssa", status="201") == 2
    assert value(found, duration, method="POST", route="/token", status="401") == 1
    assert value(found, duration, method="POST", route="/ssa/validation", status="400") == 1
    assert value(found, duration, method="GET", route="/scripts/{name}/logs", status="200") == 1
    assert value(found, duration, method="GET", route="unmatched", status="404") == 1
    assert value(found, "ssa_issued_total", alg="RS256") == 2
    assert value(found, "ssa_revoked_total") == 1
    assert value(found, "ssa_validations_total", outcome="valid") == 1
    assert value(found, "ssa_validations_total", outcome="invalid") == 1
    assert value(found, "ssa_active") == 1
    # two creates, one GET /ssa/jwt
    assert value(found, "ssa_signing_duration_seconds_count", alg="RS256") == 3
    assert value(found, "ssa_store_operation_duration_seconds_count", op="add_ssa", backend="tinydb") == 2
    assert value(found, "ssa_store_operation_duration_seconds_count", op="mark_used", backend="tinydb") == 2
    assert value(found, "ssa_script_runs_total", script="a_tag", hook="create", outcome="ok") == 2
    assert value(found, "ssa_script_runs_total", script="b_fail", hook="revoke", outcome="failed") == 1
    assert value(found, "ssa_script_duration_seconds_count", hook="create") == 2
    assert value(found, "ssa_keys", state="active") == 1
    assert value(found, "ssa_keys", state="next") == 0
    assert 0 <= value(found, "ssa_key_age_seconds") < 600
    assert value(found, "ssa_token_requests_total", outcome="issued") == 2
    assert value(found, "ssa_token_requests_total", outcome="invalid_client") == 1
    # No jti, org_id, client_id or raw path is a label value.
    labels = label_values(found)
    for never in [*jtis, "org-0", "org-1", "no-such-jti", cid, dev_id, "/scripts/a_tag/logs",
                  "/no/such/path"]:
        assert never not in labels

    # The log: JSON lines; the request lines carry id, route, status, duration and client_id.
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(timeout=30)
    text = s.log()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message", "request_id"} <= line.keys()
                         for line in lines)
    requests = [line for line in lines if line["logger"] == "ssa_server.access"]
    traced = [line for line in requests if line["request_id"] == "trace-42.a:b"]
    assert len(traced) == 1 and traced[0]["route"] == "/ssa/validation" and traced[0]["status"] == 200
    creates = [line for line in requests if line["route"] == "/ssa" and line["status"] == 201]
    assert len(creates) == 2 and all(line["client_id"] == cid and line["duration_ms"] > 0 for line in creates)
    failure = [line for line in lines if "b_fail" in line["message"] and "revoke failed" in line["message"]]
    assert failure and failure[0]["request_id"] == made_id  # the script failure names its request
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's lines are JSON too
    # Never a token, a secret, an SSA or a private key member.
    for never in [access_token, secret, dev_secret, dev["access_token"], *created, jwt_answer,
                  *private_members(s.data)]:
        assert never not in text
    assert private_members(s.data), "the check above found no private key to look for"


def test_text_logs_carry_the_request_id(served):
    s = served(SSA_ACCESS_LOG="true")
    r = s.http.get("/health/live", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(timeout=30)
    assert re.search(r"INFO ssa_server.access GET /health/live 200 request_id=abc-123$", s.log(), re.M)


@pytest.fixture
def pg_nodes(pg_url, tmp_path):
    from conftest import truncate

    truncate(pg_url)
    started: list[subprocess.Popen] = []

    def start(*args: str, **env: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "ssa_server", "serve", "--port", str(port), "--workers", "2",
             "--scripts-dir", str(tmp_path / "no-scripts"), "--data-dir", str(tmp_path / f"unused{port}"),
             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env=dict(os.environ, SSA_STORE_URL=pg_url, SSA_ISSUER="https://ssa.example.test", **env))
        started.append(proc)
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200:
                    return proc, port
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "node did not become ready"
            time.sleep(0.1)

    yield start
    for proc in started:  # SIGTERM: the parent removes its run's metrics directory
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p))
    return out


def _metrics_dir(pid: int) -> Path:
    for child in _children(pid):
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        for item in env:
            if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                return Path(item.split(b"=", 1)[1].decode())
    raise AssertionError("no worker with a metrics directory")


def _scraped(url: str, headers: dict[str, str] | None = None, **want: float) -> dict:
    """A scrape in which every ``want`` (metric name -> value, labels after ``|``) holds: a
    worker's figures reach the others' scrapes within a second (metrics.FLUSH_INTERVAL)."""
    deadline = time.time() + 10
    while True:
        found = samples(httpx.get(url, headers=headers, timeout=10).text)
        seen = {}
        for key in want:
            name, _, labels = key.partition("|")
            seen[key] = value(found, name, **dict(p.split("=") for p in labels.split(",") if p))
        if all(seen[k] == v for k, v in want.items()):
            return found
        assert time.time() < deadline, seen
        time.sleep(0.2)


def _validate_many(port: int, jti: str, count: int) -> None:
    """``count`` validations from 8 threads, each on a new connection (spread over the workers)."""
    def run(n: int) -> None:
        for _ in range(n):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
                assert http.post("/ssa/validation", headers={"jti": jti}).status_code == 200

    threads = [threading.Thread(target=run, args=(count // 8,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_workers_figures_are_summed_on_both_ports(pg_nodes, pg_url):
    metrics_port = free_port()
    proc, port = pg_nodes(SSA_METRICS_PORT=str(metrics_port))
    made = subprocess.run([sys.executable, "-m", "ssa_server", "clients", "create", "--scope", ADMIN],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SSA_STORE_URL=pg_url))
    body = json.loads(made.stdout)
    token = httpx.post(f"http://127.0.0.1:{port}/token", data={"grant_type": "client_credentials"},
                       auth=(body["client_id"], body["client_secret"])).json()["access_token"]
    H = {"Authorization": f"Bearer {token}"}
    jti = jti_of(httpx.post(f"http://127.0.0.1:{port}/ssa", json={"org_id": "w", "one_time_use": False},
                            headers=H).json()["ssa"])
    _validate_many(port, jti, 32)
    folder = _metrics_dir(proc.pid)
    writers = {int(m.group(1)) for f in folder.iterdir() if (m := re.search(r"_(\d+)\.db$", f.name))}
    assert len(writers) == 2  # both workers write their figures there
    # The metrics port: the parent (which serves no request) answers, open, with every worker's sum.
    _scraped(f"http://127.0.0.1:{metrics_port}/metrics", **{
        "ssa_validations_total|outcome=valid": 32, "ssa_issued_total|alg=RS256": 1,
        "http_server_request_duration_seconds_count|method=POST,route=/ssa/validation,status=200": 32})
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", headers=H).status_code == 404  # not on the main port
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    assert not folder.exists()  # the run's directory is removed with it

    # Without metrics_port: whichever worker answers GET /metrics shows the sum.
    proc, port = pg_nodes()
    jti = jti_of(httpx.post(f"http://127.0.0.1:{port}/ssa", json={"org_id": "w", "one_time_use": False},
                            headers=H).json()["ssa"])
    _validate_many(port, jti, 32)
    _scraped(f"http://127.0.0.1:{port}/metrics", H, **{"ssa_validations_total|outcome=valid": 32})
    for _ in range(6):  # new connections: either worker answers, with both workers' figures
        found = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", headers=H, timeout=10).text)
        assert value(found, "ssa_validations_total", outcome="valid") == 32
        assert value(found, "ssa_active") == 2  # the store's figure, not a worker's
