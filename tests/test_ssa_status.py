"""GET /ssa/status: an SSA's status without a token and without side effects, on both stores."""

from __future__ import annotations

import time

import pytest
from conftest import ADMIN


@pytest.fixture(params=["tinydb", "postgresql"])
def store_kind(request) -> str:
    return request.param


def status(api, jti: str, **headers: str):
    return api.client.get("/ssa/status", params={"jti": jti}, headers=headers)


def assert_error(response, status_code: int, error: str) -> None:
    assert response.status_code == status_code, response.text
    assert set(response.json()) == {"error", "error_description"}
    assert response.json()["error"] == error
    assert response.headers["cache-control"] == "no-store"


def test_one_time_ssa_stays_active_under_status_calls_then_validates_once(api):
    r = api.create(org_id="acme")
    jti, exp = api.jti(r), api.verify(r.json()["ssa"])[1]["exp"]
    for _ in range(5):
        s = status(api, jti)
        assert s.status_code == 200, s.text
        assert s.json() == {"jti": jti, "status": "ACTIVE", "exp": exp, "one_time_use": True}
        assert s.headers["cache-control"] == "no-store"
    assert api.client.post("/ssa/validation", headers={"jti": jti}).status_code == 200
    assert status(api, jti).json()["status"] == "USED"
    assert api.client.post("/ssa/validation", headers={"jti": jti}).status_code == 400
    assert status(api, jti).json()["status"] == "USED"


def test_every_state(api):
    reusable = api.jti(api.create(one_time_use=False))
    for _ in range(3):
        assert api.client.post("/ssa/validation", headers={"jti": reusable}).status_code == 200
    assert status(api, reusable).json() == {"jti": reusable, "status": "ACTIVE",
                                            "exp": status(api, reusable).json()["exp"], "one_time_use": False}
    revoked = api.jti(api.create())
    assert api.client.delete("/ssa", params={"jti": revoked}, headers=api.auth(ADMIN)).status_code == 200
    body = status(api, revoked).json()
    assert body["status"] == "REVOKED" and abs(body["exp"] - time.time()) < 5
    # Past its expiration, before the cleaner ran (still ACTIVE in the store), and after it ran.
    expired = api.jti(api.create(expiration=int(time.time()) - 10))
    assert status(api, expired).json()["status"] == "EXPIRED"
    api.call(api.server.cleanup_once)
    assert status(api, expired).json()["status"] == "EXPIRED"


def test_unknown_missing_and_odd_jtis(api):
    assert_error(status(api, "no-such-jti"), 404, "invalid_jti")
    assert_error(api.client.get("/ssa/status"), 400, "invalid_request")
    assert_error(api.client.get("/ssa/status", params={"jti": ""}), 400, "invalid_request")
    assert_error(api.client.get("/ssa/status?jti=a&jti=b"), 400, "invalid_request")
    for odd in ["\x00", "x" * 5000, "é" * 100, "../../etc/passwd", "{'$ne': 1}", "%00"]:
        r = status(api, odd)
        assert r.status_code in (400, 404), (odd, r.text)
        assert "Traceback" not in r.text and set(r.json()) == {"error", "error_description"}
    assert api.client.post("/ssa/status", params={"jti": "x"}).status_code == 405


def test_purged_ssa_answers_404(make_api):
    api = make_api(cleanup_grace=0, status_list=False)
    jti = api.jti(api.create())
    assert api.client.delete("/ssa", params={"jti": jti}, headers=api.auth(ADMIN)).status_code == 200
    time.sleep(1.1)  # revoked at now; purged once its expiration is older than now - grace
    api.call(api.server.cleanup_once)
    assert_error(status(api, jti), 404, "invalid_jti")


def test_revoked_ssa_with_a_status_list_entry_is_kept_until_its_jwt_expires(make_api):
    api = make_api(cleanup_grace=0)
    kept = api.jti(api.create())
    short = api.jti(api.create(expiration=int(time.time()) + 1))
    for jti in (kept, short):
        assert api.client.delete("/ssa", params={"jti": jti}, headers=api.auth(ADMIN)).status_code == 200
    time.sleep(2.1)
    api.call(api.server.cleanup_once)
    assert status(api, kept).json()["status"] == "REVOKED"  # its JWT still verifies: its bit must stay
    assert_error(status(api, short), 404, "invalid_jti")  # its JWT has expired: purged


def test_unknown_jtis_are_throttled_per_address(make_api):
    api = make_api(status_failures_per_address=3)
    known = api.jti(api.create(one_time_use=False))
    for i in range(3):
        assert_error(status(api, f"guess-{i}"), 404, "invalid_jti")
    r = status(api, "guess-x")
    assert_error(r, 429, "slow_down")
    assert int(r.headers["retry-after"]) >= 1
    assert status(api, known).status_code == 429  # refused before the store is asked, known or not


def test_disabled_feature_refuses_status(make_api):
    api = make_api(enabled=False)
    assert_error(status(api, "x"), 403, "access_denied")


def test_discovery_and_openapi_name_it(api):
    doc = api.client.get("/.well-known/openid-configuration").json()
    assert doc["ssa_status_endpoint"] == "http://127.0.0.1:8080/ssa/status"
    assert "get" in api.client.get("/openapi.json").json()["paths"]["/ssa/status"]
