"""Per-script logs and figures: a bounded ring per script of its log lines and failures (after the
rate limit), GET /scripts/{name}/logs (admin, ?since= cursor), `scripts logs` over HTTP, and
GET /scripts' failures by kind and p99."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_live_server import Live
from test_scripts_http import Harness

CHATTY = '''
def create(jwt, context):
    org = jwt.claims.get("org_id", "")
    context.log("org " + org)
    print("printed for", org)
    if org == "boom":
        raise ValueError("no boom orgs")
'''


def started(tmp_path, **settings) -> Harness:
    h = Harness(tmp_path, **settings)
    h.write("chatty.py", CHATTY)
    return h.start()


def logs(h: Harness, name: str = "chatty", query: str = ""):
    return h.client.get(f"/scripts/{name}/logs{query}", headers=h.auth)


def test_lines_and_failures_in_order_with_a_cursor(tmp_path):
    h = started(tmp_path, on_script_error="skip")
    try:
        assert h.create(org_id="acme").status_code == 201
        assert h.create(org_id="boom").status_code == 201  # skip mode: the failure is logged, not refused
        r = logs(h)
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        body = r.json()
        kinds = [(e["kind"], e["line"]) for e in body["lines"]]
        assert kinds[:2] == [("log", "org acme"), ("log", "printed for acme")]
        assert kinds[-1][0] == "failure" and "no boom orgs" in kinds[-1][1] and "create" in kinds[-1][1]
        assert all(e["revision"] for e in body["lines"])
        seqs = [e["seq"] for e in body["lines"]]
        assert seqs == sorted(seqs) and body["next"] == seqs[-1]
        assert logs(h, query=f"?since={body['next']}").json()["lines"] == []
        assert h.create(org_id="later").status_code == 201
        newer = logs(h, query=f"?since={body['next']}").json()["lines"]
        assert [e["line"] for e in newer] == ["org later", "printed for later"]
        listed = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
        assert listed["chatty"]["failures_by_kind"] == {"exception": 1}
        assert listed["chatty"]["p99_ms"] >= listed["chatty"]["p50_ms"] > 0
    finally:
        h.client.__exit__(None, None, None)


def test_the_ring_is_bounded(tmp_path):
    h = started(tmp_path, script_log_buffer=5)
    try:
        for i in range(6):
            assert h.create(org_id=f"o{i}").status_code == 201
        lines = logs(h).json()["lines"]
        assert len(lines) == 5 and lines[-1]["line"] == "printed for o5"
    finally:
        h.client.__exit__(None, None, None)


@pytest.mark.parametrize("query", ["?since=abc", "?since=-1", "?since=99999999999999999999999",
                                   "?since=1&since=2", "?limit=0", "?limit=100000"])
def test_bad_cursors_are_400(tmp_path, query):
    h = started(tmp_path)
    try:
        r = logs(h, query=query)
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text
    finally:
        h.client.__exit__(None, None, None)


def test_unknown_script_is_404_and_the_token_is_required(tmp_path):
    h = started(tmp_path)
    try:
        r = logs(h, name="nope")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        long = logs(h, name="x" * 5000)
        assert long.status_code in (404, 414, 431), long.text
        r = h.client.get("/scripts/chatty/logs")
        assert r.status_code == 401 and "error" in r.json()
    finally:
        h.client.__exit__(None, None, None)


@pytest.mark.slow
def test_cli_scripts_logs_over_http(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "chatty.py").write_text(CHATTY)
    live = Live(tmp_path).start()
    try:
        auth = live.client_token()
        assert live.http.post("/ssa", json={"org_id": "acme"}, headers=auth).status_code == 201
        token = auth["Authorization"].split(" ", 1)[1]
        base = ["--url", f"http://127.0.0.1:{live.port}", "--token", token]
        done = subprocess.run([sys.executable, "-m", "ssa_server", "scripts", "logs", "chatty", *base],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        lines = [json.loads(x) for x in done.stdout.splitlines()]
        assert [x["line"] for x in lines] == ["org acme", "printed for acme"]
        assert all(x["script"] == "chatty" for x in lines)
        follow = subprocess.Popen([sys.executable, "-m", "ssa_server", "scripts", "logs", *base, "--follow",
                                   "--interval", "0.2"], stdout=subprocess.PIPE, text=True)
        try:
            assert json.loads(follow.stdout.readline())["line"] == "org acme"
            assert json.loads(follow.stdout.readline())["line"] == "printed for acme"
            assert live.http.post("/ssa", json={"org_id": "next"}, headers=auth).status_code == 201
            assert json.loads(follow.stdout.readline())["line"] == "org next"
        finally:
            follow.kill()
            follow.wait(timeout=10)
        bad = subprocess.run([sys.executable, "-m", "ssa_server", "scripts", "logs", "chatty", "--url",
                              f"http://127.0.0.1:{live.port}", "--token", "wrong"],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "401" in bad.stderr
        assert "wrong" not in bad.stderr
    finally:
        live.kill()
