"""pytest plugin shipped with ssa-server: unit-test your scripts in the real sandbox.

    def test_adds_tenant(ssa_script):
        script = ssa_script("scripts/tenant.py")
        result = script.create(claims={"org_id": "acme"})
        assert result["claims"]["tenant"] == "acme-prod"

``ssa_script(path, secrets=None, **limits)`` returns a ``ScriptRunner`` (``create``, ``get``,
``revoke``, ``run``; ``secrets`` as ``scripts test --secret``) whose worker is closed at the end
of the test.  Failures raise ``ScriptError``; a script that does not compile raises
``ScriptRefused``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .sandbox import SandboxLimits
from .scripts import ScriptRunner


@pytest.fixture
def ssa_script() -> Iterator[Callable[..., ScriptRunner]]:
    runners: list[ScriptRunner] = []

    def load(path: str | Path, secrets: dict[str, str] | None = None, **limits: Any) -> ScriptRunner:
        runner = ScriptRunner(path, limits=SandboxLimits(**limits) if limits else None, secrets=secrets)
        runners.append(runner)
        return runner

    yield load
    for runner in runners:
        runner.close()
