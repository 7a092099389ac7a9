"""A throwaway SoftHSM2 token per test: its own config (``SOFTHSM2_CONF``) and token directory,
initialised with ``softhsm2-util --init-token --free``.  Without SoftHSM2 (or python-pkcs11) the
tests that need it skip with a message; under ``CI=true`` they fail (``.ci/run`` installs it)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/*/softhsm/libsofthsm2.so",
           "/usr/local/lib/softhsm/libsofthsm2.so")
HOW_TO = "Install it: apt-get install softhsm2 (and pip install '.[pkcs11]')."
PIN, SO_PIN = "4711-test-pin", "so-pin-0815"


@dataclass
class Token:
    conf: Path
    module: str
    label: str
    pin: str = PIN

    def env(self, **more: str) -> dict[str, str]:
        """The server's environment for this token (the PIN through env:TEST_PKCS11_PIN)."""
        return dict({"SOFTHSM2_CONF": str(self.conf), "SSA_SIGNING_BACKEND": "pkcs11",
                     "SSA_PKCS11_MODULE": self.module, "SSA_PKCS11_TOKEN_LABEL": self.label,
                     "SSA_PKCS11_PIN": "env:TEST_PKCS11_PIN", "TEST_PKCS11_PIN": self.pin}, **more)


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the PKCS#11 tests but {reason}. {HOW_TO}")
    pytest.skip(f"no SoftHSM2: {reason}. {HOW_TO}")


def module_path() -> str:
    for pattern in MODULES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    _missing("libsofthsm2.so is not installed")
    raise AssertionError  # (unreached)


def make_token(where: Path, label: str = "ssa-test") -> Token:
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        _missing("python-pkcs11 is not installed")
    util = shutil.which("softhsm2-util")
    if util is None:
        _missing("softhsm2-util is not on PATH")
    module = module_path()
    tokens = where / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = where / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    made = subprocess.run([str(util), "--init-token", "--free", "--label", label, "--pin", PIN,
                           "--so-pin", SO_PIN], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SOFTHSM2_CONF=str(conf)))
    if made.returncode != 0:
        _missing(f"softhsm2-util --init-token failed: {made.stderr.strip() or made.stdout.strip()}")
    return Token(conf=conf, module=module, label=label)


def token_keys(token: Token) -> list[dict]:
    """The objects in the token, as a separate process sees them (its own login): each key's
    class, CKA_ID, label and, for private keys, CKA_SENSITIVE / CKA_EXTRACTABLE."""
    script = (
        "import json, pkcs11\n"
        "from pkcs11 import Attribute as A, ObjectClass as C\n"
        f"lib = pkcs11.lib({token.module!r})\n"
        f"t = lib.get_token(token_label={token.label!r})\n"
        "out = []\n"
        f"with t.open(user_pin={token.pin!r}) as s:\n"
        "    for o in s.get_objects():\n"
        "        e = {'class': o.object_class.name, 'id': o[A.ID].decode(), 'label': o[A.LABEL]}\n"
        "        if o.object_class == C.PRIVATE_KEY:\n"
        "            e.update(sensitive=o[A.SENSITIVE], extractable=o[A.EXTRACTABLE],\n"
        "                     never_extractable=o[A.NEVER_EXTRACTABLE])\n"
        "        out.append(e)\n"
        "print(json.dumps(out))\n")
    import json
    import sys

    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, SOFTHSM2_CONF=str(token.conf)))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)
