"""The SSA endpoints through HTTP: every status and error of the Janssen-compatible API."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import ADMIN, DEVELOPER, PORTAL
from ssa_server.errors import FeatureDisabled, ScriptDenied
from ssa_server.plugins.hookspecs import hookimpl
from ssa_server.service import CallContext
from ssa_server.settings import SIGNING_ALGS
from ssa_server.ssa import CreateRequest

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "k"}


@pytest.fixture(params=["tinydb", "postgresql"])
def store_kind(request) -> str:
    """Every HTTP test here runs against both stores."""
    return request.param


def assert_error(response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "error_description"}
    assert response.json()["error"] == error
    assert response.headers["cache-control"] == "no-store"
    assert "Traceback" not in response.text


# --- create ---
def test_create_full_request(api):
    body = {"org_id": "acme", "description": "d", "software_id": "sw", "software_roles": ["password"],
            "grant_types": ["client_credentials"], "expiration": int(time.time()) + 3600,
            "one_time_use": False, "rotate_ssa": False, "lifetime": 86400, "myCustomAttr1": "v", "junk": 1}
    r = api.create(**body)
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    header, claims = api.verify(r.json()["ssa"])
    assert header["typ"] == "jwt" and header["alg"] == "RS256"
    assert header["kid"] in [k["kid"] for k in api.client.get("/jwks").json()["keys"]]
    for name in ("org_id", "software_id", "software_roles", "grant_types", "lifetime", "myCustomAttr1"):
        assert claims[name] == body[name]
    assert claims["exp"] == body["expiration"] and claims["iss"] == "http://127.0.0.1:8080"
    assert abs(claims["iat"] - time.time()) < 5
    assert "junk" not in claims and "description" not in claims and "one_time_use" not in claims
    (item,) = api.client.get("/ssa", params={"jti": claims["jti"]}, headers=api.auth()).json()
    assert item["ssa"]["myCustomAttr1"] == "v" and "junk" not in item["ssa"]
    assert item["ssa"]["one_time_use"] is False and item["ssa"]["rotate_ssa"] is False


def test_create_defaults(api):
    r = api.create(org_id="o")
    _, claims = api.verify(r.json()["ssa"])
    assert len(claims["software_id"]) == 36 and "lifetime" not in claims
    assert abs(claims["exp"] - (claims["iat"] + 30 * 86400)) <= 1
    item = api.client.get("/ssa", params={"jti": claims["jti"]}, headers=api.auth()).json()[0]["ssa"]
    assert item["one_time_use"] is True and item["rotate_ssa"] is True and item["description"] == ""


@pytest.mark.parametrize("value", [0, -5, None])
def test_non_positive_expiration_means_default(api, value):
    _, claims = api.verify(api.create(expiration=value).json()["ssa"])
    assert claims["exp"] - claims["iat"] == 30 * 86400


def test_past_and_string_expiration_accepted(api):
    past = int(time.time()) - 86400
    r = api.create(expiration=past)
    assert r.status_code == 201
    assert api.verify(r.json()["ssa"])[1]["exp"] == past
    assert api.client.post("/ssa/validation", headers={"jti": api.jti(r)}).status_code == 400
    assert api.verify(api.create(expiration="1999999999").json()["ssa"])[1]["exp"] == 1999999999


@pytest.mark.parametrize("lifetime", [0, -1])
def test_lifetime_below_one_is_invalid_metadata(api, lifetime):
    assert_error(api.create(lifetime=lifetime), 400, "invalid_ssa_metadata")


@pytest.mark.parametrize("body", [
    {"org_id": 5}, {"description": ["x"]}, {"software_id": 1}, {"software_roles": "a"},
    {"grant_types": [1]}, {"expiration": "soon"}, {"one_time_use": "yes"}, {"rotate_ssa": 1},
    {"lifetime": "10"}, {"lifetime": 1.5}, {"expiration": True},
])
def test_wrong_types_are_invalid_request_and_store_nothing(api, body):
    assert_error(api.create(**body), 400, "invalid_request")
    assert api.call(api.server.store.count_ssas) == 0


@pytest.mark.parametrize("raw", [b"{bad", b"[1,2]", b"\"x\"", b"", b"\xff\xfe"])
def test_malformed_bodies_are_invalid_request(api, raw):
    assert_error(api.client.post("/ssa", content=raw, headers=api.auth()), 400, "invalid_request")


@pytest.mark.parametrize("alg", SIGNING_ALGS)
def test_every_alg_signs_and_verifies_against_jwks(make_api, alg):
    a = make_api(signing_alg=alg)
    header, claims = a.verify(a.create(org_id="o").json()["ssa"])
    assert header["alg"] == alg and claims["org_id"] == "o"
    (key,) = a.client.get("/jwks").json()["keys"]
    assert key["kid"] == header["kid"] and key["use"] == "sig" and key["alg"] == alg and key["kty"]
    assert not PRIVATE_MEMBERS & set(key)


# --- get ---
def test_get_filters_and_shape(api):
    creator_headers = api.auth()
    a = api.jti(api.create(creator_headers, org_id="o1"))
    b = api.jti(api.create(creator_headers, org_id="o1"))
    c = api.jti(api.create(creator_headers, org_id="o2"))
    H = api.auth(PORTAL)
    get = lambda **p: api.client.get("/ssa", params=p, headers=H)  # noqa: E731
    assert sorted(i["ssa"]["jti"] for i in get(org_id="o1").json()) == sorted([a, b])
    assert [i["ssa"]["jti"] for i in get(jti=c).json()] == [c]
    assert get(jti=c, org_id="o1").json() == []
    assert get(jti="nope").json() == []
    assert len(get().json()) == 3
    item = get(jti=a).json()[0]
    assert set(item) == {"ssa", "created_at", "expiration", "iss", "status"}
    assert item["status"] == "ACTIVE" and item["iss"] != item["ssa"]["iss"]
    assert set(item["ssa"]) >= {"org_id", "software_id", "software_roles", "grant_types", "iss", "iat", "exp",
                                "jti", "description", "one_time_use", "rotate_ssa"}


def test_developer_sees_only_own(api):
    api.create(org_id="o")
    dev = api.auth(DEVELOPER, ADMIN)
    api.create(dev, org_id="o")
    dev_only = {"Authorization": dev["Authorization"]}
    # The same client, with a token holding only the developer scope:
    cid, secret = api.register(DEVELOPER, ADMIN)
    tok = api.client.post("/token", data={"grant_type": "client_credentials", "scope": ADMIN},
                          auth=(cid, secret)).json()["access_token"]
    mine = api.jti(api.create({"Authorization": f"Bearer {tok}"}, org_id="o"))
    tok_dev = api.client.post("/token", data={"grant_type": "client_credentials", "scope": DEVELOPER},
                              auth=(cid, secret)).json()["access_token"]
    seen = api.client.get("/ssa", headers={"Authorization": f"Bearer {tok_dev}"}).json()
    assert [i["ssa"]["jti"] for i in seen] == [mine]
    assert len(api.client.get("/ssa", headers=dev_only).json()) == 3  # admin+developer sees all


def test_get_leaves_out_non_active(api):
    H = api.auth()
    used = api.jti(api.create(H, org_id="s"))
    api.client.post("/ssa/validation", headers={"jti": used})
    revoked = api.jti(api.create(H, org_id="s"))
    api.client.delete("/ssa", params={"jti": revoked}, headers=H)
    live = api.jti(api.create(H, org_id="s"))
    listed = api.client.get("/ssa", params={"org_id": "s"}, headers=H).json()
    assert [i["ssa"]["jti"] for i in listed] == [live]


# --- jwt ---
def test_get_jwt_resigns(api):
    H = api.auth()
    r = api.create(H, org_id="j", lifetime=60)
    _, original = api.verify(r.json()["ssa"])
    again = api.client.get("/ssa/jwt", params={"jti": original["jti"]}, headers=H)
    assert again.status_code == 200
    _, claims = api.verify(again.json()["ssa"])
    assert {k: claims[k] for k in ("jti", "iat", "exp", "lifetime")} == \
        {k: original[k] for k in ("jti", "iat", "exp", "lifetime")}


def test_get_jwt_errors(api):
    H = api.auth()
    assert_error(api.client.get("/ssa/jwt", params={"jti": "nope"}, headers=H), 400, "invalid_jti")
    assert_error(api.client.get("/ssa/jwt", headers=H), 400, "invalid_jti")
    used = api.jti(api.create(H))
    api.client.post("/ssa/validation", headers={"jti": used})
    assert_error(api.client.get("/ssa/jwt", params={"jti": used}, headers=H), 400, "invalid_jti")
    expired = api.jti(api.create(H, expiration=int(time.time()) - 10))
    assert_error(api.client.get("/ssa/jwt", params={"jti": expired}, headers=H), 400, "invalid_jti")
    r = api.client.get("/ssa/jwt", params={"jti": expired}, headers=api.auth(PORTAL))
    assert_error(r, 401, "unauthorized_client")


# --- validation ---
def test_validation_one_time_and_reusable(api):
    once = api.jti(api.create())
    r = api.client.post("/ssa/validation", headers={"jti": once})
    assert r.status_code == 200 and r.content == b"" and r.headers["cache-control"] == "no-store"
    assert_error(api.client.post("/ssa/validation", headers={"jti": once}), 400, "invalid_jti")
    many = api.jti(api.create(one_time_use=False))
    for _ in range(3):
        assert api.client.post("/ssa/validation", headers={"jti": many}).status_code == 200
    assert_error(api.client.post("/ssa/validation"), 400, "invalid_jti")
    assert_error(api.client.post("/ssa/validation", headers={"jti": "nope"}), 400, "invalid_jti")


def test_concurrent_validation_exactly_one_wins(api):
    jti = api.jti(api.create())
    results: list[int] = []
    barrier = threading.Barrier(20)

    def validate():
        barrier.wait()
        results.append(api.client.post("/ssa/validation", headers={"jti": jti}).status_code)

    threads = [threading.Thread(target=validate) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [400] * 19


# --- revoke ---
def test_revoke_rules(api):
    H = api.auth()
    a = api.jti(api.create(H, org_id="r1"))
    b = api.jti(api.create(H, org_id="r1"))
    c = api.jti(api.create(H, org_id="r2"))
    assert_error(api.client.delete("/ssa", headers=H), 406, "not_acceptable")
    assert_error(api.client.delete("/ssa", params={"jti": c, "org_id": "r1"}, headers=H), 422,
                 "unprocessable_entity")
    r = api.client.delete("/ssa", params={"jti": a}, headers=H)
    assert r.status_code == 200 and r.content == b""
    assert_error(api.client.delete("/ssa", params={"jti": a}, headers=H), 422, "unprocessable_entity")
    assert api.client.get("/ssa", params={"jti": a}, headers=H).json() == []
    assert_error(api.client.post("/ssa/validation", headers={"jti": a}), 400, "invalid_jti")
    assert_error(api.client.get("/ssa/jwt", params={"jti": a}, headers=H), 400, "invalid_jti")
    assert api.client.delete("/ssa", params={"org_id": "r1"}, headers=H).status_code == 200
    record = api.call(api.server.store.get_ssa, b)
    assert record["status"] == "REVOKED" and abs(record["expiration"] - time.time()) < 5
    assert api.client.get("/ssa", params={"jti": c}, headers=H).json() != []
    assert_error(api.client.delete("/ssa", params={"jti": c}, headers=api.auth(PORTAL)), 401,
                 "unauthorized_client")


# --- auth and scopes ---
@pytest.mark.parametrize("method,path", [("POST", "/ssa"), ("GET", "/ssa"), ("DELETE", "/ssa?jti=x"),
                                         ("GET", "/ssa/jwt?jti=x"), ("GET", "/scripts")])
def test_no_or_bad_token(api, method, path):
    r = api.client.request(method, path)
    assert_error(r, 401, "invalid_token")
    assert r.headers["www-authenticate"].startswith("Bearer realm=")
    r = api.client.request(method, path, headers={"Authorization": "Bearer not.a.token"})
    assert_error(r, 401, "invalid_token")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_missing_scope_is_unauthorized_client_with_challenge(api):
    r = api.create(api.auth(PORTAL))
    assert_error(r, 401, "unauthorized_client")
    challenge = r.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and f'scope="{ADMIN}"' in challenge
    assert api.call(api.server.store.count_ssas) == 0


def test_feature_flag_off(make_api):
    a = make_api(enabled=False)
    H = a.auth()
    for method, path in [("POST", "/ssa"), ("GET", "/ssa"), ("DELETE", "/ssa?jti=x"),
                         ("GET", "/ssa/jwt?jti=x"), ("POST", "/ssa/validation")]:
        assert_error(a.client.request(method, path, headers=H), 403, "access_denied")
    assert "ssa_endpoint" not in a.client.get("/.well-known/openid-configuration").json()


def test_feature_flag_is_the_services_rule(make_api):
    """Every SSA operation of ``SsaService`` refuses while the flag is off, whoever calls it; over
    HTTP the flag is checked before the token (as Janssen)."""
    a = make_api(enabled=False)
    service, ctx = a.server.service, CallContext("c", frozenset({ADMIN}))
    for call in (lambda: service.create(CreateRequest(org_id="o"), ctx), lambda: service.list_ssas(ctx),
                 lambda: service.get_jwt("x"), lambda: service.validate("x"),
                 lambda: service.revoke(ctx, jti="x"), lambda: service.save_template("t", {}),
                 lambda: service.template_fields("t"), lambda: service.list_templates()):
        with pytest.raises(FeatureDisabled):
            a.call(call)
    for method, path in [("POST", "/ssa"), ("GET", "/ssa"), ("DELETE", "/ssa?jti=x"),
                         ("GET", "/ssa/jwt?jti=x")]:
        assert_error(a.client.request(method, path), 403, "access_denied")  # no token at all
    assert a.call(a.server.store.count_ssas) == 0 and a.call(a.server.store.list_templates) == []


# --- discovery, jwks, health, errors ---
def test_discovery_documents(api):
    for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        doc = api.client.get(path).json()
        assert doc["issuer"] == "http://127.0.0.1:8080"
        assert doc["jwks_uri"].endswith("/jwks") and doc["token_endpoint"].endswith("/token")
        assert doc["ssa_endpoint"] == "http://127.0.0.1:8080/ssa"
        assert ADMIN in doc["scopes_supported"] and doc["grant_types_supported"] == ["client_credentials"]


def test_health(api):
    assert api.client.get("/health/live").json() == {"status": "UP"}
    ready = api.client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "UP"


def test_unknown_route_and_method_are_json(api):
    assert_error(api.client.get("/nope"), 404, "not_found")
    assert_error(api.client.put("/ssa"), 405, "method_not_allowed")


def test_too_large_body(api):
    assert_error(api.client.post("/ssa", content=b"{" + b" " * 70000 + b"}", headers=api.auth()), 413,
                 "invalid_request")


# --- hooks ---
class AddClaim:
    @hookimpl
    def ssa_create(self, jwt, context):
        jwt.claims["added"] = context["client_id"]
        jwt.header["x-hook"] = "1"


class ChangeJti:
    @hookimpl
    def ssa_create(self, jwt, context):
        jwt.claims["jti"] = "forged"


class Deny:
    @hookimpl
    def ssa_create(self, jwt, context):
        raise ScriptDenied("no SSAs today", error="access_denied")


class GetFalse:
    @hookimpl
    def ssa_get(self, ssa_list, context):
        ssa_list[0]["ssa"]["edited"] = True
        return False


class RevokeBoom:
    @hookimpl
    def ssa_revoke(self, ssa_list, context):
        raise RuntimeError("audit system down")


def test_create_hook_claims_are_signed(api):
    api.server.plugins.register(AddClaim())
    header, claims = api.verify(api.create().json()["ssa"])  # signature verifies
    assert claims["added"] and header["x-hook"] == "1"


def test_hook_changing_jti_fails_and_stores_nothing(api):
    api.server.plugins.register(ChangeJti())
    assert_error(api.create(), 502, "script_failed")
    assert api.call(api.server.store.count_ssas) == 0


def test_hook_denial_is_403_and_stores_nothing(api):
    api.server.plugins.register(Deny())
    assert_error(api.create(), 403, "access_denied")
    assert api.call(api.server.store.count_ssas) == 0


def test_get_hook_false_returns_unmodified_list(api):
    H = api.auth()
    api.create(H, org_id="g")
    api.server.plugins.register(GetFalse())
    assert "edited" not in api.client.get("/ssa", params={"org_id": "g"}, headers=H).json()[0]["ssa"]


def test_revoke_hook_failure_does_not_undo(api):
    H = api.auth()
    jti = api.jti(api.create(H))
    api.server.plugins.register(RevokeBoom())
    assert api.client.delete("/ssa", params={"jti": jti}, headers=H).status_code == 200
    assert api.call(api.server.store.get_ssa, jti)["status"] == "REVOKED"


# --- cleaner and keys ---
def test_cleanup_expires_and_purges(make_api):
    now = [time.time()]
    a = make_api(clock=lambda: now[0], cleanup_grace=100)
    H = a.auth()
    jti = a.jti(a.create(H, expiration=int(now[0]) + 10))
    now[0] += 20
    assert a.call(a.server.cleanup_once) == (1, 0)
    assert a.call(a.server.store.get_ssa, jti)["status"] == "EXPIRED"
    now[0] += 200
    a.client.get("/health/live")
    assert a.call(a.server.cleanup_once)[1] == 1
    assert a.call(a.server.store.get_ssa, jti) is None


def test_rotation_keeps_old_key_published(api):
    H = api.auth()
    old_token = api.create(H).json()["ssa"]
    old_kid = api.verify(old_token)[0]["kid"]
    new = api.call(api.server.keys.rotate, now=True)  # delayed: test_key_rotation.py
    new_kid = api.verify(api.create(H).json()["ssa"])[0]["kid"]
    assert new_kid == new["kid"] != old_kid
    kids = [k["kid"] for k in api.client.get("/jwks").json()["keys"]]
    assert old_kid in kids and new_kid in kids
    api.verify(old_token)  # still verifies


# --- text no store can keep ---
@pytest.mark.parametrize("body", [{"org_id": "a\u0000b"}, {"myCustomAttr1": "v\u0000"},
                                  {"myCustomAttr1": {"k\u0000": 1}}, {"software_roles": ["\u0000"]}])
def test_nul_in_a_body_is_invalid_request(api, body):
    assert_error(api.create(**body), 400, "invalid_request")
    assert api.call(api.server.store.count_ssas) == 0


def test_unpaired_surrogate_is_invalid_request(api):
    r = api.client.post("/ssa", content=b'{"org_id": "\\ud800"}',
                        headers=dict(api.auth(), **{"content-type": "application/json"}))
    assert_error(r, 400, "invalid_request")


def test_nul_in_parameters_and_credentials_is_a_client_error(api):
    H = api.auth()
    for path, name in (("/ssa", "jti"), ("/ssa", "org_id"), ("/ssa/jwt", "jti")):
        assert_error(api.client.get(path, params={name: "a\x00"}, headers=H), 400, "invalid_request")
    assert_error(api.client.delete("/ssa", params={"org_id": "a\x00"}, headers=H), 400, "invalid_request")
    r = api.client.post("/token", data={"grant_type": "client_credentials", "client_id": "a\x00",
                                        "client_secret": "s"})
    assert_error(r, 400, "invalid_request")
    r = api.client.post("/token", data={"grant_type": "client_credentials"}, auth=("a\x00", "s"))
    assert_error(r, 401, "invalid_client")
