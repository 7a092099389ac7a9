"""The Status Issuer of the Token Status Lists: each new SSA's list index, and each list's signed
Status List Token (``status_list.py`` is the format).

Indexes: counters are reserved from the store in blocks (``reserve_status_counters``, atomic on
every store and across nodes), so a create costs a store write only once per block; the index of
a counter is ``Permutation(key, size)(counter)``: never handed out twice, unpredictable without the
list's key.  Counters reserved by a process that stops unused are never used: a list may hold
indexes no SSA has (their bit stays 0).

Tokens: built from the store (the indexes of its USED and REVOKED SSAs), signed with the active
SSA key, and kept for ``status_list_refresh`` seconds before the next request rebuilds them, so
a revocation or a one-time use shows in the list within that delay, plus the ``ttl`` a consumer
may cache the token for.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from .keys import KeyRing
from .settings import Settings
from .ssa import status_list_uri
from .status_list import TOKEN_TYP, Permutation, encode_list
from .store import Store

BLOCK = 64  # counters a serving process reserves at a time (the CLI reserves one)
TOKEN_LIFETIME = 86400  # a Status List Token's exp - iat, at least (twice the ttl if that is longer)


@dataclass
class _Block:
    list_id: str
    index: Permutation
    next: int
    end: int


@dataclass
class StatusListToken:
    jwt: str
    built_at: float  # by the issuer's clock
    ttl: int


class StatusIssuer:
    def __init__(self, settings: Settings, store: Store, keys: KeyRing, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys
        self._clock = clock
        self.block = 1  # Server.start sets BLOCK for a serving process
        self._current: _Block | None = None
        self._reserving = asyncio.Lock()
        self._ahead: asyncio.Task[_Block] | None = None  # the next block, reserved before it is needed
        self._tokens: dict[str, StatusListToken] = {}
        self._building = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.settings.status_list

    async def allocate(self) -> tuple[str, int]:
        """A new SSA's (list id, index).  A serving process reserves its next block in the
        background once half of the current one is handed out, so a create waits for a
        reservation only when the store is slower than half a block of creates (with every
        create of the moment queued behind one durable reservation, a busy server's commits
        trickled in one by one: bench/README.md)."""
        block = self._current
        if block is None or block.next >= block.end:
            block = await self._next_block()
        elif self.block > 1 and self._ahead is None and block.end - block.next <= self.block // 2:
            self._ahead = asyncio.get_running_loop().create_task(self._reserve())
        counter = block.next
        block.next += 1
        return block.list_id, block.index(counter)

    async def _next_block(self) -> _Block:
        async with self._reserving:  # one reservation for every create waiting on it
            block = self._current
            if block is None or block.next >= block.end:
                ahead, self._ahead = self._ahead, None
                block = self._current = await (ahead if ahead is not None else self._reserve())
        return block

    def close(self) -> None:
        """Drop a reservation still under way (its counters are never used, as any unused ones)."""
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None

    async def _reserve(self) -> _Block:
        size = self.settings.status_list_size
        record, first = await self.store.reserve_status_counters(
            min(self.block, size), size, secrets.token_hex(16), int(self._clock()))
        current = self._current
        index = (current.index if current is not None and current.list_id == record["id"]
                 else Permutation(bytes.fromhex(record["key"]), record["size"]))  # built once per list
        return _Block(record["id"], index, first, min(first + self.block, record["size"]))

    async def token(self, list_id: str) -> StatusListToken | None:
        """The list's Status List Token (at most ``status_list_refresh`` seconds old); None when
        no such list exists."""
        cached = self._tokens.get(list_id)
        if cached is not None and self._clock() - cached.built_at < self.settings.status_list_refresh:
            return cached
        async with self._building:
            cached = self._tokens.get(list_id)
            if cached is not None and self._clock() - cached.built_at < self.settings.status_list_refresh:
                return cached
            record = await self.store.get_status_list(list_id)
            if record is None:
                return None
            now = self._clock()
            invalid = await self.store.invalid_status_indexes(list_id)
            ttl = self.settings.status_list_ttl
            iat = int(now)
            claims = {"sub": status_list_uri(self.settings.issuer, list_id), "iat": iat,
                      "exp": iat + max(TOKEN_LIFETIME, 2 * ttl), "ttl": ttl,
                      "iss": self.settings.issuer, "status_list": encode_list(invalid, record["size"])}
            await self.keys.refresh_if_due()
            token = StatusListToken(await self.keys.sign({"typ": TOKEN_TYP}, claims), now, ttl)
            if len(self._tokens) > 1024:  # bounded: a list id is only cached once the store knows it
                self._tokens.clear()
            self._tokens[list_id] = token
            return token
