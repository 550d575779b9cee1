"""A whole rebuild of the views (`batch.rebuild_views`, `batch refresh --full`, `batch init`):
each view is built into a fresh table, indexed, and swapped in under its name just before the
commit. The swapped-in table keeps the old one's indexes and grants; a rebuild that fails
midway leaves the old tables serving; and a serving snapshot opened before the swap never
reads a swapped-in table whose rows it cannot see (it would find it empty).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from core.fhir_values import dumps
from serving import batch
from serving.batch_refresh import RefreshFailed, refresh
from serving.merge import begin_snapshot
from tests.conftest import fresh_database
from tests.test_batch_incremental import rig

PATIENTS = {"p1": "male", "p2": "female", "p3": "other"}
CONDITIONS = {"c1": "p1", "c2": "p3"}


def _insert(conn: psycopg.Connection[Any], resource: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO rf_batch.resources (resource_type, id, version_id, version_number,"
        " last_updated, last_updated_ms, deleted, resource)"
        " VALUES (%s, %s, '1', 1, '2024-01-01T00:00:00Z', 1704067200000, false, %s::jsonb)",
        (resource["resourceType"], resource["id"], dumps(resource).decode()),
    )


@pytest.fixture
def built() -> Iterator[str]:
    """A batch layer holding three Patients and two Conditions, its views built."""
    with fresh_database("rf_rebuild") as url:
        with psycopg.connect(url) as conn:
            conn.execute(batch.SCHEMA_SQL.encode())
            for pid, gender in PATIENTS.items():
                _insert(conn, {"resourceType": "Patient", "id": pid, "gender": gender})
            for cid, subject in CONDITIONS.items():
                _insert(
                    conn,
                    {
                        "resourceType": "Condition",
                        "id": cid,
                        "subject": {"reference": f"Patient/{subject}"},
                        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]},
                    },
                )
        batch.init(url)
        yield url


def _genders(conn: psycopg.Connection[Any]) -> dict[str, str]:
    rows = conn.execute("SELECT id, gender FROM sqlonfhir.patient_demographics").fetchall()
    return {str(i): str(g) for i, g in rows}


def _catalog(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The views' tables as the catalog has them: indexes (name, definition), grants, and
    any relation of the schema that is no view's table."""
    indexes = conn.execute(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'sqlonfhir'"
        " ORDER BY 1, 2"
    ).fetchall()
    grants = conn.execute(
        "SELECT c.relname, c.relacl::text FROM pg_class AS c JOIN pg_namespace AS n"
        " ON n.oid = c.relnamespace WHERE n.nspname = 'sqlonfhir' AND c.relkind = 'r'"
        " ORDER BY 1"
    ).fetchall()
    others = conn.execute(
        "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'sqlonfhir' AND c.relkind = 'r'"
        " AND c.relname NOT IN (SELECT name FROM rf_batch.views)"
    ).fetchall()
    return {"indexes": indexes, "grants": grants, "others": others}


def test_rebuild_keeps_indexes_and_grants_and_takes_the_new_rows(built: str) -> None:
    with psycopg.connect(built) as conn:
        conn.execute("GRANT SELECT ON sqlonfhir.patient_demographics TO PUBLIC")
        conn.commit()
        before = _catalog(conn)
        assert any(name == "patient_demographics_gender" for _, name, _ in before["indexes"])
        conn.execute(
            "UPDATE rf_batch.resources SET resource = jsonb_set(resource, '{gender}',"
            " '\"unknown\"') WHERE id = 'p2'"
        )
        rows = batch.rebuild_views(conn)
        conn.commit()
        assert rows == {"condition_simple": 2, "observation_simple": 0, "patient_demographics": 3}
        assert _genders(conn) == {"p1": "male", "p2": "unknown", "p3": "other"}
        after = _catalog(conn)
        assert after == before
        assert "=r/" in dict(after["grants"])["patient_demographics"]  # PUBLIC's SELECT
        assert after["others"] == []
        recorded = conn.execute("SELECT name, rows FROM rf_batch.views ORDER BY name").fetchall()
        assert recorded == sorted(rows.items())


def test_a_rebuild_failing_midway_leaves_the_old_tables_serving(built: str) -> None:
    with psycopg.connect(built) as conn:
        before = _catalog(conn)
        oids = conn.execute(
            "SELECT relname, oid FROM pg_class WHERE relnamespace = 'sqlonfhir'::regnamespace"
            " AND relkind = 'r' ORDER BY 1"
        ).fetchall()
        conn.execute("UPDATE rf_batch.resources SET deleted = true WHERE id = 'p1'")
        # The last view built fails: the two before it are built fresh, not yet swapped in.
        conn.execute(
            "UPDATE rf_batch.views SET rebuild_sql = 'SELECT 1 / (count(*) - count(*)) AS x"
            " FROM rf_batch.resources' WHERE name = 'patient_demographics'"
        )
        conn.commit()
        with pytest.raises(psycopg.errors.DivisionByZero):
            batch.rebuild_views(conn)
        conn.rollback()
        assert _genders(conn) == PATIENTS
        assert conn.execute("SELECT count(*) FROM sqlonfhir.condition_simple").fetchone() == (2,)
        assert _catalog(conn) == before
        assert (
            conn.execute(
                "SELECT relname, oid FROM pg_class WHERE relnamespace ="
                " 'sqlonfhir'::regnamespace AND relkind = 'r' ORDER BY 1"
            ).fetchall()
            == oids
        )


async def test_a_full_refresh_failing_midway_changes_nothing(built: str) -> None:
    with psycopg.connect(built, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rf_batch.watermark VALUES (1, '2024-01-01T00:00:00Z', now(), 5)"
            " ON CONFLICT (id) DO NOTHING"
        )
        conn.execute(
            "UPDATE rf_batch.views SET rebuild_sql = 'SELECT 1 / (count(*) - count(*)) AS x"
            " FROM rf_batch.resources' WHERE name = 'patient_demographics'"
        )
        before = _catalog(conn)
        watermark = conn.execute(batch.WATERMARK_SQL).fetchone()
    async with rig(built) as r:
        await r.hapi.update({"resourceType": "Patient", "id": "p9", "gender": "female"})
        with pytest.raises(RefreshFailed):
            await refresh(r.settings, client=r.client, full=True)
    with psycopg.connect(built, autocommit=True) as conn:
        assert _genders(conn) == PATIENTS
        assert _catalog(conn) == before
        assert conn.execute(batch.WATERMARK_SQL).fetchone() == watermark
        assert conn.execute("SELECT count(*) FROM rf_batch.resources").fetchone() == (5,)


async def _until_one_waits_for_the_lock(url: str, finished: Callable[[], bool]) -> None:
    """Return once a transaction waits for rf_batch.watermark's lock (the lock the swap and
    a serving snapshot take), or `finished()`; at the most 30 s (600 polls 50 ms apart)."""
    with psycopg.connect(url, autocommit=True) as watcher:
        for _ in range(600):
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_locks WHERE NOT granted"
                " AND relation = 'rf_batch.watermark'::regclass"
            ).fetchone()
            if (waiting and waiting[0]) or finished():
                return
            await asyncio.sleep(0.05)


async def _patient_ids(reader: psycopg.AsyncConnection[Any]) -> list[str]:
    cur = await reader.execute("SELECT id FROM sqlonfhir.patient_demographics ORDER BY id")
    return [r[0] for r in await cur.fetchall()]


async def test_a_serving_snapshot_opened_before_a_swap_reads_the_old_rows(built: str) -> None:
    """The swap waits for the open snapshot; the snapshot reads the old table's rows (had the
    swap gone ahead, it would read the fresh table and find none of its rows visible)."""
    reader = await psycopg.AsyncConnection.connect(built)
    done = threading.Event()
    failures: list[BaseException] = []

    def rebuild() -> None:
        try:
            with psycopg.connect(built) as conn:
                conn.execute("UPDATE rf_batch.resources SET deleted = true WHERE id = 'p1'")
                batch.rebuild_views(conn)
        except BaseException as exc:  # reported by the test below
            failures.append(exc)
        finally:
            done.set()

    try:
        await begin_snapshot(reader)
        writer = threading.Thread(target=rebuild)
        writer.start()
        await _until_one_waits_for_the_lock(built, done.is_set)  # the rebuild, for the snapshot
        assert not done.is_set(), failures
        assert await _patient_ids(reader) == sorted(PATIENTS)
        await reader.commit()
        await asyncio.to_thread(writer.join, 60)
        assert done.is_set() and not failures
        await begin_snapshot(reader)
        assert await _patient_ids(reader) == ["p2", "p3"]
        await reader.commit()
    finally:
        await reader.close()


async def test_a_serving_snapshot_begun_during_a_swap_sees_all_of_it(built: str) -> None:
    """A snapshot begun while the swap holds its lock waits for the commit and then reads
    the new rows (taken before the wait, it would read the fresh table and see none)."""
    reader = await psycopg.AsyncConnection.connect(built)
    try:
        with psycopg.connect(built) as writer:
            writer.execute("UPDATE rf_batch.resources SET deleted = true WHERE id = 'p1'")
            batch.rebuild_views(writer)  # swapped in, not yet committed

            async def read() -> list[str]:
                await begin_snapshot(reader)
                return await _patient_ids(reader)

            task = asyncio.create_task(read())
            await _until_one_waits_for_the_lock(built, task.done)  # the snapshot, for the swap
            assert not task.done()
            writer.commit()
        assert await asyncio.wait_for(task, 60) == ["p2", "p3"]
        await reader.commit()
    finally:
        await reader.close()
