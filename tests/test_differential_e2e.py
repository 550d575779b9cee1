"""End-to-end differential test: the reference answer is a real full `batch refresh`.

Each example is a whole day on the stand-in HAPI: a history of creates, updates and deletes
of Patients, Conditions and Observations, a `batch refresh` at some point of it (the night
before), then more changes that HAPI pushes through real rest-hook Subscriptions to the real
receiver (two racing deliverers with jitter, so versions arrive out of order; a DELETE's
version looked up on HAPI). The query API's merged answer to random cohort queries must
equal the answer of the batch layer alone after `batch refresh --full` of HAPI's final
state. At least 30 examples per run (`@settings(max_examples=30)`), about a minute;
`tests/test_differential.py` adds 100 faster examples that write the speed layer directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import hypothesis.strategies as st
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings

from core.serve import serve_asgi
from core.settings import Settings
from core.store import SpeedStore
from receiver.app import create_app as create_receiver
from serving import batch
from serving.api import create_app as create_api
from serving.batch_refresh import refresh
from serving.derive import default_deriver
from subscriptions import bootstrap
from subscriptions.fhir_client import FhirClient, hapi_lookup
from subscriptions.standin.hapi import StandInHapi
from subscriptions.standin.run import serve_standin
from tests.asgi import running
from tests.conftest import fresh_database, redis_db
from tests.layers import verification_status

E2E_REDIS_URL = redis_db(15)
PATIENTS = [f"p{i}" for i in range(5)]
CONDITIONS = [f"c{i}" for i in range(5)]
OBSERVATIONS = [f"o{i}" for i in range(4)]
AUTH = {"Authorization": "Bearer serve"}

Op = tuple[str, str, dict[str, Any] | None]  # type, id, content (None: delete)


@st.composite
def content(draw: st.DrawFn, resource_type: str, rid: str) -> dict[str, Any] | None:
    if draw(st.integers(0, 4)) == 0:
        return None
    if resource_type == "Patient":
        data: dict[str, Any] = {"resourceType": "Patient", "id": rid}
        gender = draw(st.sampled_from(["male", "female", None]))
        birth = draw(st.sampled_from([None, "1970", "1970-03-15", "1985-12-31"]))
        if gender:
            data["gender"] = gender
        if birth:
            data["birthDate"] = birth
        return data
    owner = draw(st.sampled_from(PATIENTS))
    code = draw(st.sampled_from(["A", "B"]))
    coding = {"system": "http://snomed.info/sct", "code": code}
    if resource_type == "Condition":
        data = {
            "resourceType": "Condition",
            "id": rid,
            "subject": {"reference": f"Patient/{owner}"},
            "code": {"coding": [coding], "text": draw(st.sampled_from(["Diabetes", "asthma"]))},
        }
        if draw(st.booleans()):
            data["verificationStatus"] = verification_status(
                draw(st.sampled_from(["confirmed", "entered-in-error"]))
            )
        return data
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": draw(st.sampled_from(["final", "cancelled"])),
        "subject": {"reference": f"Patient/{owner}"},
        "code": {"coding": [coding]},
        "valueQuantity": {"value": draw(st.sampled_from([5, 6.5, 8])), "unit": "%"},
    }


universe = (
    [("Patient", i) for i in PATIENTS]
    + [("Condition", i) for i in CONDITIONS]
    + [("Observation", i) for i in OBSERVATIONS]
)


@st.composite
def ops(draw: st.DrawFn, low: int, high: int) -> list[Op]:
    out: list[Op] = []
    for _ in range(draw(st.integers(low, high))):
        resource_type, rid = draw(st.sampled_from(universe))
        out.append((resource_type, rid, draw(content(resource_type, rid))))
    return out


queries = st.lists(
    st.lists(
        st.sampled_from(
            [
                ("gender", "male"),
                ("gender", "female,male"),
                ("birthdate", "1970"),
                ("birthdate", "ge1980"),
                ("condition", "A"),
                ("condition", "http://snomed.info/sct|B"),
                ("condition-text", "diab"),
                ("observation", "http://snomed.info/sct|A$gt6"),
            ]
        ),
        min_size=0,
        max_size=2,
        unique_by=lambda p: p[0],
    ),
    min_size=2,
    max_size=4,
)


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database("rf_e2e") as url:
        yield url


async def apply(hapi: StandInHapi, changes: list[Op]) -> None:
    for resource_type, rid, data in changes:
        if data is None:
            if (resource_type, rid) in hapi.resources:
                await hapi.delete(resource_type, rid)
        else:
            await hapi.update(data)


async def cohort(settings: Settings, params: list[tuple[str, str]]) -> dict[str, Any]:
    async with running(create_api(settings)) as client:
        response = await client.get("/cohort", params=[*params, ("_count", "1000")], headers=AUTH)
        assert response.status_code == 200, response.text
        return dict(response.json())


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(night=ops(0, 12), day=ops(1, 14), asked=queries)
@pytest.mark.timeout(900)
async def test_merged_answer_equals_a_full_batch_refresh(
    database: str, night: list[Op], day: list[Op], asked: list[list[tuple[str, str]]]
) -> None:
    redis_client = aioredis.Redis.from_url(E2E_REDIS_URL)
    await redis_client.flushdb()
    batch.drop(database)
    batch.init(database)
    hapi = StandInHapi(retry_initial=0.05, retry_total=10.0)
    hapi.delivery_jitter = 0.01  # two deliverers, reordered
    try:
        async with serve_standin(hapi) as fhir_base:
            base = Settings(
                redis_url=E2E_REDIS_URL,
                database_url=database,
                fhir_base_url=fhir_base,
                receiver_tokens=("hook",),
                serving_tokens=("serve",),
                instance="e2e",
            )
            store = SpeedStore(redis_client)
            await apply(hapi, night)
            await refresh(base, store=store)  # last night's refresh
            await store.mark_epoch()  # the speed layer is complete from here on
            receiver = create_receiver(
                base, derive=default_deriver(), hapi=hapi_lookup(base.fhir_base_url)
            )
            async with serve_asgi(receiver, path="/fhir") as receiver_url:
                settings_ = dataclasses.replace(base, receiver_url=receiver_url)
                async with FhirClient(fhir_base) as client:
                    await bootstrap.bootstrap(settings_, client, wait=10)
                await apply(hapi, day)  # HAPI pushes each change to the receiver
                await hapi.wait_idle(timeout=60)
            assert hapi.dropped == 0 and hapi.lost == 0
            merged = [await cohort(base, q) for q in asked]
            # The reference: a real full refresh of HAPI's final state, then the batch alone.
            await refresh(base, full=True, store=store)
            batch_only = dataclasses.replace(base, use_speed_layer=False)
            for params, got in zip(asked, merged, strict=True):
                reference = await cohort(batch_only, params)
                assert (got["total_count"], got["patient_ids"]) == (
                    reference["total_count"],
                    reference["patient_ids"],
                ), params
                assert got["sources"] == ["batch_layer", "speed_layer"]
                assert got["degraded"] is False
    finally:
        await hapi.aclose()
        await redis_client.flushdb()
        await redis_client.aclose()
