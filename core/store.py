"""The speed layer in Redis: the one module that owns its key schema.

Key schema (every key starts with `rf:`; `{...}` is a Redis Cluster hash tag):

    rf:{T.b}:e           HASH   id -> the entry's record (below), one per resource
    rf:{T.b}:chg         ZSET   id scored by change time (HAPI's lastUpdated, epoch ms)
    rf:{T.b}:log:<k>     ZSET   id scored by the write sequence of the version held, for the
                                sequences 128k .. 128k + 127 (the write log, in chunks)
    rf:{T.b}:seq         STRING the bucket's write counter (incremental reads)
    rf:{meta}:...        global: epoch marker, rejects, catch-up flag, poller state, stats

A record is `st|vn|lum|vid|seq|codec|payload`: st `p` (present) or `d` (tombstone); vn and lum
the version number and lastUpdated (epoch ms) the version guard compares; vid meta.versionId
as received ('' when none); seq the write sequence of this version (it names its log chunk);
codec a core.codec id; the payload of a present entry is core.codec's frame (body, view rows,
lastUpdated), of a tombstone its lastUpdated. The header sits outside the compressed frame so
the scripts guard, trim and sweep without decompressing.

Why this shape: on Redis's default encodings one hash field per resource costs ~95 B against
~1,650 B for a hash per resource; the body compresses to ~40 % of its compact JSON with the R4
dictionary; a log chunk of at most 128 ids stays a listpack (zset-max-listpack-entries' default)
at ~17 B per id. About 570 B per resource in all (benchmarks/README.md).

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

from core.codec import RAW, ZSTD_R4, CorruptRecord, RecordCodec
from core.errors import InvalidRequest, Issue, SpeedLayerUnavailable, StartupError
from core.fhir_values import parse_instant
from core.redis_connection import HiredisPackedConnection
from core.settings import STARTUP_TIMEOUT_SECONDS, Settings

if TYPE_CHECKING:
    from core.validation import ValidResource

logger = logging.getLogger(__name__)

BUCKETS = 16
LOG_CHUNK = 128  # ids per write-log chunk: zset-max-listpack-entries' default
READ_CHUNK = 500  # ids per read of records, so no reply holds a whole bucket
PREFIX = "rf:"
META = "rf:{meta}:"
# The epoch marker of this key schema. The schema before it (a hash per resource) kept its
# marker in "rf:{meta}:epoch": a Redis still holding that layout reads as incomplete here until
# `clear_old_layout` removed it and a catch-up re-read the changes.
EPOCH_KEY = META + "epoch:2"
OLD_EPOCH_KEY = META + "epoch"
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


def entries_key(resource_type: str, resource_id: str) -> str:
    """The hash that holds the record of TYPE/ID (field: the id)."""
    return tag(resource_type, bucket_of(resource_id)) + "e"


def log_key(prefix: str, seq: int) -> str:
    """The write-log chunk of sequence `seq` in the bucket of `prefix` (mirrors the Lua `log`)."""
    return f"{prefix}log:{seq // LOG_CHUNK}"


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


def _number(x: float) -> str:
    """The shortest text of a version number or instant (`1`, `1764064800000`, `2.5`): Lua's
    tonumber and Python's float read it back exactly."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


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
    """A stored entry's identity and version, without its body (a record's header)."""

    resource_id: str
    state: Literal["present", "deleted"]
    version_number: float
    last_updated_ms: float
    version_id: str | None


@dataclass(frozen=True)
class Stored:
    """One entry with what a reader of the serving layer needs: its version, its body (None
    for a tombstone), its lastUpdated as received and its precomputed rows per view."""

    version: Version
    body: bytes | None
    last_updated: str | None
    rows: dict[str, bytes]


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
local CHUNK = 128
local function newer(vn, lum, ovn, olum)
  if vn >= 0 and ovn >= 0 then return vn > ovn end
  return lum > olum
end
-- A record's header "st|vn|lum|vid|seq|codec|...": st, vn, lum, vid, seq
local function header(rec)
  local st, vn, lum, vid, seq = string.match(rec, '^(%a)|([^|]*)|([^|]*)|([^|]*)|(%d+)|')
  return st, tonumber(vn), tonumber(lum), vid, tonumber(seq)
end
local function unlog(prefix, id, seq)
  redis.call('ZREM', prefix .. 'log:' .. math.floor(seq / CHUNK), id)
end
-- Log a write: the next sequence of the bucket, in the chunk of that sequence.
local function log(prefix, id)
  local seq = redis.call('INCR', prefix .. 'seq')
  redis.call('ZADD', prefix .. 'log:' .. math.floor(seq / CHUNK), seq, id)
  return seq
end
"""

# KEYS[1] entries hash, KEYS[2] chg zset
# ARGV: prefix, id, vn, lum, vid, st, codec, payload, change_ms
_UPSERT_LUA = (
    _LUA_COMMON
    + """
local e, chg = KEYS[1], KEYS[2]
local prefix, id = ARGV[1], ARGV[2]
local old = redis.call('HGET', e, id)
if old then
  local _, ovn, olum, _, oseq = header(old)
  if not newer(tonumber(ARGV[3]), tonumber(ARGV[4]), ovn, olum) then return 0 end
  unlog(prefix, id, oseq)
end
local seq = log(prefix, id)
redis.call('HSET', e, id, ARGV[6] .. '|' .. ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5] .. '|'
  .. seq .. '|' .. ARGV[7] .. '|' .. ARGV[8])
redis.call('ZADD', chg, ARGV[9], id)
return 1
"""
)

# Remove an entry only when the batch layer holds it at the same or a newer version.
# KEYS as upsert; ARGV: prefix, id, batch_vn, batch_lum
_TRIM_LUA = (
    _LUA_COMMON
    + """
local e, chg = KEYS[1], KEYS[2]
local prefix, id = ARGV[1], ARGV[2]
local old = redis.call('HGET', e, id)
if not old then
  redis.call('ZREM', chg, id)
  return 0
end
local _, ovn, olum, _, oseq = header(old)
if newer(ovn, olum, tonumber(ARGV[3]), tonumber(ARGV[4])) then return 0 end
redis.call('HDEL', e, id)
redis.call('ZREM', chg, id)
unlog(prefix, id, oseq)
return 1
"""
)

# Replace the payload (re-derived rows) of an entry, only if it still holds the same present
# version (a newer write meanwhile derived its own). Logged, so mirrors re-read it.
# KEYS as upsert; ARGV: prefix, id, vn, lum, codec, payload
_REDERIVE_LUA = (
    _LUA_COMMON
    + """
local e = KEYS[1]
local prefix, id = ARGV[1], ARGV[2]
local old = redis.call('HGET', e, id)
if not old then return 0 end
local st, ovn, olum, vid, oseq = header(old)
if st ~= 'p' or ovn ~= tonumber(ARGV[3]) or olum ~= tonumber(ARGV[4]) then return 0 end
unlog(prefix, id, oseq)
local seq = log(prefix, id)
redis.call('HSET', e, id, 'p|' .. ARGV[3] .. '|' .. ARGV[4] .. '|' .. vid .. '|' .. seq .. '|'
  .. ARGV[5] .. '|' .. ARGV[6])
return 1
"""
)

# Remove an entry whatever its version: all of a type (purge), or, with a cutoff, one whose
# change time is still at or before it (the age cap; a newer write meanwhile stays).
# KEYS as upsert; ARGV: prefix, id, cutoff_ms ('' = none)
_DROP_LUA = (
    _LUA_COMMON
    + """
local e, chg = KEYS[1], KEYS[2]
local prefix, id = ARGV[1], ARGV[2]
if ARGV[3] ~= '' then
  local score = redis.call('ZSCORE', chg, id)
  if score and tonumber(score) > tonumber(ARGV[3]) then return 0 end
end
redis.call('ZREM', chg, id)
local old = redis.call('HGET', e, id)
if not old then return 0 end
local _, _, _, _, oseq = header(old)
redis.call('HDEL', e, id)
unlog(prefix, id, oseq)
return 1
"""
)

# Remove one entry of the schema before this one (a hash `r:<id>` per resource, `ver`,
# `rows:<view>`, `ix:<name>`, one `log`); its change-index entry goes unless a write of this
# schema holds the id meanwhile. Returns the views and index sets it named (JSON or '').
# KEYS[1] entries hash, KEYS[2] chg zset; ARGV: prefix, id
_DROP_OLD_LUA = """
local e, chg = KEYS[1], KEYS[2]
local prefix, id = ARGV[1], ARGV[2]
local r = prefix .. 'r:' .. id
local named = redis.call('HMGET', r, 'views', 'ix')
redis.call('DEL', r)
redis.call('HDEL', prefix .. 'ver', id)
redis.call('ZREM', prefix .. 'log', id)
if redis.call('HEXISTS', e, id) == 0 then redis.call('ZREM', chg, id) end
return {named[1] or '', named[2] or ''}
"""


# Record a reject once per (type, id, version): the check and the record in one step, so
# concurrent deliveries of one rejected version (HAPI's two deliverers, the poller) count once.
# KEYS: seen hash, recent list, count; ARGV: "T/id", version ('' = none: always recorded),
# entry JSON, seen cap, list cap. Returns 1 when recorded.
_REJECT_LUA = """
local seen, recent, count = KEYS[1], KEYS[2], KEYS[3]
if ARGV[2] ~= '' and redis.call('HGET', seen, ARGV[1]) == ARGV[2] then return 0 end
if redis.call('HLEN', seen) < tonumber(ARGV[4]) then redis.call('HSET', seen, ARGV[1], ARGV[2]) end
redis.call('LPUSH', recent, ARGV[3])
redis.call('LTRIM', recent, 0, tonumber(ARGV[5]) - 1)
redis.call('INCR', count)
return 1
"""


def connect(settings: Settings) -> RedisClient:
    """A client for the speed layer: a plain Redis or, with REDIS_CLUSTER, a Cluster."""
    common: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "health_check_interval": 30,
        # A pooled connection dies with a Redis restart; retry such errors on a fresh one.
        # Not a timeout: a Redis that does not answer within socket_timeout (frozen, or
        # swapping) would make each caller wait three times as long before its 503.
        "retry": Retry(
            ExponentialBackoff(cap=0.5, base=0.05),
            retries=2,
            supported_errors=(RedisConnectionError,),
        ),
        "retry_on_error": [RedisConnectionError],
    }
    if settings.redis_cluster:
        # Its pool does not block: past max_connections per node a command fails at once
        # (MaxConnectionsError, default 100), so allow what a burst of concurrent writes needs.
        return RedisCluster.from_url(settings.redis_url, max_connections=1024, **common)
    # Not the blocking pool: its wait machinery costs ~40 µs per command on the write path
    # (benchmarks/README.md). The pool grows to the number of requests in flight, which
    # uvicorn's connections bound; past 1024 a command fails and the receiver answers 503.
    # A redis:// URL gets connections that pack commands in hiredis (~8 us less per write);
    # rediss:// and unix:// name their own connection class, which the URL's options keep.
    pool = aioredis.ConnectionPool.from_url(
        settings.redis_url,
        max_connections=1024,
        connection_class=HiredisPackedConnection,
        **common,
    )
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


@dataclass(frozen=True)
class _Record:
    """A record as stored: its header parsed, its payload still encoded."""

    version: Version
    codec: str
    payload: bytes


def _parse_record(resource_id: str, raw: bytes) -> _Record:
    """The record's header parsed; CorruptRecord (naming the id) when it is not one."""
    try:
        st, vn, lum, vid, _seq, codec, payload = raw.split(b"|", 6)
        if st not in (b"p", b"d"):
            raise ValueError(f"state {st[:8]!r}")
        version = Version(
            resource_id=resource_id,
            state="present" if st == b"p" else "deleted",
            version_number=float(vn),
            last_updated_ms=float(lum),
            version_id=vid.decode() or None,
        )
        return _Record(version, codec.decode(), payload)
    except ValueError as exc:  # too few fields, a number or text that does not parse
        raise CorruptRecord(f"the speed-layer record of id {resource_id!r}: {exc}") from exc


def _rows_of(held: dict[str, Stored], view: str) -> dict[str, bytes]:
    return {rid: stored.rows[view] for rid, stored in held.items() if view in stored.rows}


def _json_names(raw: Any) -> list[str]:
    """The names an entry of the previous key schema listed (a JSON array, or '')."""
    text = _decode(raw) or ""
    names = json.loads(text) if text else []
    return [str(n) for n in names] if isinstance(names, list) else []


class SpeedStore:
    """Atomic, version-guarded reads and writes of the speed layer."""

    def __init__(self, client: RedisClient, *, max_age_hours: int | None = None) -> None:
        self.client = client
        # SPEED_MAX_AGE_HOURS: `expire_old` (the poller's sweep) drops entries whose change
        # time is older; a hash field has no TTL of its own before Redis 7.4.
        self.max_age_ms = max_age_hours * 3_600_000.0 if max_age_hours else 0.0
        self.codec = RecordCodec()
        self._upsert = client.register_script(_UPSERT_LUA)
        self._trim = client.register_script(_TRIM_LUA)
        self._rederive = client.register_script(_REDERIVE_LUA)
        self._drop = client.register_script(_DROP_LUA)
        self._drop_old = client.register_script(_DROP_OLD_LUA)
        self._reject = client.register_script(_REJECT_LUA)
        self._is_cluster = isinstance(client, RedisCluster)
        # Concurrent single writes share round trips (a Redis Cluster routes each call
        # itself: there every write goes alone).
        self._coalesced_upsert = None if self._is_cluster else CoalescedScript(self._upsert)
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
            if self._coalesced_upsert is not None:
                written = await self._coalesced_upsert.call(keys, args)
            else:
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
        held = (await self.entries(resource_type, [resource_id])).get(resource_id)
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
                keys = [prefix + "e", prefix + "chg"]
                calls.append((keys, [prefix, resource_id, _number(vn), _number(lum)]))
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
        ids = list(await self.versions(resource_type))
        changed = 0
        for start in range(0, len(ids), READ_CHUNK):
            held = await self.records_for(resource_type, ids[start : start + READ_CHUNK])
            calls: list[tuple[list[str], list[Any]]] = []
            for resource_id, stored in held.items():
                if stored.body is None:
                    continue
                derived = derive(stored.body)
                if derived is None:
                    continue
                prefix = tag(resource_type, bucket_of(resource_id))
                payload = self.codec.pack(stored.body, derived.rows, stored.last_updated or "")
                args: list[Any] = [
                    prefix,
                    resource_id,
                    _number(stored.version.version_number),
                    _number(stored.version.last_updated_ms),
                    ZSTD_R4,
                    payload,
                ]
                calls.append(([prefix + "e", prefix + "chg"], args))
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
        stored = (await self.records_for(resource_type, [resource_id])).get(resource_id)
        if stored is None:
            return None
        version = stored.version
        return Entry(
            resource_type=resource_type,
            resource_id=resource_id,
            state=version.state,
            version_id=version.version_id,
            last_updated=stored.last_updated,
            version_number=version.version_number,
            last_updated_ms=version.last_updated_ms,
            body=stored.body,
        )

    async def versions(self, resource_type: str) -> dict[str, Version]:
        """Every entry of a type with its version (headers only, nothing decompressed)."""
        return {
            rid: record.version for rid, record in (await self._all_records(resource_type)).items()
        }

    async def records(self, resource_type: str) -> dict[str, Stored]:
        """Every entry of a type with its body and rows (what a full mirror reload reads)."""
        return {
            rid: self._open(record)
            for rid, record in (await self._all_records(resource_type)).items()
        }

    async def records_for(self, resource_type: str, ids: Sequence[str]) -> dict[str, Stored]:
        """`records` for the given ids (absent ones left out), one pipeline."""
        return {
            rid: self._open(record)
            for rid, record in (await self._records_of(resource_type, ids)).items()
        }

    async def rows(self, resource_type: str, view: str) -> dict[str, bytes]:
        """The precomputed rows of one view for every present entry of a type."""
        return _rows_of(await self.records(resource_type), view)

    async def rows_for(self, resource_type: str, view: str, ids: Sequence[str]) -> dict[str, bytes]:
        """The precomputed rows of one view for the given ids (absent ones are left out)."""
        return _rows_of(await self.records_for(resource_type, ids), view)

    async def changed_since(self, resource_type: str, since_ms: float) -> list[str]:
        """Ids of a type whose stored change time is at or after `since_ms` (HAPI's clock)."""
        results = await self._fan_out(
            lambda p, t: p.zrangebyscore(t + "chg", since_ms, "+inf"), resource_type
        )
        return [_decode(m) or "" for result in results for m in result]

    async def log_since(
        self, resource_type: str, after: Sequence[int]
    ) -> list[tuple[int, list[str]]]:
        """Per bucket: (newest sequence, ids whose held version was written after
        `after[bucket]`), in write order.

        An incremental reader keeps the sequences it saw and re-reads only what changed; it
        reloads fully when `generation()` or `epoch()` changes (trims, or Redis lost its data).
        Reads the write counters, then only the log chunks between `after` and them.
        """
        counters = [
            int(v or 0) for v in await self._fan_out(lambda p, t: p.get(t + "seq"), resource_type)
        ]
        spans: list[int] = []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for bucket in range(BUCKETS):
                    first, last = after[bucket] // LOG_CHUNK, counters[bucket] // LOG_CHUNK
                    if counters[bucket] <= after[bucket]:
                        last = first - 1
                    prefix = tag(resource_type, bucket)
                    for chunk in range(first, last + 1):
                        key = f"{prefix}log:{chunk}"
                        pipe.zrangebyscore(key, f"({after[bucket]}", "+inf", withscores=True)
                    spans.append(last - first + 1)
                results = await pipe.execute()
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc
        out: list[tuple[int, list[str]]] = []
        n = 0
        for bucket, span in enumerate(spans):
            found = [pair for result in results[n : n + span] for pair in result]
            n += span
            # A write after the counter was read may show up here: then its sequence is newest.
            newest = max([counters[bucket], after[bucket], *(int(s) for _, s in found)])
            out.append((newest, [_decode(m) or "" for m, _ in found]))
        return out

    async def generation(self) -> int:
        """Bumped whenever a trim removed entries."""
        try:
            return int(_decode(await self.client.get(GENERATION_KEY)) or 0)
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc

    async def entries(self, resource_type: str, ids: Sequence[str]) -> dict[str, Version]:
        """Versions of the given ids (absent ones left out), one pipeline."""
        return {
            rid: record.version
            for rid, record in (await self._records_of(resource_type, ids)).items()
        }

    async def count(self, resource_type: str) -> int:
        results = await self._fan_out(lambda p, t: p.hlen(t + "e"), resource_type)
        return int(sum(results))

    async def _records_of(self, resource_type: str, ids: Sequence[str]) -> dict[str, _Record]:
        if not ids:
            return {}
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for resource_id in ids:
                    pipe.hget(entries_key(resource_type, resource_id), resource_id)
                values = await pipe.execute()
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc
        return {
            rid: _parse_record(rid, raw)
            for rid, raw in zip(ids, values, strict=True)
            if raw is not None
        }

    async def _all_records(self, resource_type: str) -> dict[str, _Record]:
        """Every record of a type: the ids of each bucket, then bounded HMGETs (a bucket can
        hold hundreds of MB; one HGETALL would build that whole reply inside Redis)."""
        keys = await self._fan_out(lambda p, t: p.hkeys(t + "e"), resource_type)
        calls: list[tuple[str, list[bytes]]] = []
        for bucket, ids in enumerate(keys):
            for start in range(0, len(ids), READ_CHUNK):
                calls.append((tag(resource_type, bucket) + "e", ids[start : start + READ_CHUNK]))
        out: dict[str, _Record] = {}
        for start in range(0, len(calls), BUCKETS):
            batch = calls[start : start + BUCKETS]
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for key, ids in batch:
                        pipe.hmget(key, ids)
                    values = await pipe.execute()
            except RedisError as exc:
                raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc
            for (_, ids), raws in zip(batch, values, strict=True):
                for raw_id, raw in zip(ids, raws, strict=True):
                    if raw is not None:  # removed between the two reads
                        rid = _decode(raw_id) or ""
                        out[rid] = _parse_record(rid, raw)
        return out

    def _open(self, record: _Record) -> Stored:
        if record.version.state != "present":
            return Stored(record.version, None, record.payload.decode() or None, {})
        try:
            body, rows, last_updated = self.codec.unpack(record.codec, record.payload)
        except CorruptRecord as exc:
            raise CorruptRecord(f"{exc} (id {record.version.resource_id!r})") from exc
        return Stored(record.version, body, last_updated or None, rows)

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
            recorded = await self._reject(
                keys=[REJECTS_SEEN_KEY, REJECTS_KEY, REJECTS_COUNT_KEY],
                args=[seen_field, version, entry, REJECTS_SEEN_MAX, REJECTS_MAX],
            )
        except RedisError as exc:
            logger.warning(
                "could not record a reject of %s/%s: %s", resource_type, resource_id, exc
            )
            return False
        return bool(recorded)

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
        removed = await self._drop_entries(resource_type, list(await self.versions(resource_type)))
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for bucket in range(BUCKETS):
                    prefix = tag(resource_type, bucket)
                    pipe.delete(prefix + "e", prefix + "chg")
                pipe.srem(TYPES_KEY, resource_type)
                pipe.incr(GENERATION_KEY)  # incremental readers reload
                await pipe.execute()
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc
        return removed

    async def _drop_entries(self, resource_type: str, ids: Sequence[str], cutoff: str = "") -> int:
        """Run _DROP_LUA for each id (with `cutoff`, only those changed at or before it)."""
        removed = 0
        for start in range(0, len(ids), READ_CHUNK):
            calls: list[tuple[list[str], list[Any]]] = []
            for resource_id in ids[start : start + READ_CHUNK]:
                prefix = tag(resource_type, bucket_of(resource_id))
                calls.append(([prefix + "e", prefix + "chg"], [prefix, resource_id, cutoff]))
            try:
                results = await self._eval_many(self._drop, calls)
            except RedisError as exc:
                raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc
            removed += sum(1 for r in results if r)
        return removed

    async def expire_old(self, now_ms: float | None = None) -> int:
        """SPEED_MAX_AGE_HOURS: drop every entry whose change time (HAPI's lastUpdated, else
        its receipt) is older than the cap; a no-op without one. Run by the poller, which holds
        the lease, on each cycle. Returns how many entries went (the generation moves then)."""
        if not self.max_age_ms:
            return 0
        cutoff = (time.time() * 1000.0 if now_ms is None else now_ms) - self.max_age_ms
        removed = 0
        for resource_type in await self.known_types():
            while True:
                found = await self._fan_out(
                    lambda p, t: p.zrangebyscore(
                        t + "chg", "-inf", cutoff, start=0, num=READ_CHUNK
                    ),
                    resource_type,
                )
                ids = [_decode(m) or "" for result in found for m in result]
                if not ids:
                    break
                # Every id read leaves the change index (or was rewritten with a newer change
                # time), so the loop ends.
                removed += await self._drop_entries(resource_type, ids, _number(cutoff))
        if removed:
            try:
                await self.client.incr(GENERATION_KEY)
            except RedisError as exc:
                raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc
        return removed

    async def clear_old_layout(self) -> int:
        """Remove what the key schema before this one left (a hash per resource, `ver`,
        `rows:<view>`, `ix:<name>`, one `log` per bucket, and its epoch marker); a no-op when
        there is none. Its entries are not converted: the poller re-reads the changes since the
        batch watermark, as after any loss of Redis data, because this schema's epoch marker
        is missing until then. Stop receivers of the older release first: what they write
        afterwards would be unread. Returns how many old entries went.

        No SCAN: the old entries are the fields of each bucket's `ver` hash, and each named
        the view rows and index sets it had.
        """
        removed = 0
        try:
            types = [_decode(t) or "" for t in await self.client.smembers(TYPES_KEY)]
            for resource_type in types:
                for bucket in range(BUCKETS):
                    prefix = tag(resource_type, bucket)
                    ids = [_decode(i) or "" for i in await self.client.hkeys(prefix + "ver")]
                    named: set[str] = set()
                    for start in range(0, len(ids), READ_CHUNK):
                        calls = [
                            ([prefix + "e", prefix + "chg"], [prefix, resource_id])
                            for resource_id in ids[start : start + READ_CHUNK]
                        ]
                        for views, index in await self._eval_many(self._drop_old, calls):
                            named.update(f"rows:{v}" for v in _json_names(views))
                            named.update(f"ix:{n}" for n in _json_names(index))
                    removed += len(ids)
                    # This schema writes none of these keys: whole ones can go.
                    for name in [*sorted(named), "ver", "log"]:
                        await self.client.delete(prefix + name)
            await self.client.delete(OLD_EPOCH_KEY)
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis did not take the write: {exc}") from exc
        if removed:
            logger.warning("removed %d speed-layer entries of the previous key schema", removed)
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
        version_id = item.version_id or ""
        if "|" in version_id:  # the record's separator; FHIR's id syntax has no room for it
            raise InvalidRequest(f"meta.versionId {version_id!r} is not a FHIR id")
        last_updated = item.last_updated or ""
        if item.deleted:
            st, codec, payload = "d", RAW, last_updated.encode()
        else:
            rows = item.derived.rows if item.derived is not None else {}
            st, codec = "p", ZSTD_R4
            payload = self.codec.pack(item.body or b"", rows, last_updated)
        prefix = tag(item.resource_type, bucket_of(item.resource_id))
        args: list[Any] = [
            prefix,
            item.resource_id,
            _number(vn),
            _number(lum),
            version_id,
            st,
            codec,
            payload,
            _number(lum or now_ms),
        ]
        return [prefix + "e", prefix + "chg"], args


class CoalescedScript:
    """Calls of one Lua script made in the same turn of the event loop, sent to Redis in one
    pipeline: one socket write and one read for all of them instead of one each.

    Each call is still its own atomic EVALSHA with its own result or error (the pipeline is
    not a transaction). The calls go in the order they were made; the version-guarded write
    does not depend on it anyway (the newer version wins whatever the order). A call that
    finds the script not loaded (NOSCRIPT, after a Redis restart) is made again alone, which
    loads it. Measured: benchmarks/README.md (ingest, 2026-11-30).
    """

    def __init__(self, script: AsyncScript) -> None:
        self._script = script
        self._queue: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._queue_loop: asyncio.AbstractEventLoop | None = None
        self._sending: set[asyncio.Task[None]] = set()  # referenced until done

    async def call(self, keys: list[str], args: list[Any]) -> Any:
        """The script's result for these KEYS and ARGV; raises what the call raises
        (a RedisError when Redis cannot take it)."""
        loop = asyncio.get_running_loop()
        if self._queue and self._queue_loop is not loop:
            self._queue = []  # left by an event loop that stopped before it sent them
        answer: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, args, answer))
        if len(self._queue) == 1:
            self._queue_loop = loop
            # After the callbacks already due this turn: the other requests that arrived
            # with this one add their calls first.
            loop.call_soon(self._send_queued)
        return await answer

    def _send_queued(self) -> None:
        calls, self._queue = self._queue, []
        task = asyncio.ensure_future(self._send(calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._run(calls)
        except asyncio.CancelledError:
            for *_, answer in calls:
                answer.cancel()
            raise
        except Exception as exc:  # handed to every caller: none is lost
            for *_, answer in calls:
                if not answer.done():
                    answer.set_exception(exc)
            return
        for (_, _, answer), result in zip(calls, results, strict=True):
            if answer.done():
                continue  # its caller went away (the write may still have been made)
            if isinstance(result, BaseException):
                answer.set_exception(result)
            else:
                answer.set_result(result)

    async def _run(
        self, calls: list[tuple[list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        script = self._script
        if len(calls) == 1:
            keys, args, _ = calls[0]
            return [await script(keys=keys, args=args)]
        # Raw EVALSHA: redis-py's script objects in a pipeline ask SCRIPT EXISTS first, a
        # round trip per pipeline.
        async with script.registered_client.pipeline(transaction=False) as pipe:
            for keys, args, _ in calls:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            results: list[Any] = list(await pipe.execute(raise_on_error=False))
        for n, result in enumerate(results):
            if isinstance(result, NoScriptError):
                keys, args, _ = calls[n]
                try:
                    results[n] = await script(keys=keys, args=args)  # loads the script
                except RedisError as exc:
                    results[n] = exc
        return results


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
