"""The text UI's dialogs: an SSA's details, the new JWT shown once (Export, Copy), a confirmation,
a template picker; and ``export_token``, the one way the UI writes a file."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, OptionList, Static

ONCE = "This is the only time you see the token: export or copy it now."


def when(epoch: Any) -> str:
    """Epoch seconds as UTC date and time (the tables and the details)."""
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return str(epoch)
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def export_token(path: str, token: str) -> str:
    """Write ``token`` to a new file ``path``, mode 0600 whatever the umask; an existing file is
    never replaced (FileExistsError: the operator picks another name).  Returns the full path."""
    full = os.path.abspath(os.path.expanduser(path))
    fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        data = token.encode("ascii")
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return full


def details_lines(item: dict[str, Any]) -> list[tuple[str, str]]:
    """Every field of a search element (the SSA's stored fields and claims, its status, when it was
    created and expires, who created it), as (name, text) rows."""
    inner = dict(item.get("ssa", {}))
    rows = [("status", str(item.get("status", ""))), ("jti", str(inner.pop("jti", ""))),
            ("created", when(item.get("created_at"))), ("expires", when(item.get("expiration"))),
            ("created by (client)", str(item.get("iss", "")))]
    for name in ("iat", "exp"):
        inner.pop(name, None)
    for name in sorted(inner):
        value = inner[name]
        rows.append((name, value if isinstance(value, str) else json.dumps(value)))
    return rows


class DetailsScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "dismiss", "Close")]

    def __init__(self, item: dict[str, Any]) -> None:
        super().__init__()
        self.item = item

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="details", classes="dialog"):
            yield Label("SSA details", classes="title")
            for name, text in details_lines(self.item):
                yield Static(Text.assemble((name, "bold"), ": ", text), classes="detail")
            yield Button("Close", id="close-details")
        yield Footer()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)


class TokenScreen(ModalScreen[None]):
    """The new SSA's JWT, shown once, with Export (a new 0600 file) and Copy (the clipboard)."""

    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("ctrl+o", "export", "Export"),
                Binding("ctrl+y", "copy", "Copy")]

    def __init__(self, token: str, suggested: str) -> None:
        super().__init__()
        self.token = token
        self.suggested = suggested

    def compose(self) -> ComposeResult:
        with Vertical(id="token", classes="dialog"):
            yield Label("SSA created", classes="title")
            yield Label(ONCE, id="once")
            yield Static(self.token, id="jwt", markup=False)
            yield Input(self.suggested, placeholder="file to export to", id="export-path")
            with Horizontal(classes="buttons"):
                yield Button("Export", id="export", variant="primary")
                yield Button("Copy", id="copy")
                yield Button("Close", id="close-token")
            yield Label("", id="token-msg", markup=False)
        yield Footer()

    def action_export(self) -> None:
        msg = self.query_one("#token-msg", Label)
        path = self.query_one("#export-path", Input).value.strip()
        if not path:
            msg.update("Give a file name to export to.")
            return
        try:
            full = export_token(path, self.token)
        except FileExistsError:
            msg.update(f"{path} exists: not overwritten; choose another name.")
            return
        except OSError as e:
            msg.update(f"Cannot write {path}: {e.strerror or e}")
            return
        msg.update(f"Exported to {full} (mode 0600).")

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.token)
        self.query_one("#token-msg", Label).update("Copied to the clipboard.")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "export":
            self.action_export()
        elif event.button.id == "copy":
            self.action_copy()
        else:
            self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm", classes="dialog"):
            yield Label(self.question, id="question", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Yes", id="yes", variant="error")
                yield Button("No", id="no")
        yield Footer()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TemplatePicker(ModalScreen[str | None]):
    """Choose a saved template to fill the Add SSA form with."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names

    def compose(self) -> ComposeResult:
        with Vertical(id="picker", classes="dialog"):
            yield Label("Apply a template" if self.names else "No saved templates", classes="title")
            yield OptionList(*self.names, id="template-options")
        yield Footer()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.names[event.option_index])
