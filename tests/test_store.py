"""The speed-layer store against a real Redis: version order, tombstones, trims, indexes."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import Issue
from core.fhir_values import format_instant, instant_of_ms, parse_instant
from core.store import (
    BUCKETS,
    LOG_CHUNK,
    OLD_EPOCH_KEY,
    Derived,
    SpeedStore,
    bucket_of,
    is_newer,
    tag,
    version_number,
)
from tests.conftest import TEST_REDIS_URL


def body(pid: str, version: int) -> bytes:
    return json.dumps(
        {
            "resourceType": "Patient",
            "id": pid,
            "meta": {"versionId": str(version)},
            "gender": "male",
        }
    ).encode()


async def write(store: SpeedStore, pid: str, version: int, deleted: bool) -> bool:
    return await store.upsert(
        "Patient",
        pid,
        body=None if deleted else body(pid, version),
        version_id=str(version),
        last_updated=f"2026-11-25T10:{version:02d}:00Z",
        deleted=deleted,
        derived=Derived(rows={"v": f'[{{"v":{version}}}]'.encode()}),
    )


# (version, deleted) events: every version has one fixed meaning (HAPI never reuses one).
events = st.lists(
    st.tuples(st.integers(min_value=1, max_value=12), st.booleans()), min_size=1, max_size=30
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(history=events, data=st.data())
def test_any_order_of_any_multiset_ends_in_the_newest_state(
    history: list[tuple[int, bool]], data: Any
) -> None:
    truth = {v: d for v, d in history}  # one meaning per version
    deliveries = [(v, truth[v]) for v, _ in history]
    deliveries += data.draw(st.lists(st.sampled_from(deliveries), max_size=10))  # duplicates
    order = data.draw(st.permutations(deliveries))

    async def run() -> None:
        client = aioredis.Redis.from_url(TEST_REDIS_URL)
        await client.flushdb()
        try:
            store = SpeedStore(client)
            for version, deleted in order:
                await write(store, "p1", version, deleted)
            newest = max(truth)
            entry = await store.get("Patient", "p1")
            assert entry is not None
            assert entry.version_id == str(newest)
            assert entry.state == ("deleted" if truth[newest] else "present")
            rows = await store.rows("Patient", "v")
            if truth[newest]:
                assert rows == {}
            else:
                assert json.loads(rows["p1"]) == [{"v": newest}]
            versions = await store.versions("Patient")
            assert versions["p1"].version_id == str(newest)
        finally:
            await client.flushdb()
            await client.aclose()

    asyncio.run(run())


async def test_trim_keeps_entries_newer_than_the_batch(store: SpeedStore) -> None:
    await write(store, "a", 2, False)
    await write(store, "b", 5, False)
    await write(store, "c", 3, True)
    removed = await store.trim_covered(
        "Patient", [("a", 2.0, 0.0), ("b", 4.0, 0.0), ("c", 3.0, 0.0), ("zzz", 1.0, 0.0)]
    )
    assert removed == 2
    assert await store.get("Patient", "a") is None
    assert (await store.get("Patient", "b")).version_id == "5"  # type: ignore[union-attr]
    assert await store.get("Patient", "c") is None
    assert set(await store.versions("Patient")) == {"b"}
    assert set(await store.rows("Patient", "v")) == {"b"}


async def test_non_numeric_versions_compare_by_last_updated(store: SpeedStore) -> None:
    async def put(version: str, at: str) -> bool:
        return await store.upsert("Patient", "x", body=b"{}", version_id=version, last_updated=at)

    assert await put("abc", "2026-11-25T10:00:00Z")
    assert not await put("abd", "2026-11-25T09:59:59.999+00:00")
    assert await put("abe", "2026-11-25T12:00:00+02:00") is False  # same instant: not newer
    assert await put("abf", "2026-11-25T10:00:00.0001Z")
    assert (await store.get("Patient", "x")).version_id == "abf"  # type: ignore[union-attr]


async def test_fan_out_reads_cover_every_bucket(store: SpeedStore) -> None:
    ids = [f"p{n}" for n in range(200)]
    for pid in ids:
        await write(store, pid, 1, False)
    assert await store.count("Patient") == 200
    assert set(await store.versions("Patient")) == set(ids)
    assert set(await store.changed_since("Patient", parse_instant("2026-11-25T10:01:00Z"))) == set(
        ids
    )
    assert await store.changed_since("Patient", parse_instant("2026-11-25T10:02:00Z")) == []
    assert await store.known_types() == ["Patient"]
    oldest, newest = await store.oldest_newest("Patient")
    assert oldest == newest == parse_instant("2026-11-25T10:01:00Z")
    rows = await store.rows_for("Patient", "v", ["p1", "p2", "nope"])
    assert set(rows) == {"p1", "p2"}
    assert BUCKETS > 1


async def test_expiry_is_only_a_safety_cap(redis_client: aioredis.Redis) -> None:
    # SPEED_MAX_AGE_HOURS=2: an entry leaves once its change time is more than 2 hours old
    # (the poller's sweep); without the setting nothing ever expires.
    now_ms = time.time() * 1000.0
    capped = SpeedStore(redis_client, max_age_hours=2)
    three_hours_ago = format_instant(instant_of_ms(now_ms - 3 * 3_600_000))
    await capped.upsert("Patient", "p", body=b"{}", version_id="1", last_updated=three_hours_ago)
    await capped.upsert("Patient", "q", body=b"{}", version_id="1", last_updated=None)
    uncapped = SpeedStore(redis_client)
    assert await uncapped.expire_old(now_ms + 1000 * 3_600_000) == 0
    assert set(await uncapped.versions("Patient")) == {"p", "q"}
    generation = await capped.generation()
    assert await capped.expire_old() == 1
    assert await capped.get("Patient", "p") is None
    assert (await capped.get("Patient", "q")) is not None
    assert set(await capped.versions("Patient")) == {"q"} and await capped.count("Patient") == 1
    assert await capped.changed_since("Patient", 0.0) == ["q"]
    assert [i for _, ids in await capped.log_since("Patient", [0] * BUCKETS) for i in ids] == ["q"]
    assert await capped.generation() == generation + 1
    assert await capped.expire_old() == 0  # nothing more is old enough
    assert await capped.expire_old(now_ms + 2 * 3_600_000 + 60_000) == 1  # q's turn


async def test_epoch_catch_up_and_rejects(store: SpeedStore) -> None:
    assert await store.epoch() is None
    first = await store.mark_epoch()
    assert await store.mark_epoch() == first
    await store.request_catchup("test")
    assert "test" in (await store.take_catchup() or "")
    assert await store.take_catchup() is None
    await store.count_missed(3)
    assert await store.missed_count() == 3
    changes = await store.hourly_changes(3)
    assert len(changes) == 3


async def test_concurrent_deliveries_of_one_rejected_version_are_recorded_once(
    store: SpeedStore,
) -> None:
    issues = [Issue("invalid", "gender: not an AdministrativeGender", "gender")]
    # Connections open first, so the calls below interleave (a new one each would queue them).
    await asyncio.gather(*(store.client.ping() for _ in range(30)))
    done = await asyncio.gather(
        *(store.record_reject("Patient", "p1", "7", issues) for _ in range(30))
    )
    assert done.count(True) == 1
    assert await store.reject_count() == 1 and len(await store.recent_rejects()) == 1
    assert await store.is_rejected("Patient", "p1", "7")
    # A newer rejected version is a new reject; without a version, every delivery is one.
    assert await store.record_reject("Patient", "p1", "8", issues)
    assert await store.record_reject("Patient", "p2", None, issues)
    assert await store.record_reject("Patient", "p2", None, issues)
    assert await store.reject_count() == 4


async def test_warns_when_redis_may_evict(redis_client: aioredis.Redis, caplog: Any) -> None:
    store = SpeedStore(redis_client)
    old = (await redis_client.config_get("maxmemory-policy"))["maxmemory-policy"]
    try:
        await redis_client.config_set("maxmemory-policy", "allkeys-lru")
        info = await store.warn_about_config()
        assert info["maxmemory-policy"] == "allkeys-lru"
        assert any("EVICT" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    finally:
        await redis_client.config_set("maxmemory-policy", old)


def test_version_order_helpers() -> None:
    assert (
        version_number("12") == 12.0
        and version_number("a1") == -1.0
        and version_number(None) == -1.0
    )
    assert is_newer(2, 0, 1, 99) and not is_newer(1, 99, 2, 0)
    assert is_newer(-1, 5, 3, 4) and not is_newer(-1, 3, 3, 4)
    assert parse_instant("2026-11-25T10:00:00.123456789Z") == parse_instant(
        "2026-11-25T10:00:00.123456Z"
    )
    assert parse_instant("garbage") == 0.0 and parse_instant(None) == 0.0


async def test_log_since_follows_writes_incrementally(store: SpeedStore) -> None:
    start = [0] * BUCKETS
    await write(store, "a", 1, False)
    await write(store, "b", 1, False)
    first = await store.log_since("Patient", start)
    assert sorted(i for _, ids in first for i in ids) == ["a", "b"]
    seen = [seq for seq, _ in first]
    assert await store.log_since("Patient", seen) == [(s, []) for s in seen]
    await write(store, "a", 2, False)
    await write(store, "a", 1, False)  # a no-op is not logged
    again = await store.log_since("Patient", seen)
    assert [i for _, ids in again for i in ids] == ["a"]
    assert (await store.entries("Patient", ["a", "zz"]))["a"].version_id == "2"
    generation = await store.generation()
    await store.trim_covered("Patient", [("b", 1.0, 0.0)])
    assert await store.generation() == generation + 1
    assert all("b" not in ids for _, ids in await store.log_since("Patient", start))


async def test_rederive_replaces_rows_and_index_of_the_held_version_only(store: SpeedStore) -> None:
    await write(store, "a", 1, False)
    await write(store, "b", 1, True)  # a tombstone has no rows to re-derive
    seen = [seq for seq, _ in await store.log_since("Patient", [0] * BUCKETS)]

    def new_rows(body: bytes) -> Derived:
        pid = json.loads(body)["id"]
        return Derived(rows={"v": f'[{{"new":"{pid}"}}]'.encode()})

    assert await store.rederive("Patient", new_rows) == 1
    assert json.loads((await store.rows("Patient", "v"))["a"]) == [{"new": "a"}]
    assert [i for _, ids in await store.log_since("Patient", seen) for i in ids] == ["a"]
    assert (await store.get("Patient", "a")).version_id == "1"  # type: ignore[union-attr]
    assert await store.rederive("Patient", lambda body: None) == 0


async def test_the_previous_key_schema_is_never_read_and_goes_whole(
    store: SpeedStore, redis_client: aioredis.Redis
) -> None:
    # What the release before this one held: a hash per resource naming its view rows and
    # index sets, `ver`, one `log`, the change index and its epoch marker.
    old_ids = ["old1", "old2", "both"]
    for pid in old_ids:
        prefix = tag("Patient", bucket_of(pid))
        await redis_client.hset(
            f"{prefix}r:{pid}",
            mapping={"vn": "1.0", "lum": "0.0", "st": "p", "body": body(pid, 1), "vid": "1"},
        )
        await redis_client.hset(f"{prefix}r:{pid}", "views", '["v"]')
        await redis_client.hset(f"{prefix}r:{pid}", "ix", '["gender:male"]')
        await redis_client.hset(prefix + "ver", pid, "p|1.0|0.0|1")
        await redis_client.hset(prefix + "rows:v", pid, "[1]")
        await redis_client.sadd(prefix + "ix:gender:male", pid)
        await redis_client.zadd(prefix + "log", {pid: 1})
        await redis_client.zadd(prefix + "chg", {pid: 5.0})
    await redis_client.sadd("rf:{meta}:types", "Patient")
    await redis_client.set(OLD_EPOCH_KEY, "2026-11-01T00:00:00+00:00")
    # This schema reads none of it: incomplete (no epoch marker of its own), nothing held.
    assert await store.epoch() is None
    assert await store.get("Patient", "old1") is None and await store.count("Patient") == 0
    await write(store, "both", 2, False)  # a receiver of this release, before the catch-up
    assert await store.clear_old_layout() == 3
    left = set()
    for bucket in range(BUCKETS):
        prefix = tag("Patient", bucket)
        for name in ("ver", "log", "rows:v", "ix:gender:male"):
            left.add(await redis_client.exists(prefix + name))
        left.update([await redis_client.exists(f"{prefix}r:{pid}") for pid in old_ids])
    assert left == {0} and not await redis_client.exists(OLD_EPOCH_KEY)
    assert await store.changed_since("Patient", 0.0) == ["both"]  # its own change time stays
    assert (await store.get("Patient", "both")).version_id == "2"  # type: ignore[union-attr]
    assert await store.clear_old_layout() == 0


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=st.one_of(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        ).map(lambda value: json.dumps(value, indent=2).encode()),
        st.binary(),  # the store keeps whatever it is given, NUL and separators included
    ),
    rows=st.dictionaries(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
        st.lists(st.text()).map(lambda r: json.dumps(r).encode()),
        max_size=3,
    ),
)
def test_bodies_and_rows_come_back_byte_for_byte(raw: bytes, rows: dict[str, bytes]) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(TEST_REDIS_URL)
        await client.flushdb()
        try:
            store = SpeedStore(client)
            last_updated = "2026-11-25T10:00:00.123+01:00"
            assert await store.upsert(
                "Observation",
                "o1",
                body=raw,
                version_id="7",
                last_updated=last_updated,
                derived=Derived(rows=rows),
            )
            entry = await store.get("Observation", "o1")
            assert entry is not None and entry.body == raw
            assert entry.last_updated == last_updated and entry.version_id == "7"
            for view, data in rows.items():
                assert (await store.rows("Observation", view)) == {"o1": data}
        finally:
            await client.flushdb()
            await client.aclose()

    asyncio.run(run())


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(writes=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 5)), max_size=400))
def test_the_write_log_holds_each_held_id_once_in_small_chunks(
    writes: list[tuple[int, int]],
) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(TEST_REDIS_URL)
        await client.flushdb()
        try:
            store = SpeedStore(client)
            for n, version in writes:
                await write(store, f"p{n}", version, version == 5)
            held = await store.versions("Patient")
            logged: list[str] = []
            for bucket in range(BUCKETS):
                prefix = tag("Patient", bucket)
                counter = int(await client.get(prefix + "seq") or 0)
                for k in range(counter // LOG_CHUNK + 1):
                    key = f"{prefix}log:{k}"
                    logged.extend(m.decode() for m in await client.zrange(key, 0, -1))
                    # Each chunk stays a listpack on Redis's default settings.
                    assert await client.zcard(key) <= LOG_CHUNK
                    if await client.exists(key):
                        assert await client.object("encoding", key) == b"listpack"
            assert sorted(logged) == sorted(held)
            follow = await store.log_since("Patient", [0] * BUCKETS)
            assert sorted(i for _, ids in follow for i in ids) == sorted(held)
        finally:
            await client.flushdb()
            await client.aclose()

    asyncio.run(run())
