"""Benchmark: notifications per second into one receiver process, and latency at 1,000/s.

Run: `.venv/bin/python benchmarks/ingest.py [--seconds 15] [--append-readme]`

Servers (each its own process, uvicorn with uvloop + httptools, one worker):
  - `receiver`: the real receiver app (validation, derived view rows, version-guarded Lua
    write to a real Redis: `BENCH_REDIS_URL`, default db 13, flushed before and after);
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


def bodies(count: int, seed: int = 5) -> list[tuple[str, bytes]]:
    """(path, body) pairs: realistic resources, each a new id (or a newer version)."""
    from subscriptions.standin import synthetic

    rnd = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    for n in range(count):
        kind = n % 3
        if kind == 0:
            resource = synthetic.patient(n, rnd)
        elif kind == 1:
            resource = synthetic.condition(n, n - 1, rnd)
        else:
            resource = synthetic.observation(n, n - 2, rnd)
        resource["meta"] = {"versionId": "1", "lastUpdated": "2026-11-25T10:00:00.000+00:00"}
        out.append(
            (f"/fhir/{resource['resourceType']}/{resource['id']}", json.dumps(resource).encode())
        )
    return out


# -- servers -------------------------------------------------------------------------------


def serve_receiver(port: int, redis_url: str = BENCH_REDIS_URL) -> None:
    import uvicorn

    from core.settings import Settings
    from receiver.app import create_app
    from serving.derive import default_deriver

    async def no_hapi(resource_type: str, resource_id: str) -> None:
        return None

    from researchflow_cli import freeze_startup_objects

    settings = Settings(redis_url=redis_url, receiver_tokens=(TOKEN,))
    app = create_app(settings, derive=default_deriver(), latest_version=no_hapi)
    freeze_startup_objects()  # as `researchflow receiver` does
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


def serve_bare(port: int) -> None:
    import orjson
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def put(request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(status_code=204)

    app = Starlette(routes=[Route("/fhir/{type}/{id}", put, methods=["PUT"])])
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--append-readme", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine()}
    from tests.procs import RedisProcess

    # The durable variant: a private Redis that fsyncs every write before answering.
    durable = RedisProcess(None, "--appendonly", "yes", "--appendfsync", "always").start()
    servers: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("bare", serve_bare, ()),
        ("receiver", serve_receiver, ()),
        ("receiver_fsync", serve_receiver, (durable.url,)),
    ]
    try:
        for name, target, extra in servers:
            flush_redis()
            proc, port = start_server(target, *extra)
            try:
                run_load(port, "saturate", 2.0)  # warm up
                flush_redis()
                results[f"{name}_saturate"] = run_load(port, "saturate", args.seconds)
                flush_redis()
                results[f"{name}_1000"] = run_load(port, "rate", args.seconds)
            finally:
                proc.terminate()
                proc.join()
    finally:
        durable.stop()
    flush_redis()
    print(json.dumps(results, indent=2))
    if args.append_readme:
        r, b = results["receiver_saturate"], results["bare_saturate"]
        r1, b1 = results["receiver_1000"], results["bare_1000"]
        f, f1 = results["receiver_fsync_saturate"], results["receiver_fsync_1000"]
        section = f"""
## Ingest (`benchmarks/ingest.py`, {time.strftime("%Y-%m-%d")})

Machine: {results["machine"]}. One uvicorn worker (uvloop, httptools) per server; load
generator and Redis on the same 2 cores. {args.seconds:.0f} s per measurement, realistic
Patient/Condition/Observation PUTs as HAPI sends them, each a new resource.

| server | saturated writes/s (32 connections) | at 1,000/s: p50 | p99 | max |
| --- | ---: | ---: | ---: | ---: |
| bare Starlette, JSON parse only (baseline) | {b["per_second"]:,.0f} | {b1["p50_ms"]:.2f} ms | {b1["p99_ms"]:.2f} ms | {b1["max_ms"]:.1f} ms |
| receiver: validate + derive rows + Lua write to Redis | {r["per_second"]:,.0f} | {r1["p50_ms"]:.2f} ms | {r1["p99_ms"]:.2f} ms | {r1["max_ms"]:.1f} ms |
| receiver, Redis with `appendfsync always` (private server) | {f["per_second"]:,.0f} | {f1["p50_ms"]:.2f} ms | {f1["p99_ms"]:.2f} ms | {f1["max_ms"]:.1f} ms |

Statuses: receiver saturated {r["statuses"]}, at 1,000/s {r1["statuses"]}.
Targets: at least 3,000 validated, durable writes/s per process; p99 at most 10 ms at 1,000/s.
"""
        with README.open("a") as handle:
            handle.write(section)


if __name__ == "__main__":
    main()
