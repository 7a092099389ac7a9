"""A script's ``NAME.toml`` split into what the script sees and what the server keeps.

The one place where the server's own tables are taken out of a script's config, for the server
(``ScriptHost``) and for ``scripts test`` and the pytest fixture (``ScriptRunner``) alike: a
new table goes here.  ``[secrets]`` is resolved here (``script_secrets``); ``[sandbox]`` stays
in ``config`` for the pool, which checks it per revision (``SandboxPool.load``).  What is left
is ``context.config``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import script_secrets
from .script_secrets import NO_SECRETS, Redactor

# A per-process key for ``ScriptConfig.fingerprint``: it tells a changed secret from an unchanged
# one without a digest of a value that anyone could test guesses against.
_FINGERPRINT_KEY = os.urandom(32)


@dataclass(frozen=True)
class ScriptConfig:
    config: dict[str, Any]  # ``context.config`` (with the pool's ``[sandbox]`` table)
    secrets: dict[str, str] = field(default_factory=dict)  # ``context.secrets``: never shown or logged
    redactor: Redactor = NO_SECRETS

    def fingerprint(self) -> str:
        """Changes when a secret's value does (a keyed digest: never shown, never stored)."""
        if not self.secrets:
            return ""
        text = "\x00".join(f"{k}\x00{v}" for k, v in sorted(self.secrets.items())).encode()
        return hmac.new(_FINGERPRINT_KEY, text, hashlib.sha256).hexdigest()[:16]


def script_config(script: str, toml: dict[str, Any], *,
                  given_secrets: Mapping[str, str] | None = None) -> ScriptConfig:
    """``toml`` (a parsed ``NAME.toml``, not changed) as the script and the server use it;
    ScriptRefused naming the table and entry when it is wrong or a secret cannot be read."""
    config = dict(toml)
    secrets = script_secrets.resolve(script, script_secrets.references(script, config), given_secrets)
    return ScriptConfig(config, secrets, Redactor(secrets) if secrets else NO_SECRETS)
