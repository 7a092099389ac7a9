"""Shared fixtures: a server on a temporary data dir, clients with tokens, SSA helpers."""

from __future__ import annotations

import json

import pytest
from jwcrypto import jwk, jwt
from starlette.testclient import TestClient

from ssa_server.app import create_app
from ssa_server.server import Server
from ssa_server.settings import Settings

ADMIN = "https://jans.io/auth/ssa.admin"
PORTAL = "https://jans.io/auth/ssa.portal"
DEVELOPER = "https://jans.io/auth/ssa.developer"


class Api:
    """A running app (TestClient) with helpers to register clients and make SSAs."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.client = TestClient(create_app(server=server), raise_server_exceptions=False)

    def register(self, *scopes: str) -> tuple[str, str]:
        record, secret = self.client.portal.call(self.server.clients.create, list(scopes), "test")
        return record["client_id"], secret

    def token(self, *scopes: str) -> str:
        cid, secret = self.register(*scopes)
        r = self.client.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, secret))
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    def auth(self, *scopes: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(*(scopes or (ADMIN,)))}"}

    def create(self, headers: dict[str, str] | None = None, **body):
        return self.client.post("/ssa", json=body, headers=headers or self.auth(ADMIN))

    def verify(self, token: str) -> tuple[dict, dict]:
        keys = jwk.JWKSet.from_json(self.client.get("/jwks").text)
        verified = jwt.JWT(jwt=token, key=keys, check_claims=False)  # signature only
        return verified.token.jose_header, json.loads(verified.claims)

    def jti(self, response) -> str:
        return self.verify(response.json()["ssa"])[1]["jti"]

    def call(self, fn, *args, **kwargs):
        return self.client.portal.call(lambda: fn(*args, **kwargs))


@pytest.fixture
def make_api(tmp_path):
    opened: list[Api] = []

    def make(*, clock=None, **settings) -> Api:
        settings.setdefault("data_dir", tmp_path / f"data{len(opened)}")
        settings.setdefault("scripts_dir", tmp_path / "no-scripts")
        kwargs = {"clock": clock} if clock else {}
        api = Api(Server.build(Settings(**settings), **kwargs))
        api.client.__enter__()
        opened.append(api)
        return api

    yield make
    for api in opened:
        api.client.__exit__(None, None, None)


@pytest.fixture
def api(make_api) -> Api:
    return make_api(custom_attributes=("myCustomAttr1",))
