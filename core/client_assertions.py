"""``private_key_jwt`` client authentication at the token endpoint (RFC 7523 §2.2 and §3, OIDC Core §9).

A client registered with a public JWK set (``jwks``) or a ``jwks_uri`` authenticates with
``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` and a
``client_assertion`` it signed: ``iss`` = ``sub`` = its client_id, ``aud`` the token endpoint URL or
the issuer, ``exp`` at most ``client_assertion_max_lifetime`` ahead, ``iat``/``nbf`` not in the
future (``client_assertion_leeway`` either way), a ``jti`` used once: the store keeps it until the
assertion's ``exp`` plus the leeway (``Store.use_assertion``, atomic across processes; the cleaner
purges it after).  Only asymmetric algorithms are accepted (``ASSERTION_ALGS``): never ``none`` or
an HMAC, whose "secret" could be the client's public key.

A ``jwks_uri`` is https, or http to a loopback address (tests, a sidecar); it is fetched with
``verify.KeySetCache`` (a timeout, a size cap, no redirects; kept for ``client_jwks_max_age``,
fetched again for an unknown ``kid`` at most once per ``client_jwks_refetch_interval``) in a thread,
one per client at a time.

Malformed assertions are 400 ``invalid_request``; every failed check is 401 ``invalid_client``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from cryptography.hazmat.primitives.asymmetric import rsa
from jwcrypto import jwk
from jwcrypto.common import JWException

from .errors import ApiError, InvalidClient, InvalidRequest
from .store import PRIVATE_JWK_MEMBERS, AssertionRecord, ClientRecord, Store
from .verify import KeySetCache, VerificationError, signature_verifies, urllib_fetch

log = logging.getLogger("ssa_server")

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PRIVATE_KEY_JWT = "private_key_jwt"
# Asymmetric only (RFC 8725 §3.1); the key type each needs.
ASSERTION_ALGS: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "PS256": ("RSA", None), "ES256": ("EC", "P-256"),
    "EdDSA": ("OKP", "Ed25519"), "Ed25519": ("OKP", "Ed25519"),
}
MAX_ASSERTION = 8192  # characters of a compact JWS (a 4096-bit RSA signature is 683)
MAX_JTI = 256
MAX_KEYS = 20  # keys in a registered JWK set
_CACHED_CLIENTS = 1000  # jwks_uri clients whose key sets are kept


class InvalidClientMetadata(ApiError):
    """Registration: the JWK set or jwks_uri is not one a client can authenticate with (RFC 7591 §3.2.2)."""

    status, error = 400, "invalid_client_metadata"


def check_jwks_uri(url: str) -> str:
    """``url`` if it is https, or http to a loopback address; else InvalidClientMetadata."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise InvalidClientMetadata("The jwks_uri is not a URL.") from None
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and (host == "localhost" or _loopback(host)):
        return url
    raise InvalidClientMetadata("The jwks_uri must be https (or http to a loopback address).")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_key_set(value: Any) -> dict[str, Any]:
    """A registered JWK or JWK set as the stored ``{"keys": [...]}``: public asymmetric keys of a
    type ``ASSERTION_ALGS`` can use, no private member, RSA at least 2048 bits."""
    keys = value.get("keys") if isinstance(value, dict) and "keys" in value else [value]
    if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_KEYS:
        raise InvalidClientMetadata(f"Give one JWK or a JWK set of 1 to {MAX_KEYS} keys.")
    usable = {(kty, crv) for kty, crv in ASSERTION_ALGS.values()}
    out = []
    for key in keys:
        if not isinstance(key, dict):
            raise InvalidClientMetadata("A JWK must be a JSON object.")
        if not PRIVATE_JWK_MEMBERS.isdisjoint(key):
            raise InvalidClientMetadata("The JWK holds private or symmetric key material; "
                                        "give the public key.")
        try:
            parsed = jwk.JWK(**key)
        except (JWException, ValueError, TypeError) as e:
            raise InvalidClientMetadata(f"Not a valid JWK ({type(e).__name__}).") from None
        kty, crv = key.get("kty"), key.get("crv")
        if (kty, crv if kty != "RSA" else None) not in usable:
            raise InvalidClientMetadata(f"A {kty}/{crv} key cannot sign client assertions "
                                        f"({', '.join(ASSERTION_ALGS)}).")
        public = parsed.get_op_key("verify")
        if kty == "RSA" and not (isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048):
            raise InvalidClientMetadata("An RSA key must have at least 2048 bits.")
        out.append(parsed.export_public(as_dict=True))
    return {"keys": out}


def _b64json(part: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise InvalidRequest("The client_assertion is not a JWT (a part is not base64url JSON).") from None


def unverified_parts(assertion: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Header, claims and client id of an assertion, read but not yet trusted; InvalidRequest if
    it is malformed or lacks a required claim."""
    parts = assertion.split(".")
    if len(assertion) > MAX_ASSERTION or len(parts) != 3 or not all(parts):
        raise InvalidRequest(f"The client_assertion must be a compact JWS of at most {MAX_ASSERTION} "
                             "characters.")
    header, claims = _b64json(parts[0]), _b64json(parts[1])
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidRequest("The client_assertion's header and claims must be JSON objects.")
    sub, jti, exp = claims.get("sub"), claims.get("jti"), claims.get("exp")
    if not isinstance(sub, str) or not sub or not isinstance(claims.get("iss"), str):
        raise InvalidRequest("The client_assertion needs iss and sub (the client_id).")
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI:
        raise InvalidRequest(f"The client_assertion needs a jti (a string of at most {MAX_JTI} characters).")
    if type(exp) is not int:
        raise InvalidRequest("The client_assertion needs exp (an integer).")
    if not isinstance(header.get("alg"), str) or not isinstance(header.get("kid", ""), str):
        raise InvalidRequest("The client_assertion's header needs alg (and kid, if any, a string).")
    return header, claims, sub


class ClientAssertions:
    """Checks ``private_key_jwt`` assertions (see the module docstring for every rule)."""

    def __init__(self, store: Store, issuer: str, *, max_lifetime: int = 300, leeway: int = 30,
                 jwks_timeout: float = 5.0, jwks_refetch_interval: float = 30.0, jwks_max_age: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.audiences = frozenset({issuer, f"{issuer}/token"})
        self.max_lifetime, self.leeway = max_lifetime, leeway
        self._fetch = urllib_fetch(jwks_timeout, follow_redirects=False)
        self._refetch, self._max_age = jwks_refetch_interval, jwks_max_age
        self._clock = clock
        # client_id -> (jwks_uri, its cache, held while a thread asks the cache)
        self._key_sets: dict[str, tuple[str, KeySetCache, asyncio.Lock]] = {}

    async def verify(self, client: ClientRecord, header: dict[str, Any], claims: dict[str, Any],
                     assertion: str) -> None:
        """InvalidClient unless ``assertion`` (parsed by ``unverified_parts``) authenticates ``client``."""
        if client.get("token_endpoint_auth_method") != PRIVATE_KEY_JWT:
            raise InvalidClient()  # a secret client: said no more than for an unknown client_id
        alg = header["alg"]
        if alg not in ASSERTION_ALGS:
            raise InvalidClient(f"The client_assertion's alg must be one of {', '.join(ASSERTION_ALGS)}.")
        key = await self._key(client, header.get("kid"))
        kty, crv = ASSERTION_ALGS[alg]
        if key.get("kty") != kty or (crv is not None and key.get("crv") != crv):
            raise InvalidClient(f"The client's key {header.get('kid')!r} cannot verify {alg}.")
        if not signature_verifies(assertion, key, alg):
            raise InvalidClient("The client_assertion's signature does not verify.")
        self._check_claims(client["client_id"], claims)
        exp = claims["exp"]
        jti_id = hashlib.sha256(f"{client['client_id']}\x00{claims['jti']}".encode()).hexdigest()
        record = AssertionRecord(id=jti_id, client_id=client["client_id"], expires_at=exp + self.leeway)
        if not await self.store.use_assertion(record, int(self._clock())):
            raise InvalidClient("This client_assertion was used already (its jti is not new).")

    def _check_claims(self, client_id: str, claims: dict[str, Any]) -> None:
        now = self._clock()
        if claims["iss"] != client_id or claims["sub"] != client_id:
            raise InvalidClient("The client_assertion's iss and sub must be the client_id.")
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if not any(isinstance(a, str) and a in self.audiences for a in audiences):
            raise InvalidClient("The client_assertion's aud must be the token endpoint URL or the issuer.")
        exp = claims["exp"]
        if exp + self.leeway <= now:
            raise InvalidClient("The client_assertion has expired.")
        if exp > now + self.max_lifetime + self.leeway:
            raise InvalidClient(f"The client_assertion's exp is more than {self.max_lifetime} seconds ahead.")
        for name in ("iat", "nbf"):
            value = claims.get(name)
            if value is not None and (type(value) is not int or value > now + self.leeway):
                raise InvalidClient(f"The client_assertion's {name} is not an integer time in the past.")

    async def _key(self, client: ClientRecord, kid: str | None) -> jwk.JWK:
        jwks_uri = client.get("jwks_uri")
        if jwks_uri is None:
            try:
                keys = jwk.JWKSet.from_json(json.dumps(client.get("jwks", {"keys": []})))
            except (JWException, ValueError, TypeError, AttributeError):
                raise InvalidClient("The client's registered keys are not a JWK set.") from None
            found = keys.get_key(kid) if kid is not None else _only(keys)
            if found is None:
                raise InvalidClient(f"The client has no key {kid!r}.")
            return found
        try:  # (checked at registration; an imported record is checked here)
            checked = check_jwks_uri(jwks_uri)
        except InvalidClientMetadata:
            raise InvalidClient("The client's jwks_uri is not https (or http to loopback).") from None
        cache, fetching = self._cache(client["client_id"], checked)
        found = cache.cached(kid) if kid is not None else None
        if found is not None:
            return found
        if kid is None:
            raise InvalidClient("A client with a jwks_uri must name its key (kid) in the client_assertion.")
        try:
            async with fetching:  # one thread per client at a time; the others wait on the loop
                return await anyio.to_thread.run_sync(cache.key, kid)
        except VerificationError as e:
            if e.error == "issuer_unreachable":
                log.warning("client %s: jwks_uri fetch failed: %s", client["client_id"], e)
            raise InvalidClient(f"The client's key {kid!r} could not be found ({e.error}).") from None

    def _cache(self, client_id: str, jwks_uri: str) -> tuple[KeySetCache, asyncio.Lock]:
        held = self._key_sets.get(client_id)
        if held is None or held[0] != jwks_uri:
            if len(self._key_sets) >= _CACHED_CLIENTS:
                del self._key_sets[next(iter(self._key_sets))]
            cache = KeySetCache(lambda: jwks_uri, self._fetch, refetch_interval=self._refetch,
                                max_age=self._max_age, clock=self._clock)
            held = self._key_sets[client_id] = (jwks_uri, cache, asyncio.Lock())
        return held[1], held[2]

    def forget(self, client_id: str) -> None:
        self._key_sets.pop(client_id, None)


def _only(keys: jwk.JWKSet) -> jwk.JWK | None:
    """The one key of a set (an assertion without kid), else None."""
    members: list[jwk.JWK] = list(keys["keys"])
    return members[0] if len(members) == 1 else None
