"""Scripts see the request's headers without the ones that carry credentials: a script that
keeps what it sees (module globals, a claim) cannot sign one client's token into another's SSA."""

from __future__ import annotations

from tests.test_scripts_http import harness  # noqa: F401  (pytest fixture)

SHOW = 'def create(jwt, context):\n    jwt.claims["seen"] = context.request["headers"]\n    return True\n'

CREDENTIALS = {
    "x-forwarded-access-token": "tok-1",  # oauth2-proxy
    "x-auth-request-access-token": "tok-2",
    "x-auth-request-email": "a@example.com",
    "x-auth-request-user": "alice",
    "x-amzn-oidc-accesstoken": "tok-3",  # AWS ALB
    "x-amzn-oidc-data": "a.b.c",
    "x-amzn-oidc-identity": "alice",
    "x-api-key": "k-1",
    "apikey": "k-2",
    "x_api_key": "k-3",
    "x-session-id": "s-1",
    "x-csrf-token": "c-1",
    "x-client-secret": "cs-1",
    "x-db-password": "pw-1",
    "x-goog-iap-jwt-assertion": "a.b.c",
    "x-ms-token-aad-id-token": "a.b.c",
    "proxy-authorization": "Basic eDp5",
    "cookie": "sid=1",
}
BENIGN = {"x-tenant": "acme", "user-agent": "ua/1", "x-request-id": "r-1", "accept-language": "en"}


def test_credential_headers_never_reach_scripts(harness):
    h = harness({"show.py": SHOW})
    r = h.client.post("/ssa", json={"org_id": "o"}, headers={**h.auth, **CREDENTIALS, **BENIGN})
    assert r.status_code == 201, r.text
    seen = h.claims(r)["seen"]
    leaked = {name for name in CREDENTIALS if name in seen}
    assert not leaked, leaked  # unfixed: all but cookie and proxy-authorization
    assert "authorization" not in seen
    for name, value in BENIGN.items():
        assert seen[name] == value
    assert not any(value in str(seen) for value in CREDENTIALS.values())
