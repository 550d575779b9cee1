"""The incremental batch refresh: what it leaves equals a full rebuild and the oracle.

Random sequences of creates, updates and deletes on a stand-in HAPI, refreshed after some of
them: each view's table must hold exactly the rows a full recompute gives (every column,
the resource key and the derived ones included), and /cohort on the batch layer alone what
`tests.oracle.cohort` computes from HAPI's resources (an independent path). Then: a reader
never sees a half-applied refresh, a failure midway leaves rows, counts and watermark as
they were, rows of resources that did not change are not rewritten, and `--full` rebuilds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import hypothesis.internal.conjecture.optimiser  # noqa: F401  (imported early: imported late, deep in a run, it trips a CPython 3.11.7 AST bug)
import hypothesis.strategies as st
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from psycopg import sql

from core.serve import serve_asgi
from core.settings import Settings
from serving import batch
from serving.batch_refresh import RefreshFailed, refresh
from serving.cohort import TEXT_INDEX, parse_query
from serving.merge import BatchCounts, SpeedView, cohort
from serving.viewdef import shipped_views
from subscriptions.fhir_client import FhirClient
from subscriptions.standin.hapi import StandInHapi
from tests.conftest import fresh_database
from tests.layers import verification_status
from tests.oracle import cohort as oracle_cohort

GENDERS = ["male", "female", "other", "unknown"]
# Whole dates, months and years: a partial date is the range it covers.
BIRTH_DATES = ["1970", "1970-02", "1970-02-28", "1971-12-31", "1969-06", "1980-01-01", None]
CODES = [("http://snomed.info/sct", "44054006"), ("http://snomed.info/sct", "38341003")]
# Displays of the codes (condition-text searches them too), None: a coding without one.
DISPLAYS = [None, "Hypertensive disorder", "Heart disease of the Stomach"]
# Texts that share words, texts found once, a text equal to a display once folded, None.
TEXTS = [
    "Diabetes mellitus",
    "Heart failure",
    "STRASSE straße",
    "100% of_it",
    "heartburn",
    "HEART DISEASE OF THE STOMACH",
    None,
]
QUERIES = [
    [("birthdate", "ge1970-02-01"), ("birthdate", "lt1971")],
    [("birthdate", "eq1970")],
    [("birthdate", "le1970-02"), ("gender", "male,female")],
    [("birthdate", "ne1970-02-28")],
    [("birthdate", "gt1970-02-28")],
    [("condition-text", "heart")],
    [("condition-text", "strasse")],
    [("condition-text", "0%"), ("gender", "other")],
    [("condition-text", "stomach,mellitus")],
    [("condition-text", "hypertensive")],
    [("condition", "http://snomed.info/sct|44054006")],
    [("gender", "female"), ("condition", "38341003")],
]


def patient(n: int, gender: int, birth: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Patient", "id": f"p{n}", "gender": GENDERS[gender]}
    if birth is not None:
        out["birthDate"] = birth
    return out


def condition(
    n: int, subject: int, code: int, text: int, display: int = 0, error: bool = False
) -> dict[str, Any]:
    system, value = CODES[code]
    coding = {"system": system, "code": value}
    if DISPLAYS[display] is not None:
        coding["display"] = DISPLAYS[display]
    out: dict[str, Any] = {
        "resourceType": "Condition",
        "id": f"c{n}",
        "subject": {"reference": f"Patient/p{subject}"},
        "code": {"coding": [coding]},
    }
    if TEXTS[text] is not None:
        out["code"]["text"] = TEXTS[text]
    if error:  # never counted: neither its text nor its display makes a member
        out["verificationStatus"] = verification_status("entered-in-error")
    return out


# One step: ("patient", n, gender, birth) | ("condition", n, subject, code, text, display,
#           entered in error) | ("delete", type, n) | ("refresh", full)
STEPS = st.one_of(
    st.tuples(
        st.just("patient"),
        st.integers(0, 5),
        st.integers(0, 3),
        st.sampled_from(BIRTH_DATES),
    ),
    st.tuples(
        st.just("condition"),
        st.integers(0, 7),
        st.integers(0, 5),
        st.integers(0, 1),
        st.integers(0, len(TEXTS) - 1),
        st.integers(0, len(DISPLAYS) - 1),
        st.booleans(),
    ),
    st.tuples(st.just("delete"), st.sampled_from(["Patient", "Condition"]), st.integers(0, 7)),
    st.tuples(st.just("refresh"), st.sampled_from([False, False, False, True])),
)


@dataclass
class Rig:
    hapi: StandInHapi
    client: FhirClient
    settings: Settings


@contextlib.asynccontextmanager
async def rig(database_url: str) -> AsyncIterator[Rig]:
    hapi = StandInHapi()
    try:
        async with serve_asgi(hapi.app, path="/fhir") as base_url:
            hapi.base_url = base_url
            settings = Settings(database_url=database_url, fhir_base_url=base_url)
            async with FhirClient(base_url, max_retries=1, backoff_initial=0.01) as client:
                yield Rig(hapi, client, settings)
    finally:
        await hapi.aclose()


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database("rf_batch_incr") as url:
        yield url


def table_rows(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """Every row of every view's table, as text (all columns), sorted; and condition-text's
    text index: its texts (each once, none without a row) and its rows by text."""
    out = {}
    for name in shipped_views():
        rows = conn.execute(
            sql.SQL("SELECT t::text FROM {} AS t").format(sql.Identifier("sqlonfhir", name))
        ).fetchall()
        out[name] = sorted(r[0] for r in rows)
    texts = conn.execute(f"SELECT text FROM {TEXT_INDEX.texts}".encode()).fetchall()
    out["text index: texts"] = sorted(r[0] for r in texts)
    rows = conn.execute(
        f"SELECT t.text, r.patient_id, r.resource_id FROM {TEXT_INDEX.rows} AS r"
        f" JOIN {TEXT_INDEX.texts} AS t ON t.id = r.text_id".encode()
    ).fetchall()
    out["text index: rows"] = sorted(str(r) for r in rows)
    return out


def text_index_from_view(conn: psycopg.Connection[Any]) -> tuple[list[str], list[str]]:
    """The text index as its definition says, from the view's rows in Python: each counting
    row with a patient gives (folded text, patient, resource) per folded text or display."""
    rows = conn.execute(
        "SELECT code_text, code_display, verification_status, patient_id, _resource_id"
        " FROM sqlonfhir.condition_simple"
    ).fetchall()
    entries = [
        (t.casefold(), patient, rid)  # Unicode default case folding, as tests/oracle.py
        for text, display, status, patient, rid in rows
        if patient is not None and status != "entered-in-error"
        for t in (text, display)
        if t is not None
    ]
    return sorted({e[0] for e in entries}), sorted(str(e) for e in entries)


def rebuilt_rows(database_url: str) -> dict[str, list[str]]:
    """The tables as a full rebuild from rf_batch.resources leaves them (rolled back)."""
    with psycopg.connect(database_url) as conn:
        batch.rebuild_views(conn)
        rows = table_rows(conn)
        conn.rollback()
    return rows


def current_rows(database_url: str) -> dict[str, list[str]]:
    with psycopg.connect(database_url) as conn:
        return table_rows(conn)


def counts(database_url: str) -> tuple[Any, ...]:
    with psycopg.connect(database_url) as conn:
        views = conn.execute("SELECT name, rows FROM rf_batch.views ORDER BY name").fetchall()
        held = conn.execute(batch.WATERMARK_SQL).fetchone()
    return tuple(views), held


async def batch_answer(database_url: str, params: list[tuple[str, str]]) -> list[str]:
    query = parse_query([*params, ("_count", "10000")])
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        async with conn.transaction():
            answer = await cohort(conn, query, SpeedView(None, None, False), BatchCounts())
    return answer.patient_ids


def hapi_now(hapi: StandInHapi) -> dict[tuple[str, str], Any]:
    return {k: t.resource for k, t in hapi.resources.items() if t.resource is not None}


async def check_against_rebuild_and_oracle(r: Rig) -> None:
    url = r.settings.database_url
    now = current_rows(url)
    assert now == rebuilt_rows(url)
    with psycopg.connect(url) as conn:
        texts, text_rows = text_index_from_view(conn)
    assert now["text index: texts"] == texts
    assert now["text index: rows"] == text_rows
    with psycopg.connect(url) as conn:
        rows = dict(conn.execute("SELECT name, rows FROM rf_batch.views").fetchall())
        held = conn.execute("SELECT resources FROM rf_batch.watermark").fetchone()
    assert rows == {name: len(v) for name, v in now.items() if name in rows}
    assert held == (len(hapi_now(r.hapi)),)
    for params in QUERIES:
        assert await batch_answer(url, params) == oracle_cohort(hapi_now(r.hapi), params), params


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(STEPS, min_size=1, max_size=18))
async def test_incremental_equals_full_rebuild_and_oracle(
    database: str, steps: list[tuple[Any, ...]]
) -> None:
    batch.drop(database)
    batch.init(database)
    async with rig(database) as r:
        for step in [*steps, ("refresh",)]:
            if step[0] == "patient":
                await r.hapi.update(patient(*step[1:]))
            elif step[0] == "condition":
                await r.hapi.update(condition(*step[1:]))
            elif step[0] == "delete":
                if (step[1], f"{step[1][0].lower()}{step[2]}") in r.hapi.resources:
                    await r.hapi.delete(step[1], f"{step[1][0].lower()}{step[2]}")
            else:
                await refresh(r.settings, client=r.client, full=bool(step[1:] and step[1]))
                await check_against_rebuild_and_oracle(r)


async def test_unchanged_resources_keep_their_rows(pg_url: str) -> None:
    """A refresh rewrites only the rows of the resources that changed (their xmin moves)."""
    batch.init(pg_url)
    async with rig(pg_url) as r:
        for n in range(6):
            await r.hapi.update(patient(n, n % 4, "1970-02"))
            await r.hapi.update(condition(n, n, n % 2, n % len(TEXTS)))
        await refresh(r.settings, client=r.client)
        query = "SELECT _resource_id, xmin::text FROM sqlonfhir.{} ORDER BY 1"
        before = {
            n: dict(table(pg_url, query.format(n)))
            for n in ("patient_demographics", "condition_simple")
        }
        await r.hapi.update(patient(1, 0, "1999"))
        await r.hapi.delete("Condition", "c2")
        result = await refresh(r.settings, client=r.client)
        assert result.changed == 2 and result.deletes == 1
        after = {n: dict(table(pg_url, query.format(n))) for n in before}
        patients, conditions = after["patient_demographics"], after["condition_simple"]
        assert "c2" not in conditions and set(conditions) == set(before["condition_simple"]) - {
            "c2"
        }
        for rid, xmin in patients.items():
            assert (xmin == before["patient_demographics"][rid]) == (rid != "p1"), rid
        assert conditions == {k: v for k, v in before["condition_simple"].items() if k != "c2"}
        assert table(pg_url, "SELECT birth_date_low, birth_date_high FROM"
                     " sqlonfhir.patient_demographics WHERE id = 'p1'") == [
            ("1999-01-01", "1999-12-31")
        ]  # fmt: skip
        await check_against_rebuild_and_oracle(r)


def table(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query.encode()).fetchall()


async def test_reader_sees_all_or_nothing_of_a_refresh(pg_url: str) -> None:
    """Held mid-way (the last view's table locked against writes by another session), the
    refresh has replaced the patients' rows in its transaction: a reader still sees the old
    rows, counts and watermark; once it commits, all the new ones."""
    batch.init(pg_url)
    async with rig(pg_url) as r:
        for n in range(4):
            await r.hapi.update(patient(n, 0, "1970"))
        await refresh(r.settings, client=r.client)
        before_rows, before_counts = current_rows(pg_url), counts(pg_url)
        for n in range(4):
            await r.hapi.update(patient(n, 1, "1980-05-06"))
        await r.hapi.update({"resourceType": "Observation", "id": "o1", "status": "final",
                             "code": {"text": "x"}})  # fmt: skip
        with psycopg.connect(pg_url) as blocker:
            # SHARE blocks the refresh's DELETE/INSERT on this table, not readers.
            blocker.execute("LOCK TABLE sqlonfhir.observation_simple IN SHARE MODE")
            task = asyncio.create_task(refresh(r.settings, client=r.client))
            for _ in range(300):
                waiting = table(
                    pg_url,
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"
                    " AND relation = 'sqlonfhir.observation_simple'::regclass",
                )
                if waiting[0][0] or task.done():
                    break
                await asyncio.sleep(0.05)
            assert not task.done() and waiting[0][0] == 1
            # patient_demographics (sorted first) is already replaced inside the refresh.
            assert current_rows(pg_url) == before_rows
            assert counts(pg_url) == before_counts
            blocker.rollback()
        await asyncio.wait_for(task, 30)
        after = current_rows(pg_url)
        assert after != before_rows and counts(pg_url) != before_counts
        await check_against_rebuild_and_oracle(r)


async def test_failure_midway_leaves_everything(pg_url: str) -> None:
    """The last view's change SQL fails after the others replaced their rows: resources,
    rows, counts and watermark are as before, and the next refresh (fixed) applies it all."""
    batch.init(pg_url)
    async with rig(pg_url) as r:
        for n in range(3):
            await r.hapi.update(patient(n, 0, "1970"))
            await r.hapi.update(condition(n, n, 0, 0))
        await refresh(r.settings, client=r.client)
        before_rows, before_counts = current_rows(pg_url), counts(pg_url)
        resources = table(pg_url, "SELECT * FROM rf_batch.resources ORDER BY 1, 2")
        await r.hapi.update(patient(0, 2, "2001"))
        await r.hapi.delete("Condition", "c1")
        await r.hapi.update({"resourceType": "Observation", "id": "o1", "status": "final",
                             "code": {"text": "x"}})  # fmt: skip
        with psycopg.connect(pg_url) as conn:
            good = conn.execute(
                "SELECT changes_sql FROM rf_batch.views WHERE name = 'observation_simple'"
            ).fetchone()
            conn.execute(
                "UPDATE rf_batch.views SET changes_sql = 'SELECT 1/0' WHERE name ="
                " 'observation_simple'"
            )
        with pytest.raises(RefreshFailed, match="rolled back: division by zero"):
            await refresh(r.settings, client=r.client)
        assert current_rows(pg_url) == before_rows
        assert counts(pg_url) == before_counts
        assert table(pg_url, "SELECT * FROM rf_batch.resources ORDER BY 1, 2") == resources
        with psycopg.connect(pg_url) as conn:
            conn.execute(
                "UPDATE rf_batch.views SET changes_sql = %s WHERE name = 'observation_simple'",
                good,
            )
        await refresh(r.settings, client=r.client)
        await check_against_rebuild_and_oracle(r)


async def test_full_refresh_rebuilds_every_view(pg_url: str) -> None:
    """`--full` recomputes every row (a table damaged by hand is whole again)."""
    batch.init(pg_url)
    async with rig(pg_url) as r:
        for n in range(5):
            await r.hapi.update(patient(n, n % 4, BIRTH_DATES[n]))
            await r.hapi.update(condition(n, n, n % 2, n))
        await r.hapi.delete("Patient", "p3")
        await refresh(r.settings, client=r.client)
        good = current_rows(pg_url)
        with psycopg.connect(pg_url) as conn:
            conn.execute("DELETE FROM sqlonfhir.condition_simple WHERE _resource_id = 'c1'")
            conn.execute("UPDATE sqlonfhir.patient_demographics SET birth_date_low = NULL")
            conn.execute(f"DELETE FROM {TEXT_INDEX.rows} WHERE resource_id = 'c2'".encode())
        quiet = await refresh(r.settings, client=r.client)
        assert quiet.changed == 0 and current_rows(pg_url) != good  # nothing new: untouched
        full = await refresh(r.settings, client=r.client, full=True)
        assert full.full and full.views == {n: len(good[n]) for n in shipped_views()}
        assert current_rows(pg_url) == good
        await check_against_rebuild_and_oracle(r)


async def test_a_batch_layer_without_the_text_index_is_refreshed_without_one(
    pg_url: str,
) -> None:
    """A batch layer an older release built has no text index beside condition_simple (until
    `batch init`): an incremental refresh, a full one and a rebuild keep the view current and
    build none. (Taken to be there, the incremental refresh would write into tables that do
    not exist, and the full one and the rebuild would build it.) With the text index, the
    refreshes keep it current: `check_against_rebuild_and_oracle` in the tests above."""

    def conditions_and_text_index() -> tuple[list[str], Any]:
        with psycopg.connect(pg_url) as conn:
            ids = conn.execute("SELECT _resource_id FROM sqlonfhir.condition_simple ORDER BY 1")
            present = conn.execute(
                "SELECT to_regclass(%s), to_regclass(%s)", (TEXT_INDEX.rows, TEXT_INDEX.texts)
            ).fetchone()
            return [str(i[0]) for i in ids.fetchall()], present

    batch.init(pg_url)
    async with rig(pg_url) as r:
        await r.hapi.update(patient(0, 0, "1970"))
        await r.hapi.update(condition(0, 0, 0, 0))
        await refresh(r.settings, client=r.client)
        with psycopg.connect(pg_url) as conn:
            conn.execute(f"DROP TABLE {TEXT_INDEX.rows}, {TEXT_INDEX.texts}".encode())
        await r.hapi.update(condition(1, 0, 1, 1))
        incremental = await refresh(r.settings, client=r.client)
        assert incremental.changed == 1 and not incremental.full
        assert conditions_and_text_index() == (["c0", "c1"], (None, None))
        await r.hapi.update(condition(2, 0, 0, 2))
        full = await refresh(r.settings, client=r.client, full=True)
        assert full.full and full.views["condition_simple"] == 3
        assert conditions_and_text_index() == (["c0", "c1", "c2"], (None, None))
        with psycopg.connect(pg_url) as conn:
            assert batch.rebuild_views(conn)["condition_simple"] == 3
        assert conditions_and_text_index() == (["c0", "c1", "c2"], (None, None))


async def test_rebuild_view_of_an_unknown_view(pg_url: str) -> None:
    batch.init(pg_url)
    with psycopg.connect(pg_url) as conn, pytest.raises(KeyError, match="batch init"):
        batch.rebuild_view(conn, "no_such_view")
