"""mypy's view of the package (CI runs ruff and mypy; this suite runs neither).

mypy reads the package through ``.mypy-path/`` (``pyproject.toml``, ``[tool.mypy]``), two symlinks
that lay ``core/`` and ``plugins/`` out under their installed names.  If a folder moved or the
package-dir mapping changed, mypy would check nothing, or the wrong folder, without a word."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_checks_each_package_in_the_folder_it_installs_from():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = project["tool"]["setuptools"]["package-dir"]
    mypy = project["tool"]["mypy"]
    assert sorted(mypy["packages"]) == sorted(package_dir)
    for name, folder in package_dir.items():
        found = [root / Path(*name.split(".")) for root in (ROOT / p for p in mypy["mypy_path"])
                 if (root / Path(*name.split(".")) / "__init__.py").is_file()]
        assert [p.resolve() for p in found] == [(ROOT / folder).resolve()], name
