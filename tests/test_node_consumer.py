"""The node-oidc-provider recipe of docs/consumers.md (``tests/node/provider.mjs``) against a real
``ssa-server serve``: dynamic registration with a valid SSA is 201; a tampered, a revoked, a used
one-time SSA and a foreign issuer's SSA are 400 ``invalid_software_statement``.

The Node project (``tests/node``: ``oidc-provider`` and ``jose`` at the exact versions of its
``package-lock.json``) is installed with ``npm ci`` once per lock file into a cache directory
(``SSA_TEST_NODE_CACHE``, default ``~/.cache/ssa-server/node``).  Without node/npm, or when the
install fails (no registry), the test skips, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import httpx2 as httpx
import pytest
from ports import free_port
from ssa_server import verify
from test_verify import Issuer

PROJECT = Path(__file__).parent / "node"
RECIPE = PROJECT / "provider.mjs"
DOCS = Path(__file__).parent.parent / "docs" / "consumers.md"
NODE_MIN = (20, 19)  # oidc-provider 9's engines: ^20.19.0 || ^22.12.0 || >= 23
INSTALL_TIMEOUT = 300
NPM_CI_FLAGS = ("--no-audit", "--no-fund", "--ignore-scripts", "--fetch-retries=1",
                "--fetch-retry-mintimeout=1000", "--fetch-retry-maxtimeout=3000")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI must run the node-oidc-provider recipe: {reason}")
    pytest.skip(f"the node-oidc-provider recipe needs node and the npm registry: {reason}")


def node_version(node: str) -> tuple[int, ...]:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    return tuple(int(part) for part in out.strip().lstrip("v").split(".")[:2])


def installed_project() -> Path:
    """The project's directory with its node_modules, installed once per package-lock.json: into a
    temporary directory beside the cache entry, renamed into place only once ``npm ci`` succeeded (a
    failed or interrupted install leaves no half entry behind)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        unavailable("node or npm is not on PATH")
    assert node is not None and npm is not None
    if node_version(node) < NODE_MIN:
        unavailable(f"node {'.'.join(map(str, node_version(node)))} is older than {NODE_MIN}")
    lock = (PROJECT / "package-lock.json").read_bytes()
    key = hashlib.sha256(lock + (PROJECT / "package.json").read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("SSA_TEST_NODE_CACHE", Path.home() / ".cache" / "ssa-server" / "node"))
    home = cache / key
    if not (home / "node_modules").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=cache, prefix=f".{key}-"))
        for name in ("package.json", "package-lock.json"):
            shutil.copy(PROJECT / name, work / name)
        try:
            # One quick retry: without a registry npm's default back-off waits about a minute.
            done = subprocess.run([npm, "ci", *NPM_CI_FLAGS], cwd=work, capture_output=True, text=True,
                                  timeout=INSTALL_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            shutil.rmtree(work, ignore_errors=True)
            unavailable(f"npm ci took more than {INSTALL_TIMEOUT} s")
        if done.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            said = [line for line in done.stderr.splitlines() if "complete log" not in line]
            unavailable("npm ci failed: " + " / ".join(said[:3] or ["(no output)"]))
        try:
            work.rename(home)
        except OSError:  # another run installed it meanwhile
            shutil.rmtree(work, ignore_errors=True)
    shutil.copy(RECIPE, home / RECIPE.name)  # the repo's file, run beside the installed modules
    return home


class NodeProvider:
    """``node provider.mjs``, started by us and stopped by its PID; every wait is bounded."""

    def __init__(self, home: Path, ssa_issuer: str, log: Path, lifetime: int = 120) -> None:
        self.log = log
        self.port = free_port()
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [str(shutil.which("node")), str(home / RECIPE.name), "--ssa-issuer", ssa_issuer,
                 "--port", str(self.port), "--lifetime", str(lifetime)],
                cwd=home, stdout=subprocess.PIPE, stderr=err, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout or ()],
                         daemon=True).start()
        try:
            ready = json.loads(lines.get(timeout=30))
        except queue.Empty:
            self.stop()
            raise AssertionError("the provider did not start:\n" + log.read_text(errors="replace")) from None
        self.iat = ready["initial_access_token"]
        self.http = httpx.Client(base_url=ready["issuer"], timeout=20)

    def register(self, statement: str | None, token: str | None = None) -> httpx.Response:
        body = {"redirect_uris": ["https://rp.example/cb"], "client_name": "scanner"}
        if statement is not None:
            body["software_statement"] = statement
        return self.http.post("/reg", json=body, headers={"Authorization": f"Bearer {token or self.iat}"})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=10)


def refused(r: httpx.Response) -> str:
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_software_statement", r.text
    return r.json()["error_description"]


@pytest.mark.slow
def test_node_oidc_provider_registers_valid_ssas_only(tmp_path):
    home = installed_project()
    issuer = Issuer(tmp_path / "a")
    other = None
    provider = None
    try:
        provider = NodeProvider(home, issuer.url, tmp_path / "node.log")

        good = issuer.ssa(one_time_use=False, software_id="scanner-1")
        r = provider.register(good)
        assert r.status_code == 201, r.text
        client = r.json()
        assert client["software_id"] == "scanner-1" and client["org_id"] == "acme" and client["client_id"]
        assert provider.register(good).status_code == 201  # reusable: ACTIVE still
        status = issuer.served.http.get("/ssa/status", params={"jti": jti_of(good)}).json()
        assert status["status"] == "ACTIVE"

        head, payload, signature = good.split(".")
        claims = verify._b64json(payload)
        forged = base64.urlsafe_b64encode(json.dumps(dict(claims, org_id="evil")).encode()).rstrip(b"=")
        tampered = f"{head}.{forged.decode()}.{signature}"
        assert "ERR_JWS_SIGNATURE_VERIFICATION_FAILED" in refused(provider.register(tampered))
        assert "required" in refused(provider.register(None))

        revoked = issuer.ssa(one_time_use=False)
        assert provider.register(revoked).status_code == 201
        issuer.revoke(revoked)
        assert "REVOKED" in refused(provider.register(revoked))

        used = issuer.ssa(one_time_use=True)
        assert issuer.served.http.post("/ssa/validation", headers={"jti": jti_of(used)}).status_code == 200
        assert "USED" in refused(provider.register(used))

        once = issuer.ssa(one_time_use=True)  # the recipe uses it up when it registers a client
        assert provider.register(once).status_code == 201
        assert issuer.served.http.get("/ssa/status", params={"jti": jti_of(once)}).json()["status"] == "USED"
        assert "USED" in refused(provider.register(once))

        other = Issuer(tmp_path / "b")
        foreign = other.ssa(one_time_use=False)
        assert re.search(r"ERR_JWKS_NO_MATCHING_KEY|ERR_JWT_CLAIM_VALIDATION_FAILED",
                         refused(provider.register(foreign)))

        # Without the initial access token (the policy's carrier) nothing registers at all.
        assert provider.register(good, token="not-the-token").status_code == 401
        assert provider.proc.poll() is None, (tmp_path / "node.log").read_text()
    finally:
        if provider is not None:
            provider.stop()
        issuer.served.kill()
        if other is not None:
            other.served.kill()


def jti_of(token: str) -> str:
    return str(verify._b64json(token.split(".")[1])["jti"])


def recipe_region() -> str:
    text = RECIPE.read_text()
    match = re.search(r"^// --- recipe: begin.*?\n(.*?)^// --- recipe: end ---$", text, re.S | re.M)
    assert match, "provider.mjs lost its recipe markers"
    return match.group(1)


def test_the_docs_show_the_tested_recipe():
    section = DOCS.read_text().split("## node-oidc-provider", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```js\n(.*?)^```$", section, re.S | re.M)
    assert blocks == [recipe_region()], "the docs differ from provider.mjs"
    assert "tests/node/provider.mjs" in section and "not run here" not in section
