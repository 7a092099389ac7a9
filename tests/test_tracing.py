"""OpenTelemetry traces (issue 15): the span tree of a request, through a real uvicorn.

The span tree is read from the SDK's in-memory exporter, so the server runs in this process:
uvicorn serves the app on 127.0.0.1 in a thread, the tests drive it with httpx2.  The OTLP
exporter configured by the ``OTEL_*`` variables is tested through real ``serve`` processes
(one, and ``--workers 2`` on PostgreSQL) exporting to a local OTLP/HTTP receiver; with tracing
off, a fresh interpreter that serves a request has imported nothing of opentelemetry.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conftest import ADMIN
from ports import free_port
from ssa_server.app import create_app
from ssa_server.server import Server
from ssa_server.settings import Settings
from ssa_server.tracing import OFF, OtelTracing, from_settings

FIRST = 'def create(jwt, context):\n    jwt.claims["first"] = True\n    return True\n'
SECOND = ('def create(jwt, context):\n    jwt.claims["second"] = True\n    return True\n\n\n'
          'def get(ssa_list, context):\n    return True\n')
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _client(settings: Settings) -> tuple[str, str]:
    """A client with the admin scope, made in the data dir before the server opens it (as
    ``ssa-server clients create`` would)."""
    async def make() -> tuple[str, str]:
        server = Server.build(settings)
        await server.start(background=False, scripts=False)
        try:
            record, secret = await server.clients.create([ADMIN], "tracing test")
            return record["client_id"], secret
        finally:
            await server.stop()

    return asyncio.run(make())


class Traced:
    """A traced server (in-memory exporter) under uvicorn in a thread."""

    def __init__(self, tmp: Path) -> None:
        scripts = tmp / "scripts"
        scripts.mkdir()
        (scripts / "10_first.py").write_text(FIRST)
        (scripts / "20_second.py").write_text(SECOND)
        self.settings = Settings(data_dir=tmp / "data", scripts_dir=scripts, script_workers=1,
                                 otel_enabled=True)
        self.client_id, self.secret = _client(self.settings)
        self.exporter = InMemorySpanExporter()
        self.tracing = OtelTracing(processor=SimpleSpanProcessor(self.exporter))
        self.server = Server.build(self.settings, tracing=self.tracing)
        port = free_port()
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server=self.server), host="127.0.0.1", port=port,
                                                lifespan="on", log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15)
        deadline = time.time() + 60
        while True:
            try:
                if self.http.get("/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.05)
        token = self.http.post("/token", data={"grant_type": "client_credentials"},
                               auth=(self.client_id, self.secret))
        assert token.status_code == 200, token.text
        self.token = token.json()["access_token"]

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)
        self.http.close()

    def spans_of(self, response: httpx.Response) -> list:
        """The finished spans of the trace the response's request span began."""
        request_id = response.headers["x-request-id"]
        deadline = time.time() + 5  # the request span ends just after the response went out
        while True:
            spans = self.exporter.get_finished_spans()
            roots = [s for s in spans if s.kind == SpanKind.SERVER
                     and s.attributes.get("ssa.request_id") == request_id]
            if roots:
                trace_id = roots[0].context.trace_id
                return [s for s in spans if s.context.trace_id == trace_id]
            assert time.time() < deadline, f"no request span for {request_id}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    t = Traced(tmp_path_factory.mktemp("traced"))
    yield t
    t.stop()


def _root(spans: list):
    roots = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(roots) == 1, [s.name for s in spans]
    return roots[0]


def _children(spans: list, parent) -> list:
    return sorted((s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id),
                  key=lambda s: s.start_time)


def _descendants(spans: list, parent) -> list:
    out = []
    for child in _children(spans, parent):
        out += [child, *_descendants(spans, child)]
    return out


def test_create_span_tree(traced):
    r = traced.http.post("/ssa", json={"org_id": "acme", "one_time_use": False},
                         headers={"Authorization": f"Bearer {traced.token}"})
    assert r.status_code == 201, r.text
    spans = traced.spans_of(r)
    root = _root(spans)
    assert root.name == "POST /ssa"
    assert root.parent is None  # no traceparent sent: a new trace
    assert root.attributes["http.request.method"] == "POST"
    assert root.attributes["http.route"] == "/ssa"
    assert root.attributes["http.response.status_code"] == 201
    assert root.attributes["ssa.request_id"] == r.headers["x-request-id"]
    assert root.attributes["ssa.client_id"] == traced.client_id
    assert root.status.status_code != StatusCode.ERROR

    names = [s.name for s in _children(spans, root)]
    # The request's steps in order: auth, validation, the scripts' chain, signing, the store.
    for step in ("auth", "validation", "scripts.create", "sign", "store.add_ssa"):
        assert step in names, names
    order = [names.index(step) for step in ("auth", "validation", "scripts.create", "sign", "store.add_ssa")]
    assert order == sorted(order), names
    auth = next(s for s in spans if s.name == "auth")
    assert auth.attributes["ssa.client_id"] == traced.client_id
    assert "store.has_client" in [s.name for s in _descendants(spans, auth)]  # the client still registered

    chain = next(s for s in spans if s.name == "scripts.create")
    assert chain.attributes["ssa.hook"] == "create" and chain.attributes["ssa.scripts"] == 2
    scripts = _children(spans, chain)
    assert [s.name for s in scripts] == ["script.create", "script.create"]
    assert [s.attributes["ssa.script.name"] for s in scripts] == ["10_first", "20_second"]
    assert all(s.attributes["ssa.script.outcome"] == "ok" for s in scripts)
    assert scripts[0].end_time <= scripts[1].start_time  # in chain order, within the chain's span
    assert chain.start_time <= scripts[0].start_time and scripts[1].end_time <= chain.end_time

    header = json.loads(_b64(r.json()["ssa"].split(".")[0]))
    sign = next(s for s in spans if s.name == "sign")
    assert sign.attributes["ssa.signing.alg"] == "RS256" == header["alg"]
    assert sign.attributes["ssa.signing.kid"] == header["kid"]
    store = next(s for s in spans if s.name == "store.add_ssa")
    assert store.attributes["ssa.store.op"] == "add_ssa"
    assert store.attributes["ssa.store.backend"] == "tinydb"
    claims = json.loads(_b64(r.json()["ssa"].split(".")[1]))
    assert claims["first"] is True and claims["second"] is True  # the scripts did run


def test_lone_script_span(traced):
    """A chain of one script is a lone sandbox call: its span is timed around that call."""
    r = traced.http.get("/ssa", headers={"Authorization": f"Bearer {traced.token}"})
    assert r.status_code == 200, r.text
    spans = traced.spans_of(r)
    root = _root(spans)
    assert root.name == "GET /ssa"
    chain = next(s for s in spans if s.name == "scripts.get")
    (script,) = _children(spans, chain)
    assert script.name == "script.get"
    assert script.attributes["ssa.script.name"] == "20_second"
    assert "ssa.script.batched" not in script.attributes
    assert script.attributes["ssa.script.outcome"] == "ok"


def test_traceparent_is_the_parent(traced):
    r = traced.http.get("/health/live", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert r.status_code == 200
    root = _root(traced.spans_of(r))
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.parent is not None and format(root.parent.span_id, "016x") == PARENT_ID
    assert root.parent.is_remote
    # A malformed traceparent is ignored: a new trace, not an error.
    r = traced.http.get("/health/live", headers={"traceparent": "00-zz-yy-01"})
    assert r.status_code == 200
    root = _root(traced.spans_of(r))
    assert root.parent is None and format(root.context.trace_id, "032x") != TRACE_ID


def test_status_codes_and_errors(traced):
    r = traced.http.post("/ssa", json={"org_id": "acme"})  # no token
    assert r.status_code == 401
    spans = traced.spans_of(r)
    root = _root(spans)
    assert root.attributes["http.response.status_code"] == 401
    assert root.status.status_code != StatusCode.ERROR  # a client error is not the server's
    auth = next(s for s in spans if s.name == "auth")
    assert auth.status.status_code == StatusCode.ERROR and auth.attributes["error.type"] == "MissingToken"

    r = traced.http.post("/ssa", content=b"{not json", headers={"Authorization": f"Bearer {traced.token}",
                                                                "Content-Type": "application/json"})
    assert r.status_code == 400
    spans = traced.spans_of(r)
    assert _root(spans).attributes["http.response.status_code"] == 400
    validation = next(s for s in spans if s.name == "validation")
    assert validation.status.status_code == StatusCode.ERROR
    assert "sign" not in [s.name for s in spans]

    r = traced.http.get(f"/no/such/path/{traced.token}")  # a token pasted into a path
    assert r.status_code == 404
    root = _root(traced.spans_of(r))
    assert root.name == "GET unmatched" and root.attributes["http.route"] == "unmatched"
    assert root.attributes["http.response.status_code"] == 404
    assert "/no/such/path" not in root.to_json()  # never the raw path


def test_no_secret_in_any_span(traced):
    r = traced.http.post("/ssa", json={"org_id": "acme", "one_time_use": False},
                         headers={"Authorization": f"Bearer {traced.token}"})
    assert r.status_code == 201
    ssa = r.json()["ssa"]
    exported = "\n".join(s.to_json() for s in traced.exporter.get_finished_spans())
    assert "POST /ssa" in exported  # the spans are there
    for secret in (traced.token, traced.secret, ssa, *traced.token.split("."), *ssa.split(".")):
        assert secret not in exported
    assert "Bearer" not in exported


def test_tracing_is_off_by_default():
    assert from_settings(Settings()) is OFF
    assert from_settings(Settings(otel_enabled=True), environ={"OTEL_SDK_DISABLED": "true"}) is OFF
    assert isinstance(from_settings(Settings(otel_enabled=True), environ={}), OtelTracing)


def test_off_imports_nothing_of_opentelemetry(tmp_path):
    """A server with tracing off serves a request (create included) and has imported nothing
    of opentelemetry: the off path costs no import and no middleware."""
    code = f"""
import asyncio, sys
import httpx2 as httpx
from ssa_server.app import create_app
from ssa_server.server import Server
from ssa_server.settings import load_settings

async def main():
    settings = load_settings({{"data_dir": {str(tmp_path / 'data')!r},
                               "scripts_dir": {str(tmp_path / 'none')!r}}})
    server = Server.build(settings)
    await server.start()
    record, secret = await server.clients.create(["{ADMIN}"], "t")
    app = create_app(server=server, manage_lifespan=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        token = (await http.post("/token", data={{"grant_type": "client_credentials"}},
                                 auth=(record["client_id"], secret))).json()["access_token"]
        r = await http.post("/ssa", json={{"org_id": "a"}}, headers={{"Authorization": "Bearer " + token}})
        assert r.status_code == 201, r.text
    await server.stop()
    print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))

asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSA_", "OTEL_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _b64(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# --- the OTLP exporter, configured by OTEL_* variables, in real serve processes ---

class _Receiver(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            self.server.exports.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def receiver():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.daemon_threads = True
    server.exports = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _exported(receiver) -> list[tuple[dict, object]]:
    """(resource attributes, span) for every span the receiver got."""
    out = []
    for request in receiver.exports:
        for rs in request.resource_spans:
            resource = {a.key: a.value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                out += [(resource, span) for span in ss.spans]
    return out


def _otel_env(receiver) -> dict[str, str]:
    # A schedule delay far beyond the test: the spans arrive only through the flush at stop.
    return {"SSA_OTEL_ENABLED": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
            "OTEL_BSP_SCHEDULE_DELAY": "600000", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512"}


def _serve(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ssa_server", "serve", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, **env))
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, "serve exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "serve did not become ready"
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise


@pytest.mark.slow
def test_serve_exports_by_otel_variables_and_flushes_at_stop(tmp_path, receiver):
    env = dict(_otel_env(receiver), OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=test")
    proc, port = _serve(["--data-dir", str(tmp_path / "data"), "--scripts-dir", str(tmp_path / "none")], env)
    try:
        for i in range(5):
            r = httpx.get(f"http://127.0.0.1:{port}/health/live", headers={"X-Request-ID": f"live-{i}"})
            assert r.status_code == 200
        time.sleep(0.5)
        assert _exported(receiver) == []  # batched, not yet exported
    finally:
        _stop(proc)
    spans = [(res, s) for res, s in _exported(receiver)
             if s.kind == s.SPAN_KIND_SERVER and s.name == "GET /health/live"]
    ids = sorted(a.value.string_value for _, s in spans for a in s.attributes if a.key == "ssa.request_id")
    assert ids == [f"live-{i}" for i in range(5)]  # every span flushed by Server.stop
    resource = spans[0][0]
    assert resource["service.name"].string_value == "ssa-server"  # the default service.name
    assert resource["deployment.environment.name"].string_value == "test"  # OTEL_RESOURCE_ATTRIBUTES


@pytest.mark.slow
def test_workers_each_export_their_own_spans(pg_url, tmp_path, receiver):
    from conftest import truncate

    truncate(pg_url)
    proc, port = _serve(["--workers", "2", "--data-dir", str(tmp_path / "unused"),
                         "--scripts-dir", str(tmp_path / "none")],
                        dict(_otel_env(receiver), SSA_STORE_URL=pg_url, OTEL_SERVICE_NAME="ssa-node"))
    sent = 0
    try:
        deadline = time.time() + 30
        pids = set()
        while len(pids) < 2 and time.time() < deadline:  # new connections, spread over the workers
            for _ in range(8):
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
                    assert http.get("/health/live").status_code == 200
                    sent += 1
            pids = {int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == proc.pid}
            if sent >= 64:
                break
    finally:
        _stop(proc)
    spans = [(res, s) for res, s in _exported(receiver)
             if s.kind == s.SPAN_KIND_SERVER and s.name == "GET /health/live"]
    assert len(spans) == sent  # each worker flushed its own at its stop
    exporters = {res["process.pid"].int_value for res, _ in spans}
    assert len(exporters) == 2, exporters  # two workers, two providers
    assert {res["service.name"].string_value for res, _ in spans} == {"ssa-node"}  # OTEL_SERVICE_NAME


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])
