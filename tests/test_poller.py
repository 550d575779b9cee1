"""The fallback poller against the stand-in HAPI (served on loopback) and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from starlette.responses import Response

from core.errors import FhirTemporaryError
from core.fhir_values import format_instant, instant_of_ms
from core.metrics import Metrics
from core.serve import serve_asgi
from core.settings import Settings
from core.store import OLD_EPOCH_KEY, POLLER_LEASE_KEY, TYPES_KEY, SpeedStore, bucket_of, tag
from receiver.ingest import ingest, ingest_deletion
from subscriptions.fhir_client import FhirClient, HistoryPage, history_entry
from subscriptions.poller import (
    LEASE_TTL_MS,
    PollResult,
    _poll,
    poll_once,
    run_poller,
)
from subscriptions.standin.hapi import StandInHapi
from tests.conftest import TEST_REDIS_URL

# No notification is ever on its way here (nothing delivers): every change is judged at once.
# tests/test_missed.py covers the grace for deliveries in flight.
POLL_SETTINGS = Settings(
    redis_url=TEST_REDIS_URL, poll_interval_seconds=300, missed_grace_seconds=0
)


class FailPages:
    """ASGI wrapper: while `fail` is set, every `next` page (page 2 on) answers 503
    (`_offset` pages of `_history`, `_getpages` pages of searches)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.fail = False
        self.failed = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        query = scope.get("query_string", b"")
        if (
            self.fail
            and scope["type"] == "http"
            and (b"_getpages=" in query or b"_offset=" in query)
        ):
            self.failed += 1
            body = (
                b'{"resourceType":"OperationOutcome","issue":[{"severity":"error",'
                b'"code":"transient","diagnostics":"HAPI is restarting"}]}'
            )
            await Response(body, 503, media_type="application/fhir+json")(scope, receive, send)
            return
        await self.app(scope, receive, send)


@dataclass
class Hapi:
    hapi: StandInHapi
    pages: FailPages
    client: FhirClient


@pytest.fixture
async def standin() -> AsyncIterator[Hapi]:
    hapi = StandInHapi(max_page_size=7)  # many small pages
    pages = FailPages(hapi.app)
    try:
        async with serve_asgi(pages, path="/fhir") as base_url:
            hapi.base_url = base_url
            async with FhirClient(base_url, max_retries=1, backoff_initial=0.01) as client:
                yield Hapi(hapi, pages, client)
    finally:
        await hapi.aclose()


def patient(n: int, family: str = "Doe") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"p{n}",
        "gender": "female" if n % 2 else "male",
        "birthDate": f"{1940 + n % 60}-0{1 + n % 9}-1{n % 10}",
        "name": [{"family": family, "given": [f"Given{n}"]}],
    }


def condition(n: int) -> dict[str, Any]:
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
            "coding": [{"system": "http://snomed.info/sct", "code": "44054006"}],
            "text": "Diabetes mellitus type 2",
        },
    }


def observation(n: int, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{n}",
        "status": "final",
        "subject": {"reference": f"Patient/p{n}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "valueQuantity": {"value": value, "unit": "%"},
    }


async def seed(hapi: StandInHapi, start: int, count: int) -> None:
    """Creates, updates and deletes of Patients, Conditions and Observations."""
    for n in range(start, start + count):
        await hapi.update(patient(n))
        await hapi.update(condition(n))
        await hapi.update(observation(n, 5.0 + n % 4))
        if n % 3 == 0:
            await hapi.update(patient(n, family="Renamed"))
        if n % 4 == 0:
            await hapi.update(observation(n, 7.5))
        if n % 5 == 0:
            await hapi.delete("Condition", f"c{n}")


async def deliver(store: SpeedStore, hapi: StandInHapi, keep: Callable[[str], bool]) -> int:
    """What the receiver would have written for the notifications that arrived."""
    delivered = 0
    for (rtype, rid), truth in hapi.resources.items():
        if not keep(rid):
            continue
        delivered += 1
        if truth.deleted:
            await ingest_deletion(
                store, rtype, rid, version_id=str(truth.version), last_updated=None
            )
        else:
            assert truth.resource is not None
            await ingest(store, truth.resource, path_type=rtype, path_id=rid)
    return delivered


async def assert_truth(store: SpeedStore, hapi: StandInHapi) -> None:
    """Every (type, id) is in the speed layer at HAPI's version and deleted state."""
    for (rtype, rid), truth in hapi.resources.items():
        entry = await store.get(rtype, rid)
        assert entry is not None, f"{rtype}/{rid} missing"
        assert entry.version_id == str(truth.version), f"{rtype}/{rid}"
        assert (entry.state == "deleted") == truth.deleted, f"{rtype}/{rid}"


async def test_poll_restores_dropped_deliveries_and_counts_them(
    standin: Hapi, store: SpeedStore
) -> None:
    hapi = standin.hapi
    await seed(hapi, 0, 20)
    await store.mark_epoch()  # a speed layer that has been running
    delivered = await deliver(store, hapi, keep=lambda rid: int(rid[1:]) % 3 != 1)
    dropped = len(hapi.resources) - delivered
    assert dropped > 5
    metrics = Metrics.create()
    registry = metrics.registry
    seen: list[int] = []

    result = await poll_once(
        POLL_SETTINGS, store, standin.client, metrics=metrics, progress=seen.append
    )

    await assert_truth(store, hapi)
    assert result.read == len(hapi.resources)
    assert result.missed == result.written == dropped
    assert result.deletes == sum(
        1 for (_, rid), t in hapi.resources.items() if t.deleted and int(rid[1:]) % 3 == 1
    )
    assert await store.missed_count() == dropped
    assert sum(result.missed_by_type.values()) == dropped
    assert 0 < len(result.missed_sample) <= 10
    by_type = {
        t: registry.get_sample_value(
            "researchflow_missed_notifications_total", {"resource_type": t}
        )
        for t in ("Patient", "Condition", "Observation")
    }
    assert sum(v or 0 for v in by_type.values()) == dropped
    assert seen and seen[-1] == result.read and seen == sorted(seen)
    assert result.watermark is not None and await store.poller_watermark() == result.watermark

    second = await poll_once(POLL_SETTINGS, store, standin.client, metrics=metrics)
    assert second.missed == 0 and second.written == 0
    assert await store.missed_count() == dropped


async def test_overlap_rereads_are_noops_and_new_changes_are_found(
    standin: Hapi, store: SpeedStore
) -> None:
    await store.mark_epoch()
    await seed(standin.hapi, 0, 5)
    first = await poll_once(POLL_SETTINGS, store, standin.client)
    assert first.written == len(standin.hapi.resources)
    # The overlap (120 s) covers everything: the second poll re-reads, writes nothing.
    again = await poll_once(POLL_SETTINGS, store, standin.client)
    assert again.since == first.watermark
    assert again.read == first.read and again.written == 0 and again.missed == 0
    await standin.hapi.update(patient(1, family="Later"))
    await standin.hapi.delete("Observation", "o2")
    third = await poll_once(POLL_SETTINGS, store, standin.client)
    assert third.written == third.missed == 2 and third.deletes == 1
    await assert_truth(store, standin.hapi)


async def test_rejected_resource_recorded_once_never_missed(
    standin: Hapi, store: SpeedStore
) -> None:
    await store.mark_epoch()
    await seed(standin.hapi, 0, 2)
    bad = patient(99)
    bad["gender"] = "robot"  # the stand-in stores it (validate_resources=False); the gate won't
    await standin.hapi.update(bad)
    first = await poll_once(POLL_SETTINGS, store, standin.client)
    second = await poll_once(POLL_SETTINGS, store, standin.client)
    assert first.rejected == 1 and second.rejected == 1  # re-read in the overlap...
    assert await store.reject_count() == 1  # ...but recorded once
    rejects = await store.recent_rejects()
    assert [(r["type"], r["id"], r["version"]) for r in rejects] == [("Patient", "p99", "1")]
    assert "robot" not in str(rejects[0]["issues"]) or "gender" in str(rejects[0]["issues"])
    assert await store.get("Patient", "p99") is None
    assert first.missed == first.written == len(standin.hapi.resources) - 1
    assert second.missed == 0
    assert await store.missed_count() == first.missed


async def test_watermark_kept_when_hapi_fails_mid_traversal(
    standin: Hapi, store: SpeedStore
) -> None:
    await store.mark_epoch()
    await seed(standin.hapi, 0, 3)
    first = await poll_once(POLL_SETTINGS, store, standin.client)
    assert first.watermark is not None
    await seed(standin.hapi, 10, 5)
    standin.pages.fail = True
    with pytest.raises(FhirTemporaryError):
        await poll_once(POLL_SETTINGS, store, standin.client, since="2000-01-01T00:00:00Z")
    assert standin.pages.failed >= 1
    assert await store.poller_watermark() == first.watermark  # not advanced
    # The lease was released: the next poll runs and completes the picture.
    standin.pages.fail = False
    done = await poll_once(POLL_SETTINGS, store, standin.client)
    assert not done.skipped
    await assert_truth(store, standin.hapi)


async def test_watermark_is_hapi_clock_at_first_answer_minus_overlap(
    standin: Hapi, store: SpeedStore
) -> None:
    standin.hapi.clock_skew = 3600.0  # HAPI's clock is an hour ahead of ours
    await seed(standin.hapi, 0, 1)
    settings = Settings(redis_url=TEST_REDIS_URL, poll_overlap_seconds=60)
    before = time.time()
    result = await poll_once(settings, store, standin.client)
    assert result.watermark is not None
    from core.fhir_values import parse_instant

    watermark_s = parse_instant(result.watermark) / 1000.0
    assert before + 3600 - 60 - 2 <= watermark_s <= time.time() + 3600 - 60 + 1


async def test_one_poller_at_a_time(standin: Hapi, store: SpeedStore) -> None:
    await seed(standin.hapi, 0, 10)
    results = await asyncio.gather(
        poll_once(POLL_SETTINGS, store, standin.client),
        poll_once(POLL_SETTINGS, store, standin.client),
    )
    assert sorted(r.skipped for r in results) == [False, True]
    worker = next(r for r in results if not r.skipped)
    assert worker.written == len(standin.hapi.resources)
    # Someone else's lease: skipped; once it is gone, the poll runs.
    other = store.poller_lock(LEASE_TTL_MS)
    assert await other.acquire(blocking=False)
    assert (await poll_once(POLL_SETTINGS, store, standin.client)).skipped
    await other.release()
    assert not (await poll_once(POLL_SETTINGS, store, standin.client)).skipped


async def test_a_poller_that_lost_its_lease_stops_and_saves_no_watermark(
    standin: Hapi, store: SpeedStore
) -> None:
    """The fence: once a renewal finds the lease taken (it expired while this poller
    stalled, and another took it), the traversal stops at the next page with LeaseLost and
    the watermark stays where it was; the lease of the new holder is left alone."""
    from subscriptions.poller import Lease, LeaseLost

    await store.mark_epoch()
    await seed(standin.hapi, 0, 3)
    first = await poll_once(POLL_SETTINGS, store, standin.client)
    lease = Lease(store, ttl_ms=300)
    assert await lease.acquire()
    assert not await store.poller_lock(LEASE_TTL_MS).acquire(blocking=False)  # one holder
    # Another poller takes over: our key is replaced (as after an expiry and a new SET NX).
    await store.client.delete(POLLER_LEASE_KEY)
    other = store.poller_lock(LEASE_TTL_MS)
    assert await other.acquire(blocking=False)
    await wait_for(_not_held(lease), seconds=3)  # the renewer saw it within a third of the TTL
    with pytest.raises(LeaseLost):
        lease.check()
    with pytest.raises(LeaseLost):
        await _poll(
            POLL_SETTINGS,
            store,
            standin.client,
            lease,
            since="2000-01-01T00:00:00Z",
            derive=None,
            progress=None,
            batch_watermark=None,
            metrics=None,
            types=None,
        )
    assert await store.poller_watermark() == first.watermark
    await lease.release()  # gives up nothing of the new holder's
    await other.reacquire()  # still the holder
    await other.release()
    assert not await store.client.exists(POLLER_LEASE_KEY)


def _not_held(lease: Any) -> Any:
    async def check() -> bool:
        return not lease.held

    return check


async def test_redis_restarted_empty_rereads_from_batch_watermark(
    standin: Hapi, store: SpeedStore, redis_client: aioredis.Redis
) -> None:
    hapi = standin.hapi
    await seed(hapi, 0, 4)  # the batch layer holds these
    # The stand-in's clock runs ahead by 1 ms per write within one millisecond: let it settle.
    await asyncio.sleep(0.2)
    batch_as_of = hapi.now()
    await asyncio.sleep(0.01)
    await seed(hapi, 10, 4)
    await poll_once(POLL_SETTINGS, store, standin.client)
    await store.mark_epoch()

    await redis_client.flushdb()  # Redis came back empty
    assert await store.epoch() is None
    asked: list[str] = []

    async def batch_watermark() -> str | None:
        asked.append("asked")
        return batch_as_of

    result = await poll_once(POLL_SETTINGS, store, standin.client, batch_watermark=batch_watermark)
    assert asked and result.restored and result.since == batch_as_of
    assert result.missed == 0 and await store.missed_count() == 0  # restored, not missed
    assert await store.epoch() is not None
    for (rtype, rid), truth in hapi.resources.items():
        entry = await store.get(rtype, rid)
        if int(rid[1:]) >= 10:
            assert entry is not None and entry.version_id == str(truth.version)
        else:
            assert entry is None  # older than the batch watermark: the batch layer has it
    # Without a batch layer watermark the re-read starts at the beginning.
    await redis_client.flushdb()
    everything = await poll_once(POLL_SETTINGS, store, standin.client)
    assert everything.restored and everything.since is None
    await assert_truth(store, hapi)


async def test_a_redis_of_the_previous_key_schema_is_cleared_and_reread(
    standin: Hapi, store: SpeedStore, redis_client: aioredis.Redis
) -> None:
    await seed(standin.hapi, 0, 3)
    # What the release before held: its epoch marker and a hash per resource.
    prefix = tag("Patient", bucket_of("p0"))
    await redis_client.set(OLD_EPOCH_KEY, "2026-11-01T00:00:00+00:00")
    await redis_client.hset(prefix + "r:p0", mapping={"vn": "1.0", "lum": "0.0", "st": "p"})
    await redis_client.hset(prefix + "ver", "p0", "p|1.0|0.0|1")
    await redis_client.sadd(TYPES_KEY, "Patient")
    result = await poll_once(POLL_SETTINGS, store, standin.client)
    assert result.restored and await store.epoch() is not None
    assert not await redis_client.exists(OLD_EPOCH_KEY, prefix + "r:p0", prefix + "ver")
    await assert_truth(store, standin.hapi)


async def test_the_poll_drops_entries_past_the_age_cap(
    standin: Hapi, redis_client: aioredis.Redis
) -> None:
    capped = SpeedStore(redis_client, max_age_hours=1)
    await seed(standin.hapi, 0, 2)
    await capped.mark_epoch()
    two_hours_ago = format_instant(instant_of_ms(time.time() * 1000.0 - 7_200_000))
    await capped.upsert("Patient", "old", body=b"{}", version_id="1", last_updated=two_hours_ago)
    await poll_once(POLL_SETTINGS, capped, standin.client)
    assert await capped.get("Patient", "old") is None
    await assert_truth(capped, standin.hapi)  # HAPI's changes are younger than the cap


async def wait_for(predicate: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_run_poller_polls_at_once_on_catchup_request(
    standin: Hapi, store: SpeedStore
) -> None:
    await store.mark_epoch()
    await seed(standin.hapi, 0, 2)
    stop = asyncio.Event()
    task = asyncio.create_task(run_poller(POLL_SETTINGS, store, standin.client, stop))
    try:
        await wait_for(lambda: _has(store, "Patient", "p1"))  # the first poll, at start
        await standin.hapi.update(patient(50, family="New"))
        await asyncio.sleep(1.2)
        assert await store.get("Patient", "p50") is None  # interval is 300 s
        await store.request_catchup("empty notification")
        started = time.monotonic()
        await wait_for(lambda: _has(store, "Patient", "p50"), seconds=5)
        assert time.monotonic() - started < 3
        # While it runs, it holds the lease: a one-off poll elsewhere is skipped.
        assert (await poll_once(POLL_SETTINGS, store, standin.client)).skipped
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    assert (await poll_once(POLL_SETTINGS, store, standin.client)).skipped is False


async def test_run_poller_backs_off_while_hapi_is_down(store: SpeedStore) -> None:
    await store.mark_epoch()
    async with FhirClient("http://127.0.0.1:1/fhir", max_retries=0) as client:
        stop = asyncio.Event()
        task = asyncio.create_task(run_poller(POLL_SETTINGS, store, client, stop))
        await asyncio.sleep(1.5)
        assert not task.done()
        assert await store.poller_watermark() is None
        stop.set()
        await asyncio.wait_for(task, timeout=5)


async def _has(store: SpeedStore, rtype: str, rid: str) -> bool:
    return await store.get(rtype, rid) is not None


# -- order: any interleaving of changes and deliveries ends in HAPI's truth -------------------


class InProcessHistory:
    """The stand-in's `_history`, paged in-process (no HTTP): fast enough for hypothesis."""

    def __init__(self, hapi: StandInHapi, page: int) -> None:
        self.hapi = hapi
        self.page = page

    async def history(
        self, resource_type: str | None = None, since: str | None = None, count: int = 100
    ) -> AsyncIterator[HistoryPage]:
        token = self.hapi.history(resource_type, None, since)
        offset = 0
        while True:
            bundle = self.hapi._bundle(token, offset, self.page, "http://h/fhir", "http://h")
            entries = [e for e in map(history_entry, bundle.get("entry") or []) if e is not None]
            yield HistoryPage(entries=entries, server_date=None, next_url=None)
            offset += self.page
            if not any(link["relation"] == "next" for link in bundle["link"]):
                return


ops = st.lists(
    st.tuples(st.sampled_from(["put", "put", "delete"]), st.integers(0, 3), st.integers(0, 9)),
    min_size=1,
    max_size=25,
)


@hsettings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=ops, delivered=st.lists(st.integers(0, 200), max_size=30), page=st.integers(1, 5))
async def test_any_order_of_deliveries_ends_in_truth(
    redis_client: aioredis.Redis, ops: list[tuple[str, int, int]], delivered: list[int], page: int
) -> None:
    await redis_client.flushdb()
    store = SpeedStore(redis_client)
    await store.mark_epoch()
    hapi = StandInHapi()
    notifications: list[tuple[str, str, int, dict[str, Any] | None]] = []
    try:
        for op, n, value in ops:
            key = ("Observation", f"o{n}")
            current = hapi.resources.get(key)
            if op == "delete":
                if current is not None and not current.deleted:
                    version = await hapi.delete(*key)
                    assert version is not None
                    notifications.append((*key, version, None))
            else:
                stored = await hapi.update(observation(n, float(value)))
                notifications.append((*key, int(stored["meta"]["versionId"]), stored))
        # Some notifications arrive, in any order, possibly twice; the rest are lost.
        for pick in delivered:
            if not notifications:
                break
            rtype, rid, version, body = notifications[pick % len(notifications)]
            if body is None:
                await ingest_deletion(store, rtype, rid, version_id=str(version), last_updated=None)
            else:
                await ingest(store, body)
        result: PollResult = await poll_once(POLL_SETTINGS, store, InProcessHistory(hapi, page))
        await assert_truth(store, hapi)
        held_before = result.read - result.written
        assert result.missed == result.written and held_before >= 0
        again = await poll_once(POLL_SETTINGS, store, InProcessHistory(hapi, page))
        assert again.written == 0
    finally:
        with contextlib.suppress(Exception):
            await hapi.aclose()


class EndlessPages:
    """A FHIR server whose `_history` answers empty pages with ever new `next` links."""

    def __init__(self) -> None:
        self.pages = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.pages += 1
        bundle = {
            "resourceType": "Bundle",
            "type": "history",
            "link": [{"relation": "next", "url": f"http://x/fhir?_getpages=p{self.pages}"}],
            "entry": [],
        }
        body = __import__("json").dumps(bundle).encode()
        await Response(body, 200, media_type="application/fhir+json")(scope, receive, send)


async def test_endless_empty_paging_stops_the_poll_and_keeps_the_watermark(
    store: SpeedStore,
) -> None:
    from core.errors import EndlessPaging
    from subscriptions.fhir_client import MAX_IDLE_PAGES

    server = EndlessPages()
    await store.set_poller_watermark("2026-01-01T00:00:00.000Z")
    await store.mark_epoch()
    async with serve_asgi(server, path="/fhir") as base_url:
        async with FhirClient(base_url, max_retries=0) as client:
            with pytest.raises(EndlessPaging, match="no progress"):
                await poll_once(POLL_SETTINGS, store, client, types=["Patient"])
    assert server.pages == MAX_IDLE_PAGES
    assert await store.poller_watermark() == "2026-01-01T00:00:00.000Z"


def test_poll_once_on_endless_paging_exits_non_zero_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], pg_url: str
) -> None:
    import researchflow_cli
    from core.serve import serve_asgi as serve

    async def main_with_server() -> tuple[int, str]:
        async with serve(EndlessPages(), path="/fhir") as base_url:
            monkeypatch.setenv("FHIR_BASE_URL", base_url)
            monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
            monkeypatch.setenv("DATABASE_URL", pg_url)
            argv = ["poll", "--once", "--since", "2026-01-01T00:00:00Z"]
            code = await asyncio.to_thread(researchflow_cli.main, argv)
            return code, capsys.readouterr().err

    async def seeded() -> None:
        client = aioredis.Redis.from_url(TEST_REDIS_URL)
        try:
            await client.flushdb()
            await SpeedStore(client).mark_epoch()
            await SpeedStore(client).set_poller_watermark("2026-01-01T00:00:00.000Z")
        finally:
            await client.aclose()

    asyncio.run(seeded())
    code, err = asyncio.run(main_with_server())
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("researchflow poll")]
    assert len(lines) == 1 and "no progress" in lines[0] and "Traceback" not in err
    asyncio.run(_watermark_is("2026-01-01T00:00:00.000Z"))


async def _watermark_is(expected: str) -> None:
    client = aioredis.Redis.from_url(TEST_REDIS_URL)
    try:
        assert await SpeedStore(client).poller_watermark() == expected
    finally:
        await client.flushdb()
        await client.aclose()


def test_the_poll_log_line_reads_plainly(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from subscriptions.poller import _log

    with caplog.at_level(logging.INFO, logger="subscriptions.poller"):
        _log(PollResult(read=3, written=2, watermark="w"))
        _log(PollResult(missed=2, missed_by_type={"Patient": 2}, missed_sample=["Patient/p7"]))
    quiet, loud = (r.getMessage() for r in caplog.records)
    assert "missed 0, pending 0" in quiet, quiet
    assert "missed 2 {'Patient': 2} e.g. Patient/p7, pending 0" in loud, loud
