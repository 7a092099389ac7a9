"""The benchmark harness of issue 4 (``python -m bench``); see ``bench/README.md``.

Not part of the installed package: run it from the repository root in the project's venv.
"""
