"""Cohort parameters and the merge, on a real batch layer (PostgreSQL) and speed layer (Redis)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from core.errors import InvalidRequest
from core.fhir_values import date_range, parse_instant
from core.store import EPOCH_KEY, SpeedStore, version_number
from receiver.ingest import ingest, ingest_deletion
from serving import batch
from serving.cohort import date_matches, parse_query
from serving.derive import default_deriver
from serving.merge import BatchCounts, cohort
from serving.mirror import SpeedMirror
from tests.conftest import empty_redis, redis_db
from tests.layers import verification_status

LU = "2024-01-01T00:00:00Z"


def patient(
    pid: str, gender: str | None = "male", birth: str | None = "1970-01-01", v: int = 1
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"versionId": str(v), "lastUpdated": f"2024-01-01T00:00:{v:02d}Z"},
    }
    if gender:
        data["gender"] = gender
    if birth:
        data["birthDate"] = birth
    return data


def condition(
    cid: str,
    pid: str,
    code: str = "44054006",
    system: str = "http://snomed.info/sct",
    text: str | None = None,
    display: str | None = None,
    verification: str | None = None,
    v: int = 1,
) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    data: dict[str, Any] = {
        "resourceType": "Condition",
        "id": cid,
        "meta": {"versionId": str(v), "lastUpdated": f"2024-01-01T00:00:{v:02d}Z"},
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [coding]},
    }
    if text:
        data["code"]["text"] = text
    if verification:
        data["verificationStatus"] = verification_status(verification)
    return data


def observation(
    oid: str,
    pid: str,
    code: str = "4548-4",
    value: float | None = 7.0,
    status: str = "final",
    v: int = 1,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"versionId": str(v), "lastUpdated": f"2024-01-01T00:00:{v:02d}Z"},
        "status": status,
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
    }
    if value is not None:
        data["valueQuantity"] = {"value": value, "unit": "%"}
    return data


@dataclass(frozen=True)
class Deleted:
    resource_type: str
    id: str
    version: int


def load_batch(
    database_url: str,
    resources: Iterable[dict[str, Any]],
    deleted: Iterable[Deleted] = (),
    watermark: str = "2024-01-01T00:00:00Z",
    replace: bool = True,
) -> None:
    """The batch layer holding exactly these versions, views refreshed, watermark advanced."""
    batch.init(database_url)
    with psycopg.connect(database_url) as conn:
        if replace:
            conn.execute("DELETE FROM rf_batch.resources")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO rf_batch.resources VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
                " ON CONFLICT (resource_type, id) DO UPDATE SET version_id = EXCLUDED.version_id,"
                " version_number = EXCLUDED.version_number, last_updated = EXCLUDED.last_updated,"
                " last_updated_ms = EXCLUDED.last_updated_ms, deleted = EXCLUDED.deleted,"
                " resource = EXCLUDED.resource",
                [
                    (
                        r["resourceType"],
                        r["id"],
                        r["meta"]["versionId"],
                        version_number(r["meta"]["versionId"]),
                        r["meta"]["lastUpdated"],
                        parse_instant(r["meta"]["lastUpdated"]),
                        False,
                        json.dumps(r),
                    )
                    for r in resources
                ]
                + [
                    (
                        d.resource_type,
                        d.id,
                        str(d.version),
                        float(d.version),
                        LU,
                        parse_instant(LU),
                        True,
                        None,
                    )
                    for d in deleted
                ],
            )
        batch.rebuild_views(conn)
        conn.execute(
            "INSERT INTO rf_batch.watermark (id, watermark, refreshed_at, resources)"
            " VALUES (1, %s, clock_timestamp(), (SELECT count(*) FROM rf_batch.resources))"
            " ON CONFLICT (id) DO UPDATE SET watermark = EXCLUDED.watermark,"
            " refreshed_at = EXCLUDED.refreshed_at, resources = EXCLUDED.resources",
            (watermark,),
        )


async def put(store: SpeedStore, resource: dict[str, Any]) -> None:
    await ingest(store, json.dumps(resource).encode(), derive=DERIVE)


async def delete(store: SpeedStore, resource_type: str, rid: str, version: int) -> None:
    await ingest_deletion(
        store,
        resource_type,
        rid,
        version_id=str(version),
        last_updated=f"2024-01-01T00:00:{version:02d}Z",
    )


DERIVE = default_deriver()


@dataclass
class Run:
    """Runs cohort queries against one store and database, as the API does."""

    store: SpeedStore
    database_url: str
    mirror: SpeedMirror
    counts: BatchCounts

    async def ask(self, query: str, use_speed: bool = True) -> dict[str, Any]:
        from urllib.parse import parse_qsl

        from serving.merge import read_speed

        q = parse_query(parse_qsl(query, keep_blank_values=True))
        speed = await read_speed(self.store, self.mirror, use_speed)
        async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
            async with conn.transaction():
                a = await cohort(conn, q, speed, self.counts)
        return {
            "total": a.total_count,
            "ids": a.patient_ids,
            "batch": a.batch_count,
            "added": a.added_count,
            "removed": a.removed_count,
            "sources": a.sources,
            "degraded": a.degraded,
        }


# Redis databases of these tests' own: other suites flush TEST_REDIS_URL's database at will.
OWN_REDIS_URL = redis_db(11)
DIFF_REDIS_URL = redis_db(12)


@pytest.fixture
async def own_store() -> AsyncIterator[SpeedStore]:
    async with empty_redis(OWN_REDIS_URL) as client:
        yield SpeedStore(client)


@pytest.fixture
async def run(own_store: SpeedStore, pg_url: str) -> Run:
    await own_store.mark_epoch()
    return Run(own_store, pg_url, SpeedMirror(), BatchCounts())


# --------------------------------------------------------------------------- parsing


def test_date_ranges_follow_fhir_rules() -> None:
    q = parse_query([("birthdate", "ge1970-01-01"), ("birthdate", "lt2000")])
    assert [d.prefix for (d,) in q.birthdates] == ["ge", "lt"]
    assert date_range("1970") == ("1970-01-01", "1970-12-31")
    assert date_range("2000-02") == ("2000-02-01", "2000-02-29")
    assert date_range("1900-02") == ("1900-02-01", "1900-02-28")
    (eq1970,) = parse_query([("birthdate", "1970")]).birthdates[0]
    assert date_matches(("1970-05-01", "1970-05-01"), eq1970)
    assert not date_matches(("1969-12-31", "1970-12-31"), eq1970)
    (gt,) = parse_query([("birthdate", "gt1970-06-01")]).birthdates[0]
    assert date_matches(date_range("1970"), gt)  # the year reaches past June 1st
    (lt,) = parse_query([("birthdate", "lt1970")]).birthdates[0]
    assert not date_matches(date_range("1970-03"), lt)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("birthdate", "xx1970"),
        ("birthdate", "1970-13"),
        ("birthdate", "1970-02-30"),
        ("birthdate", "sa1970"),
        ("observation", "http://loinc.org|4548-4$gtx"),
        ("condition", "http://snomed.info/sct|"),
        ("condition", "a$gt1"),
        ("observation-value", "gt6"),
        ("ids", "maybe"),
        ("_count", "10001"),
        ("_count", "-1"),
        ("gender", ""),
        ("gender", "mal"),
        ("gender", "male,Female"),
        ("birthdate", "0000"),
        ("birthdate", "0000-01-01"),
        ("birthdate", "ge0000-06"),
        ("birthdate", "1970-00"),
        ("birthdate", "1970-01-00"),
        ("colour", "red"),
    ],
)
def test_malformed_parameters_name_themselves(name: str, value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_query([(name, value)])
    assert info.value.issues[0].expression == name


def test_a_birthdate_may_be_a_fhir_datetime() -> None:
    """FHIR R4 search "date": a dateTime is the instants it covers; a birth date, which has
    no zone, the instants of its days in UTC."""
    (utc,) = parse_query([("birthdate", "1970-01-01T00:00:00Z")]).birthdates[0]
    assert (utc.prefix, utc.low, utc.high) == (
        "eq", "1970-01-01T00:00:00.000", "1970-01-01T00:00:00.999")  # fmt: skip
    (ge,) = parse_query([("birthdate", "ge1970-01-01T10:00:00+02:00")]).birthdates[0]
    assert (ge.prefix, ge.low) == ("ge", "1970-01-01T08:00:00.000")
    (minute,) = parse_query([("birthdate", "lt1970-01-01T00:30-01:00")]).birthdates[0]
    assert (minute.low, minute.high) == ("1970-01-01T01:30:00.000", "1970-01-01T01:30:59.999")
    day = date_range("1970-01-01")
    assert not date_matches(day, utc)  # a day is no second
    assert date_matches(day, ge)  # the day reaches past 08:00 UTC
    assert date_matches(day, minute)  # the day starts before 01:30 UTC
    assert not date_matches(date_range("1970-01-02"), minute)
    assert date_matches(
        date_range("1970"), parse_query([("birthdate", "ne1970-01-01T00:00Z")]).birthdates[0][0]
    )


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("1970-01-01T25:00", "the time of"),
        ("1970-01-01T10", "the time of"),
        ("1970-01-01T10:00:00+15:00", "the time of"),
        ("1970-01T10:00", "dateTime"),
        ("1970-02-30T10:00Z", "day 30"),
        ("0001-01-01T00:30+01:00", "outside the years 0001-9999"),
    ],
)
def test_a_birthdate_datetime_outside_fhirs_grammar_says_what_is_wrong(
    value: str, named: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_query([("birthdate", value)])
    assert named in info.value.message and info.value.issues[0].expression == "birthdate"


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("0000-01-01", "year 0000"),
        ("1970-13", "month 13"),
        ("2001-02-29", "day 29 in '2001-02-29' is not a day of 2001-02 (01-28)"),
        ("zz1970", "unknown prefix 'zz'"),
        ("1970-1", "not a date"),
    ],
)
def test_a_birthdate_outside_fhirs_grammar_says_what_is_wrong(value: str, named: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_query([("birthdate", value)])
    assert named in info.value.message


def test_every_administrative_gender_and_fhir_date_edge_is_taken() -> None:
    query = parse_query(
        [
            ("gender", "male,female,other,unknown"),
            ("birthdate", "0001"),
            ("birthdate", "le9999-12-31"),
        ]
    )
    assert query.genders == (("male", "female", "other", "unknown"),)
    assert parse_query([("birthdate", "2000-02-29")]).birthdates[0][0].low == "2000-02-29"


def test_underscore_parameters_are_ignored_and_commas_or() -> None:
    q = parse_query([("_pretty", "true"), ("_format", "json"), ("gender", "male,female")])
    assert q.genders == (("male", "female"),)
    q = parse_query(
        [("observation", "http://loinc.org|1,http://loinc.org|2"), ("observation-value", "ge5")]
    )
    assert all(c.comparator == "ge" for c in q.criteria[0].codes)


# --------------------------------------------------------------------------- merge


async def test_speed_layer_adds_changes_and_removes(run: Run) -> None:
    load_batch(
        run.database_url,
        [
            patient("p1", "male"),
            patient("p2", "female"),
            patient("p3", "male", "1980"),
            condition("c1", "p1"),
            condition("c3", "p3", text="Diabetes mellitus"),
            observation("o1", "p1", value=7.0),
        ],
    )
    r = await run.ask("gender=male&condition=44054006")
    assert (r["total"], r["ids"], r["batch"], r["added"], r["removed"]) == (
        2,
        ["p1", "p3"],
        2,
        0,
        0,
    )
    assert r["sources"] == ["batch_layer", "speed_layer"]
    # A new patient with a condition, p3 becomes female, c1 moves from p1 to p2.
    await put(run.store, patient("p4", "male", "1990-05"))
    await put(run.store, condition("c4", "p4"))
    await put(run.store, patient("p3", "female", v=2))
    await put(run.store, condition("c1", "p2", v=2))
    r = await run.ask("condition=44054006")
    assert r["ids"] == ["p2", "p3", "p4"]
    assert (r["batch"], r["added"], r["removed"]) == (2, 2, 1)
    r = await run.ask("gender=male&condition=http://snomed.info/sct|44054006")
    assert r["ids"] == ["p4"] and r["removed"] == 2 and r["added"] == 1
    # A late older version is ignored; a delete hides the batch row.
    await put(run.store, condition("c1", "p1", v=1))
    await delete(run.store, "Patient", "p2", 2)
    r = await run.ask("condition=44054006")
    assert r["ids"] == ["p3", "p4"]
    # Batch-only answers.
    r = await run.ask("condition=44054006", use_speed=False)
    assert r["ids"] == ["p1", "p3"] and r["sources"] == ["batch_layer"] and not r["degraded"]


async def test_entered_in_error_and_cancelled_never_count(run: Run) -> None:
    load_batch(
        run.database_url,
        [
            patient("p1"),
            patient("p2"),
            condition("c1", "p1", verification="entered-in-error"),
            condition("c2", "p2", verification="confirmed"),
            observation("o1", "p1", status="cancelled"),
            observation("o2", "p2", status="entered-in-error"),
        ],
    )
    assert (await run.ask("condition=44054006"))["ids"] == ["p2"]
    assert (await run.ask("observation=4548-4"))["ids"] == []
    await put(run.store, condition("c2", "p2", verification="entered-in-error", v=2))
    await put(run.store, observation("o1", "p1", status="final", v=2))
    r = await run.ask("condition=44054006")
    assert r["ids"] == [] and r["removed"] == 1
    assert (await run.ask("observation=4548-4"))["ids"] == ["p1"]


async def test_text_value_and_birthdate_parameters(run: Run) -> None:
    load_batch(
        run.database_url,
        [
            patient("p1", birth="1970"),
            patient("p2", birth="1985-06-15"),
            patient("p3", birth=None),
            condition("c1", "p1", text="Type 2 DIABETES"),
            condition("c2", "p2", display="Diabetic foot"),
            observation("o1", "p1", value=6.5),
            observation("o2", "p2", value=8),
        ],
    )
    await put(run.store, patient("p4", birth="1970-03"))
    await put(run.store, condition("c4", "p4", code="1", text="no match"))
    await put(run.store, observation("o4", "p4", value=9.25))
    assert (await run.ask("condition-text=diabet"))["ids"] == ["p1", "p2"]
    assert (await run.ask("condition-text=FOOT,match"))["ids"] == ["p2", "p4"]
    assert (await run.ask("observation=http://loinc.org|4548-4$gt6.5"))["ids"] == ["p2", "p4"]
    assert (await run.ask("observation=4548-4&observation-value=le6.5"))["ids"] == ["p1"]
    assert (await run.ask("birthdate=1970"))["ids"] == ["p1", "p4"]
    assert (await run.ask("birthdate=ge1970-06-01&birthdate=lt1986"))["ids"] == ["p1", "p2"]
    assert (await run.ask("birthdate=ne1970"))["ids"] == ["p2"]
    assert (await run.ask("birthdate=gt1970-12-31,lt1970-01-02"))["ids"] == ["p1", "p2"]


# Number searches that differ only in the precision of their value: Decimal("7") equals
# Decimal("7.0") (and 10 equals 1e1 and 100e-1), while eq7 is [6.5, 7.5) and eq7.0 [6.95, 7.05).
PRECISION_VARIANTS = [
    "eq7",
    "eq7.0",
    "eq7.00",
    "ne7",
    "ne7.0",
    "eq10",
    "eq1e1",
    "eq1.0e1",
    "eq100e-1",
    "eq1e2",
    "eq100.0",
    "gt7",
    "gt7.0",
]


def test_queries_are_equal_only_when_their_answers_are() -> None:
    def signature(value: str) -> Any:
        return parse_query([("observation", f"http://loinc.org|4548-4${value}")]).signature()

    assert len({signature(v) for v in ("eq7", "eq7.0", "eq7.00", "ne7", "ne7.0")}) == 5
    assert len({signature(v) for v in ("eq10", "eq1e1", "eq100e-1", "eq10.0")}) == 3
    # The same range, or the same exact value: one cache entry is right.
    assert signature("eq1.0e1") == signature("eq10") and signature("gt7") == signature("gt7.0")


@pytest.mark.parametrize("order", ["as listed", "reversed"])
async def test_batch_count_keeps_the_precision_of_a_number(run: Run, order: str) -> None:
    """batch_count is the batch layer's own answer to this very query, whichever query with
    an equal Decimal was asked before it (the batch-count cache)."""
    values = [6.5, 6.96, 7, 7.004, 7.04, 7.3, 9.97, 10.4, 14, 100.04, 100.4]
    load_batch(
        run.database_url,
        [patient(f"p{n}") for n in range(len(values))]
        + [observation(f"o{n}", f"p{n}", value=v) for n, v in enumerate(values)],
    )
    queries = [f"observation=http://loinc.org|4548-4${v}" for v in PRECISION_VARIANTS]
    if order == "reversed":
        queries.reverse()
    before = {q: await run.ask(q, use_speed=False) for q in queries}
    # The data tell apart the variants whose values are equal Decimals.
    for group in (["eq7", "eq7.0", "eq7.00"], ["ne7", "ne7.0"], ["eq10", "eq1e1", "eq100e-1"]):
        totals = {before[f"observation=http://loinc.org|4548-4${v}"]["total"] for v in group}
        assert len(totals) == len(group), group
    # A speed-layer member with a value in every eq range, so each query merges (and caches).
    await put(run.store, patient("new"))
    await put(run.store, observation("o-new", "new", value=7))
    for q in queries:
        got = await run.ask(q)
        assert got["batch"] == before[q]["total"], q
        assert got["added"] == len(set(got["ids"]) - set(before[q]["ids"])), q
        assert got["removed"] == len(set(before[q]["ids"]) - set(got["ids"])), q


async def test_degraded_without_epoch(run: Run) -> None:
    load_batch(run.database_url, [patient("p1")])
    await put(run.store, patient("p2"))
    await run.store.client.delete(EPOCH_KEY)
    r = await run.ask("gender=male")
    assert r["ids"] == ["p1"] and r["degraded"] and r["sources"] == ["batch_layer"]


async def test_trim_and_refresh_keep_the_answer(run: Run) -> None:
    load_batch(run.database_url, [patient("p1"), condition("c1", "p1")])
    await put(run.store, condition("c1", "p1", code="999", v=2))
    await put(run.store, patient("p2"))
    assert (await run.ask("condition=999"))["ids"] == ["p1"]
    # The batch layer catches up (refresh), then the speed layer is trimmed.
    load_batch(
        run.database_url, [patient("p1"), patient("p2"), condition("c1", "p1", code="999", v=2)]
    )
    assert (await run.ask("condition=999"))["ids"] == ["p1"]
    removed = await run.store.trim_covered(
        "Condition", [("c1", 2.0, parse_instant("2024-01-01T00:00:02Z"))]
    )
    assert removed == 1
    r = await run.ask("condition=999")
    assert r["ids"] == ["p1"] and r["added"] == 0 and r["batch"] == 1
    assert (await run.ask("gender=male"))["total"] == 2
