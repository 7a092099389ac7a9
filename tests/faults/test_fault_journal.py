"""The journal's tail, identity and length, through real ``serve`` and CLI processes: a torn tail
followed by a CLI write, a journal deleted or replaced while the server runs, a journal shorter
than its published end, and the orderings that must not raise a false alarm."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import pytest

from conftest import ADMIN
from .faultlib import add_garbage, journal_lines, one_line_failure, run_cli, serve_once
from test_live_server import jti_of

pytestmark = pytest.mark.slow


def create(server, H, n: int, org: str = "o") -> list[str]:
    out = []
    for _ in range(n):
        r = server.http.post("/ssa", json={"org_id": org}, headers=H)
        assert r.status_code == 201, r.text
        out.append(jti_of(r.json()["ssa"]))
    return out


def listed(server, H, org: str = "o") -> set[str]:
    r = server.http.get("/ssa", params={"org_id": org}, headers=H)
    assert r.status_code == 200, r.text
    return {item["ssa"]["jti"] for item in r.json()}


def assert_503(r) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "temporarily_unavailable" and "retry-after" in r.headers


def error_lines(server) -> list[str]:
    return [line for line in server.log().splitlines() if " ERROR " in line]


def test_a_torn_tail_then_a_cli_write_then_serve_keeps_every_record(tmp_path, serve):
    data = tmp_path / "data"
    s = serve(data).start()
    H = s.token()
    jtis = create(s, H, 5)
    s.stop(signal.SIGKILL)
    with open(data / "store.jsonl", "ab") as f:  # the last write of a process that died mid-line
        f.write(b'{"w":"x","t":"ssa","id":"7f","doc":{"jti":"7f","org_')
    made = run_cli(data, "clients", "create", "--scope", ADMIN)
    assert made.returncode == 0, made.stderr
    assert "torn" in made.stderr  # the repair is logged
    s = serve(data).start()
    H2 = s.token_for(json.loads(made.stdout))  # the client the CLI wrote after the fragment
    assert listed(s, H2) == set(jtis)


def test_a_journal_deleted_while_serving_stops_writes_and_is_never_recreated(tmp_path, serve):
    data = tmp_path / "data"
    s = serve(data).start()
    made = json.loads(run_cli(data, "clients", "create", "--scope", ADMIN).stdout)
    H = s.token_for(made)
    kept = create(s, H, 3)
    os.unlink(data / "store.jsonl")
    for _ in range(5):
        assert_503(s.http.post("/ssa", json={"org_id": "o"}, headers=H))
    ready = s.ready()
    assert ready.status_code == 503 and ready.json()["status"] == "DOWN"
    (store,) = [c for c in ready.json()["checks"] if c["name"] == "store"]
    assert "deleted" in store["reason"]
    assert listed(s, H) == set(kept)  # reads keep working from memory
    cli = run_cli(data, "clients", "create", "--scope", ADMIN)
    assert "missing" in one_line_failure(cli)
    assert not (data / "store.jsonl").exists()  # the CLI did not make a new, empty journal
    journal_errors = [line for line in error_lines(s) if "store.jsonl" in line]
    assert len(journal_errors) == 1, s.log()
    (copy,) = re.findall(r"\(cp (/proc/\d+/fd/\d+) ", journal_errors[0])  # the advice: copy it back...
    shutil.copyfile(copy, data / "store.jsonl")
    s.stop()
    s = serve(data).start()  # ...and restart: everything acknowledged is there
    H = s.token_for(made)
    assert listed(s, H) == set(kept)
    s.stop()
    os.unlink(data / "store.jsonl")
    line = one_line_failure(serve_once(data))  # missing at start-up: refused with one line
    assert "missing" in line and "--accept-journal-loss" in line


def test_a_journal_replaced_while_serving_stops_writes(tmp_path, serve):
    data = tmp_path / "data"
    s = serve(data).start()
    H = s.token()
    create(s, H, 2)
    (data / "other.jsonl").write_bytes((data / "store.jsonl").read_bytes())
    os.replace(data / "other.jsonl", data / "store.jsonl")  # another file (a restore?) took its place
    assert_503(s.http.post("/ssa", json={"org_id": "o"}, headers=H))
    assert_503(s.http.post("/ssa", json={"org_id": "o"}, headers=H))
    ready = s.ready()
    assert ready.status_code == 503
    (store,) = [c for c in ready.json()["checks"] if c["name"] == "store"]
    assert "replaced" in store["reason"]
    assert len([line for line in error_lines(s) if "store.jsonl" in line]) == 1, s.log()


def test_a_truncated_journal_stops_start_up_until_the_loss_is_accepted(tmp_path, serve):
    data = tmp_path / "data"
    s = serve(data).start()
    made = json.loads(run_cli(data, "clients", "create", "--scope", ADMIN).stdout)
    H = s.token_for(made)
    jtis = create(s, H, 40)
    s.stop()
    lines = journal_lines(data)
    cut = b"".join(lines[:-17])
    (data / "store.jsonl").write_bytes(cut + lines[-17][:30])  # 17 lines gone, the last one cut mid-line
    # (the journal also holds the status-list counter reservations: the SSAs kept are those whose
    # line was kept, whatever else the 17 lines held)
    kept = {e["id"] for e in map(json.loads, lines[:-17]) if e["t"] == "ssa"}
    assert kept < set(jtis) and len(kept) >= 23
    missing = len(b"".join(lines)) - len(cut)

    line = one_line_failure(serve_once(data))
    assert f"{missing} bytes" in line and "--accept-journal-loss" in line, line
    assert one_line_failure(run_cli(data, "clients", "list")) == line

    s = serve(data).start("--accept-journal-loss")
    assert re.search(r"WARNING .*accept", s.log()), s.log()
    H = s.token_for(made)  # (the issuer is http://127.0.0.1:PORT, and each start has a new port)
    assert listed(s, H) == kept
    assert s.http.post("/ssa", json={"org_id": "o"}, headers=H).status_code == 201
    s.stop()
    s = serve(data).start()  # accepted once: the next start is normal
    assert len(listed(s, s.token_for(made))) == len(kept) + 1


def test_no_false_alarm_after_compaction_cli_writes_and_kill_9(tmp_path, serve):
    """Compaction makes the journal shorter and CLI writers publish ends too: none of it is a loss."""
    data = tmp_path / "data"
    s = serve(data).start()
    made = json.loads(run_cli(data, "clients", "create", "--scope", ADMIN).stdout)
    H = s.token_for(made)
    jtis = create(s, H, 5)
    s.stop()
    add_garbage(data, 1500)
    size = (data / "store.jsonl").stat().st_size
    s = serve(data).start()  # compacts at open
    assert (data / "store.jsonl").stat().st_size < size / 10
    H = s.token_for(made)
    assert run_cli(data, "ssa", "create", "--org-id", "o").returncode == 0  # a CLI write beside the server
    jtis += create(s, H, 3)
    s.stop(signal.SIGKILL)
    s = serve(data).start()
    H = s.token_for(made)
    assert len(listed(s, H)) == 9 and set(jtis) <= listed(s, H)
    assert "WARNING" not in s.log() and "ERROR" not in s.log()
