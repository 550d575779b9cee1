"""/cohort equals an independent oracle before and after a real `batch refresh`.

Each example is a night and a day on the stand-in HAPI: the night's resources reach the batch
layer through a real `batch refresh --full`; the day's changes reach the speed layer through
the one gate and write path (`receiver.ingest`, the bytes HAPI would send); then `/cohort`
(the query API, lifespan running) must give exactly what `tests.oracle.cohort` computes from
HAPI's final state, and again after a real incremental `batch refresh`. The resources carry
the hard shapes: long decimals (6.50000000000000001), non-ASCII text (ΔΙΑΒΗΤΗΣ, Straße),
partial birth dates, primitive extensions. 300 examples. (The harness and the strategies:
`tests.layers`.)

Also here: the issue's own examples through both layers, `speed get` printing what was
received, and merged paging with speed-only and batch ids interleaved across pages.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import redirect_stdout
from decimal import Decimal
from itertools import pairwise
from typing import Any

import hypothesis.internal.conjecture.optimiser  # noqa: F401  (imported early: imported late, deep in a run, it trips a CPython 3.11.7 AST bug)
import hypothesis.strategies as st
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, event, given, settings

import researchflow_cli
from core.store import SpeedStore
from receiver.ingest import ingest
from serving import batch
from serving.derive import default_deriver
from tests.conftest import fresh_database, redis_db
from tests.layers import AUTH, LOINC, QUERY, SNOMED, Change, Layers, api, ask, changes, layers_of
from tests.oracle import cohort as oracle_cohort

LAYERS_REDIS_URL = redis_db(13)
DERIVE = default_deriver()
QUERIES = st.lists(QUERY, min_size=3, max_size=3)


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database("rf_exact_layers") as url:
        batch.init(url)
        yield url


# --------------------------------------------------------------------------- the property


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(night=changes(4, 12), day=changes(1, 8), queries=QUERIES)
@pytest.mark.timeout(900)
async def test_cohort_equals_the_oracle_before_and_after_a_refresh(
    database: str,
    night: list[Change],
    day: list[Change],
    queries: list[list[tuple[str, str]]],
) -> None:
    async with layers_of(database, LAYERS_REDIS_URL) as layers:
        await layers.night([data for _, _, data in night if data is not None])
        for resource_type, rid, data in day:
            await layers.change(resource_type, rid, data)
        expected = [oracle_cohort(layers.truth(), q) for q in queries]
        async with api(layers) as client:
            for params, want in zip(queries, expected, strict=True):
                got = await ask(client, params)
                event("members" if want else "no members")
                assert got["degraded"] is False
                assert (got["total_count"], got["patient_ids"]) == (len(want), want), params
        await layers.refresh()  # a real incremental refresh: the day moves to the batch layer
        async with api(layers) as client:
            for params, want in zip(queries, expected, strict=True):
                got = await ask(client, params)
                assert (got["total_count"], got["patient_ids"]) == (len(want), want), params


# --------------------------------------------------------------------------- the issue's examples


async def _answers(layers: Layers, queries: list[list[tuple[str, str]]]) -> list[list[str]]:
    async with api(layers) as client:
        return [(await ask(client, q))["patient_ids"] for q in queries]


async def test_the_issues_examples_in_both_layers(database: str) -> None:
    night = [
        {"resourceType": "Patient", "id": "pa", "gender": "female"},
        {"resourceType": "Patient", "id": "pb", "gender": "male"},
        {"resourceType": "Patient", "id": "pc", "gender": "male"},
    ]
    day = [
        (
            "Condition",
            "c1",
            {
                "resourceType": "Condition",
                "id": "c1",
                "subject": {"reference": "Patient/pa"},
                "code": {"text": "ΔΙΑΒΗΤΗΣ"},
            },
        ),
        (
            "Condition",
            "c2",
            {
                "resourceType": "Condition",
                "id": "c2",
                "subject": {"reference": "Patient/pb"},
                "code": {"coding": [{"system": SNOMED, "code": "1", "display": "Straße"}]},
            },
        ),
        (
            "Observation",
            "o1",
            {
                "resourceType": "Observation",
                "id": "o1",
                "status": "final",
                "subject": {"reference": "Patient/pa"},
                "code": {"coding": [{"system": LOINC, "code": "4548-4"}]},
                "valueQuantity": {"value": Decimal("6.50000000000000001"), "unit": "%"},
            },
        ),
        (
            "Observation",
            "o2",
            {
                "resourceType": "Observation",
                "id": "o2",
                "status": "final",
                "subject": {"reference": "Patient/pb"},
                "code": {"coding": [{"system": LOINC, "code": "4548-4"}]},
                "valueQuantity": {"value": Decimal("7.2"), "unit": "%"},
            },
        ),
    ]
    queries = [
        [("condition-text", "διαβητης")],
        [("condition-text", "STRASSE")],
        [("observation", f"{LOINC}|4548-4$gt6.5")],  # 6.50000000000000001 > 6.5
        [("observation", f"{LOINC}|4548-4$gt6.50000000000000001")],
        [("observation", f"{LOINC}|4548-4$eq7")],  # [6.5, 7.5): both
        [("observation", f"{LOINC}|4548-4$eq7.0")],  # [6.95, 7.05): neither
        [("observation", f"{LOINC}|4548-4$eq6.5")],  # [6.45, 6.55)
        [("observation", f"{LOINC}|4548-4$ne7")],
        [("observation", f"{LOINC}|4548-4"), ("observation-value", "le6.5")],
    ]
    want = [["pa"], ["pb"], ["pa", "pb"], ["pb"], ["pa", "pb"], [], ["pa"], [], []]
    async with layers_of(database, LAYERS_REDIS_URL) as layers:
        await layers.night(night)
        for resource_type, rid, data in day:
            await layers.change(resource_type, rid, data)
        assert [oracle_cohort(layers.truth(), q) for q in queries] == want
        assert await _answers(layers, queries) == want  # the speed layer answers
        await layers.refresh()
        assert await _answers(layers, queries) == want  # the batch layer, after a refresh


async def test_speed_get_prints_what_was_received(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = (
        b'{"resourceType":"Observation","id":"o1","status":"final",'
        b'"meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z"},'
        b'"code":{"coding":[{"system":"http://loinc.org","code":"4548-4"}]},'
        b'"valueQuantity":{"value":6.50000000000000001,"unit":"%"}}'
    )
    redis = aioredis.Redis.from_url(LAYERS_REDIS_URL)
    await redis.flushdb()
    try:
        await ingest(SpeedStore(redis), body, path_type="Observation", path_id="o1", derive=DERIVE)
        monkeypatch.setenv("REDIS_URL", LAYERS_REDIS_URL)
        out = io.StringIO()
        with redirect_stdout(out):
            code = await _in_thread(researchflow_cli.main, ["speed", "get", "Observation/o1"])
        assert code == 0
        printed = out.getvalue()
        assert "6.50000000000000001" in printed and "6.5," not in printed
        parsed = json.loads(printed, parse_float=Decimal)
        assert parsed["resource"]["valueQuantity"]["value"] == Decimal("6.50000000000000001")
        assert parsed["state"] == "present" and parsed["version_id"] == "1"
    finally:
        await redis.flushdb()
        await redis.aclose()


async def _in_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)


# --------------------------------------------------------------------------- paging


@pytest.mark.parametrize("with_condition", [False, True], ids=["patients-only", "with-condition"])
async def test_paging_interleaves_speed_only_and_batch_ids(
    database: str, with_condition: bool
) -> None:
    """Batch members p01, p03, ...; speed-only members p02, p04, ...; one batch member taken
    away by the speed layer: every page in id order, each member exactly once."""
    night: list[dict[str, Any]] = []
    for i in range(1, 12, 2):
        night.append({"resourceType": "Patient", "id": f"p{i:02d}", "gender": "male"})
        night.append(_diabetes(f"c{i:02d}", f"p{i:02d}"))
    async with layers_of(database, LAYERS_REDIS_URL) as layers:
        await layers.night(night)
        for i in range(2, 13, 2):
            await layers.change(
                "Patient",
                f"p{i:02d}",
                {"resourceType": "Patient", "id": f"p{i:02d}", "gender": "male"},
            )
            await layers.change("Condition", f"c{i:02d}", _diabetes(f"c{i:02d}", f"p{i:02d}"))
        await layers.change(
            "Patient", "p05", {"resourceType": "Patient", "id": "p05", "gender": "female"}
        )
        members = sorted(f"p{i:02d}" for i in range(1, 13) if i != 5)
        params = [("gender", "male")]
        if with_condition:
            params.append(("condition", f"{SNOMED}|44054006"))
        assert oracle_cohort(layers.truth(), params) == members
        async with api(layers) as client:
            for size in (1, 2, 3, 5):
                seen: list[str] = []
                url: str | None = None
                pages = 0
                query: list[tuple[str, str]] | None = [*params, ("_count", str(size))]
                while True:
                    if query is not None:
                        response = await client.get("/cohort", params=query, headers=AUTH)
                        query = None
                    else:
                        assert url is not None
                        response = await client.get(url, headers=AUTH)
                    body = response.json()
                    assert response.status_code == 200 and body["total_count"] == len(members)
                    assert len(body["patient_ids"]) <= size
                    seen.extend(body["patient_ids"])
                    pages += 1
                    assert pages <= len(members), "the pages do not end"
                    url = body["next"]
                    if url is None:
                        break
                assert seen == members, size  # in order, each once
                assert pages == -(-len(members) // size)
                # the pages really mix the layers: a speed-only id follows a batch id
                assert any(a[-1] in "13579" and b[-1] in "02468" for a, b in pairwise(seen))


def _diabetes(cid: str, pid: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": SNOMED, "code": "44054006"}], "text": "Diabetes"},
    }
