"""GET /ssa/search: the admin search over every stored SSA, through HTTP, on both stores."""

from __future__ import annotations

import time

import pytest

from conftest import ADMIN, DEVELOPER, PORTAL
from test_api_ssa import assert_error


@pytest.fixture(params=["tinydb", "postgresql"])
def store_kind(request) -> str:
    return request.param


def search(api, headers, *where: str, **params):
    return api.client.get("/ssa/search", params={"where": list(where), **params}, headers=headers)


def jtis(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["ssa"]["jti"] for item in response.json()]


def test_search_finds_any_status_custom_attributes_and_date_ranges(api):
    H = api.auth()
    today = time.strftime("%Y-%m-%d", time.gmtime())  # (before the SSAs are made)
    first = api.jti(api.create(H, org_id="acme", myCustomAttr1="blue"))
    used = api.jti(api.create(H, org_id="acme", myCustomAttr1="red"))
    revoked = api.jti(api.create(H, org_id="beta", myCustomAttr1="blue", lifetime=60))
    assert api.client.post("/ssa/validation", headers={"jti": used}).status_code == 200
    assert api.client.delete("/ssa", params={"jti": revoked}, headers=H).status_code == 200

    assert jtis(search(api, H, "status=REVOKED")) == [revoked]
    assert jtis(search(api, H, "org_id=acme", "status=USED")) == [used]  # repeated: every term holds
    assert sorted(jtis(search(api, H, "myCustomAttr1=blue"))) == sorted([first, revoked])
    assert jtis(search(api, H, "custom.myCustomAttr1=red,org_id=acme")) == [used]
    assert sorted(jtis(search(api, H, f"created_at>={today}", "lifetime=null"))) == sorted([first, used])
    assert jtis(search(api, H, "created_at<2000-01-01")) == []
    assert len(jtis(search(api, H))) == 3  # no filter: every SSA
    assert len(jtis(search(api, H, limit="2"))) == 2
    (item,) = search(api, H, f"jti={revoked}").json()
    assert set(item) == {"ssa", "created_at", "expiration", "iss", "status"}  # GET /ssa's element shape
    assert (item["status"] == "REVOKED" and item["ssa"]["myCustomAttr1"] == "blue"
            and item["ssa"]["lifetime"] == 60)
    # Janssen's GET /ssa is untouched: active SSAs only, no where.
    listed = api.client.get("/ssa", params={"org_id": "acme"}, headers=H).json()
    assert [i["ssa"]["jti"] for i in listed] == [first]


@pytest.mark.parametrize("query", [
    "where=org=acme",  # not a field
    "where=status%3Dactive",
    "where=created_at%3E%3Dyesterday",
    "where=created_at%3E%3D2024-01-01T00:00:00+02:00",  # an unencoded + is a space: not a date
    "where=one_time_use%3Dyes",
    "where=org_id",
    "where=org_id%3D",
    "where=%3D",
    "where=org_id%3Da%00",  # NUL
    "where=description%3D%22%5Cud800%22",  # a JSON-escaped lone surrogate
    "where=description%3D%22open",
    "where=custom.n%3E1e999",
    "where=" + "%2C".join(["org_id%3Da"] * 17),
    "where=description~" + "x" * 1100,
    "&".join(["where=org_id%3Da"] * 17),
    "limit=0", "limit=1001", "limit=abc", "limit=-1", "limit=1&limit=2", "limit=%00",
])
def test_a_bad_filter_or_limit_is_400_and_never_500(api, query):
    r = api.client.get(f"/ssa/search?{query}", headers=api.auth())
    assert_error(r, 400, "invalid_request")


@pytest.mark.parametrize("query", ["where=org_id%3D%ED%A0%80", "where=org_id%3D%FF"])
def test_bytes_that_are_not_utf8_match_nothing(api, query):
    """Starlette decodes a query's bytes with replacement characters (as for GET /ssa)."""
    r = api.client.get(f"/ssa/search?{query}", headers=api.auth())
    assert r.status_code == 200 and r.json() == []


def test_search_needs_the_admin_scope_and_the_feature_flag(api, make_api):
    assert_error(api.client.get("/ssa/search"), 401, "invalid_token")
    for scope in (PORTAL, DEVELOPER):
        r = api.client.get("/ssa/search", headers=api.auth(scope))
        assert_error(r, 401, "unauthorized_client")
        assert f'scope="{ADMIN}"' in r.headers["www-authenticate"]
    off = make_api(enabled=False)
    assert_error(off.client.get("/ssa/search", headers=off.auth()), 403, "access_denied")


def test_search_is_in_the_openapi_document(api):
    operation = api.client.get("/openapi.json").json()["paths"]["/ssa/search"]["get"]
    assert operation["security"] == [{"bearer": [ADMIN]}]
    assert {p["name"] for p in operation["parameters"]} == {"where", "limit"}
    assert {"200", "400", "401", "403"} <= set(operation["responses"])
