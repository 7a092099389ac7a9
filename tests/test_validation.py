"""Request body parsing."""

from __future__ import annotations

import pytest

from ssa_server.errors import InvalidRequest
from ssa_server.validation import parse_json_body


def test_request_bodies_keep_big_integers_and_refuse_nul():
    """The JSON body parser (orjson, the stdlib for integers beyond 64 bits): exact values, and
    text no store can keep is a 400."""
    assert parse_json_body(b'{"n": 123456789012345678901234567890}')["n"] == 123456789012345678901234567890
    assert parse_json_body(b'{"n": 18446744073709551615, "s": "\\\\u0000 is text"}') == {
        "n": 18446744073709551615, "s": "\\u0000 is text"}
    for bad in (b'{"s": "a\\u0000b"}', b'{"s": "\\ud800"}',
                b'{"n": 1, "s": "\\u0000", "big": 123456789012345678901}', b'{"a": NaN}', b"[1,"):
        with pytest.raises(InvalidRequest):
            parse_json_body(bad)
