"""Benchmark: Redis bytes per cached resource, this commit's key schema beside another's.

Run: `.venv/bin/python benchmarks/memory.py [--baseline REV] [--counts 12000,120000]
[--append-readme]`

For each commit (REV, default the parent of the first commit that changed the key schema:
`BASELINE` below, and this checkout) and each count, a fresh private redis-server takes the
ingest benchmark's mix (benchmarks/ingest.py `bodies`: a third each Patient, Condition,
Observation, every one a new id) through the real write path of that commit
(`receiver.ingest.ingest`: validation, the shipped views' rows, the store's Lua write), one
at a time in one process. Bytes per resource = INFO memory `used_memory` after minus before,
divided by the entries held; compared with the mean compact JSON (orjson, no spaces) of the
same resources. Past ~25,000 resources a bucket's small hashes stop being listpacks (512
entries), so the larger count is the production regime. The in-process writes/s are a side
note (rough on a shared machine): benchmarks/ingest.py measures the HTTP receiver.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baseline import ROOT, checkout, describe, run_in
from benchmarks.common import machine
from benchmarks.ingest import bodies, shared_note

README = Path(__file__).with_name("README.md")
# The last commit with a hash per resource (before the record layout).
BASELINE = "f8920a4"

# Runs inside the tree under test: only names both key schemas' code has.
_WRITE = """
import asyncio, json, sys, time
import redis
from core.settings import Settings
from core.store import SpeedStore, connect
from receiver.ingest import ingest
from serving.derive import default_deriver

url, path = sys.argv[1], sys.argv[2]
items = []
with open(path, "rb") as handle:
    for line in handle:
        t, i, body = line.rstrip(b"\\n").split(b"\\t", 2)
        items.append((t.decode(), i.decode(), body))

async def main():
    r = redis.Redis.from_url(url)
    client = connect(Settings(redis_url=url))
    store = SpeedStore(client)
    derive = default_deriver()
    before = int(r.info("memory")["used_memory"])
    cpu, wall = time.process_time(), time.perf_counter()
    for t, i, body in items:
        await ingest(store, body, path_type=t, path_id=i, derive=derive)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await store.flush_stats()
    after = int(r.info("memory")["used_memory"])
    types = sorted({t for t, _, _ in items})
    entries = {t: await store.count(t) for t in types}
    await client.aclose()
    print(json.dumps({"before": before, "after": after, "entries": entries,
                      "writes_per_s": len(items) / wall, "cpu_us_per_write": cpu / len(items) * 1e6,
                      "redis": r.info("server")["redis_version"]}))

asyncio.run(main())
"""


def measure(tree: Path, items: list[tuple[str, str, bytes]]) -> dict[str, Any]:
    from tests.procs import RedisProcess

    with tempfile.NamedTemporaryFile("wb", suffix=".tsv") as handle:
        for t, i, body in items:
            handle.write(t.encode() + b"\t" + i.encode() + b"\t" + body + b"\n")
        handle.flush()
        redis_server = RedisProcess(None, "--maxmemory-policy", "noeviction").start()
        try:
            result: dict[str, Any] = json.loads(run_in(tree, _WRITE, redis_server.url, handle.name))
        finally:
            redis_server.stop()
    held = sum(result["entries"].values())
    result["held"] = held
    result["bytes_per_resource"] = (result["after"] - result["before"]) / held
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="commit to measure beside this one")
    parser.add_argument("--counts", default="12000,120000")
    parser.add_argument("--append-readme", action="store_true")
    parser.add_argument("--shared", action="store_true", help="others used the machine meanwhile")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    results: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg()}
    results["shared"] = args.shared
    rows: list[dict[str, Any]] = []
    with checkout(args.baseline) as old_tree:
        trees = [("before", old_tree), ("this", ROOT)]
        results["commits"] = {name: describe(tree) for name, tree in trees}
        for count in counts:
            items = []
            for path, body in bodies(count):
                _, _, t, i = path.split("/")
                items.append((t, i, body))
            compact = statistics.mean(len(orjson.dumps(orjson.loads(b))) for _, _, b in items)
            for name, tree in trees:
                got = measure(tree, items)
                got.update(layout=name, count=count, compact=compact)
                got["ratio"] = got["bytes_per_resource"] / compact
                rows.append(got)
                print(json.dumps(got), flush=True)
    results["load_after"] = os.getloadavg()
    results["rows"] = rows
    print(json.dumps(results, indent=2))
    if args.append_readme:
        append_readme(results)


def append_readme(results: dict[str, Any]) -> None:
    commits = results["commits"]
    lines = [
        "",
        f"## Memory per cached resource (`benchmarks/memory.py`, {time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {results['machine']}; Redis {results['rows'][0]['redis']}, default encoding"
        f" settings, a fresh private server per measurement. {shared_note(results)} Memory"
        " figures are exact; writes/s are rough. The ingest mix (benchmarks/ingest.py `bodies`)"
        " through the real write path (validation, the shipped views' rows, the Lua write), one"
        " process, one at a time.",
        "",
        f"- before: `{commits['before']}`",
        f"- this: `{commits['this']}`",
        "",
        "| key schema | resources | compact JSON B | Redis B/resource | x compact JSON |"
        " in-process writes/s | CPU µs/write |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        name = "hash per resource (before)" if row["layout"] == "before" else "records (this)"
        lines.append(
            f"| {name} | {row['held']:,} | {row['compact']:.0f} | "
            f"**{row['bytes_per_resource']:,.0f}** | **{row['ratio']:.2f}x** | "
            f"{row['writes_per_s']:,.0f} | {row['cpu_us_per_write']:.0f} |"
        )
    lines.append("")
    with README.open("a") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    main()
