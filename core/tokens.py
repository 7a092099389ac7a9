"""Access tokens of the embedded client-credentials issuer (RFC 6749 §4.4, RFC 9068 shape).

Tokens are JWTs (``typ: at+jwt``) signed with the store's HS256 token key, so they survive a
restart and any process sharing the store can verify them.  Verified tokens are cached until
they expire, so a request pays for the HMAC once per token, not once per call.

``caller`` is the one answer to "who holds this bearer token": a JWT whose ``iss`` is ours is
checked here, any other token by the external authorization server's rules
(``external_tokens.py``) when one is configured.  With ``token_endpoint_enabled = false`` our own
tokens are refused too (those issued before the switch included): one issuer, the external one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jwcrypto import jws
from jwcrypto.common import JWException

from .errors import InvalidToken
from .keys import TOKEN_USE, KeyRing

if TYPE_CHECKING:
    from .external_tokens import ExternalTokens

_CACHE_LIMIT = 10_000


@dataclass(frozen=True)
class Caller:
    """Who is calling: the client behind a verified access token and the token's scopes."""

    client_id: str
    scopes: frozenset[str]
    external: bool = False  # from the external authorization server: not in our clients table


class TokenAuthority:
    def __init__(self, keys: KeyRing, issuer: str, ttl: int, clock: Callable[[], float] = time.time, *,
                 own_tokens: bool = True, external: ExternalTokens | None = None) -> None:
        self.own_tokens = own_tokens  # token_endpoint_enabled: our own tokens are accepted
        self.external = external
        self._keys = keys
        self._issuer = issuer
        self.issuer = issuer  # the audience of client assertions too (``client_assertions.py``)
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[Caller, int]] = {}

    def issue(self, client_id: str, scopes: list[str]) -> tuple[str, int]:
        """A new access token and its lifetime in seconds."""
        now = int(self._clock())
        claims = {"iss": self._issuer, "sub": client_id, "client_id": client_id, "aud": self._issuer,
                  "scope": " ".join(scopes), "iat": now, "exp": now + self._ttl, "jti": str(uuid.uuid4())}
        return self._keys.sign_inline({"typ": "at+jwt"}, claims, use=TOKEN_USE), self._ttl

    async def caller(self, token: str) -> Caller:
        """The caller behind a bearer token, ours or the external server's (module docstring)."""
        if self.external is None:
            return self.verify(token)
        from .external_tokens import unverified_jwt

        parsed = unverified_jwt(token)
        if parsed is not None and parsed[1].get("iss") == self._issuer:
            if not self.own_tokens:
                raise InvalidToken("This server's own access tokens are not accepted "
                                   "(token_endpoint_enabled is false).")
            return self.verify(token)
        return await self.external.verify(token, parsed)

    def verify(self, token: str) -> Caller:
        """The caller behind ``token``; InvalidToken if it is malformed, forged or expired."""
        now = int(self._clock())
        hit = self._cache.get(token)
        if hit is not None:
            caller, exp = hit
            if exp > now:
                return caller
            del self._cache[token]
            raise InvalidToken("The access token expired.")
        caller, exp = self._verify_signature(token, now)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (caller, exp)
        return caller

    def forget_client(self, client_id: str) -> None:
        """Drop cached tokens of a deleted client."""
        self._cache = {t: v for t, v in self._cache.items() if v[0].client_id != client_id}

    def _verify_signature(self, token: str, now: int) -> tuple[Caller, int]:
        if token.count(".") != 2 or len(token) > 4096:
            raise InvalidToken()
        try:
            parsed = jws.JWS()
            parsed.deserialize(token)
            header = parsed.jose_header
            kid = header.get("kid")
            if header.get("alg") != "HS256" or header.get("typ") != "at+jwt" or not isinstance(kid, str):
                raise InvalidToken()
            try:
                key = self._keys.key_object(kid, TOKEN_USE)
            except KeyError:
                raise InvalidToken() from None
            parsed.verify(key, alg="HS256")
            claims = json.loads(parsed.payload)
        except InvalidToken:
            raise
        except (JWException, ValueError, TypeError):
            raise InvalidToken() from None
        if not isinstance(claims, dict) or claims.get("iss") != self._issuer:
            raise InvalidToken()
        exp, client_id, scope = claims.get("exp"), claims.get("client_id"), claims.get("scope", "")
        if not isinstance(exp, int) or not isinstance(client_id, str) or not isinstance(scope, str):
            raise InvalidToken()
        if exp <= now:
            raise InvalidToken("The access token expired.")
        return Caller(client_id, frozenset(scope.split())), exp
