"""The query API's in-memory mirror of the speed layer, kept current incrementally.

Per resource type it holds every speed entry's version and decoded view rows, the batch
layer's version of the same ids (looked up once per batch snapshot), and two row indexes:
`winning_index` (rows of the entries that win over the batch layer) and `hidden_index` (the
batch rows those entries hide). A query then costs a few set operations, never a SCAN of Redis,
and a query asked again before anything it could see changed costs a dictionary lookup (the
plans are kept per `SpeedMirror.state`).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from core.errors import SpeedLayerUnavailable
from core.fhir_values import date_range, fold, loads, range_may_match
from core.store import (
    BUCKETS,
    EPOCH_KEY,
    GENERATION_KEY,
    POLLER_WATERMARK_KEY,
    SpeedStore,
    is_newer,
    tag,
)
from serving.cohort import (
    COHORT_VIEWS,
    CohortQuery,
    Criterion,
    DateCriterion,
    criterion_matches,
    is_counted,
    patient_matches,
)
from serving.derive import compiled_views
from serving.engines.python import CompiledView
from serving.viewdef import ViewDefinition

Rows = list[dict[str, Any]]
BatchKey = tuple[Any, ...]
# Between indexed texts in RowIndex's search string: a character FHIR strings do not hold
# (R4 "string": no control characters but whitespace), so an occurrence of a needle almost
# never spans two texts; when one does, the text itself is checked.
TEXT_SEPARATOR = "\x00"
# Plans kept per mirror state (SpeedMirror.plan): distinct queries asked between two changes.
# A plan holds lists of speed ids (up to the speed layer's size each), hence few.
PLAN_CACHE_MAX = 64


def index_entries(resource_type: str, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The keys `RowIndex` finds rows by, for the columns cohort queries filter on.

    Patient: `gender:<g>`, `birthmonth:<yyyy-mm>` for a date to the month or day, else
    `birthyear:<yyyy>` (a birthdate range fans out over the years and months it may cover; the
    exact bounds are checked on the rows). Condition/Observation: `subject:<id>` and, only for
    rows that count, `code:<code>` and `code:<system>|<code>`.
    """
    names: dict[str, None] = {}
    for row in rows:
        if resource_type == "Patient":
            if row.get("gender"):
                names[f"gender:{row['gender']}"] = None
            birth = row.get("birth_date")
            if isinstance(birth, str) and len(birth) >= 7 and date_range(birth) is not None:
                names[f"birthmonth:{birth[:7]}"] = None
            elif isinstance(birth, str) and len(birth) >= 4:
                names[f"birthyear:{birth[:4]}"] = None
            continue
        if row.get("patient_id"):
            names[f"subject:{row['patient_id']}"] = None
        if not is_counted(resource_type, row):
            continue
        code = row.get("code")
        if code:
            names[f"code:{code}"] = None
            names[f"code:{row.get('code_system') or ''}|{code}"] = None
    return tuple(names)


@dataclass
class Held:
    """One version (speed or batch) of a resource with its rows per view."""

    version_number: float
    last_updated_ms: float
    deleted: bool
    rows: dict[str, Rows]


class RowIndex:
    """Rows of one view by resource id, indexed by the keys cohort parameters look up."""

    def __init__(self, resource_type: str) -> None:
        self.resource_type = resource_type
        self.rows: dict[str, Rows] = {}
        self.keys: dict[str, set[str]] = {}
        # folded code text or display (core.fhir_values.fold) -> {resource id: patients of
        # its counting rows carrying that text}: condition-text is met without a per-row check.
        self.texts: dict[str, dict[str, frozenset[str]]] = {}
        self.text_patients: dict[str, dict[str, int]] = {}  # text -> patient -> resources
        self._of: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        # The keys of `texts` joined by TEXT_SEPARATOR, with each one's offset, so a substring
        # is looked for by one str.find over all of them (C speed) instead of a Python test
        # per text; rebuilt on the first search after the set of texts changed (None).
        self._text_list: list[str] | None = None
        self._text_blob = ""
        self._text_starts: list[int] = []

    def add(self, rid: str, rows: Rows) -> None:
        self.remove(rid)
        self.rows[rid] = rows
        keys = index_entries(self.resource_type, rows)
        texts: dict[str, set[str]] = {}
        for row in rows:
            if is_counted(self.resource_type, row):
                for col in ("code_text", "code_display"):
                    if isinstance(row.get(col), str):
                        owners = texts.setdefault(fold(row[col]), set())
                        if row.get("patient_id"):
                            owners.add(row["patient_id"])
        for key in keys:
            self.keys.setdefault(key, set()).add(rid)
        for text, owners in texts.items():
            if text not in self.texts:
                self._text_list = None
            self.texts.setdefault(text, {})[rid] = frozenset(owners)
            counted = self.text_patients.setdefault(text, {})
            for pid in owners:
                counted[pid] = counted.get(pid, 0) + 1
        self._of[rid] = (keys, tuple(texts))

    def remove(self, rid: str) -> None:
        if self.rows.pop(rid, None) is None:
            return
        keys, texts = self._of.pop(rid)
        for key in keys:
            ids = self.keys.get(key)
            if ids is not None:
                ids.discard(rid)
                if not ids:
                    del self.keys[key]
        for text in texts:
            by_rid = self.texts.get(text)
            if by_rid is None:
                continue
            counted = self.text_patients[text]
            for pid in by_rid.pop(rid, ()):
                if counted[pid] == 1:
                    del counted[pid]
                else:
                    counted[pid] -= 1
            if not by_rid:
                del self.texts[text]
                del self.text_patients[text]
                self._text_list = None

    def matching_texts(self, needles: Iterable[str]) -> list[str]:
        """The indexed (folded) texts containing at least one of `needles` (Python's `in`)."""
        if self._text_list is None:
            self._text_list = list(self.texts)
            self._text_starts = []
            at = 0
            for text in self._text_list:
                self._text_starts.append(at)
                at += len(text) + len(TEXT_SEPARATOR)
            self._text_blob = TEXT_SEPARATOR.join(self._text_list)
        texts, starts, blob = self._text_list, self._text_starts, self._text_blob
        found: set[int] = set()
        for needle in needles:
            if not needle:
                return list(texts)  # "" is in every text
            at = blob.find(needle)
            while at >= 0:
                n = bisect_right(starts, at) - 1
                # An occurrence may span a separator only when the needle holds one: the text
                # itself decides. Every occurrence inside a text is one in the blob, so none
                # is missed; after a hit the search goes on at the next text.
                if needle in texts[n]:
                    found.add(n)
                    at = blob.find(needle, starts[n] + len(texts[n]) + len(TEXT_SEPARATOR))
                else:
                    at = blob.find(needle, at + 1)
        return [texts[n] for n in sorted(found)]

    def text_patients_of(self, criterion: Criterion) -> set[str]:
        """The patients of counting rows meeting a condition-text parameter."""
        out: set[str] = set()
        for text in self.matching_texts(criterion.texts):
            out.update(self.text_patients[text])
        return out

    def text_owners(self, criterion: Criterion) -> dict[str, set[str]]:
        """Per resource, the patients of its counting rows meeting a condition-text parameter
        (exactly `criterion_matches`: a row counts and a text or display contains a needle)."""
        out: dict[str, set[str]] = {}
        for text in self.matching_texts(criterion.texts):
            for rid, owners in self.texts[text].items():
                if rid in out:
                    out[rid] |= owners
                else:
                    out[rid] = set(owners)
        return out

    def _union(self, keys: Iterable[str]) -> set[str]:
        out: set[str] = set()
        for key in keys:
            out |= self.keys.get(key, set())
        return out

    def patient_candidates(self, query: CohortQuery) -> Iterable[str]:
        """A superset of the patients meeting the gender/birthdate parameters."""
        if query.genders:
            sets = [self._union(f"gender:{g}" for g in alts) for alts in query.genders]
            return set.intersection(*sets)
        if query.birthdates:
            years: dict[str, bool] = {}

            def year_may_match(year: str) -> bool:
                if year not in years:
                    years[year] = _may_match(year, query.birthdates)
                return years[year]

            keep = [
                k
                for k in self.keys
                if (k.startswith("birthyear:") and year_may_match(k[10:]))
                or (
                    k.startswith("birthmonth:")
                    and year_may_match(k[11:15])
                    and _may_match(k[11:], query.birthdates)
                )
            ]
            return self._union(keep)
        return self.rows.keys()

    def criterion_candidates(self, criterion: Criterion) -> set[str]:
        """A superset of the resources meeting one Condition/Observation parameter."""
        if criterion.kind == "condition-text":
            return set(self.text_owners(criterion))
        keys = [
            f"code:{c.code}" if c.system is None else f"code:{c.system}|{c.code}"
            for c in criterion.codes
        ]
        return self._union(keys)


def _may_match(period: str, birthdates: Sequence[Sequence[DateCriterion]]) -> bool:
    """Whether a birth date in `period` (YYYY, or YYYY-MM) could meet every birthdate
    parameter. A month's range is taken as days 01 to 31: as text it holds every day written
    in that month, whether the calendar has it or not."""
    span = (
        (period + "-01-01", period + "-12-31")
        if len(period) == 4
        else (period + "-01", period + "-31")
    )
    return all(
        any(range_may_match(d.target(span), (d.low, d.high), d.prefix) for d in dates)
        for dates in birthdates
    )


@dataclass
class Plan:
    """What the speed layer changes for one query (see serving.merge).

    `speed_patients` (sorted) are the patients meeting the patient parameters only in the speed
    layer: the batch layer has no row of theirs that meets them.
    With Condition/Observation parameters it holds only those with a batch row (their batch row
    did not meet them); patients the batch layer does not hold at all are in `fresh`, checked
    against the few ids the SQL finds without a batch row (so 100,000 new patients are never
    shipped to PostgreSQL for a condition query).
    """

    speed_patients: list[str]
    hidden_patients: list[str]  # batch patients whose winning speed version no longer meets them
    criteria: list[tuple[list[str], list[str]]]  # per parameter: (speed patient ids, hidden ids)
    removal_candidates: list[str]  # batch members the speed layer may take away
    fresh: Mapping[str, Rows] = field(default_factory=dict)  # speed-only patients: their rows

    @property
    def touches_nothing(self) -> bool:
        """The speed layer changes nothing this query looks at (the batch SQL alone answers)."""
        return not (
            self.speed_patients
            or self.hidden_patients
            or self.removal_candidates
            or self.fresh
            or any(s or h for s, h in self.criteria)
        )


@dataclass
class TypeMirror:
    """The mirror of one resource type."""

    resource_type: str
    views: list[tuple[str, CompiledView]]
    main: str | None
    entries: dict[str, Held] = field(default_factory=dict)
    batch: dict[str, Held | None] = field(default_factory=dict)
    unchecked: set[str] = field(default_factory=set)
    overriding: set[str] = field(default_factory=set)  # winning speed entries with a batch row
    winning: set[str] = field(default_factory=set)
    seqs: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    counters: list[int] = field(default_factory=lambda: [-1] * BUCKETS)  # `seq` at last read
    marker: tuple[str, int] | None = None  # the epoch and trim generation at last read
    # Rows of winning present entries without a present batch row. Copy-on-write: a Plan keeps
    # the dict it was given while later syncs change a copy.
    fresh: dict[str, Rows] = field(default_factory=dict)
    fresh_shared: bool = False
    # Counts the calls of `_status`, the one place the indexes, `winning`, `overriding` and
    # `fresh` (all a plan reads) change: part of SpeedMirror.state.
    changes: int = 0

    def __post_init__(self) -> None:
        self.winning_index = RowIndex(self.resource_type)
        self.hidden_index = RowIndex(self.resource_type)

    def rows_of(self, data: Mapping[str, Any]) -> dict[str, Rows]:
        return {name: view.rows(data) for name, view in self.views}

    def set_entry(self, rid: str, held: Held | None) -> None:
        if held is None:
            self.entries.pop(rid, None)
        else:
            self.entries[rid] = held
            if rid not in self.batch:
                self.unchecked.add(rid)
        self._status(rid)

    def set_batch(self, rid: str, held: Held | None) -> None:
        self.batch[rid] = held
        self.unchecked.discard(rid)
        self._status(rid)

    def share_fresh(self) -> Mapping[str, Rows]:
        self.fresh_shared = True
        return self.fresh

    def _set_fresh(self, rid: str, rows: Rows | None) -> None:
        if rows is None and rid not in self.fresh:
            return
        if self.fresh_shared:
            self.fresh = dict(self.fresh)
            self.fresh_shared = False
        if rows is None:
            del self.fresh[rid]
        else:
            self.fresh[rid] = rows

    def _status(self, rid: str) -> None:
        self.changes += 1
        self.winning_index.remove(rid)
        self.hidden_index.remove(rid)
        self.winning.discard(rid)
        self.overriding.discard(rid)
        fresh: Rows | None = None
        try:
            held = self.entries.get(rid)
            if held is None or rid in self.unchecked:
                return
            old = self.batch.get(rid)
            if old is not None and not is_newer(
                held.version_number, held.last_updated_ms, old.version_number, old.last_updated_ms
            ):
                return  # the batch layer holds this version or a newer one
            self.winning.add(rid)
            if not held.deleted and self.main:
                self.winning_index.add(rid, held.rows.get(self.main, []))
            if old is not None and not old.deleted:
                self.overriding.add(rid)
                if self.main:
                    self.hidden_index.add(rid, old.rows.get(self.main, []))
            elif not held.deleted and self.main:
                fresh = held.rows.get(self.main, [])
        finally:
            self._set_fresh(rid, fresh)

    def winning_rows(self, view: str) -> dict[str, Rows]:
        """Rows of `view` for every present speed entry that wins."""
        return {
            rid: self.entries[rid].rows.get(view, [])
            for rid in self.winning
            if not self.entries[rid].deleted
        }


class SpeedMirror:
    """Every shipped view's type, mirrored; `sync` then `sync_batch` before `plan`."""

    def __init__(self, views: Mapping[str, ViewDefinition] | None = None) -> None:
        by_type = compiled_views(views)
        self.types = {
            t: TypeMirror(t, v, COHORT_VIEWS.get(t) if COHORT_VIEWS.get(t) in dict(v) else None)
            for t, v in by_type.items()
        }
        self.lock = asyncio.Lock()
        self.marker: tuple[str, int] | None = None
        self.batch_key: BatchKey | None = None
        self.poller_watermark: str | None = None
        self._plans: dict[tuple[Any, ...], Plan] = {}
        self._plans_state: tuple[Any, ...] | None = None
        self._sync_keys: dict[tuple[str, ...], list[str]] = {}

    @property
    def state(self) -> tuple[Any, ...]:
        """Changes whenever a plan could: a speed entry or a batch version taken in (every
        such change passes TypeMirror._status), a new epoch or trim generation, a new batch
        snapshot."""
        return (
            self.marker,
            self.batch_key,
            tuple(type_mirror.changes for type_mirror in self.types.values()),
        )

    async def sync(self, store: SpeedStore, resource_types: Collection[str] | None = None) -> bool:
        """Bring the mirror of `resource_types` (default: every mirrored type) up to date;
        False when the epoch marker is missing (incomplete).

        One MGET of the epoch, the trim generation, the poller's watermark and every bucket's
        write counter of those types tells what changed; only types with new writes read their
        logs. A type left out keeps what it read last, and is read whole when next synced if the
        epoch or trim generation changed meanwhile. Raises SpeedLayerUnavailable when Redis
        cannot be read.
        """
        names = tuple(t for t in self.types if resource_types is None or t in resource_types)
        keys = self._sync_keys.get(names)
        if keys is None:
            keys = self._sync_keys[names] = [EPOCH_KEY, GENERATION_KEY, POLLER_WATERMARK_KEY] + [
                tag(t, b) + "seq" for t in names for b in range(BUCKETS)
            ]
        try:
            if isinstance(store.client, RedisCluster):
                values = await store.client.mget_nonatomic(keys)
            else:
                values = await store.client.mget(keys)
        except RedisError as exc:
            raise SpeedLayerUnavailable(f"Redis cannot be read: {exc}") from exc
        if values[0] is None:
            return False
        watermark = values[2]
        self.poller_watermark = watermark.decode() if isinstance(watermark, bytes) else watermark
        epoch = values[0]
        marker = (epoch.decode() if isinstance(epoch, bytes) else str(epoch), int(values[1] or 0))
        for n, t in enumerate(names):
            type_mirror = self.types[t]
            counters = [int(v or 0) for v in values[3 + n * BUCKETS : 3 + (n + 1) * BUCKETS]]
            full = marker != type_mirror.marker
            if full or counters != type_mirror.counters:
                # A write counter that went back means Redis lost writes without losing its
                # epoch marker (a restart from an older snapshot): what the mirror read past
                # that point may be gone, so this type is read again whole.
                went_back = any(c < o for c, o in zip(counters, type_mirror.counters, strict=True))
                await self._sync_type(store, type_mirror, full or went_back)
                type_mirror.counters = counters
                type_mirror.marker = marker
        self.marker = marker
        return True

    async def _sync_type(self, store: SpeedStore, type_mirror: TypeMirror, full: bool) -> None:
        t = type_mirror.resource_type
        log = await store.log_since(t, [0] * BUCKETS if full else type_mirror.seqs)
        seqs = [newest for newest, _ in log]
        if full:
            records = await store.records(t)
            for rid in list(type_mirror.entries):
                if rid not in records:
                    type_mirror.set_entry(rid, None)
            ids = list(records)
        else:
            ids = list(dict.fromkeys(i for _, batch in log for i in batch))
            records = await store.records_for(t, ids)
        for rid in ids:
            stored = records.get(rid)
            if stored is None:
                type_mirror.set_entry(rid, None)
                continue
            version = stored.version
            deleted = version.state == "deleted"
            decoded: dict[str, Rows] = {}
            missing = False
            for name, _ in type_mirror.views:
                raw = stored.rows.get(name)
                if raw is None:
                    missing = True
                else:
                    decoded[name] = loads(raw)
            if missing and not deleted:
                # Written without derived rows (a receiver run without the deriver).
                decoded = type_mirror.rows_of(loads(stored.body) if stored.body else {})
            held = Held(version.version_number, version.last_updated_ms, deleted, decoded)
            type_mirror.set_entry(rid, held)
        type_mirror.seqs = seqs

    async def sync_batch(
        self, conn: Any, key: BatchKey, resource_types: Collection[str] | None = None
    ) -> None:
        """Look up the batch versions of the speed ids of `resource_types` (default: every
        mirrored type), inside the query's snapshot. A new snapshot marks every type's ids
        unchecked; a type left out is looked up when a query next asks for it."""
        if key != self.batch_key:
            for type_mirror in self.types.values():
                type_mirror.batch.clear()
                type_mirror.unchecked = set(type_mirror.entries)
                for rid in list(type_mirror.winning):
                    type_mirror._status(rid)
                # Emptied by discards, these sets keep their tables: compact copies iterate in
                # time of what they hold.
                type_mirror.winning = set(type_mirror.winning)
                type_mirror.overriding = set(type_mirror.overriding)
            self.batch_key = key
        for type_mirror in self.types.values():
            if not type_mirror.unchecked:
                continue  # the usual case: asked in O(1), never iterated
            if resource_types is not None and type_mirror.resource_type not in resource_types:
                continue
            pending = list(type_mirror.unchecked)
            for start in range(0, len(pending), 20000):
                chunk = pending[start : start + 20000]
                cur = await conn.execute(
                    "SELECT id, version_number, last_updated_ms, deleted, resource"
                    " FROM rf_batch.resources WHERE resource_type = %s AND id = ANY(%s)",
                    (type_mirror.resource_type, chunk),
                )
                found = set()
                for rid, vn, lum, deleted, resource in await cur.fetchall():
                    found.add(rid)
                    rows = {} if deleted or resource is None else type_mirror.rows_of(resource)
                    type_mirror.set_batch(rid, Held(float(vn), float(lum), bool(deleted), rows))
                for rid in chunk:
                    if rid not in found:
                        type_mirror.set_batch(rid, None)
            if not type_mirror.unchecked:
                # A set keeps its table when emptied by discards: iterating it would cost as
                # much as when it held every speed id.
                type_mirror.unchecked = set()

    def plan(self, query: CohortQuery) -> Plan:
        """The speed layer's part of one cohort query (call under `lock`, after syncing).

        The same object for queries with the same signature until `state` changes: a Plan is
        never changed once made (its `fresh` is copy-on-write, TypeMirror.share_fresh).
        """
        state = self.state
        if state != self._plans_state:
            self._plans.clear()
            self._plans_state = state
        key = query.signature()
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= PLAN_CACHE_MAX:
                self._plans.clear()
            plan = self._plans[key] = self._plan(query)
        return plan

    def _plan(self, query: CohortQuery) -> Plan:
        patients = self.types["Patient"]

        def speed_meets(rid: str) -> bool:
            return any(patient_matches(query, r) for r in patients.winning_index.rows.get(rid, []))

        batch_match = {
            rid
            for rid in patients.hidden_index.patient_candidates(query)
            if any(patient_matches(query, r) for r in patients.hidden_index.rows.get(rid, []))
        }
        # Patients with a batch row whose winning speed version meets the patient parameters.
        known = {rid for rid in patients.overriding if rid in patients.winning_index.rows}
        known_match = {rid for rid in known if speed_meets(rid)}
        hidden = batch_match - known_match
        fresh: Mapping[str, Rows] = {}
        if query.criteria:
            speed_patients = known_match - batch_match
            fresh = patients.share_fresh()
        else:  # no Condition/Observation parameter to narrow them down: ship them all
            new = {
                rid
                for rid in patients.winning_index.patient_candidates(query)
                if rid not in patients.overriding and speed_meets(rid)
            }
            speed_patients = (known_match - batch_match) | new
        removal = set(hidden)
        criteria: list[tuple[list[str], list[str]]] = []
        for criterion in query.criteria:
            type_mirror = self.types[criterion.resource_type]
            speed_ids: set[str] = set()
            if criterion.kind == "condition-text":
                speed_ids = type_mirror.winning_index.text_patients_of(criterion)
                over = type_mirror.hidden_index.text_owners(criterion)
            else:
                for rid in type_mirror.winning_index.criterion_candidates(criterion):
                    for row in type_mirror.winning_index.rows.get(rid, []):
                        if row.get("patient_id") and criterion_matches(criterion, row):
                            speed_ids.add(row["patient_id"])
                over = {
                    rid: {
                        r["patient_id"]
                        for r in type_mirror.hidden_index.rows.get(rid, [])
                        if r.get("patient_id") and criterion_matches(criterion, r)
                    }
                    for rid in type_mirror.hidden_index.criterion_candidates(criterion)
                }
            hidden_ids: list[str] = []
            for rid, owners in over.items():
                if owners - speed_ids:
                    hidden_ids.append(rid)
                    removal |= owners - speed_ids
            criteria.append((list(speed_ids), hidden_ids))
        return Plan(sorted(speed_patients), list(hidden), criteria, list(removal), fresh)

    def fresh_members(self, query: CohortQuery, plan: Plan, ids: Iterable[str]) -> list[str]:
        """Of `ids` (patients the batch layer does not hold), those the speed layer holds and
        that meet the patient parameters, by the plan's own view of the speed layer."""
        return [
            rid for rid in ids if any(patient_matches(query, r) for r in plan.fresh.get(rid, ()))
        ]
