"""Signed event webhooks (issue 15): the outbox in both stores, the CLI, and real ``serve``
processes delivering Security Event Tokens to a receiver on 127.0.0.1 (kill -9, a receiver
answering 500, a slow one, two PostgreSQL nodes)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from jwcrypto import jwk, jws

from faults.served import Served
from ports import free_port
from ssa_server.store.records import DELIVERY_PENDING
from ssa_server.store.tiny import TinyStore
from ssa_server.webhook_delivery import backoff
from ssa_server.webhooks import WebhookError, check_events, check_url

EVENT = "https://ssa-server/events/"
SECRET = "receiver-shared-secret-0123456789"


# --- a receiver on 127.0.0.1 ---
class Receiver:
    """Records each POST (headers, body, time); answers ``status`` after ``delay`` seconds."""

    def __init__(self, port: int = 0, status: int = 202, delay: float = 0.0) -> None:
        self.got: list[tuple[dict[str, str], bytes, float]] = []
        self.status, self.delay = status, delay
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
                time.sleep(outer.delay)
                self.send_response(outer.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 20) -> list[tuple[dict[str, str], bytes, float]]:
        deadline = time.time() + timeout
        while len(self.got) < count:
            assert time.time() < deadline, f"{len(self.got)} deliveries of {count} after {timeout} s"
            time.sleep(0.05)
        return self.got

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def cli(env: dict[str, str], data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ssa_server", *args, "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, **env))


def ok(env: dict[str, str], data: Path, *args: str):
    r = cli(env, data, *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


FAST = {"SSA_WEBHOOK_POLL_INTERVAL": "0.1", "SSA_WEBHOOK_RETRY_BASE": "0.2", "SSA_WEBHOOK_TIMEOUT": "2"}


def set_of(server: Served, body: bytes) -> tuple[dict, dict]:
    """The SET verified against the server's /jwks: (header, claims)."""
    keys = jwk.JWKSet.from_json(server.http.get("/jwks").text)
    token = jws.JWS()
    token.deserialize(body.decode())
    token.verify(keys)  # raises unless signed by a published SSA key
    return token.jose_header, json.loads(token.payload)


def create(server: Served, headers: dict[str, str], org: str = "acme") -> str:
    r = server.http.post("/ssa", json={"org_id": org, "one_time_use": True}, headers=headers)
    assert r.status_code == 201, r.text
    payload = r.json()["ssa"].split(".")[1]
    import base64

    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]


# --- rules ---
def test_subscriber_rules():
    assert check_url("https://hooks.example.com/ssa?x=1", False)
    assert check_url("http://127.0.0.1:9/x", False) and check_url("http://[::1]/x", False)
    assert check_url("http://hooks.internal/x", True)
    for bad in ("http://hooks.example.com/x", "ftp://x/y", "https://user:pw@x/y", "https://x/y#f",
                "https:///nohost", "https://x/ y", ""):
        with pytest.raises(WebhookError):
            check_url(bad, False)
    assert check_events(["ssa.revoked", "ssa.created", "ssa.created"]) == ["ssa.created", "ssa.revoked"]
    for bad in ([], ["ssa.made"], [" "]):
        with pytest.raises(WebhookError):
            check_events(bad)


def test_backoff_doubles_up_to_its_cap_with_jitter_in_the_upper_half():
    assert [backoff(n, 5, 60, lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]
    assert [backoff(n, 5, 60, lambda: 0.0) for n in (1, 2, 3)] == [2.5, 5, 10]


# --- the outbox in both stores ---
@pytest.fixture(params=["tinydb", "postgresql"])
def make_store(request, tmp_path):
    if request.param == "tinydb":
        async def open_tiny():
            store = TinyStore(tmp_path / "data")
            await store.open()
            return store
        return open_tiny
    from conftest import truncate
    from ssa_server.store.postgres import PgStore

    url = request.getfixturevalue("pg_url")
    truncate(url)

    async def open_pg():
        store = PgStore(url)
        await store.open()
        return store
    return open_pg


def row(subscriber="wh_1", *, due=0.0, created=0.0):
    return {"id": uuid.uuid4().hex, "subscriber": subscriber, "url": "https://x/y", "action": "ssa.created",
            "event": {"jti": "j", "org_id": "o", "actor": "c", "outcome": "ok", "time": 1.5},
            "state": DELIVERY_PENDING, "attempts": 0, "next_attempt_at": due, "lease_until": 0.0,
            "last_error": None, "created_at": created, "delivered_at": None}


def test_outbox_contract_on_both_stores(make_store):
    async def go():
        s = await make_store()
        hook = {"id": "wh_1", "url": "https://x/y", "events": ["ssa.created"], "secret": None,
                "created_at": 1}
        await s.add_webhook(hook)
        with pytest.raises(ValueError):
            await s.add_webhook(hook)
        assert await s.list_webhooks() == [hook] and await s.get_webhook("wh_1") == hook
        a, b, later = row(due=10, created=1), row(due=20, created=2), row(due=500, created=3)
        await s.add_deliveries([a, b, later])
        assert await s.get_delivery(a["id"]) == a
        # Due rows, oldest due first, each claimed once until its lease runs out.
        assert [d["id"] for d in await s.claim_deliveries(100, 130, 1)] == [a["id"]]
        assert [d["id"] for d in await s.claim_deliveries(100, 130, 5)] == [b["id"]]
        assert await s.claim_deliveries(120, 150, 5) == []
        assert sorted(d["id"] for d in await s.claim_deliveries(131, 160, 5)) == sorted([a["id"], b["id"]])
        await s.update_delivery(a["id"], {"state": "delivered", "attempts": 1, "lease_until": 0.0,
                                          "delivered_at": 140.0})
        await s.update_delivery(b["id"], {"attempts": 1, "next_attempt_at": 300.0, "lease_until": 0.0,
                                          "last_error": "HTTP 500"})
        with pytest.raises(KeyError):
            await s.update_delivery("nope", {"attempts": 1})
        assert await s.claim_deliveries(200, 230, 5) == []  # b waits for its retry, a is done
        assert [d["id"] for d in await s.claim_deliveries(301, 330, 5)] == [b["id"]]
        assert [d["id"] for d in await s.list_deliveries(state="delivered")] == [a["id"]]
        assert (await s.get_delivery(b["id"]))["last_error"] == "HTTP 500"
        listed = await s.list_deliveries(subscriber="wh_1")
        assert [d["id"] for d in listed] == [a["id"], b["id"], later["id"]]
        assert await s.purge_deliveries(before=2) == 1  # only the delivered one created before 2
        assert await s.get_delivery(a["id"]) is None and await s.get_delivery(b["id"]) is not None
        assert await s.delete_webhook("wh_1") and not await s.delete_webhook("wh_1")
        await s.close()
        s = await make_store()  # durable: pending rows come back, no claim survives a restart of TinyStore
        assert {d["id"] for d in await s.list_deliveries(state="pending")} == {b["id"], later["id"]}
        await s.close()
    asyncio.run(go())


def test_export_carries_the_subscribers_not_the_outbox(make_store, tmp_path):
    from ssa_server.store.transfer import export_records, import_records, parse_lines

    async def go():
        s = await make_store()
        hook = {"id": "wh_1", "url": "https://x/y", "events": ["ssa.created"], "secret": None,
                "created_at": 1}
        await s.add_webhook(hook)
        await s.add_deliveries([row()])
        lines = [line.decode() for line in await export_records(s)]
        await s.close()
        assert [json.loads(line)["table"] for line in lines].count("webhooks") == 1
        assert not any(json.loads(line)["table"] == "webhook_deliveries" for line in lines)
        target = TinyStore(tmp_path / "target")
        await target.open()
        report = await import_records(target, parse_lines(lines), int(time.time()))
        assert report["webhooks"] == {"read": 1, "imported": 1, "skipped": 0}
        assert await target.list_webhooks() == [hook] and await target.list_deliveries() == []
        await target.close()
    asyncio.run(go())


def test_expire_and_purge_names_the_ssas_it_expired(make_store):
    from test_store import ssa

    async def go():
        s = await make_store()
        now = int(time.time())
        old, fresh = ssa("o1", exp=now - 5), ssa("o2", exp=now + 3600)
        await s.add_ssas([old, fresh])
        seen: list[tuple[str, str]] = []
        assert await s.expire_and_purge(now, 1000, seen) == (1, 0)
        assert seen == [(old["jti"], "o1")]
        seen.clear()
        await s.expire_and_purge(now, 1000, seen)
        assert seen == []  # expired once
        await s.close()
    asyncio.run(go())


# --- the CLI ---
def test_cli_add_list_remove_and_the_secret_sealed_at_rest(tmp_path):
    import base64

    master = base64.urlsafe_b64encode(os.urandom(32)).decode()
    env = {"SSA_KEY_ENCRYPTION_KEY": "env:TEST_KEK", "TEST_KEK": master}
    data = tmp_path / "data"
    made = ok(env, data, "webhooks", "add", "https://hooks.example.com/ssa", "--events",
              "ssa.created,ssa.revoked", "--secret", SECRET)
    assert made["id"].startswith("wh_") and made["secret"] is True
    assert made["events"] == ["ssa.created", "ssa.revoked"]
    listed = ok(env, data, "webhooks", "list")
    assert listed == [made] and SECRET not in json.dumps(listed)
    journal = b"".join(p.read_bytes() for p in data.iterdir() if p.is_file())
    assert SECRET.encode() not in journal  # sealed under key_encryption_key
    for args, words in ((("http://hooks.example.com/x", "--events", "ssa.created"), "loopback"),
                        (("https://hooks.example.com/x", "--events", "ssa.made"), "unknown event"),
                        (("https://hooks.example.com/x", "--events", "ssa.created", "--secret", "short"),
                         "--secret")):
        r = cli(env, data, "webhooks", "add", *args)
        assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr
    assert ok(env, data, "webhooks", "remove", made["id"]) == {"removed": made["id"]}
    r = cli(env, data, "webhooks", "remove", made["id"])
    assert r.returncode == 1 and "not_found" in r.stderr
    assert ok(env, data, "webhooks", "list") == []


# --- real servers ---


@pytest.fixture
def serve(tmp_path):
    started: list[Served] = []

    def start(**env: str) -> Served:
        server = Served(tmp_path, **{**FAST, **env})
        started.append(server)
        return server.start()

    yield start
    for s in started:
        s.kill()


@pytest.mark.slow
def test_a_create_delivers_a_signed_set_with_its_hmac(serve, receivers, tmp_path):
    rx = receivers()
    data = tmp_path / "data"
    hook = ok({}, data, "webhooks", "add", rx.url, "--events", "ssa.created,ssa.used,ssa.revoked",
              "--secret", SECRET)
    server = serve()
    headers = server.token()
    jti = create(server, headers)
    assert server.http.post("/ssa/validation", headers={"jti": jti}).status_code == 200
    other = create(server, headers, org="globex")
    assert server.http.delete("/ssa", params={"jti": other}, headers=headers).status_code == 200
    got = rx.wait(4)
    time.sleep(0.5)
    assert len(rx.got) == 4  # nothing twice
    seen = {}
    for head, body, _ in got:
        assert head["content-type"] == "application/secevent+jwt"
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(head["ssa-signature"], expected)
        header, claims = set_of(server, body)
        assert header["typ"] == "secevent+jwt" and header["kid"]
        assert claims["aud"] == rx.url and claims["iss"] == "http://127.0.0.1:%d" % server.port
        assert claims["jti"] == head["ssa-delivery-id"] and abs(claims["iat"] - time.time()) < 60
        (uri, facts), = claims["events"].items()
        seen[(uri, facts["jti"])] = facts
    assert set(seen) == {(EVENT + "ssa.created", jti), (EVENT + "ssa.used", jti),
                         (EVENT + "ssa.created", other), (EVENT + "ssa.revoked", other)}
    assert seen[(EVENT + "ssa.created", jti)]["org_id"] == "acme"
    assert seen[(EVENT + "ssa.created", jti)]["kid"] == header["kid"]
    delivered = ok({}, data, "webhooks", "deliveries", "--state", "delivered", "--subscriber", hook["id"])
    assert len(delivered) == 4 and all(d["attempts"] == 1 for d in delivered)


@pytest.mark.slow
def test_kill_9_after_the_201_still_delivers_after_the_restart(serve, receivers, tmp_path):
    port = free_port()  # the receiver is down: nothing listens there yet
    data = tmp_path / "data"
    ok({}, data, "webhooks", "add", f"http://127.0.0.1:{port}/events", "--events", "ssa.created")
    server = serve()
    jti = create(server, server.token())
    server.kill()  # right after the 201: delivery was refused at most (connection refused)
    pending = ok({}, data, "webhooks", "deliveries", "--state", "pending")
    assert [d["event"]["jti"] for d in pending] == [jti]
    rx = receivers(port=port)
    server = serve()
    head, body, _ = rx.wait(1)[0]
    assert set_of(server, body)[1]["events"][EVENT + "ssa.created"]["jti"] == jti
    assert head["ssa-delivery-id"] == pending[0]["id"]
    time.sleep(0.5)
    assert len(rx.got) == 1


@pytest.mark.slow
def test_a_500_is_retried_with_backoff_then_dead_then_replayed(serve, receivers, tmp_path):
    rx = receivers(status=500)
    data = tmp_path / "data"
    ok({}, data, "webhooks", "add", rx.url, "--events", "ssa.created")
    server = serve(SSA_WEBHOOK_MAX_ATTEMPTS="4")
    jti = create(server, server.token())
    got = rx.wait(4)
    times = [t for _, _, t in got]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # 0.2 s doubled each time, the upper half at random: [0.1, 0.2], [0.2, 0.4], [0.4, 0.8] (+ a poll)
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4, gaps
    assert gaps[2] > gaps[0]
    assert len({h["ssa-delivery-id"] for h, _, _ in got}) == 1  # the same delivery each time
    deadline = time.time() + 10
    while not (dead := ok({}, data, "webhooks", "deliveries", "--state", "dead")):
        assert time.time() < deadline
        time.sleep(0.1)
    assert dead[0]["attempts"] == 4 and dead[0]["last_error"] == "HTTP 500"
    assert dead[0]["event"]["jti"] == jti
    time.sleep(0.6)
    assert len(rx.got) == 4  # dead: no more attempts
    rx.status = 200
    assert ok({}, data, "webhooks", "replay", "--dead") == {"replayed": [dead[0]["id"]]}
    rx.wait(5)
    deadline = time.time() + 10
    while not ok({}, data, "webhooks", "deliveries", "--state", "delivered"):
        assert time.time() < deadline
        time.sleep(0.1)
    r = cli({}, data, "webhooks", "replay", "nope")
    assert r.returncode == 1 and "not_found" in r.stderr


@pytest.mark.slow
def test_a_slow_receiver_does_not_slow_creates(serve, receivers, tmp_path):
    rx = receivers()
    data = tmp_path / "data"
    server = serve(SSA_WEBHOOK_TIMEOUT="5")
    headers = server.token()

    def timed(n: int) -> list[float]:
        out = []
        for i in range(n):
            started = time.perf_counter()
            create(server, headers, org=f"o{i}")
            out.append(time.perf_counter() - started)
        return out

    timed(3)  # warm
    without = timed(15)
    ok({}, data, "webhooks", "add", rx.url, "--events", "ssa.created")
    time.sleep(1.5)  # the subscriber list is re-read every second
    fast = timed(15)  # the outbox row: a second durable write per create
    rx.wait(15)
    rx.delay = 3.0
    slow = timed(15)
    ms = {name: (round(statistics.median(t) * 1000, 1), round(max(t) * 1000, 1))
          for name, t in (("no subscriber", without), ("fast receiver", fast),
                          ("receiver sleeping 3 s", slow))}
    print(f"\ncreate latency (p50 ms, max ms): {ms}")
    assert len(rx.got) > 15  # the slow receiver was being called (and sleeping) meanwhile
    assert max(slow) < 1.0, slow  # never the receiver's 3 s
    assert statistics.median(slow) < 2 * statistics.median(fast) + 0.02, ms


@pytest.mark.slow
def test_two_postgresql_nodes_deliver_each_event_once(pg_url, receivers, tmp_path):
    from conftest import truncate

    truncate(pg_url)
    rx = receivers()
    env = {"SSA_STORE_URL": pg_url, **FAST}
    ok(env, tmp_path / "unused", "webhooks", "add", rx.url, "--events", "ssa.created")
    nodes = [Served(tmp_path / f"n{i}", SSA_STORE_URL=pg_url, SSA_ISSUER="https://ssa.example.test",
                    SSA_WEBHOOK_CONCURRENCY="8", **FAST) for i in range(2)]
    try:
        for n in nodes:
            n.start()
        headers = nodes[0].token()
        jtis = [create(nodes[i % 2], headers, org=f"o{i}") for i in range(30)]
        rx.wait(30)
        time.sleep(1.5)  # long enough for a second claim by either node
        delivered = [json.loads(jws_payload(body))["events"][EVENT + "ssa.created"]["jti"]
                     for _, body, _ in rx.got]
        assert sorted(delivered) == sorted(jtis)  # each once
    finally:
        for n in nodes:
            n.kill()


def jws_payload(body: bytes) -> bytes:
    import base64

    part = body.split(b".")[1]
    return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))


@pytest.mark.slow
def test_the_cleaner_and_a_cli_rotation_deliver_expired_and_rotated(serve, receivers, tmp_path):
    rx = receivers()
    data = tmp_path / "data"
    ok({}, data, "webhooks", "add", rx.url, "--events", "ssa.expired,key.rotated")
    server = serve(SSA_CLEANUP_INTERVAL="1")
    r = server.http.post("/ssa", json={"org_id": "soon", "expiration": int(time.time()) + 2},
                         headers=server.token())
    assert r.status_code == 201, r.text
    jti = json.loads(jws_payload(r.json()["ssa"].encode()))["jti"]
    rotated = ok({}, data, "keys", "rotate")["kid"]  # written by the CLI process, delivered by the server
    got = rx.wait(2, timeout=30)
    events = {}
    for _, body, _ in got:
        (uri, facts), = set_of(server, body)[1]["events"].items()
        events[uri] = facts
    assert events[EVENT + "ssa.expired"]["jti"] == jti and events[EVENT + "ssa.expired"]["org_id"] == "soon"
    assert events[EVENT + "ssa.expired"]["actor"] == "server"
    assert events[EVENT + "key.rotated"]["kid"] == rotated
    assert events[EVENT + "key.rotated"]["actor"].startswith("cli:")


def test_no_subscriber_or_an_unwanted_event_writes_nothing_and_a_failing_outbox_fails_no_request(make_api):
    api = make_api()
    store = api.server.store
    writes: list[int] = []
    real = store.add_deliveries

    async def counted(records):
        writes.append(len(records))
        await real(records)

    store.add_deliveries = counted  # (the TimedStore's attribute: the outbox calls this one)
    H = api.auth()
    assert api.create(H, org_id="a").status_code == 201
    assert writes == []  # no subscriber: no store write
    assert api.call(api.server.webhooks.add, "https://hooks.example.com/x", ["ssa.revoked"])
    time.sleep(1.1)  # the subscriber list is re-read every second
    assert api.create(H, org_id="b").status_code == 201
    assert writes == []  # nobody asked for ssa.created
    jti = api.jti(api.create(H, org_id="c"))
    assert api.client.delete("/ssa", params={"jti": jti}, headers=H).status_code == 200
    assert writes == [1]

    async def broken(records):
        raise OSError("disk on fire")

    store.add_deliveries = broken
    jti = api.jti(api.create(H, org_id="d"))
    r = api.client.delete("/ssa", params={"jti": jti}, headers=H)
    assert r.status_code == 200  # the revocation stands; the sink's failure is logged
    assert api.call(store.get_ssa, jti)["status"] == "REVOKED"


@pytest.mark.slow
def test_a_silent_receiver_is_cut_off_by_the_timeout(serve, tmp_path):
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does) and never answers
    try:
        data = tmp_path / "data"
        ok({}, data, "webhooks", "add", f"http://127.0.0.1:{silent.getsockname()[1]}/x", "--events",
           "ssa.created")
        server = serve(SSA_WEBHOOK_TIMEOUT="1", SSA_WEBHOOK_MAX_ATTEMPTS="2", SSA_WEBHOOK_RETRY_BASE="0.1")
        started = time.time()
        create(server, server.token())
        deadline = time.time() + 15
        while not (dead := ok({}, data, "webhooks", "deliveries", "--state", "dead")):
            assert time.time() < deadline, ok({}, data, "webhooks", "deliveries")
            time.sleep(0.2)
        assert "timed out" in dead[0]["last_error"] or "Timeout" in dead[0]["last_error"], dead
        assert time.time() - started < 12  # two attempts of at most 2 x 1 s each, and the waits
    finally:
        silent.close()
