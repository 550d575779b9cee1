"""Benchmark: `poll --once` catch-up throughput from the stand-in HAPI with 50,000 changes.

Run: `.venv/bin/python benchmarks/poll.py [--changes 50000] [--append-readme]`

The stand-in HAPI runs in its own process (as HAPI would), seeded through its direct Python
methods with realistic Patients, Conditions and Observations (creates, updates, deletes),
and serves `_history` on loopback. This process runs `poll_once` against it with the real
FhirClient and a real Redis (`BENCH_REDIS_URL`, default db 14, flushed before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import random
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from receiver.settings import Settings
from receiver.store import SpeedStore
from subscriptions.fhir_client import FhirClient
from subscriptions.poller import HISTORY_COUNT, poll_once

BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
README = Path(__file__).with_name("README.md")

SNOMED = [
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195967001", "Asthma"),
    ("13645005", "Chronic obstructive lung disease"),
    ("49436004", "Atrial fibrillation"),
]
LOINC = [
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4.0, 11.0),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 60.0, 250.0),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 90.0, 190.0),
    ("29463-7", "Body weight", "kg", 40.0, 140.0),
]


def patient(n: int, rnd: random.Random) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"pat-{n}",
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": f"MRN{n:08d}"}],
        "active": True,
        "name": [
            {
                "use": "official",
                "family": rnd.choice(["Smith", "Müller", "Garcia", "Nguyen", "Okafor"]),
                "given": [rnd.choice(["Anna", "Ben", "Chloé", "Dev", "Eva"])],
            }
        ],
        "telecom": [{"system": "phone", "value": f"+41 44 {n % 1000:03d} {n % 97:02d} 00"}],
        "gender": rnd.choice(["male", "female", "other", "unknown"]),
        "birthDate": f"{rnd.randint(1930, 2020)}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}",
        "address": [{"city": "Zürich", "postalCode": f"80{n % 100:02d}", "country": "CH"}],
    }


def condition(n: int, rnd: random.Random) -> dict[str, Any]:
    code, display = rnd.choice(SNOMED)
    return {
        "resourceType": "Condition",
        "id": f"cond-{n}",
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "verificationStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "code": "confirmed",
                }
            ]
        },
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "problem-list-item",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}],
            "text": display,
        },
        "subject": {"reference": f"Patient/pat-{n}"},
        "onsetDateTime": f"{rnd.randint(1990, 2025)}-0{rnd.randint(1, 9)}-15",
        "recordedDate": "2025-06-01",
    }


def observation(n: int, rnd: random.Random) -> dict[str, Any]:
    code, display, unit, low, high = rnd.choice(LOINC)
    return {
        "resourceType": "Observation",
        "id": f"obs-{n}",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
        "subject": {"reference": f"Patient/pat-{n}"},
        "effectiveDateTime": f"2025-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}T08:30:00Z",
        "valueQuantity": {
            "value": round(rnd.uniform(low, high), 1),
            "unit": unit,
            "system": "http://unitsofmeasure.org",
            "code": unit,
        },
    }


async def seed(hapi: Any, changes: int) -> None:
    rnd = random.Random(42)
    creates = int(changes * 0.9) // 3 * 3
    per_type = creates // 3
    for n in range(per_type):
        await hapi.update(patient(n, rnd))
        await hapi.update(condition(n, rnd))
        await hapi.update(observation(n, rnd))
    left = changes - creates
    deletes = left // 5
    for _ in range(left - deletes):  # updates: new values for existing Observations
        await hapi.update(observation(rnd.randrange(per_type), rnd))
    deleted = rnd.sample(range(per_type), deletes)
    for n in deleted:
        await hapi.delete("Condition", f"cond-{n}")


def standin_process(changes: int, page_size: int, conn: Connection) -> None:
    from subscriptions.standin import StandInHapi, serve_standin

    async def main() -> None:
        hapi = StandInHapi(max_page_size=page_size)
        started = time.perf_counter()
        await seed(hapi, changes)
        seeded = time.perf_counter() - started
        async with serve_standin(hapi) as base_url:
            conn.send((base_url, len(hapi._log), len(hapi.resources), seeded))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    asyncio.run(main())


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return f"nproc {os.cpu_count()}, {cpu}, RAM {ram}, Python {platform.python_version()}"


async def run(changes: int, page_size: int) -> dict[str, Any]:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(
        target=standin_process, args=(changes, page_size, child), daemon=True
    )
    proc.start()
    base_url, changes, resources, seeded = parent.recv()
    print(f"stand-in HAPI at {base_url}: {changes} changes, {resources} resources ({seeded:.1f} s)")
    redis = aioredis.Redis.from_url(BENCH_REDIS_URL)
    await redis.flushdb()
    try:
        store = SpeedStore(redis)
        await store.mark_epoch()  # a running speed layer: what the poll writes counts as missed
        settings = Settings(redis_url=BENCH_REDIS_URL, fhir_base_url=base_url)
        last = [0.0]

        def progress(read: int) -> None:
            now = time.perf_counter()
            if now - last[0] > 2:
                last[0] = now
                print(f"  ... {read} resources read")

        async with FhirClient(base_url) as client:
            started = time.perf_counter()
            result = await poll_once(settings, store, client, progress=progress)
            seconds = time.perf_counter() - started
    finally:
        await redis.flushdb()
        await redis.aclose()
        parent.send("stop")
        proc.join(10)
    return {
        "changes": changes,
        "resources": resources,
        "read": result.read,
        "written": result.written,
        "deletes": result.deletes,
        "missed": result.missed,
        "seconds": seconds,
        "page_size": min(HISTORY_COUNT, page_size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--changes", type=int, default=50_000)
    parser.add_argument("--page-size", type=int, default=200, help="HAPI's max_page_size")
    parser.add_argument("--append-readme", action="store_true")
    args = parser.parse_args()
    numbers = asyncio.run(run(args.changes, args.page_size))
    per_s = numbers["read"] / numbers["seconds"]
    changes_s = numbers["changes"] / numbers["seconds"]
    print(
        f"poll --once: {numbers['changes']} changes ({numbers['read']} resources, "
        f"{numbers['written']} written, {numbers['deletes']} tombstones) in "
        f"{numbers['seconds']:.1f} s = {per_s:,.0f} resources/s "
        f"({changes_s:,.0f} history entries/s), pages of {numbers['page_size']}"
    )
    if args.append_readme:
        text = README.read_text() if README.exists() else ""
        if not text:
            text = f"# Benchmarks\n\nMachine: {machine()}\n"
        text += (
            f"\n## poll --once catch-up ({time.strftime('%Y-%m-%d')})\n\n"
            f"`benchmarks/poll.py`: stand-in HAPI in its own process, {numbers['changes']:,} "
            f"changes (Patient/Condition/Observation creates, Observation updates, Condition "
            f"deletes), `_history` pages of {numbers['page_size']}, real Redis.\n\n"
            f"- {numbers['read']:,} resources read ({numbers['written']:,} written, "
            f"{numbers['deletes']:,} tombstones) in {numbers['seconds']:.1f} s\n"
            f"- **{per_s:,.0f} resources/s** ({changes_s:,.0f} history entries/s); "
            f"target ≥ 5,000 resources/s\n"
            f"- machine: {machine()}\n"
        )
        README.write_text(text)


if __name__ == "__main__":
    main()
