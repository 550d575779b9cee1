"""GET /cohort: parsing the FHIR-style parameters, matching view rows, and the batch SQL."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from psycopg import sql

from core.errors import InvalidRequest, Issue
from core.fhir_values import (
    date_range,
    datetime_search_range,
    day_instants,
    day_instants_sql,
    fold,
    implied_range,
    last_day,
    parse_number,
    range_matches,
    range_sql,
)

DEFAULT_COUNT = 1000
MAX_COUNT = 10000
PARAMETERS = frozenset(
    {"gender", "birthdate", "condition", "condition-text", "observation", "observation-value"}
)
CONTROL = frozenset({"ids", "_count", "_after"})
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le")
# FHIR's AdministrativeGender, the required binding of Patient.gender.
GENDERS = ("male", "female", "other", "unknown")

# The shipped views cohort queries read, by resource type; in the batch layer each is the
# table sqlonfhir.<name>.
COHORT_VIEWS = {
    "Patient": "patient_demographics",
    "Condition": "condition_simple",
    "Observation": "observation_simple",
}
PATIENTS_VIEW = f"sqlonfhir.{COHORT_VIEWS['Patient']}"
CONDITIONS_VIEW = f"sqlonfhir.{COHORT_VIEWS['Condition']}"
OBSERVATIONS_VIEW = f"sqlonfhir.{COHORT_VIEWS['Observation']}"
# The view columns condition-text searches. Each is also kept folded (Unicode default case
# folding, core.fhir_values.fold) beside the view's own columns: in the batch layer's
# view as `<column>_folded` (computed by the SQL that fold_sql generates from the same
# table), in the speed layer's index at write time, so both layers compare the same string.
SEARCHED_TEXT: dict[str, tuple[str, ...]] = {
    COHORT_VIEWS["Condition"]: ("code_text", "code_display")
}


@dataclass(frozen=True)
class TextIndex:
    """Condition-text's text index in the batch layer, kept beside the view `view` by
    serving.batch in the view's transactions.

    `texts` (id, text): each distinct folded text of the view's counting rows once, with a
    trigram index; `rows` (text_id, patient_id, resource_id): per counting row with a patient,
    one row per folded text of its `SEARCHED_TEXT` columns (a btree on all three, for counting
    patients by an index-only scan). A text no row carries any more leaves `texts`.
    """

    view: str
    texts: str
    rows: str


TEXT_INDEX = TextIndex(
    COHORT_VIEWS["Condition"], "rf_batch.condition_texts", "rf_batch.condition_text_rows"
)


def folded_column(column: str) -> str:
    """The batch view column holding `column` folded."""
    return f"{column}_folded"


# The view columns birthdate searches. Each is also kept in the batch layer's table as its day
# range (core.fhir_values.date_range_sql, the rule `date_range` applies in Python to the speed
# layer's rows): `<column>_low` and `<column>_high`, YYYY-MM-DD text in the "C" collation (NULL
# when the value is not a date), so a birthdate search is plain comparisons and an index range.
DATE_RANGES: dict[str, tuple[str, ...]] = {COHORT_VIEWS["Patient"]: ("birth_date",)}


def date_range_columns(column: str) -> tuple[str, str]:
    """The batch view columns holding the low and high day of `column`'s date range."""
    return f"{column}_low", f"{column}_high"


def like_pattern(text: str) -> str:
    """A LIKE pattern matching any text that contains `text` (its `%`, `_` and `\\` escaped):
    the same test as Python's `in`, in a form a trigram index (pg_trgm) serves."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# Statuses that never count in a cohort (the contract's Query API section): per resource type,
# the view column holding the status and its values that never count. Both layers read this
# table: the rows in Python (`is_counted`), the batch views in SQL (`counted_sql`).
NEVER_COUNTED: dict[str, tuple[str, frozenset[str]]] = {
    "Condition": ("verification_status", frozenset({"entered-in-error"})),
    "Observation": ("status", frozenset({"entered-in-error", "cancelled"})),
}


def is_counted(resource_type: str, row: Mapping[str, Any]) -> bool:
    """Whether a Condition/Observation view row may make its patient a cohort member."""
    if resource_type not in NEVER_COUNTED:
        return True
    column, never = NEVER_COUNTED[resource_type]
    return row.get(column) not in never


def counted_sql(resource_type: str) -> str:
    """SQL: a row of the type's view counts (`is_counted`); a row without a status does."""
    column, never = NEVER_COUNTED[resource_type]
    values = ", ".join(sql.Literal(v).as_string(None) for v in sorted(never))
    return f"({column} IS NULL OR {column} NOT IN ({values}))"


Kind = Literal["condition", "condition-text", "observation"]
Row = Mapping[str, Any]


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class DateCriterion:
    """One birthdate alternative: prefix and the range the search value covers, both bounds
    inclusive: days (YYYY-MM-DD) for a date, UTC instants (YYYY-MM-DDThh:mm:ss.sss,
    `core.fhir_values.datetime_search_range`) for a dateTime, when `instants` is set."""

    prefix: str
    low: str
    high: str
    instants: bool = False

    def target(self, days: tuple[str, str]) -> tuple[str, str]:
        """A birth date's day range (`date_range`) in this criterion's terms."""
        return day_instants(days) if self.instants else days

    def target_sql(self, low: str, high: str) -> tuple[str, str]:
        """SQL of `target` over the day range's bound expressions."""
        return day_instants_sql(low, high) if self.instants else (low, high)


@dataclass(frozen=True)
class CodeCriterion:
    """`system|code` (system "" = no system, None = any), optional comparison on the value.

    FHIR number search: `eq`/`ne` compare with the range the value's implied precision
    covers, [low, high) (`eq7` is [6.5, 7.5)); `gt`/`lt`/`ge`/`le` with the value exactly.

    Equal (and hashing equal) exactly when the answers are: compared by `bounds`, never by
    `value`, whose Decimal equality forgets the precision (`Decimal("7") == Decimal("7.0")`
    although `eq7` and `eq7.0` are different ranges). Caches keyed on a query rely on it.
    """

    system: str | None
    code: str
    comparator: str | None = None
    value: Decimal | None = field(default=None, compare=False)
    # What the comparison means: [low, high) for eq/ne, (value, value) for the others.
    bounds: tuple[Decimal, Decimal] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        bounds = None
        if self.value is not None:
            exact = self.comparator not in ("eq", "ne")
            bounds = (self.value, self.value) if exact else implied_range(self.value)
        object.__setattr__(self, "bounds", bounds)

    @property
    def range(self) -> tuple[Decimal, Decimal]:
        assert self.value is not None
        return implied_range(self.value)


@dataclass(frozen=True)
class Criterion:
    """One Condition/Observation parameter: ORed alternatives a single resource must meet."""

    kind: Kind
    codes: tuple[CodeCriterion, ...] = ()
    texts: tuple[str, ...] = ()  # folded substrings (core.fhir_values.fold)

    @property
    def resource_type(self) -> str:
        return "Observation" if self.kind == "observation" else "Condition"


@dataclass(frozen=True)
class CohortQuery:
    """A parsed /cohort request: repeated parameters AND, alternatives inside one OR."""

    genders: tuple[tuple[str, ...], ...] = ()
    birthdates: tuple[tuple[DateCriterion, ...], ...] = ()
    criteria: tuple[Criterion, ...] = ()
    ids: bool = True
    count: int = DEFAULT_COUNT
    after: str | None = None

    def signature(self) -> tuple[Any, ...]:
        """What the answer's counts depend on (not paging); equal only for queries with equal
        answers (numbers by their implied ranges: see CodeCriterion)."""
        return (self.genders, self.birthdates, self.criteria)

    @property
    def resource_types(self) -> frozenset[str]:
        """The types whose rows the answer depends on: Patient and the parameters' types."""
        return frozenset(["Patient", *(c.resource_type for c in self.criteria)])


def _bad(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, [Issue("invalid", message, name)])


def split_alternatives(value: str) -> list[str]:
    """Split on commas not escaped as `\\,` (FHIR search escaping)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            current.append(nxt if nxt in {",", "$", "|", "\\"} else ch + nxt)
        elif ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def date_matches(target: tuple[str, str] | None, crit: DateCriterion) -> bool:
    """Whether a birth date's day range (`date_range`) meets one birthdate alternative, by
    FHIR's date-range rules (`core.fhir_values.range_matches`)."""
    if target is None:
        return False
    return range_matches(crit.target(target), (crit.low, crit.high), crit.prefix)


_DATE_SHAPE = re.compile(r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2}))?)?")


def _parse_date(name: str, raw: str) -> DateCriterion:
    """One birthdate value: an optional prefix and a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD)
    or dateTime (YYYY-MM-DDThh:mm[:ss[.sss]][Z|(+|-)hh:mm], FHIR R4 search "date").

    FHIR's date grammar has years 0001-9999, months 01-12 and the days of that month; each
    way out of it is named in the 400's message. A dateTime is the instants it covers, a
    birth date the instants of its days in UTC (`DateCriterion.target`).
    """
    prefix = "eq"
    if raw[:2] in PREFIXES:
        prefix, raw = raw[:2], raw[2:]
    elif raw[:1].isalpha():
        raise _bad(
            name,
            f"{name}: unknown prefix {raw[:2]!r} in {raw!r} (FHIR's are eq, ne, gt, lt, ge, le)",
        )
    date_part, has_time, _ = raw.partition("T")
    shape = _DATE_SHAPE.fullmatch(date_part)
    if shape is None or (has_time and shape.group(3) is None):
        raise _bad(
            name,
            f"{name}: {raw!r} is not a date (YYYY, YYYY-MM or YYYY-MM-DD) or dateTime"
            " (YYYY-MM-DDThh:mm[:ss[.sss]][Z|+hh:mm|-hh:mm])",
        )
    year, month, day = shape.groups()
    if year == "0000":
        raise _bad(name, f"{name}: year 0000 in {raw!r} is not a FHIR year (0001-9999)")
    if month is not None and not 1 <= int(month) <= 12:
        raise _bad(name, f"{name}: month {month} in {raw!r} is not a month (01-12)")
    if day is not None and not 1 <= int(day) <= last_day(int(year), int(month or 1)):
        raise _bad(
            name,
            f"{name}: day {day} in {raw!r} is not a day of {year}-{month} "
            f"(01-{last_day(int(year), int(month or 1)):02d})",
        )
    if has_time:
        try:
            instants = datetime_search_range(raw)
        except ValueError as exc:
            raise _bad(name, f"{name}: {exc}") from None
        if instants is None:
            raise _bad(
                name,
                f"{name}: the time of {raw!r} is not hh:mm[:ss[.sss]] with an optional zone"
                " (Z, +hh:mm or -hh:mm)",
            )
        return DateCriterion(prefix, *instants, instants=True)
    span = date_range(raw)
    assert span is not None  # the shape and ranges above are date_range's grammar
    return DateCriterion(prefix, *span)


def _parse_comparison(name: str, raw: str) -> tuple[str, Decimal]:
    prefix = "eq"
    if raw[:2] in PREFIXES:
        prefix, raw = raw[:2], raw[2:]
    value = parse_number(raw)
    if value is None:
        raise _bad(
            name,
            f"{name}: {raw!r} is not a number (a prefix eq, ne, gt, lt, ge or le, then"
            " digits with an optional fraction and exponent, e.g. gt6.5)",
        )
    return prefix, value


def _parse_code(name: str, raw: str, allow_value: bool) -> CodeCriterion:
    comparator: str | None = None
    value: Decimal | None = None
    if "$" in raw:
        if not allow_value:
            raise _bad(name, f"{name}: a value comparison ($) is not allowed here")
        raw, _, cmp_text = raw.partition("$")
        comparator, value = _parse_comparison(name, cmp_text)
    system: str | None = None
    code = raw
    if "|" in raw:
        system, _, code = raw.partition("|")
    if not code:
        raise _bad(name, f"{name}: a code is required (system|code or code)")
    return CodeCriterion(system, code, comparator, value)


def whole_number(raw: str, maximum: int) -> int | None:
    """`raw` as a whole number from 0 to `maximum`, or None (ASCII digits only: "²" is no 2)."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > len(str(maximum)):
        return None
    value = int(raw)
    return value if value <= maximum else None


def parse_query(params: Sequence[tuple[str, str]]) -> CohortQuery:
    """Parse the query string pairs; raises InvalidRequest naming the parameter."""
    genders: list[tuple[str, ...]] = []
    dates: list[tuple[DateCriterion, ...]] = []
    criteria: list[Criterion] = []
    observation_values: list[str] = []
    ids, count, after = True, DEFAULT_COUNT, None
    for name, value in params:
        if "\x00" in value and (name in PARAMETERS or name in CONTROL):
            raise _bad(name, f"{name} contains a NUL character")
        if name not in PARAMETERS and name not in CONTROL:
            if name.startswith("_"):
                continue
            raise _bad(name, f"unknown parameter {name!r}")
        if name == "ids":
            if value not in ("true", "false"):
                raise _bad(name, "ids must be true or false")
            ids = value == "true"
            continue
        if name == "_count":
            parsed = whole_number(value, MAX_COUNT)
            if parsed is None:
                raise _bad(name, f"_count must be a whole number from 0 to {MAX_COUNT}")
            count = parsed
            continue
        if name == "_after":
            after = value
            continue
        alternatives = split_alternatives(value)
        if any(a == "" for a in alternatives):
            raise _bad(name, f"{name}: empty value")
        if name == "gender":
            unknown = [a for a in alternatives if a not in GENDERS]
            if unknown:
                raise _bad(
                    name,
                    f"gender: {unknown[0][:40]!r} is not an AdministrativeGender "
                    f"({', '.join(GENDERS)})",
                )
            genders.append(tuple(alternatives))
        elif name == "birthdate":
            dates.append(tuple(_parse_date(name, a) for a in alternatives))
        elif name == "condition":
            codes = tuple(_parse_code(name, a, False) for a in alternatives)
            criteria.append(Criterion("condition", codes=codes))
        elif name == "condition-text":
            criteria.append(Criterion("condition-text", texts=tuple(fold(a) for a in alternatives)))
        elif name == "observation":
            codes = tuple(_parse_code(name, a, True) for a in alternatives)
            criteria.append(Criterion("observation", codes=codes))
        else:  # observation-value
            observation_values.append(value)
    if observation_values:
        observations = [i for i, c in enumerate(criteria) if c.kind == "observation"]
        if len(observation_values) > 1 or len(observations) != 1:
            raise _bad(
                "observation-value",
                "observation-value needs exactly one observation parameter (and is given once)",
            )
        comparator, number = _parse_comparison("observation-value", observation_values[0])
        index = observations[0]
        if any(c.comparator for c in criteria[index].codes):
            raise _bad("observation-value", "observation already carries a $ comparison")
        criteria[index] = Criterion(
            "observation",
            codes=tuple(
                CodeCriterion(c.system, c.code, comparator, number) for c in criteria[index].codes
            ),
        )
    return CohortQuery(
        genders=tuple(genders),
        birthdates=tuple(dates),
        criteria=tuple(criteria),
        ids=ids,
        count=count,
        after=after,
    )


# --------------------------------------------------------------------------- rows (Python)


def _number(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, float):  # not from our parsing; read as the decimal it prints as
        return Decimal(repr(value))
    return None


def number_matches(code: CodeCriterion, value: Decimal) -> bool:
    """FHIR number search of one value (exact decimals, never rounded)."""
    assert code.comparator is not None and code.value is not None
    prefix = code.comparator
    if prefix in ("eq", "ne"):
        low, high = code.range
        inside = low <= value < high
        return inside if prefix == "eq" else not inside
    if prefix == "gt":
        return value > code.value
    if prefix == "lt":
        return value < code.value
    if prefix == "ge":
        return value >= code.value
    return value <= code.value


def patient_matches(query: CohortQuery, row: Row) -> bool:
    """A patient_demographics row meets every gender/birthdate parameter."""
    for alternatives in query.genders:
        if row.get("gender") not in alternatives:
            return False
    if query.birthdates:
        span = date_range(row.get("birth_date"))
        for dates in query.birthdates:
            if not any(date_matches(span, d) for d in dates):
                return False
    return True


def code_matches(code: CodeCriterion, row: Row) -> bool:
    if row.get("code") != code.code:
        return False
    if code.system is not None and (row.get("code_system") or "") != code.system:
        return False
    if code.comparator is not None and code.value is not None:
        value = _number(row.get("value"))
        return value is not None and number_matches(code, value)
    return True


def _contains(text: Any, needle: str) -> bool:
    return isinstance(text, str) and needle in fold(text)


def criterion_matches(criterion: Criterion, row: Row) -> bool:
    """A condition_simple/observation_simple row meets one Condition/Observation parameter."""
    if not is_counted(criterion.resource_type, row):
        return False
    if criterion.kind == "condition-text":
        return any(
            _contains(row.get("code_text"), t) or _contains(row.get("code_display"), t)
            for t in criterion.texts
        )
    return any(code_matches(c, row) for c in criterion.codes)


# --------------------------------------------------------------------------- SQL


def patient_sql(query: CohortQuery, params: list[Any]) -> str:
    """WHERE conditions on patient_demographics for the gender/birthdate parameters.

    Birthdates compare the precomputed day range of each birth date (`DATE_RANGES`) by
    `core.fhir_values.range_sql`, the SQL of the `range_matches` the speed layer's rows meet.
    The result may be NULL where a birthdate test does not hold (a value that is no date).
    """
    parts = ["TRUE"]
    for genders in query.genders:
        parts.append("gender = ANY(%s::text[])")
        params.append(list(genders))
    low, high = date_range_columns("birth_date")
    for dates in query.birthdates:
        tests = [
            range_sql(d.prefix, *d.target_sql(low, high), (d.low, d.high), params) for d in dates
        ]
        parts.append(tests[0] if len(tests) == 1 else "(" + " OR ".join(tests) + ")")
        if len(dates) == 1:
            parts.extend(_low_bounds(dates[0], low, params))
    return " AND ".join(parts)


def _low_bounds(d: DateCriterion, low: str, params: list[Any]) -> list[str]:
    """Bounds on the range's low day that the exact test implies, so that one index (on `low`)
    answers every prefix but `ne` by a range: a birth date's range never leaves its year, so
    its high day reaching a day means its low day is at or after that day's year. A dateTime
    search value's instants bound the day column by their days (`[:10]`): weaker, still
    implied, since a day's instants are that day's."""
    if d.prefix == "eq":  # within: search.low <= low <= high <= search.high
        params.extend([d.low[:10], d.high[:10]])
        return [f"{low} >= %s", f"{low} <= %s"]
    if d.prefix in ("gt", "ge"):  # high > search.high / high >= search.low
        params.append((d.high if d.prefix == "gt" else d.low)[:4] + "-01-01")
        return [f"{low} >= %s"]
    if d.prefix == "lt":  # low < search.low
        return []
    if d.prefix == "le":  # low < search.low, or within
        params.append(d.high[:10])
        return [f"{low} <= %s"]
    return []


def criterion_sql(criterion: Criterion, params: list[Any]) -> str:
    """WHERE conditions on condition_simple/observation_simple for one parameter.

    Only for a WHERE clause (or EXISTS): it may be NULL where it does not hold.
    """
    parts = [counted_sql(criterion.resource_type)]
    alternatives: list[str] = []
    if criterion.kind == "condition-text":
        columns = [folded_column(c) for c in SEARCHED_TEXT[COHORT_VIEWS["Condition"]]]
        for text in criterion.texts:
            # LIKE, not strpos: the same containment, and the trigram index serves it.
            alternatives.append("(" + " OR ".join(f"{c} LIKE %s" for c in columns) + ")")
            params.extend([like_pattern(text)] * len(columns))
    for code in criterion.codes:
        pieces = ["code = %s"]
        params.append(code.code)
        if code.system == "":
            pieces.append("code_system IS NULL")
        elif code.system is not None:
            pieces.append("code_system = %s")
            params.append(code.system)
        if code.comparator in ("eq", "ne"):
            inside = "(value >= %s::numeric AND value < %s::numeric)"
            pieces.append(inside if code.comparator == "eq" else f"NOT {inside}")
            params.extend(code.range)
        elif code.comparator is not None:
            op = {"gt": ">", "lt": "<", "ge": ">=", "le": "<="}
            pieces.append(f"value {op[code.comparator]} %s::numeric")
            params.append(code.value)
        alternatives.append("(" + " AND ".join(pieces) + ")")
    # A WHERE condition only (NULL is false there): no COALESCE, which would hide the
    # alternatives from the (code) and (code_system, code) indexes.
    parts.append("(" + " OR ".join(alternatives) + ")")
    return " AND ".join(parts)


def text_rows_sql(criterion: Criterion, params: list[Any]) -> str:
    """`FROM ... WHERE ...` over the text index (`TEXT_INDEX`, aliases `text_row`: patient_id,
    resource_id) giving the batch rows that meet a condition-text parameter: the counting rows
    with a patient whose folded text or display contains a needle, as `criterion_sql`, whose
    rows these are (the texts matched first, by LIKE: the trigram index serves it)."""
    likes = []
    for text in criterion.texts:
        likes.append("indexed.text LIKE %s")
        params.append(like_pattern(text))
    return (
        f"FROM {TEXT_INDEX.texts} AS indexed JOIN {TEXT_INDEX.rows} AS text_row"
        f" ON text_row.text_id = indexed.id WHERE ({' OR '.join(likes)})"
    )


def view_of(criterion: Criterion) -> str:
    """The batch view a Condition/Observation parameter reads."""
    return OBSERVATIONS_VIEW if criterion.kind == "observation" else CONDITIONS_VIEW
