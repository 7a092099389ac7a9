"""The ssa-server command, in-process (``main``) and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ADMIN, PORTAL
from ssa_server.cli import main


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in [k for k in __import__("os").environ if k.startswith("SSA_")]:
        monkeypatch.delenv(key)

    def run(*args: str, ok: bool = True):
        code = main([*args, "--data-dir", str(tmp_path / "data")] if args[0] not in ("scripts",)
                    else list(args))
        out, err = capsys.readouterr()
        if ok:
            assert code == 0, err
            return json.loads(out)
        return code, out, err

    return run


def test_clients_lifecycle(cli):
    made = cli("clients", "create", "--scope", ADMIN, "--scope", PORTAL, "--name", "n")
    assert set(made) == {"client_id", "client_secret", "scopes"} and sorted(made["scopes"]) == [ADMIN, PORTAL]
    listed = cli("clients", "list")
    assert [c["client_id"] for c in listed] == [made["client_id"]]
    assert made["client_secret"] not in json.dumps(listed) and "secret_hash" not in listed[0]
    assert cli("clients", "delete", made["client_id"]) == {"deleted": made["client_id"]}
    code, _, err = cli("clients", "delete", made["client_id"], ok=False)
    assert code == 1 and err.count("\n") == 1 and "not_found" in err
    code, _, err = cli("clients", "create", "--scope", "openid", ok=False)
    assert code == 1 and "invalid_scope" in err


def test_keys_list_and_rotate(cli):
    cli("ssa", "create", "--org-id", "o")  # creates the first key
    listed = cli("keys", "list")
    assert {k["use"] for k in listed} == {"ssa", "token"} and all("jwk" not in k for k in listed)
    (first,) = [k for k in listed if k["use"] == "ssa"]
    assert first["status"] == "active"
    new = cli("keys", "rotate", "--alg", "ES256", "--now")
    keys = {k["kid"]: k for k in cli("keys", "list") if k["use"] == "ssa"}
    assert keys[new["kid"]]["alg"] == "ES256" and keys[first["kid"]]["status"] == "retiring"


def test_ssa_create_list_revoke_and_templates(cli):
    made = cli("ssa", "create", "--org-id", "acme", "--software-role", "password", "--no-one-time-use",
               "--lifetime", "60", "--save-template", "acme")
    assert made["ssa"].count(".") == 2
    again = cli("ssa", "create", "--template", "acme", "--description", "second")
    assert again["ssa"] != made["ssa"]
    items = cli("ssa", "list", "--org-id", "acme")
    assert len(items) == 2 and {i["ssa"]["description"] for i in items} == {"", "second"}
    assert all(i["ssa"]["one_time_use"] is False and i["ssa"]["lifetime"] == 60 for i in items)
    assert cli("ssa", "templates")[0]["name"] == "acme"
    revoked = cli("ssa", "revoke", "--org-id", "acme")
    assert len(revoked["revoked"]) == 2
    code, _, err = cli("ssa", "revoke", "--org-id", "acme", ok=False)
    assert code == 1 and err.count("\n") == 1 and "No active SSA" in err
    code, _, err = cli("ssa", "create", "--template", "missing", ok=False)
    assert code == 1 and "No template" in err
    code, _, err = cli("ssa", "create", "--lifetime", "0", ok=False)
    assert code == 1 and "invalid_ssa_metadata" in err


def test_the_feature_flag_off_refuses_every_ssa_command(cli, monkeypatch):
    """``enabled = false`` is the service's rule, so the CLI refuses as HTTP does (403 there): nothing
    is created, listed, revoked or saved as a template.  Clients and keys are not the SSA feature."""
    cli("ssa", "create", "--org-id", "kept", "--save-template", "kept")
    monkeypatch.setenv("SSA_ENABLED", "false")
    refused = (1, "", "ssa-server: access_denied: The SSA feature is disabled on this server.\n")
    commands = [["ssa", "create", "--org-id", "new", "--save-template", "new"],
                ["ssa", "create", "--template", "kept"], ["ssa", "list"],
                ["ssa", "revoke", "--org-id", "kept"], ["ssa", "templates"]]
    for argv in commands:
        assert cli(*argv, ok=False) == refused
    assert cli("clients", "list") == [] and [k["use"] for k in cli("keys", "list")].count("ssa") == 1
    monkeypatch.delenv("SSA_ENABLED")
    assert [i["ssa"]["org_id"] for i in cli("ssa", "list")] == ["kept"]
    assert [t["name"] for t in cli("ssa", "templates")] == ["kept"]


def test_config_show_precedence_and_bad_setting(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('signing_alg = "ES256"\nport = 9000\nstore_url = "tinydb://app:pw@x"\n')
    env = {"PATH": "/usr/bin:/bin", "SSA_PORT": "9100", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "ssa_server", "config", "show", "--config", str(cfg),
                          "--port", "9200"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert (shown["port"], shown["signing_alg"]) == (9200, "ES256") and "pw" not in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ssa_server", "serve", "--data-dir", str(tmp_path / "d")],
                         capture_output=True, text=True, env=dict(env, SSA_SIGNING_ALG="none"), timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "SSA_SIGNING_ALG" in bad.stderr and "Traceback" not in bad.stderr


def test_ssa_list_where_searches_every_stored_ssa(cli):
    cli("ssa", "create", "--org-id", "acme")
    cli("ssa", "create", "--org-id", "acme", "--lifetime", "60")
    cli("ssa", "create", "--org-id", "beta")
    by_lifetime = {i["ssa"].get("lifetime"): i["ssa"]["jti"] for i in cli("ssa", "list", "--org-id", "acme")}
    cli("ssa", "revoke", "--jti", by_lifetime[60])
    found = cli("ssa", "list", "--where", "status=REVOKED")
    assert [(i["ssa"]["jti"], i["status"]) for i in found] == [(by_lifetime[60], "REVOKED")]
    found = cli("ssa", "list", "--where", "org_id=acme", "--where", "lifetime=null")
    assert [i["ssa"]["jti"] for i in found] == [by_lifetime[None]]
    assert len(cli("ssa", "list", "--where", "created_at>=2020-01-01")) == 3
    assert len(cli("ssa", "list", "--where", "created_at>=2020-01-01", "--limit", "2")) == 2
    for args, problem in [(("--where", "status=active"), "status is one of"),
                          (("--where", "tenant=x"), "custom.tenant"),
                          (("--where", "org_id=acme", "--jti", "x"), "--where"),
                          (("--limit", "2"), "--limit"),
                          (("--where", "org_id=acme", "--limit", "0"), "limit")]:
        code, out, err = cli("ssa", "list", *args, ok=False)
        assert code == 1 and out == "" and err.count("\n") == 1 and "invalid_request" in err, err
        assert problem in err and "Traceback" not in err


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """``ssa-server scripts test ... | head`` closes the pipe early: no traceback, exit 141 as a
    shell pipeline expects (128 + SIGPIPE)."""
    script = tmp_path / "big.py"
    # (a list printed one number per line: more than a pipe's 64 KiB buffer, within the script output cap)
    script.write_text("def create(jwt, context):\n    jwt.claims['n'] = list(range(8000))\n    return True\n")
    command = [sys.executable, "-m", "ssa_server", "scripts", "test", str(script), "--hook", "create"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": "/usr/bin:/bin", "SSA_DATA_DIR": str(tmp_path / "data")})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()  # as `head -c 10` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
