"""A small external authorization server on 127.0.0.1 for the external-token tests: its own RSA
and EC keys, a discovery document (RFC 8414, or only OIDC's), a JWKS endpoint and an RFC 7662
introspection endpoint (client_secret_basic), each counting its hits."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote_plus

from jwcrypto import jwk, jws

INTROSPECTION_CLIENT = "ssa-server"
INTROSPECTION_SECRET = "s3cret:with/odd+chars"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ExternalIssuer:
    def __init__(self, *, oidc_only: bool = False) -> None:
        self.keys = {"rsa-1": jwk.JWK.generate(kty="RSA", size=2048, kid="rsa-1"),
                     "ec-1": jwk.JWK.generate(kty="EC", crv="P-256", kid="ec-1")}
        self.published = ["rsa-1", "ec-1"]
        self.hits: dict[str, int] = {}
        self.answers: dict[str, dict] = {}  # opaque token -> introspection answer
        self.silent = False
        self.delay = 0.0  # seconds each introspection answer takes
        self.oidc_only = oidc_only
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                well_known = ("/.well-known/openid-configuration" if outer.oidc_only
                              else "/.well-known/oauth-authorization-server")
                if self.path == well_known:
                    self._send(200, json.dumps({"issuer": outer.url, "jwks_uri": f"{outer.url}/jwks",
                                                "introspection_endpoint": f"{outer.url}/introspect"}))
                elif self.path == "/jwks":
                    self._send(200, json.dumps(outer.jwks()))
                else:
                    self._send(404, "{}")

            def do_POST(self) -> None:  # noqa: N802
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                if outer.silent:
                    time.sleep(4)
                time.sleep(outer.delay)
                if self.path != "/introspect":
                    self._send(404, "{}")
                    return
                scheme, _, encoded = (self.headers.get("Authorization") or "").partition(" ")
                user, _, password = base64.b64decode(encoded or "").decode().partition(":")
                if scheme != "Basic" or (unquote_plus(user), unquote_plus(password)) != (
                        INTROSPECTION_CLIENT, INTROSPECTION_SECRET):
                    self._send(401, '{"error": "invalid_client"}')
                    return
                form = parse_qs(body)
                if form.get("token_type_hint") != ["access_token"]:
                    self._send(400, '{"error": "invalid_request"}')
                    return
                token = form.get("token", [""])[0]
                self._send(200, json.dumps(outer.answers.get(token, {"active": False})))

            def _send(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def jwks(self) -> dict:
        return {"keys": [self.keys[k].export_public(as_dict=True) for k in self.published]}

    def rotate(self, kid: str = "rsa-2") -> jwk.JWK:
        """A new key, published beside the others."""
        self.keys[kid] = jwk.JWK.generate(kty="RSA", size=2048, kid=kid)
        self.published.append(kid)
        return self.keys[kid]

    def claims(self, audience: str, **changes: object) -> dict:
        now = int(time.time())
        claims = {"iss": self.url, "sub": "service-account-1", "client_id": "ext-client-1", "aud": audience,
                  "scope": "https://jans.io/auth/ssa.admin openid", "iat": now, "exp": now + 300,
                  "jti": str(uuid.uuid4())}
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims: dict, kid: str = "rsa-1", alg: str | None = None, header: dict | None = None,
             key: jwk.JWK | None = None) -> str:
        key = key or self.keys[kid]
        alg = alg or ("ES256" if key.get("kty") == "EC" else "RS256")
        token = jws.JWS(json.dumps(claims))
        token.add_signature(key, alg=alg, protected=json.dumps(
            header if header is not None else {"alg": alg, "kid": kid, "typ": "at+jwt"}))
        return token.serialize(compact=True)

    def opaque(self, answer: dict) -> str:
        token = b64(uuid.uuid4().bytes + uuid.uuid4().bytes)
        self.answers[token] = answer
        return token

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
