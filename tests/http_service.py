"""A local HTTP service on 127.0.0.1 for the context.http tests: it records every request it
gets (method, path, the x-key header), so a test can show that a refused call reached nothing."""

from __future__ import annotations

import http.server
import json
import threading
import time


class Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[tuple[str, str, str]]  # set per server
    other = 0

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, body: bytes, ctype: str = "application/json", extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.hits.append(("GET", self.path, self.headers.get("x-key", "")))
        if self.path.startswith("/v1/orgs/"):  # the registry example's service
            org = self.path.rsplit("/", 1)[1]
            if self.headers.get("authorization") != "Bearer " + self.server.api_key:
                self._reply(401, b'{"error":"unauthorized"}')
            elif org in self.server.known_orgs:
                self._reply(200, json.dumps({"org_id": org, "status": "active"}).encode())
            else:
                self._reply(404, b'{"error":"unknown org"}')
        elif self.path.startswith("/v1/ok"):
            self._reply(200, json.dumps({"org": "acme", "known": True}).encode())
        elif self.path == "/v1/text":
            self._reply(200, b"plain words", "text/plain")
        elif self.path == "/v1/redirect-host":
            self._reply(302, b"", "text/plain", {"Location": f"http://127.0.0.1:{self.server.other}/v1/ok"})
        elif self.path == "/v1/redirect-private":
            self._reply(302, b"", "text/plain", {"Location": "http://169.254.169.254/latest/meta-data/"})
        elif self.path == "/v1/huge":
            self._reply(200, b"x" * (2 << 20), "text/plain")
        elif self.path == "/v1/slow":
            time.sleep(3)
            self._reply(200, b"{}")
        else:
            self._reply(404, b'{"error":"not found"}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.hits.append(("POST", self.path, self.headers.get("x-key", "")))
        self._reply(200, json.dumps({"echo": json.loads(body or b"null")}).encode())


def start_server() -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.daemon_threads = True
    server.hits = []
    server.other = 0
    server.api_key = "registry-key-1"
    server.known_orgs = {"acme", "globex"}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
