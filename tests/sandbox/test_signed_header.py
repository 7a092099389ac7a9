"""What the server signs stays under its rules: a script may set only unregistered JOSE header
parameters, and the server-owned claims keep their type as well as their value.

Through the app with a scripts folder (one server per mode, the script rewritten per case), and
once with a trusted plugin, to show the server checks again what the worker already checked.
"""

from __future__ import annotations

import json

import pytest
from jwcrypto import jwk, jwt
from starlette.testclient import TestClient

from ssa_server.app import create_app
from ssa_server.plugins.hookspecs import hookimpl
from ssa_server.server import Server
from ssa_server.settings import Settings

ADMIN = "https://jans.io/auth/ssa.admin"

# (case id, the parameter a script must not touch, the statement that touches it)
REGISTERED: list[tuple[str, str, str]] = [
    ("crit", "crit", 'jwt.header["crit"] = ["x-tenant"]\n    jwt.header["x-tenant"] = "a"'),
    ("b64_false", "b64", 'jwt.header["b64"] = False'),
    ("jku", "jku", 'jwt.header["jku"] = "https://attacker.example/jwks"'),
    ("x5u", "x5u", 'jwt.header["x5u"] = "https://attacker.example/cert.pem"'),
    ("jwk", "jwk", 'jwt.header["jwk"] = {"kty": "oct", "k": "c2VjcmV0"}'),
    ("x5c", "x5c", 'jwt.header["x5c"] = ["MIIBszCCAVmgAwIBAgIU"]'),
    ("zip", "zip", 'jwt.header["zip"] = "DEF"'),
    ("cty", "cty", 'jwt.header["cty"] = "JWT"'),
    ("typ_at_jwt", "typ", 'jwt.header["typ"] = "at+jwt"'),
    ("typ_deleted", "typ", 'del jwt.header["typ"]'),
    ("typ_case", "typ", 'jwt.header["typ"] = "JWT"'),
    ("x5t", "x5t", 'jwt.header["x5t"] = "abc"'),
    ("x5t_s256", "x5t#S256", 'jwt.header["x5t#S256"] = "abc"'),
    ("enc", "enc", 'jwt.header["enc"] = "A128GCM"'),
    ("epk", "epk", 'jwt.header["epk"] = {"kty": "EC"}'),
    ("apu", "apu", 'jwt.header["apu"] = "x"'),
    ("p2c", "p2c", 'jwt.header["p2c"] = 1000'),
    ("iss", "iss", 'jwt.header["iss"] = "https://attacker.example"'),
    ("aud", "aud", 'jwt.header["aud"] = "rp"'),
    ("url", "url", 'jwt.header["url"] = "https://attacker.example"'),
    ("nonce", "nonce", 'jwt.header["nonce"] = "n"'),
    ("ppt", "ppt", 'jwt.header["ppt"] = "shaken"'),
    ("svt", "svt", 'jwt.header["svt"] = "x"'),
    ("trust_chain", "trust_chain", 'jwt.header["trust_chain"] = ["a.b.c"]'),
    ("alg", "alg", 'jwt.header["alg"] = "none"'),
    ("kid", "kid", 'jwt.header["kid"] = "attacker"'),
    ("iat_float", "iat", 'jwt.claims["iat"] = float(jwt.claims["iat"])'),
    ("iat_str", "iat", 'jwt.claims["iat"] = str(jwt.claims["iat"])'),
    ("iat_plus_float", "iat", 'jwt.claims["iat"] = jwt.claims["iat"] + 0.0'),
    ("jti_deleted", "jti", 'del jwt.claims["jti"]'),
]


def script(statement: str) -> str:
    # The claim shows whether the script's other changes were kept.
    return f'def create(jwt, context):\n    jwt.claims["touched"] = True\n    {statement}\n    return True\n'


def make_env(tmp_path, on_error: str):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    server = Server.build(Settings(data_dir=tmp_path / "data", scripts_dir=scripts, script_workers=1,
                                   on_script_error=on_error, script_reload_interval=60))
    client = TestClient(create_app(server=server), raise_server_exceptions=False)
    client.__enter__()
    record, secret = client.portal.call(server.clients.create, [ADMIN], "hdr")
    token = client.post("/token", data={"grant_type": "client_credentials"},
                        auth=(record["client_id"], secret)).json()["access_token"]
    return server, client, {"Authorization": f"Bearer {token}"}, scripts


@pytest.fixture(scope="module")
def fail_env(tmp_path_factory):
    env = make_env(tmp_path_factory.mktemp("fail"), "fail")
    yield env
    env[1].__exit__(None, None, None)


@pytest.fixture(scope="module")
def skip_env(tmp_path_factory):
    env = make_env(tmp_path_factory.mktemp("skip"), "skip")
    yield env
    env[1].__exit__(None, None, None)


def install(env, source: str) -> None:
    server, _, _, scripts = env
    (scripts / "hdr.py").write_text(source)
    server.scripts.reload()
    assert server.scripts.scripts["hdr"].state == "loaded", server.scripts.scripts["hdr"].last_error


def verified(client: TestClient, token: str) -> tuple[dict, dict]:
    """Header and claims, after jwcrypto verified the signature against /jwks (crit honoured)."""
    keys = jwk.JWKSet.from_json(client.get("/jwks").text)
    checked = jwt.JWT(jwt=token, key=keys, check_claims=False)
    return checked.token.jose_header, json.loads(checked.claims)


def count(env) -> int:
    server, client, _, _ = env
    return client.portal.call(server.store.count_ssas)


@pytest.mark.parametrize("case,name,statement", REGISTERED, ids=[c for c, _, _ in REGISTERED])
def test_registered_parameters_and_protected_claims_refused_in_fail_mode(fail_env, case, name, statement):
    server, client, auth, _ = fail_env
    install(fail_env, script(statement))
    before = count(fail_env)
    r = client.post("/ssa", json={"org_id": "h"}, headers=auth)
    assert r.status_code == 502, (r.status_code, r.text)  # unfixed: 201, signed as the script set it
    assert r.json()["error"] == "script_failed" and "hdr" in r.json()["error_description"]
    assert count(fail_env) == before
    error = server.scripts.scripts["hdr"].last_error
    assert f"'{name}'" in error, error  # the script error names the parameter


@pytest.mark.parametrize("case,name,statement", REGISTERED, ids=[c for c, _, _ in REGISTERED])
def test_registered_parameters_and_protected_claims_dropped_in_skip_mode(skip_env, case, name, statement):
    server, client, auth, _ = skip_env
    install(skip_env, script(statement))
    before = count(skip_env)
    r = client.post("/ssa", json={"org_id": "h"}, headers=auth)
    assert r.status_code == 201, r.text
    header, claims = verified(client, r.json()["ssa"])
    assert "touched" not in claims  # signed without any of that script's changes
    assert set(header) == {"typ", "alg", "kid"} and header["typ"] == "jwt", header
    assert type(claims["iat"]) is int
    assert count(skip_env) == before + 1


def test_unregistered_header_parameters_are_signed_and_verify(fail_env):
    server, client, auth, _ = fail_env
    install(fail_env, 'def create(jwt, context):\n    jwt.header["x-tenant"] = {"id": "acme", "n": [1, 2]}\n'
                      '    jwt.getHeader().setClaim("custom_header_name", "v")\n    return True\n')
    r = client.post("/ssa", json={"org_id": "h"}, headers=auth)
    assert r.status_code == 201, r.text
    header, claims = verified(client, r.json()["ssa"])
    assert header["x-tenant"] == {"id": "acme", "n": [1, 2]} and header["custom_header_name"] == "v"
    assert header["typ"] == "jwt" and claims["org_id"] == "h"


def test_equal_values_of_the_same_type_pass(fail_env):
    """Setting a protected value to itself (same type) is no change."""
    server, client, auth, _ = fail_env
    install(fail_env, 'def create(jwt, context):\n    jwt.claims["iat"] = jwt.claims["iat"] + 0\n'
                      '    jwt.header["typ"] = "jw" + "t"\n    return True\n')
    assert client.post("/ssa", json={"org_id": "h"}, headers=auth).status_code == 201


class SetsCrit:
    @hookimpl
    def ssa_create(self, jwt, context):
        jwt.header["crit"] = ["exp"]


class FloatIat:
    @hookimpl
    def ssa_create(self, jwt, context):
        jwt.claims["iat"] = float(jwt.claims["iat"])


@pytest.mark.parametrize("plugin", [SetsCrit, FloatIat])
def test_the_server_checks_again_after_every_hook(api, plugin):
    """A trusted plugin is not the worker: the service's own check refuses the same changes."""
    api.server.plugins.register(plugin())
    r = api.create(org_id="p")
    assert r.status_code == 502, r.text  # unfixed: 201
    assert r.json()["error"] == "script_failed"
    assert ("'crit'" if plugin is SetsCrit else "'iat'") in r.json()["error_description"]
    assert api.call(api.server.store.count_ssas) == 0
