"""A verification kit for the servers that consume SSAs (dynamic client registration).

``verify_ssa(token, issuer)`` (or an ``SsaVerifier`` kept between calls, which keeps its caches)
checks what a consumer must: the issuer's discovery document, its JWKS (fetched again when a
token names an unknown ``kid``, at most once per ``refetch_interval``), an allow-list of
algorithms, ``iss``, ``exp``/``iat``/``nbf`` with a leeway, and the SSA's status: its Token Status
List entry (the list token verified with the same keys and cached for its ``ttl``) or, for an SSA
without one, the issuer's ``ssa_status_endpoint``.  Every refusal is a ``VerificationError``
subclass with an ``error`` code.  Imports only the standard library and jwcrypto: none of the
server.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from typing import Any

from jwcrypto import jwk, jws
from jwcrypto.common import JWException

DEFAULT_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
                "Ed25519")
MAX_DOCUMENT = 1 << 20  # bytes read from any one response

Fetch = Callable[[str], tuple[int, bytes]]  # url -> (HTTP status, body)


class VerificationError(Exception):
    """The SSA is refused; ``error`` says why in one word."""

    error = "invalid_ssa"


class IssuerUnreachable(VerificationError):
    error = "issuer_unreachable"


class MalformedToken(VerificationError):
    error = "malformed"


class AlgorithmNotAllowed(VerificationError):
    error = "alg_not_allowed"


class UnknownKey(VerificationError):
    error = "unknown_kid"


class BadSignature(VerificationError):
    error = "bad_signature"


class WrongIssuer(VerificationError):
    error = "wrong_issuer"


class Expired(VerificationError):
    error = "expired"


class NotYetValid(VerificationError):
    error = "not_yet_valid"


class Revoked(VerificationError):
    """The status list says INVALID (revoked or used), or the status endpoint says so."""

    error = "revoked"


class StatusUnavailable(VerificationError):
    error = "status_unavailable"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx is answered as it is (an HTTPError): not 200, so refused


def urllib_fetch(timeout: float = 5.0, *, follow_redirects: bool = True) -> Fetch:
    """GET with ``timeout`` per socket operation and about twice that for the whole body, at most
    ``MAX_DOCUMENT`` bytes kept (a longer document is cut there, so it is not JSON)."""
    opener = (urllib.request.build_opener() if follow_redirects
              else urllib.request.build_opener(_NoRedirect()))

    def fetch(url: str) -> tuple[int, bytes]:
        accept = "application/json, application/statuslist+jwt"
        return _exchange(opener, urllib.request.Request(url, headers={"Accept": accept}), timeout)
    return fetch


def _exchange(opener: urllib.request.OpenerDirector, request: urllib.request.Request,
              timeout: float) -> tuple[int, bytes]:
    """One request: (status, body) with ``timeout`` per socket operation and about twice that for
    the body, at most ``MAX_DOCUMENT`` bytes kept; an unreachable peer -> ``IssuerUnreachable``."""
    deadline = time.monotonic() + 2 * timeout
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, _read_capped(response, deadline)
    except urllib.error.HTTPError as e:
        return e.code, _read_capped(e, deadline)
    except (OSError, ValueError) as e:
        raise IssuerUnreachable(f"{request.full_url}: {type(e).__name__}") from None


Post = Callable[[str, bytes, dict[str, str]], tuple[int, bytes]]  # url, form body, headers -> (status, body)


def urllib_post(timeout: float = 5.0) -> Post:
    """POST a form the way ``urllib_fetch`` GETs (the timeouts, the size cap), never following a
    redirect (the request carries credentials): for an RFC 7662 introspection endpoint."""
    opener = urllib.request.build_opener(_NoRedirect())

    def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded", **headers})
        return _exchange(opener, request, timeout)
    return post


def signature_verifies(token: str, key: jwk.JWK, alg: str) -> bool:
    """Whether the compact JWS ``token`` is signed by ``key`` with ``alg``, and with no other alg
    (the caller has checked the header's alg against its own allow-list)."""
    signed = jws.JWS()
    signed.allowed_algs = [alg]
    try:
        signed.deserialize(token)
        signed.verify(key, alg=alg)
    except (JWException, ValueError, TypeError):
        return False
    return True


def _read_capped(response: Any, deadline: float) -> bytes:
    """At most MAX_DOCUMENT bytes, read in pieces until ``deadline`` (a server dripping bytes
    cannot hold a reader longer than that and one socket timeout)."""
    chunks: list[bytes] = []
    size = 0
    while size < MAX_DOCUMENT:
        if time.monotonic() > deadline:
            raise TimeoutError("the response took too long")
        chunk = (getattr(response, "read1", None) or response.read)(min(65536, MAX_DOCUMENT - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class KeySetCache:
    """A JWK set fetched from a URL and kept: fetched again when a token names a ``kid`` it does
    not hold, or once it is older than ``max_age``, at most once per ``refetch_interval``.
    ``url`` is asked only when a fetch is due (the kit finds it in the discovery document)."""

    def __init__(self, url: Callable[[], str], fetch: Fetch, *, refetch_interval: float = 30.0,
                 max_age: float = float("inf"), clock: Callable[[], float] = time.time) -> None:
        self._url, self._fetch, self._clock = url, fetch, clock
        self.refetch_interval, self.max_age = refetch_interval, max_age
        self.keys: jwk.JWKSet | None = None
        self.fetched_at = float("-inf")
        self.failure: IssuerUnreachable | None = None  # the last fetch's, until one succeeds
        self._lock = threading.Lock()

    def cached(self, kid: str | None) -> jwk.JWK | None:
        """The key ``kid`` if it is held and the set is fresh: no I/O."""
        if self.keys is None or kid is None or self._clock() - self.fetched_at >= self.max_age:
            return None
        return self.keys.get_key(kid)

    def key(self, kid: str | None) -> jwk.JWK:
        """The key ``kid`` (fetching the set if due); UnknownKey, IssuerUnreachable.  Callers in
        several threads wait for one fetch under way rather than being refused while it runs."""
        with self._lock:
            return self._key(kid)

    def _key(self, kid: str | None) -> jwk.JWK:
        found = self.cached(kid)
        if found is None and self._clock() - self.fetched_at >= self.refetch_interval:
            url = self._url()
            self.fetched_at = self._clock()  # a failed fetch waits its interval too
            try:
                self.keys, self.failure = self._fetch_set(url), None
            except IssuerUnreachable as e:
                self.failure = e
                raise
            found = self.keys.get_key(kid) if kid is not None else None
        elif found is None and self.keys is not None and kid is not None:
            found = self.keys.get_key(kid)  # stale but not yet due again: what was fetched last
        elif found is None and self.failure is not None:
            raise self.failure  # the last fetch failed and the next is not due yet
        if found is None:
            raise UnknownKey(f"no key {kid!r} in the JWKS")
        return found

    def _fetch_set(self, url: str) -> jwk.JWKSet:
        status, body = self._fetch(url)
        if status != 200:
            raise IssuerUnreachable(f"{url} answered {status}")
        try:
            return jwk.JWKSet.from_json(body)
        except (JWException, ValueError, TypeError, AttributeError, RecursionError):
            raise IssuerUnreachable("the JWKS is not a JWK set") from None


def _b64json(part: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except ValueError:
        raise MalformedToken("a JWT part is not base64url JSON") from None


class SsaVerifier:
    def __init__(self, issuer: str, *, algs: tuple[str, ...] = DEFAULT_ALGS, leeway: int = 60,
                 check_status: bool = True, refetch_interval: float = 30.0, fetch: Fetch | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.issuer = issuer.rstrip("/")
        self.algs, self.leeway, self.check_status = tuple(algs), leeway, check_status
        self.refetch_interval = refetch_interval
        self._fetch = fetch or urllib_fetch()
        self._clock = clock
        self._discovery: dict[str, Any] | None = None
        self._jwks = KeySetCache(lambda: self.discovery()["jwks_uri"], self._fetch,
                                 refetch_interval=refetch_interval, clock=clock)
        self._lists: dict[str, tuple[float, dict[str, Any]]] = {}  # uri -> (valid until, status_list)

    # --- documents ---
    def _json(self, url: str) -> Any:
        status, body = self._fetch(url)
        if status != 200:
            raise IssuerUnreachable(f"{url} answered {status}")
        try:
            return json.loads(body)
        except ValueError:
            raise IssuerUnreachable(f"{url} is not JSON") from None

    def discovery(self) -> dict[str, Any]:
        if self._discovery is None:
            doc = self._json(f"{self.issuer}/.well-known/openid-configuration")
            if (not isinstance(doc, dict) or doc.get("issuer") != self.issuer
                    or not isinstance(doc.get("jwks_uri"), str)):
                raise IssuerUnreachable("the discovery document does not name this issuer and a jwks_uri")
            self._discovery = doc
        return self._discovery

    def _key(self, kid: str | None) -> jwk.JWK:
        """The issuer's key; the JWKS fetched again for an unknown kid at most once per refetch_interval."""
        try:
            return self._jwks.key(kid)
        except UnknownKey:
            raise UnknownKey(f"no key {kid!r} in the issuer's JWKS") from None

    def _verified(self, token: str, typ: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        parts = token.split(".") if isinstance(token, str) else []
        if len(parts) != 3:
            raise MalformedToken("not a compact JWS")
        header = _b64json(parts[0])
        if not isinstance(header, dict):
            raise MalformedToken("the header is not an object")
        if header.get("alg") not in self.algs:
            raise AlgorithmNotAllowed(f"alg {header.get('alg')!r} is not allowed")
        if typ is not None and header.get("typ") != typ:
            raise MalformedToken(f"typ is not {typ}")
        key = self._key(header.get("kid"))
        verifier = jws.JWS()
        try:
            verifier.deserialize(token)
            verifier.verify(key, alg=header["alg"])
            claims = json.loads(verifier.payload)
        except (JWException, ValueError):
            raise BadSignature("the signature does not verify") from None
        if not isinstance(claims, dict):
            raise MalformedToken("the claims are not an object")
        return header, claims

    # --- the SSA ---
    def verify(self, token: str) -> dict[str, Any]:
        """The SSA's claims, once every check passed; else a ``VerificationError``."""
        _, claims = self._verified(token)
        if claims.get("iss") != self.issuer:
            raise WrongIssuer(f"iss is {claims.get('iss')!r}, not {self.issuer!r}")
        now = self._clock()
        exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
        if type(exp) is not int or exp + self.leeway <= now:
            raise Expired("the SSA has expired (or has no exp)")
        if type(iat) is int and iat - self.leeway > now or type(nbf) is int and nbf - self.leeway > now:
            raise NotYetValid("the SSA is not valid yet")
        if self.check_status:
            self._check_status(claims)
        return claims

    def public_key(self, token: str) -> dict[str, Any]:
        """The public JWK that signs ``token`` (after ``verify``: for libraries that verify the
        signature again themselves, e.g. Authlib's ``resolve_public_key``)."""
        parts = token.split(".") if isinstance(token, str) else []
        header = _b64json(parts[0]) if len(parts) == 3 else None
        if not isinstance(header, dict):
            raise MalformedToken("not a compact JWS")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise UnknownKey(f"no key {kid!r} in the issuer's JWKS")
        return self._key(kid).export_public(as_dict=True)

    def _check_status(self, claims: dict[str, Any]) -> None:
        ref = claims.get("status", {}).get("status_list") if isinstance(claims.get("status"), dict) else None
        if ref is None:
            self._ask_status_endpoint(claims.get("jti"))
            return
        uri, idx = ref.get("uri"), ref.get("idx")
        if (not isinstance(uri, str) or not uri.startswith(self.issuer + "/")
                or type(idx) is not int or idx < 0):
            raise StatusUnavailable("the status claim does not name a list of this issuer")
        status_list = self._status_list(uri)
        bits = status_list.get("bits")
        try:
            lst = status_list["lst"]
            data = zlib.decompress(base64.urlsafe_b64decode(lst + "=" * (-len(lst) % 4)))
        except (KeyError, TypeError, ValueError, zlib.error):
            raise StatusUnavailable("the status list cannot be decoded") from None
        if bits not in (1, 2, 4, 8) or idx * bits >= len(data) * 8:
            raise StatusUnavailable("the index is outside the status list")
        value = (data[idx * bits // 8] >> (idx * bits % 8)) & ((1 << bits) - 1)
        if value != 0:
            raise Revoked(f"the status list says {value:#04x} (0x01: revoked or used)")

    def _status_list(self, uri: str) -> dict[str, Any]:
        cached = self._lists.get(uri)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        status, body = self._fetch(uri)
        if status != 200:
            raise StatusUnavailable(f"{uri} answered {status}")
        try:
            _, claims = self._verified(body.decode("ascii").strip(), typ="statuslist+jwt")
        except (UnicodeDecodeError, VerificationError) as e:
            raise StatusUnavailable(f"the status list token is refused: {e}") from None
        if claims.get("sub") != uri or not isinstance(claims.get("status_list"), dict):
            raise StatusUnavailable("the status list token is not the list the SSA names")
        exp, ttl = claims.get("exp"), claims.get("ttl")
        if type(exp) is int and exp + self.leeway <= now:
            raise StatusUnavailable("the status list token has expired")
        until = now + (ttl if type(ttl) is int and ttl > 0 else 0)
        if type(exp) is int:
            until = min(until, exp)
        self._lists[uri] = (until, claims["status_list"])
        return claims["status_list"]

    def _ask_status_endpoint(self, jti: Any) -> None:
        endpoint = self.discovery().get("ssa_status_endpoint")
        if not isinstance(endpoint, str) or not isinstance(jti, str):
            raise StatusUnavailable("the SSA has no status list entry and the issuer no ssa_status_endpoint")
        status, body = self._fetch(f"{endpoint}?{urllib.parse.urlencode({'jti': jti})}")
        if status == 404:
            raise Revoked("the issuer does not know this SSA")
        if status != 200:
            raise StatusUnavailable(f"the status endpoint answered {status}")
        try:
            state = json.loads(body).get("status")
        except (ValueError, AttributeError):
            raise StatusUnavailable("the status endpoint's answer is not JSON") from None
        if state == "EXPIRED":
            raise Expired("the issuer says EXPIRED")
        if state != "ACTIVE":
            raise Revoked(f"the issuer says {state}")


def verify_ssa(token: str, issuer: str, **options: Any) -> dict[str, Any]:
    """Verify one SSA with a fresh ``SsaVerifier`` (keep one instead to keep its caches)."""
    return SsaVerifier(issuer, **options).verify(token)
