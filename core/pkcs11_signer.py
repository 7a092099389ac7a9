"""The PKCS#11 signing backend: SSA keys generated in a token (an HSM, SoftHSM2) and never out of it.

Keys are made in the token (``C_GenerateKeyPair``) as token objects, private, sensitive and not
extractable, with ``CKA_ID`` and ``CKA_LABEL`` = our kid; the store's key record keeps only the
public JWK, ``backend: "pkcs11"`` and ``key_id`` (the kid: how the key is found again after a
restart or by another process on the same token).  Mechanisms (RFC 7518 §3):

- RS256/384/512: ``CKM_SHA256_RSA_PKCS`` ... (the token hashes);
- PS256/384/512: ``CKM_SHA256_RSA_PKCS_PSS`` ... with MGF1 of the same hash and a salt of the
  hash's length;
- ES256/384/512: ``CKM_ECDSA`` over the SHA-2 digest made here (SoftHSM2 has no
  ``CKM_ECDSA_SHA256``); PKCS#11 returns ``r || s``, each the curve's length: what JWS wants;
- EdDSA/Ed25519: ``CKM_EDDSA`` (SoftHSM2 2.6 has it) on an Ed25519 key.

Threads: python-pkcs11 initialises the module with ``C_Initialize(NULL)``, which tells it the
application never calls it from two threads at once (no ``CKF_OS_LOCKING_OK``), and SoftHSM2 then
crashes under concurrent calls (a segfault with 8 threads signing, each on its own session:
measured).  So every call into the module goes through one lock, on one session (logged in,
kept open).  Signatures are made in the key ring's signing threads: waiting for the lock and the
token's ``C_Sign`` both run without the GIL, so the event loop serves meanwhile; a process signs
one signature at a time (more processes, ``serve --workers N``, each have their own module).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from . import secret_refs
from .settings import Settings, SettingsError
from .signers import KeySigner, SigningBackendError
from .store import KeyRecord

log = logging.getLogger("ssa_server.pkcs11")

NAME = "pkcs11"
_HASH: dict[str, Callable[[bytes], Any]] = {"256": hashlib.sha256, "384": hashlib.sha384,
                                            "512": hashlib.sha512}
_RSA_PKCS = {"256": Mechanism.SHA256_RSA_PKCS, "384": Mechanism.SHA384_RSA_PKCS,
             "512": Mechanism.SHA512_RSA_PKCS}
_RSA_PSS = {"256": (Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.SHA256, MGF.SHA256, 32),
            "384": (Mechanism.SHA384_RSA_PKCS_PSS, Mechanism.SHA384, MGF.SHA384, 48),
            "512": (Mechanism.SHA512_RSA_PKCS_PSS, Mechanism.SHA512, MGF.SHA512, 64)}
_CURVES = {"256": ("secp256r1", "P-256", 32), "384": ("secp384r1", "P-384", 48),
           "512": ("secp521r1", "P-521", 66)}  # (the curve's name, the JWK crv, its byte length)
_ED25519_OID = "1.3.101.112"
ED_ALGS = frozenset({"EdDSA", "Ed25519"})
RSA_SIZE = 2048
LOCK_WAIT = 30.0  # seconds a call waits for the module (another call under way) before it fails


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _octet_string(der: bytes) -> bytes:
    """The content of a DER OCTET STRING (``CKA_EC_POINT``), checked."""
    if len(der) < 2 or der[0] != 0x04:
        raise ValueError("CKA_EC_POINT is not a DER OCTET STRING")
    length, at = der[1], 2
    if length & 0x80:
        n = length & 0x7F
        length, at = int.from_bytes(der[2:2 + n], "big"), 2 + n
    if at + length != len(der):
        raise ValueError("CKA_EC_POINT has a wrong length")
    return der[at:]


def _kind(alg: str) -> str:
    if alg[:2] in ("RS", "PS") and alg[2:] in _HASH:
        return "RSA"
    if alg[:2] == "ES" and alg[2:] in _CURVES:
        return "EC"
    if alg in ED_ALGS:
        return "OKP"
    raise SigningBackendError(f"the pkcs11 signing backend cannot make {alg} keys")


class _Session:
    """A session and the private keys found in it (a key object belongs to its session)."""

    def __init__(self, session: pkcs11.Session) -> None:
        self.session = session
        self.keys: dict[str, pkcs11.Key] = {}

    def key(self, kid: str) -> pkcs11.Key:
        found = self.keys.get(kid)
        if found is None:
            found = self.keys[kid] = self.session.get_key(object_class=ObjectClass.PRIVATE_KEY,
                                                          id=kid.encode())
        return found


class Pkcs11Backend:
    """SSA keys in a PKCS#11 token (module doc)."""

    name = NAME

    def __init__(self, module: str, token_label: str, pin: str, *, pin_ref: str = "") -> None:
        self.module, self.token_label = module, token_label
        self._pin, self._pin_ref = pin, pin_ref
        self._lock = threading.Lock()  # every call into the module (module doc)
        self._session: _Session | None = None  # logged in, read-write, kept open

    @classmethod
    def from_settings(cls, settings: Settings) -> Pkcs11Backend:
        try:
            pin = secret_refs.read(settings.pkcs11_pin)
        except secret_refs.SecretUnreadable as e:
            raise SettingsError(f"pkcs11_pin: {e}") from None
        return cls(settings.pkcs11_module, settings.pkcs11_token_label, pin, pin_ref=settings.pkcs11_pin)

    # --- the token ---
    def open(self) -> None:
        """Load the module, find the token, log in: each failure one line (no PIN)."""
        with self._locked():
            self._open_locked()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The module's lock held; SigningBackendError after ``LOCK_WAIT`` without it."""
        if not self._lock.acquire(timeout=LOCK_WAIT):
            raise SigningBackendError(f"PKCS#11 token {self.token_label!r}: busy for {LOCK_WAIT:g} s")
        try:
            yield
        finally:
            self._lock.release()

    def _open_locked(self) -> _Session:
        if self._session is not None:
            return self._session
        where = f"PKCS#11 token {self.token_label!r} (pkcs11_module {self.module})"
        try:
            lib = pkcs11.lib(self.module)
        except (pkcs11.PKCS11Error, OSError) as e:
            raise SigningBackendError(f"pkcs11_module {self.module} cannot be loaded: "
                                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        try:
            token = lib.get_token(token_label=self.token_label)
        except pkcs11.NoSuchToken:
            raise SigningBackendError(f"no PKCS#11 token labelled {self.token_label!r} in pkcs11_module "
                                      f"{self.module}") from None
        except pkcs11.MultipleTokensReturned:
            raise SigningBackendError(f"several PKCS#11 tokens are labelled {self.token_label!r}") from None
        except pkcs11.PKCS11Error as e:
            raise SigningBackendError(f"{where} cannot be read: {type(e).__name__}") from None
        try:
            session = token.open(rw=True, user_pin=self._pin)
        except pkcs11.PinIncorrect:
            raise SigningBackendError(f"the PIN pkcs11_pin ({self._pin_ref or 'given'}) names is wrong "
                                      f"for {where}") from None
        except pkcs11.PinLocked:
            raise SigningBackendError(f"the user PIN of {where} is locked") from None
        except pkcs11.PKCS11Error as e:
            raise SigningBackendError(f"cannot log in to {where}: {type(e).__name__}") from None
        self._session = _Session(session)
        return self._session

    def close(self) -> None:
        with self._locked():
            if self._session is not None:
                try:
                    self._session.session.close()  # (its login ends with it)
                except pkcs11.PKCS11Error:
                    pass
            self._session = None

    # --- the backend interface ---
    def generate(self, alg: str, kid: str) -> dict[str, Any]:
        """A key pair made in the token (module doc); the record's fields: the public JWK,
        the backend, the key's id in the token."""
        kind = _kind(alg)
        ident = kid.encode()
        private = {Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                   Attribute.EXTRACTABLE: False, Attribute.SIGN: True}
        public = {Attribute.TOKEN: True, Attribute.VERIFY: True}
        caps = MechanismFlag.SIGN | MechanismFlag.VERIFY
        with self._locked():
            session = self._open_locked().session
            try:
                if kind == "RSA":
                    pub, _ = session.generate_keypair(KeyType.RSA, RSA_SIZE, id=ident, label=kid, store=True,
                                                      capabilities=caps, public_template=public,
                                                      private_template=private)
                    jwk = {"kty": "RSA", "n": _b64(pub[Attribute.MODULUS]),
                           "e": _b64(pub[Attribute.PUBLIC_EXPONENT])}
                else:
                    key_type = KeyType.EC if kind == "EC" else KeyType.EC_EDWARDS
                    oid = _CURVES[alg[2:]][0] if kind == "EC" else _ED25519_OID
                    params = session.create_domain_parameters(
                        key_type, {Attribute.EC_PARAMS: encode_named_curve_parameters(oid)}, local=True)
                    mechanism = None if kind == "EC" else Mechanism.EC_EDWARDS_KEY_PAIR_GEN
                    pub, _ = params.generate_keypair(id=ident, label=kid, store=True, capabilities=caps,
                                                     mechanism=mechanism, public_template=public,
                                                     private_template=private)
                    point = _octet_string(pub[Attribute.EC_POINT])
                    if kind == "EC":
                        size = _CURVES[alg[2:]][2]
                        if len(point) != 1 + 2 * size or point[0] != 0x04:
                            raise ValueError("CKA_EC_POINT is not an uncompressed point")
                        jwk = {"kty": "EC", "crv": _CURVES[alg[2:]][1], "x": _b64(point[1:1 + size]),
                               "y": _b64(point[1 + size:])}
                    else:
                        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64(point)}
            except (pkcs11.PKCS11Error, ValueError) as e:
                raise SigningBackendError(f"PKCS#11 token {self.token_label!r} could not make a {alg} key "
                                          f"({type(e).__name__})") from None
        return {"jwk": dict(jwk, kid=kid), "backend": NAME, "key_id": kid}

    def load(self, record: KeyRecord) -> KeySigner:
        """The record's key found in the token by its id (and checked: a private key of the
        alg's type); SigningBackendError naming the kid otherwise."""
        kid, alg = record["kid"], record["alg"]
        key_id = str(record.get("key_id") or kid)
        kind = _kind(alg)
        with self._locked():
            session = self._open_locked()
            try:
                key = session.key(key_id)
            except pkcs11.NoSuchKey:
                raise SigningBackendError(f"key {kid} is not in PKCS#11 token {self.token_label!r} "
                                          f"(no private key with CKA_ID {key_id!r})") from None
            except pkcs11.MultipleObjectsReturned:
                raise SigningBackendError(f"key {kid}: several private keys in PKCS#11 token "
                                          f"{self.token_label!r} have CKA_ID {key_id!r}") from None
            except pkcs11.PKCS11Error as e:
                raise SigningBackendError(f"key {kid}: PKCS#11 token {self.token_label!r} cannot be "
                                          f"searched ({type(e).__name__})") from None
            wanted = {"RSA": KeyType.RSA, "EC": KeyType.EC, "OKP": KeyType.EC_EDWARDS}[kind]
            if key.key_type != wanted:
                raise SigningBackendError(f"key {kid} in PKCS#11 token {self.token_label!r} is a "
                                          f"{key.key_type.name} key, not one for {alg}")
        return _Pkcs11Signer(self, alg, kid, key_id)

    def sign(self, key_id: str, mechanism: Mechanism, param: Any, data: bytes) -> bytes:
        """One signature, the module's lock held (module doc)."""
        with self._locked():
            session = self._open_locked()
            try:
                key = cast(pkcs11.SignMixin, session.key(key_id))  # (a private key found by load, checked)
                if param is None:
                    return bytes(key.sign(data, mechanism=mechanism))
                return bytes(key.sign(data, mechanism=mechanism, mechanism_param=param))
            except pkcs11.PKCS11Error as e:
                session.keys.pop(key_id, None)  # e.g. a key deleted from the token: looked up again next time
                raise SigningBackendError(f"PKCS#11 token {self.token_label!r}: signing failed "
                                          f"({type(e).__name__})") from None


class _Pkcs11Signer:
    """One token key's JWS signatures."""

    def __init__(self, backend: Pkcs11Backend, alg: str, kid: str, key_id: str) -> None:
        self.alg, self.kid = alg, kid
        self._backend, self._key_id = backend, key_id
        bits = alg[2:]
        self._digest: Callable[[bytes], Any] | None = None
        self._param: Any = None
        if alg.startswith("RS"):
            self._mechanism = _RSA_PKCS[bits]
        elif alg.startswith("PS"):
            self._mechanism, hash_mech, mgf, salt = _RSA_PSS[bits]
            self._param = (hash_mech, mgf, salt)
        elif alg.startswith("ES"):
            self._mechanism, self._digest = Mechanism.ECDSA, _HASH[bits]
        else:
            self._mechanism = Mechanism.EDDSA

    def sign(self, signing_input: bytes) -> bytes:
        data = signing_input if self._digest is None else self._digest(signing_input).digest()
        return self._backend.sign(self._key_id, self._mechanism, self._param, data)
