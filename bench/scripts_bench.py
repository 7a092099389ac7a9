"""What a create script costs: per-call overhead, and create requests/s with 0, 1 and 5 scripts.

    python bench/scripts_bench.py [--calls 2000] [--seconds 5]

(a) one typical create script (5 claims) called in-process under the restricted policy (with the
JSON copies a worker does) vs through the worker pool; (b) a real ``ssa-server serve`` with 0, 1
and 5 copies of that script, driven by 16 concurrent connections for a fixed time.
Writes ``bench/results/scripts.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

from ssa_server.plugins.sandbox import SandboxLimits, SandboxPool
from ssa_server.plugins.sandbox import policy

sys.path.insert(0, str(Path(__file__).parent))
from api_latency import ADMIN, cli, free_port  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCRIPT = """
def create(jwt, context):
    for name in ["tenant", "env", "region", "tier", "team"]:
        jwt.claims[name] = context.config.get(name, "x")
    return True
"""
PAYLOAD = {"header": {"typ": "jwt", "alg": "RS256", "kid": "k"},
           "claims": {"jti": "j", "iss": "i", "iat": 1, "org_id": "o", "software_id": "s",
                      "software_roles": ["a"], "grant_types": ["client_credentials"], "exp": 2}}
CONTEXT = {"client_id": "c", "scopes": [ADMIN], "hook": "create", "settings": {}, "request": {}}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6, 1)


def overhead(calls: int) -> dict:
    env = policy.load("b", SCRIPT, max_source=1 << 18, output_limit=65536)
    inproc = []
    for _ in range(calls):
        t = time.perf_counter()
        args = json.loads(json.dumps(PAYLOAD))
        out = policy.call(env, "create", args, CONTEXT, {}, output_limit=65536)
        json.loads(policy.check_json(out, max_bytes=65536, max_depth=32))
        inproc.append(time.perf_counter() - t)
    pool = SandboxPool(workers=1, limits=SandboxLimits())
    pool.load("b", SCRIPT, {})
    for _ in range(50):
        pool.call("b", "create", PAYLOAD, CONTEXT)
    worker = []
    for _ in range(calls):
        t = time.perf_counter()
        pool.call("b", "create", PAYLOAD, CONTEXT)
        worker.append(time.perf_counter() - t)
    pool.close()
    return {"in_process_p50_us": pct(inproc, .5), "in_process_p99_us": pct(inproc, .99),
            "worker_pool_p50_us": pct(worker, .5), "worker_pool_p99_us": pct(worker, .99)}


async def drive(base: str, headers: dict, seconds: float, connections: int = 16) -> tuple[int, list[float]]:
    done, lat = 0, []
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=10,
                                 limits=httpx.Limits(max_connections=connections)) as c:
        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await c.post("/ssa", json={"org_id": "o"}, headers=headers)
                assert r.status_code == 201, r.text
                lat.append(time.perf_counter() - t)
                done += 1
        await asyncio.gather(*[loop() for _ in range(connections)])
    return done, lat


def rps(scripts: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data, sdir = Path(tmp) / "data", Path(tmp) / "scripts"
        sdir.mkdir()
        for i in range(scripts):
            (sdir / f"s{i}.py").write_text(SCRIPT)
        made = cli(data, "clients", "create", "--scope", ADMIN)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "ssa_server", "serve", "--port", str(port),
                                 "--data-dir", str(data), "--scripts-dir", str(sdir)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=base) as http:
                for _ in range(300):
                    try:
                        if http.get("/health/ready").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.05)
                token = http.post("/token", data={"grant_type": "client_credentials"},
                                  auth=(made["client_id"], made["client_secret"])).json()["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            asyncio.run(drive(base, headers, 1.0))  # warm-up
            done, lat = asyncio.run(drive(base, headers, seconds))
        finally:
            proc.kill()
            proc.wait()
    return {"scripts": scripts, "rps": round(done / seconds, 1), "p50_ms": round(pct(lat, .5) / 1000, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    o = overhead(args.calls)
    runs = [rps(n, args.seconds) for n in (0, 1, 5)]
    print("per call (us):", o)
    for r in runs:
        print(f"create with {r['scripts']} scripts: {r['rps']} req/s, p50 {r['p50_ms']} ms "
              f"({r['rps'] / runs[0]['rps']:.2f} x no scripts)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scripts.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "per_call": o, "create": runs}, indent=2))


if __name__ == "__main__":
    main()
