"""Shared fixtures: a server on a temporary data dir, clients with tokens, SSA helpers."""

from __future__ import annotations

import asyncio
import json
import subprocess

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
def make_api(tmp_path, store_settings):
    opened: list[Api] = []

    def make(*, clock=None, **settings) -> Api:
        for name, value in store_settings.items():
            settings.setdefault(name, value)
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


# --- PostgreSQL: one server per session (SSA_TEST_PG_URL, else a throwaway cluster), a fresh
# database per run, clean tables per test.  Without PostgreSQL these tests skip (fail in CI).
@pytest.fixture(scope="session")
def pg_server():
    import os

    from pg_cluster import HOW_TO, ClusterError, start_cluster

    url = os.environ.get("SSA_TEST_PG_URL")
    if url:
        yield url
        return
    try:
        cluster = start_cluster()
    except (ClusterError, OSError, subprocess.SubprocessError) as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the PostgreSQL tests but none could be started ({e}). {HOW_TO}")
        pytest.skip(f"no PostgreSQL ({e}). {HOW_TO}")
    yield cluster.url
    cluster.destroy()


def with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def pg_url(pg_server):
    """A database made for this run, with the schema; dropped at the end."""
    import uuid

    import psycopg

    name = f"ssa_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(pg_server, name)
    asyncio.run(_migrate(url))
    yield url
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _migrate(url: str) -> None:
    from ssa_server.store.postgres import PgStore

    store = PgStore(url)
    await store.open()
    await store.close()


def truncate(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE ssa, clients, keys, templates, statuslists, script_revisions, assertion_jtis, "
                     "audit, audit_checkpoints, "
                     "webhooks, webhook_deliveries")


@pytest.fixture
def store_kind() -> str:
    """The store the ``make_api``/``api`` fixtures use; modules parametrize it over both."""
    return "tinydb"


@pytest.fixture
def store_settings(store_kind, request) -> dict:
    """Settings that select ``store_kind``; PostgreSQL tables are emptied for each test."""
    if store_kind == "tinydb":
        return {}
    url = request.getfixturevalue("pg_url")
    truncate(url)
    return {"store_url": url}
