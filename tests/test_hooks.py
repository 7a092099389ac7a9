"""The hook runner: each hook runs the scripts first, then the trusted plugins (pluggy); create
and get stop at the first result, revoke is a broadcast (every implementation runs, each failure
logged, the revocation stands).  And the chain rules both the worker and the server follow."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap

import pytest

from ssa_server import script_rules
from ssa_server.errors import ScriptDenied
from ssa_server.plugins.hookspecs import hookimpl
from ssa_server.plugins.manager import build_plugin_manager
from tests.test_scripts_http import harness  # noqa: F401  (pytest fixture)

ADD = ('def create(jwt, context):\n    jwt.claims["trail"] = jwt.claims.get("trail", "") + "{tag}"\n'
       '    return {ret}\n')
MARK = ('def get(ssa_list, context):\n    for item in ssa_list:\n        item["ssa"]["by_script"] = True\n'
        '    return True\n')


def _off_the_loop() -> bool:
    """True in a thread without a running event loop (a trusted plugin may block)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


class AppendsToTrail:
    def __init__(self) -> None:
        self.calls = 0
        self.off_loop: list[bool] = []

    @hookimpl
    def ssa_create(self, jwt, context):
        self.calls += 1
        self.off_loop.append(_off_the_loop())
        jwt.claims["trail"] = jwt.claims.get("trail", "") + "p"


class SeesTheScriptsList:
    def __init__(self) -> None:
        self.saw: list[bool] = []

    @hookimpl
    def ssa_get(self, ssa_list, context):
        self.saw = [bool(item["ssa"].get("by_script")) for item in ssa_list]
        for item in ssa_list:
            item["ssa"]["by_plugin"] = True


def test_the_plugin_manager_holds_only_trusted_plugins(harness):
    """No built-in no-op, and the scripts are not a pluggy plugin: pluggy sees only what an
    operator installed."""
    assert build_plugin_manager(load_entry_points=False).get_plugins() == set()
    h = harness({"a.py": ADD.format(tag="a", ret=True), "g.py": MARK,
                 "r.py": "def revoke(ssa_list, context):\n    return True\n"})
    assert h.claims(h.create())["trail"] == "a"  # the scripts serve
    for hook in ("ssa_create", "ssa_get", "ssa_revoke"):
        assert getattr(h.server.plugins.hook, hook).get_hookimpls() == []


def test_create_runs_the_scripts_then_the_trusted_plugins(harness):
    h = harness({"1_a.py": ADD.format(tag="a", ret=True), "2_b.py": ADD.format(tag="b", ret=True)})
    plugin = AppendsToTrail()
    h.server.plugins.register(plugin, name="trail")
    r = h.create()
    assert r.status_code == 201, r.text
    assert h.claims(r)["trail"] == "abp"  # the plugin got the scripts' result
    assert plugin.off_loop == [True]  # a trusted plugin runs in a thread, never on the event loop


def test_a_create_script_answering_false_ends_the_hook_before_the_plugins(harness):
    """create is firstresult: a script's False is the hook's result, the plugins do not run."""
    h = harness({"1_a.py": ADD.format(tag="a", ret=False)})
    plugin = AppendsToTrail()
    h.server.plugins.register(plugin, name="trail")
    r = h.create()
    assert r.status_code == 201, r.text
    assert h.claims(r)["trail"] == "a" and plugin.calls == 0


def test_get_runs_the_scripts_then_the_trusted_plugins(harness):
    h = harness({"g.py": MARK})
    h.create(org_id="g")
    plugin = SeesTheScriptsList()
    h.server.plugins.register(plugin, name="sees")
    item = h.client.get("/ssa", params={"org_id": "g"}, headers=h.auth).json()[0]
    assert plugin.saw == [True]
    assert item["ssa"]["by_script"] is True and item["ssa"]["by_plugin"] is True


class RecordsRevoke:
    def __init__(self, script_calls) -> None:
        self.script_calls = script_calls
        self.seen: list[tuple[int, int]] = []

    @hookimpl
    def ssa_revoke(self, ssa_list, context):
        self.seen.append((len(ssa_list), self.script_calls()))


class ClearsAndAnswers:
    """Returns a value (which would end a firstresult hook) and empties its list."""

    @hookimpl
    def ssa_revoke(self, ssa_list, context):
        ssa_list.clear()
        return True


class Raises:
    @hookimpl
    def ssa_revoke(self, ssa_list, context):
        raise RuntimeError("audit system down")


class Denies:
    @hookimpl
    def ssa_revoke(self, ssa_list, context):
        raise ScriptDenied("not allowed", error="access_denied")


class Wraps:
    calls = 0

    @hookimpl(wrapper=True)
    def ssa_revoke(self, ssa_list, context):
        Wraps.calls += 1
        return (yield)


def test_revoke_runs_the_scripts_then_every_trusted_plugin(harness, caplog):
    """Broadcast: a plugin that raises, denies or answers does not stop the others, each one
    sees the list as revoked, each failure is its own log line, and the revocation stands.  A
    revoke script answering False ends the scripts' chain (Janssen's loop), not the hook.  A hook
    wrapper does not run (there is no single call to wrap), which is logged."""
    h = harness({"1_stop.py": 'def revoke(ssa_list, context):\n    return False\n',
                 "2_after.py": 'def revoke(ssa_list, context):\n    return True\n'})
    jti = h.claims(h.create(org_id="rv"))["jti"]
    recorder = RecordsRevoke(lambda: h.server.scripts.scripts["1_stop"].calls)
    # pluggy calls the last registered first: the failing ones run before the recorder
    h.server.plugins.register(recorder, name="recorder")
    h.server.plugins.register(ClearsAndAnswers(), name="clears")
    h.server.plugins.register(Raises(), name="raises")
    h.server.plugins.register(Denies(), name="denies")
    h.server.plugins.register(Wraps(), name="wraps")  # a wrapper has nothing to wrap: refused, logged
    with caplog.at_level(logging.WARNING, logger="ssa_server"):
        r = h.client.delete("/ssa", params={"jti": jti}, headers=h.auth)
    assert r.status_code == 200, r.text
    assert recorder.seen == [(1, 1)]  # after the script ran, with its own copy of the list
    listing = {s["name"]: s for s in h.client.get("/scripts", headers=h.auth).json()}
    assert listing["2_after"]["calls"] == 0
    failures = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert any("raises" in m and "RuntimeError" in m for m in failures), failures
    assert any("denies" in m and "ScriptDenied" in m for m in failures), failures
    assert any("wraps" in m and "wrapper" in m for m in failures) and Wraps.calls == 0, failures
    assert h.client.get("/ssa", params={"jti": jti}, headers=h.auth).json() == []


def test_a_trusted_plugin_from_an_entry_point_runs_after_the_scripts(harness, tmp_path, monkeypatch):
    """An installed package (entry point group ``ssa_server``) is loaded by the server and runs
    after the scripts, in the same request."""
    site = tmp_path / "site"
    (site / "ssa_test_trusted-0.1.dist-info").mkdir(parents=True)
    (site / "ssa_test_trusted-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ssa-test-trusted\nVersion: 0.1\n")
    (site / "ssa_test_trusted-0.1.dist-info" / "entry_points.txt").write_text(
        "[ssa_server]\ntrusted = ssa_test_trusted_plugin\n")
    (site / "ssa_test_trusted_plugin.py").write_text(textwrap.dedent("""
        from ssa_server.plugins.hookspecs import hookimpl

        @hookimpl
        def ssa_create(jwt, context):
            jwt.claims["trail"] = jwt.claims.get("trail", "") + "e"
    """))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "ssa_test_trusted_plugin", raising=False)
    h = harness({"a.py": ADD.format(tag="a", ret=True)})
    assert h.server.plugins.has_plugin("entrypoint:trusted")
    r = h.create()
    assert r.status_code == 201, r.text
    assert h.claims(r)["trail"] == "ae"


def test_the_sandbox_worker_imports_no_pluggy():
    """The untrusted worker loads neither pluggy nor the hook specs (JwtDraft has a module of its own)."""
    probe = ("import sys, ssa_server.plugins.sandbox.worker; "
             "print(sorted(m for m in sys.modules if m == 'pluggy' or m.endswith('hookspecs')))")
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_hookspecs_offers_the_same_jwt_draft():
    from ssa_server.plugins import hookspecs
    from ssa_server.jwt_draft import JwtDraft

    assert hookspecs.JwtDraft is JwtDraft


# --- the chain rules (core/script_rules.py): the worker's chain and the server's follow them ---
DENIED = {"error": "access_denied", "description": "no"}


def test_only_create_and_get_may_refuse_a_request():
    assert script_rules.may_refuse("create") and script_rules.may_refuse("get")
    assert not script_rules.may_refuse("revoke")


@pytest.mark.parametrize("hook,on_error,refuses", [
    ("create", "fail", True), ("get", "fail", True), ("revoke", "fail", False),
    ("create", "skip", False), ("get", "skip", False), ("revoke", "skip", False)])
def test_which_failures_refuse_the_request(hook, on_error, refuses):
    assert script_rules.failure_refuses(hook, on_error) is refuses


@pytest.mark.parametrize("hook", script_rules.HOOKS)
def test_what_stops_a_chain(hook):
    assert not script_rules.stops_chain(hook, {"result": True, "denied": None})
    assert script_rules.stops_chain(hook, {"result": False, "denied": None})  # False, for every hook
    assert script_rules.stops_chain(hook, {"result": True, "denied": DENIED}) is (hook != "revoke")


def test_what_the_next_script_gets():
    done = {"result": True, "header": {"typ": "jwt"}, "claims": {"jti": "j"}, "ssa_list": [{"ssa": {}}]}
    assert script_rules.next_payload("create", done) == {"header": {"typ": "jwt"}, "claims": {"jti": "j"}}
    assert script_rules.next_payload("get", done) == {"ssa_list": [{"ssa": {}}]}
    assert script_rules.next_payload("revoke", done) is None  # each revoke script sees the list as revoked
    # the chain's input is needed again: by every revoke script, or after a skipped failure
    assert script_rules.replays_input("revoke", skip_errors=False)
    assert script_rules.replays_input("create", skip_errors=True)
    assert not script_rules.replays_input("get", skip_errors=False)
