"""What an SSA says beside its request (issue 14): ``jwt_typ``, the fully specified ``Ed25519`` alg
(RFC 9864) beside ``EdDSA``, and ``map_software_roles_to_scopes`` (Janssen's
``ssaMapSoftwareRolesToScopes``).  Both stores."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from conftest import ADMIN, PORTAL
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from jwcrypto import jwk, jwt
from ssa_server.settings import Settings, SettingsError, load_settings


@pytest.fixture(params=["tinydb", "postgresql"])
def store_kind(request) -> str:
    return request.param


def b64d(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# --- jwt_typ ---
@pytest.mark.parametrize("typ", ["jwt", "JWT"])
def test_jwt_typ_is_the_header_typ_of_created_and_resigned_ssas(make_api, typ):
    api = make_api(jwt_typ=typ)
    H = api.auth(ADMIN)
    header, claims = api.verify(api.create(H, org_id="o", one_time_use=False).json()["ssa"])
    assert header["typ"] == typ
    again = api.client.get("/ssa/jwt", params={"jti": claims["jti"]}, headers=H).json()["ssa"]
    assert api.verify(again)[0]["typ"] == typ


def test_jwt_typ_default_and_refusals():
    assert Settings().jwt_typ == "jwt"
    for bad in ("jose", "at+jwt", "", "Jwt"):
        with pytest.raises(SettingsError, match="SSA_JWT_TYP"):
            Settings(jwt_typ=bad)


# --- Ed25519 ---
def test_ed25519_keys_sign_with_the_fully_specified_alg(make_api):
    api = make_api(signing_alg="Ed25519")
    token = api.create(api.auth(ADMIN), org_id="o").json()["ssa"]
    head, body, sig = token.split(".")
    assert json.loads(b64d(head))["alg"] == "Ed25519"
    (key,) = api.client.get("/jwks").json()["keys"]
    assert key["alg"] == "Ed25519" and key["kty"] == "OKP" and key["crv"] == "Ed25519" and "d" not in key
    assert key["kid"].endswith("_sig_ed25519")
    # Verified with cryptography directly, from the published key ...
    Ed25519PublicKey.from_public_bytes(b64d(key["x"])).verify(b64d(sig), f"{head}.{body}".encode())
    # ... and by jwcrypto, which knows the name (RFC 9864) in this venv, when allowed explicitly.
    verified = jwt.JWT(jwt=token, key=jwk.JWKSet.from_json(json.dumps({"keys": [key]})), algs=["Ed25519"],
                       check_claims=False)
    assert json.loads(verified.claims)["org_id"] == "o"
    with pytest.raises(jwt.JWTMissingKey):  # an EdDSA-only verifier refuses it: the alg is the name
        jwt.JWT(jwt=token, key=jwk.JWKSet.from_json(json.dumps({"keys": [key]})), algs=["EdDSA"],
                check_claims=False)


def test_ed25519_signed_by_the_signing_process_and_edDSA_keys_keep_working(make_api):
    from ssa_server.keys import generate_key
    from ssa_server.signing import PROCESS_ALGS, Signer
    from ssa_server.signing_process import SigningProcess

    assert "Ed25519" in PROCESS_ALGS
    record = generate_key("Ed25519", "ssa", 0)
    signer = Signer(record["jwk"], "Ed25519", record["kid"])
    data = signer.signing_input({"typ": "jwt"}, {"a": 1})
    import asyncio

    async def sign_in_helper() -> bytes:
        helper = SigningProcess()
        try:
            helper.start()
            return await helper.sign(record["kid"], "Ed25519", record["jwk"], data)
        finally:
            helper.close()

    signature = asyncio.run(sign_in_helper())
    public = jwk.JWK(**record["jwk"]).get_op_key("verify")
    public.verify(b64d(signature.decode()), data)
    # An EdDSA key stays EdDSA when the server moves to Ed25519: it keeps verifying, the new one signs.
    api = make_api(signing_alg="EdDSA")
    old = api.create(api.auth(ADMIN), org_id="o").json()["ssa"]
    assert api.verify(old)[0]["alg"] == "EdDSA"
    new = api.call(api.server.keys.rotate, "Ed25519", now=True)
    token = api.create(api.auth(ADMIN), org_id="o").json()["ssa"]
    assert api.verify(token)[0] == {"alg": "Ed25519", "kid": new["kid"], "typ": "jwt"}
    algs = {k["kid"]: k["alg"] for k in api.client.get("/jwks").json()["keys"]}
    assert algs[new["kid"]] == "Ed25519" and algs[api.verify(old)[0]["kid"]] == "EdDSA"


# --- map_software_roles_to_scopes ---
ROLES = {"payments": ["payments", "openid"], "accounts": ["accounts", "openid"], "none": []}


def test_roles_map_to_a_sorted_deduplicated_scope_claim(make_api):
    api = make_api(map_software_roles_to_scopes=ROLES)
    H = api.auth(ADMIN)
    r = api.create(H, org_id="o", software_roles=["payments", "accounts", "unknown"], one_time_use=False)
    claims = api.verify(r.json()["ssa"])[1]
    assert claims["scope"] == "accounts openid payments"
    (item,) = api.client.get("/ssa", params={"jti": claims["jti"]}, headers=api.auth(PORTAL)).json()
    assert item["ssa"]["scope"] == "accounts openid payments"
    again = api.client.get("/ssa/jwt", params={"jti": claims["jti"]}, headers=H).json()["ssa"]
    assert api.verify(again)[1]["scope"] == "accounts openid payments"
    # No mapped scope, no claim.
    for roles in ([], ["none"], ["unknown"]):
        claims = api.verify(api.create(H, org_id="o", software_roles=roles).json()["ssa"])[1]
        assert "scope" not in claims


def test_the_scope_is_the_one_made_at_creation(make_api, tmp_path):
    """The mapping changing later does not change what an SSA says (the record keeps its scope)."""
    api = make_api(map_software_roles_to_scopes=ROLES, data_dir=tmp_path / "d")
    H = api.auth(ADMIN)
    created = api.create(H, org_id="o", software_roles=["payments"], one_time_use=False)
    jti = api.verify(created.json()["ssa"])[1]["jti"]
    record = api.call(api.server.store.get_ssa, jti)
    assert record["scope"] == "openid payments"


def test_no_mapping_no_scope_claim(make_api):
    api = make_api()
    claims = api.verify(api.create(api.auth(ADMIN), org_id="o", software_roles=["payments"]).json()["ssa"])[1]
    assert "scope" not in claims


def test_scope_is_not_a_custom_attribute_while_roles_map_to_scopes():
    Settings(custom_attributes=("scope",))  # allowed without a mapping, as before
    with pytest.raises(SettingsError, match="scope"):
        Settings(custom_attributes=("scope",), map_software_roles_to_scopes=ROLES)


def test_mapping_from_toml_and_env(tmp_path):
    conf = tmp_path / "ssa.toml"
    conf.write_text('[ssa.map_software_roles_to_scopes]\npayments = ["payments", "openid"]\n')
    assert load_settings(environ={}, config_file=conf).map_software_roles_to_scopes == \
        {"payments": ("payments", "openid")}
    env = {"SSA_MAP_SOFTWARE_ROLES_TO_SCOPES": '{"a": ["x", "y"], "b": ["y"]}'}
    assert load_settings(environ=env).map_software_roles_to_scopes == {"a": ("x", "y"), "b": ("y",)}
    for bad in ('["x"]', '{"a": "x"}', '{"a": [1]}', "not json", '{"a": ["two words"]}', '{"": ["x"]}',
                '{"a": ["x\\"y"]}'):
        with pytest.raises(SettingsError, match="SSA_MAP_SOFTWARE_ROLES_TO_SCOPES"):
            load_settings(environ={"SSA_MAP_SOFTWARE_ROLES_TO_SCOPES": bad})


def test_config_show_has_the_new_settings(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SSA_JWT_TYP": "JWT", "SSA_MAP_SOFTWARE_ROLES_TO_SCOPES": '{"a": ["x"]}',
           "SSA_KEY_ACTIVATION_DELAY": "60", "SSA_KEY_ROTATION_DAYS": "90"}
    r = subprocess.run([sys.executable, "-m", "ssa_server", "config", "show"], check=False,
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["jwt_typ"] == "JWT" and shown["map_software_roles_to_scopes"] == {"a": ["x"]}
    assert shown["key_activation_delay"] == 60 and shown["key_rotation_days"] == 90
