"""Soak: a million notifications through one receiver at a steady rate, memory watched.

Run: `.venv/bin/python benchmarks/soak.py [--count 1000000] [--rate 1500] [--append-readme]`

The receiver runs as its own uvicorn process against a real Redis (`BENCH_REDIS_URL`,
default db 12, flushed before and after); a load-generator process sends HAPI-shaped PUTs
(new Patients, Conditions and Observations, and new versions of earlier ones) at a fixed
rate. Every `--every` seconds this process records the receiver's RSS, Redis's used memory,
the entries held and so the bytes per cached resource.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Before importing the ingest benchmark, whose receiver reads it at import.
BENCH_REDIS_URL = os.environ.setdefault("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")

from benchmarks.common import machine  # noqa: E402
from benchmarks.ingest import Connection, mixed, serve_receiver  # noqa: E402

README = Path(__file__).with_name("README.md")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_body(n: int, rnd: random.Random) -> tuple[str, bytes]:
    # One in five notifications is a new version of an earlier resource (an update).
    if n > 10 and rnd.random() < 0.2:
        base = rnd.randrange(n)
        version = 2 + n % 7
    else:
        base, version = n, 1
    resource = mixed(base, rnd)
    resource["meta"] = {
        "versionId": str(version),
        "lastUpdated": f"2026-11-25T10:00:{n % 60:02d}.000+00:00",
    }
    return f"/fhir/{resource['resourceType']}/{resource['id']}", json.dumps(resource).encode()


async def send(port: int, count: int, rate: float, progress: Any) -> dict[str, Any]:
    rnd = random.Random(11)
    pool = [await Connection.open(port) for _ in range(32)]
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for c in pool:
        free.put_nowait(c)
    statuses: dict[int, int] = {}
    start = time.perf_counter()

    async def one(path: str, body: bytes) -> None:
        conn = await free.get()
        status = await conn.put(path, body)
        statuses[status] = statuses.get(status, 0) + 1
        free.put_nowait(conn)

    pending: set[asyncio.Task[None]] = set()
    for n in range(count):
        target = start + n / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(*make_body(n, rnd)))
        pending.add(task)
        task.add_done_callback(pending.discard)
        if n % 10_000 == 0:
            progress.send(n)
    await asyncio.gather(*pending)
    return {"sent": count, "seconds": time.perf_counter() - start, "statuses": statuses}


def load(port: int, count: int, rate: float, conn: Any) -> None:
    import uvloop

    conn.send(("done", uvloop.run(send(port, count, rate, conn))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=1500.0)
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--append-readme", action="store_true")
    args = parser.parse_args()

    import redis

    from tests.procs import free_port, wait_port

    r = redis.Redis.from_url(BENCH_REDIS_URL)
    r.flushdb()
    port = free_port()
    server = multiprocessing.Process(target=serve_receiver, args=(port,), daemon=True)
    server.start()
    wait_port(port, timeout=30)
    parent, child = multiprocessing.Pipe()
    loader = multiprocessing.Process(target=load, args=(port, args.count, args.rate, child))
    started = time.perf_counter()
    loader.start()
    samples: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    sent = 0
    next_sample = 0.0
    try:
        while True:
            if parent.poll(0.5):
                message = parent.recv()
                if isinstance(message, tuple):
                    result = message[1]
                    break
                sent = int(message)
            now = time.perf_counter() - started
            if now >= next_sample:
                next_sample = now + args.every
                used = int(r.info("memory")["used_memory"])
                entries = sum(
                    int(r.hlen(f"rf:{{{t}.{b}}}:e"))
                    for t in ("Patient", "Condition", "Observation")
                    for b in range(16)
                )
                sample = {
                    "t": round(now),
                    "sent": sent,
                    "entries": entries,
                    "redis_mib": round(used / 2**20, 1),
                    "bytes_per_entry": round(used / entries) if entries else None,
                    "receiver_rss_mib": round(rss_mib(server.pid or 0), 1),
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)
        loader.join()
        used = int(r.info("memory")["used_memory"])
        baseline = samples[0]["redis_mib"] * 2**20 if samples else 0
        entries = sum(
            int(r.hlen(f"rf:{{{t}.{b}}}:e"))
            for t in ("Patient", "Condition", "Observation")
            for b in range(16)
        )
        final = {
            "t": round(time.perf_counter() - started),
            "sent": args.count,
            "entries": entries,
            "redis_mib": round(used / 2**20, 1),
            "bytes_per_entry": round((used - baseline) / entries) if entries else None,
            "receiver_rss_mib": round(rss_mib(server.pid or 0), 1),
        }
        samples.append(final)
        print(json.dumps({"result": result, "final": final}), flush=True)
    finally:
        server.terminate()
        server.join()
    if args.append_readme:
        rows = "\n".join(
            f"| {s['t']} | {s['sent']:,} | {s['entries']:,} | {s['redis_mib']} | "
            f"{s['bytes_per_entry'] or '-'} | {s['receiver_rss_mib']} |"
            for s in samples
        )
        achieved = result["sent"] / result["seconds"]
        section = f"""
## Soak (`benchmarks/soak.py`, {time.strftime("%Y-%m-%d")})

Machine: {machine()}. {args.count:,} notifications at a target of {args.rate:,.0f}/s
(achieved {achieved:,.0f}/s over {result["seconds"]:.0f} s; statuses {result["statuses"]}),
one receiver process, realistic resources (80 % new, 20 % new versions of earlier ones).
The last row's bytes per entry excludes Redis's empty baseline.

| seconds | sent | entries held | Redis used MiB | bytes per entry | receiver RSS MiB |
| ---: | ---: | ---: | ---: | ---: | ---: |
{rows}
"""
        with README.open("a") as handle:
            handle.write(section)
    r.flushdb(asynchronous=True)  # gigabytes: freed in the background


if __name__ == "__main__":
    main()
