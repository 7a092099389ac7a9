"""Create and GET-by-jti latency of the real server as the store grows.

    python bench/api_latency.py [--sizes 1000,50000] [--requests 300]

For each size: a fresh data dir is preloaded with N SSAs through the store, ``ssa-server
serve`` is started on 127.0.0.1, and one client sends requests one at a time (latency, not
throughput: no queueing).  Prints a table and writes ``bench/results/api_latency.json``.
Stock TinyDB figures for the same sizes come from ``bench/store_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

from ssa_server.ssa import CreateRequest, record_from_request

ADMIN = "https://jans.io/auth/ssa.admin"
RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def preload(data_dir: Path, n: int) -> list[str]:
    from ssa_server.store.tiny import TinyStore

    now = int(time.time())
    records = [record_from_request(
        CreateRequest(org_id=f"org-{i // 10}", description="preloaded", software_id=f"sw-{i}",
                      software_roles=["password"], grant_types=["client_credentials"], one_time_use=False),
        now=now, expiration_in_days=30, creator_id="bench", issuer="http://bench") for i in range(n)]

    async def run() -> None:
        store = TinyStore(data_dir)
        await store.open()
        for start in range(0, n, 10_000):
            await store.add_ssas(records[start:start + 10_000])  # type: ignore[arg-type]
        await store.close()

    asyncio.run(run())
    return [r["jti"] for r in records]


def cli(data_dir: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "ssa_server", *args, "--data-dir", str(data_dir)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def measure(n: int, requests: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        jtis = preload(data_dir, n)
        client = cli(data_dir, "clients", "create", "--scope", ADMIN)
        port = free_port()
        env = dict(os.environ, SSA_SCRIPTS_ENABLED="false")
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "ssa_server", "serve", "--port", str(port),
                                 "--data-dir", str(data_dir), "--scripts-dir", str(Path(tmp) / "scripts")],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base, timeout=10) as http:
                deadline = time.time() + 60
                while True:
                    try:
                        if http.get("/health/ready").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.time() > deadline:
                        raise RuntimeError("server did not start")
                    time.sleep(0.05)
                startup = time.perf_counter() - started
                token = http.post("/token", data={"grant_type": "client_credentials"},
                                  auth=(client["client_id"], client["client_secret"])).json()["access_token"]
                headers = {"Authorization": f"Bearer {token}"}
                body = {"org_id": "bench-org", "software_roles": ["password"],
                        "grant_types": ["client_credentials"]}
                for _ in range(20):  # warm-up
                    http.post("/ssa", json=body, headers=headers)
                create, get = [], []
                for i in range(requests):
                    t = time.perf_counter()
                    r = http.post("/ssa", json=body, headers=headers)
                    create.append(time.perf_counter() - t)
                    assert r.status_code == 201, r.text
                    t = time.perf_counter()
                    r = http.get("/ssa", params={"jti": jtis[(i * 7919) % n]}, headers=headers)
                    get.append(time.perf_counter() - t)
                    assert r.status_code == 200 and len(r.json()) == 1, r.text
        finally:
            proc.kill()
            proc.wait()
    return {"stored": n, "startup_s": round(startup, 2),
            "create_p50_ms": round(pct(create, 0.5), 3), "create_p99_ms": round(pct(create, 0.99), 3),
            "get_jti_p50_ms": round(pct(get, 0.5), 3), "get_jti_p99_ms": round(pct(get, 0.99), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,50000")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    rows = [measure(int(s), args.requests) for s in args.sizes.split(",")]
    print(f"{'stored':>8} {'startup s':>9} {'create p50':>11} {'create p99':>11} "
          f"{'get p50':>9} {'get p99':>9}  (ms)")
    for r in rows:
        print(f"{r['stored']:>8} {r['startup_s']:>9} {r['create_p50_ms']:>11} {r['create_p99_ms']:>11} "
              f"{r['get_jti_p50_ms']:>9} {r['get_jti_p99_ms']:>9}")
    RESULTS.mkdir(exist_ok=True)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "alg": "RS256", "rows": rows}
    (RESULTS / "api_latency.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
