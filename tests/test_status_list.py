"""Token Status Lists (draft-ietf-oauth-status-list-19) on both stores: the status claim, the
signed list, the bit flipping on revoke and on one-time use, indexes never handed out twice.

The list is decoded here from the draft's text (section 4.1: ``lst`` is the base64url of the
ZLIB-compressed byte array; index i's status is the ``bits`` bits at bit offset i*bits, counted
from the least significant bit of each byte), not with the server's code.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from urllib.parse import urlsplit

import pytest
from conftest import ADMIN
from jwcrypto import jwk, jws


@pytest.fixture(params=["tinydb", "postgresql"])
def store_kind(request) -> str:
    return request.param


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def status_at(status_list: dict, idx: int) -> int:
    """The draft's reading of one entry: byte idx*bits // 8, shifted by the bit offset within it."""
    bits = status_list["bits"]
    assert bits in (1, 2, 4, 8)
    data = zlib.decompress(b64url_decode(status_list["lst"]))  # ZLIB format (RFC 1950), not raw DEFLATE
    offset = idx * bits
    return (data[offset // 8] >> (offset % 8)) & ((1 << bits) - 1)


def fetch_list(api, uri: str) -> tuple[dict, dict, object]:
    """GET the Status List Token the uri names; verify it against /jwks; (header, claims, response)."""
    r = api.client.get(urlsplit(uri).path, headers={"Accept": "application/statuslist+jwt"})
    assert r.status_code == 200, r.text
    token = r.text
    verified = jws.JWS()
    verified.deserialize(token)
    # (raises unless a published key signed it)
    verified.verify(jwk.JWKSet.from_json(api.client.get("/jwks").text))
    header = json.loads(b64url_decode(token.split(".")[0]))
    return header, json.loads(verified.payload), r


def ref_of(api, response) -> dict:
    return api.verify(response.json()["ssa"])[1]["status"]["status_list"]


def wait_for_bit(api, ref: dict, value: int, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while True:
        claims = fetch_list(api, ref["uri"])[1]
        if status_at(claims["status_list"], ref["idx"]) == value:
            return
        assert time.time() < deadline, f"bit {ref['idx']} did not become {value}"
        time.sleep(0.05)


def test_claim_token_and_headers(make_api):
    api = make_api(status_list_refresh=0.05, status_list_ttl=120)
    r = api.create(org_id="acme")
    ref = ref_of(api, r)
    assert type(ref["idx"]) is int and ref["uri"].startswith("http://127.0.0.1:8080/statuslists/")
    header, claims, response = fetch_list(api, ref["uri"])
    published = [k["kid"] for k in api.client.get("/jwks").json()["keys"]]
    assert header["typ"] == "statuslist+jwt" and header["kid"] in published
    assert claims["sub"] == ref["uri"] and claims["ttl"] == 120
    assert abs(claims["iat"] - time.time()) < 5 and claims["exp"] > claims["iat"] + 120
    assert claims["status_list"]["bits"] == 1 and status_at(claims["status_list"], ref["idx"]) == 0
    assert response.headers["content-type"] == "application/statuslist+jwt"
    assert response.headers["cache-control"] == "public, max-age=120"
    # The re-signed JWT carries the same entry.
    again = api.client.get("/ssa/jwt", params={"jti": api.jti(r)}, headers=api.auth(ADMIN))
    assert api.verify(again.json()["ssa"])[1]["status"]["status_list"] == ref


def test_bit_flips_on_revoke_and_on_one_time_use_not_on_status_calls(make_api):
    api = make_api(status_list_refresh=0.05)
    one_time, reusable, revoked = api.create(), api.create(one_time_use=False), api.create()
    refs = {name: ref_of(api, r) for name, r in (("one_time", one_time), ("reusable", reusable),
                                                   ("revoked", revoked))}
    for _ in range(3):
        assert api.client.get("/ssa/status", params={"jti": api.jti(one_time)}).status_code == 200
        assert api.client.post("/ssa/validation", headers={"jti": api.jti(reusable)}).status_code == 200
    time.sleep(0.1)
    for ref in refs.values():
        assert status_at(fetch_list(api, ref["uri"])[1]["status_list"], ref["idx"]) == 0
    revoking = api.client.delete("/ssa", params={"jti": api.jti(revoked)}, headers=api.auth(ADMIN))
    assert revoking.status_code == 200
    wait_for_bit(api, refs["revoked"], 1)
    assert api.client.post("/ssa/validation", headers={"jti": api.jti(one_time)}).status_code == 200
    wait_for_bit(api, refs["one_time"], 1)
    assert status_at(fetch_list(api, refs["reusable"]["uri"])[1]["status_list"], refs["reusable"]["idx"]) == 0


def test_token_is_rebuilt_at_most_every_refresh(make_api):
    api = make_api(status_list_refresh=30)
    r = api.create()
    ref = ref_of(api, r)
    first = fetch_list(api, ref["uri"])[1]
    assert api.client.delete("/ssa", params={"jti": api.jti(r)}, headers=api.auth(ADMIN)).status_code == 200
    assert fetch_list(api, ref["uri"])[1] == first  # the cached token, until the refresh delay passed


def test_indexes_unique_random_and_lists_grow_by_adding_lists(make_api):
    api = make_api(status_list_size=16)
    refs = [ref_of(api, api.create()) for _ in range(40)]
    pairs = [(ref["uri"], ref["idx"]) for ref in refs]
    assert len(set(pairs)) == 40
    uris = sorted({uri for uri, _ in pairs})
    assert [u.rsplit("/", 1)[1] for u in uris] == ["1", "2", "3"]
    first_list = [idx for uri, idx in pairs if uri == uris[0]]
    assert sorted(first_list) == list(range(16)) and first_list != list(range(16))  # all, out of order
    for uri in uris:  # each list keeps its size: 16 bits, all VALID
        status_list = fetch_list(api, uri)[1]["status_list"]
        assert zlib.decompress(b64url_decode(status_list["lst"])) == b"\x00\x00"


def test_indexes_survive_a_restart_and_are_not_reused(make_api, tmp_path, store_kind):
    api = make_api(status_list_size=1024)
    before = {(ref["uri"], ref["idx"]) for ref in (ref_of(api, api.create()) for _ in range(3))}
    api.client.__exit__(None, None, None)
    settings = {"data_dir": api.server.settings.data_dir}
    again = make_api(status_list_size=1024, **settings)
    after = {(ref["uri"], ref["idx"]) for ref in (ref_of(again, again.create()) for _ in range(70))}
    assert not before & after


def test_off_means_no_claim_and_404(make_api):
    api = make_api(status_list=False)
    claims = api.verify(api.create().json()["ssa"])[1]
    assert "status" not in claims
    r = api.client.get("/statuslists/1")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


@pytest.mark.parametrize("path", ["/statuslists/999", "/statuslists/abc", "/statuslists/-1",
                                  "/statuslists/" + "9" * 40, "/statuslists/%00", "/statuslists/1.0"])
def test_unknown_lists_are_404_json(api, path):
    api.create()
    r = api.client.get(path)
    assert r.status_code == 404 and set(r.json()) == {"error", "error_description"}
    assert r.headers["cache-control"] == "no-store"


def test_scripts_cannot_change_the_status_claim():
    from ssa_server.script_rules import claims_change

    before = {"jti": "j", "iss": "i", "iat": 1, "status": {"status_list": {"idx": 1, "uri": "u"}}}
    after = dict(before, status={"status_list": {"idx": 2, "uri": "u"}})
    assert claims_change(before, after) is not None
    assert claims_change(before, {k: v for k, v in before.items() if k != "status"}) is not None


def test_custom_attribute_cannot_be_named_status():
    from ssa_server.settings import Settings, SettingsError

    with pytest.raises(SettingsError):
        Settings(custom_attributes=("status",))


def test_a_serving_process_reserves_the_next_block_before_its_block_runs_out(tmp_path):
    """Creates never queue behind a reservation: the next block of counters is asked for in the
    background once half of the current one is handed out (with every create of the moment waiting
    on one durable reservation, a busy server's commits trickled one by one: bench/README.md)."""
    import asyncio

    from ssa_server.keys import KeyRing
    from ssa_server.settings import Settings
    from ssa_server.status_issuer import StatusIssuer
    from ssa_server.store.tiny import TinyStore

    async def scenario() -> tuple[list[int], set[int]]:
        store = TinyStore(tmp_path / "data")
        await store.open()
        released = asyncio.Event()
        started: list[int] = []
        reserve = store.reserve_status_counters

        async def slow_reserve(count, size, key, now):
            started.append(len(handed))
            if len(started) > 1:
                await released.wait()  # the second reservation lands only when released
            return await reserve(count, size, key, now)

        store.reserve_status_counters = slow_reserve  # type: ignore[method-assign]
        settings = Settings(data_dir=str(tmp_path / "data"))
        issuer = StatusIssuer(settings, store, KeyRing(store, "RS256"), clock=time.time)
        issuer.block = 8
        handed: list[int] = []
        for _ in range(8):  # the whole first block, none waiting on the second reservation
            handed.append((await asyncio.wait_for(issuer.allocate(), 5))[1])
        assert started == [0, 4], "the next block is reserved once half of this one is handed out"
        released.set()
        handed.append((await asyncio.wait_for(issuer.allocate(), 5))[1])  # from the block reserved ahead
        await asyncio.sleep(0)
        await store.close()
        return started, set(handed)

    started, handed = asyncio.run(scenario())
    assert started == [0, 4] and len(handed) == 9  # still two reservations, nine distinct indexes
