"""Throttling of failed client authentication at the token endpoint, and the client's address.

Failures are counted per key (a client id, a client address) in fixed windows: a key that reached
its limit is refused until its window ends; successes are not counted.  At most ``MAX_TRACKED``
keys are kept per kind (the oldest window is forgotten first), so a flood of made-up ids costs
bounded memory.  The counts live in the serving process: with ``--workers N`` each worker counts
its own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MAX_TRACKED = 10_000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FailureThrottle:
    def __init__(self, limit: int, window: float, clock: Callable[[], float],
                 max_keys: int = MAX_TRACKED) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max_keys = max_keys
        self._windows: dict[str, list[float]] = {}  # key -> [window end, failures]; oldest window first
        self._blocking_until = 0.0  # no key is refused after this: the check is free until then

    def __len__(self) -> int:
        return len(self._windows)

    @property
    def blocking(self) -> bool:
        """Whether any key may be refused now (cheap: one clock read)."""
        return self._blocking_until > self._clock()

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 if it may now."""
        entry = self._windows.get(key)
        if entry is None or entry[1] < self.limit:
            return 0.0
        return max(0.0, entry[0] - self._clock())

    def failed(self, key: str) -> None:
        now = self._clock()
        entry = self._windows.get(key)
        if entry is None or entry[0] <= now:  # a new window, kept in start order
            self._windows.pop(key, None)
            if len(self._windows) >= self._max_keys:
                del self._windows[next(iter(self._windows))]
            entry = self._windows[key] = [now + self.window, 0.0]
        entry[1] += 1
        if entry[1] >= self.limit:
            self._blocking_until = max(self._blocking_until, entry[0])


def parse_networks(proxies: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def client_address(scope: Mapping[str, Any], proxies: tuple[Network, ...]) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy; then the right-most
    ``X-Forwarded-For`` entry that is not a trusted proxy (entries left of it are the client's to
    forge).  Only called when a throttle needs it: a failure, or a throttle refusing someone."""
    client = scope.get("client")
    peer = str(client[0]) if client else ""
    if not proxies or not _trusted(peer, proxies):
        return peer
    hops: list[str] = []
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            hops += [h.strip() for h in value.decode("latin-1").split(",")]
    for hop in reversed(hops):
        if hop and not _trusted(hop, proxies):
            return hop
    return peer
