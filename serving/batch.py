"""The batch layer in PostgreSQL: its schema, `batch init`, and what readers ask of it.

Schema (kept exactly; the query API reads it):

    rf_batch.resources  (resource_type, id) -> the newest version synced from HAPI; a deletion
                        stays as a row with deleted = true and resource null
    rf_batch.watermark  one row: HAPI's clock up to which the views are complete
    rf_batch.views      what each view's table was built from (definition and SQL), the SQL
                        that recomputes its rows (all, or the changed resources'), its row count
    sqlonfhir.<name>    one table per ViewDefinition, kept up to date incrementally

Every row of `sqlonfhir.<name>` traces back to one resource: its first column, `_resource_id`
(a ViewDefinition's column names never start with `_`), is the id of the resource of the
view's type it came from. A refresh therefore replaces the rows of the resources that changed
(`replace_changed_sql`: delete theirs, insert their new ones computed by the view's SQL over those
resources alone) and leaves every other row as it is; `rebuild_view` recomputes a whole view
into a fresh table (`FreshTable`: filled, then indexed) swapped in under the view's name just
before the commit. Both run inside the caller's transaction, so readers (MVCC) see all of it
or none of it; they wait only for a swap (its lock, `LOCK_OUT_READERS`, to its commit), never
for the recompute. Each table has an index on `_resource_id`, on the columns the query API
filters on, on the low day of the dates birthdate searches (`serving.cohort.DATE_RANGES`)
and a trigram index (PostgreSQL's pg_trgm extension) on the folded text condition-text
searches (`serving.cohort.SEARCHED_TEXT`).

Condition-text reads a text index beside the Condition view (`TextIndex`): the DISTINCT folded
texts (`rf_batch.condition_texts`, with the trigram index: far fewer than the rows, since real
texts repeat) and one row per (text, patient, resource) of the view's counting rows
(`rf_batch.condition_text_rows`, a btree on those three columns): a search matches the few
texts, then counts patients by an index-only scan, instead of fetching every matching view row
across the table. It changes with the view, in the same transaction: a whole rebuild builds
it fresh from the view's fresh table and swaps it in with it (`FreshTable`,
`text_index_build_sql`), a refresh replaces the changed resources' rows (`text_index_sql`).

The sync from HAPI is `serving.batch_refresh`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from core.errors import (
    BatchLayerUnavailable,
    ResearchFlowError,
    StartupError,
    postgres_failure,
)
from core.fhir_values import case_map_sql, date_range_sql, dumps, loads
from core.settings import STARTUP_TIMEOUT_SECONDS, Settings
from serving.cohort import (
    DATE_RANGES,
    SEARCHED_TEXT,
    TEXT_INDEX,
    counted_sql,
    date_range_columns,
    folded_column,
)
from serving.engines.postgres import compile_view
from serving.viewdef import ViewDefinition, shipped_views

logger = logging.getLogger(__name__)

VIEW_SCHEMA = "sqlonfhir"
RESOURCES = "rf_batch.resources"
# The resource key of every view row (the id of the resource it came from).
RESOURCE_KEY = "_resource_id"
# The session's changed resources (`replace_changed_sql`): a temporary table holding their rows
# of rf_batch.resources as the refresh left them, which the views' change SQL reads.
CHANGED_RESOURCES = "pg_temp.rf_changed_resources"
# One key for every writer of the batch layer (init and refresh): they never overlap.
LOCK_KEY = 0x7266_6261_7463_68  # "rfbatch"
# Secondary indexes of a view: each made when the view has all its columns (the columns the
# query API filters on).
VIEW_INDEXES: tuple[tuple[str, ...], ...] = (
    ("id",),
    ("gender",),
    ("code",),
    ("code_system", "code"),
    ("patient_id",),
)
TRIGRAM_EXTENSION = "pg_trgm"

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS rf_batch;
CREATE SCHEMA IF NOT EXISTS sqlonfhir;
CREATE TABLE IF NOT EXISTS rf_batch.resources (
    resource_type text,
    id text,
    version_id text,
    version_number double precision,
    last_updated text,
    last_updated_ms double precision,
    deleted boolean NOT NULL DEFAULT false,
    resource jsonb,
    PRIMARY KEY (resource_type, id)
);
CREATE INDEX IF NOT EXISTS resources_type_last_updated
    ON rf_batch.resources (resource_type, last_updated_ms);
CREATE TABLE IF NOT EXISTS rf_batch.watermark (
    id int PRIMARY KEY CHECK (id = 1),
    watermark text,
    refreshed_at timestamptz,
    resources bigint
);
CREATE TABLE IF NOT EXISTS rf_batch.views (
    name text PRIMARY KEY,
    definition jsonb,
    sql text,
    built_at timestamptz
);
ALTER TABLE rf_batch.views ADD COLUMN IF NOT EXISTS rebuild_sql text;
ALTER TABLE rf_batch.views ADD COLUMN IF NOT EXISTS changes_sql text;
ALTER TABLE rf_batch.views ADD COLUMN IF NOT EXISTS rows bigint;
"""

# The watermark row: HAPI's clock the views are complete to, when the last refresh committed,
# how many resources it left.
WATERMARK_SQL = "SELECT watermark, refreshed_at, resources FROM rf_batch.watermark WHERE id = 1"

Progress = Callable[[str], None]


class BatchNotInitialized(ResearchFlowError):
    """The batch schema is missing: run `researchflow batch init` first."""


@dataclasses.dataclass(frozen=True)
class ViewPlan:
    """How one ViewDefinition becomes the table `sqlonfhir.<name>`: its SQL and its indexes.

    `query` gives every row over rf_batch.resources, `changes_query` the rows of the changed
    resources (over `CHANGED_RESOURCES`); both give `_resource_id`, the view's columns, then
    the derived columns (folded text, date ranges), in the table's column order.
    """

    name: str
    resource: str
    query: str
    changes_query: str
    indexes: tuple[tuple[str, ...], ...]  # btree indexes
    trigram: tuple[str, ...]  # columns with a trigram (pg_trgm) GIN index
    definition: dict[str, Any]

    @property
    def sql(self) -> str:
        """Everything the table is built from, as text: a change means a rebuild."""
        index_text = "; ".join(",".join(cols) for cols in self.indexes)
        text_index = f"; text index {TEXT_INDEX.texts}" if self.text_index else ""
        return (
            f"{self.query}\n-- indexes {index_text}; trigram {','.join(self.trigram)}{text_index}"
        )

    @property
    def text_index(self) -> bool:
        """Whether condition-text's text index (`TextIndex`) is kept beside this table."""
        return has_text_index(self.name, self.trigram)


def _derived(view_name: str, columns: set[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The derived columns (name, SQL over `_q`) the query API reads, and the date-range lows."""
    derived: list[tuple[str, str]] = []
    lows: list[str] = []
    for c in SEARCHED_TEXT.get(view_name, ()):
        if c in columns:
            # Searched text kept folded once, at refresh (serving.cohort.SEARCHED_TEXT).
            text = f"_q.{sql.Identifier(c).as_string(None)}"
            derived.append((folded_column(c), case_map_sql(text, "fold")))
    for c in DATE_RANGES.get(view_name, ()):
        if c in columns:
            low_sql, high_sql = date_range_sql(f"_q.{sql.Identifier(c).as_string(None)}")
            low, high = date_range_columns(c)
            derived.append((low, f'{low_sql} COLLATE "C"'))
            derived.append((high, f'{high_sql} COLLATE "C"'))
            lows.append(low)
    taken = sorted(name for name, _ in derived if name in columns)
    if taken:
        raise ValueError(f"view {view_name}: the column name {taken[0]} is reserved")
    return derived, lows


def plan_view(view: ViewDefinition, name: str | None = None) -> ViewPlan:
    """The table for `view`. Raises InvalidViewDefinition, or ValueError for a view without a
    name or with a column the batch layer derives itself."""
    view_name = name or view.name
    if not view_name:
        raise ValueError("a ViewDefinition needs a name to become a batch table")
    columns = set(view.column_names)
    derived, lows = _derived(view_name, columns)
    extra = "".join(f", {expr} AS {sql.Identifier(n).as_string(None)}" for n, expr in derived)

    def over(table: str) -> str:
        compiled = compile_view(view, table=table, key_column=RESOURCE_KEY)
        # OFFSET 0: the derived columns read the view's columns as computed once per row
        # (pulled up, each use of `_q.c` would be a copy of c's whole expression).
        return f"SELECT _q.*{extra} FROM ({compiled} OFFSET 0) AS _q" if extra else compiled

    indexes = (
        (RESOURCE_KEY,),
        *(cols for cols in VIEW_INDEXES if set(cols) <= columns),
        *((low,) for low in lows),
    )
    trigram = tuple(n for n, _ in derived if n.endswith("_folded"))
    definition = loads(dumps(dataclasses.asdict(view)))
    return ViewPlan(
        view_name,
        view.resource,
        over(RESOURCES),
        over(CHANGED_RESOURCES),
        indexes,
        trigram,
        definition,
    )


def has_text_index(name: str, folded: Sequence[str]) -> bool:
    """Whether the view `name`, with these folded columns, has condition-text's text index."""
    return name == TEXT_INDEX.view and bool(folded)


# Scratch table of a refresh: the texts whose rows it removed (a text left without rows goes).
GONE_TEXTS = "pg_temp.rf_gone_texts"


def _text_rows_source(where: str, view_table: str | None = None) -> str:
    """FROM/WHERE giving (view row `v`, folded text `f.text`) for each counting row with a
    patient and each of its non-null folded `SEARCHED_TEXT` columns, with `where` on `v`;
    the rows of `view_table` (SQL text; default the view's own table)."""
    folded = [folded_column(c) for c in SEARCHED_TEXT[TEXT_INDEX.view]]
    values = ", ".join(f"(v.{sql.Identifier(c).as_string(None)})" for c in folded)
    view = view_table or _ident(VIEW_SCHEMA, TEXT_INDEX.view).as_string(None)
    counted = counted_sql("Condition").replace("verification_status", "v.verification_status")
    return (
        f"FROM {view} AS v CROSS JOIN LATERAL (VALUES {values}) AS f(text)"
        f" WHERE f.text IS NOT NULL AND v.patient_id IS NOT NULL AND {counted} AND {where}"
    )


def _fill_text_index_sql(
    where: str,
    view_table: str | None = None,
    texts: str = TEXT_INDEX.texts,
    rows: str = TEXT_INDEX.rows,
) -> list[str]:
    """Add the texts and text rows of the view rows meeting `where` (on `v`) to the text
    index's tables `texts` and `rows`."""
    source = _text_rows_source(where, view_table)
    return [
        f"INSERT INTO {texts} (text) SELECT DISTINCT f.text {source}"
        f" AND NOT EXISTS (SELECT 1 FROM {texts} AS t WHERE t.text = f.text)",
        f"INSERT INTO {rows} (text_id, patient_id, resource_id)"
        f" SELECT t.id, v.patient_id, v.{RESOURCE_KEY} FROM"
        f" (SELECT v.patient_id, v.{RESOURCE_KEY}, f.text {source}) AS v"
        f" JOIN {texts} AS t ON t.text = v.text",
    ]


def text_index_sql(changed_type: str) -> list[str]:
    """The statements that bring the text index (`TEXT_INDEX`) up to date with its view, in
    the transaction that changed the view, after the view's rows of the changed resources
    (`CHANGED_RESOURCES` of `changed_type`; `GONE_TEXTS` from `changes_setup_sql`) were
    replaced. (A whole rebuild builds it fresh: `text_index_build_sql`.)"""
    keys = (
        f"ANY(ARRAY(SELECT id FROM {CHANGED_RESOURCES} WHERE resource_type ="
        f" {sql.Literal(changed_type).as_string(None)}))"
    )
    return [
        f"TRUNCATE {GONE_TEXTS}",
        f"WITH gone AS (DELETE FROM {TEXT_INDEX.rows} WHERE resource_id = {keys}"
        f" RETURNING text_id) INSERT INTO {GONE_TEXTS} SELECT DISTINCT text_id FROM gone",
        *_fill_text_index_sql(f"v.{RESOURCE_KEY} = {keys}"),
        f"DELETE FROM {TEXT_INDEX.texts} AS t WHERE t.id IN (SELECT text_id FROM {GONE_TEXTS})"
        f" AND NOT EXISTS (SELECT 1 FROM {TEXT_INDEX.rows} AS r WHERE r.text_id = t.id)",
    ]


# The suffix of the text index's tables and indexes while a whole rebuild fills them fresh.
FRESH_SUFFIX = "_fresh"
# The text index's own indexes: (name, table (texts or rows), what follows USING).
_TEXT_INDEXES = (
    ("condition_texts_text", "texts", "hash (text)"),
    ("condition_text_rows_text_patient", "rows", "btree (text_id, patient_id, resource_id)"),
    ("condition_text_rows_resource", "rows", "btree (resource_id)"),
)


def text_index_build_sql(trigram: bool, view_table: str, suffix: str = "") -> list[str]:
    """Statements creating the text index's tables (`TEXT_INDEX`, names + `suffix`) from the
    view's table `view_table` (SQL text), filled, then indexed, then analyzed."""
    texts, rows = TEXT_INDEX.texts + suffix, TEXT_INDEX.rows + suffix
    out = [
        f"DROP TABLE IF EXISTS {rows}, {texts}",
        f"CREATE TABLE {texts} (id bigint GENERATED ALWAYS AS IDENTITY,"
        f" text text NOT NULL, CONSTRAINT condition_texts_pkey{suffix} PRIMARY KEY (id))",
        f"CREATE TABLE {rows} (text_id bigint NOT NULL, patient_id text NOT NULL,"
        " resource_id text NOT NULL)",
        # Filled, then indexed (faster than inserting into indexed tables), except the look-up
        # of a text the rows' insert needs (hash: a text may be longer than a btree entry).
        f"CREATE INDEX condition_texts_text{suffix} ON {texts} USING hash (text)",
        *_fill_text_index_sql("TRUE", view_table, texts, rows),
    ]
    for name, table, using in _TEXT_INDEXES[1:]:
        out.append(
            f"CREATE INDEX {name}{suffix} ON {rows if table == 'rows' else texts} USING {using}"
        )
    if trigram:
        out.append(
            f"CREATE INDEX condition_texts_trgm{suffix} ON {texts} USING gin (text gin_trgm_ops)"
        )
    out += [f"ANALYZE {texts}", f"ANALYZE {rows}"]
    return out


def text_index_swap_sql() -> list[str]:
    """Statements putting the fresh text index (FRESH_SUFFIX) in the place of the old one."""
    out = [f"DROP TABLE IF EXISTS {TEXT_INDEX.rows}, {TEXT_INDEX.texts}"]
    for table in (TEXT_INDEX.texts, TEXT_INDEX.rows):
        out.append(f"ALTER TABLE {table}{FRESH_SUFFIX} RENAME TO {table.split('.', 1)[1]}")
    schema = TEXT_INDEX.texts.split(".", 1)[0]
    for name in ("condition_texts_pkey", "condition_texts_trgm", *(i for i, _, _ in _TEXT_INDEXES)):
        out.append(f"ALTER INDEX IF EXISTS {schema}.{name}{FRESH_SUFFIX} RENAME TO {name}")
    return out


# JIT compiles the views' jsonb expressions for far longer than they run (condition_simple
# over 4,000 Conditions: 1.3 s with JIT, 0.4 s without; a view reading primitive extensions
# far more), as the serving transactions (serving.merge) and the engine already found.
NO_JIT = "-c jit=off"


def connect(database_url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A connection to the batch layer, or BatchLayerUnavailable with the reason."""
    try:
        return psycopg.connect(database_url, connect_timeout=10, options=NO_JIT, **kwargs)
    except psycopg.OperationalError as exc:
        raise BatchLayerUnavailable(postgres_failure(exc)) from exc


async def connect_async(database_url: str) -> psycopg.AsyncConnection[Any]:
    """An autocommit async connection to the batch layer, or BatchLayerUnavailable."""
    try:
        return await psycopg.AsyncConnection.connect(
            database_url, autocommit=True, connect_timeout=10, options=NO_JIT
        )
    except psycopg.OperationalError as exc:
        raise BatchLayerUnavailable(postgres_failure(exc)) from exc


def _ident(*parts: str) -> sql.Identifier:
    return sql.Identifier(*parts)


def _index_name(view: str, what: str) -> str:
    """`<view>_<what>`, shortened with a hash past 63 bytes: PostgreSQL would cut it to 63,
    which for a view name of 63 is the view's own name (a `[a-z][a-z0-9_]{0,62}` name)."""
    name = f"{view}_{what}"
    if len(name) <= 63:
        return name
    return f"{name[:52]}_{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def _relkind(conn: psycopg.Connection[Any], name: str) -> str | None:
    row = conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (VIEW_SCHEMA, name),
    ).fetchone()
    return None if row is None else str(row[0])


def trigram_available(conn: psycopg.Connection[Any]) -> bool:
    """Make sure pg_trgm is installed in this database; False, with a warning, when it cannot
    be (not shipped: Debian's postgresql-contrib has it; or no right to CREATE EXTENSION: a
    superuser, or from PostgreSQL 13 the database owner, since pg_trgm is a trusted
    extension). Without it condition-text scans its view instead of using an index."""
    row = conn.execute(
        "SELECT installed_version IS NOT NULL FROM pg_available_extensions WHERE name = %s",
        (TRIGRAM_EXTENSION,),
    ).fetchone()
    if row is None:
        logger.warning(
            "PostgreSQL lacks the %s extension (Debian: postgresql-contrib): condition-text"
            " will scan its view instead of using a trigram index",
            TRIGRAM_EXTENSION,
        )
        return False
    if row[0]:
        return True
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(
                    sql.Identifier(TRIGRAM_EXTENSION)
                )
            )
    except psycopg.errors.InsufficientPrivilege as exc:
        logger.warning(
            "cannot CREATE EXTENSION %s (%s): condition-text will scan its view until an"
            " operator with the right runs it once in this database and `batch init` again",
            TRIGRAM_EXTENSION,
            exc.diag.message_primary,
        )
        return False
    return True


def _recorded_sql(plan: ViewPlan, trigram: bool) -> str:
    """What rf_batch.views records a table was built from: without the trigram index it
    wanted, `batch init` rebuilds it once pg_trgm can be had."""
    return (
        plan.sql if trigram or not plan.trigram else f"{plan.sql}\n-- without {TRIGRAM_EXTENSION}"
    )


# A view's table is (re)built whole as a fresh table beside it, filled, then indexed (far
# faster than inserting into an indexed table, and no dead rows left behind), then swapped in
# under the old one's name in the same transaction: readers keep the old rows until it commits.
FRESH_PREFIX = "_rf_new"  # no view name starts with `_`, so no fresh table takes a view's name
# The indexes of a built view's table (name, definition), so that a rebuild gives its fresh
# table the same ones, and the grants an operator made on it (privilege, grantable, grantee).
INDEXES_SQL = (
    "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index AS x"
    " JOIN pg_class AS i ON i.oid = x.indexrelid WHERE x.indrelid = to_regclass(%s)"
    " ORDER BY i.relname"
)
GRANTS_SQL = (
    "SELECT a.privilege_type, a.is_grantable, r.rolname FROM pg_class AS c"
    " CROSS JOIN LATERAL aclexplode(c.relacl) AS a LEFT JOIN pg_roles AS r ON r.oid = a.grantee"
    " WHERE c.oid = to_regclass(%s) AND a.grantee <> c.relowner"
    " ORDER BY a.grantee, a.privilege_type"
)
# Taken by a swap just before it drops the old tables: every serving snapshot locks the
# watermark row's table in ACCESS SHARE mode before it starts (serving.merge.SNAPSHOT_SQL), so
# none can start before the swap commits and then read a table whose rows it cannot see.
LOCK_OUT_READERS = "LOCK TABLE rf_batch.watermark IN ACCESS EXCLUSIVE MODE"


def regclass_text(name: str) -> str:
    """`sqlonfhir."<name>"`, as to_regclass reads it."""
    return f'{VIEW_SCHEMA}."{name}"'


@dataclasses.dataclass(frozen=True)
class FreshTable:
    """The statements that build view `name` whole into a fresh table and swap it in.

    `indexes` are (index name, what follows USING in its definition, e.g. `btree (code)`),
    `grants` (privilege, grantable, grantee or None for PUBLIC) as GRANTS_SQL gives them,
    `kind` the relkind of the table it replaces (None: none; "m": an older release's
    materialized view). `text_index`: condition-text's text index (`TEXT_INDEX`) is built
    fresh from the fresh table too and swapped in with it (its trigram index when `trigram`).
    """

    name: str
    query: str
    indexes: tuple[tuple[str, str], ...]
    grants: tuple[tuple[str, bool, str | None], ...] = ()
    kind: str | None = "r"
    text_index: bool = False
    trigram: bool = False

    @property
    def fresh(self) -> str:
        return _index_name(FRESH_PREFIX, self.name)

    def build_sql(self) -> list[sql.SQL | sql.Composed]:
        """Create and fill the fresh table (the first statement's rowcount is its rows),
        index it, grant on it what was granted on the old one, ANALYZE it."""
        target = _ident(VIEW_SCHEMA, self.fresh)
        out: list[sql.SQL | sql.Composed] = [
            sql.SQL("CREATE TABLE {} AS {}").format(target, sql.SQL(self.query)),
        ]
        for index, using in self.indexes:
            out.append(
                sql.SQL("CREATE INDEX {} ON {} USING {}").format(
                    _ident(_index_name(FRESH_PREFIX, index)), target, sql.SQL(using)
                )
            )
        for privilege, grantable, grantee in self.grants:
            out.append(
                sql.SQL("GRANT {} ON {} TO {}{}").format(
                    sql.SQL(privilege),
                    target,
                    _ident(grantee) if grantee is not None else sql.SQL("PUBLIC"),
                    sql.SQL(" WITH GRANT OPTION" if grantable else ""),
                )
            )
        out.append(sql.SQL("ANALYZE {}").format(target))
        if self.text_index:
            out.extend(
                sql.SQL(statement)
                for statement in text_index_build_sql(
                    self.trigram, target.as_string(None), FRESH_SUFFIX
                )
            )
        return out

    def swap_sql(self) -> list[sql.SQL | sql.Composed]:
        """Drop the old table, give the fresh one (and its indexes) the old names. Run
        LOCK_OUT_READERS first, once per transaction."""
        target = _ident(VIEW_SCHEMA, self.name)
        out: list[sql.SQL | sql.Composed] = []
        if self.kind == "m":  # as an older release built it
            out.append(sql.SQL("DROP MATERIALIZED VIEW {}").format(target))
        elif self.kind is not None:
            out.append(sql.SQL("DROP TABLE {}").format(target))
        out.append(
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                _ident(VIEW_SCHEMA, self.fresh), _ident(self.name)
            )
        )
        for index, _using in self.indexes:
            out.append(
                sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                    _ident(VIEW_SCHEMA, _index_name(FRESH_PREFIX, index)), _ident(index)
                )
            )
        if self.text_index:
            out.extend(sql.SQL(statement) for statement in text_index_swap_sql())
        return out


def has_trigram_index(indexes: Sequence[tuple[str, str]]) -> bool:
    """Whether FreshTable-style `indexes` hold a pg_trgm one (pg_trgm is installed)."""
    return any("gin_trgm_ops" in using for _name, using in indexes)


def existing_indexes(rows: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """INDEXES_SQL's rows as FreshTable.indexes."""
    return tuple((name, definition.split(" USING ", 1)[1]) for name, definition in rows)


def _plan_indexes(plan: ViewPlan, trigram: bool) -> tuple[tuple[str, str], ...]:
    out = [
        (
            _index_name(plan.name, "_".join(cols)),
            "btree (" + ", ".join(_ident(c).as_string(None) for c in cols) + ")",
        )
        for cols in plan.indexes
    ]
    out.extend(
        (_index_name(plan.name, f"{col}_trgm"), f"gin ({_ident(col).as_string(None)} gin_trgm_ops)")
        for col in (plan.trigram if trigram else ())
    )
    return tuple(out)


def _grants(conn: psycopg.Connection[Any], name: str) -> tuple[tuple[str, bool, str | None], ...]:
    rows = conn.execute(GRANTS_SQL, (regclass_text(name),)).fetchall()
    return tuple((str(p), bool(g), r) for p, g, r in rows)


def _run_fresh(conn: psycopg.Connection[Any], tables: Sequence[FreshTable]) -> dict[str, int]:
    """Build every table of `tables` fresh, then swap them all in; rows per view."""
    rows: dict[str, int] = {}
    for table in tables:
        build = table.build_sql()
        rows[table.name] = conn.execute(build[0]).rowcount
        for statement in build[1:]:
            conn.execute(statement)
    if tables:
        conn.execute(LOCK_OUT_READERS)
    for table in tables:
        for statement in table.swap_sql():
            conn.execute(statement)
    return rows


def _build_view(conn: psycopg.Connection[Any], plan: ViewPlan, trigram: bool) -> None:
    """(Re)create the table of `plan` from the resources held, its indexes, its record."""
    kind = _relkind(conn, plan.name)
    grants = _grants(conn, plan.name) if kind == "r" else ()
    table = FreshTable(
        plan.name,
        plan.query,
        _plan_indexes(plan, trigram),
        grants,
        kind,
        text_index=plan.text_index,
        trigram=trigram,
    )
    rows = _run_fresh(conn, [table])[plan.name]
    conn.execute(
        "INSERT INTO rf_batch.views (name, definition, sql, rebuild_sql, changes_sql, rows,"
        " built_at) VALUES (%s, %s::jsonb, %s, %s, %s, %s, now())"
        " ON CONFLICT (name) DO UPDATE SET definition = EXCLUDED.definition,"
        " sql = EXCLUDED.sql, rebuild_sql = EXCLUDED.rebuild_sql,"
        " changes_sql = EXCLUDED.changes_sql, rows = EXCLUDED.rows,"
        " built_at = EXCLUDED.built_at",
        (
            plan.name,
            dumps(plan.definition).decode(),
            _recorded_sql(plan, trigram),
            plan.query,
            plan.changes_query,
            rows,
        ),
    )


def changes_setup_sql() -> list[str]:
    """Statements creating this session's `CHANGED_RESOURCES` table, shaped like
    rf_batch.resources (dropped when the session ends)."""
    return [
        f"CREATE TEMP TABLE IF NOT EXISTS {CHANGED_RESOURCES} (LIKE {RESOURCES})",
        f"CREATE TEMP TABLE IF NOT EXISTS {GONE_TEXTS} (text_id bigint)",
    ]


def text_indexed_views_sql() -> str:
    """A query naming the views that have condition-text's text index (`TEXT_INDEX`) built
    beside them: one row (the name of `TEXT_INDEX.view`), or none where the batch layer has
    no text index (one an older release built, until `batch init`)."""
    view = sql.Literal(TEXT_INDEX.view).as_string(None)
    rows = sql.Literal(TEXT_INDEX.rows).as_string(None)
    return f"SELECT {view} WHERE to_regclass({rows}) IS NOT NULL"


def replace_changed_sql(name: str, resource_type: str, changes_query: str) -> list[sql.Composed]:
    """The two statements that bring view `name` up to date with the changed resources
    (`CHANGED_RESOURCES`, see `changes_setup_sql`): delete the rows of those of its type,
    insert their new rows (a deleted resource has none). Run them in the transaction that
    changed the resources (`serving.batch_refresh` does)."""
    target = _ident(VIEW_SCHEMA, name)
    return [
        # `= ANY(ARRAY(...))`, not `IN (SELECT ...)`: no join for the planner to turn into a
        # scan of every row; the keys go through the index.
        sql.SQL(
            "DELETE FROM {} WHERE {} = ANY(ARRAY(SELECT id FROM {} WHERE resource_type = {}))"
        ).format(
            target,
            _ident(RESOURCE_KEY),
            _ident(*CHANGED_RESOURCES.split(".")),
            sql.Literal(resource_type),
        ),
        sql.SQL("INSERT INTO {} {}").format(target, sql.SQL(changes_query)),
    ]


def rebuild_view(conn: psycopg.Connection[Any], name: str) -> int:
    """Recompute every row of the view `name` from rf_batch.resources, in the caller's
    transaction: into a fresh table with the same indexes and grants, swapped in under the
    view's name (readers see the old rows until it commits; they wait only for the swap).

    The SQL is the one the view's table was built with (rf_batch.views). Returns its rows.
    Raises KeyError for a view the batch layer has not built (run `batch init`).
    """
    return rebuild_views(conn, [name])[name]


def rebuild_views(
    conn: psycopg.Connection[Any], names: Sequence[str] | None = None
) -> dict[str, int]:
    """`rebuild_view` for the views `names` (default: every view the batch layer holds), all
    built first and then swapped in together; rows per view."""
    if names is None:
        names = [r[0] for r in conn.execute("SELECT name FROM rf_batch.views ORDER BY name")]
    indexed = {str(r[0]) for r in conn.execute(text_indexed_views_sql())}
    tables: list[FreshTable] = []
    for name in names:
        row = conn.execute(
            "SELECT rebuild_sql FROM rf_batch.views WHERE name = %s", (name,)
        ).fetchone()
        kind = _relkind(conn, name)
        if row is None or row[0] is None or kind is None:
            raise KeyError(f"the batch layer has no table for view {name}: run `batch init`")
        indexes = existing_indexes(conn.execute(INDEXES_SQL, (regclass_text(name),)).fetchall())
        tables.append(
            FreshTable(
                name,
                str(row[0]),
                indexes,
                _grants(conn, name),
                kind,
                text_index=name in indexed,
                trigram=has_trigram_index(indexes),
            )
        )
    # The caller's transaction (a savepoint in it), or one of its own on an autocommit
    # connection: the swap's lock lasts until the commit.
    with conn.transaction():
        rows = _run_fresh(conn, tables)
        for name, count in rows.items():
            conn.execute(
                "UPDATE rf_batch.views SET rows = %s, built_at = now() WHERE name = %s",
                (count, name),
            )
    return rows


def init(
    database_url: str,
    views: Mapping[str, ViewDefinition] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Create the batch schema and one table per ViewDefinition, idempotently.

    A view whose definition (or compiled SQL) changed since it was built is rebuilt from the
    resources already held; an unchanged one is left alone. `views` defaults to the shipped
    ViewDefinitions. Returns one line per thing done ("created view x", "unchanged view y").
    Each view is built in its own transaction, under the lock `refresh` takes.
    """
    say = progress or (lambda _line: None)
    plans = [plan_view(v, name) for name, v in (views or shipped_views()).items()]
    need_trigram = any(plan.trigram for plan in plans)
    done: list[str] = []
    with connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            existed = conn.execute("SELECT to_regclass('rf_batch.resources')").fetchone()
            with conn.transaction():
                conn.execute(SCHEMA_SQL)
            if existed is None or existed[0] is None:
                done.append("created schema rf_batch (resources, watermark, views)")
                say(done[-1])
            trigram = need_trigram and trigram_available(conn)
            built = dict(conn.execute("SELECT name, sql FROM rf_batch.views").fetchall())
            for plan in plans:
                present = _relkind(conn, plan.name) is not None
                if present and built.get(plan.name) == _recorded_sql(plan, trigram):
                    line = f"unchanged view {VIEW_SCHEMA}.{plan.name}"
                else:
                    with conn.transaction():
                        _build_view(conn, plan, trigram)
                    if plan.text_index:
                        # Index-only scans want the visibility map set (not in a transaction).
                        conn.execute(f"VACUUM {TEXT_INDEX.rows}")
                    verb = "rebuilt" if present or plan.name in built else "created"
                    line = f"{verb} view {VIEW_SCHEMA}.{plan.name}"
                done.append(line)
                say(line)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    return done


def drop(database_url: str) -> None:
    """Drop the batch layer (its views and tables): for the demo's fresh start and tests."""
    with connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            with conn.transaction():
                conn.execute(f"DROP SCHEMA IF EXISTS {VIEW_SCHEMA} CASCADE")
                conn.execute("DROP SCHEMA IF EXISTS rf_batch CASCADE")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def batch_watermark(database_url: str) -> str | None:
    """The batch watermark (HAPI's clock, ISO), or None before the first refresh or init."""
    with connect(database_url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('rf_batch.watermark')").fetchone() in (None, (None,)):
            return None
        row = conn.execute(WATERMARK_SQL).fetchone()
    return None if row is None else row[0]


async def batch_watermark_async(database_url: str) -> str | None:
    """`batch_watermark` on an async connection (for the poller and the query API)."""
    async with await connect_async(database_url) as conn:
        cur = await conn.execute("SELECT to_regclass('rf_batch.watermark')")
        if (await cur.fetchone()) in (None, (None,)):
            return None
        cur = await conn.execute(WATERMARK_SQL)
        row = await cur.fetchone()
    return None if row is None else row[0]


async def batch_versions_async(
    database_url: str, resource_type: str, ids: Sequence[str]
) -> dict[str, tuple[float, float]]:
    """The versions the batch layer holds of these ids: id -> (version number, lastUpdated ms).

    For the poller's missed-notification count: a change the batch layer holds at that version
    or newer (a refresh moved it out of the speed layer) is not missed. A row a `--full`
    refresh marked deleted because HAPI no longer listed it covers only strictly older
    versions (as in the speed layer's trim). Ids it lacks are left out; an uninitialised
    batch layer holds nothing. Raises BatchLayerUnavailable when PostgreSQL cannot be reached.
    """
    if not ids:
        return {}
    out: dict[str, tuple[float, float]] = {}
    async with await connect_async(database_url) as conn:
        cur = await conn.execute("SELECT to_regclass('rf_batch.resources')")
        if (await cur.fetchone()) in (None, (None,)):
            return out
        cur = await conn.execute(
            "SELECT id, version_number, last_updated_ms, deleted AND resource IS NOT NULL"
            " FROM rf_batch.resources WHERE resource_type = %s AND id = ANY(%s)",
            (resource_type, list(ids)),
        )
        for rid, vn, lum, absent in await cur.fetchall():
            if absent:
                vn, lum = (vn - 0.5 if vn >= 0 else vn), lum - 0.001
            out[rid] = (float(vn), float(lum))
    return out


def view_stats(database_url: str) -> dict[str, tuple[int, datetime | None]]:
    """Per built view: (rows it holds, when its contents were last computed)."""
    with connect(database_url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('rf_batch.views')").fetchone() in (None, (None,)):
            return {}
        out: dict[str, tuple[int, datetime | None]] = {}
        for name, built_at in conn.execute(
            "SELECT name, built_at FROM rf_batch.views ORDER BY name"
        ).fetchall():
            exists = conn.execute("SELECT to_regclass(%s)", (f'{VIEW_SCHEMA}."{name}"',)).fetchone()
            if exists is None or exists[0] is None:
                continue
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(_ident(VIEW_SCHEMA, name))
            ).fetchone()
            out[name] = (int(row[0]) if row else 0, built_at)
    return out


async def check_postgres(settings: Settings) -> None:
    """Reach the batch layer once; StartupError naming DATABASE_URL otherwise."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            settings.database_url, connect_timeout=int(STARTUP_TIMEOUT_SECONDS)
        )
    except (psycopg.Error, OSError) as exc:
        raise StartupError(postgres_failure(exc)) from None
    await conn.close()
