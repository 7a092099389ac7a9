"""Screenshots of ``ssa-server tui`` for docs/tui.md: ``python docs/tui_screenshots.py``.

Starts a throwaway ``ssa-server serve`` on 127.0.0.1 (a temporary data dir, a sample script and a
custom attribute), adds sample SSAs and templates over its API, then drives the text UI with
Textual's pilot and saves one SVG per screen into ``docs/tui/``.  The server is stopped and its
data dir removed at the end; every token shown is the throwaway server's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from ssa_server.tui import SsaTui
from ssa_server.tui_client import HttpSource
from ssa_server.tui_dialogs import ConfirmScreen, DetailsScreen, TokenScreen

OUT = Path(__file__).resolve().parent / "tui"
SIZE = (130, 42)
ADMIN = "https://jans.io/auth/ssa.admin"
SCRIPT = ('# Adds a tenant claim to every new SSA.\n'
          'def create(jwt, context):\n    print("tenant for", jwt.claims["org_id"])\n'
          '    jwt.claims["tenant"] = "acme-eu"\n    return True\n')


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, method: str, path: str, token: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 (127.0.0.1)
        raw = r.read()
    return json.loads(raw) if raw.strip() else None


def _token(url: str, client_id: str, secret: str) -> str:
    import base64
    import urllib.parse

    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    req = urllib.request.Request(url + "/token", method="POST",
                                 data=urllib.parse.urlencode({"grant_type": "client_credentials"}).encode(),
                                 headers={"Authorization": f"Basic {basic}"})
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
        return str(json.loads(r.read())["access_token"])


async def _until(pilot: Any, condition: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError("the screen did not come up")
        await pilot.pause(0.05)
    return value


async def _shoot(url: str, client: tuple[str, str]) -> list[str]:
    saved = []

    def save(app: SsaTui, name: str) -> None:
        app.save_screenshot(f"{name}.svg", path=str(OUT))
        saved.append(f"{name}.svg")

    app = SsaTui(HttpSource(url, *client), page_size=8)
    async with app.run_test(size=SIZE) as pilot:
        main = app.screen

        async def tab(key: str, name: str) -> None:
            await _until(pilot, lambda: app.screen is main)
            await pilot.press(key)
            await _until(pilot, lambda: main.query_one("#tabs").active == name)
            await pilot.pause(0.1)

        await _until(pilot, lambda: main.query("#custom-tier") and
                     main.query_one("#script-table").row_count and main.query_one("#ssa-table").row_count)
        save(app, "ssas")
        main.query_one("#ssa-table").focus()
        await pilot.press("down", "enter")
        await _until(pilot, lambda: isinstance(app.screen, DetailsScreen) and app.screen.query("Button"))
        await pilot.pause(0.2)
        save(app, "details")
        await pilot.press("escape")
        await tab("f2", "add")
        main.query_one("#field-org_id").value = "acme"
        main.query_one("#field-description").value = "the scanner's production client"
        main.query_one("#field-software_roles").value = "password"
        main.query_one("#field-grant_types").value = "client_credentials"
        main.query_one("#custom-tier").value = "gold"
        main.query_one("#save-template").value = True
        main.query_one("#template-name").value = "acme-gold"
        await pilot.pause(0.2)
        save(app, "add_ssa")
        main.query_one("#add-form").scroll_end(animate=False)
        await pilot.pause(0.3)
        save(app, "add_ssa_template")
        main.query_one("#create").press()
        await _until(pilot, lambda: isinstance(app.screen, TokenScreen) and app.screen.query("Button"))
        await pilot.pause(0.2)
        save(app, "token_once")
        await pilot.press("escape")
        await tab("f3", "templates")
        await _until(pilot, lambda: main.query_one("#template-table").row_count >= 3)
        main.query_one("#template-table").focus()
        await pilot.pause(0.2)
        save(app, "templates")
        await tab("f4", "revoke")
        main.query_one("#revoke-org").value = "globex"
        main.query_one("#revoke-button").press()
        await _until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen.query("Button"))
        await pilot.pause(0.2)
        save(app, "revoke_confirm")
        await pilot.press("y")
        await _until(pilot, lambda: str(main.query_one("#revoke-result").render()).startswith("Revoked"))
        save(app, "revoke_done")
        await tab("f5", "scripts")
        main.query_one("#run-test").press()
        await _until(pilot, lambda: "returned" in str(main.query_one("#test-result").render()), 60)
        await pilot.pause(0.2)
        save(app, "scripts")
    return saved


def main() -> int:
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data, scripts = Path(tmp) / "data", Path(tmp) / "scripts"
        scripts.mkdir()
        (scripts / "tenant.py").write_text(SCRIPT)
        env = dict(os.environ, SSA_CUSTOM_ATTRIBUTES="tier", SSA_SCRIPT_WORKERS="1",
                   SSA_SCRIPT_RELOAD_INTERVAL="0.2")
        port = _port()
        url = f"http://127.0.0.1:{port}"
        cli = [sys.executable, "-m", "ssa_server"]
        server = subprocess.Popen([*cli, "serve", "--port", str(port), "--data-dir", str(data),
                                   "--scripts-dir", str(scripts)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 30
            while True:
                try:
                    urllib.request.urlopen(url + "/health/ready", timeout=2)  # noqa: S310
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        raise RuntimeError("the server did not start") from None
                    time.sleep(0.1)
            made = json.loads(subprocess.run([*cli, "clients", "create", "--scope", ADMIN, "--name", "tui",
                                              "--data-dir", str(data)], env=env, capture_output=True,
                                             text=True, check=True, timeout=60).stdout)
            client = (made["client_id"], made["client_secret"])
            token = _token(url, *client)
            for i, (org, tier) in enumerate([("acme", "gold"), ("acme", "silver"), ("globex", "gold"),
                                              ("globex", "bronze"), ("initech", "gold")]):
                _call(url, "POST", "/ssa", token, {"org_id": org, "software_id": f"{org}-app-{i}",
                                                   "tier": tier, "software_roles": ["password"],
                                                   "one_time_use": i % 2 == 0, "description": f"sample {i}"})
            _call(url, "PUT", "/ssa/templates/acme-basic", token,
                  {"org_id": "acme", "grant_types": ["client_credentials"]})
            _call(url, "PUT", "/ssa/templates/partner", token, {"org_id": "globex", "one_time_use": False,
                                                                 "lifetime": 86400, "tier": "bronze"})
            for saved in asyncio.run(_shoot(url, client)):
                print(OUT / saved)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
