"""Tokens from an external authorization server (issue 16): RFC 9068 JWT access tokens checked
against its discovered JWKS, RFC 7662 introspection for opaque tokens, the built-in token endpoint
turned off.  Each through a real ``ssa-server serve`` and a small issuer made in the test
(``external_issuer.py``) on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest
from jwcrypto import jwk

from external_issuer import INTROSPECTION_CLIENT, INTROSPECTION_SECRET, ExternalIssuer, b64
from ssa_server.external_tokens import well_known_urls
from ssa_server.settings import Settings, SettingsError

ADMIN = "https://jans.io/auth/ssa.admin"
PORTAL = "https://jans.io/auth/ssa.portal"
AUDIENCE = "https://ssa.example/api"
BODY = {"org_id": "acme", "description": "d", "software_id": "s", "software_roles": ["password"],
        "grant_types": ["client_credentials"]}


@pytest.fixture
def issuer():
    server = ExternalIssuer()
    yield server
    server.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refused(r, status: int = 401, error: str = "invalid_token") -> str:
    """The RFC 6750 answer: JSON error and a Bearer challenge; the description."""
    assert r.status_code == status, r.text
    assert r.json()["error"] == error, r.text
    assert r.headers["www-authenticate"].startswith('Bearer realm="ssa-server"'), r.headers
    return r.json()["error_description"]


def creator_of(served, headers, response) -> str:
    jwt = response.json()["ssa"]
    claims = json.loads(base64.urlsafe_b64decode(jwt.split(".")[1] + "=="))
    listed = served.http.get("/ssa", params={"jti": claims["jti"]}, headers=headers)
    assert listed.status_code == 200, listed.text
    return listed.json()[0]["iss"]


def test_settings_refuse_what_cannot_work():
    cases = {
        "needs SSA_EXTERNAL_AUDIENCE": {"external_issuer": "https://as.example"},
        "https URL": {"external_issuer": "http://as.example", "external_audience": "a"},
        "needs SSA_EXTERNAL_ISSUER": {"external_jwks_uri": "https://as.example/jwks"},
        "needs SSA_INTROSPECTION_CLIENT_ID": {"introspection_endpoint": "https://as.example/i"},
        "never the secret itself": {"introspection_endpoint": "https://as.example/i",
                                    "introspection_client_id": "me",
                                    "introspection_client_secret": "hunter2-the-secret"},
        "no token could call": {"token_endpoint_enabled": False},
        "must name a claim": {"external_issuer": "https://as.example", "external_audience": "a",
                              "external_client_claim": ""},
    }
    for words, values in cases.items():
        with pytest.raises(SettingsError) as e:
            Settings(**values)
        assert words in str(e.value), (words, str(e.value))
        assert "hunter2" not in str(e.value)
    ok = Settings(external_issuer="http://127.0.0.1:9/as", external_audience="a",
                  token_endpoint_enabled=False)
    assert ok.external_tokens


def test_discovery_urls_follow_rfc_8414_then_oidc():
    assert well_known_urls("https://as.example") == [
        "https://as.example/.well-known/oauth-authorization-server",
        "https://as.example/.well-known/openid-configuration"]
    assert well_known_urls("https://as.example/tenant/1") == [
        "https://as.example/.well-known/oauth-authorization-server/tenant/1",
        "https://as.example/tenant/1/.well-known/openid-configuration"]


def _hs256_with_public_key(issuer: ExternalIssuer, claims: dict) -> str:
    secret = jwk.JWK(kty="oct", k=b64(issuer.keys["rsa-1"].export_to_pem()))
    return issuer.sign(claims, key=secret, alg="HS256",
                       header={"alg": "HS256", "kid": "rsa-1", "typ": "at+jwt"})


@pytest.mark.slow
def test_jwt_access_tokens_of_the_external_issuer(tmp_path, issuer):
    from faults.served import Served

    env = {"SSA_EXTERNAL_ISSUER": issuer.url, "SSA_EXTERNAL_AUDIENCE": AUDIENCE,
           "SSA_ISSUER": "https://ssa.example",  # the same for both runs (each gets a new port)
           "SSA_EXTERNAL_JWKS_REFETCH_INTERVAL": "1", "SSA_EXTERNAL_TIMEOUT": "1"}
    served = Served(tmp_path, **env).start()
    try:
        good = issuer.sign(issuer.claims(AUDIENCE))
        r = served.http.post("/ssa", json=BODY, headers=bearer(good))
        assert r.status_code == 201, r.text
        assert creator_of(served, bearer(good), r) == "ext-client-1"  # the token's client_id
        discovered = "/.well-known/oauth-authorization-server"
        assert issuer.hits[discovered] == 1 and issuer.hits["/jwks"] == 1
        # Cached: the same token again costs the issuer nothing.
        assert served.http.get("/ssa", headers=bearer(good)).status_code == 200
        assert issuer.hits["/jwks"] == 1

        # EC key, the media-type typ, scopes as a JSON array, a list audience.
        ec = issuer.sign(issuer.claims([AUDIENCE, "other"], scope=[ADMIN], client_id="ext-client-2"),
                         kid="ec-1", header={"alg": "ES256", "kid": "ec-1", "typ": "application/AT+JWT"})
        r = served.http.post("/ssa", json=BODY, headers=bearer(ec))
        assert r.status_code == 201, r.text
        assert creator_of(served, bearer(ec), r) == "ext-client-2"

        # Our own HS256 tokens keep working beside them (the token endpoint is on).
        own = served.token()
        assert served.http.post("/ssa", json=BODY, headers=own).status_code == 201

        now = int(time.time())
        other_rsa = jwk.JWK.generate(kty="RSA", size=2048, kid="rsa-1")  # same kid, another key
        cases = {
            "typ JWT": issuer.sign(issuer.claims(AUDIENCE),
                                   header={"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}),
            "no typ": issuer.sign(issuer.claims(AUDIENCE), header={"alg": "RS256", "kid": "rsa-1"}),
            "wrong iss": issuer.sign(issuer.claims(AUDIENCE, iss=issuer.url + "/")),
            "wrong aud": issuer.sign(issuer.claims("https://elsewhere.example")),
            "no aud": issuer.sign(issuer.claims(AUDIENCE, aud=None)),
            "expired": issuer.sign(issuer.claims(AUDIENCE, exp=now - 31)),
            "no exp": issuer.sign(issuer.claims(AUDIENCE, exp=None)),
            "exp a string": issuer.sign(issuer.claims(AUDIENCE, exp=str(now + 300))),
            "iat ahead": issuer.sign(issuer.claims(AUDIENCE, iat=now + 600)),
            "nbf ahead": issuer.sign(issuer.claims(AUDIENCE, nbf=now + 600)),
            "no client_id": issuer.sign(issuer.claims(AUDIENCE, client_id=None)),
            "HS256 with the public key": _hs256_with_public_key(issuer, issuer.claims(AUDIENCE)),
            "alg none": (b64(json.dumps({"alg": "none", "kid": "rsa-1", "typ": "at+jwt"}).encode()) + "."
                         + b64(json.dumps(issuer.claims(AUDIENCE)).encode()) + "."),
            "RS256 header on the EC key": issuer.sign(
                issuer.claims(AUDIENCE), key=issuer.keys["rsa-1"],
                header={"alg": "RS256", "kid": "ec-1", "typ": "at+jwt"}),
            "another key": issuer.sign(issuer.claims(AUDIENCE), key=other_rsa),
            "unknown kid": issuer.sign(issuer.claims(AUDIENCE), header={"alg": "RS256", "kid": "nope",
                                                                          "typ": "at+jwt"}),
            "not a JWT": "opaque-but-no-introspection",
            "garbage parts": "a.b.c",
        }
        unknown_kid = cases.pop("unknown kid")
        for name, token in cases.items():
            assert refused(served.http.post("/ssa", json=BODY, headers=bearer(token))), name
        # An unknown kid fetches the JWKS again once (past SSA_EXTERNAL_JWKS_REFETCH_INTERVAL since
        # the last fetch: the cases above may take less); a second one within the interval does not.
        time.sleep(1.1)
        assert refused(served.http.post("/ssa", json=BODY, headers=bearer(unknown_kid)))
        assert issuer.hits["/jwks"] == 2
        assert refused(served.http.get("/ssa", headers=bearer(unknown_kid)))
        assert issuer.hits["/jwks"] == 2

        # A token without the SSA scope: 401 unauthorized_client with RFC 6750's insufficient_scope.
        portal = issuer.sign(issuer.claims(AUDIENCE, scope=PORTAL))
        r = served.http.post("/ssa", json=BODY, headers=bearer(portal))
        refused(r, 401, "unauthorized_client")
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        assert served.http.get("/ssa", headers=bearer(portal)).status_code == 200  # portal may list
        refused(served.http.post("/ssa", json=BODY, headers=bearer(issuer.sign(issuer.claims(AUDIENCE,
                                                                                             scope=None)))),
                401, "unauthorized_client")

        # Key rotation at the issuer: the new kid is picked up (one more fetch).
        time.sleep(1.1)
        issuer.rotate("rsa-2")
        rotated = issuer.sign(issuer.claims(AUDIENCE), kid="rsa-2")
        assert served.http.post("/ssa", json=BODY, headers=bearer(rotated)).status_code == 201
        assert issuer.hits["/jwks"] == 3

        log = served.log()
        assert "Traceback" not in log
        for token in [good, ec, rotated, *cases.values()]:
            assert token.split(".")[-1] not in log or len(token.split(".")[-1]) < 8
    finally:
        served.kill()

    # The built-in token endpoint turned off: /token refused, discovery without it, our own
    # tokens (still within their ttl) refused, the external ones still accepted.
    served = Served(tmp_path, **env, SSA_TOKEN_ENDPOINT_ENABLED="false").start()
    try:
        r = served.http.post("/token", data={"grant_type": "client_credentials"})
        assert r.status_code == 404 and r.json()["error"] == "not_found", r.text
        assert "token_endpoint_enabled" in r.json()["error_description"]
        for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
            doc = served.http.get(path).json()
            assert "token_endpoint" not in doc and "token_endpoint_auth_methods_supported" not in doc, doc
            assert doc["ssa_endpoint"]
        assert "not accepted" in refused(served.http.get("/ssa", headers=own))
        assert served.http.post("/ssa", json=BODY, headers=bearer(rotated)).status_code == 201
    finally:
        served.kill()


@pytest.mark.slow
def test_opaque_tokens_by_introspection(tmp_path):
    from faults.served import Served

    issuer = ExternalIssuer(oidc_only=True)
    secret_file = tmp_path / "introspection.secret"
    secret_file.write_text(INTROSPECTION_SECRET + "\n")
    env = {"SSA_INTROSPECTION_ENDPOINT": f"{issuer.url}/introspect",
           "SSA_INTROSPECTION_CLIENT_ID": INTROSPECTION_CLIENT,
           "SSA_INTROSPECTION_CLIENT_SECRET": f"file:{secret_file}",
           "SSA_INTROSPECTION_CACHE_SECONDS": "2", "SSA_EXTERNAL_TIMEOUT": "1",
           "SSA_EXTERNAL_JWKS_REFETCH_INTERVAL": "1",
           "SSA_TOKEN_ENDPOINT_ENABLED": "false",
           # JWTs of the same issuer too, its JWKS found through the OIDC document only
           "SSA_EXTERNAL_ISSUER": issuer.url, "SSA_EXTERNAL_AUDIENCE": AUDIENCE}
    served = Served(tmp_path, **env).start()
    try:
        now = int(time.time())
        active = issuer.opaque({"active": True, "client_id": "opaque-client", "scope": f"{ADMIN} openid",
                                "exp": now + 300, "iss": issuer.url, "token_type": "Bearer"})
        r = served.http.post("/ssa", json=BODY, headers=bearer(active))
        assert r.status_code == 201, r.text
        assert issuer.hits["/introspect"] == 1
        assert creator_of(served, bearer(active), r) == "opaque-client"
        assert issuer.hits["/introspect"] == 1  # the answer is cached ...
        time.sleep(2.1)
        assert served.http.get("/ssa", headers=bearer(active)).status_code == 200
        assert issuer.hits["/introspect"] == 2  # ... for introspection_cache_seconds

        # Concurrent requests with one new token: one question to the endpoint.
        issuer.delay = 0.5
        fresh = issuer.opaque({"active": True, "client_id": "opaque-client", "scope": ADMIN})
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: httpx.get(f"http://127.0.0.1:{served.port}/ssa",
                                                         headers=bearer(fresh), timeout=10).status_code,
                                     range(6)))
        assert statuses == [200] * 6 and issuer.hits["/introspect"] == 3
        issuer.delay = 0.0

        # A JWT of the same issuer is checked by signature, not introspected.
        jwt = issuer.sign(issuer.claims(AUDIENCE))
        assert served.http.get("/ssa", headers=bearer(jwt)).status_code == 200
        assert issuer.hits["/.well-known/openid-configuration"] == 1 and issuer.hits["/introspect"] == 3
        assert issuer.hits["/.well-known/oauth-authorization-server"] == 1  # asked first: 404

        inactive = issuer.opaque({"active": False})
        unknown = "never-issued-token"
        assert "not active" in refused(served.http.get("/ssa", headers=bearer(inactive)))
        refused(served.http.get("/ssa", headers=bearer(unknown)))
        refused(served.http.get("/ssa", headers=bearer(inactive)))  # the negative answer is cached
        assert issuer.hits["/introspect"] == 5
        bad = {
            "expired": {"active": True, "client_id": "c", "scope": ADMIN, "exp": now - 60},
            "another iss": {"active": True, "client_id": "c", "scope": ADMIN, "iss": "https://evil.example"},
            "another aud": {"active": True, "client_id": "c", "scope": ADMIN, "aud": "https://x.example"},
            "active as a string": {"active": "true", "client_id": "c", "scope": ADMIN},
            "no client_id": {"active": True, "scope": ADMIN},
        }
        for name, answer in bad.items():
            assert refused(served.http.get("/ssa", headers=bearer(issuer.opaque(answer)))), name
        no_scope = issuer.opaque({"active": True, "client_id": "c", "scope": PORTAL})
        refused(served.http.post("/ssa", json=BODY, headers=bearer(no_scope)), 401, "unauthorized_client")

        # A silent endpoint, then none at all: 503 temporarily_unavailable, quickly, never 401/500.
        issuer.silent = True
        started = time.monotonic()
        r = served.http.get("/ssa", headers=bearer(issuer.opaque({"active": True, "client_id": "c",
                                                                  "scope": ADMIN})))
        assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable", r.text
        assert time.monotonic() - started < 3.5
        issuer.silent = False
        issuer.close()
        r = served.http.get("/ssa", headers=bearer("another-opaque-token"))
        assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable", r.text
        assert r.headers["retry-after"] == "1"
        assert served.http.get("/ssa", headers=bearer(jwt)).status_code == 200  # verified JWT: cached
        # A JWT naming a new key while the JWKS cannot be fetched: 503 as well.
        time.sleep(1.1)  # past SSA_EXTERNAL_JWKS_REFETCH_INTERVAL
        r = served.http.get("/ssa", headers=bearer(issuer.sign(issuer.claims(AUDIENCE), kid="rsa-9",
                                                               key=issuer.keys["rsa-1"])))
        assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable", r.text
        assert served.http.get("/health/ready").status_code == 200

        log = served.log()
        assert "Traceback" not in log
        for token in (active, inactive, unknown, "another-opaque-token", INTROSPECTION_SECRET):
            assert token not in log
    finally:
        served.kill()
        issuer.close()


def test_an_unreadable_introspection_secret_stops_start_up_in_one_line(tmp_path):
    env = {"SSA_DATA_DIR": str(tmp_path / "data"), "SSA_INTROSPECTION_ENDPOINT": "https://as.example/i",
           "SSA_INTROSPECTION_CLIENT_ID": "me", "SSA_INTROSPECTION_CLIENT_SECRET": "env:SSA_TEST_NOT_SET_X"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SSA_")}
    r = subprocess.run([sys.executable, "-m", "ssa_server", "clients", "list"], capture_output=True,
                       text=True, timeout=60, env={**clean, **env})
    assert r.returncode != 0
    assert "SSA_TEST_NOT_SET_X is not set" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
