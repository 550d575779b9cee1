"""The mirror synced for some types only: what it reads is never stale for the types asked.

A /cohort query syncs Patient and its parameters' types, a view's rows sync the view's type
(`SpeedMirror.sync(store, resource_types)`, then `sync_batch(conn, key, resource_types)`). A type left out of a sync keeps what it read; the
speed layer may meanwhile lose everything and get a new epoch. Checked against what was
written to Redis (the test's own record), never against another mirror.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest

from core.store import SpeedStore
from receiver.ingest import ingest, ingest_deletion
from serving import batch
from serving.mirror import SpeedMirror
from tests.conftest import empty_redis, fresh_database, redis_db

SYNC_REDIS_URL = redis_db(5)


@pytest.fixture
async def store() -> AsyncIterator[SpeedStore]:
    async with empty_redis(SYNC_REDIS_URL) as client:
        store = SpeedStore(client)
        await store.mark_epoch()
        yield store


def _patient(pid: str) -> dict[str, str]:
    return {"resourceType": "Patient", "id": pid, "gender": "male"}


def _condition(cid: str, pid: str) -> dict[str, object]:
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": f"Patient/{pid}"}}


async def test_a_type_left_out_is_read_whole_after_a_new_epoch(store: SpeedStore) -> None:
    await ingest(store, _patient("p1"))
    await ingest(store, _condition("c1", "p1"))
    mirror = SpeedMirror()
    assert await mirror.sync(store)
    assert set(mirror.types["Condition"].entries) == {"c1"}

    # The speed layer is lost and marked complete again; a Patient-only sync sees the new
    # epoch first. The Condition mirror, not synced then, still holds c1.
    await store.client.flushdb()
    await store.mark_epoch()
    await ingest(store, _patient("p2"))
    # Enough writes that every bucket's write counter is at least what it was before the
    # loss: the counters alone cannot tell that c1 is gone.
    new = {f"c{n}" for n in range(2, 202)}
    for cid in sorted(new):
        await ingest(store, _condition(cid, "p2"))
    assert await mirror.sync(store, {"Patient"})
    assert set(mirror.types["Patient"].entries) == {"p2"}
    assert set(mirror.types["Condition"].entries) == {"c1"}  # left out: kept as it was

    # Asked next, Condition is read whole for the new epoch: c1 gone.
    assert await mirror.sync(store, {"Condition"})
    assert set(mirror.types["Condition"].entries) == new


async def test_a_type_left_out_catches_up_on_its_writes(store: SpeedStore) -> None:
    mirror = SpeedMirror()
    assert await mirror.sync(store)
    written: set[str] = set()
    for n in range(40):
        await ingest(store, _condition(f"c{n}", "p1"))
        written.add(f"c{n}")
        if n % 3 == 0:
            await ingest_deletion(
                store, "Condition", f"c{n}", version_id="2", last_updated="2026-01-01T00:00:00Z"
            )
            written.discard(f"c{n}")
        await ingest(store, _patient(f"p{n}"))
        # Patient only, most of the time: Condition's writes pile up unread.
        assert await mirror.sync(store, {"Patient"} if n % 7 else None)
        assert len(mirror.types["Patient"].entries) == n + 1
    assert await mirror.sync(store, ["Condition"])
    present = {rid for rid, held in mirror.types["Condition"].entries.items() if not held.deleted}
    assert present == written


async def test_an_unknown_type_asked_syncs_nothing_else(store: SpeedStore) -> None:
    await ingest(store, _patient("p1"))
    mirror = SpeedMirror()
    assert await mirror.sync(store, {"Encounter"})  # no such mirrored type: nothing read
    assert mirror.types["Patient"].entries == {}
    assert await mirror.sync(store, {"Patient", "Encounter"})
    assert set(mirror.types["Patient"].entries) == {"p1"}


async def test_batch_versions_are_looked_up_for_the_types_asked() -> None:
    """After a new batch snapshot each type's speed ids are looked up when a query of that
    type asks, not before (a Patient query after a refresh does not wait for Conditions)."""
    with fresh_database("rf_mirror_sync") as url:
        batch.init(url)
        async with empty_redis(SYNC_REDIS_URL) as client:
            store = SpeedStore(client)
            await store.mark_epoch()
            await ingest(store, _patient("p1"))
            await ingest(store, _condition("c1", "p1"))
            mirror = SpeedMirror()
            assert await mirror.sync(store)
            patients, conditions = mirror.types["Patient"], mirror.types["Condition"]
            async with await psycopg.AsyncConnection.connect(url) as conn:
                await mirror.sync_batch(conn, ("snapshot 1",), {"Patient"})
                assert patients.unchecked == set() and conditions.unchecked == {"c1"}
                assert patients.winning == {"p1"} and conditions.winning == set()
                await mirror.sync_batch(conn, ("snapshot 1",), ["Condition"])
                assert conditions.unchecked == set() and conditions.winning == {"c1"}
                # A new snapshot: every type's ids are unchecked again until asked.
                await mirror.sync_batch(conn, ("snapshot 2",), {"Condition"})
                assert patients.unchecked == {"p1"} and conditions.unchecked == set()
                await mirror.sync_batch(conn, ("snapshot 2",))
                assert patients.unchecked == set() and patients.winning == {"p1"}
