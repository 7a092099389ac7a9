"""The pool never serves a partial or mixed script set (issue 10, findings 2 and 3): a worker is
handed out only with every loaded script in it, a script whose top level fails in a fresh worker
is marked failed pool-wide, and a load is all-or-nothing across workers."""

from __future__ import annotations

import time

import pytest

from tests.test_scripts_http import harness  # noqa: F401  (pytest fixture)

DENY = '''
def create(jwt, context):
    if jwt.claims["org_id"] == "blocked":
        context.deny("access_denied", "this org is blocked")
        return False
    return True
'''
# Loads fine now; its top level loops once the clock reaches T (in a replacement worker).
FLAKY = '''
T = {t}
if now() >= T:
    while True:
        pass
def create(jwt, context):
    jwt.claims["flaky"] = "ran"
    return True
'''
# Hangs for one org: its worker is killed and replaced.
CRASHY = '''
def create(jwt, context):
    if jwt.claims["org_id"] == "crash":
        while True:
            pass
    return True
'''


def a_second_from_now() -> int:
    """A whole second T in the future, with room for a load to finish before it."""
    if time.time() % 1 > 0.6:
        time.sleep(1 - time.time() % 1)
    return int(time.time()) + 1


def wait_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()) + 0.05)


def listing(h) -> dict[str, dict]:
    return {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}


@pytest.mark.parametrize("mode", ["skip", "fail"])
def test_a_script_failing_in_a_replacement_worker_is_marked_failed_and_the_rest_serve(harness, mode):
    t = a_second_from_now()
    h = harness({"1_deny.py": DENY, "2_flaky.py": FLAKY.format(t=t), "3_crashy.py": CRASHY},
                on_script_error=mode, script_timeout=0.5, script_cpu=0.3)
    assert h.create(org_id="blocked").status_code == 403
    assert h.claims(h.create(org_id="ok"))["flaky"] == "ran"
    wait_until(t)
    # The worker is replaced: 2_flaky's top level now loops.  (This request may also wait past
    # the timeout for the replacement: then it is refused with a 503.)
    crashed = h.create(org_id="crash")
    assert crashed.status_code in ((201, 503) if mode == "skip" else (502, 503)), crashed.text
    h.wait_for(lambda: h.create(org_id="probe").status_code != 503, timeout=15)  # the replacement is ready
    for _ in range(3):
        assert h.create(org_id="blocked").status_code == 403  # the deny policy still runs
        r = h.create(org_id="ok")
        if mode == "skip":
            assert r.status_code == 201, r.text
            assert "flaky" not in h.claims(r)  # skipped
        else:
            assert r.status_code == 502, r.text  # fail closed, naming the failed script
            assert "2_flaky" in r.json()["error_description"], r.text
    assert listing(h)["1_deny"]["failures"] == 0
    entry = listing(h)["2_flaky"]
    assert entry["state"] == "failed" and "replacement worker" in entry["last_error"], entry
    assert listing(h)["1_deny"]["state"] == "loaded" and listing(h)["3_crashy"]["state"] == "loaded"
    h.write("2_flaky.py", FLAKY.format(t=t + 3600))  # a new revision loads: it serves again
    h.wait_for(lambda: listing(h)["2_flaky"]["state"] == "loaded")
    assert h.claims(h.create(org_id="ok"))["flaky"] == "ran"


TAGGED = 'TAG = "{tag}"\ndef create(jwt, context):\n    jwt.claims["tag"] = TAG\n    return True\n'
# Its top level succeeds in the first worker that loads it (which waits for T) and raises in
# the next one (loaded after T).
LATE = 'T = {t}\nif now() >= T:\n    raise ValueError("too late")\nwhile now() < T:\n    pass\n' + TAGGED


def tags_in_each_worker(h, name: str) -> list[str]:
    pool = h.server.scripts.pool
    payload = {"header": {"alg": "RS256", "kid": "k"}, "claims": {"jti": "j", "iss": "i", "iat": 1}}
    job = {"names": [name], "hook": "create", "context": {}, "payload": payload}
    message = {"op": "batch", "jobs": [job]}
    workers = list(pool._idle)
    assert len(workers) == 2
    out = []
    for worker in workers:
        answer = worker.request(message, 5.0)["answers"][0]["steps"][0]  # a call: a batch of one chain of one
        out.append(answer["ok"]["claims"]["tag"] if "ok" in answer else answer["error"]["message"])
    return out


def test_a_revision_refused_by_one_worker_is_refused_by_all(harness):
    h = harness({"tag.py": TAGGED.format(tag="v1")}, script_workers=2, script_cpu=2.0,
                script_reload_interval=60)
    assert tags_in_each_worker(h, "tag") == ["v1", "v1"]
    h.write("tag.py", LATE.format(t=a_second_from_now(), tag="v2"))
    h.server.scripts.reload()
    entry = listing(h)["tag"]
    assert entry["state"] == "stale" and "line 3: top level raised ValueError" in entry["last_error"], entry
    assert tags_in_each_worker(h, "tag") == ["v1", "v1"]  # the previous revision everywhere
    assert h.claims(h.create())["tag"] == "v1"


def test_a_new_script_refused_by_one_worker_is_loaded_nowhere(harness):
    h = harness({"tag.py": TAGGED.format(tag="v1")}, script_workers=2, script_cpu=2.0,
                script_reload_interval=60)
    h.write("late.py", LATE.format(t=a_second_from_now(), tag="new"))
    h.server.scripts.reload()
    assert listing(h)["late"]["state"] == "error"
    assert all("not loaded" in answer for answer in tags_in_each_worker(h, "late"))
    assert "tag" in h.claims(h.create()) and h.claims(h.create())["tag"] == "v1"


def test_a_script_is_marked_failed_while_a_reload_waits_for_the_replacement(harness):
    """The replacement marks 1_flaky failed while the folder watcher's reload of a new script
    waits for that very worker: the host learns it without the reload's lock, nothing
    deadlocks, and both end in their states."""
    t = a_second_from_now()
    h = harness({"1_flaky.py": FLAKY.format(t=t), "2_crashy.py": CRASHY}, script_timeout=0.5, script_cpu=0.3,
                script_reload_interval=0.1)
    wait_until(t)
    assert h.create(org_id="crash").status_code in (502, 503)  # the worker is lost: its replacement starts
    h.write("3_new.py", TAGGED.format(tag="new"))  # the watcher's reload now waits for the replacement

    def settled() -> bool:
        states = {name: entry["state"] for name, entry in listing(h).items()}
        return states.get("1_flaky") == "failed" and states.get("3_new") == "loaded"

    h.wait_for(settled, timeout=15)
    h.wait_for(lambda: h.create(org_id="probe").status_code != 503, timeout=15)
    r = h.create(org_id="ok")
    assert r.status_code == 502 and "1_flaky" in r.json()["error_description"], r.text  # fail closed
