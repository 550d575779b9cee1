"""The two-layer harness and the resource changes hypothesis draws for it.

`Layers` is one example's world: a stand-in HAPI, the speed layer (Redis, written through the
one gate and write path, `receiver.ingest`, with the bytes HAPI would send) and the batch layer
(PostgreSQL, taken in by a real `batch refresh`); `api` runs the query API over both. The
strategies draw Patients, Conditions and Observations with the hard shapes (long decimals,
non-ASCII text, partial birth dates, primitive extensions) and changes of them (writes and
deletes); `PARAMETERS` and `QUERY` draw /cohort queries over them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import hypothesis.strategies as st
import psycopg
import redis.asyncio as aioredis

from core.fhir_values import dumps
from core.settings import Settings
from core.store import SpeedStore
from receiver.ingest import ingest, ingest_deletion
from serving import batch
from serving.api import create_app
from serving.batch_refresh import refresh
from serving.derive import default_deriver
from serving.registry import served_views
from subscriptions.fhir_client import FhirClient
from subscriptions.standin.hapi import StandInHapi
from tests.asgi import running

AUTH = {"Authorization": "Bearer serve"}
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

Truth = dict[tuple[str, str], Any]  # (type, id) -> the resource as HAPI holds it
Change = tuple[str, str, dict[str, Any] | None]  # (type, id, the resource; None: deleted)


# --------------------------------------------------------------------------- harness


class Layers:
    """The stand-in HAPI, the speed layer and the batch layer of one example.

    `views_dir` (a folder of ViewDefinitions) is served and derived beside the shipped views.
    """

    def __init__(
        self,
        database_url: str,
        redis: aioredis.Redis,
        redis_url: str,
        views_dir: str | None = None,
    ) -> None:
        self.hapi = StandInHapi()
        self.store = SpeedStore(redis)
        self.settings = Settings(
            redis_url=redis_url,
            database_url=database_url,
            fhir_base_url="http://standin.test/fhir",
            serving_tokens=("serve",),
            views_dir=views_dir,
        )
        self.derive = default_deriver(served_views(views_dir))
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
        await ingest(
            self.store, dumps(stored), path_type=resource_type, path_id=rid, derive=self.derive
        )

    def truth(self) -> Truth:
        return {k: t.resource for k, t in self.hapi.resources.items() if not t.deleted}


def reset(database_url: str) -> None:
    """An empty batch layer (its views rebuilt empty) in a database `batch init` made."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM rf_batch.resources")
        conn.execute("DELETE FROM rf_batch.watermark")
        batch.rebuild_views(conn)


@contextlib.asynccontextmanager
async def layers_of(
    database_url: str, redis_url: str, views_dir: Path | None = None
) -> AsyncIterator[Layers]:
    """Layers over an emptied batch layer and an emptied Redis database `redis_url`."""
    reset(database_url)
    redis = aioredis.Redis.from_url(redis_url)
    await redis.flushdb()
    layers = Layers(database_url, redis, redis_url, None if views_dir is None else str(views_dir))
    try:
        yield layers
    finally:
        await layers.aclose()
        await redis.flushdb()
        await redis.aclose()


@contextlib.asynccontextmanager
async def api(layers: Layers) -> AsyncIterator[httpx.AsyncClient]:
    """The query API over `layers`, its lifespan running."""
    async with running(create_app(layers.settings)) as client:
        yield client


async def ask(client: httpx.AsyncClient, params: list[tuple[str, str]]) -> dict[str, Any]:
    """/cohort's answer (every member on one page); asserts a 200."""
    response = await client.get("/cohort", params=[*params, ("_count", "10000")], headers=AUTH)
    assert response.status_code == 200, response.text
    return dict(response.json())


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


def verification_status(code: str) -> dict[str, Any]:
    """A Condition.verificationStatus CodeableConcept of FHIR's condition-ver-status system."""
    return {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": code}
        ]
    }


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
        data["verificationStatus"] = verification_status(verification)
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


# type -> (the ids drawn from, the strategy of a resource with that id)
Kinds = Mapping[str, tuple[Sequence[str], Callable[[str], st.SearchStrategy[dict[str, Any]]]]]
COHORT_KINDS: Kinds = {
    "Patient": (PATIENTS, patient),
    "Condition": (CONDITIONS, condition),
    "Observation": (OBSERVATIONS, observation),
}


@st.composite
def resource_change(
    draw: st.DrawFn, deleted_one_in: int | None, kinds: Kinds = COHORT_KINDS
) -> Change:
    """A write of a resource of one of `kinds`, or (one in `deleted_one_in`; None: never) its
    deletion."""
    kind = draw(st.sampled_from(list(kinds)))
    ids, resource = kinds[kind]
    rid = draw(st.sampled_from(ids))
    data = draw(resource(rid))
    if deleted_one_in is not None and draw(st.integers(0, deleted_one_in - 1)) == 0:
        return kind, rid, None
    return kind, rid, data


@st.composite
def changes(draw: st.DrawFn, low: int, high: int) -> list[Change]:
    """Between `low` and `high` changes of the cohort's resources, one in six a deletion."""
    return [draw(resource_change(6)) for _ in range(draw(st.integers(low, high)))]


def delivery() -> st.SearchStrategy[tuple[str, str, str, dict[str, Any] | None]]:
    """A step ("deliver", type, id, resource or None) of the cohort's resources, one in five a
    deletion."""
    return resource_change(5).map(lambda c: ("deliver", *c))


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
# One /cohort query: one or two parameters, of different names.
QUERY = st.sampled_from([1, 1, 2]).flatmap(
    lambda n: st.lists(PARAMETERS, min_size=n, max_size=n, unique_by=lambda p: p[0])
)
