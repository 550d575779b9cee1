"""Concurrent writes share round trips (core.store.CoalescedScript) and lose nothing.

Writes made concurrently go to Redis in one pipeline of EVALSHA calls. Each one must still
answer exactly as if the writes had been made one after another in the order they were
made (checked against a version-order oracle written here), each call gets its own error,
a Redis without the script loaded takes them all, and a Redis that is down fails every
waiting write (the receiver's 503) instead of leaving one hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import SpeedLayerUnavailable
from core.settings import Settings
from core.store import CoalescedScript, SpeedStore, connect
from tests.conftest import empty_redis, redis_db
from tests.procs import free_port

COALESCE_REDIS_URL = redis_db(3)


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    async with empty_redis(COALESCE_REDIS_URL) as redis_client:
        yield redis_client


def _sizes(script: CoalescedScript, sizes: list[int]) -> None:
    """Record the number of calls of each round trip of `script`."""
    run = script._run

    async def counted(calls: list[Any]) -> list[Any]:
        sizes.append(len(calls))
        return await run(calls)

    script._run = counted  # type: ignore[method-assign]


WRITES = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 6), st.booleans()),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(writes=WRITES)
async def test_concurrent_writes_answer_as_one_after_another(
    client: aioredis.Redis, writes: list[tuple[str, int, bool]]
) -> None:
    await client.flushdb()
    store = SpeedStore(client)
    assert store._coalesced_upsert is not None
    sizes: list[int] = []
    _sizes(store._coalesced_upsert, sizes)

    async def write(rid: str, version: int, deleted: bool) -> bool:
        body = None if deleted else f'{{"resourceType":"Patient","id":"{rid}"}}'.encode()
        return await store.upsert(
            "Patient",
            rid,
            body=body,
            version_id=str(version),
            last_updated=f"2026-01-01T00:00:0{version}Z",
            deleted=deleted,
        )

    got = await asyncio.gather(*(write(*w) for w in writes))
    # The oracle: in the order made, a write is taken when its version is above every
    # version taken before for that resource.
    held: dict[str, tuple[int, bool]] = {}
    want = []
    for rid, version, deleted in writes:
        taken = rid not in held or version > held[rid][0]
        if taken:
            held[rid] = (version, deleted)
        want.append(taken)
    assert list(got) == want
    for rid, (version, deleted) in held.items():
        stored = await store.get("Patient", rid)
        assert stored is not None
        assert stored.version_id == str(version)
        assert (stored.state == "deleted") == deleted
    assert sum(sizes) == len(writes)
    assert len(writes) == 1 or max(sizes) > 1  # they really shared a round trip


async def test_each_call_gets_its_own_error(client: aioredis.Redis) -> None:
    script = CoalescedScript(client.register_script("return redis.call('INCR', KEYS[1])"))
    await client.set("text", "not a number")
    sizes: list[int] = []
    _sizes(script, sizes)
    results = await asyncio.gather(
        script.call(["n1"], []),
        script.call(["text"], []),
        script.call(["n1"], []),
        return_exceptions=True,
    )
    assert sizes == [3]
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], aioredis.ResponseError)
    assert "not an integer" in str(results[1])


async def test_a_redis_without_the_script_takes_every_call(client: aioredis.Redis) -> None:
    script = CoalescedScript(client.register_script("return redis.call('INCR', KEYS[1])"))
    await client.script_flush()
    results = await asyncio.gather(*(script.call([f"k{n % 3}"], []) for n in range(9)))
    assert sorted(results) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert await client.mget(["k0", "k1", "k2"]) == [b"3", b"3", b"3"]


async def test_a_caller_that_goes_away_leaves_the_others_their_answers(
    client: aioredis.Redis,
) -> None:
    script = CoalescedScript(client.register_script("return redis.call('INCR', KEYS[1])"))
    first = asyncio.ensure_future(script.call(["k"], []))
    second = asyncio.ensure_future(script.call(["k"], []))
    third = asyncio.ensure_future(script.call(["k"], []))
    await asyncio.sleep(0)  # all three queued
    second.cancel()
    assert await first == 1 and await third in (2, 3)
    assert second.cancelled()


async def test_redis_down_fails_every_waiting_write() -> None:
    # Nothing listens on this port: every write of the batch answers 503, none hangs.
    store = SpeedStore(connect(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")))
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    store.upsert("Patient", f"p{n}", body=b"{}", version_id="1", last_updated=None)
                    for n in range(5)
                ),
                return_exceptions=True,
            ),
            timeout=30,
        )
        assert all(isinstance(r, SpeedLayerUnavailable) for r in results), results
        assert all("Redis did not take the write" in str(r) for r in results)
    finally:
        await store.client.aclose()


def test_calls_left_by_a_stopped_event_loop_do_not_block_the_next_one() -> None:
    """A loop that stops between a call and its send leaves the call queued; a store used
    again under another loop still sends (and does not wait for the dead loop)."""
    redis_client = aioredis.Redis.from_url(COALESCE_REDIS_URL)
    script = CoalescedScript(redis_client.register_script("return redis.call('INCR', KEYS[1])"))

    async def stop_midway() -> None:
        pending = asyncio.ensure_future(script.call(["left"], []))
        await asyncio.sleep(0)  # queued, its send not run yet
        pending.cancel()
        asyncio.get_running_loop().stop()

    first = asyncio.new_event_loop()
    with contextlib.suppress(RuntimeError):  # the loop stopped before the coroutine ended
        first.run_until_complete(stop_midway())
    first.close()

    async def next_loop() -> Any:
        try:
            return await asyncio.wait_for(script.call(["next"], []), timeout=10)
        finally:
            await redis_client.delete("left", "next")
            await redis_client.aclose()

    assert asyncio.run(next_loop()) == 1
