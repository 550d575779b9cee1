"""The speed layer in Redis: the one module that owns its key schema.

Key schema (every key starts with `rf:`; `{...}` is a Redis Cluster hash tag):

    rf:{T.b}:r:<id>          HASH   one resource: vn, lum, vid, lu, st (p|d), body, ch, rcv, views
    rf:{T.b}:ver             HASH   id -> "st|vn|lum|vid" for every entry of the bucket
    rf:{T.b}:chg             ZSET   id scored by change time (HAPI's lastUpdated, epoch ms)
    rf:{T.b}:rows:<view>     HASH   id -> JSON array of the view's rows (present entries only)
    rf:{T.b}:log / :seq      ZSET   id scored by a per-bucket write sequence (incremental reads)
    rf:{meta}:...            global: epoch marker, rejects, catch-up flag, poller state, stats

T is the resource type, b = crc32(id) % BUCKETS. A resource write touches only keys with
its own tag, so it is one atomic Lua call on one slot, on a single Redis or a Cluster;
queries fan out over the BUCKETS buckets of a type. Nothing here ever uses SCAN or KEYS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.errors import Issue, SpeedLayerUnavailable, StartupError
from core.fhir_values import parse_instant
from core.settings import STARTUP_TIMEOUT_SECONDS, Settings

if TYPE_CHECKING:
    from core.validation import ValidResource

logger = logging.getLogger(__name__)

BUCKETS = 16
PREFIX = "rf:"
META = "rf:{meta}:"
EPOCH_KEY = META + "epoch"
CATCHUP_KEY = META + "catchup"
REJECTS_KEY = META + "rejects"  # LIST of recent rejects (JSON, never a body)
REJECTS_SEEN_KEY = META + "rejects:seen"  # HASH "T/id" -> version, to record each once
REJECTS_COUNT_KEY = META + "rejects:count"
HOURLY_KEY = META + "hourly"  # HASH "YYYY-mm-ddTHH" -> changes received that hour
MISSED_KEY = META + "missed"  # counter of notifications the poller found missing
TYPES_KEY = META + "types"  # SET of resource types ever written
GENERATION_KEY = META + "generation"  # bumped by every trim: incremental readers reload
# HASH "T/id/version" -> change time (ms, HAPI's clock): changes the poller wrote before
# HAPI's retry window for their notification had passed; judged missed or not later.
PENDING_KEY = META + "missed:pending"
REJECTS_MAX = 1000
REJECTS_SEEN_MAX = 100_000

RedisClient = aioredis.Redis | RedisCluster


def bucket_of(resource_id: str) -> int:
    return zlib.crc32(resource_id.encode()) % BUCKETS


def tag(resource_type: str, bucket: int) -> str:
    return f"{PREFIX}{{{resource_type}.{bucket}}}:"


def resource_key(resource_type: str, resource_id: str) -> str:
    return f"{tag(resource_type, bucket_of(resource_id))}r:{resource_id}"


def pending_field(
    resource_type: str, resource_id: str, version_id: str | None, last_updated: str | None
) -> str:
    """The name of one change in the pending-judgement hash: TYPE/ID/version (or lastUpdated
    for a resource without a versionId)."""
    return f"{resource_type}/{resource_id}/{version_id or last_updated or ''}"


def version_number(version_id: str | None) -> float:
    """Numeric meta.versionId, or -1 when absent or not an integer (then lastUpdated decides)."""
    if version_id is not None and version_id.isdigit():
        return float(int(version_id))
    return -1.0


@dataclass(frozen=True)
class Derived:
    """What the serving layer keeps up to date at write time for one resource version."""

    rows: dict[str, bytes] = field(default_factory=dict)  # view name -> JSON array of rows


# What the write path computes for a validated resource (serving.derive.default_deriver).
Deriver: TypeAlias = "Callable[[ValidResource], Derived]"


@dataclass(frozen=True)
class Entry:
    """One speed-layer entry as stored."""

    resource_type: str
    resource_id: str
    state: Literal["present", "deleted"]
    version_id: str | None
    last_updated: str | None
    version_number: float
    last_updated_ms: float
    body: bytes | None


@dataclass(frozen=True)
class Version:
    """A stored entry's identity and version, without its body (from the `ver` hash)."""

    resource_id: str
    state: Literal["present", "deleted"]
    version_number: float
    last_updated_ms: float
    version_id: str | None


def is_newer(
    version_number: float,
    last_updated_ms: float,
    old_version_number: float,
    old_last_updated_ms: float,
) -> bool:
    """The version order of the contract: integer versionIds when both have one, else
    lastUpdated (epoch ms); mirrors the Lua `newer` below."""
    if version_number >= 0 and old_version_number >= 0:
        return version_number > old_version_number
    return last_updated_ms > old_last_updated_ms


_LUA_COMMON = """
local function newer(vn, lum, ovn, olum)
  if vn >= 0 and ovn >= 0 then return vn > ovn end
  return lum > olum
end
local function drop_derived(prefix, r, id)
  -- Legacy: entries written before the ix: index sets went still name theirs; remove them
  -- (nothing may SCAN for them). To go once every deployment ran a refresh cycle after.
  local ix = redis.call('HGET', r, 'ix')
  if ix then
    if ix ~= '' then
      for _, name in ipairs(cjson.decode(ix)) do
        redis.call('SREM', prefix .. 'ix:' .. name, id)
      end
    end
    redis.call('HDEL', r, 'ix')
  end
  local views = redis.call('HGET', r, 'views')
  if views and views ~= '' then
    for _, v in ipairs(cjson.decode(views)) do
      redis.call('HDEL', prefix .. 'rows:' .. v, id)
    end
  end
end
-- Write the derived rows laid out in ARGV from position i: nviews, (view, rows)..., and
-- remember on the resource hash which views hold them (for drop_derived).
local function write_derived(prefix, r, id, i)
  local nviews = tonumber(ARGV[i])
  local views = {}
  for k = 1, nviews do
    local v = ARGV[i + 2 * k - 1]
    redis.call('HSET', prefix .. 'rows:' .. v, id, ARGV[i + 2 * k])
    views[#views + 1] = v
  end
  redis.call('HSET', r, 'views', #views > 0 and cjson.encode(views) or '')
end
"""

# KEYS[1] resource hash, KEYS[2] ver hash, KEYS[3] chg zset
# ARGV: prefix, id, vn, lum, vid, lu, st, body, score, received, expire_seconds,
#       nviews, view1, rows1, ...
_UPSERT_LUA = (
    _LUA_COMMON
    + """
local r, ver, chg = KEYS[1], KEYS[2], KEYS[3]
local prefix, id = ARGV[1], ARGV[2]
local vn, lum = tonumber(ARGV[3]), tonumber(ARGV[4])
local old = redis.call('HMGET', r, 'vn', 'lum')
if old[1] then
  if not newer(vn, lum, tonumber(old[1]), tonumber(old[2])) then return 0 end
end
drop_derived(prefix, r, id)
local st = ARGV[7]
redis.call('HSET', r, 'vn', ARGV[3], 'lum', ARGV[4], 'vid', ARGV[5], 'lu', ARGV[6],
  'st', st, 'ch', ARGV[9], 'rcv', ARGV[10])
if st == 'p' then redis.call('HSET', r, 'body', ARGV[8]) else redis.call('HDEL', r, 'body') end
redis.call('HSET', ver, id, st .. '|' .. ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5])
redis.call('ZADD', chg, tonumber(ARGV[9]), id)
-- A per-bucket log in write order, so a reader can follow changes incrementally.
redis.call('ZADD', prefix .. 'log', redis.call('INCR', prefix .. 'seq'), id)
write_derived(prefix, r, id, 12)
local ttl = tonumber(ARGV[11])
if ttl > 0 then redis.call('EXPIRE', r, ttl) else redis.call('PERSIST', r) end
return 1
"""
)

# Remove an entry only when the batch layer holds it at the same or a newer version.
# KEYS as upsert; ARGV: prefix, id, batch_vn, batch_lum
_TRIM_LUA = (
    _LUA_COMMON
    + """
local r, ver, chg = KEYS[1], KEYS[2], KEYS[3]
local prefix, id = ARGV[1], ARGV[2]
local old = redis.call('HMGET', r, 'vn', 'lum')
if not old[1] then
  redis.call('HDEL', ver, id)
  redis.call('ZREM', chg, id)
  return 0
end
if newer(tonumber(old[1]), tonumber(old[2]), tonumber(ARGV[3]), tonumber(ARGV[4])) then
  return 0
end
drop_derived(prefix, r, id)
redis.call('DEL', r)
redis.call('HDEL', ver, id)
redis.call('ZREM', chg, id)
redis.call('ZREM', prefix .. 'log', id)
return 1
"""
)


# Replace the derived rows of an entry, only if it still holds the same present version (a
# newer write meanwhile derived its own). Logged, so mirrors re-read it.
# KEYS as upsert; ARGV: prefix, id, vn, lum, nviews, view1, rows1, ...
_REDERIVE_LUA = (
    _LUA_COMMON
    + """
local r = KEYS[1]
local prefix, id = ARGV[1], ARGV[2]
local old = redis.call('HMGET', r, 'vn', 'lum', 'st')
if not old[1] or old[3] ~= 'p' then return 0 end
if tonumber(old[1]) ~= tonumber(ARGV[3]) or tonumber(old[2]) ~= tonumber(ARGV[4]) then
  return 0
end
drop_derived(prefix, r, id)
write_derived(prefix, r, id, 5)
redis.call('ZADD', prefix .. 'log', redis.call('INCR', prefix .. 'seq'), id)
return 1
"""
)


def _derived_args(derived: Derived | None) -> list[Any]:
    """The ARGV tail the Lua `write_derived` reads: nviews, (view, rows)..."""
    if derived is None:
        return [0]
    args: list[Any] = [len(derived.rows)]
    for view, rows in derived.rows.items():
        args.extend([view, rows])
    return args


def connect(settings: Settings) -> RedisClient:
    """A client for the speed layer: a plain Redis or, with REDIS_CLUSTER, a Cluster."""
    common: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "health_check_interval": 30,
        # A pooled connection dies with a Redis restart; retry such errors on a fresh one.
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    if settings.redis_cluster:
        # Its pool does not block: past max_connections per node a command fails at once
        # (MaxConnectionsError, default 100), so allow what a burst of concurrent writes needs.
        return RedisCluster.from_url(settings.redis_url, max_connections=1024, **common)
    # Not the blocking pool: its wait machinery costs ~40 µs per command on the write path
    # (benchmarks/README.md). The pool grows to the number of requests in flight, which
    # uvicorn's connections bound; past 1024 a command fails and the receiver answers 503.
    pool = aioredis.ConnectionPool.from_url(settings.redis_url, max_connections=1024, **common)
    return aioredis.Redis(connection_pool=pool)


async def check_redis(settings: Settings) -> None:
    """Reach the speed layer once (PING); StartupError naming REDIS_URL's host otherwise."""
    client = connect(settings)
    try:
        await asyncio.wait_for(client.ping(), timeout=STARTUP_TIMEOUT_SECONDS * 2)
    except (RedisError, OSError, TimeoutError) as exc:
        raise StartupError(
            f"Redis (REDIS_URL) cannot be reached: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


def _decode(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_ver(resource_id: str, raw: bytes | str) -> Version:
    st, vn, lum, vid = _decode(raw).split("|", 3)  # type: ignore[union-attr]
    return Version(
        resource_id=resource_id,
        state="present" if st == "p" else "deleted",
        version_number=float(vn),
        last_updated_ms=float(lum),
        version_id=vid or None,
    )


class SpeedStore:
    """Atomic, version-guarded reads and writes of the speed layer."""

    def __init__(self, client: RedisClient, *, max_age_hours: int | None = None) -> None:
        self.client = client
        self.expire_seconds = max_age_hours * 3600 if max_age_hours else 0
        self._upsert = client.register_script(_UPSERT_LUA)
        self._trim = client.register_script(_TRIM_LUA)
        self._rederive = client.register_script(_REDERIVE_LUA)
        self._is_cluster = isinstance(client, RedisCluster)
        self._pending_hours: dict[str, int] = {}
        self._pending_types: set[str] = set()
        self._last_flush_ms = 0.0
        self._hour_number = -1
        self._hour = ""

    # -- writes --------------------------------------------------------------------------

    async def upsert(
        self,
        resource_type: str,
        resource_id: str,
        *,
        body: bytes | None,
        version_id: str | None,
        last_updated: str | None,
        deleted: bool = False,
        derived: Derived | None = None,
        order: tuple[float, float] | None = None,
    ) -> bool:
        """Store this version if it is newer than what is held; True when it was written.

        `body` is kept byte for byte. A tombstone (`deleted=True`) keeps the version and hides
        the resource. Raises SpeedLayerUnavailable when Redis cannot take the write.
        """
        item = UpsertItem(
            resource_type, resource_id, body, version_id, last_updated, deleted, derived, order
        )
        now_ms = time.time() * 1000.0
        keys, args = self._upsert_call(item, now_ms)
        try:
            written = await self._upsert(keys=keys, args=args)
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc
        if written:
            await self._count_changes(resource_type, 1, now_ms)
        return bool(written)

    async def _count_changes(self, resource_type: str, n: int, now_ms: float) -> None:
        """Statistics for the status page, flushed at most once a second.

        They live under the {meta} tag (another slot than the resource), so they cannot join
        the atomic write; batching keeps them off the per-write round trip.
        """
        hour_number = int(now_ms // 3_600_000)
        if hour_number != self._hour_number:  # formatting the hour costs more than the count
            self._hour_number = hour_number
            self._hour = datetime.fromtimestamp(hour_number * 3600.0, UTC).strftime("%Y-%m-%dT%H")
        hour = self._hour
        self._pending_hours[hour] = self._pending_hours.get(hour, 0) + n
        self._pending_types.add(resource_type)
        if now_ms - self._last_flush_ms < 1000.0:
            return
        await self.flush_stats(now_ms)

    async def flush_stats(self, now_ms: float | None = None) -> None:
        """Write the batched statistics now (also called on shutdown and by tests)."""
        self._last_flush_ms = time.time() * 1000.0 if now_ms is None else now_ms
        hours, self._pending_hours = self._pending_hours, {}
        # The types written this second, every time: remembering which ones Redis already
        # holds would go stale when Redis comes back empty (the epoch changes) and `speed
        # stats` would stop listing a type that is still written. One SADD a second is free.
        types, self._pending_types = self._pending_types, set()
        if not hours and not types:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for hour, count in hours.items():
                    pipe.hincrby(HOURLY_KEY, hour, count)
                if types:
                    pipe.sadd(TYPES_KEY, *types)
                await pipe.execute()
        except RedisError:  # statistics only: the resources themselves are written
            logger.warning("could not count changes in %s", HOURLY_KEY)

    async def known_types(self) -> list[str]:
        """Resource types the speed layer has held (for stats and the status page)."""
        try:
            return sorted(_decode(t) or "" for t in await self.client.smembers(TYPES_KEY))
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc

    async def tombstone_after_held(self, resource_type: str, resource_id: str) -> bool:
        """Tombstone just after the newest version held, for a DELETE whose version is unknown.

        A late PUT of the held version or an older one is then ignored; a higher version (a
        re-create) wins. Nothing held: the tombstone sits below version 1.
        """
        held = await self.get(resource_type, resource_id)
        if held is None:
            order = (0.5, 0.0)
        else:
            vn = held.version_number + 0.5 if held.version_number >= 0 else -1.0
            order = (vn, held.last_updated_ms + 0.001)
        return await self.upsert(
            resource_type,
            resource_id,
            body=None,
            version_id=None,
            last_updated=None,
            deleted=True,
            order=order,
        )

    async def trim_covered(
        self, resource_type: str, covered: Iterable[tuple[str, float, float]]
    ) -> int:
        """Drop entries the batch layer holds at the same or a newer version.

        `covered` yields (id, batch version number, batch lastUpdated ms). An entry newer than
        the batch's version (written after the batch read it) stays. Returns how many went.
        """
        removed = 0
        pipe_items: list[tuple[str, float, float]] = list(covered)
        for start in range(0, len(pipe_items), 500):
            calls: list[tuple[list[str], list[Any]]] = []
            for resource_id, vn, lum in pipe_items[start : start + 500]:
                prefix = tag(resource_type, bucket_of(resource_id))
                keys = [prefix + "r:" + resource_id, prefix + "ver", prefix + "chg"]
                calls.append((keys, [prefix, resource_id, repr(vn), repr(lum)]))
            try:
                results = await self._eval_many(self._trim, calls)
            except RedisError as exc:
                raise SpeedLayerUnavailable(f"Redis did not take the trim: {exc}") from exc
            removed += sum(1 for r in results if r)
        if removed:
            try:
                await self.client.incr(GENERATION_KEY)
            except RedisError as exc:
                raise SpeedLayerUnavailable(f"Redis did not take the trim: {exc}") from exc
        return removed

    async def rederive(self, resource_type: str, derive: Callable[[bytes], Derived | None]) -> int:
        """Recompute every present entry's derived rows of a type.

        For a ViewDefinition that changed (`batch init` rebuilt its view): `derive` maps a
        stored body to its new Derived data (None: leave the entry as it is). An entry written
        meanwhile at another version keeps what its own write derived. Returns how many changed.
        """
        held = [v for v in (await self.versions(resource_type)).values() if v.state == "present"]
        changed = 0
        for start in range(0, len(held), 500):
            chunk = held[start : start + 500]
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for version in chunk:
                        pipe.hget(resource_key(resource_type, version.resource_id), "body")
                    bodies = await pipe.execute()
            except RedisError as exc:
                raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc
            calls: list[tuple[list[str], list[Any]]] = []
            for version, body in zip(chunk, bodies, strict=True):
                derived = derive(body) if isinstance(body, bytes) else None
                if derived is None:
                    continue
                prefix = tag(resource_type, bucket_of(version.resource_id))
                args: list[Any] = [
                    prefix,
                    version.resource_id,
                    repr(version.version_number),
                    repr(version.last_updated_ms),
                    *_derived_args(derived),
                ]
                keys = [prefix + "r:" + version.resource_id, prefix + "ver", prefix + "chg"]
                calls.append((keys, args))
            if not calls:
                continue
            try:
                results = await self._eval_many(self._rederive, calls)
            except RedisError as exc:
                raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc
            changed += sum(1 for r in results if r)
        return changed

    # -- reads ---------------------------------------------------------------------------

    async def get(self, resource_type: str, resource_id: str) -> Entry | None:
        """The entry held for TYPE/ID (present or tombstone), or None."""
        try:
            raw = await self.client.hmget(
                resource_key(resource_type, resource_id), ["st", "vid", "lu", "vn", "lum", "body"]
            )
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc
        st, vid, lu, vn, lum, body = raw
        if st is None:
            return None
        return Entry(
            resource_type=resource_type,
            resource_id=resource_id,
            state="present" if _decode(st) == "p" else "deleted",
            version_id=_decode(vid) or None,
            last_updated=_decode(lu) or None,
            version_number=float(_decode(vn) or -1),
            last_updated_ms=float(_decode(lum) or 0),
            body=body if _decode(st) == "p" and isinstance(body, bytes) else None,
        )

    async def versions(self, resource_type: str) -> dict[str, Version]:
        """Every entry of a type with its version (no bodies): one HGETALL per bucket."""
        results = await self._fan_out(lambda p, t: p.hgetall(t + "ver"), resource_type)
        out: dict[str, Version] = {}
        for result in results:
            for raw_id, raw in result.items():
                resource_id = _decode(raw_id) or ""
                out[resource_id] = _parse_ver(resource_id, raw)
        return out

    async def rows(self, resource_type: str, view: str) -> dict[str, bytes]:
        """The precomputed rows of one view for every present entry of a type."""
        results = await self._fan_out(lambda p, t: p.hgetall(f"{t}rows:{view}"), resource_type)
        out: dict[str, bytes] = {}
        for result in results:
            for raw_id, raw in result.items():
                out[_decode(raw_id) or ""] = raw
        return out

    async def rows_for(self, resource_type: str, view: str, ids: Sequence[str]) -> dict[str, bytes]:
        """The precomputed rows of one view for the given ids (absent ones are left out)."""
        if not ids:
            return {}
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for resource_id in ids:
                    pipe.hget(
                        f"{tag(resource_type, bucket_of(resource_id))}rows:{view}", resource_id
                    )
                values = await pipe.execute()
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc
        return {i: v for i, v in zip(ids, values, strict=True) if v is not None}

    async def changed_since(self, resource_type: str, since_ms: float) -> list[str]:
        """Ids of a type whose stored change time is at or after `since_ms` (HAPI's clock)."""
        results = await self._fan_out(
            lambda p, t: p.zrangebyscore(t + "chg", since_ms, "+inf"), resource_type
        )
        return [_decode(m) or "" for result in results for m in result]

    async def log_since(
        self, resource_type: str, after: Sequence[int]
    ) -> list[tuple[int, list[str]]]:
        """Per bucket: (newest sequence, ids written after `after[bucket]`), in write order.

        An incremental reader keeps the sequences it saw and re-reads only what changed; it
        reloads fully when `generation()` or `epoch()` changes (trims, or Redis lost its data).
        """
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for bucket in range(BUCKETS):
                    key = tag(resource_type, bucket) + "log"
                    pipe.zrangebyscore(key, f"({after[bucket]}", "+inf", withscores=True)
                results = await pipe.execute()
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc
        out: list[tuple[int, list[str]]] = []
        for bucket, result in enumerate(results):
            ids = [_decode(m) or "" for m, _ in result]
            newest = int(result[-1][1]) if result else after[bucket]
            out.append((newest, ids))
        return out

    async def generation(self) -> int:
        """Bumped whenever a trim removed entries."""
        try:
            return int(_decode(await self.client.get(GENERATION_KEY)) or 0)
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc

    async def entries(self, resource_type: str, ids: Sequence[str]) -> dict[str, Version]:
        """Versions of the given ids (absent ones left out), one pipeline."""
        if not ids:
            return {}
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for resource_id in ids:
                    pipe.hget(tag(resource_type, bucket_of(resource_id)) + "ver", resource_id)
                values = await pipe.execute()
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc
        return {i: _parse_ver(i, v) for i, v in zip(ids, values, strict=True) if v is not None}

    async def count(self, resource_type: str) -> int:
        results = await self._fan_out(lambda p, t: p.hlen(t + "ver"), resource_type)
        return int(sum(results))

    async def oldest_newest(self, resource_type: str) -> tuple[float | None, float | None]:
        """Change times (epoch ms) of the oldest and newest entry of a type."""
        firsts = await self._fan_out(
            lambda p, t: p.zrange(t + "chg", 0, 0, withscores=True), resource_type
        )
        lasts = await self._fan_out(
            lambda p, t: p.zrange(t + "chg", -1, -1, withscores=True), resource_type
        )
        lows = [s for r in firsts for _, s in r]
        highs = [s for r in lasts for _, s in r]
        return (min(lows) if lows else None, max(highs) if highs else None)

    async def _fan_out(self, command: Any, resource_type: str) -> list[Any]:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for bucket in range(BUCKETS):
                    command(pipe, tag(resource_type, bucket))
                return list(await pipe.execute())
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc

    # -- the epoch marker, catch-up flag and rejects ---------------------------------------

    async def epoch(self) -> str | None:
        """The epoch marker, or None when Redis came back empty (speed layer incomplete)."""
        try:
            return _decode(await self.client.get(EPOCH_KEY))
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc

    async def mark_epoch(self) -> str:
        """Set the epoch marker (after a catch-up made the speed layer complete)."""
        value = datetime.now(UTC).isoformat()
        await self.client.set(EPOCH_KEY, value, nx=True)
        return _decode(await self.client.get(EPOCH_KEY)) or value

    async def request_catchup(self, reason: str) -> None:
        """Record that a catch-up poll is due (the poller acts on it)."""
        try:
            await self.client.set(CATCHUP_KEY, f"{time.time():.3f} {reason}")
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc

    async def take_catchup(self) -> str | None:
        """Take (and clear) the catch-up request, if any."""
        return _decode(await self.client.getdel(CATCHUP_KEY))

    async def record_reject(
        self, resource_type: str, resource_id: str, version_id: str | None, issues: Sequence[Issue]
    ) -> bool:
        """Record a rejected resource once per (type, id, version); never its body."""
        seen_field = f"{resource_type}/{resource_id}"
        version = version_id or ""
        try:
            if _decode(await self.client.hget(REJECTS_SEEN_KEY, seen_field)) == version and version:
                return False
            entry = json.dumps(
                {
                    "type": resource_type,
                    "id": resource_id,
                    "version": version_id,
                    "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "issues": [
                        {"expression": i.expression, "diagnostics": i.diagnostics[:300]}
                        for i in issues[:20]
                    ],
                }
            )
            async with self.client.pipeline(transaction=False) as pipe:
                if await self.client.hlen(REJECTS_SEEN_KEY) < REJECTS_SEEN_MAX:
                    pipe.hset(REJECTS_SEEN_KEY, seen_field, version)
                pipe.lpush(REJECTS_KEY, entry)
                pipe.ltrim(REJECTS_KEY, 0, REJECTS_MAX - 1)
                pipe.incr(REJECTS_COUNT_KEY)
                await pipe.execute()
        except RedisError as exc:
            logger.warning(
                "could not record a reject of %s/%s: %s", resource_type, resource_id, exc
            )
            return False
        return True

    async def is_rejected(
        self, resource_type: str, resource_id: str, version_id: str | None
    ) -> bool:
        seen = await self.client.hget(REJECTS_SEEN_KEY, f"{resource_type}/{resource_id}")
        return seen is not None and _decode(seen) == (version_id or "")

    async def recent_rejects(self, limit: int = 50) -> list[dict[str, Any]]:
        raw = await self.client.lrange(REJECTS_KEY, 0, limit - 1)
        return [json.loads(r) for r in raw]

    async def reject_count(self) -> int:
        return int(_decode(await self.client.get(REJECTS_COUNT_KEY)) or 0)

    async def count_missed(self, n: int = 1) -> None:
        await self.client.incrby(MISSED_KEY, n)

    async def missed_count(self) -> int:
        return int(_decode(await self.client.get(MISSED_KEY)) or 0)

    # -- changes awaiting judgement (missed or not) -------------------------------------------

    async def hold_pending(self, changes: dict[str, float]) -> None:
        """Record changes the poller writes before HAPI's retry window for them has passed
        (`pending_field` -> change time, ms in HAPI's clock): their notification may still come.
        """
        if not changes:
            return
        try:
            await self.client.hset(PENDING_KEY, mapping=changes)  # type: ignore[arg-type]
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc

    async def clear_pending(self, fields: Sequence[str]) -> None:
        if not fields:
            return
        try:
            await self.client.hdel(PENDING_KEY, *fields)
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc

    async def pending(self) -> dict[str, float]:
        """Every change awaiting judgement: `pending_field` -> change time (ms)."""
        try:
            raw = await self.client.hgetall(PENDING_KEY)
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc
        return {_decode(k) or "": float(_decode(v) or 0) for k, v in raw.items()}

    async def confirm_delivery(
        self, resource_type: str, resource_id: str, version_id: str | None, last_updated: str | None
    ) -> None:
        """A notification arrived for a version the speed layer already held: if the poller
        wrote it first, it was not missed. Only for writes the version guard turned away, so
        the receiver's usual write costs nothing more. Statistics only: never fails the write.
        """
        field = pending_field(resource_type, resource_id, version_id, last_updated)
        try:
            await self.client.hdel(PENDING_KEY, field)
        except RedisError as exc:
            logger.warning("could not confirm a delivery in %s: %s", PENDING_KEY, exc)

    async def purge_type(self, resource_type: str) -> int:
        """Remove every entry of a type and the type itself from the speed layer (for
        `Subscription`, which must never be held: it carries the receiver's token). Returns
        how many entries went."""
        versions = await self.versions(resource_type)
        removed = 0
        ids = list(versions)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for resource_id in chunk:
                        pipe.delete(resource_key(resource_type, resource_id))
                    results = await pipe.execute()
            except RedisError as exc:
                raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc
            removed += sum(int(r) for r in results)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for bucket in range(BUCKETS):
                    prefix = tag(resource_type, bucket)
                    # Derived keys (view rows) hold nothing for a type no view reads.
                    pipe.delete(prefix + "ver", prefix + "chg", prefix + "log")
                pipe.srem(TYPES_KEY, resource_type)
                pipe.incr(GENERATION_KEY)  # incremental readers reload
                await pipe.execute()
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc
        return removed

    async def holds_type(self, resource_type: str) -> bool:
        try:
            return bool(await self.client.sismember(TYPES_KEY, resource_type))
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc

    async def hourly_changes(self, hours: int = 24) -> list[tuple[str, int]]:
        """Changes received per hour over the last `hours` hours, oldest first."""
        now = time.time()
        labels = [
            datetime.fromtimestamp(now - 3600 * k, UTC).strftime("%Y-%m-%dT%H")
            for k in range(hours - 1, -1, -1)
        ]
        values = await self.client.hmget(HOURLY_KEY, labels)
        return [(label, int(_decode(v) or 0)) for label, v in zip(labels, values, strict=True)]

    async def server_config(self) -> dict[str, str]:
        """Persistence mode and eviction policy, for start-up logs and `speed stats`."""
        info: dict[str, str] = {}
        # A Cluster answers CONFIG GET from one node unless asked for all; one evicting node
        # is enough to lose entries, so every node's value is reported (distinct ones joined).
        per_node = {"target_nodes": RedisCluster.ALL_NODES} if self._is_cluster else {}
        try:
            for name in ("maxmemory-policy", "appendonly", "appendfsync", "save"):
                got = await self.client.config_get(name, **per_node)
                nodes = list(got.values()) if isinstance(got, dict) and self._is_cluster else []
                if nodes and all(isinstance(n, dict) for n in nodes):
                    values = {_decode(n.get(name)) or "" for n in nodes}  # type: ignore[union-attr]
                    info[name] = ",".join(sorted(values))
                    continue
                if isinstance(got, dict) and got:
                    # RedisCluster answers per node; take the first.
                    first = next(iter(got.values()))
                    info[name] = (
                        _decode(first if not isinstance(first, dict) else first.get(name)) or ""
                    )
        except RedisError as exc:
            logger.info("CONFIG GET is not allowed here (%s); persistence mode unknown", exc)
        return info

    async def warn_about_config(self) -> dict[str, str]:
        """Log the persistence mode and warn loudly when Redis may evict speed-layer keys."""
        info = await self.server_config()
        policy = info.get("maxmemory-policy", "unknown")
        logger.info(
            "speed layer Redis: maxmemory-policy=%s appendonly=%s appendfsync=%s",
            policy,
            info.get("appendonly", "unknown"),
            info.get("appendfsync", "unknown"),
        )
        if policy not in ("noeviction", "unknown"):
            logger.warning(
                "Redis maxmemory-policy is %s: Redis may EVICT speed-layer entries and answers "
                "would silently miss changes. Set maxmemory-policy noeviction.",
                policy,
            )
        return info

    # -- the fallback poller: watermark, lease, batched writes (subscriptions/poller.py) --

    async def poller_watermark(self) -> str | None:
        """The poller's watermark (an instant in HAPI's clock), or None before its first poll."""
        try:
            return _decode(await self.client.get(POLLER_WATERMARK_KEY))
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc

    async def set_poller_watermark(self, value: str) -> None:
        try:
            await self.client.set(POLLER_WATERMARK_KEY, value)
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc

    def poller_lock(self, ttl_ms: int) -> Lock:
        """The poller lease: redis-py's Lock on POLLER_LEASE_KEY that expires after `ttl_ms`
        unless renewed (SET NX PX with a random token; `reacquire` and `release` act only
        while that token holds it, else raise LockNotOwnedError). Not thread-local: the
        poller renews it from another task. The fence (stop before saving anything once
        a renewal failed) is the caller's: `subscriptions.poller.Lease`."""
        return self.client.lock(POLLER_LEASE_KEY, timeout=ttl_ms / 1000.0, thread_local=False)

    async def upsert_many(self, items: Sequence[UpsertItem]) -> list[bool]:
        """`upsert` for many resources in one pipeline: each write is still one atomic,
        version-guarded Lua call; returns per item whether it was written."""
        if not items:
            return []
        now_ms = time.time() * 1000.0
        try:
            results = await self._eval_many(
                self._upsert, [self._upsert_call(item, now_ms) for item in items]
            )
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc
        written = [bool(r) for r in results]
        for item, was_written in zip(items, written, strict=True):
            if was_written:
                await self._count_changes(item.resource_type, 1, now_ms)
        return written

    async def _eval_many(
        self, script: AsyncScript, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """Run `script` once per (KEYS, ARGV) in one pipeline, results in order."""
        if not isinstance(self.client, RedisCluster):
            async with self.client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    await script(keys=keys, args=args, client=pipe)
                return list(await pipe.execute())
        # redis-py refuses EVALSHA in a cluster pipeline (it could not load a missing script
        # on the right node), so queue the raw command: it is routed by its keys' slot and the
        # pipeline goes to every node at once. NOSCRIPT means the call did not run: load the
        # script on every primary and send those calls again.
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            async with self.client.pipeline(transaction=False) as pipe:
                for i in todo:
                    keys, args = calls[i]
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                answers = await pipe.execute(raise_on_error=False)
            missing: list[int] = []
            for i, answer in zip(todo, answers, strict=True):
                if isinstance(answer, NoScriptError) and attempt == 0:
                    missing.append(i)
                elif isinstance(answer, Exception):
                    raise answer
                else:
                    results[i] = answer
            if not missing:
                break
            await self.client.script_load(script.script)
            todo = missing
        return results

    def _upsert_call(self, item: UpsertItem, now_ms: float) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of one _UPSERT_LUA call."""
        # `order` overrides the (version number, lastUpdated ms) pair the guard compares.
        vn, lum = (
            item.order
            if item.order is not None
            else (version_number(item.version_id), parse_instant(item.last_updated))
        )
        prefix = tag(item.resource_type, bucket_of(item.resource_id))
        args: list[Any] = [
            prefix,
            item.resource_id,
            repr(vn),
            repr(lum),
            item.version_id or "",
            item.last_updated or "",
            "d" if item.deleted else "p",
            b"" if item.deleted or item.body is None else item.body,
            repr(lum or now_ms),
            repr(now_ms),
            self.expire_seconds,
        ]
        args.extend(_derived_args(None if item.deleted else item.derived))
        keys = [prefix + "r:" + item.resource_id, prefix + "ver", prefix + "chg"]
        return keys, args


POLLER_WATERMARK_KEY = META + "poller:watermark"  # STRING instant (HAPI's clock)
POLLER_LEASE_KEY = META + "poller:lease"  # STRING token of the poller that works, with a TTL


@dataclass(frozen=True)
class UpsertItem:
    """One write of `SpeedStore.upsert_many` (the arguments of `upsert`)."""

    resource_type: str
    resource_id: str
    body: bytes | None
    version_id: str | None
    last_updated: str | None
    deleted: bool = False
    derived: Derived | None = None
    order: tuple[float, float] | None = None
