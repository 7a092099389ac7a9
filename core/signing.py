"""Compact JWS signing (RFC 7515 §7.1) straight on ``cryptography`` key objects.

jwcrypto builds a ``JWS`` object, re-validates the header and looks the key up again for every
token, which costs more than an ES256 or EdDSA signature itself (``bench/README.md``, "Measurements
behind the design").  Keys are still generated, exported and published with jwcrypto; only the hot path
(one signature per SSA and per access token) is done here, with the key object built once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwcrypto import jwk

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_HMAC = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}

# RSA signing releases the GIL and costs more than a hop to a thread; the others cost less than the
# hop (``bench/README.md``, "Measurements behind the design").
SLOW_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# These go to the server's signing process (``signing_process.py``): off the event loop without
# waiting for the GIL.  HMAC costs a few microseconds: inline.
PROCESS_ALGS = frozenset({"ES256", "ES384", "ES512", "EdDSA", "Ed25519"})
# Ed25519 signatures under either name: "EdDSA" (RFC 8037, deprecated) and the fully specified
# "Ed25519" (RFC 9864); the same key type and signature, only the JWS/JWK ``alg`` differs.
ED25519_ALGS = frozenset({"EdDSA", "Ed25519"})


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64url(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits, non-string keys: the stdlib writes those
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def signature_function(key: dict[str, Any], alg: str) -> Callable[[bytes], bytes]:
    """A function returning the JWS signature of the signing input for this private JWK."""
    if alg in _HMAC:
        secret = base64.urlsafe_b64decode(key["k"] + "=" * (-len(key["k"]) % 4))
        digest = _HMAC[alg]
        return lambda data: hmac.new(secret, data, digest).digest()
    # The key's kind is checked against the alg here, once: a record whose alg does not fit its
    # key is refused now instead of failing every signature.  (``object``: jwcrypto's stubs leave
    # the OKP keys out of get_op_key's result.)
    private: object = jwk.JWK(**key).get_op_key("sign")
    if alg.startswith("RS") and isinstance(private, rsa.RSAPrivateKey):
        rs_hash = _HASHES[alg[2:]]()
        return lambda data: private.sign(data, padding.PKCS1v15(), rs_hash)
    if alg.startswith("PS") and isinstance(private, rsa.RSAPrivateKey):
        ps_hash = _HASHES[alg[2:]]()
        pss = padding.PSS(mgf=padding.MGF1(ps_hash), salt_length=ps_hash.digest_size)
        return lambda data: private.sign(data, pss, ps_hash)
    if alg.startswith("ES") and isinstance(private, ec.EllipticCurvePrivateKey):
        ecdsa = ec.ECDSA(_HASHES[alg[2:]]())
        size = (private.curve.key_size + 7) // 8

        def sign_ec(data: bytes) -> bytes:
            r, s = decode_dss_signature(private.sign(data, ecdsa))
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")  # JWS wants r || s, not DER

        return sign_ec
    if alg in ED25519_ALGS and isinstance(private, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return private.sign
    if alg[:2] in ("RS", "PS", "ES") or alg in ED25519_ALGS:
        raise ValueError(f"{alg} cannot sign with a {key.get('kty')} key")
    raise ValueError(f"unsupported alg {alg}")


class Signer:
    """Signs compact JWS tokens with one key: a private JWK, or (``over``) any function making
    the JWS signature of a signing input (a signing backend's key, ``signers.py``)."""

    def __init__(self, key: dict[str, Any], alg: str, kid: str) -> None:
        self.alg, self.kid = alg, kid
        self._sign = signature_function(key, alg)

    @classmethod
    def over(cls, alg: str, kid: str, sign: Callable[[bytes], bytes]) -> Signer:
        """A signer whose signatures ``sign`` makes."""
        made = cls.__new__(cls)
        made.alg, made.kid, made._sign = alg, kid, sign
        return made

    def sign(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        signing_input = self.signing_input(header, claims)
        return (signing_input + b"." + b64url(self._sign(signing_input))).decode()

    def signing_input(self, header: dict[str, Any], claims: dict[str, Any]) -> bytes:
        """``alg`` and ``kid`` in the protected header are this key's, whatever ``header`` says."""
        return b64url(_dumps(dict(header, alg=self.alg, kid=self.kid))) + b"." + b64url(_dumps(claims))
