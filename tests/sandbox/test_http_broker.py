"""context.http: outbound HTTP performed by the server for a script, only to its allow-list.

A local HTTP server on 127.0.0.1 is the allowed service (listed explicitly); every SSRF attempt
must be refused before anything connects, and the local server must see no request from it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from pathlib import Path

import pytest

from ssa_server.plugins.sandbox import ScriptError, ScriptRefused
from ssa_server.plugins.sandbox.http_allow import parse_allow
from ssa_server.plugins.sandbox.http_broker import HttpBroker, HttpLimits
from ssa_server.plugins.scripts import ScriptRunner

from http_service import start_server

PROBE = '''
def create(jwt, context):
    urls = jwt.claims["probe_urls"]
    out = []
    for url in urls:
        try:
            if jwt.claims.get("probe_post"):
                r = context.http.post(url, json={"org": "acme"}, headers={"x-key": "k1"})
            else:
                r = context.http.get(url, headers={"accept": "application/json"})
            out.append({"status": r["status"], "json": r.get("json"), "text": r.get("text"),
                        "location": r["headers"].get("location")})
        except Exception as e:
            out.append({"error": str(e)})
    jwt.claims["probe"] = out
'''


@pytest.fixture
def service():
    allowed, other = start_server(), start_server()
    allowed.other = other.server_address[1]
    yield allowed, other
    for s in (allowed, other):
        s.shutdown()
        s.server_close()


def probe_script(tmp_path: Path, allow: list[str]) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    entries = ", ".join(json.dumps(a) for a in allow)
    path.with_suffix(".toml").write_text(f"[http]\nallow = [{entries}]\n")
    return path


def probe(runner: ScriptRunner, *urls: str, post: bool = False) -> list[dict]:
    claims = {"probe_urls": list(urls)}
    if post:
        claims["probe_post"] = True
    return runner.create(claims=claims)["claims"]["probe"]


def test_allowed_get_and_post_reach_the_service(tmp_path, service):
    allowed, _ = service
    port = allowed.server_address[1]
    with ScriptRunner(probe_script(tmp_path, [f"http://127.0.0.1:{port}/v1/"])) as runner:
        (got,) = probe(runner, f"http://127.0.0.1:{port}/v1/ok?org=acme")
        assert got["status"] == 200 and got["json"] == {"org": "acme", "known": True}
        (text,) = probe(runner, f"http://127.0.0.1:{port}/v1/text")
        assert text["text"] == "plain words" and text["json"] is None
        (posted,) = probe(runner, f"http://127.0.0.1:{port}/v1/check", post=True)
        assert posted["json"] == {"echo": {"org": "acme"}}
    assert ("GET", "/v1/ok?org=acme", "") in allowed.hits
    assert ("POST", "/v1/check", "k1") in allowed.hits


def ssrf_urls(port: int, other: int) -> list[str]:
    return [
        f"http://127.0.0.1:{other}/v1/ok",  # another port
        f"http://127.0.0.1:{port}/admin",  # outside the path prefix
        f"http://127.0.0.1:{port}/v1/../admin",  # dot segments
        f"http://127.0.0.1:{port}/v1/%2e%2e/admin",  # encoded dot segments
        f"https://127.0.0.1:{port}/v1/ok",  # another scheme
        f"http://[::1]:{port}/v1/ok",  # IPv6 loopback
        f"http://[::ffff:127.0.0.1]:{port}/v1/ok",  # IPv4-mapped IPv6
        f"http://0.0.0.0:{port}/v1/ok",
        f"http://2130706433:{port}/v1/ok",  # decimal
        f"http://0x7f000001:{port}/v1/ok",  # hex
        f"http://017700000001:{port}/v1/ok",  # octal
        f"http://127.1:{port}/v1/ok",  # short form
        f"http://localhost:{port}/v1/ok",
        f"http://localhost.:{port}/v1/ok",
        f"http://127.0.0.1.:{port}/v1/ok",
        f"http://127.0.0.1:{port}@evil.example/v1/ok",  # userinfo trick
        f"http://evil.example@127.0.0.1:{port}/v1/ok",
        f"http://127.0.0.1:{port}\\@evil.example/v1/ok",
        f"http://127.0.0.1:{port}/v1/ok#frag",
        f"http://127.0.0.1:{port}/v1/ok\r\nX-Injected: 1",
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
        "gopher://127.0.0.1/",
        "",
    ]


def test_ssrf_attempts_are_refused_and_nothing_connects(tmp_path, service):
    allowed, other = service
    port = allowed.server_address[1]
    urls = ssrf_urls(port, other.server_address[1])
    with ScriptRunner(probe_script(tmp_path, [f"http://127.0.0.1:{port}/v1/"])) as runner:
        results = []
        for start in range(0, len(urls), 4):  # at most 4 calls per step
            results += probe(runner, *urls[start:start + 4])
    for url, got in zip(urls, results):
        assert "error" in got and "refused" in got["error"], (url, got)
    assert allowed.hits == [] and other.hits == []


def test_redirects_are_not_followed(tmp_path, service):
    allowed, other = service
    port = allowed.server_address[1]
    with ScriptRunner(probe_script(tmp_path, [f"http://127.0.0.1:{port}/v1/"])) as runner:
        to_host, to_private = probe(runner, f"http://127.0.0.1:{port}/v1/redirect-host",
                                    f"http://127.0.0.1:{port}/v1/redirect-private")
    assert to_host["status"] == 302 and to_host["location"].startswith("http://127.0.0.1:")
    assert to_private["status"] == 302
    assert other.hits == []  # the redirect's target was never asked
    assert [h[1] for h in allowed.hits] == ["/v1/redirect-host", "/v1/redirect-private"]


def test_huge_and_slow_responses_are_cut_off(tmp_path, service):
    allowed, _ = service
    port = allowed.server_address[1]
    with ScriptRunner(probe_script(tmp_path, [f"http://127.0.0.1:{port}/v1/"])) as runner:
        (huge,) = probe(runner, f"http://127.0.0.1:{port}/v1/huge")
        assert "larger than" in huge["error"]
        started = time.monotonic()
        with pytest.raises(ScriptError) as slow:  # the wait counts against the step's wall time (1 s)
            probe(runner, f"http://127.0.0.1:{port}/v1/slow")
        assert slow.value.kind == "timeout"
        assert time.monotonic() - started < 2.5


def test_per_step_call_cap(tmp_path, service):
    allowed, _ = service
    port = allowed.server_address[1]
    with ScriptRunner(probe_script(tmp_path, [f"http://127.0.0.1:{port}/v1/"])) as runner:
        results = probe(runner, *[f"http://127.0.0.1:{port}/v1/ok"] * 5)
    assert [r.get("status") for r in results[:4]] == [200] * 4
    assert "refused" in results[4]["error"] and "per call" in results[4]["error"]
    assert len(allowed.hits) == 4


@pytest.mark.parametrize("table", [
    '[http]\nallow = "http://x.example/"\n',
    '[http]\nallow = ["ftp://x.example/"]\n',
    '[http]\nallow = ["http://user@x.example/"]\n',
    '[http]\nallow = ["http://2130706433/"]\n',
    '[http]\nallow = ["http://x.example/"]\nother = 1\n',
    '[http]\nallow = ["http://0.0.0.0/"]\n',
])
def test_bad_allow_lists_refuse_the_script(tmp_path, table):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    path.with_suffix(".toml").write_text(table)
    with pytest.raises(ScriptRefused, match=r"probe.toml: \[http\]"):
        ScriptRunner(path)


def test_http_table_is_not_in_context_config(tmp_path, service):
    path = tmp_path / "cfg.py"
    path.write_text("def create(jwt, context):\n    jwt.claims['cfg'] = context.config\n")
    path.with_suffix(".toml").write_text('greeting = "hi"\n[http]\nallow = ["http://127.0.0.1:1/v1/"]\n')
    with ScriptRunner(path) as runner:
        assert runner.create()["claims"]["cfg"] == {"greeting": "hi"}


def test_a_script_without_an_allow_list_gets_refusals(tmp_path, service):
    allowed, _ = service
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    with ScriptRunner(path) as runner:
        (got,) = probe(runner, f"http://127.0.0.1:{allowed.server_address[1]}/v1/ok")
    assert "refused" in got["error"] and allowed.hits == []


# --- the broker itself: address checks with a fake resolver (no DNS, no network) ---
def broker_with(answers: list[list[str]], connects: list[tuple[str, int]]) -> HttpBroker:
    async def resolve(host: str, port: int) -> list[str]:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    async def connect(ip: str, port: int, host: str, tls: bool):
        connects.append((ip, port))
        raise OSError("no route (test)")

    return HttpBroker(HttpLimits(), resolve=resolve, connect=connect)


def ask(broker: HttpBroker, allow: list[str], url: str) -> dict:
    entries = parse_allow("t", {"allow": allow})
    return asyncio.run(broker.perform("t", entries, {"method": "GET", "url": url}, 1.0))


def test_dns_rebinding_is_pinned_to_the_checked_address():
    connects: list[tuple[str, int]] = []
    # the first answer is public, every later one loopback: the broker must resolve once
    broker = broker_with([["93.184.216.34"], ["127.0.0.1"]], connects)
    answer = ask(broker, ["http://rebind.example/v1/"], "http://rebind.example/v1/x")
    assert "http_error" in answer and "failed" in answer["http_error"]
    assert connects == [("93.184.216.34", 80)]


@pytest.mark.parametrize("addresses", [["127.0.0.1"], ["10.0.0.5"], ["169.254.169.254"], ["::1"],
                                       ["fd00:ec2::254"], ["0.0.0.0"], ["93.184.216.34", "192.168.1.1"],
                                       ["::ffff:127.0.0.1"], ["100.64.0.1"]])
def test_names_that_resolve_to_private_addresses_are_refused(addresses):
    connects: list[tuple[str, int]] = []
    broker = broker_with([addresses], connects)
    answer = ask(broker, ["https://registry.example/v1/"], "https://registry.example/v1/org")
    assert "refused" in answer["http_error"] and ipaddress.ip_address(addresses[-1])
    assert connects == []


def test_per_script_rate_cap():
    connects: list[tuple[str, int]] = []
    broker = broker_with([["93.184.216.34"]], connects)
    broker.limits = HttpLimits(calls_per_second=2.0)
    answers = [ask(broker, ["http://r.example/"], "http://r.example/a") for _ in range(4)]
    assert sum("per second" in a.get("http_error", "") for a in answers) >= 1
    assert broker.counts["t"]["refused"] >= 1
