"""A full disk, for real: a small tmpfs under a real ``serve`` (root only; CI runs as root).

Creates go on until the disk is full, space is freed, and so on for several cycles; after a
restart every SSA answered 201 is there and nothing else is.  Compaction on a nearly full disk
keeps the keys, clients and templates, so SSAs issued before still verify.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from conftest import ADMIN
from .faultlib import add_garbage, fill, free, free_bytes, run_cli, verify
from test_live_server import jti_of

pytestmark = pytest.mark.slow


def create_until_full(s, H, org: str) -> tuple[list[str], int]:
    """Four clients create until the store refuses; (jtis answered 201, number of 503s)."""
    acknowledged: list[str] = []
    refused = [0]
    lock = threading.Lock()

    def client() -> None:
        import httpx2 as httpx

        with httpx.Client(base_url=f"http://127.0.0.1:{s.port}", timeout=10) as http:
            for _ in range(2000):
                r = http.post("/ssa", json={"org_id": org, "description": "x" * 200}, headers=H)
                with lock:
                    if r.status_code == 201:
                        acknowledged.append(jti_of(r.json()["ssa"]))
                    else:
                        assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable", r.text
                        refused[0] += 1
                    if refused[0] >= 12:
                        return

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return acknowledged, refused[0]


def test_disk_full_cycles_lose_no_acknowledged_ssa_and_recover_without_restart(tmpfs, serve, record_property):
    mount = tmpfs("6m")
    data = mount / "data"
    s = serve(data).start()
    made = json.loads(run_cli(data, "clients", "create", "--scope", ADMIN).stdout)
    H = s.token_for(made)
    filler = fill(mount, leave=96 << 10)
    acknowledged: list[str] = []
    refused, recovery = 0, []
    for cycle in range(5):
        got, no = create_until_full(s, H, "full")
        acknowledged += got
        refused += no
        assert got and no, (len(got), no)
        ready = s.ready()
        assert ready.status_code == 503 and ready.json()["status"] == "DOWN", ready.text
        r = s.http.get("/ssa", params={"jti": got[-1]}, headers=H)  # reads go on while writes cannot
        assert r.status_code == 200 and len(r.json()) == 1
        if cycle >= 3:  # space freed a while after the failure (else right after it: the probe interval)
            time.sleep(1.2)
        free(filler, 128 << 10)
        recovery.append(s.wait_ready())  # by itself, no restart
        r = s.http.post("/ssa", json={"org_id": "full"}, headers=H)
        assert r.status_code == 201, r.text
        acknowledged.append(jti_of(r.json()["ssa"]))
    assert "Traceback" not in s.log()
    s.stop(signal.SIGKILL)
    os.unlink(filler)
    s = serve(data).start()
    H = s.token_for(made)
    present = {i["ssa"]["jti"] for i in s.http.get("/ssa", params={"org_id": "full"}, headers=H).json()}
    record_property("disk_full", {"acknowledged": len(acknowledged), "present": len(present),
                                  "refused": refused, "recovery_s": [round(t, 3) for t in recovery]})
    print(f"\ndisk full x5: {len(acknowledged)} acknowledged, {len(present)} present after restart, "
          f"{refused} refused (503); back UP after freeing space in {[round(t, 3) for t in recovery]} s")
    assert present == set(acknowledged)  # every 201 is there, and no refused create came back
    assert max(recovery) < 3 and max(recovery[3:]) < 1


@pytest.mark.parametrize("room", [16 << 10, 0])
def test_compaction_on_a_nearly_full_disk_keeps_keys_clients_and_templates(tmpfs, serve, room):
    mount = tmpfs("8m")
    data = mount / "data"
    s = serve(data).start()
    made = json.loads(run_cli(data, "clients", "create", "--scope", ADMIN).stdout)
    H = s.token_for(made)
    tokens = [s.http.post("/ssa", json={"org_id": "old", "description": "x" * 400}, headers=H).json()["ssa"]
              for _ in range(60)]
    assert run_cli(data, "ssa", "create", "--org-id", "t", "--save-template", "tpl").returncode == 0
    kids = sorted(k["kid"] for k in s.http.get("/jwks").json()["keys"])
    s.stop()
    add_garbage(data, 1500)  # the next open compacts; the compacted file needs ~40 KiB
    before = (data / "store.jsonl").read_bytes()
    filler = fill(mount, leave=room)

    s = serve(data).start(ready=room > 0)  # no room at all: it serves reads, writes wait for space
    log = s.log()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert len([line for line in log.splitlines() if "WARNING" in line and "compaction" in line]) == 1, log
    assert (data / "store.jsonl").read_bytes() == before and not (data / "store.jsonl.tmp").exists()
    H = s.token_for(made)  # the client is there
    jwks = s.http.get("/jwks").json()
    assert sorted(k["kid"] for k in jwks["keys"]) == kids  # the same keys: nothing was made anew
    assert all(verify(t, jwks)["org_id"] == "old" for t in tokens)  # SSAs issued before still verify
    assert len(s.http.get("/ssa", params={"org_id": "old"}, headers=H).json()) == 60
    assert "tpl" in run_cli(data, "ssa", "templates").stdout
    if room == 0:
        assert s.ready().status_code == 503
        free(filler, 64 << 10)
        assert s.wait_ready() < 3
    assert s.http.post("/ssa", json={"org_id": "new"}, headers=H).status_code == 201
    s.stop()
    os.unlink(filler)
    s = serve(data).start()  # room now: this open compacts
    assert (data / "store.jsonl").stat().st_size < len(before) / 10
    jwks = s.http.get("/jwks").json()
    assert sorted(k["kid"] for k in jwks["keys"]) == kids and all(verify(t, jwks) for t in tokens)
    assert free_bytes(mount) > 0
