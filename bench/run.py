"""The benchmark suite of issue 4: the real server against the signature and a bare Starlette endpoint.

    python -m bench                                  # every scenario at N = 1k, 10k and 100k
    python -m bench --sizes 200 --seconds 1          # a quick look
    python -m bench --only create_rs256,get_jti --python-client

For each size N: a temporary data dir is preloaded with N SSAs through the store, a client is
registered with ``ssa-server clients create``, ``ssa-server serve`` starts (one process, default
settings, 127.0.0.1, a free port), and wrk (or the bounded Python client) drives each scenario
from another process: one warm-up run, then the measured run (throughput and p50/p99 at
``--connections``) and, for the latency targets, a run at ``--low-connections``.  Server CPU
(cores used, script workers included) and peak RSS (VmHWM, workers included) come from /proc.
Reference figures from the same run: ``sign_ops``, ``raw_sign_ops`` and ``bare_rps``.
Prints one table, the references and the six targets (PASS/FAIL); writes the same as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import http.client
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, procstat  # noqa: E402
from bench.loadgen import Load  # noqa: E402

ADMIN = "https://jans.io/auth/ssa.admin"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ORG_SIZE = 10  # every preloaded org holds exactly this many SSAs (GET by org_id returns 10)

CREATE_BODY = {"org_id": "bench-create", "description": "benchmark", "software_id": "bench-software",
               "software_roles": ["password"], "grant_types": ["client_credentials"], "one_time_use": False,
               "lifetime": 86400}
SCRIPT = '''# bench: one create script that adds a claim
def create(jwt, context):
    jwt.claims["bench_%d"] = "x"
    return True
'''

# name -> (phase, needs a low-concurrency run for a latency target)
SCENARIOS: dict[str, tuple[str, bool]] = {
    "get_jti": ("rs256", True),
    "get_org": ("rs256", True),
    "validate_reusable": ("rs256", False),
    "create_rs256": ("rs256", True),
    "create_1script": ("scripts", True),
    "create_5scripts": ("scripts", True),
    "validate_onetime": ("pools", False),
    "revoke": ("pools", False),
    "create_es256": ("es256", False),
}
SCRIPT_COUNTS = {"create_1script": 1, "create_5scripts": 5}


# --- small helpers ---
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_http(port: int, path: str, deadline: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    while True:
        try:
            if request(port, "GET", path, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} answered")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not answer 200 in time")
        time.sleep(0.02)


def cli(data_dir: Path, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "ssa_server", *args, "--data-dir", str(data_dir)],
                         check=True, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


def stack() -> str:
    found = []
    for mod in ("uvloop", "httptools"):
        try:
            __import__(mod)
            found.append(mod)
        except ImportError:
            pass
    return "+".join(found) or "asyncio+h11"


# --- preload ---
def _record(jti: str, org_id: str, one_time: bool, now: int) -> dict[str, Any]:
    from ssa_server.ssa import CreateRequest, record_from_request

    request = CreateRequest(org_id=org_id, description="preloaded", software_id="bench-software",
                            software_roles=["password"], grant_types=["client_credentials"],
                            one_time_use=one_time)
    return dict(record_from_request(request, now=now, expiration_in_days=30, creator_id="bench",
                                    issuer="http://bench", jti=jti))


def add_ssas(data_dir: Path, records: list[dict[str, Any]], *, exclusive: bool) -> float:
    """Bulk insert through the store (``TinyStore.add_ssas``); non-exclusive works beside a running server."""
    from ssa_server.store.tiny import TinyStore

    async def go() -> None:
        store = TinyStore(data_dir, exclusive=exclusive)
        await store.open()
        try:
            for start in range(0, len(records), 10_000):
                await store.add_ssas(records[start:start + 10_000])  # type: ignore[arg-type]
        finally:
            await store.close()

    t = time.perf_counter()
    asyncio.run(go())
    return time.perf_counter() - t


def preload(data_dir: Path, n: int, files: Path) -> dict[str, Any]:
    """N reusable SSAs in orgs of exactly ``ORG_SIZE``; writes ``reusable.txt`` and ``orgs.txt``."""
    now = int(time.time())
    records = [_record(str(uuid.uuid4()), f"bench-org-{i // ORG_SIZE}", False, now) for i in range(n)]
    seconds = add_ssas(data_dir, records, exclusive=True)
    jtis = [r["jti"] for r in records]
    step = 7919 if n > 7919 else 1  # visit the store in a scattered order
    order = [jtis[(i * step) % n] for i in range(n)] if math.gcd(step, n) == 1 else jtis
    (files / "reusable.txt").write_text("\n".join(order) + "\n")
    full = [f"bench-org-{k}" for k in range(n // ORG_SIZE)] or ["bench-org-0"]
    (files / "orgs.txt").write_text("\n".join(full) + "\n")
    return {"preload_s": round(seconds, 2), "full_orgs": n // ORG_SIZE}


def add_pools(data_dir: Path, files: Path, size: int) -> dict[str, Any]:
    """One-time SSAs (validated once each) and reusable SSAs to revoke (once each), beside the server."""
    now = int(time.time())
    onetime = [_record(str(uuid.uuid4()), "bench-pool-onetime", True, now) for _ in range(size)]
    revoke = [_record(str(uuid.uuid4()), "bench-pool-revoke", False, now) for _ in range(size)]
    seconds = add_ssas(data_dir, onetime + revoke, exclusive=False)
    (files / "onetime.txt").write_text("\n".join(r["jti"] for r in onetime) + "\n")
    (files / "revoke.txt").write_text("\n".join(r["jti"] for r in revoke) + "\n")
    return {"pool_size": size, "pool_load_s": round(seconds, 2)}


# --- the server process ---
class ServerProc:
    def __init__(self, data_dir: Path, scripts_dir: Path, log: Path, *, alg: str = "RS256",
                 env: dict[str, str] | None = None) -> None:
        self.data_dir, self.scripts_dir, self.log, self.alg = data_dir, scripts_dir, log, alg
        self.extra_env = env or {}  # --signing-backend pkcs11: the token's settings
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> float:
        """Spawn ``ssa-server serve``; returns seconds from spawn until /health/ready answers 200."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSA_")}
        env.update(SSA_DATA_DIR=str(self.data_dir), SSA_SCRIPTS_DIR=str(self.scripts_dir),
                   SSA_PORT=str(self.port), SSA_HOST="127.0.0.1")
        if self.alg != "RS256":
            env["SSA_SIGNING_ALG"] = self.alg
        env.update(self.extra_env)
        t = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ssa_server", "serve"], env=env,
                                         cwd=self.data_dir.parent, stdout=log, stderr=log)
        try:
            wait_http(self.port, "/health/ready", t + timeout, self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"server did not start; log tail:\n{self.log.read_text()[-2000:]}") from None
        return time.monotonic() - t

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def token_for(port: int, client: dict[str, str]) -> str:
    basic = base64.b64encode(f"{client['client_id']}:{client['client_secret']}".encode()).decode()
    status, body = request(port, "POST", "/token", b"grant_type=client_credentials",
                           {"Authorization": f"Basic {basic}",
                            "Content-Type": "application/x-www-form-urlencoded"})
    if status != 200:
        raise RuntimeError(f"POST /token answered {status}: {body[:200]!r}")
    return str(json.loads(body)["access_token"])


def set_scripts(server: ServerProc, token: str, count: int, timeout: float = 30) -> float:
    """Leave exactly ``count`` bench scripts in the scripts dir; wait until GET /scripts lists them all
    with state ``loaded`` (hot reload).  Returns the seconds waited."""
    folder = server.scripts_dir
    for old in folder.glob("bench_*.py"):
        old.unlink()
    for i in range(count):
        (folder / f"bench_{i}.py").write_text(SCRIPT % i)
    t = time.monotonic()
    while True:
        status, body = request(server.port, "GET", "/scripts", headers={"Authorization": f"Bearer {token}"})
        if status != 200:
            raise RuntimeError(f"GET /scripts answered {status}")
        listing = json.loads(body)
        names = sorted(s["name"] for s in listing
                       if s.get("state") == "loaded" and "create" in s.get("hooks", []))
        if len(listing) == count and len(names) == count:
            return time.monotonic() - t
        if time.monotonic() - t > timeout:
            raise RuntimeError(f"scripts not loaded after {timeout}s: {listing}")
        time.sleep(0.1)


def sanity_check(port: int, token: str, files: Path) -> None:
    """The requests measure what they say: a preloaded jti lists 1 SSA, a preloaded org exactly 10."""
    auth = {"Authorization": f"Bearer {token}"}
    jti = (files / "reusable.txt").read_text().split("\n", 1)[0]
    org = (files / "orgs.txt").read_text().split("\n", 1)[0]
    for path, want in ((f"/ssa?jti={jti}", 1), (f"/ssa?org_id={org}", ORG_SIZE)):
        status, body = request(port, "GET", path, headers=auth)
        got = len(json.loads(body)) if status == 200 else None
        if got != want:
            raise RuntimeError(f"GET {path} answered {status} with {got} SSAs, expected {want}")


# --- one scenario ---
@dataclasses.dataclass
class Ctx:
    args: argparse.Namespace
    work: Path
    files: Path
    n: int
    server: ServerProc
    token: str
    stored: int
    pool_used: dict[str, int] = dataclasses.field(default_factory=dict)


def load_for(ctx: Ctx, scenario: str, connections: int, seconds: int,
             pool_slice: tuple[int, int] | None) -> Load:
    auth = {"Authorization": f"Bearer {ctx.token}"}
    base = Load(port=ctx.server.port, connections=connections, threads=ctx.args.threads, seconds=seconds)
    if scenario.startswith("create"):
        return dataclasses.replace(base, method="POST", path="/ssa", body=json.dumps(CREATE_BODY),
                                   headers={**auth, "Content-Type": "application/json"})
    if scenario == "get_jti":
        return dataclasses.replace(base, path="/ssa?jti={jti}", headers=auth,
                                   jti_file=str(ctx.files / "reusable.txt"), jti_count=ctx.n, jti_in="query")
    if scenario == "get_org":
        orgs = max(1, ctx.n // ORG_SIZE)
        return dataclasses.replace(base, path="/ssa?org_id={jti}", headers=auth,
                                   jti_file=str(ctx.files / "orgs.txt"), jti_count=orgs, jti_in="query")
    if scenario == "validate_reusable":
        return dataclasses.replace(base, method="POST", path="/ssa/validation",
                                   jti_file=str(ctx.files / "reusable.txt"), jti_count=ctx.n, jti_in="header")
    assert pool_slice is not None
    first, count = pool_slice
    if scenario == "validate_onetime":
        return dataclasses.replace(base, method="POST", path="/ssa/validation",
                                   jti_file=str(ctx.files / "onetime.txt"), jti_first=first, jti_count=count,
                                   jti_in="header", consume=True)
    if scenario == "revoke":
        return dataclasses.replace(base, method="DELETE", path="/ssa?jti={jti}", headers=auth,
                                   jti_file=str(ctx.files / "revoke.txt"), jti_first=first, jti_count=count,
                                   jti_in="query", consume=True)
    raise ValueError(scenario)


def one_run(ctx: Ctx, scenario: str, connections: int, seconds: int) -> dict[str, Any]:
    pool_slice = None
    if scenario in ("validate_onetime", "revoke"):
        used = ctx.pool_used.get(scenario, 0)
        size = ctx.args.pool_size_actual  # sized for warm-up + measured run: each gets its share
        count = max(0, min(size - used, math.ceil(size * seconds / (ctx.args.warmup + ctx.args.seconds))))
        pool_slice = (used, count)
        ctx.pool_used[scenario] = used + count
    load = load_for(ctx, scenario, connections, seconds, pool_slice)
    stored = ctx.stored
    cpu0, t0 = procstat.tree_cpu(ctx.server.pid), time.monotonic()
    result = loadgen.run(load, ctx.work, python_client=ctx.args.python_client)
    wall = time.monotonic() - t0
    cpu = procstat.tree_cpu(ctx.server.pid) - cpu0
    rss = procstat.tree_rss(ctx.server.pid)
    if scenario.startswith("create"):
        ctx.stored += result["requests"] - result["errors"]["status"]
    errors = sum(result["errors"].values())
    return {"scenario": scenario, "n": ctx.n, "stored": stored, "connections": connections, **result,
            "error_count": errors, "cpu_cores": round(cpu / wall, 2) if wall > 0 else 0.0,
            "peak_rss_mib": rss["peak"], "rss_mib": rss["current"], "children": rss["children"]}


def scenario_rows(ctx: Ctx, scenario: str, low: bool) -> list[dict[str, Any]]:
    args = ctx.args
    if args.warmup > 0:
        one_run(ctx, scenario, args.connections, args.warmup)  # warm-up, not reported
    rows = []
    if low and args.low_connections and args.low_connections != args.connections:
        # first, so that the latency run of a create scenario sees a store closest to N
        rows.append(one_run(ctx, scenario, args.low_connections, args.seconds))
    rows.append(one_run(ctx, scenario, args.connections, args.seconds))
    for row in rows:
        print(format_row(row), flush=True)
    return rows


def repeat_rows(ctx: Ctx, scenario: str) -> list[dict[str, Any]]:
    """``scenario`` at c=connections once more (warm-up first), marked ``repeat``: the script
    runs sit between the two runs of their base, so the machine's drift over them cancels out."""
    if ctx.args.warmup > 0:
        one_run(ctx, scenario, ctx.args.connections, ctx.args.warmup)
    row = dict(one_run(ctx, scenario, ctx.args.connections, ctx.args.seconds), repeat=True)
    print(format_row(row), flush=True)
    return [row]


def create_rows(ctx: Ctx, info: dict[str, Any], alg: str, scenario: str) -> list[dict[str, Any]]:
    """A create scenario with ``sign_ops`` measured right before and right after it (the server
    idle): the machine's speed drifts over a run, so targets 1 and 2 compare each create rate
    with the mean of these two (``info["sign_ops_beside"]``)."""
    if ctx.args.no_refs:
        return scenario_rows(ctx, scenario, SCENARIOS[scenario][1])
    from bench import refs

    before = refs.measure([alg], ctx.args.ref_seconds, raw=False)[alg]["sign_ops"]
    rows = scenario_rows(ctx, scenario, SCENARIOS[scenario][1])
    after = refs.measure([alg], ctx.args.ref_seconds, raw=False)[alg]["sign_ops"]
    info.setdefault("sign_ops_beside", {})[alg] = {"scenario": scenario, "before": before, "after": after,
                                                    "mean": round((before + after) / 2, 1)}
    return rows


# --- one size ---
def pool_size(args: argparse.Namespace, rows: list[dict[str, Any]]) -> int:
    """Jtis per consuming scenario: (warm-up + measured runs) x a generous rate: 2 x the reusable
    validation rate measured just before (one-time validation adds a durable write, so it is
    slower) or ``--pool-rate``, whichever is larger; at most ``--max-pool``.  A pool that still
    runs out ends its run early: the row is flagged and its rps is connections / mean latency."""
    rate = args.pool_rate
    for r in rows:
        if r["scenario"] == "validate_reusable" and r["connections"] == args.connections:
            rate = max(rate, 1.25 * r["rps"])
    return int(min(args.max_pool, math.ceil(rate * (args.warmup + args.seconds))))


def run_size(args: argparse.Namespace, n: int, selected: list[str]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"n": n}
    with tempfile.TemporaryDirectory(prefix=f"ssa-bench-{n}-") as tmp:
        work = Path(tmp)
        data, scripts, files = work / "data", work / "scripts", work / "files"
        data_es256 = work / "data-es256"
        scripts.mkdir()
        files.mkdir()
        info.update(preload(data, n, files))
        client = cli(data, "clients", "create", "--scope", ADMIN, "--name", "bench")
        phases = {SCENARIOS[s][0] for s in selected}
        stored_es256 = n
        if not phases & {"rs256", "scripts", "pools"}:
            data_es256 = data
        if phases & {"rs256", "scripts", "pools"}:
            server = ServerProc(data, scripts, work / "server.log", env=args.server_env)
            info["startup_s"] = round(server.start(), 3)
            info["startup_rss_mib"] = procstat.tree_rss(server.pid)["current"]
            try:
                ctx = Ctx(args, work, files, n, server, token_for(server.port, client), stored=n)
                sanity_check(server.port, ctx.token, files)
                for s in selected:
                    if SCENARIOS[s][0] == "rs256":
                        if s == "create_rs256":
                            rows += create_rows(ctx, info, "RS256", s)
                        else:
                            rows += scenario_rows(ctx, s, SCENARIOS[s][1])
                if "scripts" in phases:
                    for s in selected:
                        if SCENARIOS[s][0] == "scripts":
                            info[f"{s}_load_s"] = round(set_scripts(server, ctx.token, SCRIPT_COUNTS[s]), 2)
                            rows += scenario_rows(ctx, s, SCENARIOS[s][1])
                    set_scripts(server, ctx.token, 0)
                    if "create_rs256" in selected:  # the base again: target 5 uses the mean of both
                        rows += repeat_rows(ctx, "create_rs256")
                # before the pools grow the store; the script workers' peaks were read while they ran
                info["peak_rss_mib"] = max([procstat.tree_rss(server.pid)["peak"]]
                                           + [r["peak_rss_mib"] for r in rows])
                info["stored_at_peak_rss"] = ctx.stored
                # the ES256 server starts from the store as it is now, without the pools
                if "es256" in phases:
                    shutil.copytree(data, data_es256, ignore=shutil.ignore_patterns("server.lock"))
                    stored_es256 = ctx.stored
                if "pools" in phases:
                    size = pool_size(args, rows)
                    args.pool_size_actual = size
                    info.update(add_pools(data, files, size))
                    ctx.stored += 2 * size
                    # the server replays the appended lines before its next read: let that happen now
                    request(server.port, "POST", "/ssa/validation", headers={"jti": "bench-catch-up"},
                            timeout=120)
                    for s in selected:
                        if SCENARIOS[s][0] == "pools":
                            rows += scenario_rows(ctx, s, SCENARIOS[s][1])
            finally:
                server.stop()
        if "es256" in phases:
            server = ServerProc(data_es256, scripts, work / "server-es256.log", alg="ES256",
                                env=args.server_env)
            info["startup_es256_s"] = round(server.start(), 3)
            try:
                ctx2 = Ctx(args, work, files, n, server, token_for(server.port, client), stored=stored_es256)
                rows += create_rows(ctx2, info, "ES256", "create_es256")
            finally:
                server.stop()
    return {"info": info, "rows": rows}


# --- references ---
def bare_rps(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port = free_port()
    with open(work / "bare.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench.bare_app", "--port", str(port)], cwd=REPO,
                                stdout=log, stderr=log)
    try:
        wait_http(port, "/", time.monotonic() + 60, proc)
        load = Load(port=port, connections=args.connections, threads=args.threads, seconds=args.warmup or 1)
        if args.warmup > 0:
            loadgen.run(load, work, python_client=args.python_client)
        cpu0, t0 = procstat.tree_cpu(proc.pid), time.monotonic()
        result = loadgen.run(dataclasses.replace(load, seconds=args.seconds), work,
                             python_client=args.python_client)
        cores = (procstat.tree_cpu(proc.pid) - cpu0) / (time.monotonic() - t0)
        result.update(cpu_cores=round(cores, 2), peak_rss_mib=procstat.tree_rss(proc.pid)["peak"],
                      error_count=sum(result["errors"].values()))
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def references(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench import refs

    out: dict[str, Any] = {}
    signs = refs.measure(["RS256", "ES256"], args.ref_seconds)
    out["sign_ops"] = {alg: v["sign_ops"] for alg, v in signs.items()}
    out["raw_sign_ops"] = {alg: v["raw_sign_ops"] for alg, v in signs.items()}
    bare = bare_rps(args, work)
    out["bare_rps"] = bare["rps"]
    out["bare"] = bare
    return out


# --- targets ---
def _pick(rows: list[dict[str, Any]], scenario: str, n: int, connections: int) -> dict[str, Any] | None:
    for r in rows:
        if (r["scenario"] == scenario and r["n"] == n and r["connections"] == connections
                and not r.get("repeat")):
            return r
    return None


def _repeat(rows: list[dict[str, Any]], scenario: str, n: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["scenario"] == scenario and r["n"] == n and r.get("repeat")), None)


def _nearest(sizes: list[int], want: int) -> int:
    return min(sizes, key=lambda s: (abs(math.log(s / want)), -s))


def targets(result: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows, refs, sizes = result["rows"], result["references"], sorted(result["sizes"])
    hi_c, lo_c = args.connections, args.low_connections or args.connections
    small, large = sizes[0], sizes[-1]
    mid = _nearest(sizes, 10_000)
    checks: list[dict[str, Any]] = []

    def check(target: str, what: str, value: float | None, op: str, limit: float, note: str = "") -> None:
        ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
        checks.append({"target": target, "what": what, "value": None if value is None else round(value, 3),
                       "op": op, "limit": limit, "pass": ok, "note": note})

    def note_n(n: int, want: int) -> str:
        return "" if n == want else f"target names N={want:,}"

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def rps(s: str, n: int, c: int = hi_c) -> float | None:
        r = _pick(rows, s, n, c)
        return r["rps"] if r and not r["error_count"] else None

    def base_rps(n: int) -> float | None:
        """create_rs256 for target 5: the mean of its runs before and after the script runs."""
        first, again = rps("create_rs256", n), _repeat(rows, "create_rs256", n)
        if first is None or again is None or again["error_count"]:
            return first
        return (first + again["rps"]) / 2

    def base_note(n: int) -> str:
        again = _repeat(rows, "create_rs256", n)
        if again is None:
            return ""
        return f"create_rs256: mean of {rps('create_rs256', n) or 0:,.0f} and {again['rps']:,.0f}"

    def p50(s: str, n: int, c: int = lo_c) -> float | None:
        r = _pick(rows, s, n, c)
        return r["p50_ms"] if r and not r["error_count"] else None

    def sign(alg: str, n: int) -> float | None:
        """sign_ops beside the create scenario at N (the run-start figure if not measured)."""
        info = next((s["info"] for s in result["per_size"] if s["info"]["n"] == n), {})
        beside = info.get("sign_ops_beside", {}).get(alg, {}).get("mean")
        return beside or refs.get("sign_ops", {}).get(alg)

    check("1", f"create_rs256 rps / sign_ops(RS256), N={mid}",
          ratio(rps("create_rs256", mid), sign("RS256", mid)), ">=", 0.70, note_n(mid, 10_000))
    for n in sizes:
        check("2", f"create_es256 rps / sign_ops(ES256), N={n}",
              ratio(rps("create_es256", n), sign("ES256", n)), ">=", 0.50)
    growth = "" if (small, large) == (1000, 100_000) else "target names 1k vs 100k"
    for s, limit in (("create_rs256", 1.5), ("get_jti", 1.5), ("get_org", 2.0)):
        value = ratio(p50(s, large), p50(s, small)) if large != small else None
        check("3", f"{s} p50 N={large} / p50 N={small} (c={lo_c})", value, "<=", limit,
              growth if large != small else "needs two sizes")
    bare = refs.get("bare_rps")
    for n in sizes:
        check("4", f"validate_reusable rps / bare_rps, N={n}", ratio(rps("validate_reusable", n), bare),
              ">=", 0.40)
        check("4", f"validate_onetime rps / bare_rps, N={n}", ratio(rps("validate_onetime", n), bare),
              ">=", 0.25)
    for sn in sizes:
        base_p50, one_p50 = p50("create_rs256", sn), p50("create_1script", sn)
        added = (one_p50 - base_p50) * 1000 if base_p50 is not None and one_p50 is not None else None
        check("5", f"create p50 added by 1 script, us (c={lo_c}, N={sn})", added, "<=", 150)
        check("5", f"create_1script rps / create_rs256 rps, N={sn}",
              ratio(rps("create_1script", sn), base_rps(sn)), ">=", 0.85, base_note(sn))
        check("5", f"create_5scripts rps / create_rs256 rps, N={sn}",
              ratio(rps("create_5scripts", sn), base_rps(sn)), ">=", 0.60, base_note(sn))
    info = next((s["info"] for s in result["per_size"] if s["info"]["n"] == large), {})
    check("6", f"peak RSS MiB, server + script workers, N={large}", info.get("peak_rss_mib"), "<=", 350,
          note_n(large, 100_000))
    check("6", f"start-up s, N={large}", info.get("startup_s"), "<=", 3.0, note_n(large, 100_000))
    return checks


# --- output ---
HEADER = ("| scenario | N | stored | conc | rps | p50 ms | p99 ms | cpu cores | peak RSS MiB | errors |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(r: dict[str, Any]) -> str:
    flag = (" (pool exhausted)" if r.get("exhausted")
            else " (again, after the script runs)" if r.get("repeat") else "")
    errors = f"**{r['error_count']}**" if r["error_count"] else "0"
    return (f"| {r['scenario']}{flag} | {r['n']:,} | {r['stored']:,} | {r['connections']} | "
            f"{r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_cores']:.2f} | "
            f"{r['peak_rss_mib']:.0f} | {errors} |")


def report(result: dict[str, Any]) -> str:
    title = (f"ssa-server benchmark, {result['date']}, {result['machine']}, client {result['client']}, "
             f"uvicorn {result['stack']}, {result['seconds']} s per run")
    lines = [title, "", HEADER]
    lines += [format_row(r) for r in result["rows"]]
    refs = result["references"]
    lines += ["", "| reference | value |", "|---|---:|"]
    for alg, v in refs.get("sign_ops", {}).items():
        lines.append(f"| sign_ops {alg} (jwcrypto, 1 thread) | {v:,.0f}/s |")
    for alg, v in refs.get("raw_sign_ops", {}).items():
        lines.append(f"| raw_sign_ops {alg} (cryptography, 1 thread) | {v:,.0f}/s |")
    if "bare_rps" in refs:
        lines.append(f"| bare_rps (Starlette, c={result['connections']}) | {refs['bare_rps']:,.0f}/s |")
    for s in result["per_size"]:
        for alg, b in s["info"].get("sign_ops_beside", {}).items():
            if "mean" in b:
                lines.append(f"| sign_ops {alg} beside {b['scenario']}, N={s['info']['n']:,} "
                             f"(before / after) | {b['before']:,.0f} / {b['after']:,.0f}/s |")
    for s in result["per_size"]:
        i = s["info"]
        if "startup_s" in i:
            lines.append(f"| start-up N={i['n']:,} | {i['startup_s']:.2f} s, "
                         f"RSS {i['startup_rss_mib']:.0f} MiB |")
    lines += ["", "| target | check | value | limit | result |", "|---|---|---:|---:|---|"]
    for c in result["targets"]:
        verdict = "n/a" if c["pass"] is None else "PASS" if c["pass"] else "**FAIL**"
        value = ("-" if c["value"] is None
                 else f"{c['value']:.3g}" if abs(c["value"]) < 1000 else f"{c['value']:,.0f}")
        note = f" ({c['note']})" if c["note"] else ""
        lines.append(f"| {c['target']} | {c['what']}{note} | {value} | {c['op']} {c['limit']} | {verdict} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000",
                   help="stored SSAs per server, comma list (default 1000,10000,100000; "
                        "target 1 reads N=10k)")
    p.add_argument("--seconds", type=int, default=5, help="measured seconds per run (default 5)")
    p.add_argument("--warmup", type=int, default=1,
                   help="warm-up seconds before each scenario (default 1; 0: none)")
    p.add_argument("--connections", type=int, default=32,
                   help="connections of the throughput runs (default 32)")
    p.add_argument("--low-connections", type=int, default=1,
                   help="connections of the latency runs (store growth, script overhead; "
                        "default 1; 0: none)")
    p.add_argument("--threads", type=int, default=1,
                   help="wrk threads (default 1: the server keeps the other core)")
    p.add_argument("--only", default="", help=f"comma list of scenarios: {','.join(SCENARIOS)}")
    p.add_argument("--out", default="", help="JSON file (default bench/results/run-<date>.json)")
    p.add_argument("--python-client", action="store_true",
                   help="use the Python load client even if wrk is installed")
    p.add_argument("--ref-seconds", type=float, default=2.0,
                   help="seconds per sign_ops / raw_sign_ops figure")
    p.add_argument("--no-refs", action="store_true", help="skip the reference figures")
    p.add_argument("--pool-rate", type=float, default=1000,
                   help="minimum rate (req/s) the one-time and revoke pools are sized for (default 1000)")
    p.add_argument("--signing-backend", choices=("software", "pkcs11"), default="software",
                   help="the servers' signing_backend; pkcs11: keys in a throwaway SoftHSM2 token")
    p.add_argument("--server-env", action="append", default=[], metavar="SSA_NAME=VALUE",
                   help="a setting for the servers under test (repeatable), e.g. SSA_AUDIT_ENABLED=false "
                        "to measure what the audit trail costs")
    p.add_argument("--max-pool", type=int, default=200_000, help="at most this many jtis per pool")
    args = p.parse_args(argv)
    args.pool_size_actual = 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    selected = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in selected if s not in SCENARIOS]
    if unknown or not sizes or min(sizes) < ORG_SIZE:
        print(f"bench: unknown scenario(s) {unknown} or sizes below {ORG_SIZE}; "
              f"scenarios: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    selected = [s for s in SCENARIOS if s in selected]  # canonical order
    token_dir = tempfile.TemporaryDirectory(prefix="ssa-bench-hsm-")
    settings = [kv.partition("=") for kv in args.server_env]
    if any(not k.startswith("SSA_") or not eq for k, eq, _ in settings):
        print(f"bench: --server-env takes SSA_NAME=VALUE, not {args.server_env}", file=sys.stderr)
        return 2
    given = {k: v for k, _, v in settings}  # (recorded in the results; the token's settings are not)
    args.server_env = dict(given)
    if args.signing_backend == "pkcs11":
        from .pkcs11_token import make_token

        args.server_env.update(make_token(Path(token_dir.name)))
    client = "python" if args.python_client or loadgen.wrk_path() is None else "wrk"
    out = Path(args.out) if args.out else HERE / "results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    started = time.time()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "client": client, "stack": stack(), "sizes": sizes, "scenarios": selected, "seconds": args.seconds,
        "warmup": args.warmup, "connections": args.connections, "low_connections": args.low_connections,
        "signing_backend": args.signing_backend, "server_env": given,
        "argv": sys.argv[1:] if argv is None else argv, "references": {}, "rows": [], "per_size": []}
    print(f"bench: client {client}, sizes {sizes}, scenarios {','.join(selected)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ssa-bench-ref-") as tmp:
        if not args.no_refs:
            result["references"] = references(args, Path(tmp))
            shown = {k: v for k, v in result["references"].items() if k != "bare"}
            print(f"bench: references {json.dumps(shown)}", flush=True)
    print(HEADER, flush=True)
    for n in sizes:
        per = run_size(args, n, selected)
        result["per_size"].append(per)
        result["rows"] += per["rows"]
    result["targets"] = targets(result, args)
    result["elapsed_s"] = round(time.time() - started, 1)
    result["errors"] = sum(r["error_count"] for r in result["rows"])
    print()
    print(report(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nbench: wrote {out} in {result['elapsed_s']} s")
    token_dir.cleanup()
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
