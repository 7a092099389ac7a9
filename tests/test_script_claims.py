"""What a create script (or a trusted plugin) adds to an SSA stays with it: GET /ssa/jwt re-signs
exactly the create JWT's header and claims, GET /ssa shows the added claims, export/import carry
them; both stores, and a real ``ssa-server serve`` across a key rotation and a kill -9."""

from __future__ import annotations

import json
import time

import pytest
from jwcrypto import jwk, jwt

from conftest import ADMIN, truncate
from ssa_server.plugins.hookspecs import hookimpl
from ssa_server.store import transfer

# Added, changed and removed claims, header parameters, and the JSON values a store must keep
# exactly (a float that is integral, an integer beyond 64 bits, a float past 1e16, text beyond ASCII).
CREATE_SCRIPT = '''
def create(jwt, context):
    jwt.header["x-tenant"] = {"id": "t-1", "zones": [1, 2]}
    jwt.getHeader().setClaim("custom_header_name", "custom_header_value")
    jwt.claims["tenant"] = "acme-tenant"
    jwt.claims["nested"] = {"list": [1, 2.5, True, None, "caf\\u00e9 \\u2603"], "one": 1.0,
                            "big": 1180591620717411303424, "large": 1e300, "sixteen": 1e16}
    jwt.claims["exp"] = jwt.claims["exp"] - 60
    jwt.claims["org_id"] = "changed-by-script"
    del jwt.claims["software_roles"]
    return True
'''


@pytest.fixture(params=["tinydb", "postgresql"])
def store_kind(request) -> str:
    return request.param


def strict(value) -> str:
    """JSON text that tells 1 from 1.0 and True (Python's == does not)."""
    return json.dumps(value, sort_keys=True)


def verified(token: str, keys: str) -> tuple[dict, dict]:
    """Header and claims of ``token``, its signature checked by jwcrypto against ``keys`` (a JWKS)."""
    checked = jwt.JWT(jwt=token, key=jwk.JWKSet.from_json(keys), check_claims=False)
    return checked.token.jose_header, json.loads(checked.claims)


def unverified(token: str) -> tuple[dict, dict]:
    import base64

    head, body = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in token.split(".")[:2])
    return head, body


def scripted_api(make_api, tmp_path, source: str = CREATE_SCRIPT, **settings):
    folder = tmp_path / "scripts"
    folder.mkdir(exist_ok=True)
    (folder / "tenant.py").write_text(source)
    return make_api(scripts_dir=folder, script_workers=1, **settings)


def fetch_again(api, jti: str) -> str:
    r = api.client.get("/ssa/jwt", params={"jti": jti}, headers=api.auth(ADMIN))
    assert r.status_code == 200, r.text
    return r.json()["ssa"]


def test_get_jwt_returns_exactly_the_create_jwt(make_api, tmp_path):
    api = scripted_api(make_api, tmp_path)
    created = api.create(org_id="acme", software_roles=["password"])
    assert created.status_code == 201, created.text
    keys = api.client.get("/jwks").text
    header, claims = verified(created.json()["ssa"], keys)
    assert claims["tenant"] == "acme-tenant" and "software_roles" not in claims  # the script ran
    again_header, again_claims = verified(fetch_again(api, claims["jti"]), keys)
    assert strict(again_claims) == strict(claims)  # same jti, iat, exp, every added and changed claim
    assert strict(again_header) == strict(header)  # same key: same alg and kid, same added parameters
    assert again_header["x-tenant"] == {"id": "t-1", "zones": [1, 2]}
    assert type(again_claims["nested"]["one"]) is float and again_claims["nested"]["big"] == 2 ** 70


def test_get_ssa_shows_added_claims_inside_ssa_without_overwriting_model_fields(make_api, tmp_path):
    api = scripted_api(make_api, tmp_path, custom_attributes=("myCustomAttr1",))
    created = api.create(org_id="acme", software_roles=["password"], myCustomAttr1="v")
    jti = unverified(created.json()["ssa"])[1]["jti"]
    [item] = api.client.get("/ssa", params={"jti": jti}, headers=api.auth(ADMIN)).json()
    assert set(item) == {"ssa", "created_at", "expiration", "iss", "status"}  # Janssen's element shape
    inner = item["ssa"]
    assert inner["tenant"] == "acme-tenant" and inner["nested"]["big"] == 2 ** 70  # beside the custom ones
    assert inner["myCustomAttr1"] == "v"
    # A model field keeps the stored value, whatever the script signed: the element is the store's view.
    assert inner["org_id"] == "acme" and inner["software_roles"] == ["password"]
    assert inner["exp"] == item["expiration"]
    assert "x-tenant" not in inner and "custom_header_name" not in inner  # header parameters are not claims


class AddByPlugin:
    @hookimpl
    def ssa_create(self, jwt, context):
        jwt.claims["plugin_claim"] = {"by": "plugin"}
        jwt.header["x-plugin"] = "p"


def test_a_trusted_plugins_additions_stay_too(make_api, tmp_path):
    api = scripted_api(make_api, tmp_path)
    api.server.plugins.register(AddByPlugin())
    keys = api.client.get("/jwks").text
    header, claims = verified(api.create(org_id="acme").json()["ssa"], keys)
    assert claims["plugin_claim"] == {"by": "plugin"} and claims["tenant"] == "acme-tenant"
    again_header, again_claims = verified(fetch_again(api, claims["jti"]), keys)
    assert strict(again_claims) == strict(claims) and strict(again_header) == strict(header)


def test_export_and_import_carry_the_additions(make_api, tmp_path, store_kind):
    api = scripted_api(make_api, tmp_path)
    keys = api.client.get("/jwks").text
    _, claims = verified(api.create(org_id="acme").json()["ssa"], keys)
    lines = [line.decode() for line in api.call(transfer.export_records, api.server.store)]
    if store_kind == "postgresql":
        truncate(api.server.settings.store_url)
    target = make_api()  # a fresh store (a new data dir, or the emptied database) with a key of its own
    report = target.call(transfer.import_records, target.server.store, transfer.parse_lines(lines),
                         int(time.time()))
    assert report["ssa"]["imported"] == 1
    again_header, again_claims = verified(fetch_again(target, claims["jti"]), target.client.get("/jwks").text)
    assert strict(again_claims) == strict(claims)
    assert again_header["x-tenant"] == {"id": "t-1", "zones": [1, 2]}
    assert again_header["custom_header_name"] == "custom_header_value"


def test_records_stored_before_hook_changes_existed_still_work(make_api, tmp_path):
    api = make_api()
    created = api.create(org_id="old")
    jti = unverified(created.json()["ssa"])[1]["jti"]
    record = api.call(api.server.store.get_ssa, jti)
    old = {k: v for k, v in record.items() if k != "hook_changes"}
    old["jti"] = "00000000-0000-4000-8000-00000000a11d"
    api.call(api.server.store.add_ssa, old)
    _, claims = verified(fetch_again(api, old["jti"]), api.client.get("/jwks").text)
    assert claims["org_id"] == "old" and claims["jti"] == old["jti"]
    listed = api.client.get("/ssa", params={"jti": old["jti"]}, headers=api.auth(ADMIN)).json()
    assert listed[0]["ssa"]["org_id"] == "old"
    line = json.dumps({"table": "ssa", "record": old})
    assert transfer.parse_lines([line])["ssa"] == [old]  # an old export imports as it is


class AddUnstorable:
    def __init__(self, value) -> None:
        self.value = value

    @hookimpl
    def ssa_create(self, jwt, context):
        jwt.claims["odd"] = self.value


def nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("value", ["a\x00b", ("a", "tuple"), "x" * (65 * 1024), nested(31)],
                         ids=["nul", "tuple", "over-the-output-cap", "too-deep"])
def test_additions_a_store_cannot_keep_exactly_refuse_the_create(make_api, tmp_path, value):
    """NUL (PostgreSQL cannot hold it), a tuple (not JSON), beyond the script output cap (a
    plugin has no cap of its own), deeper than the JSON values' limit with the record around it:
    502 script_failed, nothing stored."""
    api = make_api()
    api.server.plugins.register(AddUnstorable(value))
    r = api.create(org_id="odd")
    assert r.status_code == 502 and r.json()["error"] == "script_failed", r.text
    assert "Traceback" not in r.text
    assert api.call(api.server.store.count_ssas) == 0


def test_additions_within_the_limits_are_kept(make_api, tmp_path):
    api = make_api()
    api.server.plugins.register(AddUnstorable({"deep": nested(29), "text": "x" * (60 * 1024)}))
    r = api.create(org_id="odd")
    assert r.status_code == 201, r.text
    again = unverified(fetch_again(api, unverified(r.json()["ssa"])[1]["jti"]))[1]
    assert again["odd"] == {"deep": nested(29), "text": "x" * (60 * 1024)}


def test_a_script_adding_nul_is_a_script_failure(make_api, tmp_path):
    api = scripted_api(make_api, tmp_path, 'def create(jwt, context):\n    jwt.claims["n"] = "a" + chr(0)\n')
    r = api.create(org_id="nul")
    assert r.status_code == 502 and r.json()["error"] == "script_failed", r.text
    assert "cannot be stored" in r.json()["error_description"]
    assert api.call(api.server.store.count_ssas) == 0


@pytest.mark.parametrize("changes", [{"claims": 5}, {"header": []}, {"removed_claims": [1]}, "x",
                                     {"claims": {}, "other": {}}])
def test_an_import_with_malformed_hook_changes_is_refused_naming_the_line(changes):
    record = {"org_id": "o", "description": "", "software_id": "s", "software_roles": [], "grant_types": [],
              "expiration": 2_000_000_000, "one_time_use": True, "rotate_ssa": True, "custom": {},
              "jti": "j", "created_at": 1_900_000_000, "status": "ACTIVE", "creator_id": "c", "iss": "i",
              "hook_changes": changes}
    with pytest.raises(transfer.TransferError, match="line 1: .*hook_changes"):
        transfer.parse_lines([json.dumps({"table": "ssa", "record": record})])


@pytest.mark.slow
def test_a_real_server_re_signs_the_additions_with_the_active_key_across_rotation_and_kill_9(tmp_path):
    from test_live_server import Live, cli

    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "tenant.py").write_text(CREATE_SCRIPT)
    live = Live(tmp_path)
    try:
        live.start()
        live.auth = live.client_token()
        created = live.http.post("/ssa", json={"org_id": "acme", "one_time_use": False}, headers=live.auth)
        assert created.status_code == 201, created.text
        header, claims = verified(created.json()["ssa"], live.http.get("/jwks").text)
        assert claims["tenant"] == "acme-tenant"

        def fetched() -> tuple[dict, dict]:
            r = live.http.get("/ssa/jwt", params={"jti": claims["jti"]}, headers=live.auth)
            assert r.status_code == 200, r.text
            return verified(r.json()["ssa"], live.http.get("/jwks").text)

        assert tuple(map(strict, fetched())) == (strict(header), strict(claims))
        # --now: a rotated key is announced before it signs (test_key_rotation); this one signs at once
        rotated = json.loads(cli(live.data, "keys", "rotate", "--alg", "ES256", "--now").stdout)
        deadline = time.time() + 10
        while fetched()[0]["kid"] != rotated["kid"]:  # the server re-reads the keys every 0.5 s
            assert time.time() < deadline, "the rotated key does not sign"
            time.sleep(0.1)
        again_header, again_claims = fetched()
        assert again_header["alg"] == "ES256" and strict(again_claims) == strict(claims)
        assert strict({k: v for k, v in again_header.items() if k not in ("alg", "kid")}) == \
            strict({k: v for k, v in header.items() if k not in ("alg", "kid")})
        live.kill()  # kill -9: what was acknowledged is on disk whole, the additions with it
        live.start()
        live.auth = live.client_token()  # (a new port: a new issuer, a new token)
        assert strict(fetched()[1]) == strict(claims)
    finally:
        live.kill()
