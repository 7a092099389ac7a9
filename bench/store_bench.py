"""The embedded store against stock TinyDB (JSONStorage), as the number of stored SSAs grows.

    python bench/store_bench.py [--sizes 1000,50000]

Per size: p50/p99 of a durable insert (fsync) and of a lookup by jti and by org_id.  Stock
TinyDB rewrites its whole file per insert, so it gets fewer iterations (it would take minutes).
Writes ``bench/results/store.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from tinydb import Query, TinyDB

from ssa_server.ssa import CreateRequest, record_from_request
from ssa_server.store.tiny import TinyStore

RESULTS = Path(__file__).parent / "results"


def record(i: int) -> dict:
    request = CreateRequest(org_id=f"org-{i // 10}", description="bench", software_id=f"s{i}",
                            software_roles=["password"], grant_types=["client_credentials"])
    return dict(record_from_request(request, now=int(time.time()), expiration_in_days=1, creator_id="bench",
                                    issuer="http://bench"))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 3)


async def ours(n: int, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        s = TinyStore(tmp)
        await s.open()
        rows = [record(i) for i in range(n)]
        for k in range(0, n, 10_000):
            await s.add_ssas(rows[k:k + 10_000])
        ins, by_jti, by_org = [], [], []
        for i in range(iters):
            r = record(n + i)
            t = time.perf_counter()
            await s.add_ssa(r)
            ins.append(time.perf_counter() - t)
            t = time.perf_counter()
            await s.get_ssa(rows[(i * 7919) % n]["jti"])
            by_jti.append(time.perf_counter() - t)
            t = time.perf_counter()
            await s.find_ssas(org_id=f"org-{i % (n // 10)}")
            by_org.append(time.perf_counter() - t)
        await s.close()
        t = time.perf_counter()
        s = TinyStore(tmp)
        await s.open()
        reopen = time.perf_counter() - t
        await s.close()
    return {"insert_p50_ms": pct(ins, .5), "insert_p99_ms": pct(ins, .99), "get_jti_p50_ms": pct(by_jti, .5),
            "find_org_p50_ms": pct(by_org, .5), "open_s": round(reopen, 2)}


def stock(n: int, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "db.json")
        rows = [record(i) for i in range(n)]
        with open(path, "w") as f:
            json.dump({"_default": {str(i + 1): r for i, r in enumerate(rows)}}, f)
        db = TinyDB(path)
        q = Query()
        ins, by_jti = [], []
        for i in range(iters):
            t = time.perf_counter()
            db.insert(record(n + i))
            ins.append(time.perf_counter() - t)
            t = time.perf_counter()
            db.search(q.jti == rows[(i * 7919) % n]["jti"])
            by_jti.append(time.perf_counter() - t)
        db.close()
    return {"insert_p50_ms": pct(ins, .5), "get_jti_p50_ms": pct(by_jti, .5), "iterations": iters}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,50000")
    p.add_argument("--iters", type=int, default=500)
    args = p.parse_args()
    rows = []
    for n in map(int, args.sizes.split(",")):
        rows.append({"stored": n, "ours": asyncio.run(ours(n, args.iters)),
                     "stock_tinydb": stock(n, max(5, min(args.iters, 20_000 // max(1, n // 100))))})
    print(f"{'stored':>7} | {'ours insert p50':>15} {'p99':>7} {'get p50':>8} {'org p50':>8} {'open s':>6} | "
          f"{'stock insert p50':>16} {'stock get p50':>13}  (ms)")
    for r in rows:
        o, s = r["ours"], r["stock_tinydb"]
        print(f"{r['stored']:>7} | {o['insert_p50_ms']:>15} {o['insert_p99_ms']:>7} {o['get_jti_p50_ms']:>8} "
              f"{o['find_org_p50_ms']:>8} {o['open_s']:>6} | {s['insert_p50_ms']:>16} "
              f"{s['get_jti_p50_ms']:>13}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "store.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                                    "machine": f"{platform.machine()} {os.cpu_count()} cores",
                                                    "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
