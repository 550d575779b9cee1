"""The fallback poller: pull every change from HAPI into the speed layer and count what was missed.

Two sources, one write path. The changes come from `subscriptions.changes`: HAPI's REST
`_history` (system level, or per type), or with `HAPI_DATABASE_URL` HAPI's own tables. Every
resource passes the gate of `core.validation` and the version-guarded Lua write of
`core.store`, the same as the receiver's; a rejected one is recorded once
(`receiver.ingest.record_reject`) and never counted as missed.

The watermark is HAPI's clock: the `Date` of the traversal's first answer (else the newest
`lastUpdated` read) minus `poll_overlap_seconds` for late commits. `_history` lists newest
first, so it is saved only after the whole traversal is written; the next poll reads
`_since` that watermark, and the version guard turns the overlap into no-ops.

Only one poller works per speed layer: a lease in Redis (redis-py's Lock: SET NX PX with a
random token, renewed every third of its life, released at the end; see `Lease`).
`poll_once` returns a result with `skipped=True` when another poller holds it (that one is
doing the work) after waiting `lease_wait_seconds` for it;
`run_poller` holds the lease for as long as it runs and stands by otherwise, taking over
within `LEASE_TTL_MS` when the holder dies.

When the epoch marker is missing (Redis came back empty), the poll re-reads everything
since the batch layer's watermark, then sets the marker. What such a re-read writes is
restored data, not missed notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from redis.exceptions import LockError, RedisError

from core.errors import (
    DependencyUnavailable,
    FhirFatalError,
    InvalidRequest,
    InvalidResource,
    ResearchFlowError,
    SpeedLayerUnavailable,
)
from core.fhir_values import format_instant, instant_of_ms, parse_instant
from core.metrics import Metrics
from core.settings import Settings
from core.store import Deriver, SpeedStore, UpsertItem, is_newer, pending_field, version_number
from core.validation import NEVER_STORED, validate_resource
from receiver.ingest import record_reject
from subscriptions.changes import Change, ChangeReader, reader_for
from subscriptions.fhir_client import FhirClient

logger = logging.getLogger(__name__)

LEASE_TTL_MS = 30_000
SAMPLE_SIZE = 10  # ids of missed resources named in the log line
CATCHUP_CHECK_SECONDS = 1.0
STANDBY_SECONDS = 5.0  # how often a poller without the lease tries to take it

BatchWatermark = Callable[[], Awaitable[str | None]]
# (resource type, ids) -> id -> (version number, lastUpdated ms) the batch layer holds.
BatchVersions = Callable[[str, Sequence[str]], Awaitable[dict[str, tuple[float, float]]]]
Progress = Callable[[int], None]


class LeaseLost(ResearchFlowError):
    """Another poller took the lease during a traversal (ours expired): stop, save nothing."""


@dataclass
class PollResult:
    """What one poll did.

    `read`: resources (versions and deletions) taken from HAPI, each resource once;
    `written`: how many the version guard let through (`deletes` of them tombstones);
    `missed`: changes found that neither layer held at that version or newer and whose
    notification did not come within HAPI's retry window (`missed_grace_seconds`), counted
    once; 0 during an epoch re-read (`restored`); `pending`: changes written before that
    window passed, judged by a later poll; `rejected`: refused by the gate
    (the reject store records each version once); `unreadable`: rows of HAPI's database
    whose content could not be read (ESR); `watermark`: the watermark after the poll;
    `skipped`: another poller holds the lease and nothing was done.
    """

    read: int = 0
    written: int = 0
    deletes: int = 0
    missed: int = 0
    pending: int = 0
    rejected: int = 0
    unreadable: int = 0
    since: str | None = None
    watermark: str | None = None
    restored: bool = False
    skipped: bool = False
    missed_by_type: dict[str, int] = field(default_factory=dict)
    missed_sample: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Lease:
    """The poller lease in Redis (`SpeedStore.poller_lock`, redis-py's Lock), renewed in
    the background while held, with the fence the poller needs on top.

    The Lock alone answers "does Redis still hold my token?" only when asked; the fence is
    local: the renewer clears `held` as soon as a renewal finds the token gone (or Redis has
    been unreachable for a whole TTL since the last good renewal, so the key may have
    expired and another poller may work), and `check()` raises LeaseLost after each page
    and before the watermark is saved. No fencing token is needed beyond that: every write
    is version-guarded and idempotent, so a page written by a poller that just lost the
    lease changes nothing that the new holder would not write too.
    """

    def __init__(self, store: SpeedStore, ttl_ms: int = LEASE_TTL_MS) -> None:
        self.ttl_ms = ttl_ms
        self.lock = store.poller_lock(ttl_ms)
        self.held = False
        self._renewer: asyncio.Task[None] | None = None

    async def acquire(self, wait_seconds: float = 0.0) -> bool:
        """Take the lease if it is free, waiting up to `wait_seconds` for it; True when
        held. Raises SpeedLayerUnavailable when Redis cannot be asked."""
        if not self.held:
            try:
                if wait_seconds > 0:
                    got = await self.lock.acquire(blocking=True, blocking_timeout=wait_seconds)
                else:
                    got = await self.lock.acquire(blocking=False)
            except RedisError as exc:
                raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc
            if got:
                self.held = True
                self._renewer = asyncio.create_task(self._renew())
        return self.held

    def check(self) -> None:
        if not self.held:
            raise LeaseLost("the poller lease expired and another poller may hold it")

    async def release(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self.held:
            self.held = False
            try:
                await self.lock.release()
            except LockError:
                pass  # it expired, or another poller holds it now: nothing of ours to free
            except RedisError:
                logger.warning("could not release the poller lease; it expires by itself")

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        renewed_at = loop.time()
        while self.held:
            await asyncio.sleep(self.ttl_ms / 3000.0)
            try:
                await self.lock.reacquire()
            except LockError:  # LockNotOwnedError: our token is gone (a RedisError too)
                ok = False
            except RedisError:
                ok = loop.time() - renewed_at < self.ttl_ms / 1000.0
            else:
                ok, renewed_at = True, loop.time()
            if not ok:
                logger.warning("the poller lease was lost")
                self.held = False


class _Writer:
    """Validates and writes the changes of one traversal, page by page, and counts.

    Counting missed notifications exactly: a change the poller writes is missed only when
    neither layer held it at that version or newer and its notification never came. So

    - a change the batch layer holds at that version or newer (a refresh moved it out of the
      speed layer) is not missed (`batch_versions`);
    - a change younger than HAPI's retry window (`grace_ms`, in HAPI's clock) may still be
      on its way: it is recorded as pending *before* it is written, and the receiver clears
      it when that notification comes (`SpeedStore.confirm_delivery`); what is still pending
      once the window has passed is missed (`judge_pending`, at the end of a later poll).
    """

    def __init__(
        self,
        store: SpeedStore,
        derive: Deriver | None,
        result: PollResult,
        progress: Progress | None,
        *,
        batch_versions: BatchVersions | None = None,
        grace_ms: float = 0.0,
    ) -> None:
        self.store = store
        self.derive = derive
        self.result = result
        self.progress = progress
        self.batch_versions = batch_versions
        self.grace_ms = grace_ms
        self.clock_ms: float | None = None  # HAPI's clock when the traversal started
        self.seen: set[tuple[str, str]] = set()
        self.newest_ms = 0.0
        self._pending: asyncio.Task[None] | None = None

    async def write(self, changes: Iterable[Change]) -> None:
        """Validate a page now; its Redis write runs while the next page is validated."""
        items = await self._items(changes)
        await self.flush()
        self._pending = asyncio.create_task(self._commit(items))

    async def flush(self) -> None:
        """Wait for the last page's write (and raise its error, if any)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def cancel(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending

    async def _items(self, changes: Iterable[Change]) -> list[UpsertItem]:
        items: list[UpsertItem] = []
        for change in changes:
            if change.resource_type in NEVER_STORED:
                continue  # never read on purpose (per-type reads); never written either
            key = (change.resource_type, change.resource_id)
            # `_history` is newest first: an older version of a resource already handled in
            # this traversal changes nothing (the version guard would drop it anyway).
            if key in self.seen:
                continue
            self.seen.add(key)
            self.result.read += 1
            self.newest_ms = max(self.newest_ms, parse_instant(change.last_updated))
            item = await self._item(change)
            if item is not None:
                items.append(item)
        return items

    def _young(self, changed_ms: float) -> bool:
        """Whether HAPI may still deliver this change's notification (it retries ~60 s).
        A grace of 0 judges every change at once (no notification is ever on its way)."""
        if self.grace_ms <= 0:
            return False
        return self.clock_ms is None or changed_ms > self.clock_ms - self.grace_ms

    async def _commit(self, items: list[UpsertItem]) -> None:
        judging = not self.result.restored
        young: dict[str, float] = {}
        if judging:
            for item in items:
                changed_ms = parse_instant(item.last_updated)
                if self._young(changed_ms):
                    young[_field(item)] = changed_ms
            # Before the write: a notification that comes right after it clears the entry.
            await self.store.hold_pending(young)
        written = await self.store.upsert_many(items)
        new: list[UpsertItem] = []
        settled: list[str] = []  # young changes that are not missed after all
        for item, was_written in zip(items, written, strict=True):
            if not was_written:
                if _field(item) in young:
                    settled.append(_field(item))  # the notification came first
                continue
            self.result.written += 1
            self.result.deletes += item.deleted
            if judging:
                new.append(item)
        if new:
            covered = await self._covered([(i.resource_type, i.resource_id, i) for i in new])
            if covered is None:
                # The batch layer cannot say now: judge these at a later poll.
                await self.store.hold_pending(
                    {
                        _field(i): parse_instant(i.last_updated)
                        for i in new
                        if _field(i) not in young
                    }
                )
            else:
                for item in new:
                    field_name = _field(item)
                    if field_name in covered:
                        if field_name in young:
                            settled.append(field_name)
                    elif field_name not in young:
                        self.count_missed(item.resource_type, item.resource_id)
        await self.store.clear_pending(settled)
        if self.progress is not None:
            self.progress(self.result.read)

    async def _covered(self, changes: Sequence[tuple[str, str, UpsertItem]]) -> set[str] | None:
        """Fields of the changes the batch layer holds at that version or newer; None when
        it cannot be asked."""
        if self.batch_versions is None:
            return set()
        by_type: dict[str, list[UpsertItem]] = {}
        for resource_type, _, item in changes:
            by_type.setdefault(resource_type, []).append(item)
        covered: set[str] = set()
        try:
            for resource_type, items in by_type.items():
                held = await self.batch_versions(resource_type, [i.resource_id for i in items])
                for item in items:
                    batch = held.get(item.resource_id)
                    vn = version_number(item.version_id)
                    if batch is not None and not is_newer(
                        vn, parse_instant(item.last_updated), batch[0], batch[1]
                    ):
                        covered.add(_field(item))
        except (DependencyUnavailable, OSError) as exc:
            logger.warning("the batch layer cannot say which changes it holds (%s)", exc)
            return None
        return covered

    def count_missed(self, resource_type: str, resource_id: str) -> None:
        self.result.missed += 1
        by_type = self.result.missed_by_type
        by_type[resource_type] = by_type.get(resource_type, 0) + 1
        if len(self.result.missed_sample) < SAMPLE_SIZE:
            self.result.missed_sample.append(f"{resource_type}/{resource_id}")

    async def judge_pending(self) -> None:
        """Count as missed what is still pending once HAPI's retry window has passed."""
        pending = await self.store.pending()
        if self.clock_ms is None:
            self.result.pending = len(pending)
            return
        due: list[tuple[str, str, UpsertItem]] = []
        for field_name, changed_ms in pending.items():
            if self._young(changed_ms):
                continue
            resource_type, _, rest = field_name.partition("/")
            resource_id, _, version = rest.partition("/")
            item = UpsertItem(
                resource_type,
                resource_id,
                None,
                version if version_number(version) >= 0 else None,
                version if version_number(version) < 0 else None,
                order=(version_number(version), changed_ms),
            )
            due.append((resource_type, resource_id, item))
        covered = await self._covered(due) if due else set()
        if covered is None:
            self.result.pending = len(pending)
            return
        judged: list[str] = []
        for resource_type, resource_id, item in due:
            field_name = _field(item)
            judged.append(field_name)
            if field_name not in covered:
                self.count_missed(resource_type, resource_id)
        await self.store.clear_pending(judged)
        self.result.pending = len(pending) - len(judged)

    async def _item(self, change: Change) -> UpsertItem | None:
        if change.deleted:
            return UpsertItem(
                change.resource_type,
                change.resource_id,
                body=None,
                version_id=change.version_id,
                last_updated=change.last_updated,
                deleted=True,
            )
        if change.resource is None:
            self.result.unreadable += 1
            return None
        try:
            valid = validate_resource(
                change.resource, path_type=change.resource_type, path_id=change.resource_id
            )
        except InvalidResource as exc:
            # Recorded the way the receiver records it (once per version, without the body).
            self.result.rejected += 1
            await record_reject(
                self.store, change.resource, change.resource_type, change.resource_id, exc
            )
            return None
        except InvalidRequest as exc:
            self.result.rejected += 1
            await self.store.record_reject(
                change.resource_type, change.resource_id, change.version_id, exc.issues
            )
            return None
        return UpsertItem(
            valid.resource_type,
            valid.resource_id,
            body=valid.body,
            version_id=valid.version_id,
            last_updated=valid.last_updated,
            derived=self.derive(valid) if self.derive is not None else None,
        )


def _field(item: UpsertItem) -> str:
    return pending_field(item.resource_type, item.resource_id, item.version_id, item.last_updated)


async def poll_once(
    settings: Settings,
    store: SpeedStore,
    client: FhirClient | None,
    *,
    since: str | None = None,
    derive: Deriver | None = None,
    progress: Progress | None = None,
    batch_watermark: BatchWatermark | None = None,
    batch_versions: BatchVersions | None = None,
    metrics: Metrics | None = None,
    types: Sequence[str] | None = None,
    lease_wait_seconds: float = 0.0,
) -> PollResult:
    """One full catch-up: every change after the saved watermark (or `since`) into the speed
    layer. Reads HAPI's database when `settings.hapi_database_url` is set (then `client` may
    be None), else `client`'s `_history` (system level, or per type when `types` is given).

    `types`: the resource types to read (the served views' types; None reads HAPI's
    system-level `_history`, Subscriptions still skipped). `batch_versions` tells which
    changes the batch layer holds (they are not missed notifications).
    `progress` is called after each page with the number of resources read so far.
    Returns with `skipped=True` when another poller holds the lease after waiting
    `lease_wait_seconds` for it (0: at once). Raises
    FhirTemporaryError / DependencyUnavailable when HAPI, its database or Redis fail; the
    watermark is then left where it was.
    """
    lease = Lease(store)
    held = await lease.acquire()
    if not held and lease_wait_seconds > 0:
        # Said before the wait: a command that sits silent for half a minute looks hung.
        logger.warning(
            "another poller holds the lease; waiting up to %.0f s for it (a poller that"
            " died leaves it for at most its lifetime)",
            lease_wait_seconds,
        )
        held = await lease.acquire(lease_wait_seconds)
    if not held:
        logger.info("another poller holds the lease; this poll is skipped")
        return PollResult(skipped=True)
    try:
        return await _poll(
            settings,
            store,
            client,
            lease,
            since=since,
            derive=derive,
            progress=progress,
            batch_watermark=batch_watermark,
            batch_versions=batch_versions,
            metrics=metrics,
            types=types,
        )
    finally:
        await lease.release()
        await store.flush_stats()


async def _poll(
    settings: Settings,
    store: SpeedStore,
    client: FhirClient | None,
    lease: Lease,
    *,
    since: str | None,
    derive: Deriver | None,
    progress: Progress | None,
    batch_watermark: BatchWatermark | None,
    metrics: Metrics | None,
    types: Sequence[str] | None,
    batch_versions: BatchVersions | None = None,
) -> PollResult:
    started = time.perf_counter()
    restored = await store.epoch() is None
    saved = await store.poller_watermark()
    if restored:
        # Redis came back empty (or is new): everything after the batch layer's watermark.
        # A `since` given too is honoured when it reaches further back. None = the beginning.
        batch = await batch_watermark() if batch_watermark is not None else None
        start = batch
        if since is not None and batch is not None and parse_instant(since) < parse_instant(batch):
            start = since
    else:
        start = since if since is not None else saved
        if start is None and batch_watermark is not None:
            start = await batch_watermark()
    result = PollResult(since=start, restored=restored)
    writer = _Writer(
        store,
        derive,
        result,
        progress,
        batch_versions=batch_versions,
        grace_ms=settings.missed_grace_seconds * 1000.0,
    )
    if restored:
        # A Redis of the key schema before this one reads as incomplete: its keys go, and
        # this poll re-reads what they held.
        await store.clear_old_layout()
    if await store.holds_type("Subscription"):
        # Held by an older release: a Subscription carries the receiver's token.
        purged = await store.purge_type("Subscription")
        logger.warning("purged %d Subscription entries from the speed layer", purged)
    try:
        async with reader_for(settings, client) as reader:
            clock = await _traverse(reader, start, writer, lease, types)
    finally:
        await writer.cancel()  # after a failure; a no-op once everything was flushed
    lease.check()
    if not restored:
        await writer.judge_pending()
    # Everything is written: now the watermark may move (never backwards).
    if clock is None and writer.newest_ms:
        clock = instant_of_ms(writer.newest_ms)
    watermark = saved
    if clock is not None:
        candidate = clock - timedelta(seconds=settings.poll_overlap_seconds)
        if saved is None or candidate.timestamp() * 1000.0 > parse_instant(saved):
            watermark = format_instant(candidate)
            await store.set_poller_watermark(watermark)
    result.watermark = watermark
    if restored:
        await store.mark_epoch()
    # SPEED_MAX_AGE_HOURS (a no-op unset): entries whose change time passed the cap go.
    expired = await store.expire_old()
    if expired:
        logger.info("dropped %d speed-layer entries older than SPEED_MAX_AGE_HOURS", expired)
    if result.missed:
        await store.count_missed(result.missed)
        if metrics is not None:
            for resource_type, n in result.missed_by_type.items():
                metrics.missed.labels(resource_type=resource_type).inc(n)
    result.seconds = time.perf_counter() - started
    _log(result)
    return result


async def _traverse(
    reader: ChangeReader,
    since: str | None,
    writer: _Writer,
    lease: Lease,
    types: Sequence[str] | None,
) -> datetime | None:
    """Write every page of changes; HAPI's clock that the watermark may follow."""
    async with contextlib.aclosing(reader.pages(since, types)) as pages:
        async for page in pages:
            if writer.clock_ms is None and reader.started_at is not None:
                writer.clock_ms = reader.started_at.timestamp() * 1000.0
            await writer.write(page)
            lease.check()
    if writer.clock_ms is None and reader.started_at is not None:
        writer.clock_ms = reader.started_at.timestamp() * 1000.0
    await writer.flush()
    return reader.clock


def _log(result: PollResult) -> None:
    logger.info(
        "poll since %s: read %d, written %d (%d deletes), missed %d%s%s, pending %d,"
        " rejected %d,%s watermark %s, %.1f s",
        result.since or "the beginning",
        result.read,
        result.written,
        result.deletes,
        result.missed,
        f" {result.missed_by_type}" if result.missed_by_type else "",
        f" e.g. {', '.join(result.missed_sample)}" if result.missed_sample else "",
        result.pending,
        result.rejected,
        " epoch re-read (restored, not missed)," if result.restored else "",
        result.watermark,
        result.seconds,
    )


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def run_poller(
    settings: Settings,
    store: SpeedStore,
    client: FhirClient | None,
    stop: asyncio.Event,
    derive: Deriver | None = None,
    *,
    batch_watermark: BatchWatermark | None = None,
    batch_versions: BatchVersions | None = None,
    metrics: Metrics | None = None,
    types: Sequence[str] | None = None,
) -> None:
    """Poll every `poll_interval_seconds`, and at once on a catch-up request, until `stop`.

    Holds the poller lease while it runs (another process's poller stands by and takes
    over when this one dies). When HAPI or Redis is down it backs off (1 s, doubling, at most
    the interval) and keeps its watermark.
    """
    loop = asyncio.get_running_loop()
    lease = Lease(store)
    next_poll = loop.time()
    backoff = 1.0
    try:
        while not stop.is_set():
            try:
                if not await lease.acquire():
                    await _wait(stop, STANDBY_SECONDS)
                    continue
                due = loop.time() >= next_poll
                if not due:
                    reason = await store.take_catchup()
                    if reason:
                        logger.info("catch-up poll requested (%s)", reason)
                        due = True
            except (SpeedLayerUnavailable, RedisError) as exc:
                logger.warning("poller: Redis unavailable (%s); retry in %.0f s", exc, backoff)
                await _wait(stop, backoff)
                backoff = min(backoff * 2, settings.poll_interval_seconds)
                continue
            if not due:
                await _wait(stop, CATCHUP_CHECK_SECONDS)
                continue
            try:
                await _poll(
                    settings,
                    store,
                    client,
                    lease,
                    since=None,
                    derive=derive,
                    progress=None,
                    batch_watermark=batch_watermark,
                    metrics=metrics,
                    types=types,
                    batch_versions=batch_versions,
                )
            except LeaseLost:
                logger.warning("poller lease lost during a poll; standing by")
                await lease.release()
                continue
            except (DependencyUnavailable, RedisError) as exc:
                logger.warning("poll failed (%s); next try in %.0f s", exc, backoff)
                next_poll = loop.time() + backoff
                backoff = min(backoff * 2, settings.poll_interval_seconds)
                continue
            except FhirFatalError as exc:
                logger.error("HAPI refused the poll: %s", exc)
            except Exception:
                logger.exception("poll failed unexpectedly; next try after the interval")
            backoff = 1.0
            next_poll = loop.time() + settings.poll_interval_seconds
    finally:
        await lease.release()
