"""Compact JWS signing on ``cryptography`` key objects (``signing.py``): a key record whose alg
does not fit its key is refused when its signer is built, not at every signature."""

from __future__ import annotations

import pytest

from ssa_server.keys import generate_key
from ssa_server.signing import signature_function

# (the alg a record claims, the alg its key was made for)
MISMATCHED = [("RS256", "ES256"), ("PS256", "EdDSA"), ("ES256", "RS256"), ("ES384", "EdDSA"),
              ("EdDSA", "RS256"), ("EdDSA", "ES256")]


@pytest.mark.parametrize("alg, made_for", MISMATCHED)
def test_a_key_that_does_not_fit_its_alg_is_refused_when_the_signer_is_built(alg, made_for):
    key = generate_key(made_for, "ssa", 0)["jwk"]
    with pytest.raises(ValueError, match=f"{alg} cannot sign with a {key['kty']} key"):
        signature_function(key, alg)


@pytest.mark.parametrize("alg", ["RS256", "PS384", "ES256", "ES512", "EdDSA", "HS256"])
def test_a_key_that_fits_its_alg_signs(alg):
    sign = signature_function(generate_key(alg, "ssa", 0)["jwk"], alg)
    assert isinstance(sign(b"header.claims"), bytes)
