"""Differential property test: merged answers equal a full batch load of the same final state.

Each example loads a random batch state into PostgreSQL (rf_batch.resources + REFRESH of the
views), writes a random sequence of speed-layer changes through `receiver.ingest` with the
default deriver (new resources, updates moving patients in and out of cohorts, conditions moving
between patients, deletes, re-creates, duplicates, out-of-order versions), and asks random
cohort queries. The merged total_count and patient_ids must equal the answer of the batch
layer alone after loading the newest version of every resource with the speed layer emptied,
and batch_count the batch-only answer before the changes. At least 100 examples
(`@settings(max_examples=100)`), about a minute on a laptop.
"""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings

from core.store import SpeedStore
from serving.merge import BatchCounts
from serving.mirror import SpeedMirror
from tests.test_cohort import (
    DIFF_REDIS_URL,
    Deleted,
    Run,
    condition,
    delete,
    load_batch,
    observation,
    patient,
    put,
)

PATIENTS = [f"p{i}" for i in range(6)]
CONDITIONS = [f"c{i}" for i in range(6)]
OBSERVATIONS = [f"o{i}" for i in range(5)]
VERSIONS = range(1, 6)

Spec = tuple[str, str, int, dict[str, Any] | None]  # type, id, version, resource (None = deleted)

genders = st.sampled_from(["male", "female", None])
births = st.sampled_from([None, "1970", "1970-03", "1970-03-15", "1985-12-31", "2000-02"])
codes = st.sampled_from([("s1", "A"), ("s1", "B"), ("s2", "A")])
texts = st.sampled_from([None, "Diabetes", "heart failure"])
verifications = st.sampled_from([None, "confirmed", "entered-in-error"])
statuses = st.sampled_from(["final", "cancelled", "entered-in-error", "preliminary"])
values = st.sampled_from([None, 5, 6.5, 7, 8.25])


@st.composite
def content(draw: st.DrawFn, resource_type: str, rid: str, version: int) -> dict[str, Any] | None:
    if draw(st.integers(0, 5)) == 0:
        return None  # this version is a deletion
    if resource_type == "Patient":
        return patient(rid, draw(genders), draw(births), v=version)
    owner = draw(st.sampled_from(PATIENTS))
    system, code = draw(codes)
    if resource_type == "Condition":
        return condition(
            rid,
            owner,
            code=code,
            system=system,
            text=draw(texts),
            display=draw(st.sampled_from([None, "diabetic", "Cardiac"])),
            verification=draw(verifications),
            v=version,
        )
    return observation(
        rid, owner, code=code, value=draw(values), status=draw(statuses), v=version
    ) | {"code": {"coding": [{"system": system, "code": code}]}}


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[Spec], list[Spec], list[list[tuple[str, str]]]]:
    """(batch versions, speed writes in order, queries): contents fixed per (id, version)."""
    table: dict[tuple[str, str, int], dict[str, Any] | None] = {}

    def spec(resource_type: str, rid: str, version: int) -> Spec:
        key = (resource_type, rid, version)
        if key not in table:
            table[key] = draw(content(resource_type, rid, version))
        return (resource_type, rid, version, table[key])

    universe = (
        [("Patient", i) for i in PATIENTS]
        + [("Condition", i) for i in CONDITIONS]
        + [("Observation", i) for i in OBSERVATIONS]
    )
    batch: list[Spec] = []
    for resource_type, rid in universe:
        if draw(st.booleans()):
            batch.append(spec(resource_type, rid, draw(st.integers(1, 3))))
    # Often the speed layer touches only some types, so queries on the others take the
    # path where the batch SQL alone answers (serving.merge skips every speed part).
    touched = draw(
        st.sampled_from(
            [
                {"Patient", "Condition", "Observation"},
                {"Patient", "Condition", "Observation"},
                {"Patient", "Condition", "Observation"},
                {"Patient", "Condition"},
                {"Patient"},
                {"Condition"},
                {"Observation"},
                {"Condition", "Observation"},
            ]
        )
    )
    writable = [(t, i) for t, i in universe if t in touched]
    writes: list[Spec] = []
    for _ in range(draw(st.integers(0, 14))):
        resource_type, rid = draw(st.sampled_from(writable))
        writes.append(spec(resource_type, rid, draw(st.sampled_from(VERSIONS))))
    duplicate: bool = draw(st.booleans())
    if writes and duplicate:
        again: int = draw(st.integers(0, len(writes) - 1))
        writes.append(writes[again])  # a duplicate delivery
    one = st.sampled_from(
        [
            ("gender", "male"),
            ("gender", "female,male"),
            ("birthdate", "1970"),
            ("birthdate", "ge1970-03-10"),
            ("birthdate", "ge1970"),
            ("birthdate", "le1970-03"),
            ("birthdate", "lt1971"),
            ("birthdate", "ne1970-03"),
            ("birthdate", "gt1985-12-30,le1970-03-15"),
            ("condition", "A"),
            ("condition", "s1|A"),
            ("condition", "s2|A,s1|B"),
            ("condition-text", "diabet"),
            ("condition-text", "HEART,cardiac"),
            ("observation", "s1|A"),
            ("observation", "A$gt6.5"),
            ("observation", "s1|B$le7"),
        ]
    )
    queries = [[], *draw(st.lists(st.lists(one, min_size=1, max_size=3), min_size=3, max_size=5))]
    return batch, writes, queries


def _final_state(
    batch: list[Spec], writes: list[Spec]
) -> tuple[list[dict[str, Any]], list[Deleted]]:
    newest: dict[tuple[str, str], Spec] = {}
    for item in batch + writes:  # versions are numeric: the higher one wins, equal is a no-op
        key = (item[0], item[1])
        if key not in newest or item[2] > newest[key][2]:
            newest[key] = item
    resources = [r for (_, _, _, r) in newest.values() if r is not None]
    deleted = [Deleted(t, i, v) for (t, i, v, r) in newest.values() if r is None]
    return resources, deleted


def _split(specs: list[Spec]) -> tuple[list[dict[str, Any]], list[Deleted]]:
    return [r for (_, _, _, r) in specs if r is not None], [
        Deleted(t, i, v) for (t, i, v, r) in specs if r is None
    ]


def _query(pairs: list[tuple[str, str]]) -> str:
    from urllib.parse import urlencode

    if sum(1 for k, _ in pairs if k == "observation") > 1:
        pairs = [p for p in pairs if p[0] != "observation"] + [
            next(p for p in pairs if p[0] == "observation")
        ]
    return urlencode(pairs)


@pytest.fixture(scope="module")
def database() -> Any:
    from tests.conftest import fresh_database

    with fresh_database("rf_diff") as url:
        yield url


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=scenario())
@pytest.mark.timeout(600)
async def test_merged_answer_equals_full_batch_load(database: str, case: Any) -> None:
    batch, writes, queries = case
    client = aioredis.Redis.from_url(DIFF_REDIS_URL)
    try:
        await client.flushdb()
        store = SpeedStore(client)
        await store.mark_epoch()
        run = Run(store, database, SpeedMirror(), BatchCounts())
        resources, deleted = _split(batch)
        load_batch(database, resources, deleted)
        texts = [_query(q) for q in queries]
        before = {q: await run.ask(q, use_speed=False) for q in texts}
        half = len(writes) // 2
        for n, (resource_type, rid, version, resource) in enumerate(writes):
            if resource is None:
                await delete(store, resource_type, rid, version)
            else:
                await put(store, resource)
            if n == half:
                await run.ask(texts[-1])  # the mirror then follows incrementally
        merged = {q: await run.ask(q) for q in texts}
        final_resources, final_deleted = _final_state(batch, writes)
        load_batch(database, final_resources, final_deleted)
        await client.flushdb()
        for q in texts:
            reference = await run.ask(q, use_speed=False)
            got = merged[q]
            assert (got["total"], got["ids"]) == (reference["total"], reference["ids"]), q
            assert got["batch"] == before[q]["total"], q
            assert got["added"] == len(set(got["ids"]) - set(before[q]["ids"])), q
            assert got["removed"] == len(set(before[q]["ids"]) - set(got["ids"])), q
    finally:
        await client.flushdb()
        await client.aclose()
