"""Script secrets: ``[secrets]`` references in NAME.toml read by the server, ``context.secrets`` in
the sandbox, and the values kept out of GET /scripts, config show, logs, errors and the worker's
environment; ``scripts test --secret``; one script never sees another's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ADMIN
from ssa_server.plugins.sandbox import ScriptError, ScriptRefused
from ssa_server.plugins.scripts import ScriptRunner

SECRET = "s3cr3t-CRM-7f4e9a"  # what must never show up where it does not belong
FILE_SECRET = "file-held-value-91c2"

USES_SECRETS = '''
def create(jwt, context):
    jwt.claims["secret_names"] = sorted(context.secrets.keys())
    jwt.claims["config_keys"] = sorted(context.config.keys())
    jwt.claims["crm_key_length"] = len(context.secrets["crm_key"])
    jwt.claims["file_matches"] = context.secrets["from_file"] == "file-held-value-91c2"
    context.log("calling the CRM with " + context.secrets["crm_key"])
    print("key:", context.secrets["crm_key"], dict(context.secrets))
    if context.request["headers"].get("x-mode") == "deny":
        context.deny("access_denied", "the CRM refused key " + context.secrets["crm_key"])
    if context.request["headers"].get("x-mode") == "raise":
        raise ValueError("bad key " + context.secrets["crm_key"])
    return True
'''


def secrets_toml(secret_file: Path, env: str = "CRM_API_KEY") -> str:
    return (f'tenant = "acme"\n[secrets]\ncrm_key = "env:{env}"\nfrom_file = "file:{secret_file}"\n')


def write_script(folder: Path, name: str, source: str, toml: str | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    if toml is not None:
        (folder / f"{name}.toml").write_text(toml)
    return folder / f"{name}.py"


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.slow
def test_a_real_server_gives_scripts_their_secrets_and_keeps_the_values_out_of_everything_else(tmp_path):
    from test_live_server import Live

    secret_file = tmp_path / "run-secrets" / "crm"
    secret_file.parent.mkdir()
    secret_file.write_text(FILE_SECRET + "\n")  # one final newline is dropped
    write_script(tmp_path / "scripts", "crm", USES_SECRETS, secrets_toml(secret_file))
    live = Live(tmp_path)
    os.environ["CRM_API_KEY"] = SECRET  # the server's environment (Live passes os.environ on)
    try:
        live.start()
    finally:
        del os.environ["CRM_API_KEY"]
    try:
        H = live.client_token()
        r = live.http.post("/ssa", json={"org_id": "acme"}, headers=H)
        assert r.status_code == 201, r.text
        from test_script_claims import unverified

        claims = unverified(r.json()["ssa"])[1]
        assert claims["secret_names"] == ["crm_key", "from_file"] and claims["file_matches"] is True
        assert claims["config_keys"] == ["tenant"]  # the [secrets] table is not context.config
        assert claims["crm_key_length"] == len(SECRET)

        denied = live.http.post("/ssa", json={"org_id": "acme"}, headers={**H, "x-mode": "deny"})
        assert denied.status_code == 403 and SECRET not in denied.text
        assert "[secret crm_key]" in denied.json()["error_description"]
        failed = live.http.post("/ssa", json={"org_id": "acme"}, headers={**H, "x-mode": "raise"})
        assert failed.status_code == 502 and SECRET not in failed.text
        listing = live.http.get("/scripts", headers=H)
        assert listing.status_code == 200 and "crm" in listing.text
        assert SECRET not in listing.text and FILE_SECRET not in listing.text
        assert "bad key [secret crm_key]" in listing.json()[0]["last_error"]

        for pid in children(live.proc.pid):  # the sandbox workers: not in their environment or argv
            for part in ("environ", "cmdline"):
                data = Path(f"/proc/{pid}/{part}").read_bytes()
                assert SECRET.encode() not in data and FILE_SECRET.encode() not in data, (pid, part)
        assert len(children(live.proc.pid)) >= 1
    finally:
        live.kill()
    log = live.proc.stderr.read().decode()
    assert "calling the CRM with [secret crm_key]" in log and "key: [secret crm_key]" in log
    assert "[secret from_file]" in log  # the printed dict of the secrets
    assert "bad key [secret crm_key]" in log
    assert SECRET not in log and FILE_SECRET not in log


def test_one_script_cannot_read_another_scripts_secrets_in_the_same_worker(make_api, tmp_path):
    folder = tmp_path / "scripts"
    probe = '''
def create(jwt, context):
    jwt.claims["NAME_sees"] = sorted(context.secrets.copy().items())
    jwt.claims["NAME_config"] = sorted(context.config.keys())
    return True
'''
    write_script(folder, "a", probe.replace("NAME", "a"), '[secrets]\na_key = "env:SECRET_A"\n')
    write_script(folder, "b", probe.replace("NAME", "b"), '[secrets]\nb_key = "env:SECRET_B"\n')
    write_script(folder, "c", probe.replace("NAME", "c"))  # no secrets at all
    os.environ.update(SECRET_A="value-of-a", SECRET_B="value-of-b")
    try:
        api = make_api(scripts_dir=folder, script_workers=1)  # one worker holds all three
    finally:
        del os.environ["SECRET_A"], os.environ["SECRET_B"]
    r = api.create(org_id="acme")
    assert r.status_code == 201, r.text
    from test_script_claims import unverified

    claims = unverified(r.json()["ssa"])[1]
    assert claims["a_sees"] == [["a_key", "value-of-a"]]
    assert claims["b_sees"] == [["b_key", "value-of-b"]]
    assert claims["c_sees"] == [] and claims["a_config"] == claims["c_config"] == []


@pytest.mark.parametrize("body", [
    'context.secrets["k"] = "x"',
    'context.secrets = {}',
    'context.secrets.clear()',
])
def test_context_secrets_is_read_only(tmp_path, body):
    path = write_script(tmp_path, "ro", f"def create(jwt, context):\n    {body}\n    return True\n",
                        '[secrets]\nk = "env:SSA_TEST_RO_SECRET"\n')
    with ScriptRunner(path, secrets={"k": "v"}) as runner:
        with pytest.raises(ScriptError):
            runner.create()


@pytest.mark.parametrize("toml,reason", [
    ('[secrets]\nk = "env:SSA_TEST_SURELY_UNSET"\n',
     "ro.toml: [secrets] k: env:SSA_TEST_SURELY_UNSET is not set"),
    ('[secrets]\nk = "file:relative/path"\n', 'k: a reference is "env:VARIABLE" or "file:/absolute/path"'),
    ('[secrets]\nk = "vault:x"\n', 'k: a reference is "env:VARIABLE" or "file:/absolute/path"'),
    ('[secrets]\nk = 5\n', 'k: a reference is'),
    ('secrets = "x"\n', "[secrets] must be a table"),
    ('[secrets]\n"1bad" = "env:X"\n', "a secret name is"),
])
def test_a_wrong_or_missing_reference_refuses_the_script_naming_it(tmp_path, toml, reason):
    path = write_script(tmp_path, "ro", "def create(jwt, context):\n    return True\n", toml)
    with pytest.raises(ScriptRefused) as refused:
        ScriptRunner(path)
    assert reason in str(refused.value)


def test_secret_files_are_read_by_the_scripts_folders_rules(tmp_path):
    """Missing, a FIFO (never blocks), a directory, too large, not UTF-8, a symlink out of its
    folder: refused naming the reference, never the content; a link inside the folder (a
    Kubernetes secret volume) is followed."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "fifo").unlink(missing_ok=True)
    os.mkfifo(folder / "fifo")
    (folder / "dir").mkdir()
    (folder / "large").write_bytes(b"x" * (64 * 1024 + 1))
    (folder / "latin1").write_bytes(b"caf\xe9-SECRETBYTES")
    (tmp_path / "outside").write_text("OUTSIDE-SECRET")
    (folder / "escape").symlink_to("../outside")
    (folder / "..data").mkdir()
    (folder / "..data" / "crm").write_text("linked-value\n")
    (folder / "crm").symlink_to("..data/crm")
    cases = {"missing": "no such file", "fifo": "not a regular file", "dir": "not a regular file",
             "large": "larger than 65536 bytes", "latin1": "not UTF-8 text",
             "escape": "a symlink that leads outside the scripts folder"}
    for name, reason in cases.items():
        path = write_script(tmp_path / "s", "f", "def create(jwt, context):\n    return True\n",
                            f'[secrets]\nk = "file:{folder / name}"\n')
        started = time.monotonic()
        with pytest.raises(ScriptRefused) as refused:
            ScriptRunner(path)
        assert time.monotonic() - started < 5
        assert str(refused.value) == f"f.toml: [secrets] k: file:{folder / name}: {reason}", name
        assert "SECRET" not in str(refused.value)
    source = 'def create(jwt, context):\n    jwt.claims["k"] = context.secrets["k"]\n'
    path = write_script(tmp_path / "s", "f", source, f'[secrets]\nk = "file:{folder / "crm"}"\n')
    with ScriptRunner(path) as runner:
        assert runner.create()["claims"]["k"] == "linked-value"  # (a claim: the script's choice)


def test_a_changed_secret_reloads_the_script_and_a_missing_one_keeps_the_previous_serving(make_api,
                                                                                           tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("first")
    folder = tmp_path / "scripts"
    source = 'def create(jwt, context):\n    jwt.claims["v"] = len(context.secrets["k"])\n'
    write_script(folder, "rot", source, f'[secrets]\nk = "file:{secret_file}"\n')
    api = make_api(scripts_dir=folder, script_workers=1, script_reload_interval=0.1)
    from test_script_claims import unverified

    def claim() -> int:
        r = api.create(org_id="o")
        assert r.status_code == 201, r.text
        return unverified(r.json()["ssa"])[1]["v"]

    assert claim() == len("first")
    secret_file.write_text("the second value")
    deadline = time.time() + 5
    while claim() != len("the second value"):
        assert time.time() < deadline, "the changed secret was not loaded"
        time.sleep(0.1)
    secret_file.unlink()
    deadline = time.time() + 5
    while True:
        [state] = api.client.get("/scripts", headers=api.auth(ADMIN)).json()
        if state["state"] == "stale":
            break
        assert time.time() < deadline, state
        time.sleep(0.1)
    assert state["last_error"] == f"rot.toml: [secrets] k: file:{secret_file}: no such file"
    assert claim() == len("the second value")  # the loaded revision keeps serving


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ssa_server", *args], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, **(env or {})))


@pytest.mark.slow
def test_scripts_test_takes_secrets_on_the_command_line_and_redacts_its_logs(tmp_path):
    toml = secrets_toml(tmp_path / "nowhere", env="SSA_TEST_UNSET_KEY")
    path = write_script(tmp_path, "crm", USES_SECRETS, toml)
    refused = cli("scripts", "test", str(path), "--hook", "create")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == ("ssa-server: refused: crm.toml: [secrets] crm_key: "
                                      "env:SSA_TEST_UNSET_KEY is not set")
    ran = cli("scripts", "test", str(path), "--hook", "create", "--secret", f"crm_key={SECRET}",
              "--secret", f"from_file={FILE_SECRET}")
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["claims"]["crm_key_length"] == len(SECRET) and result["claims"]["file_matches"] is True
    assert "calling the CRM with [secret crm_key]" in result["logs"]
    assert SECRET not in ran.stdout + ran.stderr and FILE_SECRET not in ran.stdout + ran.stderr
    failed = cli("scripts", "test", str(path), "--hook", "create", "--secret", f"crm_key={SECRET}",
                 "--secret", f"from_file={FILE_SECRET}", "--event", str(_event(tmp_path, "raise")))
    assert failed.returncode == 1 and failed.stderr.strip() == \
        "ssa-server: create failed: exception: ValueError: bad key [secret crm_key]"
    for bad in ("novalue", "=x", "1x=y", "k="):
        wrong = cli("scripts", "test", str(path), "--hook", "create", "--secret", bad)
        assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
        assert "--secret" in wrong.stderr


def _event(tmp_path: Path, mode: str) -> Path:
    event = tmp_path / f"{mode}.json"
    event.write_text(json.dumps({"context": {"request": {"method": "POST", "path": "/ssa",
                                                         "headers": {"x-mode": mode}}}}))
    return event


@pytest.mark.slow
def test_config_show_and_scripts_list_never_show_a_secret(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(FILE_SECRET)
    write_script(tmp_path / "scripts", "crm", USES_SECRETS, secrets_toml(secret_file))
    env = {"CRM_API_KEY": SECRET, "SSA_SCRIPTS_DIR": str(tmp_path / "scripts"),
           "SSA_DATA_DIR": str(tmp_path / "d")}
    shown = cli("config", "show", env=env)
    listed = cli("scripts", "list", env=env)
    assert shown.returncode == 0 and listed.returncode == 0, shown.stderr + listed.stderr
    assert json.loads(listed.stdout)[0]["state"] == "ok"
    for out in (shown, listed):
        assert SECRET not in out.stdout + out.stderr and FILE_SECRET not in out.stdout + out.stderr


def test_the_pytest_fixture_takes_secrets_for_the_references(ssa_script, tmp_path):
    source = 'def create(jwt, context):\n    jwt.claims["k"] = context.secrets["k"]\n'
    path = write_script(tmp_path, "fx", source, '[secrets]\nk = "env:SSA_TEST_SURELY_UNSET"\n')
    assert ssa_script(path, secrets={"k": "given"}).create()["claims"]["k"] == "given"
