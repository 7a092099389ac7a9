"""What a script may hand back: plain JSON only, within the depth cap, values kept exactly."""

from __future__ import annotations

import pytest

from ssa_server.plugins.sandbox import ScriptError


def script(tmp_path, body: str):
    path = tmp_path / "s.py"
    path.write_text("def create(jwt, context):\n" + body + "    return True\n")
    return path


@pytest.mark.parametrize("body, kind", [
    ("    jwt.claims['x'] = [1, [2, float('nan')]]\n", "invalid_result"),
    ("    jwt.claims['x'] = {'a': float('inf')}\n", "invalid_result"),
    ("    v = 1\n    for i in range(40):\n        v = [v]\n    jwt.claims['x'] = v\n", "limit"),
    ("    v = 1\n    for i in range(400):\n        v = {'k': v}\n    jwt.claims['x'] = v\n", "limit"),
    ("    jwt.claims['x'] = {1: 'non-string key'}\n", "invalid_result"),
    ("    jwt.claims['x'] = {1, 2}\n", "invalid_result"),
    ("    jwt.claims['x'] = b'bytes'\n", "invalid_result"),
])
def test_results_that_are_not_plain_json_are_refused(tmp_path, ssa_script, body, kind):
    runner = ssa_script(script(tmp_path, body))
    with pytest.raises(ScriptError) as e:
        runner.create()
    assert e.value.kind == kind


def test_values_come_back_exactly(tmp_path, ssa_script):
    runner = ssa_script(script(tmp_path, "    jwt.claims['big'] = 2 ** 70\n    jwt.claims['none'] = None\n"
                                         "    jwt.claims['deep'] = [[[[1]]]]\n"
                                         "    jwt.claims['u'] = 'żółw'\n"))
    claims = runner.create()["claims"]
    assert claims["big"] == 2**70 and type(claims["big"]) is int
    assert claims["none"] is None and claims["deep"] == [[[[1]]]] and claims["u"] == "żółw"


def test_a_denial_and_its_absence_are_reported(tmp_path, ssa_script):
    runner = ssa_script(script(tmp_path, "    if jwt.claims['org_id'] == 'bad':\n"
                                         "        context.deny('access_denied', 'no')\n"))
    assert runner.create()["denied"] is None
    assert runner.create(claims={"org_id": "bad"})["denied"] == {"error": "access_denied",
                                                                 "description": "no"}
