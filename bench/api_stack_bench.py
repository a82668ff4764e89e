"""The node's HTTP API stack: the hand-written h11 server against hypercorn's trio worker with
Starlette (and FastAPI), in memory and import time (issue 13; the node's budget, issue 19, is
100 MB RSS).

Each figure comes from a fresh interpreter (``python -X importtime`` is not used: the wall time
of the import is what a node start pays):

- import: RSS before and after importing the stack, and the import's wall time, both on top
  of what the node imports anyway (``market``, pydantic, trio, h11), and in a bare interpreter;
- serving: RSS of a process (with the node's base imports) that served 500 ``GET /status``
  requests on 127.0.0.1 with each stack, and the request rate of one keep-alive client.

hypercorn, Starlette and FastAPI are not dependencies of the project: point the bench at a
directory they were installed into (``pip install --target DIR hypercorn starlette fastapi``)
with ``--site DIR`` or ``API_STACK_SITE=DIR``; it is appended to ``sys.path``, so what the node
already has (pydantic, trio, h11) comes from the project's environment. Without them the bench
prints why and measures only the current stack.

``python -m bench.api_stack_bench [--site DIR] [--repeat N]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 500

_PROBE = r"""
import json, sys, time
sys.path.append(sys.argv[1]) if sys.argv[1] else None
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
base = sys.argv[2]
for name in filter(None, base.split(",")):
    __import__(name)
before = rss_mb()
t0 = time.perf_counter()
for name in filter(None, sys.argv[3].split(",")):
    __import__(name)
took = time.perf_counter() - t0
print(json.dumps({"rss_before": before, "rss_after": rss_mb(), "import_s": took}))
"""

_SERVE = r"""
import json, socket, sys, threading, time
sys.path.append(sys.argv[1]) if sys.argv[1] else None
stack, requests = sys.argv[2], int(sys.argv[3])
import market, pydantic, sqlalchemy, trio  # what the node imports anyway: every stack on top
DOC = {"node": "did:key:z6Mk" + "x" * 44, "raft": {"role": "leader", "term": 3,
       "applied_index": 123456, "commit_index": 123456}, "ledger": {"height": 42},
       "counters": {f"c{i}": i for i in range(30)}}
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
def client(port, done):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    for _ in range(requests):
        s.sendall(b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < n:
            body += s.recv(65536)
    s.close()
    done.set()
async def main():
    async with trio.open_nursery() as nursery:
        if stack == "h11":
            from node.daemon.http_api import Api
            api = Api(token="t")
            api.route("GET", "/status")(lambda req: DOC)
            port = await nursery.start(api.serve, "127.0.0.1", 0)
        else:
            from hypercorn.config import Config
            from hypercorn.trio import serve
            if stack == "fastapi":
                from fastapi import FastAPI
                app = FastAPI()
                app.get("/status")(lambda: DOC)
            else:
                from starlette.applications import Starlette
                from starlette.responses import JSONResponse
                from starlette.routing import Route
                async def status(request):
                    return JSONResponse(DOC)
                app = Starlette(routes=[Route("/status", status)])
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            config = Config()
            config.bind = [f"127.0.0.1:{port}"]
            config.accesslog = None
            stop = trio.Event()
            nursery.start_soon(lambda: serve(app, config, shutdown_trigger=stop.wait))
            await trio.sleep(0.5)
        done = threading.Event()
        t0 = time.perf_counter()
        await trio.to_thread.run_sync(client, port, done)
        took = time.perf_counter() - t0
        print(json.dumps({"rss": rss_mb(), "req_per_s": requests / took}))
        nursery.cancel_scope.cancel()
trio.run(main)
"""

NODE_BASE = "market,pydantic,trio,h11,sqlalchemy"
STACKS = {
    "h11 (node.daemon.http_api)": "node.daemon.http_api",
    "hypercorn.trio + starlette": "hypercorn.trio,starlette.applications,starlette.routing",
    "hypercorn.trio + fastapi": "hypercorn.trio,fastapi",
}


def _run(code: str, *args: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, check=True, cwd=ROOT, env=env)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    """Print the figures (always exits 0 unless a measurement itself fails)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default=os.environ.get("API_STACK_SITE", ""),
                        help="site-packages dir holding hypercorn, starlette, fastapi")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    site = args.site
    stacks = dict(STACKS)
    try:
        _run(_PROBE, site, "", "hypercorn.trio,starlette,fastapi")
    except subprocess.CalledProcessError:
        why = f"not importable from {site!r}" if site else "no --site / API_STACK_SITE given"
        print(f"skipping hypercorn/starlette/fastapi: {why} "
              "(pip install --target DIR hypercorn starlette fastapi)")  # fmt: skip
        stacks = {k: v for k, v in stacks.items() if k.startswith("h11")}
    print(f"{'stack':30} | {'import on node base':>28} | {'import, bare python':>28}")
    print(f"{'':30} | {'+RSS MB':>9} {'ms':>8} {'RSS MB':>9} | {'+RSS MB':>9} {'ms':>8} "
          f"{'RSS MB':>9}")  # fmt: skip
    for name, modules in stacks.items():
        cols = []
        for base in (NODE_BASE, ""):
            runs = [_run(_PROBE, site, base, modules) for _ in range(args.repeat)]
            grow = statistics.median(r["rss_after"] - r["rss_before"] for r in runs)
            cols.append(f"{grow:9.1f} {_median(runs, 'import_s') * 1000:8.0f} "
                        f"{_median(runs, 'rss_after'):9.1f}")  # fmt: skip
        print(f"{name:30} | {cols[0]} | {cols[1]}")
    print(f"\nserving {REQUESTS} GET /status on one keep-alive connection (RSS at the end):")
    for stack in ("h11", "starlette", "fastapi"):
        if stack != "h11" and len(stacks) == 1:
            continue
        runs = [_run(_SERVE, site, stack, str(REQUESTS)) for _ in range(max(1, args.repeat // 2))]
        print(f"  {stack:10} RSS {_median(runs, 'rss'):6.1f} MB   "
              f"{_median(runs, 'req_per_s'):7.0f} req/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
