"""Keys announced before use (issue 14): a rotated key is published at once, signs only after
``key_activation_delay``; ``--now``; the settled timeline; scheduled rotation.  Both stores, a
controlled clock through the app."""

from __future__ import annotations

import logging
import time

import pytest
from conftest import ADMIN


@pytest.fixture(params=["tinydb", "postgresql"])
def store_kind(request) -> str:
    return request.param


class Clock:
    def __init__(self) -> None:
        self.t = float(int(time.time()))

    def __call__(self) -> float:
        return self.t


def kids(api) -> list[str]:
    return [k["kid"] for k in api.client.get("/jwks").json()["keys"]]


def signing_kid(api, H) -> str:
    r = api.create(H, org_id="o", one_time_use=False)
    assert r.status_code == 201, r.text
    return api.verify(r.json()["ssa"])[0]["kid"]


def states(api) -> dict[str, dict]:
    return {k["kid"]: k for k in api.server.keys.records() if k["use"] == "ssa"}


def test_rotate_announces_the_key_before_it_signs(make_api):
    clock = Clock()
    api = make_api(clock=clock, token_ttl=10**7, key_activation_delay=600)
    H = api.auth(ADMIN)
    old_token = api.create(H, org_id="o").json()["ssa"]
    old_kid = api.verify(old_token)[0]["kid"]
    new = api.call(api.server.keys.rotate)
    assert new["activates_at"] == clock.t + 600
    assert kids(api) == [new["kid"], old_kid]  # published at once, newest first
    assert signing_kid(api, H) == old_kid  # ...but not signing yet
    listed = states(api)
    assert listed[new["kid"]]["status"] == "next" and listed[old_kid]["status"] == "active"
    clock.t += 599
    assert signing_kid(api, H) == old_kid
    clock.t += 1  # the activation time: every process switches here, by the clock
    assert signing_kid(api, H) == new["kid"]
    jti = api.verify(old_token)[1]["jti"]
    assert api.verify(api.client.get("/ssa/jwt", params={"jti": jti}, headers=H).json()["ssa"])[0]["kid"] \
        == new["kid"]  # re-signing uses the signing key too
    listed = states(api)
    assert listed[new["kid"]]["status"] == "active" and listed[old_kid]["status"] == "retiring"
    assert set(kids(api)) == {new["kid"], old_kid}
    api.verify(old_token)  # old SSAs verify against /jwks throughout


def test_rotate_now_switches_at_once(make_api):
    clock = Clock()
    api = make_api(clock=clock, token_ttl=10**7, key_activation_delay=600)
    H = api.auth(ADMIN)
    old_token = api.create(H, org_id="o").json()["ssa"]
    old_kid = api.verify(old_token)[0]["kid"]
    pending = api.call(api.server.keys.rotate)
    new = api.call(api.server.keys.rotate, now=True)
    assert new["activates_at"] == clock.t and signing_kid(api, H) == new["kid"]
    listed = states(api)
    assert listed[old_kid]["status"] == "retiring"
    assert listed[pending["kid"]]["status"] == "retired"  # superseded before it signed anything
    assert pending["kid"] not in kids(api) and old_kid in kids(api)
    clock.t += 601  # the superseded key never takes over
    assert signing_kid(api, H) == new["kid"]
    api.verify(old_token)


def test_a_second_rotation_supersedes_the_pending_key(make_api):
    clock = Clock()
    api = make_api(clock=clock, token_ttl=10**7, key_activation_delay=600)
    H = api.auth(ADMIN)
    first = api.call(api.server.keys.rotate)
    clock.t += 10
    second = api.call(api.server.keys.rotate)
    listed = states(api)
    assert listed[first["kid"]]["status"] == "retired" and listed[second["kid"]]["status"] == "next"
    clock.t += 600
    assert signing_kid(api, H) == second["kid"]
    assert len([k for k in states(api).values() if k["status"] == "active"]) == 1


def test_the_cleaner_settles_a_switch_and_keeps_the_old_key_until_its_last_ssa_expires(make_api):
    clock = Clock()
    api = make_api(clock=clock, token_ttl=10**7, key_activation_delay=600)
    H = api.auth(ADMIN)
    old_kid = signing_kid(api, H)
    new = api.call(api.server.keys.rotate)
    clock.t += 500
    late = api.create(H, org_id="late", expiration=int(clock.t) + 5 * 86400).json()["ssa"]  # old key
    assert api.verify(late)[0]["kid"] == old_kid
    clock.t += 100 + 61  # past the switch and its grace: the cleaner records the old key's end
    api.call(api.server.cleanup_once)
    stored = {k["kid"]: k for k in api.call(api.server.store.list_keys)}
    assert stored[new["kid"]]["status"] == "active" and stored[old_kid]["status"] == "retiring"
    assert stored[old_kid]["remove_after"] >= api.verify(late)[1]["exp"]
    assert old_kid in kids(api)
    clock.t = stored[old_kid]["remove_after"] + 1
    api.call(api.server.cleanup_once)
    assert kids(api) == [new["kid"]] and states(api)[old_kid]["status"] == "retired"


def test_scheduled_rotation_adds_one_announced_key(make_api, caplog):
    """Each key signs for key_rotation_days: the next is announced key_activation_delay before."""
    clock = Clock()
    api = make_api(clock=clock, token_ttl=10**7, key_activation_delay=600, key_rotation_days=1)
    H = api.auth(ADMIN)
    old_kid = signing_kid(api, H)
    (first,) = states(api).values()
    clock.t = first["activates_at"] + 86400 - 600 - 1
    api.call(api.server.cleanup_once)
    assert len(states(api)) == 1  # not due yet
    clock.t += 1
    with caplog.at_level(logging.INFO, logger="ssa_server.keys"):
        api.call(api.server.cleanup_once)
        api.call(api.server.cleanup_once)  # due once: the pending key counts
    (new,) = [k for k in states(api).values() if k["status"] == "next"]
    assert new["activates_at"] == first["activates_at"] + 86400
    assert [r.getMessage() for r in caplog.records if "scheduled key rotation" in r.getMessage()] == \
        [f"scheduled key rotation: {new['kid']} announced, signs from {new['activates_at']}"]
    assert new["kid"] in kids(api) and signing_kid(api, H) == old_kid
    clock.t += 600
    assert signing_kid(api, H) == new["kid"]
    clock.t = new["activates_at"] + 86400 - 600 - 1
    api.call(api.server.cleanup_once)
    assert len(states(api)) == 2  # the next one is due a day after this one began to sign
    clock.t += 1
    api.call(api.server.cleanup_once)
    assert len(states(api)) == 3


def test_settings_of_rotation_are_checked():
    from ssa_server.settings import Settings, SettingsError

    for bad in ({"key_activation_delay": -1}, {"key_rotation_days": -1}):
        with pytest.raises(SettingsError, match="must not be negative"):
            Settings(**bad)
    assert Settings().key_activation_delay == 600 and Settings().key_rotation_days == 0


def test_import_keeps_one_timeline(tmp_path):
    """An imported next key into a store that has a signing key becomes retiring, like an
    imported active key: the target's timeline stays its own; its own next key survives export."""
    import json
    import subprocess
    import sys

    def ok(*args: str, stdin: str | None = None) -> str:
        r = subprocess.run([sys.executable, "-m", "ssa_server", *args], check=False, capture_output=True,
                           text=True, timeout=60, input=stdin)
        assert r.returncode == 0, r.stderr
        return r.stdout

    a, b = ["--data-dir", str(tmp_path / "a")], ["--data-dir", str(tmp_path / "b")]
    ok("ssa", "create", "--org-id", "o", *a)
    pending = json.loads(ok("keys", "rotate", *a))
    exported = [json.loads(line)["record"] for line in ok("store", "export", *a).splitlines()
                if json.loads(line)["table"] == "keys"]  # (audit events name the kid too)
    times = [k["activates_at"] for k in exported if k.get("kid") == pending["kid"]]
    assert times == [pending["activates_at"]]
    ok("ssa", "create", "--org-id", "p", *b)
    ok("store", "import", "-", *b, stdin=ok("store", "export", *a))
    keys = {k["kid"]: k for k in json.loads(ok("keys", "list", *b)) if k["use"] == "ssa"}
    assert keys[pending["kid"]]["status"] == "retiring"
    assert [k["status"] for k in keys.values()].count("active") == 1 and "next" not in \
        [k["status"] for k in keys.values()]


def test_every_setting_is_documented():
    from dataclasses import fields
    from pathlib import Path

    from ssa_server.settings import Settings

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert [f.name for f in fields(Settings) if f"| `{f.name}` | `SSA_{f.name.upper()}` |" not in doc] == []
