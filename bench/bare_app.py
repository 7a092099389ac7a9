"""The ``bare_rps`` reference: one JSON route on Starlette, served the way ``ssa-server serve`` serves.

    python -m bench.bare_app --port 8099

Same uvicorn settings as ``core/cli.py``'s ``cmd_serve``: one process, host 127.0.0.1, the default
loop and HTTP implementations (uvloop + httptools where installed), access log off,
``lifespan="off"``, no server header, the loop from ``config.get_loop_factory()``.
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def ready(request: Request) -> JSONResponse:
    return JSONResponse({"status": "UP"})


app = Starlette(routes=[Route("/", ready, methods=["GET", "POST"])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            proxy_headers=False, lifespan="off", server_header=False)
    server = uvicorn.Server(config)
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(server.serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
