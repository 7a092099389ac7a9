"""POST /token: the client-credentials grant and token checks."""

from __future__ import annotations

import base64
import time

import pytest

from conftest import ADMIN, PORTAL
from test_api_ssa import assert_error


@pytest.fixture(params=["tinydb", "postgresql"])
def store_kind(request) -> str:
    return request.param


def test_basic_and_post_auth(api):
    cid, secret = api.register(ADMIN, PORTAL)
    r = api.client.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, secret))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert set(body["scope"].split()) == {ADMIN, PORTAL}
    r = api.client.post("/token", data={"grant_type": "client_credentials", "client_id": cid,
                                        "client_secret": secret, "scope": PORTAL})
    assert r.status_code == 200 and r.json()["scope"] == PORTAL
    # The portal-only token cannot create.
    assert_error(api.create({"Authorization": f"Bearer {r.json()['access_token']}"}), 401,
                 "unauthorized_client")


def test_bad_clients(api):
    cid, secret = api.register(ADMIN)
    for auth in [(cid, "wrong"), ("unknown", secret)]:
        r = api.client.post("/token", data={"grant_type": "client_credentials"}, auth=auth)
        assert_error(r, 401, "invalid_client")
        assert r.headers["www-authenticate"].startswith("Basic")
    assert_error(api.client.post("/token", data={"grant_type": "client_credentials"}), 401, "invalid_client")
    bad = {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}
    assert_error(api.client.post("/token", data={"grant_type": "client_credentials"}, headers=bad), 401,
                 "invalid_client")


def test_grant_and_scope_errors(api):
    cid, secret = api.register(PORTAL)
    post = lambda data: api.client.post("/token", data=data, auth=(cid, secret))  # noqa: E731
    assert_error(post({"grant_type": "client_credentials", "scope": ADMIN}), 400, "invalid_scope")
    assert_error(post({"grant_type": "password"}), 400, "unsupported_grant_type")
    assert_error(post({}), 400, "invalid_request")
    assert_error(api.client.post("/token", content=b"grant_type=client_credentials&grant_type=x",
                                 headers={"content-type": "application/x-www-form-urlencoded"},
                                 auth=(cid, secret)), 400, "invalid_request")
    assert_error(api.client.post("/token", data={"grant_type": "client_credentials", "client_id": cid,
                                                 "client_secret": secret}, auth=(cid, secret)), 400,
                 "invalid_request")


def test_deleted_client_token_stops_working(api):
    cid, secret = api.register(ADMIN)
    token = api.client.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, secret)).json()
    H = {"Authorization": f"Bearer {token['access_token']}"}
    assert api.client.get("/ssa", headers=H).status_code == 200
    api.call(api.server.clients.delete, cid)
    assert_error(api.client.get("/ssa", headers=H), 401, "invalid_token")


def test_expired_token(make_api):
    now = [time.time()]
    a = make_api(clock=lambda: now[0], token_ttl=60)
    H = a.auth(ADMIN)
    assert a.client.get("/ssa", headers=H).status_code == 200
    now[0] += 61
    assert_error(a.client.get("/ssa", headers=H), 401, "invalid_token")


@pytest.mark.parametrize("store_kind", ["tinydb"])  # two servers on one PostgreSQL share the token key
def test_token_from_another_server_is_rejected(make_api):
    one, two = make_api(), make_api()
    assert_error(two.client.get("/ssa", headers=one.auth(ADMIN)), 401, "invalid_token")


def test_secrets_are_stored_hashed(api):
    cid, secret = api.register(ADMIN)
    record = api.call(api.server.store.get_client, cid)
    assert secret not in str(record) and record["secret_hash"].startswith("sha256$")
    if api.server.settings.uses_postgres:
        import psycopg

        with psycopg.connect(api.server.settings.store_url) as conn:
            stored = str(conn.execute("SELECT * FROM clients").fetchall())
    else:
        stored = (api.server.settings.data_dir / "store.jsonl").read_text()
    assert cid in stored and secret not in stored
