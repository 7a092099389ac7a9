"""Access tokens of an external authorization server (issue 16): RFC 9068 JWTs and RFC 7662 introspection.

Teams that run an authorization server protect the SSA API with its tokens instead of ours.

**JWT access tokens** (``external_issuer``): the header's ``typ`` is ``at+jwt`` or
``application/at+jwt`` (any case, RFC 9068 §2.1); ``alg`` one of ``EXTERNAL_ALGS`` (asymmetric
only: never ``none`` or an HMAC, whose "secret" could be the issuer's public key); the key named
by ``kid`` (required) comes from the issuer's JWKS (``external_jwks_uri``, else the ``jwks_uri`` of
its RFC 8414 document, else of its OIDC one, whose ``issuer`` must be ours exactly), through
``verify.KeySetCache``: kept ``external_jwks_max_age``, fetched again for an unknown ``kid`` at
most once per ``external_jwks_refetch_interval``, no redirects, a timeout and a size cap, in a
thread.  The key's type (and its ``alg``/``use``, if it says them) must fit the header's alg.
Claims: ``iss`` exactly ``external_issuer``; ``aud`` (a string or an array) holds
``external_audience``; ``exp`` an integer in the future; ``iat``/``nbf``, when present, integers
not in the future; ``external_leeway`` seconds of skew either way.  A verified token is cached (by
its SHA-256, bounded) until its ``exp``.

**Opaque tokens** (``introspection_endpoint``): a token that is not a JWT, or any token when no
``external_issuer`` is set, is POSTed (``token``, ``token_type_hint=access_token``, HTTP Basic with
``introspection_client_id`` and the secret ``introspection_client_secret`` names) to the endpoint.
The answer must say ``"active": true`` (the JSON boolean); ``exp``, ``iat``/``nbf``, ``iss`` (against
``external_issuer``) and ``aud`` (against ``external_audience``) are checked when present.  An
active answer is kept ``introspection_cache_seconds`` (never past ``exp``), a refusal
``NEGATIVE_SECONDS`` (at most as long): a revocation at the server shows within that time.  An
endpoint that cannot be reached, answers late, or answers anything but a JSON object with 200 is
503 ``temporarily_unavailable``: the token may be good, we cannot tell.

**The caller**: ``client_id`` is the ``external_client_claim`` (default ``client_id``, which RFC
9068 §2.2 requires; no fallback to ``azp`` or ``sub``, which name other things: set the claim to
``azp`` for a server that only has that); it is recorded as the SSA's creator as it is.  Scopes are
the ``external_scope_claim`` (a space-separated string or an array of strings); those that are our
three SSA scopes count, the rest are ignored.  The caller is ``external``: our clients table does
not hold it, so the "client still registered" check is skipped (revoking it is the authorization
server's business, seen within the caches above).  Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from jwcrypto import jwk

from . import secret_refs
from .errors import InvalidToken, ServiceUnavailable
from .settings import Settings, SettingsError, https_or_loopback
from .ssa import SSA_SCOPES
from .tokens import Caller
from .validation import storable
from .verify import (Fetch, IssuerUnreachable, KeySetCache, Post, UnknownKey, signature_verifies,
                     urllib_fetch, urllib_post)

log = logging.getLogger("ssa_server")

AT_JWT_TYPS = frozenset({"at+jwt", "application/at+jwt"})
EXTERNAL_ALGS: dict[str, str] = {  # alg -> the key type it needs
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA", "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "EC", "ES384": "EC", "ES512": "EC", "EdDSA": "OKP", "Ed25519": "OKP",
}
MAX_TOKEN = 8192  # characters of a bearer token we look at
MAX_CLIENT_ID = 256
NEGATIVE_SECONDS = 5.0  # a refused introspection answer is kept this long (at most the positive time)
_CACHE_LIMIT = 10_000
UNAVAILABLE = "The authorization server cannot be reached to check this access token; retry later."


def _b64json(part: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return None


def unverified_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Header and claims of a compact JWS, read but not trusted (which issuer's rules apply);
    None when ``token`` is not one (an opaque token)."""
    parts = token.split(".")
    if len(parts) != 3 or len(token) > MAX_TOKEN or not parts[0] or not parts[1]:
        return None
    header, claims = _b64json(parts[0]), _b64json(parts[1])
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return header, claims


def well_known_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata is: RFC 8414 §3.1 (the well-known name before the issuer's
    path), then OIDC Discovery §4 (after it)."""
    parts = urllib.parse.urlsplit(issuer)
    path = parts.path.rstrip("/")
    rfc8414 = urllib.parse.urlunsplit((parts.scheme, parts.netloc,
                                       "/.well-known/oauth-authorization-server" + path, "", ""))
    return [rfc8414, issuer.rstrip("/") + "/.well-known/openid-configuration"]


class Introspection:
    """RFC 7662 §2.1 requests with client_secret_basic (RFC 6749 §2.3.1: each part form-encoded)."""

    def __init__(self, endpoint: str, client_id: str, secret: str, post: Post) -> None:
        self.endpoint = endpoint
        pair = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
        self._authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        self._post = post

    def ask(self, token: str) -> dict[str, Any]:
        """The endpoint's answer about ``token`` (blocking); IssuerUnreachable for anything but a
        JSON object with 200."""
        body = urllib.parse.urlencode({"token": token, "token_type_hint": "access_token"}).encode()
        try:
            status, answer = self._post(self.endpoint, body, {"Authorization": self._authorization})
        except OSError as e:  # a body that took too long (TimeoutError)
            raise IssuerUnreachable(f"{self.endpoint}: {type(e).__name__}") from None
        if status != 200:
            raise IssuerUnreachable(f"{self.endpoint} answered {status}")
        try:
            found = json.loads(answer)
        except (ValueError, RecursionError):
            found = None
        if not isinstance(found, dict):
            raise IssuerUnreachable(f"{self.endpoint} did not answer a JSON object")
        return found


class ExternalTokens:
    """Checks the external authorization server's tokens (see the module docstring for every rule)."""

    def __init__(self, *, issuer: str = "", audience: str = "", jwks_uri: str = "",
                 scope_claim: str = "scope", client_claim: str = "client_id", leeway: int = 30,
                 refetch_interval: float = 30.0, max_age: float = 300.0, fetch: Fetch | None = None,
                 introspection: Introspection | None = None, cache_seconds: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.issuer, self.audience, self._jwks_uri = issuer, audience, jwks_uri
        self.scope_claim, self.client_claim, self.leeway = scope_claim, client_claim, leeway
        self.introspection, self.cache_seconds = introspection, cache_seconds
        self._fetch = fetch or urllib_fetch(follow_redirects=False)
        self._clock = clock
        self._refetch = refetch_interval
        self._discovery_failed = float("-inf")
        self._keys = KeySetCache(self._key_set_url, self._fetch, refetch_interval=refetch_interval,
                                 max_age=max_age, clock=clock)
        self._fetching = asyncio.Lock()
        self._cache: dict[bytes, tuple[Caller | None, float]] = {}  # sha256 -> (caller or refused, until)
        self._asking: dict[bytes, asyncio.Event] = {}  # tokens being introspected now

    @classmethod
    def from_settings(cls, settings: Settings,
                      clock: Callable[[], float] = time.time) -> ExternalTokens | None:
        """None when no external server is configured; SettingsError (one line, the reference
        named, never a value) when the introspection secret cannot be read."""
        if not settings.external_tokens:
            return None
        introspection = None
        if settings.introspection_endpoint:
            try:
                secret = secret_refs.read(settings.introspection_client_secret)
            except secret_refs.SecretUnreadable as e:
                raise SettingsError(f"SSA_INTROSPECTION_CLIENT_SECRET: {e}") from None
            introspection = Introspection(settings.introspection_endpoint, settings.introspection_client_id,
                                          secret, urllib_post(settings.external_timeout))
        return cls(issuer=settings.external_issuer, audience=settings.external_audience,
                   jwks_uri=settings.external_jwks_uri, scope_claim=settings.external_scope_claim,
                   client_claim=settings.external_client_claim, leeway=settings.external_leeway,
                   refetch_interval=settings.external_jwks_refetch_interval,
                   max_age=settings.external_jwks_max_age,
                   fetch=urllib_fetch(settings.external_timeout, follow_redirects=False),
                   introspection=introspection, cache_seconds=settings.introspection_cache_seconds,
                   clock=clock)

    async def verify(self, token: str, parsed: tuple[dict[str, Any], dict[str, Any]] | None) -> Caller:
        """The caller behind ``token`` (``parsed``: ``unverified_jwt(token)``); InvalidToken, or
        ServiceUnavailable when the authorization server cannot be asked."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None:
            caller, until = hit
            if until > now:
                if caller is None:
                    raise InvalidToken("The access token is not active.")
                return caller
            del self._cache[digest]
        if parsed is not None and self.issuer:
            caller, exp = await self._verify_jwt(token, *parsed)
            self._keep(digest, caller, exp)
            return caller
        if self.introspection is None:
            raise InvalidToken("The access token is not a JWT of the authorization server.")
        return await self._introspect(token, digest)

    def _keep(self, digest: bytes, caller: Caller | None, until: float) -> None:
        if len(self._cache) >= _CACHE_LIMIT:
            now = self._clock()
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
        self._cache[digest] = (caller, until)

    # --- RFC 9068 ---
    async def _verify_jwt(self, token: str, header: dict[str, Any],
                          claims: dict[str, Any]) -> tuple[Caller, int]:
        typ, alg, kid = header.get("typ"), header.get("alg"), header.get("kid")
        if not isinstance(typ, str) or typ.lower() not in AT_JWT_TYPS:
            raise InvalidToken("The access token's typ must be at+jwt (RFC 9068).")
        if not isinstance(alg, str) or alg not in EXTERNAL_ALGS:
            raise InvalidToken(f"The access token's alg must be one of {', '.join(EXTERNAL_ALGS)}.")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("The access token's header must name its key (kid).")
        key = await self._key(kid)
        if (key.get("kty") != EXTERNAL_ALGS[alg] or key.get("alg", alg) != alg
                or key.get("use", "sig") != "sig"):
            raise InvalidToken(f"The authorization server's key {kid!r} cannot verify {alg}.")
        if not signature_verifies(token, key, alg):
            raise InvalidToken("The access token's signature does not verify.")
        if claims.get("iss") != self.issuer:
            raise InvalidToken("The access token's iss is not the authorization server.")
        if not self._audience_ok(claims.get("aud"), required=True):
            raise InvalidToken("The access token's aud does not name this server.")
        exp = claims.get("exp")
        if type(exp) is not int:
            raise InvalidToken("The access token has no exp.")
        self._check_times(claims)
        return self._caller(claims), exp + self.leeway

    async def _key(self, kid: str) -> jwk.JWK:
        found = self._keys.cached(kid)
        if found is not None:
            return found
        try:
            async with self._fetching:  # one thread at a time; the others wait on the loop
                return await anyio.to_thread.run_sync(self._keys.key, kid)
        except UnknownKey:
            raise InvalidToken(f"The authorization server has no key {kid[:64]!r}.") from None
        except IssuerUnreachable as e:
            log.warning("external issuer: its keys cannot be fetched: %s", e)
            raise ServiceUnavailable(UNAVAILABLE) from None

    def _key_set_url(self) -> str:
        """The JWKS URL: configured, else discovered (once; a failure waits the refetch interval)."""
        if self._jwks_uri:
            return self._jwks_uri
        if self._clock() - self._discovery_failed < self._refetch:
            raise IssuerUnreachable("the discovery document could not be fetched (waiting to retry)")
        reasons = []
        for url in well_known_urls(self.issuer):
            try:
                status, body = self._fetch(url)
            except IssuerUnreachable as e:
                reasons.append(str(e))
                continue
            doc = _b64free_json(body) if status == 200 else None
            uri = doc.get("jwks_uri") if isinstance(doc, dict) and doc.get("issuer") == self.issuer else None
            if isinstance(uri, str) and https_or_loopback(uri):
                self._jwks_uri = uri
                return uri
            reasons.append(f"{url}: {status}, not a document of this issuer with an https jwks_uri")
        self._discovery_failed = self._clock()
        raise IssuerUnreachable("; ".join(reasons))

    # --- RFC 7662 ---
    async def _introspect(self, token: str, digest: bytes) -> Caller:
        """One question per token at a time: callers with a token already being asked about wait
        for that answer (then cached) instead of asking again."""
        if len(token) > MAX_TOKEN or not storable(token):
            raise InvalidToken()
        asking = self._asking.get(digest)
        if asking is not None:
            await asking.wait()
            hit = self._cache.get(digest)
            if hit is None:  # that question failed: the server could not be asked
                raise ServiceUnavailable(UNAVAILABLE)
            if hit[0] is None:
                raise InvalidToken("The access token is not active.")
            return hit[0]
        asking = self._asking[digest] = asyncio.Event()
        try:
            return await self._ask(token, digest)
        finally:
            self._asking.pop(digest, None)
            asking.set()

    async def _ask(self, token: str, digest: bytes) -> Caller:
        assert self.introspection is not None
        try:
            answer = await anyio.to_thread.run_sync(self.introspection.ask, token)
        except IssuerUnreachable as e:
            log.warning("introspection failed: %s", e)
            raise ServiceUnavailable(UNAVAILABLE) from None
        now = self._clock()
        try:
            caller, until = self._active(answer, now)
        except InvalidToken:
            self._keep(digest, None, now + min(NEGATIVE_SECONDS, self.cache_seconds))
            raise
        self._keep(digest, caller, until)
        return caller

    def _active(self, answer: dict[str, Any], now: float) -> tuple[Caller, float]:
        if answer.get("active") is not True:
            raise InvalidToken("The access token is not active.")
        exp = answer.get("exp")
        if exp is not None and type(exp) is not int:
            raise InvalidToken("The introspection answer's exp is not an integer.")
        if "iss" in answer and self.issuer and answer["iss"] != self.issuer:
            raise InvalidToken("The access token's iss is not the authorization server.")
        if "aud" in answer and not self._audience_ok(answer["aud"], required=False):
            raise InvalidToken("The access token's aud does not name this server.")
        self._check_times(answer)
        until = now + self.cache_seconds
        return self._caller(answer), until if exp is None else min(until, exp)

    # --- shared ---
    def _audience_ok(self, aud: Any, *, required: bool) -> bool:
        if not self.audience:
            return not required
        audiences = aud if isinstance(aud, list) else [aud]
        return any(isinstance(a, str) and a == self.audience for a in audiences)

    def _check_times(self, claims: dict[str, Any]) -> None:
        now = self._clock()
        exp = claims.get("exp")
        if exp is not None and exp + self.leeway <= now:
            raise InvalidToken("The access token expired.")
        for name in ("iat", "nbf"):
            value = claims.get(name)
            if value is not None and (type(value) is not int or value > now + self.leeway):
                raise InvalidToken(f"The access token's {name} is not an integer time in the past.")

    def _caller(self, claims: dict[str, Any]) -> Caller:
        client_id = claims.get(self.client_claim)
        if (not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_CLIENT_ID
                or not storable(client_id)):
            raise InvalidToken(f"The access token has no {self.client_claim[:64]} (the client).")
        scope = claims.get(self.scope_claim)
        if isinstance(scope, str):
            names = scope.split()
        elif isinstance(scope, list):
            names = [s for s in scope if isinstance(s, str)]
        else:
            names = []
        return Caller(client_id, frozenset(s for s in names if s in SSA_SCOPES), external=True)


def _b64free_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None
