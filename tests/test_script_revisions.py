"""Script revisions and rollback (issue 13): the last N revisions of each script kept in the store
(both stores, export/import), ``scripts history`` / ``scripts rollback`` through the CLI, a bad deploy
rolled back on a real server, GET /scripts/{name}/revisions."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import truncate
from faults.served import Served

GOOD = 'def create(jwt, context):\n    jwt.claims["tier"] = context.config.get("tier", "none")\n'
GOOD_TOML = 'tier = "gold"\n[secrets]\ncrm = "env:REV_TEST_SECRET"\n'
SECRET_VALUE = "s3cr3t-value-never-stored-9f1c"
BAD = "def create(jwt, context)\n    return None\n"  # a syntax error: refused, the old one serves


def record(name: str, revision: str, seen_at: float, state: str = "loaded", reason: str | None = None,
           source: str = "x = 1\n", config: str | None = None) -> dict:
    return {"id": f"{name}@{revision}", "name": name, "revision": revision, "seen_at": seen_at,
            "state": state, "reason": reason, "source": source, "config": config, "seen_by": "test"}


def open_test_store(store_kind: str, tmp_path: Path, request) -> object:
    from ssa_server.settings import Settings
    from ssa_server.store.backends import open_store

    if store_kind == "tinydb":
        return open_store(Settings(data_dir=tmp_path / "data"), exclusive=False)
    url = request.getfixturevalue("pg_url")
    truncate(url)
    return open_store(Settings(store_url=url), exclusive=False)


@pytest.mark.parametrize("store_kind", ["tinydb", "postgresql"])
def test_store_keeps_the_last_n_once_each_newest_first(store_kind, tmp_path, request):
    store = open_test_store(store_kind, tmp_path, request)

    async def run() -> None:
        await store.open()
        try:
            assert await store.put_script_revision(record("a", "r1", 1.0), keep=3) is True
            # Seen twice: recorded once.
            assert await store.put_script_revision(record("a", "r1", 5.0), keep=3) is False
            assert await store.put_script_revision(record("a", "r1", 6.0, "failed", "top level"),
                                                   keep=3) is False  # a state change: same revision
            kept = await store.list_script_revisions("a")
            assert [(r["revision"], r["seen_at"], r["state"], r["reason"]) for r in kept] == [
                ("r1", 1.0, "failed", "top level")]
            for i in range(2, 7):
                await store.put_script_revision(record("a", f"r{i}", float(i)), keep=3)
            await store.put_script_revision(record("b", "q1", 2.5), keep=3)
            assert [r["revision"] for r in await store.list_script_revisions("a")] == ["r6", "r5", "r4"]
            assert [r["revision"] for r in await store.list_script_revisions("b")] == ["q1"]
            assert await store.list_script_revisions("nope") == []
            assert len(await store.list_script_revisions()) == 4
            got = await store.get_script_revision("a@r5")
            assert got is not None and got["source"] == "x = 1\n" and got["config"] is None
        finally:
            await store.close()

    asyncio.run(run())


@pytest.mark.parametrize("store_kind", ["tinydb", "postgresql"])
def test_export_and_import_carry_revisions(store_kind, tmp_path, request):
    from ssa_server.store.transfer import counts, export_records, import_records, parse_lines

    store = open_test_store(store_kind, tmp_path, request)

    async def run() -> None:
        await store.open()
        try:
            await store.put_script_revision(record("a", "r1", 1.0, config='tier = "x"\n'), keep=20)
            await store.put_script_revision(record("a", "r2", 2.0, "refused", "line 1: SyntaxError"), keep=20)
            lines = [line.decode() for line in await export_records(store)]
            assert sum('"script_revisions"' in line for line in lines) == 2
            tables = parse_lines(lines)
            # Into the same store: both are there already (skipped); into a fresh one: imported.
            report = await import_records(store, tables, int(time.time()))
            assert report["script_revisions"] == {"read": 2, "imported": 0, "skipped": 2}
        finally:
            await store.close()
        from ssa_server.settings import Settings
        from ssa_server.store.backends import open_store

        fresh = open_store(Settings(data_dir=tmp_path / "fresh"), exclusive=False)
        await fresh.open()
        try:
            report = await import_records(fresh, tables, int(time.time()))
            assert report["script_revisions"] == {"read": 2, "imported": 2, "skipped": 0}
            assert (await counts(fresh))["script_revisions"] == 2
            assert [r["revision"] for r in await fresh.list_script_revisions("a")] == ["r2", "r1"]
            assert (await fresh.get_script_revision("a@r1"))["config"] == 'tier = "x"\n'
        finally:
            await fresh.close()

    asyncio.run(run())


def test_import_refuses_a_revision_that_is_not_text(tmp_path):
    from ssa_server.store.transfer import TransferError, parse_lines

    for bad in (dict(record("a", "r1", 1.0), source=["not", "text"]), dict(record("a", "r1", 1.0), state="x"),
                dict(record("a", "r1", 1.0), id="b@r1"), dict(record("a", "r1", 1.0), source="x" * 300_000)):
        with pytest.raises(TransferError, match="line 1"):
            parse_lines([json.dumps({"table": "script_revisions", "record": bad})])


# --- the CLI and a real server ---
def run_cli(served: Served, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ssa_server", *args, "--data-dir", str(served.data)],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, **served.env))


def write(folder: Path, name: str, text: str) -> None:
    tmp = folder / f".{name}.tmp"
    tmp.write_text(text)
    tmp.replace(folder / name)


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


def listed(served: Served, auth: dict[str, str]) -> dict:
    return {s["name"]: s for s in served.http.get("/scripts", headers=auth).json()}


def history(served: Served, name: str) -> list[dict]:
    r = run_cli(served, "scripts", "history", name)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def served(tmp_path):
    made: list[Served] = []

    def start(sub: str = "node", **env: str) -> Served:
        s = Served(tmp_path / sub, **{"SSA_SCRIPT_RELOAD_INTERVAL": "0.2", "SSA_SCRIPT_WORKERS": "1",
                                      "REV_TEST_SECRET": SECRET_VALUE, **env})
        s.scripts.mkdir(parents=True, exist_ok=True)
        made.append(s)
        return s

    yield start
    for s in made:
        s.kill()


@pytest.mark.slow
def test_a_bad_deploy_rolled_back_on_a_live_server(served):
    s = served()
    write(s.scripts, "tiers.toml", GOOD_TOML)
    write(s.scripts, "tiers.py", GOOD)
    s.start()
    auth = s.token()
    good = wait_for(lambda: listed(s, auth).get("tiers", {}).get("revision"))
    write(s.scripts, "tiers.py", BAD)  # the bad deploy: refused, the good revision keeps serving
    wait_for(lambda: listed(s, auth)["tiers"]["state"] == "stale")
    revisions = wait_for(lambda: (h := history(s, "tiers")) and len(h) == 2 and h)
    bad, first = revisions
    assert first["revision"] == good and first["state"] == "loaded" and first["reason"] is None
    assert bad["state"] == "refused" and "SyntaxError" in bad["reason"] and bad["revision"] != good
    assert bad["seen_at"] >= first["seen_at"] and "seen_by" in bad and "source" not in bad
    # The same through HTTP (admin), and a secret's value is nowhere in what the store holds.
    r = s.http.get("/scripts/tiers/revisions", headers=auth)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert r.json() == {"name": "tiers", "revisions": revisions}
    exported = run_cli(s, "store", "export").stdout
    assert "env:REV_TEST_SECRET" in exported and SECRET_VALUE not in exported

    rolled = run_cli(s, "scripts", "rollback", "tiers", "--scripts-dir", str(s.scripts))
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout) == {"name": "tiers", "revision": good,
                                         "files": ["tiers.py", "tiers.toml"]}
    assert (s.scripts / "tiers.py").read_text() == GOOD
    assert (s.scripts / "tiers.toml").read_text() == GOOD_TOML
    assert not [p for p in s.scripts.iterdir() if p.name.startswith(".")]  # no temp file left
    started = time.time()
    wait_for(lambda: listed(s, auth)["tiers"]["state"] == "loaded", timeout=5)
    assert time.time() - started < 2  # within a few reload intervals (0.2 s)
    assert listed(s, auth)["tiers"]["revision"] == good
    created = s.http.post("/ssa", json={"org_id": "o"}, headers=auth)
    assert created.status_code == 201, created.text
    assert [h["revision"] for h in history(s, "tiers")] == [bad["revision"], good]  # seen again: no new one


@pytest.mark.slow
def test_rollback_to_a_named_revision_removes_a_toml_it_had_not(served):
    s = served()
    write(s.scripts, "tiers.py", GOOD)  # revision 1: no NAME.toml
    s.start()
    auth = s.token()
    first = wait_for(lambda: listed(s, auth).get("tiers", {}).get("revision"))
    write(s.scripts, "tiers.toml", GOOD_TOML)  # revision 2: the same source with a config
    second = wait_for(lambda: (r := listed(s, auth)["tiers"]["revision"]) != first and r)
    wait_for(lambda: len(history(s, "tiers")) == 2)
    rolled = run_cli(s, "scripts", "rollback", "tiers", first, "--scripts-dir", str(s.scripts))
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout)["files"] == ["tiers.py"]
    assert not (s.scripts / "tiers.toml").exists()
    wait_for(lambda: listed(s, auth)["tiers"]["revision"] == first, timeout=5)
    # The default target is the newest loaded revision that is not the one in the folder now.
    rolled = run_cli(s, "scripts", "rollback", "tiers", "--scripts-dir", str(s.scripts))
    assert rolled.returncode == 0 and json.loads(rolled.stdout)["revision"] == second
    wait_for(lambda: listed(s, auth)["tiers"]["revision"] == second, timeout=5)


@pytest.mark.slow
def test_history_and_rollback_fail_with_one_clear_line(served, tmp_path):
    s = served()
    write(s.scripts, "tiers.py", GOOD)
    s.start()
    auth = s.token()
    wait_for(lambda: listed(s, auth).get("tiers", {}).get("revision"))
    wait_for(lambda: history(s, "tiers"))
    cases = [
        (("scripts", "history", "nosuch"), "no revisions of a script named 'nosuch'"),
        (("scripts", "rollback", "nosuch", "--scripts-dir", str(s.scripts)),
         "no revisions of a script named 'nosuch'"),
        (("scripts", "rollback", "tiers", "0123456789ab", "--scripts-dir", str(s.scripts)),
         "tiers has no revision 0123456789ab"),
        (("scripts", "rollback", "tiers", "--scripts-dir", str(s.scripts)),
         "tiers has no loaded revision other than the one in the folder"),
        (("scripts", "rollback", "../etc", "--scripts-dir", str(s.scripts)), "not a script name"),
    ]
    for args, message in cases:
        r = run_cli(s, *args)
        assert r.returncode == 1 and r.stdout == "", (args, r)
        assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    # A symlinked target is refused, and nothing it points at is written.
    outside = tmp_path / "outside.py"
    outside.write_text("kept = True\n")
    (s.scripts / "tiers.py").unlink()
    (s.scripts / "tiers.py").symlink_to(outside)
    revision = history(s, "tiers")[0]["revision"]
    r = run_cli(s, "scripts", "rollback", "tiers", revision, "--scripts-dir", str(s.scripts))
    assert r.returncode == 1 and "tiers.py is a symlink" in r.stderr and r.stderr.count("\n") == 1
    assert outside.read_text() == "kept = True\n"
    # HTTP: unknown script 404, no token 401, an odd name 404 (never a 500).
    assert s.http.get("/scripts/nosuch/revisions", headers=auth).status_code == 404
    assert s.http.get("/scripts/tiers/revisions").status_code == 401
    for odd in ("%00", "a" * 5000, "..%2F..", "%F0%9F%92%A9"):
        r = s.http.get(f"/scripts/{odd}/revisions", headers=auth)
        assert r.status_code == 404 and r.json()["error"], (odd, r.text)


@pytest.mark.slow
def test_rollback_into_a_read_only_folder_fails_clearly(served, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only tmpfs")
    s = served()
    write(s.scripts, "tiers.py", GOOD)
    s.start()
    auth = s.token()
    first = wait_for(lambda: listed(s, auth).get("tiers", {}).get("revision"))
    wait_for(lambda: history(s, "tiers"))
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        r = run_cli(s, "scripts", "rollback", "tiers", first, "--scripts-dir", str(ro))
        assert r.returncode == 1 and "cannot write" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.slow
def test_two_nodes_on_postgresql_record_a_revision_once(served, pg_url):
    truncate(pg_url)
    env = {"SSA_STORE_URL": pg_url, "SSA_ISSUER": "https://ssa.example.test"}
    a = served("a", **env)
    b = served("b", **env)
    b.scripts.rmdir()
    b.scripts.symlink_to(a.scripts)  # one folder (a shared volume), two nodes
    write(a.scripts, "tiers.py", GOOD)
    a.start()
    b.start()
    auth = a.token()
    revision = wait_for(lambda: listed(a, auth).get("tiers", {}).get("revision"))
    assert wait_for(lambda: listed(b, auth).get("tiers", {}).get("revision")) == revision
    time.sleep(1.0)  # both watchers have reported it
    import psycopg

    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT name, doc->>'revision' FROM script_revisions").fetchall()
    assert rows == [("tiers", revision)]
    r = b.http.get("/scripts/tiers/revisions", headers=auth)
    assert r.status_code == 200 and [x["revision"] for x in r.json()["revisions"]] == [revision]


def test_the_reload_thread_never_waits_for_the_store(tmp_path):
    """ScriptHost only queues what it saw (bounded); the server writes it on its loop."""
    from ssa_server.plugins.scripts import ScriptHost
    from ssa_server.plugins.sandbox import SandboxLimits

    folder = tmp_path / "scripts"
    folder.mkdir()
    write(folder, "tiers.py", BAD)
    host = ScriptHost(folder, limits=SandboxLimits(), workers=1, revisions_kept=2)
    host.start(watch=False)
    try:
        seen = host.take_revisions()
        assert [(r["name"], r["state"]) for r in seen] == [("tiers", "refused")]
        assert seen[0]["source"] == BAD and seen[0]["config"] is None
        assert host.take_revisions() == []
        for i in range(2000):  # nobody drains: the queue stays bounded
            host._revision_seen("tiers", f"{i:012x}", BAD, None, "refused", "x")
        assert len(host.take_revisions()) <= 1000
    finally:
        host.stop()


def test_a_secret_value_written_into_the_files_is_kept_as_its_name(tmp_path, monkeypatch):
    """The NAME.toml text holds references; a resolved value never lands in a revision, even one
    pasted into the files literally."""
    from ssa_server.plugins.scripts import ScriptHost
    from ssa_server.plugins.sandbox import SandboxLimits

    monkeypatch.setenv("REV_TEST_SECRET", SECRET_VALUE)
    folder = tmp_path / "scripts"
    folder.mkdir()
    write(folder, "tiers.toml", f'pasted = "{SECRET_VALUE}"\n' + GOOD_TOML)
    write(folder, "tiers.py", GOOD + f"# {SECRET_VALUE}\n")
    host = ScriptHost(folder, limits=SandboxLimits(), workers=1)
    host.start(watch=False)
    try:
        (seen,) = host.take_revisions()
        assert seen["state"] == "loaded" and seen["revision"] == host.scripts["tiers"].revision
        assert SECRET_VALUE not in json.dumps(seen)
        assert "[secret crm]" in seen["source"] and 'crm = "env:REV_TEST_SECRET"' in seen["config"]
    finally:
        host.stop()

