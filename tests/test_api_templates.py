"""The templates HTTP API (issue 17): GET /ssa/templates, PUT and DELETE /ssa/templates/{name},
through a real ``ssa-server serve`` on both stores, with the CLI beside it on the same store."""

from __future__ import annotations

import json

import pytest

from conftest import ADMIN, PORTAL
from live_ssa import LiveServer

pytestmark = pytest.mark.slow


@pytest.fixture(params=["tinydb", "postgresql"])
def live(request, tmp_path):
    env = {"SSA_CUSTOM_ATTRIBUTES": "tier"}
    if request.param == "postgresql":
        from conftest import truncate

        url = request.getfixturevalue("pg_url")
        truncate(url)
        env["SSA_STORE_URL"] = url
    server = LiveServer(tmp_path, **env).start()
    yield server
    server.stop()


def test_put_list_replace_delete(live):
    H = live.auth()
    assert live.http.get("/ssa/templates", headers=H).json() == []
    body = {"org_id": "acme", "software_roles": ["password"], "one_time_use": False, "tier": "gold",
            "not_a_field": 1}
    r = live.http.put("/ssa/templates/acme-basic", json=body, headers=H)
    assert r.status_code == 201, r.text
    listed = live.http.get("/ssa/templates", headers=H).json()
    assert [t["name"] for t in listed] == ["acme-basic"]
    # what a create would keep: the known fields and the configured custom attribute, not the rest
    assert listed[0]["fields"] == {"org_id": "acme", "software_roles": ["password"], "one_time_use": False,
                                   "tier": "gold"}
    assert isinstance(listed[0]["created_at"], int) and listed[0]["created_at"] > 0
    r = live.http.put("/ssa/templates/acme-basic", json={"org_id": "acme2"}, headers=H)
    assert r.status_code == 200, r.text
    assert live.http.get("/ssa/templates", headers=H).json()[0]["fields"] == {"org_id": "acme2"}
    # the CLI sees the same template and creates from it
    made = live.cli("ssa", "create", "--template", "acme-basic")
    assert made.returncode == 0, made.stderr
    assert live.http.get("/ssa", params={"org_id": "acme2"}, headers=H).json()
    r = live.http.delete("/ssa/templates/acme-basic", headers=H)
    assert r.status_code == 204 and r.content == b""
    assert live.http.get("/ssa/templates", headers=H).json() == []
    r = live.http.delete("/ssa/templates/acme-basic", headers=H)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert "acme-basic" in r.json()["error_description"]


def test_bad_bodies_and_names_are_400_and_store_nothing(live):
    H = live.auth()
    live.http.put("/ssa/templates/kept", json={"org_id": "kept"}, headers=H)
    bad_bodies = [b"", b"[1]", b"{", b'{"org_id": 5}', b'{"software_roles": "x"}', b'{"lifetime": 0}',
                  b'{"one_time_use": "yes"}', b'{"org_id": "a\\u0000b"}', b'{"expiration": 1.5}']
    for raw in bad_bodies:
        r = live.http.put("/ssa/templates/kept", content=raw, headers=H)
        assert r.status_code == 400, (raw, r.text)
        assert set(r.json()) >= {"error", "error_description"}
    # the same text a create body gets
    create = live.http.post("/ssa", content=b'{"software_roles": "x"}', headers=H).json()
    put = live.http.put("/ssa/templates/kept", content=b'{"software_roles": "x"}', headers=H).json()
    assert put == create
    for name in ("a b", "x" * 65, ".hidden", "-lead", "semi;colon", "%00", "caf%C3%A9"):
        r = live.http.put(f"/ssa/templates/{name}", json={"org_id": "n"}, headers=H)
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", (name, r.text)
        assert live.http.delete(f"/ssa/templates/{name}", headers=H).status_code == 400
    assert [(t["name"], t["fields"]) for t in live.http.get("/ssa/templates", headers=H).json()] == \
        [("kept", {"org_id": "kept"})]


def test_admin_scope_for_all_three(live):
    portal = live.auth(PORTAL)
    calls = [("GET", "/ssa/templates", None), ("PUT", "/ssa/templates/t", {"org_id": "x"}),
             ("DELETE", "/ssa/templates/t", None)]
    for method, path, body in calls:
        r = live.http.request(method, path, json=body)
        assert r.status_code == 401 and "www-authenticate" in r.headers, (method, r.text)
        r = live.http.request(method, path, json=body, headers=portal)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized_client"
        assert f'scope="{ADMIN}"' in r.headers["www-authenticate"]
    assert json.loads(live.cli("ssa", "templates").stdout) == []


def test_cli_templates_delete(live):
    H = live.auth()
    live.http.put("/ssa/templates/gone", json={"org_id": "g"}, headers=H)
    r = live.cli("ssa", "templates", "delete", "gone")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"deleted": "gone"}
    assert live.http.get("/ssa/templates", headers=H).json() == []
    r = live.cli("ssa", "templates", "delete", "gone")
    assert r.returncode == 1 and "not_found" in r.stderr
    r = live.cli("ssa", "create", "--org-id", "o", "--save-template", "bad name")
    assert r.returncode == 1 and "invalid_request" in r.stderr
    assert json.loads(live.cli("ssa", "templates").stdout) == []
