"""The events of the server's own tasks and of the services without an HTTP route, in the trail
(both stores): the keys' timeline (rotated, activated, retired), the cleaner's ``ssa.expired``,
client deletion, templates; the client's address behind ``trusted_proxies``."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import ADMIN
from ssa_server.events import SSA_CREATED, Event
from ssa_server.observe import CURRENT, RequestInfo
from test_key_rotation import Clock, signing_kid

pytestmark = pytest.mark.parametrize("store_kind", ["tinydb", "postgresql"])


def trail(api, **filters) -> list[dict]:
    return api.call(api.server.audit.page, _query(**filters))["events"]


def _query(**filters):
    from ssa_server.audit import AuditQuery

    return AuditQuery(limit=1000, **filters)


def test_the_keys_timeline_and_the_cleaner_are_audited(make_api, store_kind):
    clock = Clock()
    api = make_api(clock=clock, token_ttl=10**7, key_activation_delay=600)
    H = api.auth(ADMIN)
    old_kid = signing_kid(api, H)
    short = api.create(H, org_id="brief", expiration=int(clock.t) + 60)
    assert short.status_code == 201, short.text
    short_jti = api.jti(short)
    new = api.call(api.server.keys.rotate)
    clock.t += 600 + 61  # past the switch and its grace
    api.call(api.server.cleanup_once)
    keys = [(e["action"], e["kid"], e["details"].get("status"), e["actor"])
            for e in trail(api) if e["action"].startswith("key.")]
    assert keys == [("key.rotated", new["kid"], None, "server"),
                    ("key.activated", new["kid"], None, "server"),
                    ("key.retired", old_kid, "retiring", "server")]
    expired = trail(api, action="ssa.expired")
    assert [(e["jti"], e["org_id"], e["actor"]) for e in expired] == [(short_jti, "brief", "server")]
    stored = {k["kid"]: k for k in api.call(api.server.store.list_keys)}
    clock.t = stored[old_kid]["remove_after"] + 1
    api.call(api.server.cleanup_once)
    last = trail(api, action="key.retired")[-1]
    assert (last["kid"], last["details"]["status"]) == (old_kid, "retired")
    assert api.call(api.server.audit.verify)[0] is None


def test_clients_and_templates_are_audited(make_api, store_kind):
    api = make_api()
    cid, _ = api.register(ADMIN)
    assert api.call(api.server.clients.delete, cid)
    assert not api.call(api.server.clients.delete, cid)  # nothing deleted: no event
    api.call(api.server.service.save_template, "scanner", {"org_id": "acme"})
    actions = [(e["action"], e["details"]) for e in trail(api)
               if e["action"].startswith(("client", "template"))]
    assert actions == [("client.created", {"client_id": cid, "scopes": [ADMIN],
                                           "token_endpoint_auth_method": "client_secret_basic"}),
                       ("client.deleted", {"client_id": cid}), ("template.saved", {"name": "scanner"})]


def test_templates_saved_and_deleted_over_http_name_the_caller(make_api, store_kind):
    api = make_api()
    cid, secret = api.register(ADMIN)
    r = api.client.post("/token", data={"grant_type": "client_credentials"}, auth=(cid, secret))
    H = {"Authorization": f"Bearer {r.json()['access_token']}"}
    assert api.client.put("/ssa/templates/scanner", json={"org_id": "acme"}, headers=H).status_code == 201
    assert api.client.delete("/ssa/templates/scanner", headers=H).status_code == 204
    # nothing deleted: no event
    assert api.client.delete("/ssa/templates/scanner", headers=H).status_code == 404
    events = [(e["action"], e["actor"], e["details"]) for e in trail(api)
              if e["action"].startswith("template")]
    assert events == [("template.saved", cid, {"name": "scanner"}),
                      ("template.deleted", cid, {"name": "scanner"})]
    assert api.call(api.server.audit.verify)[0] is None


def test_the_address_is_the_clients_behind_trusted_proxies(make_api, store_kind):
    api = make_api(trusted_proxies=("10.0.0.0/8",))

    async def emit_as_request() -> None:
        scope = {"type": "http", "client": ("10.1.2.3", 5555),
                 "headers": [(b"x-forwarded-for", b"198.51.100.7, 10.9.9.9")]}
        token = CURRENT.set(RequestInfo("req-42", scope))
        try:
            await api.server.events.emit(Event(SSA_CREATED, "c1", jti="j1"))
        finally:
            CURRENT.reset(token)
    api.call(emit_as_request)
    (event,) = trail(api, jti="j1")
    assert (event["address"], event["request_id"]) == ("198.51.100.7", "req-42")


def test_a_failing_store_never_fails_the_request(make_api, store_kind, caplog):
    """The trail refusing (here: a broken append) is logged; the SSA is created and answered."""
    api = make_api()

    async def broken(events, *, lazy=False):
        raise RuntimeError("disk on fire")
    api.server.store.append_audit = broken  # (the TimedStore wrapper's attribute)
    r = api.create(org_id="acme")
    assert r.status_code == 201
    deadline = time.time() + 5
    while "audit events not stored" not in caplog.text and time.time() < deadline:
        api.call(asyncio.sleep, 0.05)
    assert "audit events not stored" in caplog.text and "disk on fire" in caplog.text


def test_an_unstorable_event_costs_only_its_own_publisher(make_api, store_kind, caplog):
    """Events of concurrent requests go as one append; one the store cannot hold (a lone
    surrogate: not UTF-8) is dropped and logged, the others are stored, the chain verifies."""
    api = make_api()

    async def three() -> None:
        await asyncio.gather(*(api.server.events.emit(Event(SSA_CREATED, "c1", jti=j, details=d))
                               for j, d in (("a", {}), ("b", {"x": "\ud800"}), ("c", {}))))
        await api.server.audit.flush()
    api.call(three)
    assert [e["jti"] for e in trail(api)] == ["a", "c"]
    assert "1 audit events not stored" in caplog.text
    assert api.call(api.server.audit.verify)[0] is None
