"""``python -m bench --signing-backend pkcs11``: a throwaway SoftHSM2 token for the bench's servers.

The servers then sign with keys generated in the token (``signing_backend = "pkcs11"``), so the
create scenarios (``create_rs256``, ``create_es256``) measure the PKCS#11 signer; the same command
without the option measures software keys with the same algs.
"""

from __future__ import annotations

import glob
import shutil
import os
import subprocess
from pathlib import Path

PIN = "bench-pin-1234"


def make_token(where: Path, label: str = "ssa-bench") -> dict[str, str]:
    """Initialise a token in ``where``; the environment a server needs to sign with it."""
    util = shutil.which("softhsm2-util")
    modules = sorted(glob.glob("/usr/lib/softhsm/libsofthsm2.so")
                     + glob.glob("/usr/lib/*/softhsm/libsofthsm2.so"))
    if util is None or not modules:
        raise SystemExit("bench: --signing-backend pkcs11 needs SoftHSM2 (apt-get install softhsm2)")
    (where / "tokens").mkdir(parents=True, exist_ok=True)
    conf = where / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {where / 'tokens'}\n"
                    "objectstore.backend = file\nlog.level = ERROR\n")
    subprocess.run([util, "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", PIN],
                   check=True, capture_output=True, timeout=60, env=dict(os.environ, SOFTHSM2_CONF=str(conf)))
    return {"SOFTHSM2_CONF": str(conf), "SSA_SIGNING_BACKEND": "pkcs11", "SSA_PKCS11_MODULE": modules[0],
            "SSA_PKCS11_TOKEN_LABEL": label, "SSA_PKCS11_PIN": "env:BENCH_PKCS11_PIN",
            "BENCH_PKCS11_PIN": PIN}
