"""Create req/s: TinyDB (1 process) next to PostgreSQL with 1 and 2 workers.

Each run starts a real ``ssa-server serve`` (RS256, no scripts), warms up for one second, then
drives ``POST /ssa`` from 16 concurrent connections for ``--seconds``.  PostgreSQL is a throwaway
cluster this script starts (durable: fsync on, like the embedded store's fsync'ed journal) unless
``--pg-url`` names one (a role that may CREATE DATABASE).  The load comes from wrk (or the harness's
asyncio client) on the same cores as the server: compare the rows with each other.

    python bench/pg_bench.py [--seconds 4] [--connections 16] [--pg-url postgresql://...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pg_cluster import free_port, start_cluster  # noqa: E402

from bench import loadgen  # noqa: E402
from bench.loadgen import Load  # noqa: E402

ADMIN = "https://jans.io/auth/ssa.admin"


def cli(env: dict[str, str], *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "ssa_server", *args], capture_output=True, text=True,
                       timeout=60, env=env, check=True)
    return json.loads(r.stdout)


def drive(port: int, headers: dict[str, str], seconds: int, connections: int, work: Path) -> dict:
    """POST /ssa from ``connections`` connections for ``seconds``: wrk when installed, else the
    harness's bounded asyncio client (``bench/loadgen.py``), from another process either way."""
    load = Load(port=port, method="POST", path="/ssa", body=json.dumps({"org_id": "bench"}),
                headers=dict(headers, **{"Content-Type": "application/json"}), connections=connections,
                seconds=seconds)
    return loadgen.run(load, work)


def measure(label: str, env: dict[str, str], workers: int, seconds: float, connections: int,
            tmp: Path) -> dict:
    env = dict(env, SSA_SCRIPTS_DIR=str(tmp / "no-scripts"), SSA_ISSUER="http://bench.test")
    made = cli(env, "clients", "create", "--scope", ADMIN)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ssa_server", "serve", "--port", str(port),
                             "--workers", str(workers)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit(f"{label}: the server did not start")
            time.sleep(0.1)
        token = httpx.post(f"{base}/token", data={"grant_type": "client_credentials"},
                           auth=(made["client_id"], made["client_secret"])).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        drive(port, headers, 1, connections, tmp)  # warm-up: pools, caches, every worker
        result = drive(port, headers, int(seconds), connections, tmp)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    errors = sum(result["errors"].values())
    if errors:
        raise SystemExit(f"{label}: {errors} requests failed")
    row = {"store": label, "workers": workers, "requests": result["requests"], "req_per_s": result["rps"],
           "p50_ms": result.get("p50_ms"), "p99_ms": result.get("p99_ms"), "client": result["client"]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--pg-url", help="an existing PostgreSQL (default: start a throwaway cluster)")
    args = parser.parse_args()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SSA_")}
    cluster = None if args.pg_url else start_cluster(durable=True)
    admin_url = args.pg_url or cluster.url  # type: ignore[union-attr]
    rows = []
    try:
        import psycopg

        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure("tinydb", dict(base_env, SSA_DATA_DIR=f"{tmp}/data"), 1, args.seconds,
                                args.connections, Path(tmp)))
            for workers in (1, 2):
                name = f"ssa_bench_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(admin_url, autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                url = admin_url.rsplit("/", 1)[0] + f"/{name}"
                try:
                    rows.append(measure("postgresql", dict(base_env, SSA_STORE_URL=url), workers,
                                        args.seconds, args.connections, Path(tmp)))
                finally:
                    with psycopg.connect(admin_url, autocommit=True) as conn:
                        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        if cluster is not None:
            cluster.destroy()
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "pg_bench.json").write_text(json.dumps({"seconds": args.seconds, "connections": args.connections,
                                                   "cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
