"""Benchmark: the incremental `batch refresh` against the old full recompute, in one run.

Run: `.venv/bin/python benchmarks/batch.py [--sizes 5000,50000] [--changes 500]
[--large 1000000] [--large-changes 10000] [--no-large-baseline] [--append-readme]`

For each size (and `--large`): a fresh database (on `BENCH_PG_ADMIN_URL`'s server, dropped
afterwards), `size` resources (a third each of Patients, Conditions, Observations) built in
SQL (benchmarks/synthetic.py) at version 0, `batch init` (each view's table filled and
indexed), and a stand-in HAPI (in this process, on loopback) holding `changes` new versions
of held resources (a third of each type). Timed:

- **incremental**: `refresh()`, end to end: HAPI's `_history`, every resource through the
  validation gate, staging, then one transaction with the upsert, each view's rows of the
  changed resources replaced, counts and watermark (`apply` is that transaction alone);
- **full rebuild** (`--large` only): every view recomputed in one transaction, what
  `batch refresh --full` does to the views after reading HAPI (`batch.rebuild_views`);
- **old full recompute** (baseline, same data, same run): the views as the previous release
  kept them, materialized views with a unique index, `REFRESH MATERIALIZED VIEW
  CONCURRENTLY` of each one whose type changed, over the same changed resources.
"""

from __future__ import annotations

import sys
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks import common, synthetic
from core.serve import serve_asgi
from core.settings import Settings
from serving import batch
from serving.batch_refresh import refresh
from subscriptions.fhir_client import FhirClient
from subscriptions.standin.hapi import StandInHapi

ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://127.0.0.1:5432/postgres")
README = Path(__file__).with_name("README.md")
OLD = "rf_old"  # the schema of the previous release's materialized views (the baseline)


def create_database() -> str:
    name = f"rf_bench_batch_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def build(url: str, size: int) -> float:
    """Schema, `size` resources at version 0, then `batch init` (tables filled); seconds."""
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        conn.execute(batch.SCHEMA_SQL.encode())
        third = size // 3
        synthetic.load(conn, size - 2 * third, third, third, version=0)
        conn.execute(
            "INSERT INTO rf_batch.watermark VALUES (1, '2000-01-01T00:00:00Z', now(),"
            " (SELECT count(*) FROM rf_batch.resources))"
        )
    batch.init(url)
    return time.perf_counter() - started


def build_old_views(url: str) -> float:
    """The previous release's materialized views over the same resources; seconds."""
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        conn.execute(f"CREATE SCHEMA {OLD}".encode())
        for name, query in conn.execute("SELECT name, rebuild_sql FROM rf_batch.views").fetchall():
            target = sql.Identifier(OLD, name)
            conn.execute(
                sql.SQL(
                    "CREATE MATERIALIZED VIEW {} AS SELECT _q.*, row_number() OVER (PARTITION BY"
                    " _q._resource_id ORDER BY _q::text) AS _row FROM ({}) AS _q"
                ).format(target, sql.SQL(query))
            )
            conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} (_resource_id, _row)").format(target))
            conn.execute(sql.SQL("ANALYZE {}").format(target))
    return time.perf_counter() - started


def old_refresh(url: str, types: set[str]) -> float:
    """REFRESH MATERIALIZED VIEW CONCURRENTLY of the old views of `types`, one transaction."""
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        for name, rtype in conn.execute(
            "SELECT name, definition->>'resource' FROM rf_batch.views"
        ).fetchall():
            if rtype in types:
                conn.execute(
                    sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(
                        sql.Identifier(OLD, name)
                    )
                )
    return time.perf_counter() - started


def full_rebuild(url: str) -> tuple[float, dict[str, int]]:
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        rows = batch.rebuild_views(conn)
    return time.perf_counter() - started, rows


def changed(n: int, size: int) -> dict[str, Any]:
    """Change number n: a new version of a held resource, the three types in turn."""
    third = size // 3
    kind, k = n % 3, (n // 3 * 7919) % max(third, 1)
    if kind == 0:
        return {"resourceType": "Patient", "id": f"p{k}", "gender": "female",
                "birthDate": f"{1950 + n % 50}-0{1 + n % 9}"}  # fmt: skip
    if kind == 1:
        return {"resourceType": "Condition", "id": f"c{k}",
                "subject": {"reference": f"Patient/p{(k * 31) % third}"},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "100007"}],
                         "text": f"Chronic heart failure, stage {n % 4}"}}  # fmt: skip
    return {"resourceType": "Observation", "id": f"o{k}", "status": "final",
            "subject": {"reference": f"Patient/p{k}"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "valueQuantity": {"value": 5 + n % 50 / 10, "unit": "%"}}  # fmt: skip


async def bench(size: int, changes: int, *, large: bool, baseline: bool) -> dict[str, Any]:
    url = create_database()
    hapi = StandInHapi()
    out: dict[str, Any] = {"size": size, "changes": changes}
    try:
        out["build"] = build(url, size)
        if large:
            out["full"], out["rows"] = full_rebuild(url)
        if baseline:
            out["old_build"] = build_old_views(url)
        for n in range(changes):
            await hapi.update(changed(n, size))
        async with serve_asgi(hapi.app, path="/fhir") as base_url:
            hapi.base_url = base_url
            async with FhirClient(base_url) as client:
                settings = Settings(database_url=url, fhir_base_url=base_url)
                started = time.perf_counter()
                result = await refresh(settings, client=client)
                out["incremental"] = time.perf_counter() - started
        out["apply"], out["changed"] = result.apply_seconds, result.changed
        if baseline:
            out["old"] = old_refresh(url, {"Patient", "Condition", "Observation"})
        print(
            f"{size:>9,} resources, {changes:,} changes: incremental refresh"
            f" {out['incremental']:6.2f} s (apply {out['apply']:5.2f} s, {result.changed:,}"
            f" changed)"
            + (f"; full rebuild {out['full']:6.1f} s" if large else "")
            + (f"; old full recompute {out['old']:6.1f} s" if baseline else "")
            + f"; built in {out['build']:.1f} s",
            flush=True,
        )
        return out
    finally:
        await hapi.aclose()
        drop_database(url)


def machine() -> str:
    with psycopg.connect(ADMIN_URL) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    pg = row[0] if row else "?"
    return f"{common.machine()}, PostgreSQL {pg}, load average {os.getloadavg()[0]:.1f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,50000")
    parser.add_argument("--changes", type=int, default=500)
    parser.add_argument("--large", type=int, default=0, help="e.g. 1000000 (0: skip)")
    parser.add_argument("--large-changes", type=int, default=10_000)
    parser.add_argument("--no-large-baseline", action="store_true")
    parser.add_argument("--append-readme", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    results = [
        await bench(int(s), args.changes, large=False, baseline=True)
        for s in args.sizes.split(",")
        if s
    ]
    if len(results) >= 2:
        small, big = results[0], results[-1]
        print(
            f"ratio {big['size']:,} / {small['size']:,}: incremental"
            f" {big['incremental'] / small['incremental']:.2f} (apply"
            f" {big['apply'] / small['apply']:.2f}); old full recompute"
            f" {big['old'] / small['old']:.2f}",
            flush=True,
        )
    if args.large:
        results.append(
            await bench(
                args.large, args.large_changes, large=True, baseline=not args.no_large_baseline
            )
        )
    if args.append_readme:
        append_readme(results)


def append_readme(results: list[dict[str, Any]]) -> None:
    day = datetime.now(UTC).date().isoformat()
    lines = ["", f"## batch refresh, incremental (`benchmarks/batch.py`, {day})", ""]
    for r in results:
        line = (
            f"- {r['size']:,} resources, {r['changes']:,} changes: incremental refresh"
            f" **{r['incremental']:.2f} s** (its one transaction {r['apply']:.2f} s)"
        )
        if "full" in r:
            line += f"; full rebuild **{r['full']:.1f} s** (rows {r['rows']})"
        if "old" in r:
            line += f"; old full recompute {r['old']:.1f} s"
        lines.append(line)
    lines.append(f"- machine: {machine()}")
    with README.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
