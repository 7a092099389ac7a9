"""The consumers' verification kit (``ssa_server.verify``) and ``ssa-server ssa verify`` against
real servers: a valid SSA, key rotation (re-fetch on an unknown kid, rate-limited), revocation
through the status list, expiry, a foreign issuer, the alg allow-list; and an Authlib RFC 7591
registration endpoint that accepts a valid SSA and refuses a revoked one through the kit."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from faults.served import Served
from ssa_server import verify
from ssa_server.verify import SsaVerifier
from test_live_server import cli

pytestmark = pytest.mark.slow
ADMIN = "https://jans.io/auth/ssa.admin"


class Issuer:
    def __init__(self, tmp_path) -> None:
        self.served = Served(tmp_path, SSA_STATUS_LIST_REFRESH="0.1", SSA_STATUS_LIST_TTL="1",
                             SSA_KEY_REFRESH_INTERVAL="0.2").start()
        self.url = f"http://127.0.0.1:{self.served.port}"
        made = json.loads(cli(self.served.data, "clients", "create", "--scope", ADMIN).stdout)
        token = self.served.http.post("/token", data={"grant_type": "client_credentials"},
                                      auth=(made["client_id"], made["client_secret"])).json()["access_token"]
        self.headers = {"Authorization": f"Bearer {token}"}

    def ssa(self, **body) -> str:
        r = self.served.http.post("/ssa", json={"org_id": "acme", **body}, headers=self.headers)
        assert r.status_code == 201, r.text
        return r.json()["ssa"]

    def revoke(self, token: str) -> None:
        jti = verify._b64json(token.split(".")[1])["jti"]
        assert self.served.http.delete("/ssa", params={"jti": jti}, headers=self.headers).status_code == 200


@pytest.fixture
def issuer(tmp_path):
    made = Issuer(tmp_path / "a")
    yield made
    made.served.kill()


class CountingFetch:
    def __init__(self) -> None:
        self.inner = verify.urllib_fetch()
        self.urls: list[str] = []

    def __call__(self, url: str):
        self.urls.append(url)
        return self.inner(url)


def test_valid_ssa_and_the_alg_allow_list(issuer):
    token = issuer.ssa()
    claims = verify.verify_ssa(token, issuer.url)
    assert claims["org_id"] == "acme" and claims["iss"] == issuer.url
    with pytest.raises(verify.AlgorithmNotAllowed):
        verify.verify_ssa(token, issuer.url, algs=("ES256",))
    head, payload, signature = token.split(".")
    with pytest.raises(verify.BadSignature):
        verify.verify_ssa(f"{head}.{payload[:-4]}AAAA.{signature}", issuer.url)
    with pytest.raises(verify.MalformedToken):
        verify.verify_ssa("not.a-jwt", issuer.url)


def test_key_rotation_refetches_once_for_an_unknown_kid(issuer):
    fetch = CountingFetch()
    verifier = SsaVerifier(issuer.url, fetch=fetch, refetch_interval=0.5)
    old = issuer.ssa(one_time_use=False)
    verifier.verify(old)
    # --now: a rotated key is announced before it signs (test_key_rotation); this one signs at once
    rotated = json.loads(cli(issuer.served.data, "keys", "rotate", "--now").stdout)["kid"]
    deadline = time.time() + 10
    while verify._b64json((new := issuer.ssa(one_time_use=False)).split(".")[0])["kid"] != rotated:
        assert time.time() < deadline, "the server did not sign with the rotated key"
        time.sleep(0.1)
    jwks_fetches = sum(u.endswith("/jwks") for u in fetch.urls)
    time.sleep(0.5)
    verifier.verify(new)  # unknown kid: the JWKS is fetched again
    assert sum(u.endswith("/jwks") for u in fetch.urls) == jwks_fetches + 1
    verifier.verify(old)  # the retiring key still verifies
    # A kid nobody published: one re-fetch, then refused without another until the interval passed.
    head = dict(verify._b64json(new.split(".")[0]), kid="made-up")
    import base64

    forged_head = base64.urlsafe_b64encode(json.dumps(head).encode()).rstrip(b"=").decode()
    forged = forged_head + "." + new.split(".", 1)[1]
    time.sleep(0.5)
    before = len(fetch.urls)
    for _ in range(5):
        with pytest.raises(verify.UnknownKey):
            verifier.verify(forged)
    assert sum(u.endswith("/jwks") for u in fetch.urls[before:]) == 1


def test_revocation_through_the_status_list_and_its_ttl_cache(issuer):
    token = issuer.ssa(one_time_use=False)
    verifier = SsaVerifier(issuer.url)
    verifier.verify(token)
    issuer.revoke(token)
    time.sleep(0.3)
    verifier.verify(token)  # the list is cached for its ttl (1 s): not yet seen
    deadline = time.time() + 5
    while True:
        try:
            verifier.verify(token)
        except verify.Revoked:
            break
        assert time.time() < deadline, "the revocation never showed"
        time.sleep(0.2)
    with pytest.raises(verify.Revoked):
        verify.verify_ssa(token, issuer.url)


def test_one_time_use_shows_as_revoked_and_status_endpoint_fallback(issuer):
    token = issuer.ssa()
    jti = verify._b64json(token.split(".")[1])["jti"]
    assert issuer.served.http.post("/ssa/validation", headers={"jti": jti}).status_code == 200
    time.sleep(0.2)
    with pytest.raises(verify.Revoked):
        verify.verify_ssa(token, issuer.url)
    verifier = SsaVerifier(issuer.url)
    with pytest.raises(verify.Revoked):
        verifier._ask_status_endpoint(jti)  # an SSA without a list entry is asked about at the endpoint
    verifier._ask_status_endpoint(verify._b64json(issuer.ssa().split(".")[1])["jti"])


def test_expired_and_leeway(issuer):
    token = issuer.ssa(expiration=int(time.time()) - 30)
    with pytest.raises(verify.Expired):
        verify.verify_ssa(token, issuer.url, leeway=0)
    verify.verify_ssa(token, issuer.url, leeway=120, check_status=False)


def test_foreign_issuer_is_refused(issuer, tmp_path):
    other = Issuer(tmp_path / "b")
    try:
        token = other.ssa()
        with pytest.raises((verify.UnknownKey, verify.WrongIssuer)):
            verify.verify_ssa(token, issuer.url)
        with pytest.raises(verify.IssuerUnreachable):
            verify.verify_ssa(token, "http://127.0.0.1:9")
    finally:
        other.served.kill()


def test_cli_verdict_and_exit_codes(issuer):
    def run(*args: str):
        return subprocess.run([sys.executable, "-m", "ssa_server", "ssa", "verify", *args],
                              capture_output=True, text=True, timeout=60, check=False)

    token = issuer.ssa(one_time_use=False)
    r = run(token, "--issuer", issuer.url)
    assert r.returncode == 0 and json.loads(r.stdout)["valid"] is True, r.stderr
    issuer.revoke(token)
    time.sleep(0.3)
    r = run(token, "--issuer", issuer.url)
    assert r.returncode == 3 and json.loads(r.stdout) == {
        "valid": False, "error": "revoked", "error_description": json.loads(r.stdout)["error_description"]}
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run(token, "--issuer", "http://127.0.0.1:9")
    assert r.returncode == 1 and json.loads(r.stdout)["error"] == "issuer_unreachable"


def test_authlib_registration_endpoint_accepts_valid_refuses_revoked(issuer):
    pytest.importorskip("authlib")
    from authlib.oauth2.rfc6749.requests import JsonPayload, JsonRequest
    from authlib.oauth2.rfc7591 import ClientRegistrationEndpoint
    from authlib.oauth2.rfc7591.errors import InvalidSoftwareStatementError

    class Payload(JsonPayload):  # what a framework integration (Flask, Django) provides
        def __init__(self, data: dict) -> None:
            self._data = data

        @property
        def data(self) -> dict:
            return self._data

    verifier = SsaVerifier(issuer.url)
    registered: list[dict] = []

    class Registration(ClientRegistrationEndpoint):  # the recipe of docs/consumers.md
        software_statement_alg_values_supported = ("RS256", "ES256", "PS256", "EdDSA")

        def authenticate_token(self, request):
            return "initial-access-token"

        def resolve_public_key(self, request):
            statement = request.payload.data["software_statement"]
            try:
                verifier.verify(statement)  # iss, exp, alg, status: refused here if revoked
            except verify.VerificationError as e:
                raise InvalidSoftwareStatementError(description=str(e)) from None
            return verifier.public_key(statement)

        def get_server_metadata(self):
            return {}

        def save_client(self, client_info, client_metadata, request):
            registered.append({**client_info, **client_metadata})
            return registered[-1]

    def register(statement: str):
        request = JsonRequest("POST", "https://as.example/register")
        request.payload = Payload({"software_statement": statement, "client_name": "scanner",
                                   "grant_types": ["client_credentials"]})
        return Registration()(request)

    token = issuer.ssa(one_time_use=False, grant_types=["client_credentials"])
    status, body, _ = register(token)
    assert status == 201 and body["client_id"] and registered
    issuer.revoke(token)
    time.sleep(1.3)  # the kit's cached list lives for its ttl (1 s)
    with pytest.raises(InvalidSoftwareStatementError):
        register(token)
    assert len(registered) == 1


def test_the_kit_loads_nothing_of_the_server():
    code = ("import sys, ssa_server.verify; "
            "print(sorted(m for m in sys.modules if m.startswith(('ssa_server', 'starlette', 'uvicorn', "
            "'tinydb', 'psycopg', 'pluggy', 'RestrictedPython'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert json.loads(out.replace("'", '"')) == ["ssa_server", "ssa_server.verify"]
