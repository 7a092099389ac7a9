"""The scripts folder is untrusted input: FIFOs, huge sparse files, symlinks out of the folder,
names with newlines or bytes that are not UTF-8, and files that are not Python.  None of them may
stop start-up or hot reload, read a file outside the folder, forge a log line, break GET /scripts,
or echo a file's lines; the good scripts beside them keep serving.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_scripts_http import ADD, harness  # noqa: F401  (pytest fixture)
from test_live_server import Live

TIB = 1 << 40
CANARY = "db-password-canary-5c1e"
PASSWD_LINE = "root:x:0:0:root:/root:/bin/bash"
CONFIG_CLAIM = 'def create(jwt, context):\n    jwt.claims["config"] = context.config\n    return True\n'
NEWLINE_NAME = "evil\nERROR ssa_server.scripts forged line.py"
NON_UTF8_NAME = b"caf\xe9-\xff.py"


def sparse(path: Path, size: int = TIB) -> None:
    """A file whose size says ``size`` (1 TiB) but that holds no blocks."""
    with open(path, "wb") as f:
        f.truncate(size)


def release_fifo(path: Path) -> None:
    """Opening the write end wakes a reader blocked opening the FIFO (the unfixed reload thread)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader waiting


def listing(h) -> dict[str, dict]:
    r = h.client.get("/scripts", headers=h.auth)
    assert r.status_code == 200, r.text
    return {s["name"]: s for s in r.json()}


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@pytest.mark.slow
def test_serve_starts_and_reloads_next_to_hostile_files(tmp_path):
    """A real ``serve``: every kind of bad entry in the folder before start-up, then hot reload."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.toml").write_text(f'password = "{CANARY}"\n')
    (outside / "escape.py").write_text(CONFIG_CLAIM)
    (scripts / "good.py").write_text(CONFIG_CLAIM)
    (scripts / "good.toml").write_text('tenant = "acme"\n')
    sparse(scripts / "huge.py")  # read whole before the size cap: MemoryError, start-up exits 1
    (scripts / "hugecfg.py").write_text(CONFIG_CLAIM)
    sparse(scripts / "hugecfg.toml")
    os.mkfifo(scripts / "fifo.py")  # opening it for reading blocks until a writer comes
    (scripts / "fifocfg.py").write_text(CONFIG_CLAIM)
    os.mkfifo(scripts / "fifocfg.toml")
    (scripts / "leak.py").write_text(CONFIG_CLAIM)
    (scripts / "leak.toml").symlink_to(outside / "secret.toml")  # would become context.config
    (scripts / "passwd.py").symlink_to("/etc/passwd")  # would echo its first line
    (scripts / "escape.py").symlink_to("../outside/escape.py")  # relative, but out of the folder
    (scripts / NEWLINE_NAME).write_text(ADD.format(tag="n", ret=True))
    (scripts / os.fsdecode(NON_UTF8_NAME)).write_text(ADD.format(tag="u", ret=True))
    (scripts / "dir.py").mkdir()
    live = Live(tmp_path)
    try:
        live.start()  # unfixed: never ready (the FIFO blocks start-up)
        H = live.client_token()
        r = live.http.post("/ssa", json={"org_id": "o"}, headers=H)
        assert r.status_code == 201, r.text
        claims = json.loads(_b64(r.json()["ssa"].split(".")[1]))
        assert claims["config"] == {"tenant": "acme"} and "trail" not in claims
        r = live.http.get("/scripts", headers=H)
        assert r.status_code == 200, r.text  # unfixed: 500 (a name that is not UTF-8)
        listed = {s["name"]: s for s in r.json()}
        assert listed["good"]["state"] == "loaded"
        for name in ("huge", "hugecfg", "fifo", "fifocfg", "leak", "passwd", "escape", "dir"):
            assert listed[name]["state"] == "error", (name, listed[name])
            assert listed[name]["last_error"], name
        assert "larger than" in listed["huge"]["last_error"]
        assert "larger than" in listed["hugecfg"]["last_error"]
        assert "not a regular file" in listed["fifo"]["last_error"]
        assert "not a regular file" in listed["fifocfg"]["last_error"]
        assert "outside the scripts folder" in listed["leak"]["last_error"]
        assert "outside the scripts folder" in listed["passwd"]["last_error"]
        assert "outside the scripts folder" in listed["escape"]["last_error"]
        rejected = {s["name"]: s for s in r.json() if s["state"] == "error" and "name" in s["last_error"]}
        assert "evil\\nERROR ssa_server.scripts forged line" in rejected
        assert "caf\\xe9-\\xff" in rejected
        # Hot reload still runs beside them: a new script serves, a removed one stops.
        (scripts / "later.py").write_text(ADD.format(tag="L", ret=True))
        (scripts / "good.py").unlink()
        deadline = time.time() + 10
        while True:
            token = live.http.post("/ssa", json={"org_id": "o"}, headers=H).json()["ssa"]
            claims = json.loads(_b64(token.split(".")[1]))
            if claims.get("trail") == "L" and "config" not in claims:
                break
            assert time.time() < deadline, claims
            time.sleep(0.1)
        text = live.http.get("/scripts", headers=H).text
        assert CANARY not in text and PASSWD_LINE not in text
    finally:
        release_fifo(scripts / "fifo.py")
        release_fifo(scripts / "fifocfg.toml")
        live.kill()
    log = live.proc.stderr.read().decode("utf-8", "replace")
    assert CANARY not in log and PASSWD_LINE not in log
    lines = log.splitlines()
    assert not any(line.startswith("ERROR ssa_server.scripts forged") for line in lines)
    assert sum("evil\\nERROR" in line for line in lines) == 1  # reported once, escaped


def test_a_removed_script_is_unregistered_beside_a_huge_file(harness):
    h = harness({"a.py": ADD.format(tag="a", ret=True)})
    assert h.claims(h.create())["trail"] == "a"
    sparse(h.scripts / "huge.py")
    (h.scripts / "a.py").unlink()
    h.wait_for(lambda: "trail" not in h.claims(h.create()), timeout=3)  # unfixed: MemoryError every poll
    assert "larger than" in listing(h)["huge"]["last_error"]


def test_a_folder_that_cannot_be_read_keeps_the_loaded_scripts(harness, caplog):
    """An unreadable folder is not an empty one: a deny policy must not vanish on an I/O error."""
    h = harness({"a.py": ADD.format(tag="a", ret=True)})
    real = h.scripts.with_name("real")
    h.scripts.rename(real)
    h.scripts.symlink_to(h.scripts.name)  # a symlink loop: opening the folder fails with ELOOP
    try:
        with caplog.at_level("ERROR", logger="ssa_server.scripts"):
            for _ in range(3):
                assert h.server.scripts.reload() is False
            assert h.claims(h.create())["trail"] == "a"  # unfixed: the script was removed
        assert sum("scripts folder cannot be read" in r.getMessage() for r in caplog.records) == 1
    finally:
        h.scripts.unlink()
        real.rename(h.scripts)
    (h.scripts / "a.py").unlink()
    h.wait_for(lambda: "trail" not in h.claims(h.create()), timeout=3)


def test_a_fifo_does_not_block_reload(harness):
    h = harness()
    fifo = h.scripts / "fifo.py"
    os.mkfifo(fifo)
    try:
        h.write("b.py", ADD.format(tag="b", ret=True))
        h.wait_for(lambda: h.claims(h.create()).get("trail") == "b", timeout=3)  # unfixed: blocked forever
        assert "not a regular file" in listing(h)["fifo"]["last_error"]
    finally:
        release_fifo(fifo)


def test_configmap_symlinks_inside_the_folder_serve_and_swap(harness):
    """Kubernetes mounts a ConfigMap as NAME -> ..data/NAME, ..data -> ..TIMESTAMP/; an update
    swaps ..data in one rename."""
    h = harness()

    def publish(stamp: str, tag: str) -> None:
        version = h.scripts / f"..{stamp}"
        version.mkdir()
        source = CONFIG_CLAIM.replace("return True", f'jwt.claims["v"] = "{tag}"\n    return True')
        (version / "cm.py").write_text(source)
        (version / "cm.toml").write_text(f'tag = "{tag}"\n')
        tmp = h.scripts / "..data_tmp"
        tmp.symlink_to(version.name)
        tmp.replace(h.scripts / "..data")

    publish("2026_01_01_00_00_00.1", "one")
    (h.scripts / "cm.py").symlink_to("..data/cm.py")
    (h.scripts / "cm.toml").symlink_to("..data/cm.toml")
    h.wait_for(lambda: h.claims(h.create()).get("v") == "one", timeout=3)
    assert h.claims(h.create())["config"] == {"tag": "one"}
    publish("2026_01_01_00_00_01.2", "two")
    h.wait_for(lambda: h.claims(h.create()).get("v") == "two", timeout=3)
    assert h.claims(h.create())["config"] == {"tag": "two"}
    assert set(listing(h)) == {"cm"}  # the dot entries are not scripts


def test_a_symlink_swapped_to_outside_during_reloads_never_escapes(harness, tmp_path):
    """``cm.toml -> ..data/cm.toml`` while ``..data`` flips between a folder inside and one
    outside: a reload reads the inside file or refuses, never the outside one."""
    h = harness({"cm.py": CONFIG_CLAIM})
    inside = h.scripts / "..inside"
    inside.mkdir()
    (inside / "cm.toml").write_text('where = "inside"\n')
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "cm.toml").write_text(f'password = "{CANARY}"\n')
    (h.scripts / "..data").symlink_to(inside.name)
    (h.scripts / "cm.toml").symlink_to("..data/cm.toml")
    stop = threading.Event()

    def flip() -> None:
        link, tmp = h.scripts / "..data", h.scripts / "..data_tmp"
        while not stop.is_set():
            for target in (str(outside), inside.name):
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(target)
                tmp.replace(link)

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        seen = set()
        for _ in range(150):
            h.server.scripts.reload()
            seen.add(h.server.scripts.scripts["cm"].state)
            claims = h.claims(h.create())
            assert CANARY not in json.dumps(claims) + str(listing(h))  # unfixed: the outside file's password
    finally:
        stop.set()
        flipper.join()
    assert seen & {"loaded", "stale"}


def test_names_outside_the_safe_set_are_listed_escaped_and_logged_once(harness, caplog):
    h = harness({"ok.py": ADD.format(tag="o", ret=True)})
    with caplog.at_level("INFO", logger="ssa_server.scripts"):
        (h.scripts / NEWLINE_NAME).write_text(ADD.format(tag="n", ret=True))
        (h.scripts / os.fsdecode(NON_UTF8_NAME)).write_text(ADD.format(tag="u", ret=True))
        (h.scripts / "two.dots.py").write_text(ADD.format(tag="d", ret=True))
        (h.scripts / ".hidden.py").write_text(ADD.format(tag="h", ret=True))
        for _ in range(3):
            h.server.scripts.reload()
        listed = listing(h)  # unfixed: 500 (the name is not UTF-8)
    assert h.claims(h.create())["trail"] == "o"  # only the well-named script runs
    assert listed["ok"]["state"] == "loaded"
    for escaped in ("evil\\nERROR ssa_server.scripts forged line", "caf\\xe9-\\xff", "two.dots"):
        assert listed[escaped]["state"] == "error" and "name" in listed[escaped]["last_error"], listed
    assert not any(".hidden" in name for name in listed)
    messages = [rec.getMessage() for rec in caplog.records]
    assert not any("\n" in m or "\udcff" in m or "\xe9" in m for m in messages), messages
    assert sum("evil\\nERROR" in m for m in messages) == 1


SECRET_LINE = f'API_KEY = "{CANARY}" +\n'
TOP_LEVEL_RAISE = f'SECRET = "{CANARY}"\nraise ValueError(SECRET)\n'


def test_errors_name_the_line_and_kind_never_the_source(harness):
    h = harness({"fakepw.py": PASSWD_LINE + "\n", "syntax.py": SECRET_LINE, "raises.py": TOP_LEVEL_RAISE,
                 "policy.py": "def create(jwt, context):\n    return jwt.__dict__\n",
                 "imports.py": "import os\n"})
    h.wait_for(lambda: all(listing(h).get(n, {}).get("state") == "error"
                           for n in ("fakepw", "syntax", "raises", "policy", "imports")), timeout=3)
    listed = listing(h)
    text = json.dumps(listed)
    assert PASSWD_LINE not in text and CANARY not in text and "at statement" not in text
    assert "line 1" in listed["fakepw"]["last_error"] and "SyntaxError" in listed["fakepw"]["last_error"]
    assert "line 1" in listed["syntax"]["last_error"] and "SyntaxError" in listed["syntax"]["last_error"]
    assert "line 2" in listed["raises"]["last_error"] and "ValueError" in listed["raises"]["last_error"]
    assert "line 2" in listed["policy"]["last_error"] and "__dict__" in listed["policy"]["last_error"]
    assert "import" in listed["imports"]["last_error"]
    folder = str(h.scripts)
    for args in (["scripts", "list", "--scripts-dir", folder], ["scripts", "check", f"{folder}/fakepw.py"],
                 ["scripts", "check", f"{folder}/syntax.py"], ["scripts", "check", f"{folder}/raises.py"]):
        out = subprocess.run([sys.executable, "-m", "ssa_server", *args], capture_output=True, text=True,
                             timeout=60)
        both = out.stdout + out.stderr
        assert PASSWD_LINE not in both and CANARY not in both and "at statement" not in both, both
        assert "line " in both, both


def test_scripts_list_cli_reports_bad_names_escaped(tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "good.py").write_text(ADD.format(tag="g", ret=True))
    (folder / NEWLINE_NAME).write_text(ADD.format(tag="n", ret=True))
    (folder / os.fsdecode(NON_UTF8_NAME)).write_text(ADD.format(tag="u", ret=True))
    os.mkfifo(folder / "fifo.py")
    try:
        out = subprocess.run([sys.executable, "-m", "ssa_server", "scripts", "list", "--scripts-dir",
                              str(folder)], capture_output=True, timeout=30)
    finally:
        release_fifo(folder / "fifo.py")
    assert out.returncode == 0, out.stderr
    listed = {s["name"]: s for s in json.loads(out.stdout)}
    assert listed["good"]["state"] == "ok"
    assert listed["fifo"]["state"] == "error" and "not a regular file" in listed["fifo"]["error"]
    assert listed["evil\\nERROR ssa_server.scripts forged line"]["state"] == "error"
    assert listed["caf\\xe9-\\xff"]["state"] == "error"
