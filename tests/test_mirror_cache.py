"""The query API's mirror answers a query asked again from what it kept, and never stale.

`SpeedMirror.plan` keeps each query's plan until the mirror's state changes. The property:
through any interleaving of deliveries (writes and deletes), queries asked again, real
incremental `batch refresh`es and epoch changes (the speed layer lost and marked complete
again, with and without a refresh before), one running query API answers every query
exactly as `tests.oracle.cohort` computes it from what the layers hold at that moment (the
oracle shares no code with the engines). Also: a plan is reused while nothing changed and
made again after a change; the text search and the birth-month index of the mirror's
indexes against brute force and the oracle.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import hypothesis.strategies as st
import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings

from serving import batch
from serving.cohort import parse_query, patient_matches
from serving.merge import begin_snapshot, read_speed
from serving.mirror import TEXT_SEPARATOR, Plan, RowIndex, SpeedMirror
from tests.conftest import fresh_database, redis_db
from tests.layers import QUERY, Layers, Truth, api, ask, delivery, layers_of
from tests.oracle import cohort as oracle_cohort

CACHE_REDIS_URL = redis_db(4)


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database("rf_mirror_cache") as url:
        batch.init(url)
        yield url


STEP = st.one_of(
    delivery(),
    delivery(),
    st.tuples(st.just("refresh")),
    st.tuples(st.just("epoch"), st.booleans()),  # True: a refresh first
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    night=st.lists(delivery(), min_size=3, max_size=8),
    queries=st.lists(QUERY, min_size=1, max_size=3),
    steps=st.lists(STEP, min_size=1, max_size=8),
)
@pytest.mark.timeout(900)
async def test_a_kept_plan_never_outlives_a_change(
    database: str,
    night: list[Any],
    queries: list[list[tuple[str, str]]],
    steps: list[Any],
) -> None:
    async with layers_of(database, CACHE_REDIS_URL) as layers:
        await layers.night([step[3] for step in night if step[3] is not None])
        # What the layers hold: the batch layer's resources, then what reached the speed
        # layer in its current epoch over them.
        in_batch: Truth = layers.truth()
        held: Truth = dict(in_batch)
        async with api(layers) as client:

            async def asked(when: str) -> None:
                # Every query twice: the second one is answered from the kept plan.
                for params in queries + queries:
                    want = oracle_cohort(held, params)
                    got = await ask(client, params)
                    assert got["degraded"] is False
                    assert (got["total_count"], got["patient_ids"]) == (len(want), want), (
                        when,
                        params,
                    )

            await asked("after the night")
            for step in steps:
                event(step[0])
                if step[0] == "deliver":
                    _, kind, rid, data = step
                    await layers.change(kind, rid, data)
                    held.pop((kind, rid), None)
                    if data is not None:
                        held[(kind, rid)] = layers.hapi.resources[(kind, rid)].resource
                elif step[0] == "refresh":
                    await layers.refresh()
                    in_batch = layers.truth()
                    held = dict(in_batch)
                else:
                    if step[1]:
                        await layers.refresh()
                        in_batch = layers.truth()
                    # The speed layer is lost (a Redis without its data), then marked
                    # complete again: what it held since the last refresh is gone.
                    await layers.store.client.flushdb()
                    await layers.store.mark_epoch()
                    held = dict(in_batch)
                await asked(f"after {step[0]}")


async def _plan(layers: Layers, mirror: SpeedMirror, params: list[tuple[str, str]]) -> Plan:
    """The plan a /cohort query gets: the mirror synced, its batch versions in one snapshot."""
    assert (await read_speed(layers.store, mirror, True)).consulted
    async with await psycopg.AsyncConnection.connect(layers.settings.database_url) as conn:
        async with conn.transaction():
            key, _ = await begin_snapshot(conn)
            async with mirror.lock:
                await mirror.sync_batch(conn, key)
                return mirror.plan(parse_query(params))


async def test_a_plan_is_kept_until_the_mirror_changes(database: str) -> None:
    async with layers_of(database, CACHE_REDIS_URL) as layers:
        await layers.night([{"resourceType": "Patient", "id": "p0", "gender": "male"}])
        mirror = SpeedMirror()
        params = [("gender", "male")]
        await layers.change("Patient", "p1", {"resourceType": "Patient", "id": "p1"})
        first = await _plan(layers, mirror, params)
        assert await _plan(layers, mirror, params) is first  # nothing changed: the kept plan
        assert first.speed_patients == []
        await layers.change(
            "Patient", "p2", {"resourceType": "Patient", "id": "p2", "gender": "male"}
        )
        second = await _plan(layers, mirror, params)
        assert second is not first
        assert second.speed_patients == ["p2"]
        await layers.refresh()  # a new batch snapshot: p2 is the batch layer's now
        third = await _plan(layers, mirror, params)
        assert third is not second
        assert third.touches_nothing


# --------------------------------------------------------------------------- the indexes

TEXT = st.text(alphabet="ab" + TEXT_SEPARATOR, max_size=5)


@given(
    texts=st.lists(TEXT, max_size=8),
    removed=st.lists(st.integers(0, 7), max_size=4),
    needles=st.lists(TEXT, min_size=1, max_size=3),
)
def test_text_search_finds_what_in_finds(
    texts: list[str], removed: list[int], needles: list[str]
) -> None:
    index = RowIndex("Condition")
    rows: dict[str, list[dict[str, Any]]] = {}
    for n, text in enumerate(texts):
        rows[f"c{n}"] = [{"patient_id": f"p{n}", "code_text": text}]
        index.add(f"c{n}", rows[f"c{n}"])
        index.matching_texts(needles)  # searched between changes: the search string is kept
    for n in removed:
        rows.pop(f"c{n}", None)
        index.remove(f"c{n}")
    held = {row["code_text"] for rs in rows.values() for row in rs}
    want = sorted(t for t in held if any(n in t for n in needles))
    assert sorted(index.matching_texts(needles)) == want


# Around a year's end and a leap day, where month and year bounds fall.
YEARS = st.sampled_from(["1999", "2000"])
MONTHS = st.sampled_from(["1999-12", "2000-01", "2000-02", "2000-03"])
DAYS = st.dates(datetime.date(1999, 12, 1), datetime.date(2000, 3, 31)).map(str)
BIRTH = st.one_of(YEARS, MONTHS, DAYS)
SEARCH = st.tuples(
    st.sampled_from(["", "eq", "ne", "gt", "lt", "ge", "le"]),
    st.one_of(
        YEARS,
        MONTHS,
        DAYS,
        st.sampled_from(["2000-02-29T23:30:00-02:00", "2000-01-01T00:00:00Z", "1999-12-31T23:00Z"]),
    ),
).map("".join)


@settings(max_examples=300)
@given(
    births=st.lists(st.one_of(st.none(), BIRTH), min_size=1, max_size=12),
    searches=st.lists(SEARCH, min_size=1, max_size=2),
)
def test_birth_month_index_loses_no_member(births: list[str | None], searches: list[str]) -> None:
    index = RowIndex("Patient")
    resources: Truth = {}
    for n, birth in enumerate(births):
        index.add(f"p{n}", [{"id": f"p{n}", "gender": None, "birth_date": birth}])
        data: dict[str, Any] = {"resourceType": "Patient", "id": f"p{n}"}
        if birth is not None:
            data["birthDate"] = birth
        resources[("Patient", f"p{n}")] = data
    params = [("birthdate", s) for s in searches]
    query = parse_query(params)
    got = sorted(
        rid
        for rid in index.patient_candidates(query)
        if any(patient_matches(query, row) for row in index.rows[rid])
    )
    assert got == oracle_cohort(resources, params)
