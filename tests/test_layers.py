"""The import layers, read from the source with ``ast`` (issue 12, item 9).

- Plugins may import the core; the core imports plugins only where the server is assembled
  (``server.py``, the CLI's script commands), or for type hints (``if TYPE_CHECKING:``).
- The store family imports nothing of the layers above it (service, server, HTTP).
- The untrusted sandbox worker and the key-holding signing helper reach, through their
  module-level imports, only the modules they need (``test_helper_processes.py`` checks the same
  at run time, in a fresh interpreter).

Every failure names the import and, for the helpers, the chain of imports that reaches it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ssa_server": ROOT / "core", "ssa_server.plugins": ROOT / "plugins"}  # pyproject's package-dir

ASSEMBLY = {"ssa_server.server", "ssa_server.cli"}  # where the core builds the server with its plugins
ABOVE_THE_STORE = ("ssa_server.service", "ssa_server.server", "ssa_server.app", "ssa_server.routes",
                   "ssa_server.cli", "ssa_server.clients", "ssa_server.tokens", "ssa_server.keys",
                   "ssa_server.plugins")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            if name.startswith("ssa_server.plugins") and package == "ssa_server":
                continue  # core/ has no plugins folder; be sure
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


class _Imports(ast.NodeVisitor):
    """``(module imported, line, at module level)`` for each import outside ``if TYPE_CHECKING:``."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.base = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, int, bool]] = []
        self._depth = 0  # inside a function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, node.lineno, self._depth == 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.base.split(".")
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:  # ``from pkg import module`` imports the module
            candidate = f"{target}.{alias.name}"
            self.found.append((candidate if candidate in MODULES else target, node.lineno, self._depth == 0))


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    path = MODULES[module]
    visitor = _Imports(module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.found


def _ours(name: str) -> bool:
    return name == "ssa_server" or name.startswith("ssa_server.")


def _with_parents(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def reached(start: str) -> dict[str, list[str]]:
    """Each of our modules ``python -m start`` loads through module-level imports, with the chain
    of imports that gets there."""
    chains: dict[str, list[str]] = {}
    todo = [(m, [m]) for m in _with_parents(start)]
    while todo:
        module, chain = todo.pop()
        if module in chains or module not in MODULES:
            continue
        chains[module] = chain
        for target, _, top in imports_of(module):
            if top and _ours(target):
                todo.extend((m, chain + [m]) for m in _with_parents(target) if m not in chains)
    return chains


def test_the_import_reader_sees_every_kind_of_import():
    """The reader finds the imports these rules rest on (else every rule below passes vacuously)."""
    server = {t for t, _, _ in imports_of("ssa_server.server")}
    assert {"ssa_server.plugins.hooks", "ssa_server.plugins.manager", "ssa_server.service"} <= server
    cli = [(t, top) for t, _, top in imports_of("ssa_server.cli")]
    assert ("ssa_server.plugins.scripts", False) in cli  # inside a command's function
    service = {t for t, _, _ in imports_of("ssa_server.service")}
    assert "ssa_server.plugins.hooks" not in service  # a type hint only (TYPE_CHECKING)
    assert {"ssa_server.store", "ssa_server.store.search", "ssa_server.script_rules"} <= service
    assert "ssa_server.plugins.sandbox.policy" in reached("ssa_server.plugins.sandbox.worker")


def test_the_core_imports_plugins_only_where_the_server_is_assembled():
    wrong = [f"{module} line {line} imports {target}"
             for module in MODULES if not module.startswith("ssa_server.plugins") and module not in ASSEMBLY
             for target, line, _ in imports_of(module) if target.startswith("ssa_server.plugins")]
    assert not wrong, "the core imports a plugin outside server.py and the CLI:\n" + "\n".join(wrong)


def test_the_store_family_imports_nothing_above_it():
    wrong = [f"{module} line {line} imports {target}"
             for module in MODULES if module.startswith("ssa_server.store")
             for target, line, _ in imports_of(module)
             if any(target == above or target.startswith(above + ".") for above in ABOVE_THE_STORE)]
    assert not wrong, "\n".join(wrong)


# What each helper may reach.  The worker: its wall, the language policy, the rules a result is
# held to, the frames; never the pool, the host, the plugin manager, keys, signing, the store or
# the spawner.  The signing helper: frames and signatures; nothing of the plugins or the sandbox.
HELPERS = {
    "ssa_server.plugins.sandbox.worker": {
        "ssa_server", "ssa_server.frames", "ssa_server.jsonvalues", "ssa_server.shared_counter",
        "ssa_server.jwt_draft", "ssa_server.script_rules", "ssa_server.plugins", "ssa_server.plugins.sandbox",
        "ssa_server.plugins.sandbox.errors", "ssa_server.plugins.sandbox.limits",
        "ssa_server.plugins.sandbox.janssen", "ssa_server.plugins.sandbox.janssen_objects",
        "ssa_server.plugins.sandbox.policy", "ssa_server.plugins.sandbox.refusals",
        "ssa_server.plugins.sandbox.state", "ssa_server.plugins.sandbox.worker",
    },
    "ssa_server.signing_process": {
        "ssa_server", "ssa_server.frames", "ssa_server.helper_process", "ssa_server.signing",
        "ssa_server.signing_process",
    },
}


@pytest.mark.parametrize("helper", sorted(HELPERS))
def test_a_helper_process_reaches_only_what_it_needs(helper):
    chains = reached(helper)
    extra = sorted(set(chains) - HELPERS[helper])
    assert not extra, f"{helper} reaches " + "; ".join(" -> ".join(chains[m]) for m in extra)
    assert set(chains) == HELPERS[helper]  # the list above stays exact: a module no longer needed leaves it


TUI = {"ssa_server.tui", "ssa_server.tui_dialogs", "ssa_server.tui_client"}


def test_the_text_ui_is_a_layer_above_the_service():
    """Only the text UI imports Textual (the server runs without it); nothing but the CLI's ``tui``
    command imports the text UI, and that only inside the command; the UI reaches neither the HTTP
    routes nor the plugins (its local source goes through the service and the server)."""
    wrong = []
    for module in MODULES:
        for target, line, top in imports_of(module):
            if (target == "textual" or target.startswith("textual.")) and module not in TUI:
                wrong.append(f"{module} line {line} imports {target}")
            if target in TUI and module not in TUI and (module != "ssa_server.cli" or top):
                wrong.append(f"{module} line {line} imports {target}")
            if module in TUI and (target.startswith("ssa_server.plugins") or target in (
                    "ssa_server.routes", "ssa_server.app")):
                wrong.append(f"{module} line {line} imports {target}")
    assert not wrong, "\n".join(wrong)
    assert any(t == "ssa_server.tui" and not top for t, _, top in imports_of("ssa_server.cli"))
    assert any(t.startswith("textual") for t, _, _ in imports_of("ssa_server.tui"))
