"""private_key_jwt client authentication at POST /token (RFC 7523 §2.2, §3; OIDC Core §9), both stores.

The app through TestClient for the rules and the fuzz; real servers (``Served``) for the CLI's
registration, a jwks_uri served on 127.0.0.1, the replay cache shared by two PostgreSQL nodes and
export/import.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from jwcrypto import jwk, jws

from conftest import ADMIN, truncate
from test_api_ssa import assert_error

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ISSUER = "http://127.0.0.1:8080"  # the TestClient servers' default issuer


@pytest.fixture(params=["tinydb", "postgresql"])
def store_kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def keys() -> dict[str, jwk.JWK]:
    return {"RS256": jwk.JWK.generate(kty="RSA", size=2048, kid="rsa-1"),
            "PS256": jwk.JWK.generate(kty="RSA", size=2048, kid="rsa-2"),
            "ES256": jwk.JWK.generate(kty="EC", crv="P-256", kid="ec-1"),
            "EdDSA": jwk.JWK.generate(kty="OKP", crv="Ed25519", kid="ed-1")}


def public_set(*ks: jwk.JWK) -> dict:
    return {"keys": [k.export_public(as_dict=True) for k in ks]}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(key: jwk.JWK, claims: dict, alg: str = "RS256", header: dict | None = None) -> str:
    token = jws.JWS(json.dumps(claims))
    token.add_signature(key, alg=alg, protected=json.dumps(header or {"alg": alg, "kid": key.kid}))
    return token.serialize(compact=True)


def claims_for(client_id: str, now: float | None = None, aud: object = f"{ISSUER}/token", **changes) -> dict:
    now = int(now if now is not None else time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": aud, "iat": now, "exp": now + 60,
              "jti": str(uuid.uuid4())}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def token_form(assertion: str, **extra: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion, **extra}


def register(api, *ks: jwk.JWK, jwks_uri: str | None = None) -> str:
    record, secret = api.call(api.server.clients.create, [ADMIN], "pk",
                              jwks=public_set(*ks) if ks else None, jwks_uri=jwks_uri)
    assert secret is None and record["token_endpoint_auth_method"] == "private_key_jwt"
    return record["client_id"]


def test_each_allowed_alg_gets_a_token_that_works(api, keys):
    for alg, key in keys.items():
        cid = register(api, key)
        for aud in (f"{ISSUER}/token", ISSUER, [ISSUER, "https://other.example"]):
            r = api.client.post("/token", data=token_form(sign(key, claims_for(cid, aud=aud), alg)))
            assert r.status_code == 200, (alg, r.text)
        bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
        assert api.client.get("/ssa", headers=bearer).status_code == 200
    # One key without kid in the assertion: the client's only key.
    cid = register(api, keys["ES256"])
    r = api.client.post("/token", data=token_form(sign(keys["ES256"], claims_for(cid), "ES256",
                                                       header={"alg": "ES256"})))
    assert r.status_code == 200, r.text


def test_a_jti_is_used_once_and_purged_after_its_exp(make_api, keys):
    now = [time.time()]
    api = make_api(clock=lambda: now[0])
    cid = register(api, keys["RS256"])
    assertion = sign(keys["RS256"], claims_for(cid, now[0]))
    assert api.client.post("/token", data=token_form(assertion)).status_code == 200
    r = api.client.post("/token", data=token_form(assertion))
    assert_error(r, 401, "invalid_client")
    assert "used already" in r.json()["error_description"]
    assert len(api.call(api.server.store.list_assertions)) == 1
    now[0] += 60 + 30 + 1  # past exp and the leeway: the cleaner purges the entry
    api.call(api.server.cleanup_once)
    assert api.call(api.server.store.list_assertions) == []
    assert_error(api.client.post("/token", data=token_form(assertion)), 401, "invalid_client")  # expired


def _hs256_with_public_key(key: jwk.JWK, claims: dict) -> str:
    """The classic confusion: HS256 'signed' with the client's public key as the secret."""
    pem = key.export_to_pem()  # the public key's PEM
    secret = jwk.JWK(kty="oct", k=b64(pem))
    return sign(secret, claims, "HS256", header={"alg": "HS256", "kid": key.kid})


def _unsigned(claims: dict, kid: str) -> str:
    return f"{b64(json.dumps({'alg': 'none', 'kid': kid}).encode())}.{b64(json.dumps(claims).encode())}.x"


def test_refused_assertions_are_invalid_client_never_500(make_api, keys):
    api = make_api(token_failures_per_client=100)  # every case fails for the one client id
    rsa, ec = keys["RS256"], keys["ES256"]
    cid = register(api, rsa)
    other = jwk.JWK.generate(kty="RSA", size=2048, kid="rsa-1")  # same kid, another key
    secret_client, secret = api.register(ADMIN)
    now = time.time()
    cases = {
        "alg none": _unsigned(claims_for(cid), rsa.kid),
        "HS256 with the public key": _hs256_with_public_key(rsa, claims_for(cid)),
        "RS384 not allowed": sign(rsa, claims_for(cid), "RS384"),
        "ES256 header on an RSA key": sign(ec, claims_for(cid), "ES256",
                                           header={"alg": "ES256", "kid": rsa.kid}),
        "another key": sign(other, claims_for(cid)),
        "unknown kid": sign(rsa, claims_for(cid), header={"alg": "RS256", "kid": "nope"}),
        "wrong aud": sign(rsa, claims_for(cid, aud="https://elsewhere.example/token")),
        "aud missing": sign(rsa, claims_for(cid, aud=None)),
        "expired": sign(rsa, claims_for(cid, exp=int(now) - 31)),
        "exp too far": sign(rsa, claims_for(cid, exp=int(now) + 3600)),
        "iat ahead": sign(rsa, claims_for(cid, iat=int(now) + 600)),
        "nbf ahead": sign(rsa, claims_for(cid, nbf=int(now) + 600)),
        "iat a string": sign(rsa, claims_for(cid, iat="now")),
        "iss not sub": sign(rsa, claims_for(cid, iss="someone")),
        "unknown client": sign(rsa, claims_for(str(uuid.uuid4()))),
        "a secret client": sign(rsa, claims_for(secret_client)),
    }
    for name, assertion in cases.items():
        r = api.client.post("/token", data=token_form(assertion))
        assert (r.status_code, r.json()["error"]) == (401, "invalid_client"), (name, r.text)
    # A private_key_jwt client has no secret to present.
    assert_error(api.client.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, "")),
                 401, "invalid_client")
    # A stored jwks_uri the registration rules refuse (as an import could bring): never fetched.
    plain = {"client_id": "imported", "name": "", "secret_hash": "", "scopes": [ADMIN], "created_at": 1,
             "token_endpoint_auth_method": "private_key_jwt", "jwks_uri": "http://example.com/jwks"}
    api.call(api.server.store.add_client, plain)
    r = api.client.post("/token", data=token_form(sign(rsa, claims_for("imported"))))
    assert (r.status_code, r.json()["error"]) == (401, "invalid_client"), r.text
    # The client_id parameter, when given, must be the assertion's subject.
    r = api.client.post("/token", data=token_form(sign(rsa, claims_for(cid)), client_id=secret_client))
    assert_error(r, 401, "invalid_client")


def test_malformed_assertions_are_invalid_request(api, keys):
    rsa = keys["RS256"]
    cid = register(api, rsa)
    deep = "[" * 5000 + "]" * 5000
    head = b64(json.dumps({"alg": "RS256", "kid": rsa.kid}).encode())
    body = b64(json.dumps(claims_for(cid)).encode())
    cases = {
        "not a JWT": "hello",
        "empty parts": "..",
        "not base64 JSON": "a.b.c",
        "huge": head + "." + "A" * 9000 + ".sig",
        "deep header": f"{b64(deep.encode())}.{b64(b'{}')}.sig",
        "header a list": f"{b64(b'[]')}.{body}.sig",
        "claims a number": f"{head}.{b64(b'7')}.sig",
        "no jti": sign(rsa, claims_for(cid, jti=None)),
        "jti a number": sign(rsa, claims_for(cid, jti=5)),
        "jti too long": sign(rsa, claims_for(cid, jti="j" * 300)),
        "no exp": sign(rsa, claims_for(cid, exp=None)),
        "exp a string": sign(rsa, claims_for(cid, exp="soon")),
        "exp a float": sign(rsa, claims_for(cid, exp=time.time() + 30)),
        "sub a list": sign(rsa, claims_for(cid, sub=[cid])),
        "alg a number": f"{b64(json.dumps({'alg': 1}).encode())}.{body}.s",
    }
    for name, assertion in cases.items():
        r = api.client.post("/token", data=token_form(assertion))
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", (name, r.status_code, r.text)
    good = sign(rsa, claims_for(cid))
    for form in ({"grant_type": "client_credentials", "client_assertion": good},  # no assertion type
                 token_form(good, client_assertion_type="urn:other"),
                 token_form("", client_assertion_type=JWT_BEARER),
                 token_form(good, client_secret="x")):  # two methods
        assert_error(api.client.post("/token", data=form), 400, "invalid_request")
    assert_error(api.client.post("/token", data=token_form(good), auth=(cid, "x")), 400, "invalid_request")


def test_failed_assertions_are_throttled_per_client(make_api, keys):
    api = make_api(token_failures_per_client=3)
    cid = register(api, keys["RS256"])
    bad = jwk.JWK.generate(kty="RSA", size=2048, kid="rsa-1")
    for _ in range(3):
        assert_error(api.client.post("/token", data=token_form(sign(bad, claims_for(cid)))), 401,
                     "invalid_client")
    r = api.client.post("/token", data=token_form(sign(keys["RS256"], claims_for(cid))))
    assert_error(r, 429, "slow_down")  # a right assertion too, while the window lasts
    assert int(r.headers["retry-after"]) >= 1


def test_registration_refuses_keys_that_cannot_authenticate(api, keys):
    from ssa_server.errors import ApiError

    private = keys["RS256"].export_private(as_dict=True)
    weak = jwk.JWK.generate(kty="RSA", size=1024).export_public(as_dict=True)
    oct_key = jwk.JWK.generate(kty="oct", size=256).export(as_dict=True)
    for bad in (private, weak, oct_key, {"kty": "RSA"}, {"keys": []}, [1], {"kty": "EC", "crv": "P-384",
                                                                          "x": "AA", "y": "AA"}):
        with pytest.raises(ApiError) as e:
            api.call(api.server.clients.create, [ADMIN], "x", jwks=bad)
        assert e.value.error == "invalid_client_metadata"
    for bad_uri in ("http://example.com/jwks", "ftp://127.0.0.1/jwks", "https:///jwks", "jwks"):
        with pytest.raises(ApiError) as e:
            api.call(api.server.clients.create, [ADMIN], "x", jwks_uri=bad_uri)
        assert e.value.error == "invalid_client_metadata"
    for good_uri in ("https://client.example/jwks", "http://127.0.0.1:9/jwks", "http://[::1]:9/jwks",
                     "http://localhost:9/jwks"):
        api.call(api.server.clients.create, [ADMIN], "x", jwks_uri=good_uri)
    stored = api.call(api.server.store.list_clients)
    assert len(stored) == 4 and all(c["jwks_uri"] for c in stored)  # nothing of the refused ones


def test_discovery_lists_private_key_jwt(api):
    doc = api.client.get("/.well-known/openid-configuration").json()
    assert "private_key_jwt" in doc["token_endpoint_auth_methods_supported"]
    algs = doc["token_endpoint_auth_signing_alg_values_supported"]
    assert {"RS256", "PS256", "ES256", "EdDSA"} <= set(algs)
    assert not [a for a in algs if a == "none" or a.startswith("HS")]


# --- real servers ---
class JwksServer:
    """A client's key set on 127.0.0.1, counting fetches; /redirect, /huge, /deep and /silent misbehave."""

    def __init__(self) -> None:
        self.body = b'{"keys": []}'
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/jwks":
                    outer.fetches += 1
                    self._send(200, outer.body)
                elif self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/jwks")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/deep":
                    self._send(200, b'{"keys": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
                elif self.path == "/huge":
                    self._send(200, b'{"keys": [' + b" " * (2 << 20) + b"]}")
                elif self.path == "/silent":
                    time.sleep(4)  # past the server's fetch deadline (2 x SSA_CLIENT_JWKS_TIMEOUT=1)
                    self._send(200, outer.body)
                else:
                    self._send(404, b"{}")

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server():
    server = JwksServer()
    yield server
    server.close()


def run_cli(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SSA_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "ssa_server", *args], capture_output=True, text=True,
                          timeout=60, env=full, input=stdin)


def cli_json(*args: str, env: dict[str, str], stdin: str | None = None):
    r = run_cli(*args, env=env, stdin=stdin)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_live_server_with_a_jwk_file_and_a_jwks_uri(tmp_path, store_settings, jwks_server, keys):
    from faults.served import Served

    env = {"SSA_DATA_DIR": str(tmp_path / "data"), "SSA_CLIENT_JWKS_TIMEOUT": "1",
           "SSA_CLIENT_JWKS_REFETCH_INTERVAL": "1"}
    if "store_url" in store_settings:
        env["SSA_STORE_URL"] = store_settings["store_url"]
    served = Served(tmp_path, **env).start()
    try:
        issuer = f"http://127.0.0.1:{served.port}"
        key_file = tmp_path / "client.jwk"
        key_file.write_text(keys["ES256"].export_public())
        made = cli_json("clients", "create", "--scope", ADMIN, "--jwk", str(key_file), env=env)
        assert "client_secret" not in made and made["token_endpoint_auth_method"] == "private_key_jwt"
        by_file = made["client_id"]

        def post(key: jwk.JWK, cid: str, alg: str, **claims):
            c = claims_for(cid, aud=f"{issuer}/token", **claims)
            return served.http.post("/token", data=token_form(sign(key, c, alg)))

        r = post(keys["ES256"], by_file, "ES256")
        assert r.status_code == 200, r.text
        bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
        assert served.http.get("/ssa", headers=bearer).status_code == 200

        # A private key or a plain-http remote jwks_uri: one line, exit 1, nothing stored.
        key_file.write_text(keys["ES256"].export_private())
        bad = run_cli("clients", "create", "--scope", ADMIN, "--jwk", str(key_file), env=env)
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
        assert "private" in bad.stderr and "Traceback" not in bad.stderr
        bad = run_cli("clients", "create", "--scope", ADMIN, "--jwks-uri", "http://example.com/j", env=env)
        assert bad.returncode == 1 and "https" in bad.stderr
        os.mkfifo(tmp_path / "fifo")  # nobody writes to it: refused, not waited on
        bad = run_cli("clients", "create", "--scope", ADMIN, "--jwk", str(tmp_path / "fifo"), env=env)
        assert bad.returncode == 1 and "not a regular file" in bad.stderr
        assert [c["client_id"] for c in cli_json("clients", "list", env=env)] == [by_file]

        jwks_server.body = json.dumps(public_set(keys["RS256"])).encode()
        by_uri = cli_json("clients", "create", "--scope", ADMIN, "--jwks-uri", f"{jwks_server.url}/jwks",
                          env=env)["client_id"]
        assert post(keys["RS256"], by_uri, "RS256").status_code == 200
        assert post(keys["RS256"], by_uri, "RS256").status_code == 200  # cached: no second fetch
        assert jwks_server.fetches == 1
        # An unknown kid: fetched again once, then not before the refetch interval.
        time.sleep(1.1)
        assert post(keys["PS256"], by_uri, "PS256").status_code == 401
        assert post(keys["PS256"], by_uri, "PS256").status_code == 401
        assert jwks_server.fetches == 2
        jwks_server.body = json.dumps(public_set(keys["RS256"], keys["PS256"])).encode()  # the client rotates
        time.sleep(1.1)
        assert post(keys["PS256"], by_uri, "PS256").status_code == 200
        assert jwks_server.fetches == 3

        listed = {c["client_id"]: c for c in cli_json("clients", "list", env=env)}
        assert listed[by_uri]["token_endpoint_auth_method"] == "private_key_jwt"
        assert listed[by_uri]["jwks_uri"] == f"{jwks_server.url}/jwks"
        assert listed[by_file]["jwks"] == public_set(keys["ES256"])
        assert [c for c in listed.values() if c["token_endpoint_auth_method"] == "client_secret_basic"] == []

        # A redirect is not followed, a huge key set is cut off, a deep one refused, a silent server
        # is given up on.
        for path in ("/redirect", "/huge", "/deep", "/silent"):
            cid = cli_json("clients", "create", "--scope", ADMIN, "--jwks-uri", f"{jwks_server.url}{path}",
                           env=env)["client_id"]
            started = time.monotonic()
            r = post(keys["RS256"], cid, "RS256")
            assert r.status_code == 401 and r.json()["error"] == "invalid_client", (path, r.text)
            assert time.monotonic() - started < 3.5, path
        assert served.http.get("/health/ready").status_code == 200
        assert "Traceback" not in served.log()
    finally:
        served.kill()


@pytest.mark.slow
def test_concurrent_replays_on_two_postgresql_nodes_one_wins(tmp_path, pg_url, keys):
    from test_scale_out import Node

    truncate(pg_url)
    env = {"SSA_STORE_URL": pg_url}
    key_file = tmp_path / "client.jwk"
    key_file.write_text(keys["RS256"].export_public())
    cid = cli_json("clients", "create", "--scope", ADMIN, "--jwk", str(key_file), env=env)["client_id"]
    nodes = [Node(pg_url, tmp_path), Node(pg_url, tmp_path)]
    try:
        for _ in range(3):
            assertion = sign(keys["RS256"], claims_for(cid, aud="https://ssa.example.test/token"))
            barrier = threading.Barrier(8)
            statuses: list[int] = []

            def replay(node, barrier=barrier, statuses=statuses, assertion=assertion) -> None:
                barrier.wait()
                statuses.append(node.http.post("/token", data=token_form(assertion)).status_code)

            threads = [threading.Thread(target=replay, args=(nodes[i % 2],)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert sorted(statuses) == [200] + [401] * 7
    finally:
        for node in nodes:
            node.stop()


def by_id(clients: list[dict]) -> dict[str, dict]:
    """Clients made in the same second are listed in id order by PostgreSQL, in creation order by TinyDB."""
    return {c["client_id"]: c for c in clients}


@pytest.mark.slow
def test_export_import_carries_the_client_keys(tmp_path, pg_url, keys):
    truncate(pg_url)
    tiny = {"SSA_DATA_DIR": str(tmp_path / "tiny")}
    key_file = tmp_path / "client.jwk"
    key_file.write_text(json.dumps(public_set(keys["EdDSA"], keys["ES256"])))
    cli_json("clients", "create", "--scope", ADMIN, "--jwk", str(key_file), env=tiny)
    cli_json("clients", "create", "--scope", ADMIN, "--jwks-uri", "https://client.example/jwks", env=tiny)
    dump = tmp_path / "export.jsonl"
    assert run_cli("store", "export", "-o", str(dump), env=tiny).returncode == 0
    report = cli_json("store", "import", str(dump), env={"SSA_STORE_URL": pg_url})
    assert report["clients"] == {"read": 2, "imported": 2, "skipped": 0}
    original = by_id(cli_json("clients", "list", env=tiny))
    assert by_id(cli_json("clients", "list", env={"SSA_STORE_URL": pg_url})) == original
    back = {"SSA_DATA_DIR": str(tmp_path / "back")}
    exported = run_cli("store", "export", env={"SSA_STORE_URL": pg_url}).stdout
    cli_json("store", "import", "-", env=back, stdin=exported)
    assert by_id(cli_json("clients", "list", env=back)) == original
    # An import line whose client has private_key_jwt but no keys is refused, naming the line.
    record = {"client_id": "c", "name": "", "secret_hash": "", "scopes": [], "created_at": 1,
              "token_endpoint_auth_method": "private_key_jwt"}
    r = run_cli("store", "import", "-", env={"SSA_DATA_DIR": str(tmp_path / "bad")},
                stdin=json.dumps({"table": "clients", "record": record}) + "\n")
    assert r.returncode == 1 and "line 1" in r.stderr and "Traceback" not in r.stderr


def test_a_cold_key_set_cache_lets_concurrent_callers_wait_for_one_fetch(keys):
    """Two first assertions of a jwks_uri client at once: the second waits for the first's fetch
    instead of being refused as an unknown kid while it runs (and there is one fetch)."""
    from ssa_server.verify import KeySetCache

    fetched: list[str] = []

    def slow_fetch(url: str) -> tuple[int, bytes]:
        fetched.append(url)
        time.sleep(0.3)
        return 200, json.dumps(public_set(keys["RS256"])).encode()

    cache = KeySetCache(lambda: "https://client.example/jwks", slow_fetch, refetch_interval=30)
    found: list[object] = []

    def first_use() -> None:
        try:
            found.append(cache.key("rsa-1").kid)
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            found.append(type(e).__name__)

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert found == ["rsa-1", "rsa-1"] and len(fetched) == 1
