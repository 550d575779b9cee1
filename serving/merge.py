"""The merged answer: the speed layer's part (from the mirror) applied to batch SQL in one snapshot.

Per query, members = patients meeting every parameter on the merged rows, where merged rows are
the batch rows not hidden by a winning speed entry plus the winning speed rows. Only what the
speed layer changes is shipped to PostgreSQL: patient ids it adds per parameter, and the ids of
hidden batch resources whose rows would have matched. PostgreSQL does the counting.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from core.errors import SpeedLayerUnavailable
from core.http import QuietLog
from core.store import SpeedStore
from serving.batch import WATERMARK_SQL
from serving.cohort import (
    PATIENTS_VIEW,
    CohortQuery,
    Criterion,
    criterion_sql,
    patient_sql,
    text_rows_sql,
    view_of,
)
from serving.mirror import BatchKey, Plan, SpeedMirror

logger = logging.getLogger(__name__)
# Every query finds Redis down alike: a line every 10 s says so, not one per query.
_QUIET = QuietLog()

BATCH_COUNT_CACHE_MAX = 4096
# The serving transaction's settings. The views are read hot from memory, so an index probe
# costs about as much as a sequential page (else the planner hashes 1,000,000 patients to
# look up 8,000 of them); JIT compiles for longer than these queries run; the distinct
# patient ids of a broad criterion (500,000) fit in memory instead of a sort on disk.
SERVING_SETTINGS = (
    "SET LOCAL random_page_cost = 1.1",
    "SET LOCAL jit = off",
    "SET LOCAL work_mem = '32MB'",
)
SNAPSHOT_SQL = "; ".join(
    [
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        # Before the snapshot is taken (LOCK takes none): a snapshot begun while a rebuild
        # swaps fresh view tables in waits for its commit and then sees it all; one begun
        # before makes the swap wait (serving.batch.LOCK_OUT_READERS). Never a snapshot
        # older than a swapped-in table, whose rows it could not see.
        "LOCK TABLE rf_batch.watermark IN ACCESS SHARE MODE",
        *SERVING_SETTINGS,
        # The snapshot's identity (its xmin), then the watermark row.
        WATERMARK_SQL.replace("SELECT ", "SELECT xmin::text, ", 1),
    ]
)


@dataclass
class SpeedView:
    """The speed layer as one request sees it (None fields when it was not consulted)."""

    mirror: SpeedMirror | None
    speed_as_of: str | None
    degraded: bool

    @property
    def consulted(self) -> bool:
        return self.mirror is not None


@dataclass
class CohortAnswer:
    total_count: int
    patient_ids: list[str]
    has_more: bool
    batch_count: int
    added_count: int
    removed_count: int
    sources: list[str]
    batch_as_of: str | None
    speed_as_of: str | None
    degraded: bool


async def read_speed(
    store: SpeedStore | None,
    mirror: SpeedMirror,
    use_speed_layer: bool,
    resource_types: Collection[str] | None = None,
) -> SpeedView:
    """Read the speed layer first: sync the mirror (of `resource_types`, default every type);
    degraded when Redis or its epoch is gone."""
    if not use_speed_layer or store is None:
        return SpeedView(None, None, False)
    try:
        async with mirror.lock:
            complete = await mirror.sync(store, resource_types)
            watermark = mirror.poller_watermark
        if not complete:
            if (held := _QUIET.admit("no epoch")) is not None:
                logger.warning(
                    "speed layer has no epoch marker: answering from the batch layer%s", held
                )
            return SpeedView(None, None, True)
        return SpeedView(mirror, watermark, False)
    except SpeedLayerUnavailable as exc:
        if (held := _QUIET.admit("unavailable")) is not None:
            logger.warning(
                "speed layer unavailable, answering from the batch layer: %s%s", exc, held
            )
        return SpeedView(None, None, True)


async def begin_snapshot(conn: psycopg.AsyncConnection[Any]) -> tuple[BatchKey, str | None]:
    """First statement of the transaction: one snapshot; the batch layer's identity in it."""
    # No parameters: every statement goes in one round trip (simple query protocol).
    cur = await conn.execute(SNAPSHOT_SQL)
    while cur.nextset():
        pass
    row = await cur.fetchone()
    if row is None:
        return (None,), None
    return tuple(row), row[1]


class _Params:
    """Named parameters of one statement, so fragments may be built in any order."""

    def __init__(self) -> None:
        self.named: dict[str, Any] = {}

    def value(self, value: Any) -> str:
        name = f"p{len(self.named)}"
        self.named[name] = value
        return f"%({name})s"

    def array(self, values: Sequence[str]) -> str:
        # A Const once bound: `= ANY` / `<> ALL` over it is a hash lookup (PostgreSQL >= 14/15).
        return self.value(list(values)) + "::text[]"

    def fragment(self, build: Callable[[list[Any]], str]) -> str:
        """A fragment from serving.cohort (positional `%s`), renamed to named parameters."""
        values: list[Any] = []
        pieces = build(values).split("%s")
        assert len(pieces) == len(values) + 1
        out = [pieces[0]]
        for value, piece in zip(values, pieces[1:], strict=True):
            out.append(self.value(value) + piece)
        return "".join(out)

    def patient(self, query: CohortQuery) -> str:
        return self.fragment(lambda params: patient_sql(query, params))

    def criterion(self, criterion: Criterion) -> str:
        return self.fragment(lambda params: criterion_sql(criterion, params))


def _criterion_part(
    criterion: Criterion,
    speed_ids: Sequence[str],
    hidden: Sequence[str],
    params: _Params,
    distinct: bool,
) -> str:
    """Patient ids with a merged row meeting one parameter (`distinct`: each once)."""
    select = "SELECT DISTINCT" if distinct and not speed_ids else "SELECT"
    if criterion.kind == "condition-text":
        # The text index: the matching texts first, then their patients (index-only).
        part = f"{select} text_row.patient_id " + params.fragment(
            lambda values: text_rows_sql(criterion, values)
        )
        if hidden:
            part += f" AND text_row.resource_id <> ALL({params.array(hidden)})"
    else:
        where = params.criterion(criterion) + " AND patient_id IS NOT NULL"
        if hidden:
            where += f" AND id <> ALL({params.array(hidden)})"
        part = f"{select} patient_id FROM {view_of(criterion)} WHERE {where}"
    if speed_ids:
        return f"{part} UNION SELECT unnest({params.array(speed_ids)})"
    return part


def members_cte(
    query: CohortQuery, plan: Plan | None, params: _Params, name: str = "merged_members"
) -> str:
    """CTE `name`(id, member, absent): candidate patients, whether each is a member (by the
    merged rows, or by the batch rows alone without a `plan`), and whether the batch layer has
    no such patient at all (with parameters on Conditions/Observations; then only the speed
    layer can make it a member).

    The parameters on Conditions/Observations are met first (INTERSECT of their patient ids,
    the selective side, by their indexes), then joined to patient_demographics on its unique
    id: the existence check and the patient parameters apply to that small set only.

    Without Condition/Observation parameters the plan's `speed_patients` are not in it: they
    are no batch member left in it (see `serving.mirror.Plan`), so `cohort` counts and pages
    them itself instead of shipping them to PostgreSQL.
    """
    hidden_p = plan.hidden_patients if plan else []
    speed_p = plan.speed_patients if plan else []
    patient_where = params.patient(query)
    if not query.criteria:
        text = (
            f"SELECT id, TRUE AS member, FALSE AS absent FROM {PATIENTS_VIEW} WHERE {patient_where}"
        )
        if hidden_p:
            text += f" AND id <> ALL({params.array(hidden_p)})"
        return f"{name} AS MATERIALIZED ({text})"
    parts = []
    for n, criterion in enumerate(query.criteria):
        speed_ids, hidden = plan.criteria[n] if plan else ([], [])
        parts.append(
            _criterion_part(criterion, speed_ids, hidden, params, len(query.criteria) == 1)
        )
    candidates = " INTERSECT ".join(f"({p})" for p in parts)
    member = f"patient.id IS NOT NULL AND COALESCE({patient_where}, FALSE)"
    if hidden_p:
        member = f"({member} AND candidate.id <> ALL({params.array(hidden_p)}))"
    if speed_p:
        member = f"({member} OR candidate.id = ANY({params.array(speed_p)}))"
    candidates_name = name.replace("members", "candidates")
    return (
        f"{candidates_name}(id) AS ({candidates}), {name} AS MATERIALIZED ("
        f"SELECT candidate.id, {member} AS member, patient.id IS NULL AS absent"
        f" FROM {candidates_name} AS candidate"
        f" LEFT JOIN {PATIENTS_VIEW} AS patient ON patient.id = candidate.id)"
    )


def _removed_sql(query: CohortQuery, plan: Plan, params: _Params) -> str:
    """Count of removal candidates that are batch members but not merged members.

    Checked by index probes per candidate (a few), never against the member set.
    """
    batch = [
        f"EXISTS (SELECT 1 FROM {PATIENTS_VIEW} AS patient WHERE patient.id = removal.id"
        f" AND {params.patient(query)})"
    ]
    lost = []
    if plan.hidden_patients:
        lost.append(f"removal.id = ANY({params.array(plan.hidden_patients)})")
    for n, criterion in enumerate(query.criteria):
        view = view_of(criterion)
        batch.append(
            f"EXISTS (SELECT 1 FROM {view} AS view_row WHERE view_row.patient_id = removal.id"
            f" AND {params.criterion(criterion)})"
        )
        speed_ids, hidden = plan.criteria[n]
        if not hidden:
            continue  # every batch row still counts: a batch member keeps meeting it
        keeps = (
            f"EXISTS (SELECT 1 FROM {view} AS view_row WHERE view_row.patient_id = removal.id"
            f" AND {params.criterion(criterion)}"
            f" AND view_row.id <> ALL({params.array(hidden)}))"
        )
        if speed_ids:
            keeps += f" OR removal.id = ANY({params.array(speed_ids)})"
        lost.append(f"NOT ({keeps})")
    if not lost:
        return "0"
    return (
        f"(SELECT count(*) FROM unnest({params.array(plan.removal_candidates)}) AS removal(id)"
        f" WHERE {' AND '.join(batch)} AND ({' OR '.join(lost)}))"
    )


class BatchCounts:
    """Batch-only counts per (batch snapshot, query): the batch layer changes only at refresh."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], int] = {}

    def get(self, key: BatchKey, query: CohortQuery) -> int | None:
        return self._cache.get((key, query.signature()))

    def put(self, key: BatchKey, query: CohortQuery, value: int) -> None:
        if len(self._cache) >= BATCH_COUNT_CACHE_MAX:
            self._cache.clear()
        self._cache[(key, query.signature())] = value


async def cohort(
    conn: psycopg.AsyncConnection[Any],
    query: CohortQuery,
    speed: SpeedView,
    batch_counts: BatchCounts,
) -> CohortAnswer:
    """The merged cohort answer; call inside a transaction on `conn` (one snapshot).

    One statement gives the merged count, the page, the ids without a batch patient (checked
    against the speed layer here), the removed count and, unless cached, the batch-only count.
    """
    key, batch_as_of = await begin_snapshot(conn)
    plan: Plan | None = None
    mirror = speed.mirror
    if mirror is not None:
        async with mirror.lock:
            await mirror.sync_batch(conn, key, query.resource_types)
            plan = mirror.plan(query)
        if plan.touches_nothing:
            plan = None  # the batch SQL alone, and batch_count = total
    params = _Params()
    ctes = [members_cte(query, plan, params)]
    page = query.count if query.ids else 0
    fresh = plan is not None and bool(plan.fresh)
    # The count and the ids without a batch patient in one pass over merged_members.
    absent = "coalesce(array_agg(id) FILTER (WHERE absent), '{}')" if fresh else "'{}'::text[]"
    columns = [
        "totals.n",
        "(SELECT coalesce(array_agg(id ORDER BY id COLLATE \"C\"), '{}') FROM"
        " (SELECT id FROM merged_members WHERE member"
        f" AND ({params.value(query.after)}::text IS NULL"
        f' OR id COLLATE "C" > {params.value(query.after)}) ORDER BY id COLLATE "C"'
        f" LIMIT {params.value(page + 1)}) AS page)",
    ]
    columns.append("totals.absent")
    columns.append(_removed_sql(query, plan, params) if plan and plan.removal_candidates else "0")
    batch_count = batch_counts.get(key, query) if plan is not None else None
    if plan is not None and batch_count is None:
        ctes.append(members_cte(query, None, params, "batch_members"))
        columns.append("(SELECT count(*) FROM batch_members WHERE member)")
    text = (
        f"WITH {', '.join(ctes)} SELECT {', '.join(columns)} FROM (SELECT"
        f" count(*) FILTER (WHERE member) AS n, {absent} AS absent FROM merged_members) AS totals"
    )
    # Never prepared: a generic plan would treat the arrays as unknown parameters (no hashed
    # `= ANY`, no row estimates from their length).
    cur = await conn.execute(text.encode(), params.named, prepare=False)
    row = await cur.fetchone()
    assert row is not None
    total, ids, removed = int(row[0]), list(row[1]), int(row[3])
    # Members only the speed layer makes, in no batch row of the statement: without
    # Condition/Observation parameters the plan's speed patients (sorted), else those of the
    # ids without a batch patient that the speed layer holds and that meet the parameters.
    extra: list[str] = []
    if plan is not None and mirror is not None:
        if not query.criteria:
            extra = plan.speed_patients
        elif row[2]:
            extra = sorted(mirror.fresh_members(query, plan, row[2]))
    if extra:
        total += len(extra)
        start = 0 if query.after is None else bisect.bisect_right(extra, query.after)
        # Two sorted runs: the sort merges them in one pass (faster than heapq.merge).
        ids = sorted(ids + extra[start : start + page + 1])[: page + 1]
    has_more = len(ids) > page
    ids = ids[:page]
    if plan is None:
        batch_count, removed = total, 0
    elif batch_count is None:
        batch_count = int(row[4])
        batch_counts.put(key, query, batch_count)
    return CohortAnswer(
        total_count=total,
        patient_ids=ids,
        has_more=has_more,
        batch_count=batch_count,
        added_count=total - batch_count + removed,
        removed_count=removed,
        sources=["batch_layer", "speed_layer"] if speed.consulted else ["batch_layer"],
        batch_as_of=batch_as_of,
        speed_as_of=speed.speed_as_of,
        degraded=speed.degraded,
    )
