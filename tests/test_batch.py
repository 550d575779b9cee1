"""The batch layer: init, refresh from the stand-in HAPI, atomicity and speed-layer trimming."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from starlette.responses import Response

from core.errors import FhirTemporaryError, InvalidViewDefinition
from core.fhir_values import parse_instant
from core.serve import serve_asgi
from core.settings import Settings
from core.store import SpeedStore
from core.validation import check_resource
from receiver.ingest import ingest, ingest_deletion
from serving.batch import (
    BatchNotInitialized,
    batch_watermark,
    batch_watermark_async,
    init,
    plan_view,
    view_stats,
)
from serving.batch_refresh import RefreshFailed, refresh
from serving.engines.python import evaluate
from serving.viewdef import Column, Select, load_view, shipped_views
from subscriptions.fhir_client import FhirClient
from subscriptions.standin.hapi import StandInHapi
from tests.conftest import empty_redis, redis_db

PAGE = 7  # the stand-in's largest page: every traversal has several
# Its own Redis database: other modules' tests flush theirs (db 9) while these run.
BATCH_REDIS_URL = redis_db(11)


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    async with empty_redis(BATCH_REDIS_URL) as client:
        yield client


class Faults:
    """ASGI wrapper: `fail` makes every `next` page answer 503; `stall` holds them."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.fail = False
        self.stall: asyncio.Event | None = None
        self.stalled = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        query = scope.get("query_string", b"")
        # Searches page with _getpages, _history (HAPI 8.8) with _offset.
        paging = scope["type"] == "http" and (b"_getpages=" in query or b"_offset=" in query)
        if paging and self.stall is not None:
            self.stalled.set()
            await self.stall.wait()
        if paging and self.fail:
            body = (
                b'{"resourceType":"OperationOutcome",'
                b'"issue":[{"severity":"error","code":"transient"}]}'
            )
            await Response(body, 503, media_type="application/fhir+json")(scope, receive, send)
            return
        await self.app(scope, receive, send)


@dataclass
class Hapi:
    hapi: StandInHapi
    faults: Faults
    client: FhirClient
    settings: Settings


@pytest.fixture
async def standin(pg_url: str) -> AsyncIterator[Hapi]:
    hapi = StandInHapi(max_page_size=PAGE)
    faults = Faults(hapi.app)
    try:
        async with serve_asgi(faults, path="/fhir") as base_url:
            hapi.base_url = base_url
            settings = Settings(
                redis_url=BATCH_REDIS_URL, database_url=pg_url, fhir_base_url=base_url
            )
            async with FhirClient(base_url, max_retries=1, backoff_initial=0.01) as client:
                yield Hapi(hapi, faults, client, settings)
    finally:
        await hapi.aclose()


def patient(n: int, family: str = "Doe", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"p{n}",
        "gender": ["male", "female", "other"][n % 3],
        "birthDate": f"{1940 + n % 60}-0{1 + n % 9}-1{n % 10}",
        "name": [{"family": family}],
        **extra,
    }


def condition(n: int, codings: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": f"c{n}",
        "subject": {"reference": f"Patient/p{n}"},
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "code": {
            "coding": codings
            if codings is not None
            else [{"system": "http://snomed.info/sct", "code": "44054006", "display": "DM2"}],
            "text": "Diabetes mellitus type 2",
        },
        "onsetDateTime": "2020-01-02",
    }


def observation(n: int, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{n}",
        "status": "final",
        "subject": {"reference": f"Patient/p{n}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "valueQuantity": {"value": value, "unit": "%"},
        "effectiveDateTime": "2021-03-04T05:06:07Z",
    }


async def seed(hapi: StandInHapi, start: int, count: int) -> None:
    for n in range(start, start + count):
        await hapi.update(patient(n, deceasedBoolean=True) if n % 4 == 0 else patient(n))
        await hapi.update(condition(n))
        await hapi.update(observation(n, 5.0 + n % 4 / 2))
        if n % 3 == 0:
            await hapi.update(patient(n, family="Renamed"))


async def seed_odd(hapi: StandInHapi) -> None:
    """Conditions with two identical codings, with none, with two different ones."""
    same = {"system": "http://snomed.info/sct", "code": "73211009"}
    await hapi.update(condition(900, [same, dict(same)]))
    no_codings = condition(901)
    del no_codings["code"]["coding"]  # FHIR JSON has no empty arrays: no coding at all
    await hapi.update(no_codings)
    await hapi.update(
        condition(902, [same, {"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11"}])
    )
    await hapi.update({"resourceType": "Observation", "id": "o900", "status": "final",
                       "code": {"text": "free text only"}})  # fmt: skip


def _norm(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    return value


def view_rows(pg_url: str, name: str) -> list[tuple[Any, ...]]:
    view = shipped_views()[name]
    cols = ", ".join(f'"{c}"' for c in view.column_names)
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(f"SELECT {cols} FROM sqlonfhir.{name}").fetchall()
    return sorted((tuple(_norm(v) for v in r) for r in rows), key=repr)


def expected_rows(hapi: StandInHapi, name: str) -> list[tuple[Any, ...]]:
    view = shipped_views()[name]
    resources = [
        t.resource
        for t in hapi.resources.values()
        if t.resource is not None and not check_resource(t.resource)
    ]
    rows = evaluate(view, resources)
    return sorted((tuple(_norm(r.get(c)) for c in view.column_names) for r in rows), key=repr)


def table(pg_url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute(query).fetchall()


def batch_state(pg_url: str) -> dict[str, Any]:
    return {
        "resources": table(
            pg_url,
            "SELECT resource_type, id, version_id, deleted, resource FROM rf_batch.resources"
            " ORDER BY 1, 2",
        ),
        "watermark": table(pg_url, "SELECT * FROM rf_batch.watermark"),
        "views": {name: view_rows(pg_url, name) for name in shipped_views()},
    }


# --------------------------------------------------------------------------- init


def test_init_creates_everything_and_is_idempotent(pg_url: str) -> None:
    done = init(pg_url)
    assert done[0].startswith("created schema")
    assert sorted(d for d in done if "view" in d and "schema" not in d) == [
        f"created view sqlonfhir.{n}" for n in sorted(shipped_views())
    ]
    tables = table(
        pg_url,
        "SELECT table_schema || '.' || table_name FROM information_schema.tables"
        " WHERE table_schema = 'rf_batch' ORDER BY 1",
    )
    assert [t[0] for t in tables] == [
        "rf_batch.condition_text_rows",  # condition-text's text index
        "rf_batch.condition_texts",
        "rf_batch.resources",
        "rf_batch.views",
        "rf_batch.watermark",
    ]
    tables = table(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'sqlonfhir'")
    assert sorted(m[0] for m in tables) == sorted(shipped_views())
    indexes = {
        (t, d)
        for t, d in table(
            pg_url,
            "SELECT tablename, indexdef FROM pg_indexes"
            " WHERE schemaname IN ('sqlonfhir', 'rf_batch')",
        )
    }

    def has(tablename: str, fragment: str) -> bool:
        return any(t == tablename and fragment in d for t, d in indexes)

    assert has("resources", "(resource_type, last_updated_ms)")
    for name in shipped_views():
        assert has(name, "(_resource_id)")  # every row's resource key: what a refresh replaces
    assert has("patient_demographics", "(id)") and has("patient_demographics", "(gender)")
    assert has("patient_demographics", "(birth_date_low)")
    for name in ("condition_simple", "observation_simple"):
        assert has(name, "(code)") and has(name, "(code_system, code)")
        assert has(name, "(patient_id)")
    for column in ("code_text_folded", "code_display_folded"):
        assert has("condition_simple", f"USING gin ({column} gin_trgm_ops)")
    # The text index: its texts by trigram, its rows by text for index-only counting.
    assert has("condition_texts", "USING gin (text gin_trgm_ops)")
    assert has("condition_text_rows", "(text_id, patient_id, resource_id)")
    assert has("condition_text_rows", "(resource_id)")
    columns = table(
        pg_url,
        "SELECT attname FROM pg_attribute WHERE attrelid = 'sqlonfhir.condition_simple'::regclass"
        " AND attnum > 0 ORDER BY attnum",
    )
    assert [c[0] for c in columns] == [
        "_resource_id",
        *shipped_views()["condition_simple"].column_names,
        "code_text_folded",
        "code_display_folded",
    ]

    again = init(pg_url)
    assert again == [f"unchanged view sqlonfhir.{n}" for n in shipped_views()]
    assert batch_watermark(pg_url) is None
    stats = view_stats(pg_url)
    assert {n: rows for n, (rows, _) in stats.items()} == dict.fromkeys(shipped_views(), 0)


def test_changed_viewdef_rebuilds_only_that_view(pg_url: str) -> None:
    init(pg_url)
    before = dict(table(pg_url, "SELECT name, built_at FROM rf_batch.views"))
    views = dict(shipped_views())
    old = views["patient_demographics"]
    extra = Select(column=(Column("family", "name.family.first()", "string"),))
    views["patient_demographics"] = load_view(
        {
            "resourceType": "ViewDefinition",
            "name": "patient_demographics",
            "resource": "Patient",
            "select": [
                {"column": [dataclasses.asdict(c) for c in old.select[0].column]},
                {"column": [{"name": extra.column[0].name, "path": extra.column[0].path}]},
            ],
        }
    )
    done = init(pg_url, views)
    assert "rebuilt view sqlonfhir.patient_demographics" in done
    assert "unchanged view sqlonfhir.condition_simple" in done
    assert "unchanged view sqlonfhir.observation_simple" in done
    after = dict(table(pg_url, "SELECT name, built_at FROM rf_batch.views"))
    assert after["condition_simple"] == before["condition_simple"]
    assert after["patient_demographics"] > before["patient_demographics"]
    cols = table(
        pg_url,
        "SELECT attname FROM pg_attribute WHERE attrelid ="
        " 'sqlonfhir.patient_demographics'::regclass AND attnum > 0",
    )
    assert "family" in {c[0] for c in cols}


def test_view_plans() -> None:
    views = shipped_views()
    assert plan_view(views["patient_demographics"]).indexes[0] == ("_resource_id",)
    assert plan_view(views["condition_simple"]).trigram == (
        "code_text_folded",
        "code_display_folded",
    )
    # A ViewDefinition column name never starts with "_": `_resource_id` cannot collide.
    with pytest.raises(InvalidViewDefinition, match="not a valid column name"):
        load_view(
            {
                "resourceType": "ViewDefinition",
                "resource": "Patient",
                "select": [{"column": [{"name": "_resource_id", "path": "id"}]}],
            }
        )
    # The columns the batch layer derives are its own.
    taken = load_view(
        {
            "resourceType": "ViewDefinition",
            "name": "patient_demographics",
            "resource": "Patient",
            "select": [{"column": [{"name": "birth_date", "path": "birthDate"},
                                   {"name": "birth_date_low", "path": "birthDate"}]}],
        }
    )  # fmt: skip
    with pytest.raises(ValueError, match="birth_date_low is reserved"):
        plan_view(taken)


# --------------------------------------------------------------------------- refresh


async def test_refresh_needs_init(standin: Hapi) -> None:
    with pytest.raises(BatchNotInitialized):
        await refresh(standin.settings, client=standin.client)


async def test_refresh_rows_equal_the_python_evaluator(standin: Hapi, store: SpeedStore) -> None:
    await seed(standin.hapi, 0, 12)
    await seed_odd(standin.hapi)
    init(standin.settings.database_url)
    seen: list[int] = []
    result = await refresh(
        standin.settings, client=standin.client, store=store, progress=seen.append
    )
    assert result.read >= len(standin.hapi.resources) and result.changed == len(
        standin.hapi.resources
    )
    assert seen and seen[-1] == result.read and seen == sorted(seen)
    pg_url = standin.settings.database_url
    for name in shipped_views():
        assert view_rows(pg_url, name) == expected_rows(standin.hapi, name), name
        assert result.views[name] == len(expected_rows(standin.hapi, name))
    dup = table(pg_url, "SELECT _resource_id FROM sqlonfhir.condition_simple WHERE id = 'c900'")
    assert dup == [("c900",), ("c900",)]  # identical codings: two rows of one resource
    # The batch's version columns are what the speed layer compares.
    for rtype, rid, vid, vn, lu, lum in table(
        pg_url,
        "SELECT resource_type, id, version_id, version_number, last_updated, last_updated_ms"
        " FROM rf_batch.resources",
    ):
        truth = standin.hapi.resources[(rtype, rid)]
        assert vid == str(truth.version) and vn == truth.version
        assert lum == parse_instant(lu) > 0
    stats = view_stats(pg_url)
    assert {n: r for n, (r, _) in stats.items()} == result.views


async def test_refresh_twice_changes_nothing(standin: Hapi) -> None:
    await seed(standin.hapi, 0, 10)
    init(standin.settings.database_url)
    first = await refresh(standin.settings, client=standin.client)
    before = batch_state(standin.settings.database_url)
    built = table(standin.settings.database_url, "SELECT name, built_at FROM rf_batch.views")
    second = await refresh(standin.settings, client=standin.client)
    # Nothing changed: no view was recomputed.
    assert (
        table(standin.settings.database_url, "SELECT name, built_at FROM rf_batch.views") == built
    )
    assert second.changed == 0 and second.since == first.watermark
    after = batch_state(standin.settings.database_url)
    assert after["resources"] == before["resources"] and after["views"] == before["views"]
    assert second.watermark is not None and first.watermark is not None
    assert parse_instant(second.watermark) >= parse_instant(first.watermark)


async def test_incremental_refresh_takes_updates_and_deletes(standin: Hapi) -> None:
    hapi, pg_url = standin.hapi, standin.settings.database_url
    await seed(hapi, 0, 10)
    init(pg_url)
    await refresh(standin.settings, client=standin.client)
    await hapi.update(patient(1, family="Later", gender="unknown"))
    await hapi.update(observation(2, 9.5))
    await hapi.delete("Condition", "c3")
    await hapi.delete("Patient", "p4")
    await seed(hapi, 20, 3)
    result = await refresh(standin.settings, client=standin.client)
    assert result.changed == 4 + 3 * 3 and result.deletes == 2
    for name in shipped_views():
        assert view_rows(pg_url, name) == expected_rows(hapi, name), name
    deleted = table(
        pg_url,
        "SELECT resource_type, id, version_id, resource IS NULL FROM rf_batch.resources"
        " WHERE deleted ORDER BY 1",
    )
    assert deleted == [
        ("Condition", "c3", str(hapi.resources[("Condition", "c3")].version), True),
        ("Patient", "p4", str(hapi.resources[("Patient", "p4")].version), True),
    ]
    assert table(pg_url, "SELECT resources FROM rf_batch.watermark") == [
        (sum(not t.deleted for t in hapi.resources.values()),)
    ]


async def test_watermark_is_hapis_clock(standin: Hapi) -> None:
    standin.hapi.clock_skew = 3600.0  # HAPI's clock is an hour ahead of ours
    await seed(standin.hapi, 0, 2)
    init(standin.settings.database_url)
    before_ms = parse_instant(standin.hapi.now())
    result = await refresh(standin.settings, client=standin.client)
    assert result.watermark is not None
    expected = before_ms - standin.settings.poll_overlap_seconds * 1000
    assert abs(parse_instant(result.watermark) - expected) < 5_000
    assert batch_watermark(standin.settings.database_url) == result.watermark
    assert await batch_watermark_async(standin.settings.database_url) == result.watermark


async def speed_snapshot(store: SpeedStore) -> dict[str, Any]:
    return {t: await store.versions(t) for t in ("Patient", "Condition", "Observation")} | {
        "rejects": await store.reject_count()
    }


async def test_refresh_failing_on_page_two_changes_nothing(
    standin: Hapi, store: SpeedStore
) -> None:
    hapi, pg_url = standin.hapi, standin.settings.database_url
    await seed(hapi, 0, 5)
    init(pg_url)
    await refresh(standin.settings, client=standin.client, store=store)
    for n in range(5, 9):  # in the speed layer only, as the receiver would have them
        await ingest(store, await hapi.update(patient(n)))
    await hapi.update({**patient(99), "gender": "robot"})  # a reject, not to be recorded yet
    await hapi.delete("Observation", "o1")
    await seed(hapi, 30, 5)
    before, speed_before = batch_state(pg_url), await speed_snapshot(store)
    standin.faults.fail = True
    with pytest.raises(FhirTemporaryError):
        await refresh(standin.settings, client=standin.client, store=store)
    assert batch_state(pg_url) == before
    assert await speed_snapshot(store) == speed_before
    # The session lock and staging went with the connection: the next refresh works.
    standin.faults.fail = False
    done = await refresh(standin.settings, client=standin.client, store=store)
    assert done.rejected == 1 and await store.reject_count() == 1
    for name in shipped_views():
        assert view_rows(pg_url, name) == expected_rows(hapi, name), name


async def test_a_nul_character_is_a_reject_not_a_refresh_that_fails_every_night(
    standin: Hapi, store: SpeedStore
) -> None:
    # Valid JSON that HAPI stores, but PostgreSQL's jsonb cannot hold \u0000: taken, it
    # failed every refresh (the COPY into staging) until someone changed the resource.
    hapi, pg_url = standin.hapi, standin.settings.database_url
    await seed(hapi, 0, 2)
    await hapi.update(patient(7, family="a\u0000b"))
    init(pg_url)
    done = await refresh(standin.settings, client=standin.client, store=store)
    assert done.rejected == 1 and await store.reject_count() == 1
    held = table(pg_url, "SELECT id FROM rf_batch.resources WHERE resource_type = 'Patient'")
    assert sorted(held) == [("p0",), ("p1",)]
    assert batch_watermark(pg_url) == done.watermark is not None


async def test_refresh_killed_half_way_changes_nothing(standin: Hapi, store: SpeedStore) -> None:
    hapi, pg_url = standin.hapi, standin.settings.database_url
    await seed(hapi, 0, 5)
    init(pg_url)
    await refresh(standin.settings, client=standin.client, store=store)
    await seed(hapi, 10, 5)
    before, speed_before = batch_state(pg_url), await speed_snapshot(store)
    standin.faults.stall = asyncio.Event()
    task = asyncio.create_task(refresh(standin.settings, client=standin.client, store=store))
    await asyncio.wait_for(standin.faults.stalled.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    standin.faults.stall.set()
    standin.faults.stall = None
    assert batch_state(pg_url) == before
    assert await speed_snapshot(store) == speed_before
    await asyncio.wait_for(refresh(standin.settings, client=standin.client, store=store), 30)
    for name in shipped_views():
        assert view_rows(pg_url, name) == expected_rows(hapi, name), name


async def test_failing_view_rolls_back_the_whole_refresh(standin: Hapi, store: SpeedStore) -> None:
    """A view whose SQL raises during the refresh: resources, views, watermark all stay."""
    hapi, pg_url = standin.hapi, standin.settings.database_url
    views = dict(shipped_views())
    views["family_only"] = load_view(
        {
            "resourceType": "ViewDefinition",
            "name": "family_only",
            "resource": "Patient",
            "select": [{"column": [{"name": "id", "path": "id"},
                                   {"name": "given", "path": "name.given"}]}],
        }
    )  # fmt: skip
    init(pg_url, views)
    await seed(hapi, 0, 3)
    await refresh(standin.settings, client=standin.client, store=store)
    await ingest(store, await hapi.update(patient(1, family="Speed")))
    await hapi.update({**patient(2), "name": [{"given": ["Ann", "Bea"]}]})  # two values
    before, speed_before = batch_state(pg_url), await speed_snapshot(store)
    with pytest.raises(RefreshFailed, match="rolled back"):
        await refresh(standin.settings, client=standin.client, store=store)
    assert batch_state(pg_url) == before
    assert await speed_snapshot(store) == speed_before


# --------------------------------------------------------------------------- trimming


async def test_trim_drops_only_what_the_batch_covers(standin: Hapi, store: SpeedStore) -> None:
    hapi, pg_url = standin.hapi, standin.settings.database_url
    await seed(hapi, 0, 3)
    init(pg_url)
    # What the receiver saw before the refresh: equal versions of p0, c0; an older p1.
    for key in (("Patient", "p0"), ("Condition", "c0")):
        truth = hapi.resources[key]
        assert truth.resource is not None
        await ingest(store, truth.resource)
    old_p1 = {**patient(1), "meta": {"versionId": "1", "lastUpdated": "2001-01-01T00:00:00Z"}}
    await ingest(store, old_p1)
    # The tombstone of a deletion the batch will hold at the same version.
    version = await hapi.delete("Observation", "o2")
    await ingest_deletion(store, "Observation", "o2", version_id=str(version), last_updated=None)
    # Newer than anything the refresh will read, and one the batch never saw.
    newer = {**patient(2), "meta": {"versionId": "77", "lastUpdated": "2999-01-01T00:00:00Z"}}
    await ingest(store, newer)
    await ingest(store, {**patient(50), "meta": {"versionId": "1"}})
    result = await refresh(standin.settings, client=standin.client, store=store)
    assert result.trimmed == 4
    assert await store.get("Patient", "p0") is None
    assert await store.get("Condition", "c0") is None
    assert await store.get("Patient", "p1") is None
    assert await store.get("Observation", "o2") is None
    kept = await store.get("Patient", "p2")
    assert kept is not None and kept.version_id == "77"
    assert await store.get("Patient", "p50") is not None
    assert table(pg_url, "SELECT count(*) FROM rf_batch.resources WHERE id = 'p50'") == [(0,)]


# --------------------------------------------------------------------------- --full


async def test_full_refresh_marks_what_hapi_lost_as_deleted(
    standin: Hapi, store: SpeedStore
) -> None:
    hapi, pg_url = standin.hapi, standin.settings.database_url
    await seed(hapi, 0, 10)
    init(pg_url)
    await refresh(standin.settings, client=standin.client, store=store)
    # A row HAPI never had (expunged there, say), and a speed entry at its version.
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO rf_batch.resources VALUES ('Patient', 'gone', '3', 3,"
            " '2020-01-01T00:00:00Z', %s, false, %s)",
            (parse_instant("2020-01-01T00:00:00Z"), psycopg.types.json.Jsonb(patient(77))),
        )
    await ingest(
        store,
        {**patient(0), "id": "gone", "meta": {"versionId": "3",
                                             "lastUpdated": "2020-01-01T00:00:00Z"}},
    )  # fmt: skip
    version = await hapi.delete("Condition", "c5")
    await ingest_deletion(store, "Condition", "c5", version_id=str(version), last_updated=None)
    await hapi.update(patient(3, family="Full"))
    result = await refresh(standin.settings, client=standin.client, store=store, full=True)
    assert result.full and result.since is None
    assert result.marked_deleted == 1  # "gone": HAPI has no trace of it
    assert result.deletes == 1  # c5: HAPI's deletion, at its version
    rows = dict(
        ((t, i), (d, has))
        for t, i, d, has in table(
            pg_url,
            "SELECT resource_type, id, deleted, resource IS NOT NULL FROM rf_batch.resources",
        )
    )
    assert rows[("Patient", "gone")] == (True, True)  # last content kept
    assert rows[("Condition", "c5")] == (True, False)
    assert await store.get("Condition", "c5") is None
    for name in shipped_views():
        assert view_rows(pg_url, name) == expected_rows(hapi, name), name
    # The batch never saw "gone" deleted at version 3: the speed entry at 3 stays.
    assert await store.get("Patient", "gone") is not None
    again = await refresh(standin.settings, client=standin.client, full=True)
    assert again.marked_deleted == 0 and again.changed == 0
