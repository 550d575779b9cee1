"""Benchmark: `batch refresh` over 100,000 and 1,000,000 resources, and a 10,000-change sync.

Run: `.venv/bin/python benchmarks/batch.py [--sizes 100000,1000000] [--changes 10000]
[--append-readme]`

For each size: a fresh database (on `BENCH_PG_ADMIN_URL`'s server, dropped afterwards),
`batch init`, synthetic Patients, Conditions and Observations (a third each) loaded into
rf_batch.resources with COPY, then `refresh()` against a stand-in HAPI that has nothing new:
the time is the views' work (REFRESH MATERIALIZED VIEW CONCURRENTLY of the three shipped
views, in the refresh's one transaction). Timed twice: the first refresh fills the views
from empty (every row is new), the second finds nothing changed (a quiet night).
Then, over the 100,000, an incremental sync of `--changes` changes from the stand-in HAPI
(served on loopback in this process; creates and updates of the same synthetic resources,
every one through the validation gate) with the views' refresh and the watermark.
"""

from __future__ import annotations

import sys
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import os
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg

from benchmarks import common
from core.fhir_values import parse_instant
from core.serve import serve_asgi
from core.settings import Settings
from serving.batch import init
from serving.batch_refresh import refresh
from subscriptions.fhir_client import FhirClient
from subscriptions.standin.hapi import StandInHapi

ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://127.0.0.1:5432/postgres")
README = Path(__file__).with_name("README.md")
SNOMED = [("44054006", "Diabetes mellitus type 2"), ("38341003", "Hypertensive disorder"),
          ("195967001", "Asthma"), ("49436004", "Atrial fibrillation")]  # fmt: skip
LOINC = [("4548-4", "%", 4.0, 11.0), ("2339-0", "mg/dL", 60.0, 250.0),
         ("8480-6", "mm[Hg]", 90.0, 190.0)]  # fmt: skip


def resource(kind: int, n: int, rnd: random.Random, meta: dict[str, str] | None) -> dict[str, Any]:
    """Patient (kind 0), Condition (1) or Observation (2) number n."""
    out: dict[str, Any]
    if kind == 0:
        out = {
            "resourceType": "Patient",
            "id": f"pat-{n}",
            "gender": rnd.choice(["male", "female", "other", "unknown"]),
            "birthDate": f"{rnd.randint(1930, 2020)}-{rnd.randint(1, 12):02d}-15",
            "name": [{"family": rnd.choice(["Smith", "Garcia", "Nguyen"]), "given": ["Ann"]}],
        }
        if rnd.random() < 0.05:
            out["deceasedDateTime"] = "2024-01-01"
    elif kind == 1:
        code, display = rnd.choice(SNOMED)
        out = {
            "resourceType": "Condition",
            "id": f"cond-{n}",
            "subject": {"reference": f"Patient/pat-{n}"},
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": code,
                                 "display": display}], "text": display},
            "onsetDateTime": f"{rnd.randint(1990, 2024)}-0{rnd.randint(1, 9)}-15",
        }  # fmt: skip
    else:
        code, unit, low, high = rnd.choice(LOINC)
        out = {
            "resourceType": "Observation",
            "id": f"obs-{n}",
            "status": "final",
            "subject": {"reference": f"Patient/pat-{n}"},
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "valueQuantity": {"value": round(rnd.uniform(low, high), 1), "unit": unit},
            "effectiveDateTime": "2024-05-06T07:08:09Z",
        }
    if meta is not None:
        out["meta"] = meta
    return out


def create_database() -> str:
    name = f"rf_bench_batch_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def load(url: str, size: int, version: int = 1) -> float:
    """COPY `size` resources (a third of each type) into rf_batch.resources; seconds taken."""
    rnd = random.Random(size)
    lu = "2025-01-01T00:00:00.000Z"
    lum = parse_instant(lu)
    started = time.perf_counter()
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        columns = "resource_type, id, version_id, version_number, last_updated, last_updated_ms,"
        with cur.copy(f"COPY rf_batch.resources ({columns} resource) FROM STDIN") as copy:  # type: ignore[arg-type]
            for i in range(size):
                kind, n = i % 3, i // 3
                data = resource(kind, n, rnd, {"versionId": str(version), "lastUpdated": lu})
                copy.write_row(
                    (data["resourceType"], data["id"], str(version), float(version), lu, lum,
                     orjson.dumps(data).decode())
                )  # fmt: skip
        conn.execute("ANALYZE rf_batch.resources")
    return time.perf_counter() - started


def views_refresh(url: str) -> float:
    """REFRESH MATERIALIZED VIEW CONCURRENTLY of every view, in one transaction; seconds."""
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        for (name,) in conn.execute("SELECT name FROM rf_batch.views").fetchall():
            conn.execute(f'REFRESH MATERIALIZED VIEW CONCURRENTLY sqlonfhir."{name}"')  # type: ignore[arg-type]
    return time.perf_counter() - started


async def timed_refresh(settings: Settings, client: FhirClient) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await refresh(settings, client=client)
    return time.perf_counter() - started, result


async def bench_size(size: int, base_url: str, client: FhirClient) -> dict[str, Any]:
    url = create_database()
    try:
        init(url)
        loaded = load(url, size)
        settings = Settings(database_url=url, fhir_base_url=base_url)
        # The COPY bypassed the sync, so refresh() would see nothing changed: time the
        # views' refresh the way `_apply` runs it when every type changed.
        first = views_refresh(url)
        second = views_refresh(url)
        quiet, result = await timed_refresh(settings, client)
        out = {"size": size, "load": loaded, "first": first, "second": second,
               "quiet": quiet, "rows": result.views}  # fmt: skip
        print(
            f"{size:>9,} resources: COPY {loaded:6.1f} s; refresh from empty views {first:6.1f} s;"
            f" again, data unchanged {second:6.1f} s; refresh() with nothing new {quiet:5.2f} s;"
            f" rows {result.views}",
            flush=True,
        )
        return out
    finally:
        drop_database(url)


async def bench_incremental(changes: int, base_size: int) -> dict[str, Any]:
    hapi = StandInHapi()
    url = create_database()
    try:
        init(url)
        # Version 0 in the batch: HAPI's first version of the same id is then an update.
        load(url, base_size, version=0)
        rnd = random.Random(7)
        async with serve_asgi(hapi.app, path="/fhir") as base_url:
            hapi.base_url = base_url
            async with FhirClient(base_url) as client:
                settings = Settings(database_url=url, fhir_base_url=base_url)
                await refresh(settings, client=client)  # views filled, watermark set
                # Half updates of resources the batch holds, half new ones.
                for i in range(changes):
                    n = i // 3 if i % 2 else base_size + i
                    await hapi.update(resource(i % 3, n, rnd, None))
                seen: list[int] = []
                elapsed, result = 0.0, None
                started = time.perf_counter()
                result = await refresh(settings, client=client, progress=seen.append)
                elapsed = time.perf_counter() - started
        print(
            f"incremental sync of {changes:,} changes over {base_size:,}: {elapsed:.1f} s"
            f" ({result.read / elapsed:,.0f} resources/s); read {result.read:,},"
            f" changed {result.changed:,}, rejected {result.rejected}",
            flush=True,
        )
        return {"changes": changes, "base": base_size, "seconds": elapsed, "read": result.read,
                "changed": result.changed}  # fmt: skip
    finally:
        await hapi.aclose()
        drop_database(url)


def machine() -> str:
    with psycopg.connect(ADMIN_URL) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    pg = row[0] if row else "?"
    return f"{common.machine()}, PostgreSQL {pg}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--changes", type=int, default=10_000)
    parser.add_argument("--append-readme", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    results = []
    hapi = StandInHapi()
    try:
        async with serve_asgi(hapi.app, path="/fhir") as base_url:
            hapi.base_url = base_url
            async with FhirClient(base_url) as client:
                for size in sizes:
                    results.append(await bench_size(size, base_url, client))
    finally:
        await hapi.aclose()
    incremental = await bench_incremental(args.changes, 100_000)
    if args.append_readme:
        append_readme(results, incremental)


def append_readme(results: list[dict[str, Any]], incremental: dict[str, Any]) -> None:
    day = datetime.now(UTC).date().isoformat()
    lines = [
        "",
        f"## batch refresh ({day})",
        "",
        "`benchmarks/batch.py`: synthetic Patients/Conditions/Observations (a third each) COPYed"
        " into rf_batch.resources, then `refresh()` against a stand-in HAPI with nothing new"
        " (the time is the three views' REFRESH MATERIALIZED VIEW CONCURRENTLY, in the"
        " refresh's one transaction, plus the watermark).",
        "",
    ]
    for r in results:
        lines.append(
            f"- {r['size']:,} resources: **{r['first']:.1f} s** filling the views from empty,"
            f" **{r['second']:.1f} s** recomputed over unchanged data, `refresh()` with nothing"
            f" new {r['quiet']:.2f} s (COPY load {r['load']:.1f} s;"
            f" view rows {r['rows']})"
        )
    lines.append(
        f"- incremental sync of {incremental['changes']:,} changes from the stand-in HAPI over"
        f" {incremental['base']:,} resources (`_history` pages of 200, every resource through"
        f" the validation gate, staging COPY, upsert, views, watermark):"
        f" **{incremental['seconds']:.1f} s**"
        f" ({incremental['read'] / incremental['seconds']:,.0f} resources/s;"
        f" {incremental['changed']:,} rows changed)"
    )
    lines.append(f"- machine: {machine()}")
    with README.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
