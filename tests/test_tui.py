"""``ssa-server tui`` (issue 17): Textual's pilot drives each screen against a real server (one
``ssa-server serve`` for the module), and once on a local store.  Waits are on conditions, each
bounded; the app runs headless at a fixed size."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import time

import pytest

try:
    import textual  # noqa: F401
except ImportError:  # the test extra installs it; CI must run these tests
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise
    pytest.skip("the text UI needs Textual (pip install 'ssa-server[tui]')", allow_module_level=True)

from textual.widgets import Button, Checkbox, DataTable, Input, Label, Static  # noqa: E402

from live_ssa import LiveServer  # noqa: E402
from ssa_server.settings import Settings  # noqa: E402
from ssa_server.tui import SsaTui  # noqa: E402
from ssa_server.tui_client import HttpSource, LocalSource  # noqa: E402
from ssa_server.tui_dialogs import ONCE, ConfirmScreen, DetailsScreen, TemplatePicker, TokenScreen  # noqa: E402

pytestmark = pytest.mark.slow
SIZE = (140, 50)
STAMP = ('def create(jwt, context):\n    print("stamping")\n    jwt.claims["stamped"] = "yes"\n'
         '    return True\n')


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("tui"), SSA_CUSTOM_ATTRIBUTES="tier")
    (server.scripts / "stamp.py").write_text(STAMP)
    server.start()
    server.admin = server.client()
    server.H = server.auth()
    yield server
    server.stop()


def claims(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def app_for(live, **kwargs) -> SsaTui:
    return SsaTui(HttpSource(live.url, *live.admin), **kwargs)


async def until(pilot, condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        await pilot.pause(0.05)


async def dialog(pilot, kind):
    """The dialog ``kind`` once it is the active screen and its widgets are mounted."""
    app = pilot.app
    return await until(pilot, lambda: isinstance(app.screen, kind) and app.screen.query("Button, OptionList")
                       and app.screen, what=kind.__name__)


def text(widget) -> str:
    return str(widget.render())


async def ready(pilot):
    app = pilot.app
    scripts = app.query_one("#script-table", DataTable)
    await until(pilot, lambda: app.query("#custom-tier") and scripts.row_count, what="the app loaded")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


def test_add_ssa_saves_a_template_shows_the_jwt_once_exports_and_copies(live, tmp_path):
    async def go():
        app = app_for(live)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await pilot.press("f2")
            app.query_one("#field-org_id", Input).value = "tui-acme"
            app.query_one("#field-software_roles", Input).value = "password, admin"
            app.query_one("#field-lifetime", Input).value = "0"
            app.query_one("#custom-tier", Input).value = "gold"
            app.query_one("#save-template", Checkbox).value = True
            app.query_one("#template-name", Input).value = "tui-basic"
            app.query_one("#create", Button).press()  # lifetime 0: the API's own refusal is shown
            msg = app.query_one("#message", Static)
            await until(pilot, lambda: "invalid_ssa_metadata" in text(msg), what="the API error")
            assert "at least 1 second" in text(msg)
            app.query_one("#field-lifetime", Input).value = "3600"
            app.query_one("#create", Button).press()
            screen = await dialog(pilot, TokenScreen)
            token = screen.token
            assert ONCE in text(screen.query_one("#once", Label))
            assert text(screen.query_one("#jwt", Static)) == token
            target = tmp_path / "exported.jwt"
            screen.query_one("#export-path", Input).value = str(target)
            screen.query_one("#export", Button).press()
            msg = screen.query_one("#token-msg", Label)
            await until(pilot, lambda: "Exported" in text(msg))
            assert stat.S_IMODE(os.stat(target).st_mode) == 0o600 and target.read_text() == token
            target.write_text("kept")
            screen.query_one("#export", Button).press()
            await until(pilot, lambda: "not overwritten" in text(msg))
            assert target.read_text() == "kept"
            screen.query_one("#copy", Button).press()
            await until(pilot, lambda: app.clipboard == token)
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, TokenScreen))
            return token

    token = run(go())
    got = claims(token)
    assert got["org_id"] == "tui-acme" and got["software_roles"] == ["password", "admin"]
    assert got["tier"] == "gold" and got["lifetime"] == 3600 and got["stamped"] == "yes"  # the script ran
    saved = {t["name"]: t["fields"] for t in live.http.get("/ssa/templates", headers=live.H).json()}
    assert saved["tui-basic"] == {"org_id": "tui-acme", "software_roles": ["password", "admin"],
                                  "lifetime": 3600, "tier": "gold", "one_time_use": True, "rotate_ssa": True}


def test_create_with_a_template(live):
    r = live.http.put("/ssa/templates/tmpl-reuse", headers=live.H,
                      json={"org_id": "from-template", "one_time_use": False, "tier": 7,
                            "grant_types": ["a"]})
    assert r.status_code in (200, 201)

    async def go():
        app = app_for(live)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await pilot.press("f2")
            await pilot.press("ctrl+l")  # the keys, not the buttons, in this test
            picker = await dialog(pilot, TemplatePicker)
            options = picker.query_one("#template-options")
            options.highlighted = picker.names.index("tmpl-reuse")
            options.focus()
            await pilot.press("enter")
            await until(pilot, lambda: app.query_one("#field-org_id", Input).value == "from-template")
            assert app.query_one("#field-one_time_use", Checkbox).value is False
            assert app.query_one("#custom-tier", Input).value == "7"
            app.query_one("#field-description", Input).value = "second"
            await pilot.press("ctrl+s")
            screen = await dialog(pilot, TokenScreen)
            return screen.token

    got = claims(run(go()))
    assert (got["org_id"], got["tier"], got["grant_types"]) == ("from-template", 7, ["a"])
    listed = live.http.get("/ssa", params={"org_id": "from-template"}, headers=live.H).json()
    assert listed[0]["ssa"]["one_time_use"] is False and listed[0]["ssa"]["description"] == "second"


def test_search_pages_and_details(live):
    made = [live.http.post("/ssa", json={"org_id": "paged", "software_id": f"sw-{i}", "tier": "x"},
                           headers=live.H) for i in range(7)]
    assert all(r.status_code == 201 for r in made)
    jtis = [claims(r.json()["ssa"])["jti"] for r in made]

    async def go():
        app = app_for(live, page_size=3)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            table = app.query_one("#ssa-table", DataTable)
            search = app.query_one("#search", Input)
            search.focus()
            search.value = "org_id=paged, tier=x"
            await pilot.press("enter")
            seen = []
            label = app.query_one("#page-label", Label)
            for number, size in ((1, 3), (2, 3), (3, 1)):
                await until(pilot, lambda n=number, s=size: text(label).startswith(f"page {n}: {s} SSA"),
                            what=f"page {number}")
                seen.append([str(k.value) for k in table.rows])
                await pilot.press("ctrl+n")
            await pilot.press("ctrl+b")
            await until(pilot, lambda: text(label).startswith("page 2:"))
            assert [str(k.value) for k in table.rows] == seen[1]
            table.focus()
            await pilot.press("down", "enter")
            details = await dialog(pilot, DetailsScreen)
            shown = "\n".join(text(s) for s in details.query(".detail"))
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, DetailsScreen))
            await pilot.press("f2")  # from the table's focus: the tab changes and stays
            await until(pilot, lambda: app.query_one("#tabs").active == "add" and
                        app.focused is app.query_one("#field-org_id"))
            await pilot.pause(0.2)
            assert app.query_one("#tabs").active == "add"
            return seen, shown

    seen, shown = run(go())
    # every SSA once, in pages of 3, in the search's order (oldest first, then by jti)
    everything = live.http.get("/ssa/search", params={"where": "org_id=paged"}, headers=live.H).json()
    assert [j for page in seen for j in page] == [i["ssa"]["jti"] for i in everything]
    assert sorted(jtis) == sorted(j for page in seen for j in page)
    chosen = next(i for i in everything if i["ssa"]["jti"] == seen[1][1])  # page 2, second row
    assert f"jti: {seen[1][1]}" in shown and "status: ACTIVE" in shown
    assert f"software_id: {chosen['ssa']['software_id']}" in shown
    assert "tier: x" in shown and "created by (client)" in shown and "one_time_use: true" in shown


def test_revoke_confirms_with_the_count(live):
    for _ in range(3):
        assert live.http.post("/ssa", json={"org_id": "to-revoke"}, headers=live.H).status_code == 201
    keep = live.http.post("/ssa", json={"org_id": "kept-org"}, headers=live.H)

    async def go():
        app = app_for(live)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await pilot.press("f4")
            app.query_one("#revoke-org", Input).value = "to-revoke"
            app.query_one("#revoke-button", Button).press()
            confirm = await dialog(pilot, ConfirmScreen)
            question = text(confirm.query_one("#question", Label))
            await pilot.press("n")  # refused: nothing revoked
            result = app.query_one("#revoke-result", Label)
            await until(pilot, lambda: text(result) == "Not revoked.")
            assert len(live.http.get("/ssa", params={"org_id": "to-revoke"}, headers=live.H).json()) == 3
            await pilot.press("ctrl+g")
            await dialog(pilot, ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: text(result).startswith("Revoked"))
            done = text(result)
            app.query_one("#revoke-button", Button).press()  # again: nothing left
            await until(pilot, lambda: "nothing to revoke" in text(result))
            return question, done

    question, done = run(go())
    assert "Revoke 3 active SSA(s) with org_id to-revoke?" == question
    assert done.startswith("Revoked 3 SSA(s)")
    assert live.http.get("/ssa", params={"org_id": "to-revoke"}, headers=live.H).json() == []
    kept = claims(keep.json()["ssa"])["jti"]
    assert live.http.get("/ssa", params={"jti": kept}, headers=live.H).json()


def test_templates_tab_apply_and_delete(live):
    for name in ("tab-a", "tab-b"):
        live.http.put(f"/ssa/templates/{name}", json={"org_id": name}, headers=live.H)

    async def go():
        app = app_for(live)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await pilot.press("f3")
            table = app.query_one("#template-table", DataTable)
            await until(pilot, lambda: "tab-b" in [str(k.value) for k in table.rows])
            table.focus()
            table.move_cursor(row=[str(k.value) for k in table.rows].index("tab-b"))
            app.query_one("#delete-template", Button).press()
            confirm = await dialog(pilot, ConfirmScreen)
            assert text(confirm.query_one("#question", Label)) == "Delete the template tab-b?"
            await pilot.press("y")
            await until(pilot, lambda: "tab-b" not in [str(k.value) for k in table.rows])
            table.move_cursor(row=[str(k.value) for k in table.rows].index("tab-a"))
            app.query_one("#apply-template", Button).press()
            await until(pilot, lambda: app.query_one("#field-org_id", Input).value == "tab-a")
            assert app.query_one("#tabs").active == "add"

    run(go())
    names = [t["name"] for t in live.http.get("/ssa/templates", headers=live.H).json()]
    assert "tab-a" in names and "tab-b" not in names


def test_scripts_table_and_a_test_run(live):
    async def go():
        app = app_for(live)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await pilot.press("f5")
            table = app.query_one("#script-table", DataTable)
            row = [str(c) for c in table.get_row("stamp")]
            await pilot.press("ctrl+t")
            out = app.query_one("#test-result", Static)
            await until(pilot, lambda: "returned" in text(out) or "failed" in text(out), timeout=30)
            return row, text(out)

    row, out = run(go())
    assert row[0] == "stamp" and row[1] == "loaded" and row[3] == "create" and len(row[2]) == 12
    assert out.startswith("stamp.create returned true") and '"stamped": "yes"' in out and "stamping" in out


def test_token_is_renewed_before_it_expires(live):
    now = [time.time()]
    source = HttpSource(live.url, *live.admin, clock=lambda: now[0])

    async def go():
        await source.open()
        first = source._token
        await source.templates()
        assert source._token == first
        now[0] += 3600 * 24  # past expires_in
        await source.templates()
        return first, source._token

    first, second = run(go())
    assert first and second and first != second
    assert live.admin[1] not in repr(source)


def test_local_mode(tmp_path):
    """No server: the settings' data dir through the service; the scripts folder's create hook runs
    on create, and the Scripts tab's test goes through ScriptHost.test_hook."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "stamp.py").write_text(STAMP)
    settings = Settings(data_dir=tmp_path / "data", scripts_dir=tmp_path / "scripts",
                        custom_attributes=("tier",), script_workers=1)

    async def go():
        app = SsaTui(LocalSource(settings))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.query("#custom-tier"))
            await pilot.press("f2")
            app.query_one("#field-org_id", Input).value = "local-org"
            app.query_one("#custom-tier", Input).value = "silver"
            app.query_one("#create", Button).press()
            screen = await dialog(pilot, TokenScreen)
            token = screen.token
            await pilot.press("escape")
            await pilot.press("f1")
            table = app.query_one("#ssa-table", DataTable)
            await until(pilot, lambda: table.row_count == 1)
            row = [str(c) for c in table.get_row_at(0)]
            await pilot.press("f5")
            scripts = app.query_one("#script-table", DataTable)
            await until(pilot, lambda: scripts.row_count == 1)
            await pilot.press("ctrl+t")
            out = app.query_one("#test-result", Static)
            await until(pilot, lambda: "returned" in text(out) or "failed" in text(out), timeout=30)
            return token, row, text(out)

    token, row, out = run(go())
    assert row[0] == claims(token)["jti"] and row[1] == "local-org" and row[5] == "one-time"
    assert claims(token)["tier"] == "silver" and claims(token)["stamped"] == "yes"
    assert out.startswith("stamp.create returned true") and '"stamped": "yes"' in out


def test_footer_shows_each_tab_its_own_keys_and_bad_credentials_show_the_api_error(live):
    async def go():
        app = SsaTui(HttpSource(live.url, live.admin[0], "s3cret-wrong-value"))
        async with app.run_test(size=SIZE) as pilot:
            msg = app.query_one("#message", Static)
            await until(pilot, lambda: "invalid_client" in text(msg), what="the token error")
            shown = {}
            for key, tab in (("f1", "ssas"), ("f2", "add"), ("f3", "templates"), ("f5", "scripts")):
                await pilot.press(key)
                await until(pilot, lambda t=tab: app.query_one("#tabs").active == t)
                shown[tab] = {a for a in SsaTui.TAB_ACTIONS if app.check_action(a, ())}
            return text(msg), shown

    message, shown = run(go())
    assert "s3cret-wrong-value" not in message
    assert shown == {"ssas": {"next_page", "previous_page"}, "add": {"create", "pick_template"},
                     "templates": {"apply_template", "delete_template"}, "scripts": {"test_script"}}


def test_cli_tui_needs_credentials_with_a_url(live):
    env_free = {k: v for k, v in live.env.items() if not k.startswith("SSA_TUI_")}
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ssa_server", "tui", "--url", live.url, "--client-id", "x"],
                       capture_output=True, text=True, timeout=60, env=env_free)
    assert r.returncode == 2 and "SSA_TUI_CLIENT_SECRET" in r.stderr


def test_values_are_shown_as_text_never_as_markup(live):
    """An org_id or description with Rich markup in it ("[b]", "[/]") shows as written, in the
    table and the details, and breaks nothing."""
    r = live.http.post("/ssa", json={"org_id": "[b]m[/i]", "description": "[/] and [red]x",
                                     "tier": "[link=x]y"}, headers=live.H)
    assert r.status_code == 201

    async def go():
        app = app_for(live)
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            search = app.query_one("#search", Input)
            search.value = 'org_id="[b]m[/i]"'
            search.focus()
            await pilot.press("enter")
            table = app.query_one("#ssa-table", DataTable)
            await until(pilot, lambda: table.row_count == 1 and str(table.get_row_at(0)[1]) == "[b]m[/i]")
            table.focus()
            await pilot.press("enter")
            details = await dialog(pilot, DetailsScreen)
            return "\n".join(str(s.render()) for s in details.query(".detail"))

    shown = run(go())
    assert "org_id: [b]m[/i]" in shown and "description: [/] and [red]x" in shown
    assert "tier: [link=x]y" in shown


def test_a_redirect_is_not_followed_with_the_credentials(tmp_path):
    """A server answering 302 to another address: the UI reports it, and the other address gets
    nothing (urllib would resend the Authorization header there)."""
    import http.server
    import threading

    from http_service import start_server

    other = start_server()

    class Redirect(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{other.server_port}/token")
            self.send_header("Content-Length", "0")
            self.end_headers()

    redirecting = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=redirecting.serve_forever, daemon=True).start()
    try:
        source = HttpSource(f"http://127.0.0.1:{redirecting.server_port}", "cid", "s3cret-value")
        with pytest.raises(Exception) as raised:
            asyncio.run(source.open())
        assert "302" in str(raised.value) and "s3cret-value" not in str(raised.value)
        assert other.hits == []
    finally:
        redirecting.shutdown()
        other.shutdown()
    with pytest.raises(ValueError):
        HttpSource("file:///etc/passwd", "a", "b")
