"""Benchmark: notifications per second into one receiver process, and latency at 1,000/s.

Run: `.venv/bin/python benchmarks/ingest.py [--seconds 15] [--baseline REV] [--rounds 1]
[--append-readme]`

Servers (each its own process, uvicorn with uvloop + httptools, one worker):
  - `receiver`: the real receiver app (validation, derived view rows, version-guarded Lua
    write to a real Redis: `BENCH_REDIS_URL`, default db 13, flushed before and after), of
    this checkout and, in the same run, of commit REV (default `benchmarks.memory.BASELINE`,
    the key schema before the record layout) from a temporary git worktree; `--rounds`
    alternates the two so a busy moment of a shared machine hits both alike;
  - `receiver_fsync`: this checkout's receiver on a private Redis with `appendfsync always`;
  - `bare`: a Starlette handler that only parses the JSON body and answers 204 (the
    baseline, measured in the same run).
The load generator is a third process with a minimal keep-alive HTTP/1.1 client (httpx
would be the bottleneck), sending realistic HAPI-shaped PUTs of Patients, Conditions and
Observations, each a new id or a new version. Note: the 2 cores are shared by the load
generator, the server and Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Any

from benchmarks.common import machine

BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
README = Path(__file__).with_name("README.md")
TOKEN = "bench-token"


def mixed(n: int, rnd: random.Random) -> dict[str, Any]:
    """The benchmarks' mix, resource `n` of it: Patient p<n>, then Condition c<n+1> and
    Observation o<n+2> of that patient, repeating (`subscriptions.standin.synthetic`)."""
    from subscriptions.standin import synthetic

    kind = n % 3
    if kind == 0:
        return synthetic.patient(n, rnd)
    if kind == 1:
        return synthetic.condition(n, n - 1, rnd)
    return synthetic.observation(n, n - 2, rnd)


def bodies(count: int, seed: int = 5) -> list[tuple[str, bytes]]:
    """(path, body) pairs: realistic resources, each a new id (or a newer version)."""
    rnd = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    for n in range(count):
        resource = mixed(n, rnd)
        resource["meta"] = {"versionId": "1", "lastUpdated": "2026-11-25T10:00:00.000+00:00"}
        out.append(
            (f"/fhir/{resource['resourceType']}/{resource['id']}", json.dumps(resource).encode())
        )
    return out


# -- servers -------------------------------------------------------------------------------


def serve_on(app: Any, port: int) -> None:
    """Serve `app` on 127.0.0.1:`port` until the process ends, as the services run (uvloop,
    httptools, no access log)."""
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


def serve_receiver(port: int, redis_url: str = BENCH_REDIS_URL) -> None:

    from core.settings import Settings
    from receiver.app import create_app
    from serving.derive import default_deriver

    async def no_hapi(resource_type: str, resource_id: str) -> None:
        return None

    from researchflow_cli import freeze_startup_objects

    settings = Settings(redis_url=redis_url, receiver_tokens=(TOKEN,))
    app = create_app(settings, derive=default_deriver(), latest_version=no_hapi)
    freeze_startup_objects()  # as `researchflow receiver` does
    serve_on(app, port)


# The receiver of a given tree, as `serve_receiver` builds it, in a process of that tree.
_SERVE_RECEIVER = """
import sys
import uvicorn
from core.settings import Settings
from receiver.app import create_app
from researchflow_cli import freeze_startup_objects
from serving.derive import default_deriver

port, url, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]


async def no_hapi(resource_type, resource_id):
    return None


settings = Settings(redis_url=url, receiver_tokens=(token,))
app = create_app(settings, derive=default_deriver(), latest_version=no_hapi)
freeze_startup_objects()
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
            loop="uvloop", http="httptools")
"""


def start_receiver_in(tree: Path, redis_url: str = BENCH_REDIS_URL) -> tuple[Any, int]:
    """The receiver of the checkout at `tree`, serving on a free port: (process, port)."""
    from benchmarks.baseline import popen_in
    from tests.procs import free_port, wait_port

    port = free_port()
    proc = popen_in(tree, _SERVE_RECEIVER, str(port), redis_url, TOKEN)
    wait_port(port, timeout=30)
    return proc, port


def serve_bare(port: int) -> None:
    import orjson
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def put(request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(status_code=204)

    app = Starlette(routes=[Route("/fhir/{type}/{id}", put, methods=["PUT"])])
    serve_on(app, port)


# -- the load generator --------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection that sends PUTs and reads status lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def put(self, path: str, body: bytes) -> int:
        head = (
            f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f'Content-Type: application/fhir+json; charset=UTF-8\r\nIf-Match: "1"\r\n'
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        # One read for the whole head (a 204 has no body): the client stays cheap, so the
        # cores go to the server under test.
        head_bytes = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head_bytes[9:12])
        marker = head_bytes.lower().find(b"content-length:")
        if marker >= 0:
            end = head_bytes.index(b"\r\n", marker)
            length = int(head_bytes[marker + 15 : end])
            if length:
                await self.reader.readexactly(length)
        return status


async def saturate(
    port: int, work: list[tuple[str, bytes]], seconds: float, connections: int
) -> dict[str, Any]:
    conns = [await Connection.open(port) for _ in range(connections)]
    statuses: dict[int, int] = {}
    index = 0
    deadline = time.perf_counter() + seconds

    async def worker(conn: Connection) -> None:
        nonlocal index
        while time.perf_counter() < deadline and index < len(work):
            path, body = work[index]
            index += 1
            status = await conn.put(path, body)
            statuses[status] = statuses.get(status, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - started
    for c in conns:
        c.writer.close()
    done = sum(statuses.values())
    return {
        "requests": done,
        "seconds": elapsed,
        "per_second": done / elapsed,
        "statuses": statuses,
    }


async def fixed_rate(
    port: int, work: list[tuple[str, bytes]], rate: float, seconds: float
) -> dict[str, Any]:
    pool = [await Connection.open(port) for _ in range(64)]
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for c in pool:
        free.put_nowait(c)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    total = int(rate * seconds)
    start = time.perf_counter()

    async def one(n: int) -> None:
        conn = await free.get()
        path, body = work[n]
        t0 = time.perf_counter()
        status = await conn.put(path, body)
        latencies.append(time.perf_counter() - t0)
        statuses[status] = statuses.get(status, 0) + 1
        free.put_nowait(conn)

    tasks = []
    for n in range(total):
        target = start + n / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for c in pool:
        c.writer.close()
    latencies.sort()
    return {
        "requests": len(latencies),
        "achieved_rate": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "max_ms": latencies[-1] * 1000,
        "statuses": statuses,
    }


def load(port: int, mode: str, seconds: float, conn: Any) -> None:
    import uvloop

    work = bodies(200_000 if mode == "saturate" else int(1000 * seconds) + 10)
    if mode == "saturate":
        result = uvloop.run(saturate(port, work, seconds, connections=32))
    else:
        result = uvloop.run(fixed_rate(port, work, 1000.0, seconds))
    conn.send(result)


def run_load(port: int, mode: str, seconds: float) -> dict[str, Any]:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=load, args=(port, mode, seconds, child))
    proc.start()
    result: dict[str, Any] = parent.recv()
    proc.join()
    return result


def start_server(target: Any, *args: Any) -> tuple[multiprocessing.Process, int]:
    from tests.procs import free_port, wait_port

    port = free_port()
    proc = multiprocessing.Process(target=target, args=(port, *args), daemon=True)
    proc.start()
    wait_port(port, timeout=30)
    return proc, port


def flush_redis() -> None:
    import redis

    redis.Redis.from_url(BENCH_REDIS_URL).flushdb()


def measure(proc: Any, port: int, seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Warm up, then saturate, then 1,000/s: (saturated, fixed-rate) results; stops `proc`."""
    try:
        run_load(port, "saturate", 2.0)  # warm up
        flush_redis()
        saturated = run_load(port, "saturate", seconds)
        flush_redis()
        return saturated, run_load(port, "rate", seconds)
    finally:
        proc.terminate()
        if isinstance(proc, multiprocessing.Process):
            proc.join()
        else:
            proc.wait()
        flush_redis()


def main() -> None:
    from benchmarks.baseline import ROOT, checkout, describe
    from benchmarks.memory import BASELINE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--baseline", default=BASELINE, help="commit to measure beside this one")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--append-readme", action="store_true")
    parser.add_argument("--shared", action="store_true", help="others used the machine meanwhile")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg()}
    results["shared"] = args.shared
    from tests.procs import RedisProcess

    # The durable variant: a private Redis that fsyncs every write before answering.
    durable = RedisProcess(None, "--appendonly", "yes", "--appendfsync", "always").start()
    runs: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    try:
        with checkout(args.baseline) as old_tree:
            results["commits"] = {"before": describe(old_tree), "this": describe(ROOT)}
            flush_redis()
            runs.append(("bare", *measure(*start_server(serve_bare), args.seconds)))
            for _ in range(args.rounds):
                for name, tree in (("before", old_tree), ("this", ROOT)):
                    flush_redis()
                    runs.append((name, *measure(*start_receiver_in(tree), args.seconds)))
            proc, port = start_receiver_in(ROOT, durable.url)
            runs.append(("this_fsync", *measure(proc, port, args.seconds)))
    finally:
        durable.stop()
    results["load_after"] = os.getloadavg()
    results["runs"] = runs
    print(json.dumps(results, indent=2))
    if args.append_readme:
        append_readme(results, args.seconds)


def shared_note(results: dict[str, Any]) -> str:
    """The load averages around a run, and whether others used the machine meanwhile."""
    text = (
        f"Load average {results['load_before'][0]:.1f} before, {results['load_after'][0]:.1f} after"
    )
    if results.get("shared"):
        return text + ": the machine was shared with other engineers at the time."
    return text + "."


def append_readme(results: dict[str, Any], seconds: float) -> None:
    labels = {
        "bare": "bare Starlette, JSON parse only (baseline)",
        "before": "receiver at `before`",
        "this": "receiver at `this`",
        "this_fsync": "receiver at `this`, Redis with `appendfsync always` (private server)",
    }
    commits = results["commits"]
    lines = [
        "",
        f"## Ingest (`benchmarks/ingest.py`, {time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {results['machine']}. One uvicorn worker (uvloop, httptools) per server;"
        f" load generator and Redis on the same 2 cores. {shared_note(results)}"
        f" {seconds:.0f} s per measurement, realistic Patient/Condition/Observation PUTs as"
        " HAPI sends them, each a new resource; the two commits alternate, in the order"
        " listed.",
        "",
        f"- before: `{commits['before']}`",
        f"- this: `{commits['this']}`",
        "",
        "| server | saturated writes/s (32 connections) | at 1,000/s: p50 | p99 | max |"
        " statuses (saturated; 1,000/s) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, sat, rate in results["runs"]:
        lines.append(
            f"| {labels[name]} | {sat['per_second']:,.0f} | {rate['p50_ms']:.2f} ms | "
            f"{rate['p99_ms']:.2f} ms | {rate['max_ms']:.1f} ms | {sat['statuses']}; "
            f"{rate['statuses']} |"
        )
    lines += [
        "",
        "Targets: at least 3,500 validated writes/s per process; p99 at most 10 ms at 1,000/s.",
        "",
    ]
    with README.open("a") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    main()
