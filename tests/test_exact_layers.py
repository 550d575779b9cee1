"""/cohort equals an independent oracle before and after a real `batch refresh`.

Each example is a night and a day on the stand-in HAPI: the night's resources reach the batch
layer through a real `batch refresh --full`; the day's changes reach the speed layer through
the one gate and write path (`receiver.ingest`, the bytes HAPI would send); then `/cohort`
(the query API, lifespan running) must give exactly what `tests.oracle.cohort` computes from
HAPI's final state, and again after a real incremental `batch refresh`. The resources carry
the hard shapes: long decimals (6.50000000000000001), non-ASCII text (ΔΙΑΒΗΤΗΣ, Straße),
partial birth dates, primitive extensions. 300 examples.

Also here: the issue's own examples through both layers, `speed get` printing what was
received, and merged paging with speed-only and batch ids interleaved across pages.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import redirect_stdout
from decimal import Decimal
from itertools import pairwise
from typing import Any

import httpx
import hypothesis.internal.conjecture.optimiser  # noqa: F401  (imported early: imported late, deep in a run, it trips a CPython 3.11.7 AST bug)
import hypothesis.strategies as st
import psycopg
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, event, given, settings

import researchflow_cli
from core.fhir_values import dumps
from core.settings import Settings
from core.store import SpeedStore
from receiver.ingest import ingest, ingest_deletion
from serving import batch
from serving.api import create_app
from serving.batch_refresh import refresh
from serving.derive import default_deriver
from subscriptions.fhir_client import FhirClient
from subscriptions.standin.hapi import StandInHapi
from tests.asgi import running
from tests.conftest import fresh_database, redis_db
from tests.oracle import cohort as oracle_cohort

LAYERS_REDIS_URL = redis_db(13)
AUTH = {"Authorization": "Bearer serve"}
DERIVE = default_deriver()
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
PATIENTS = [f"p{i}" for i in range(5)]
CONDITIONS = [f"c{i}" for i in range(4)]
OBSERVATIONS = [f"o{i}" for i in range(4)]
TEXTS = ["ΔΙΑΒΗΤΗΣ", "διαβητης τύπου 2", "Straße", "STRASSE", "Diabetes", "ΟΔΟΣ", "asthma"]
VALUES = [
    Decimal("6.50000000000000001"),
    Decimal("6.5"),
    Decimal("6.49999999999999999"),
    Decimal("7"),
    Decimal("7.0"),
    Decimal("7.2"),
    Decimal("7.45"),
    Decimal("7.5"),
    Decimal("6.95"),
    Decimal("7.05"),
    Decimal("1E+2"),
    7,
]


# --------------------------------------------------------------------------- harness


class Layers:
    """The stand-in HAPI, the speed layer and the batch layer of one example."""

    def __init__(self, database_url: str, redis: aioredis.Redis) -> None:
        self.hapi = StandInHapi()
        self.store = SpeedStore(redis)
        self.settings = Settings(
            redis_url=LAYERS_REDIS_URL,
            database_url=database_url,
            fhir_base_url="http://standin.test/fhir",
            serving_tokens=("serve",),
        )
        transport = httpx.ASGITransport(app=self.hapi.app)
        self.http = httpx.AsyncClient(transport=transport, base_url="http://standin.test")
        self.client = FhirClient(self.settings.fhir_base_url, client=self.http, max_retries=0)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.http.aclose()
        await self.hapi.aclose()

    async def refresh(self, full: bool = False) -> None:
        await refresh(self.settings, full=full, store=self.store, client=self.client)

    async def night(self, resources: Sequence[dict[str, Any]]) -> None:
        """HAPI holds these; the batch layer takes them in a full refresh."""
        for resource in resources:
            await self.hapi.update(resource)
        await self.refresh(full=True)
        await self.store.mark_epoch()  # the speed layer is complete from here on

    async def change(self, resource_type: str, rid: str, data: dict[str, Any] | None) -> None:
        """A change on HAPI, delivered to the speed layer as HAPI's notification would be."""
        if data is None:
            if (resource_type, rid) not in self.hapi.resources:
                return
            version = await self.hapi.delete(resource_type, rid)
            if version is not None:
                await ingest_deletion(
                    self.store,
                    resource_type,
                    rid,
                    version_id=str(version),
                    last_updated=self.hapi.now(),
                )
            return
        stored = await self.hapi.update(data)
        await ingest(self.store, dumps(stored), path_type=resource_type, path_id=rid, derive=DERIVE)

    def truth(self) -> dict[tuple[str, str], Any]:
        return {k: t.resource for k, t in self.hapi.resources.items() if not t.deleted}


@contextlib.asynccontextmanager
async def api(layers: Layers) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(layers.settings)) as client:
        yield client


async def ask(client: httpx.AsyncClient, params: list[tuple[str, str]]) -> dict[str, Any]:
    response = await client.get("/cohort", params=[*params, ("_count", "10000")], headers=AUTH)
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database("rf_exact_layers") as url:
        batch.init(url)
        yield url


def _reset(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM rf_batch.resources")
        conn.execute("DELETE FROM rf_batch.watermark")
        batch.rebuild_views(conn)


@contextlib.asynccontextmanager
async def layers_of(database_url: str) -> AsyncIterator[Layers]:
    _reset(database_url)
    redis = aioredis.Redis.from_url(LAYERS_REDIS_URL)
    await redis.flushdb()
    layers = Layers(database_url, redis)
    try:
        yield layers
    finally:
        await layers.aclose()
        await redis.flushdb()
        await redis.aclose()


# --------------------------------------------------------------------------- resources


@st.composite
def patient(draw: st.DrawFn, rid: str) -> dict[str, Any]:
    data: dict[str, Any] = {"resourceType": "Patient", "id": rid}
    gender = draw(st.sampled_from(["male", "female", None]))
    if gender:
        data["gender"] = gender
    birth = draw(st.sampled_from([None, "1970", "1970-05", "1970-05-17", "1985-12-31", "2000-02"]))
    if birth:
        data["birthDate"] = birth
    if draw(st.integers(0, 3)) == 0:
        data["_birthDate"] = {
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                    "valueCode": "masked",
                }
            ]
        }
    return data


@st.composite
def condition(draw: st.DrawFn, rid: str) -> dict[str, Any]:
    codings = [
        {"system": SNOMED, "code": code, "display": draw(st.sampled_from(TEXTS))}
        for code in draw(st.lists(st.sampled_from(["44054006", "195967001"]), max_size=2))
    ]
    code: dict[str, Any] = {"coding": codings} if codings else {}
    if draw(st.booleans()) or not codings:
        code["text"] = draw(st.sampled_from(TEXTS))
    data = {
        "resourceType": "Condition",
        "id": rid,
        "subject": {"reference": f"Patient/{draw(st.sampled_from(PATIENTS))}"},
        "code": code,
    }
    verification = draw(st.sampled_from([None, "confirmed", "entered-in-error"]))
    if verification:
        data["verificationStatus"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "code": verification,
                }
            ]
        }
    return data


@st.composite
def observation(draw: st.DrawFn, rid: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "status": draw(st.sampled_from(["final", "cancelled", "entered-in-error", "preliminary"])),
        "subject": {"reference": f"Patient/{draw(st.sampled_from(PATIENTS))}"},
        "code": {
            "coding": [{"system": LOINC, "code": draw(st.sampled_from(["4548-4", "2345-7"]))}]
        },
    }
    if draw(st.integers(0, 4)):
        data["valueQuantity"] = {"value": draw(st.sampled_from(VALUES)), "unit": "%"}
    return data


Change = tuple[str, str, dict[str, Any] | None]


@st.composite
def changes(draw: st.DrawFn, low: int, high: int) -> list[Change]:
    out: list[Change] = []
    for _ in range(draw(st.integers(low, high))):
        kind = draw(st.sampled_from(["Patient", "Condition", "Observation"]))
        if kind == "Patient":
            rid = draw(st.sampled_from(PATIENTS))
            data = draw(patient(rid))
        elif kind == "Condition":
            rid = draw(st.sampled_from(CONDITIONS))
            data = draw(condition(rid))
        else:
            rid = draw(st.sampled_from(OBSERVATIONS))
            data = draw(observation(rid))
        out.append((kind, rid, None if draw(st.integers(0, 5)) == 0 else data))
    return out


PARAMETERS = st.sampled_from(
    [
        ("gender", "male"),
        ("gender", "female,male"),
        ("birthdate", "1970"),
        ("birthdate", "ge1980"),
        ("birthdate", "lt1970-06"),
        ("birthdate", "ne1970-05"),
        ("birthdate", "1970-05-17T00:00:00Z"),
        ("birthdate", "ge1970-05-17T10:00:00+02:00"),
        ("birthdate", "lt1970-05-17T01:00-03:00"),
        ("birthdate", "le1985-12-31T23:59:59.999Z,gt2000-02-29T23:30:00-01:00"),
        ("birthdate", "gt1969-12-31T23:00:00-02:00"),
        ("condition", f"{SNOMED}|44054006"),
        ("condition", "195967001"),
        ("condition-text", "διαβητης"),
        ("condition-text", "ΔΙΑΒΗΤΗΣ"),
        ("condition-text", "strasse"),
        ("condition-text", "ß"),
        ("condition-text", "οδος"),
        ("condition-text", "diab,asth"),
        ("observation", f"{LOINC}|4548-4"),
        ("observation", f"{LOINC}|4548-4$gt6.5"),
        ("observation", f"{LOINC}|4548-4$eq7"),
        ("observation", f"{LOINC}|4548-4$eq7.0"),
        ("observation", f"{LOINC}|4548-4$ne7"),
        ("observation", "4548-4$ge6.50000000000000001"),
        ("observation", f"{LOINC}|4548-4$lt7.5,{LOINC}|2345-7$gt99"),
        ("observation", "2345-7$le1e2"),
        ("observation", "2345-7$eq1e2"),
    ]
)
QUERIES = st.lists(
    st.sampled_from([1, 1, 2]).flatmap(
        lambda n: st.lists(PARAMETERS, min_size=n, max_size=n, unique_by=lambda p: p[0])
    ),
    min_size=3,
    max_size=3,
)


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
    async with layers_of(database) as layers:
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
    async with layers_of(database) as layers:
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
    async with layers_of(database) as layers:
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
