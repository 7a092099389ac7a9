"""The Token Status List format (draft-ietf-oauth-status-list-19, "Token Status List (TSL)"):
the ``status`` claim of a Referenced Token, the compressed list of a Status List Token, and the
permutation that hands out list indexes in an order nobody can predict.

A list holds one bit per index (``bits: 1``): 0 is VALID, 1 INVALID (§7.1 of the draft).  Its
``lst`` is the byte array (index 0 in the least significant bit of byte 0, §4.1) compressed with
DEFLATE in the ZLIB format (RFC 1950) at the highest level, then base64url without padding.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Iterable
from typing import Any

VALID, INVALID = 0, 1
BITS = 1
MEDIA_TYPE = "application/statuslist+jwt"  # the response's content type (§8.1) and the token's typ
TOKEN_TYP = "statuslist+jwt"
_ROUNDS = 4
_PERSON = tuple(f"ssa-sl-round{r}".encode() for r in range(_ROUNDS))  # one keyed BLAKE2b per round


def status_claim(uri: str, idx: int) -> dict[str, Any]:
    """The Referenced Token's ``status`` claim (§6.1)."""
    return {"status_list": {"idx": idx, "uri": uri}}


def encode_list(invalid: Iterable[int], size: int) -> dict[str, Any]:
    """The ``status_list`` claim of a Status List Token of ``size`` indexes, ``invalid`` set to 1."""
    data = bytearray((size + 7) // 8)
    for idx in invalid:
        if 0 <= idx < size:
            data[idx >> 3] |= 1 << (idx & 7)
    lst = base64.urlsafe_b64encode(zlib.compress(bytes(data), 9)).rstrip(b"=").decode("ascii")
    return {"bits": BITS, "lst": lst}


class Permutation:
    """The index the ``counter``-th allocation of a list of ``size`` indexes gets: a keyed
    permutation of ``range(size)`` (a 4-round Feistel network on the smallest even number of bits
    that covers ``size``, cycle-walking back into range), so each counter gets its own index, no
    index is handed out twice, and without the list's key the order looks random (draft §13:
    sequential indexes would tell a verifier how many SSAs were issued between two it saw).

    Each round function is keyed BLAKE2b, evaluated once for every half-value when the list is
    first used (at most 4 x 4,096 values for the largest list), so an index costs four lookups."""

    def __init__(self, key: bytes, size: int) -> None:
        self.size = size
        self.half = max(1, ((size - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        def round_value(v: int, person: bytes) -> int:
            digest = hashlib.blake2b(v.to_bytes(4, "big"), key=key, digest_size=4, person=person).digest()
            return int.from_bytes(digest, "big") & self.mask

        self.rounds = tuple([round_value(v, person) for v in range(1 << self.half)] for person in _PERSON)

    def __call__(self, counter: int) -> int:
        if not 0 <= counter < self.size:
            raise ValueError(f"counter {counter} outside a list of {self.size}")
        half, mask, value = self.half, self.mask, counter
        while True:
            left, right = value >> half, value & mask
            for table in self.rounds:
                left, right = right, left ^ table[right]
            value = (left << half) | right
            if value < self.size:
                return value
