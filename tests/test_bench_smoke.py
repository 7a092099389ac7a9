"""The benchmark harness (``python -m bench``) runs end to end with tiny N for about a second per
scenario, so it cannot rot.  No timing assertions: only that it ran, requests succeeded and the
JSON has its shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts real server processes, like tests/test_live_server.py

REPO = Path(__file__).resolve().parent.parent


def run_bench(out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench", "--sizes", "50", "--seconds", "1",
                           "--out", str(out), *args], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| target | check |" in proc.stdout
    return json.loads(out.read_text())


def check_rows(result: dict, scenarios: set[str]) -> None:
    assert {r["scenario"] for r in result["rows"]} == scenarios
    for row in result["rows"]:
        assert row["requests"] > 0 and row["error_count"] == 0, row
        for key in ("rps", "p50_ms", "p99_ms", "cpu_cores", "peak_rss_mib", "connections", "n", "stored",
                    "client"):
            assert key in row, key
        assert row["peak_rss_mib"] > 0
    assert result["errors"] == 0
    info = result["per_size"][0]["info"]
    assert info["n"] == 50 and info["startup_s"] > 0 and info["peak_rss_mib"] > 0


def test_bench_runs_with_its_default_client(tmp_path):
    scenarios = {"create_rs256", "get_jti", "get_org", "validate_onetime", "revoke", "create_1script"}
    result = run_bench(tmp_path / "run.json", "--only", ",".join(sorted(scenarios)), "--ref-seconds", "0.2",
                       "--pool-rate", "300")
    check_rows(result, scenarios)
    refs = result["references"]
    assert set(refs["sign_ops"]) == set(refs["raw_sign_ops"]) == {"RS256", "ES256"}
    assert refs["bare_rps"] > 0 and refs["bare"]["error_count"] == 0
    assert {c["target"] for c in result["targets"]} == {"1", "2", "3", "4", "5", "6"}
    assert {"date", "machine", "client", "stack", "sizes", "seconds", "connections"} <= set(result)
    low = [r for r in result["rows"] if r["scenario"] == "create_1script" and r["connections"] == 1]
    assert low, "the script-overhead scenario has a low-concurrency run"
    # the script runs sit between two runs of their base; sign_ops is measured beside the create runs
    repeats = [bool(r.get("repeat")) for r in result["rows"] if r["scenario"] == "create_rs256"]
    assert repeats == [False, False, True]
    beside = result["per_size"][0]["info"]["sign_ops_beside"]["RS256"]
    assert beside["scenario"] == "create_rs256" and beside["before"] > 0 and beside["after"] > 0


def test_bench_runs_with_the_python_client(tmp_path):
    scenarios = {"get_jti", "validate_reusable", "validate_onetime"}
    result = run_bench(tmp_path / "run.json", "--python-client", "--no-refs", "--warmup", "0",
                       "--only", ",".join(sorted(scenarios)), "--pool-rate", "300")
    assert result["client"] == "python"
    check_rows(result, scenarios)
    assert all(r["client"] == "python" for r in result["rows"])


def test_server_env_reaches_the_servers_under_test(tmp_path):
    result = run_bench(tmp_path / "r.json", "--only", "validate_reusable", "--no-refs",
                       "--server-env", "SSA_METRICS_ENABLED=false")
    assert result["server_env"] == {"SSA_METRICS_ENABLED": "false"}
    check_rows(result, {"validate_reusable"})
    # the settings are the servers': a contradictory pair stops the server, and the run names why
    proc = subprocess.run([sys.executable, "-m", "bench", "--sizes", "50", "--seconds", "1",
                           "--only", "get_jti", "--no-refs", "--out", str(tmp_path / "bad.json"),
                           "--server-env", "SSA_METRICS_PORT=9", "--server-env", "SSA_METRICS_ENABLED=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "SSA_METRICS_ENABLED is false" in proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "bench", "--server-env", "METRICS=false"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "SSA_NAME=VALUE" in proc.stderr
