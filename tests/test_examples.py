"""Every example script works in the real sandbox and in a real server (through HTTP)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from jwcrypto import jwk, jwt
from starlette.testclient import TestClient

from ssa_server.app import create_app
from ssa_server.plugins.scripts import ScriptRunner
from ssa_server.server import Server
from ssa_server.settings import Settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ADMIN = "https://jans.io/auth/ssa.admin"


def example(name: str) -> Path:
    return EXAMPLES / "scripts" / f"{name}.py"


@pytest.fixture
def serve_with(tmp_path):
    """A server whose scripts folder holds the given examples; yields (client, auth headers)."""
    opened = []

    def start(*names: str):
        scripts = tmp_path / "scripts"
        scripts.mkdir(exist_ok=True)
        for name in names:
            for f in EXAMPLES.joinpath("scripts").glob(f"{name}.*"):
                shutil.copy(f, scripts / f.name)
        server = Server.build(Settings(data_dir=tmp_path / "data", scripts_dir=scripts, script_workers=1))
        client = TestClient(create_app(server=server), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        record, secret = client.portal.call(server.clients.create, [ADMIN], "examples")
        token = client.post("/token", data={"grant_type": "client_credentials"},
                            auth=(record["client_id"], secret)).json()["access_token"]
        return client, {"Authorization": f"Bearer {token}"}

    yield start
    for client in opened:
        client.__exit__(None, None, None)


def claims_of(client: TestClient, token: str) -> tuple[dict, dict]:
    keys = jwk.JWKSet.from_json(client.get("/jwks").text)
    verified = jwt.JWT(jwt=token, key=keys)
    return verified.token.jose_header, json.loads(verified.claims)


# --- janssen_sample ---
def test_janssen_sample_in_sandbox(ssa_script):
    result = ssa_script(example("janssen_sample")).create()
    assert result["header"]["custom_header_name"] == "custom_header_value"
    assert result["claims"]["custom_claim_name"] == "custom_claim_value"


def test_janssen_sample_over_http_is_signed(serve_with):
    client, auth = serve_with("janssen_sample")
    r = client.post("/ssa", json={"org_id": "acme"}, headers=auth)
    assert r.status_code == 201, r.text
    header, claims = claims_of(client, r.json()["ssa"])  # verifies the signature
    assert header["custom_header_name"] == "custom_header_value"
    assert claims["custom_claim_name"] == "custom_claim_value"


# --- tenant_claims ---
def test_tenant_claims_in_sandbox(ssa_script):
    script = ssa_script(example("tenant_claims"))
    assert script.create()["claims"]["tenant"] == "acme"
    assert script.create()["claims"]["environment"] == "staging"
    assert script.get()["ssa_list"][0]["ssa"]["tenant"] == "acme"


def test_tenant_claims_over_http(serve_with):
    client, auth = serve_with("tenant_claims")
    created = client.post("/ssa", json={"org_id": "o1"}, headers=auth)
    _, claims = claims_of(client, created.json()["ssa"])
    assert (claims["tenant"], claims["environment"]) == ("acme", "staging")
    listed = client.get("/ssa", params={"org_id": "o1"}, headers=auth).json()
    assert listed[0]["ssa"]["tenant"] == "acme"


# --- deny_orgs ---
def test_deny_orgs_in_sandbox(ssa_script):
    script = ssa_script(example("deny_orgs"))
    denied = script.create(claims={"org_id": "evil-corp"})
    assert denied["denied"]["error"] == "access_denied"
    assert not script.create(claims={"org_id": "acme"})["denied"]


def test_deny_orgs_over_http_stores_nothing(serve_with):
    client, auth = serve_with("deny_orgs")
    r = client.post("/ssa", json={"org_id": "evil-corp"}, headers=auth)
    assert r.status_code == 403
    assert r.json()["error"] == "access_denied"
    assert "evil-corp" in r.json()["error_description"]
    assert client.get("/ssa", params={"org_id": "evil-corp"}, headers=auth).json() == []
    assert client.post("/ssa", json={"org_id": "acme"}, headers=auth).status_code == 201


# --- hide_fields ---
def test_hide_fields_in_sandbox(ssa_script):
    item = ssa_script(example("hide_fields")).get()["ssa_list"][0]["ssa"]
    assert "description" not in item and "software_roles" not in item
    assert item["org_id"] == "acme"


def test_hide_fields_over_http(serve_with):
    client, auth = serve_with("hide_fields")
    client.post("/ssa", json={"org_id": "o2", "description": "secret plan", "software_roles": ["r"]},
                headers=auth)
    item = client.get("/ssa", params={"org_id": "o2"}, headers=auth).json()[0]["ssa"]
    assert "description" not in item and "software_roles" not in item
    assert item["org_id"] == "o2"


# --- revoke_audit ---
def test_revoke_audit_in_sandbox(ssa_script):
    result = ssa_script(example("revoke_audit")).revoke()
    assert result["result"] is True
    assert any("audit: client sample-client revoked SSA" in line for line in result["logs"])


def test_revoke_audit_over_http_logs(serve_with, caplog):
    client, auth = serve_with("revoke_audit")
    client.post("/ssa", json={"org_id": "o3"}, headers=auth)
    with caplog.at_level(logging.INFO, logger="ssa_server.scripts"):
        assert client.delete("/ssa", params={"org_id": "o3"}, headers=auth).status_code == 200
    assert any("revoke_audit" in r.getMessage() and "org o3" in r.getMessage() for r in caplog.records)


def test_examples_pass_scripts_check(monkeypatch):
    from ssa_server.cli import main

    monkeypatch.setenv("REGISTRY_API_KEY", "a-test-key")  # registry_check's [secrets] reference, as deployed
    for path in sorted(EXAMPLES.joinpath("scripts").glob("*.py")):
        assert main(["scripts", "check", str(path)]) == 0, path


def test_runner_refuses_unknown_hook():
    from ssa_server.plugins.sandbox import ScriptRefused

    with ScriptRunner(example("hide_fields")) as runner, pytest.raises(ScriptRefused):
        runner.run("create")


def test_scripts_test_cli_exit_codes(tmp_path, capsys):
    from ssa_server.cli import main

    assert main(["scripts", "test", str(example("janssen_sample")), "--hook", "create"]) == 0
    assert json.loads(capsys.readouterr().out)["claims"]["custom_claim_name"] == "custom_claim_value"
    event = EXAMPLES / "events" / "create.json"
    assert main(["scripts", "test", str(example("deny_orgs")), "--hook", "create",
                 "--event", str(event)]) == 3
    assert "denied: access_denied" in capsys.readouterr().err
    assert main(["scripts", "test", str(example("hide_fields")), "--hook", "create"]) == 1
    assert "defines no create()" in capsys.readouterr().err
    loop = tmp_path / "loop.py"
    loop.write_text("def create(jwt, context):\n    while True:\n        pass\n")
    assert main(["scripts", "test", str(loop), "--hook", "create"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("timeout" in err or "limit" in err)
    broken = tmp_path / "broken.py"
    broken.write_text("def create(jwt, context):\n    return jwt.__dict__\n")
    assert main(["scripts", "check", str(broken)]) == 1
    assert "__dict__" in capsys.readouterr().err


def test_scripts_list_cli_reports_broken_next_to_good(tmp_path, capsys):
    from ssa_server.cli import main

    shutil.copy(example("revoke_audit"), tmp_path / "good.py")
    (tmp_path / "bad.py").write_text("import os\n")
    assert main(["scripts", "list", "--scripts-dir", str(tmp_path)]) == 0
    listed = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert listed["good"]["state"] == "ok" and listed["good"]["hooks"] == ["revoke"]
    assert listed["bad"]["state"] == "error" and "import" in listed["bad"]["error"]


# --- registry_check (context.http with a secret) ---


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """The registry example's service on 127.0.0.1, and a copy of the example pointed at it."""
    from http_service import start_server

    service = start_server()
    monkeypatch.setenv("REGISTRY_API_KEY", service.api_key)
    copied = tmp_path / "registry_examples"
    copied.mkdir()
    shutil.copy(example("registry_check"), copied)
    toml = EXAMPLES.joinpath("scripts", "registry_check.toml").read_text()
    copied.joinpath("registry_check.toml").write_text(toml.replace("8099", str(service.server_address[1])))
    yield service, copied
    service.shutdown()
    service.server_close()


def test_registry_check_in_sandbox(ssa_script, registry):
    service, folder = registry
    script = ssa_script(folder / "registry_check.py")
    assert script.create(claims={"org_id": "acme"})["claims"]["registry_status"] == "active"
    denied = script.create(claims={"org_id": "unknown-org"})
    assert denied["denied"]["error"] == "access_denied" and denied["result"] is False
    assert [h[1] for h in service.hits] == ["/v1/orgs/acme", "/v1/orgs/unknown-org"]


def test_registry_check_over_http_denies_unknown_orgs(serve_with, registry, tmp_path):
    service, folder = registry
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    for f in folder.iterdir():
        shutil.copy(f, scripts / f.name)
    client, auth = serve_with()
    r = client.post("/ssa", json={"org_id": "globex"}, headers=auth)
    assert r.status_code == 201, r.text
    assert claims_of(client, r.json()["ssa"])[1]["registry_status"] == "active"
    r = client.post("/ssa", json={"org_id": "unknown-org"}, headers=auth)
    assert r.status_code == 403 and "not in the registry" in r.json()["error_description"]
    assert client.get("/ssa", params={"org_id": "unknown-org"}, headers=auth).json() == []
    listed = {s["name"]: s for s in client.get("/scripts", headers=auth).json()}
    assert listed["registry_check"]["http"]["calls"] == 2
    assert service.api_key not in json.dumps(listed)


# --- janssen_format (Janssen's class, print statements and imports, unchanged) ---
JANSSEN_FORMAT = EXAMPLES / "scripts" / "janssen_format.py"


def test_janssen_format_in_sandbox(ssa_script):
    script = ssa_script(JANSSEN_FORMAT)
    result = script.create()
    assert result["header"]["custom_header_name"] == "custom_header_value"
    assert result["claims"]["custom_claim_name"] == "custom_claim_value"
    assert any("Modify ssa response script" in line for line in result["logs"])
    assert script.get()["result"] is True and script.revoke()["result"] is True


def test_janssen_format_over_http_is_signed(serve_with, tmp_path):
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(JANSSEN_FORMAT, tmp_path / "scripts")
    client, auth = serve_with()
    r = client.post("/ssa", json={"org_id": "acme"}, headers=auth)
    assert r.status_code == 201, r.text
    header, claims = claims_of(client, r.json()["ssa"])
    assert header["custom_header_name"] == "custom_header_value"
    assert claims["custom_claim_name"] == "custom_claim_value"
