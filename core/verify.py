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


def urllib_fetch(timeout: float = 5.0) -> Fetch:
    def fetch(url: str) -> tuple[int, bytes]:
        accept = "application/json, application/statuslist+jwt"
        request = urllib.request.Request(url, headers={"Accept": accept})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read(MAX_DOCUMENT)
        except urllib.error.HTTPError as e:
            return e.code, e.read(MAX_DOCUMENT)
        except (OSError, ValueError) as e:
            raise IssuerUnreachable(f"{url}: {type(e).__name__}") from None
    return fetch


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
        self._keys: jwk.JWKSet | None = None
        self._keys_at = float("-inf")
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

    def _key_set(self, kid: str | None) -> jwk.JWKSet:
        """The issuer's keys; fetched again for an unknown kid at most once per refetch_interval."""
        known = self._keys is not None and kid is not None and self._keys.get_key(kid) is not None
        if not known and self._clock() - self._keys_at >= self.refetch_interval:
            try:
                self._keys = jwk.JWKSet.from_json(json.dumps(self._json(self.discovery()["jwks_uri"])))
            except JWException:
                raise IssuerUnreachable("the JWKS is not a JWK set") from None
            self._keys_at = self._clock()
        if self._keys is None or kid is None or self._keys.get_key(kid) is None:
            raise UnknownKey(f"no key {kid!r} in the issuer's JWKS")
        return self._keys

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
        keys = self._key_set(header.get("kid"))
        verifier = jws.JWS()
        try:
            verifier.deserialize(token)
            verifier.verify(keys.get_key(header["kid"]), alg=header["alg"])
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
        key = self._key_set(kid).get_key(kid) if isinstance(kid, str) else None
        if key is None:
            raise UnknownKey(f"no key {kid!r} in the issuer's JWKS")
        return key.export_public(as_dict=True)

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
