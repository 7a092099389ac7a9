"""Token Status Lists through real servers: two processes (one with two workers) on one
PostgreSQL hand out indexes without a collision and serve the same bits; the embedded store's
``serve`` flips a bit on a one-time use and on a revocation by the CLI beside it."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from faults.served import Served
from jwcrypto import jwk, jws
from test_live_server import cli
from test_scale_out import nodes  # noqa: F401  (the fixture)
from test_status_list import b64url_decode, status_at

pytestmark = pytest.mark.slow


def claims_of(token: str) -> dict:
    return json.loads(b64url_decode(token.split(".")[1]))


def list_claims(http, uri: str) -> dict:
    r = http.get(urlsplit(uri).path)
    assert r.status_code == 200 and r.headers["content-type"] == "application/statuslist+jwt", r.text
    verified = jws.JWS()
    verified.deserialize(r.text)
    verified.verify(jwk.JWKSet.from_json(http.get("/jwks").text))
    assert json.loads(b64url_decode(r.text.split(".")[0]))["typ"] == "statuslist+jwt"
    return json.loads(verified.payload)


def wait_for_bit(http, ref: dict, value: int, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while status_at(list_claims(http, ref["uri"])["status_list"], ref["idx"]) != value:
        assert time.time() < deadline, f"bit {ref['idx']} of {ref['uri']} did not become {value}"
        time.sleep(0.1)


def test_two_nodes_allocate_without_collision_and_serve_the_same_bits(nodes, pg_url):  # noqa: F811
    env = {"SSA_STATUS_LIST_SIZE": "128", "SSA_STATUS_LIST_REFRESH": "0.2"}
    a, b = nodes(**env), nodes("--workers", "2", **env)
    ha, hb = a.token(pg_url), b.token(pg_url)
    lock = threading.Lock()
    made: list[str] = []

    def create(i: int) -> None:
        node, headers = (a, ha) if i % 2 else (b, hb)
        r = node.http.post("/ssa", json={"org_id": "acme", "one_time_use": i % 3 != 0}, headers=headers)
        assert r.status_code == 201, r.text
        with lock:
            made.append(r.json()["ssa"])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(160)))
    refs = [claims_of(t)["status"]["status_list"] for t in made]
    pairs = {(ref["uri"], ref["idx"]) for ref in refs}
    assert len(pairs) == 160  # three processes, no index handed out twice
    assert all(0 <= idx < 128 for _, idx in pairs) and len({uri for uri, _ in pairs}) >= 2
    revoked = claims_of(made[0])
    assert a.http.delete("/ssa", params={"jti": revoked["jti"]}, headers=ha).status_code == 200
    one_time = next(claims_of(t) for t in made if claims_of(t)["jti"] != revoked["jti"]
                    and b.http.get("/ssa/status", params={"jti": claims_of(t)["jti"]}).json()["one_time_use"])
    assert b.http.post("/ssa/validation", headers={"jti": one_time["jti"]}).status_code == 200
    for node in (a, b):  # whichever node (or worker) answers, both bits have flipped
        wait_for_bit(node.http, revoked["status"]["status_list"], 1)
        wait_for_bit(node.http, one_time["status"]["status_list"], 1)
    untouched = [claims_of(t) for t in made if claims_of(t)["jti"] not in (revoked["jti"], one_time["jti"])]
    ref = untouched[0]["status"]["status_list"]
    assert status_at(list_claims(a.http, ref["uri"])["status_list"], ref["idx"]) == 0


def test_embedded_serve_flips_on_one_time_use_and_on_a_cli_revocation(tmp_path):
    served = Served(tmp_path, SSA_STATUS_LIST_REFRESH="0.2").start()
    try:
        made = json.loads(cli(served.data, "clients", "create", "--scope",
                              "https://jans.io/auth/ssa.admin").stdout)
        token = served.http.post("/token", data={"grant_type": "client_credentials"},
                                 auth=(made["client_id"], made["client_secret"])).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        one_time = claims_of(served.http.post("/ssa", json={"org_id": "o"}, headers=headers).json()["ssa"])
        reusable = claims_of(served.http.post("/ssa", json={"org_id": "o", "one_time_use": False},
                                              headers=headers).json()["ssa"])
        by_cli = claims_of(json.loads(cli(served.data, "ssa", "create", "--org-id", "o").stdout)["ssa"])
        refs = [c["status"]["status_list"] for c in (one_time, reusable, by_cli)]
        assert len({(r["uri"], r["idx"]) for r in refs}) == 3  # the CLI's index is not the server's
        assert served.http.post("/ssa/validation", headers={"jti": one_time["jti"]}).status_code == 200
        wait_for_bit(served.http, refs[0], 1)
        assert cli(served.data, "ssa", "revoke", "--jti", reusable["jti"]).returncode == 0
        wait_for_bit(served.http, refs[1], 1)
        assert status_at(list_claims(served.http, refs[2]["uri"])["status_list"], refs[2]["idx"]) == 0
    finally:
        served.kill()
