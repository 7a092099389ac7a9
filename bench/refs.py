"""Reference figures measured in the same run: ``sign_ops`` (jwcrypto) and ``raw_sign_ops`` (cryptography)."""

from __future__ import annotations

import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jwcrypto import jwk, jws

from ssa_server.keys import generate_key

# The claims ``ssa.jwt_claims`` builds for the benchmark's create body (same sizes).
PAYLOAD: dict[str, Any] = {
    "jti": "5d0c7f1e-2b8a-4c55-9a51-0e6f0a9e3c11", "iat": 1_790_000_000, "exp": 1_792_592_000,
    "iss": "http://127.0.0.1:8080", "software_id": "bench-software", "org_id": "bench-create",
    "software_roles": ["password"], "grant_types": ["client_credentials"], "lifetime": 86400,
}


def make_key(alg: str) -> tuple[jwk.JWK, str]:
    """A key of the kind the server generates for ``alg`` (``ssa_server.keys.generate_key``)."""
    rec = generate_key(alg, "ssa", int(time.time()))
    return jwk.JWK(**rec["jwk"]), rec["kid"]


def _rate(fn: Any, seconds: float) -> float:
    fn()  # warm
    done, start = 0, time.perf_counter()
    end = start + seconds
    while True:
        for _ in range(10):
            fn()
        done += 10
        now = time.perf_counter()
        if now >= end:
            return done / (now - start)


def sign_ops(alg: str, seconds: float, key: jwk.JWK, kid: str) -> float:
    """jwcrypto JWS sign + compact serialize per second, one thread (the issue's ``sign_ops``)."""
    protected = json.dumps({"typ": "jwt", "alg": alg, "kid": kid}, separators=(",", ":"))

    def one() -> str:
        token = jws.JWS(json.dumps(PAYLOAD, separators=(",", ":")).encode())
        token.add_signature(key, alg=alg, protected=protected)
        return token.serialize(compact=True)

    return _rate(one, seconds)


def raw_sign_ops(alg: str, seconds: float, key: jwk.JWK) -> float:
    """``cryptography``'s private_key.sign per second for the same key and a same-size input."""
    private = key.get_op_key("sign")
    data = b"x" * 400  # ~ base64url(header).base64url(claims)
    digest = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}[alg[-3:]]()
    if isinstance(private, rsa.RSAPrivateKey) and alg.startswith("RS"):
        def one() -> bytes:
            return private.sign(data, padding.PKCS1v15(), digest)
    elif isinstance(private, rsa.RSAPrivateKey):  # PS*
        def one() -> bytes:
            return private.sign(data, padding.PSS(padding.MGF1(digest), digest.digest_size), digest)
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        def one() -> bytes:
            return private.sign(data, ec.ECDSA(digest))
    else:
        raise ValueError(f"raw_sign_ops: unsupported key for {alg}")
    return _rate(one, seconds)


def measure(algs: list[str], seconds: float, *, raw: bool = True) -> dict[str, dict[str, float]]:
    out = {}
    for alg in algs:
        key, kid = make_key(alg)
        out[alg] = {"sign_ops": round(sign_ops(alg, seconds, key, kid), 1)}
        if raw:
            out[alg]["raw_sign_ops"] = round(raw_sign_ops(alg, seconds, key), 1)
    return out
