"""FHIR value rules, one home for both layers and both engines, each with its SQL built here.

- JSON numbers stay exact: a FHIR decimal is a `Decimal` from parsing to output, never a double
  (`loads`, `dumps`, `decimal_text`).
- Dates, dateTimes, instants and times compare as FHIRPath says (N1 §6.1.1, §6.2): component
  by component from the year (the hour for times), a difference decides, a precision one value
  has and the other lacks is unknown (None / SQL NULL); seconds and their fraction are one
  precision compared as a decimal. Values that both carry a UTC offset are compared in UTC
  (`Z` = `+00:00`); a value without an offset compares with one that has it only above the
  hour (a date against a dateTime, by the dateTime's own calendar date), else unknown
  (`compare_temporal`, `temporal_compare_sql`).
- FHIR number search's implied precision: `7` is [6.5, 7.5), `7.0` is [6.95, 7.05)
  (`implied_range`; FHIR R4 search, "number").
- Instants: read to epoch milliseconds (`parse_instant`), written in UTC to the millisecond
  (`format_instant`), the range a date/dateTime/instant covers (`instant_bounds`).
- Partial dates (a year, a month, a day) as the day range they cover (`date_range`,
  `date_range_sql`), and FHIR search's prefixes over ranges (`range_matches`, `range_sql`;
  FHIR R4 search, "prefix": eq is the target range within the search range, gt reaches
  above it, ...).
- Unicode case mapping per code point: default case folding (`fold`, `str.casefold` of each
  character) and FHIRPath's lower()/upper(), with the SQL generated from the same tables so
  PostgreSQL gives exactly the Python string (`case_map_sql`).
- lowBoundary()/highBoundary() of decimals, dates, dateTimes and times (`boundary`,
  `boundary_sql`).
- References: the type, id and version a literal reference or URL names (`split_reference`).
"""

from __future__ import annotations

import calendar
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import set_json_loads

__all__ = [
    "EXACT",
    "JsonError",
    "JsonTooDeep",
    "boundary",
    "boundary_sql",
    "case_map",
    "case_map_sql",
    "compare_temporal",
    "date_range",
    "date_range_sql",
    "datetime_search_range",
    "day_instants",
    "day_instants_sql",
    "decimal_text",
    "dumps",
    "exact_json",
    "fold",
    "format_instant",
    "implied_range",
    "instant_bounds",
    "instant_of_ms",
    "is_temporal_type",
    "last_day",
    "loads",
    "parse_instant",
    "parse_number",
    "range_matches",
    "range_may_match",
    "range_sql",
    "split_reference",
    "temporal_compare_sql",
]

# --------------------------------------------------------------------------- exact JSON

# Arithmetic without rounding for any number PostgreSQL's numeric holds (131,072 digits
# before the point, 16,383 after): the default context would round at 28 digits.
EXACT = Context(prec=150_000, Emax=999_999, Emin=-999_999)


class JsonError(ValueError):
    """Text that is not JSON a FHIR server may send (malformed, NaN/Infinity, lone surrogates)."""


def _no_constant(name: str) -> Any:
    raise JsonError(f"{name} is not a JSON number")


class JsonDecimal(Decimal):
    """A Decimal read from JSON that remembers its source text (`text`, e.g. "1.50E+3"), so a
    body re-serialised by `dumps` carries the number as it was sent, byte for byte. Arithmetic
    on it gives a plain Decimal; equality and hashing are the Decimal's."""

    __slots__ = ("text",)
    text: str


def _json_decimal(text: str) -> JsonDecimal:
    value = JsonDecimal(text)
    value.text = text
    return value


# The C scanner of the standard library with a JsonDecimal for every number that has a fraction
# or an exponent (~2.5 us more than orjson for a 600-byte resource; benchmarks/README.md).
_DECODER = json.JSONDecoder(parse_float=_json_decimal, parse_constant=_no_constant)
_LONE_SURROGATE = re.compile(
    r"[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]"
)


# Nesting the exact parser takes: the standard library's scanner recurses once per level,
# against the interpreter's recursion limit (1,000 frames, the caller's included).
MAX_NESTING = 256


class JsonTooDeep(JsonError):
    """Well-formed JSON nested deeper than MAX_NESTING levels (no FHIR resource is: the gate
    refuses more than 100)."""


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON keeping every number exact: integers as int, others as JsonDecimal (a
    Decimal that keeps its source text for `dumps`).

    Raises JsonError (a ValueError) for malformed JSON (as orjson sees it: deeper than 1,024
    levels is malformed), invalid UTF-8, NaN/Infinity and escaped lone surrogates (which no
    UTF-8 output can hold); JsonTooDeep for well-formed JSON deeper than MAX_NESTING.
    """
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonError(str(exc)) from None
    if text.count("[") + text.count("{") > MAX_NESTING:
        _check_nesting(text)
    try:
        value = _DECODER.decode(text)
    except JsonError:
        raise
    except ValueError as exc:  # JSONDecodeError
        raise JsonError(str(exc)) from None
    except RecursionError:
        raise JsonTooDeep(f"JSON nested deeper than {MAX_NESTING} levels") from None
    if ("\\ud" in text or "\\uD" in text) and _has_lone_surrogate(value):
        raise JsonError("a string holds a lone UTF-16 surrogate escape")
    return value


def _check_nesting(text: str) -> None:
    """JsonError / JsonTooDeep before the recursive parser meets deep nesting (so where the
    line falls does not depend on how deep the caller's stack is)."""
    try:
        shape = orjson.loads(text)  # iterative enough for 1,024 levels; numbers ignored
    except orjson.JSONDecodeError as exc:
        raise JsonError(str(exc)) from None
    level: list[tuple[Any, int]] = [(shape, 1)]
    while level:
        item, depth = level.pop()
        if isinstance(item, dict | list):
            if depth > MAX_NESTING:
                raise JsonTooDeep(f"JSON nested deeper than {MAX_NESTING} levels")
            children = item.values() if isinstance(item, dict) else item
            level.extend((child, depth + 1) for child in children)


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def decimal_text(value: Decimal) -> str:
    """A decimal as JSON and PostgreSQL's numeric print it: plain notation, the scale kept
    ("7.0" stays "7.0", 1E+2 is "100", -0.0 is "0.0"). Raises ValueError for NaN/Infinity."""
    if not value.is_finite():
        raise ValueError(f"{value} is not a FHIR decimal")
    if value.is_zero():
        value = value.copy_abs()
    return format(value, "f")


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # A copy (copy.deepcopy, pickle) of a JsonDecimal is one without its text.
        text = getattr(value, "text", None)
        return orjson.Fragment(text if text is not None else decimal_text(value))
    if isinstance(value, tuple):  # a NamedTuple, which orjson does not take
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _big_ints(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return orjson.Fragment(str(value))
    if isinstance(value, dict):
        return {k: _big_ints(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_big_ints(v) for v in value]
    return value


def _plain_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(decimal_text(value))
    return _default(value)


def dumps(value: Any, option: int | None = None, *, plain_decimals: bool = False) -> bytes:
    """orjson.dumps, with Decimals and integers beyond 64 bits written exactly.

    A decimal read by `loads` is written as its source text ("1.0E+2" stays "1.0E+2": a
    resource body carries the number as it was sent); with `plain_decimals`, and for every
    other Decimal, as `decimal_text` gives it ("100"), the form PostgreSQL's numeric prints,
    which view rows use so that both layers write a number alike.
    """
    default = _plain_default if plain_decimals else _default
    try:
        return orjson.dumps(value, default=default, option=option)
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise
        return orjson.dumps(_big_ints(value), default=default, option=option)


def exact_json(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    """Make `conn` read json/jsonb with exact numbers (psycopg's default gives doubles)."""
    set_json_loads(loads, conn)


def parse_number(text: str) -> Decimal | None:
    """A FHIR search number (`-?digits[.digits][e[+-]digits]`) as a Decimal, else None."""
    if not _NUMBER_RE.fullmatch(text):
        return None
    return Decimal(text)


_NUMBER_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def half_unit(value: Decimal) -> Decimal:
    """Half a unit of the last digit written: 0.5 for 7, 0.05 for 7.0, 50 for 1e2."""
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    return Decimal(5).scaleb(exponent - 1)


def implied_range(value: Decimal) -> tuple[Decimal, Decimal]:
    """[low, high) that a search number covers by its implied precision (FHIR R4 search,
    "number": `100` searches [99.5, 100.5)). `1e2` is [50, 150): one significant digit."""
    half = half_unit(value)
    return EXACT.subtract(value, half), EXACT.add(value, half)


# --------------------------------------------------------------------------- instants


def parse_instant(value: str | None) -> float:
    """A FHIR instant as epoch milliseconds (0.0 when absent or unreadable)."""
    if not value:
        return 0.0
    text = value.strip()
    # fromisoformat takes at most 6 fractional digits; FHIR allows more. Only the digits
    # right after the point are the fraction: the offset's digits follow it.
    if "." in text:
        head, _, rest = text.partition(".")
        tail = rest.lstrip("0123456789")
        digits = rest[: len(rest) - len(tail)]
        text = f"{head}.{digits[:6]}{tail}" if digits else head + tail
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return 0.0
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp() * 1000.0


def instant_of_ms(ms: float) -> datetime:
    """Epoch milliseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000.0, UTC)


def format_instant(value: datetime, *, zulu: bool = True) -> str:
    """A FHIR instant in UTC to the millisecond (a naive value is taken as UTC):
    `2026-11-29T20:13:42.509Z`, or with `zulu=False` `...509+00:00`, as HAPI's REST API
    renders `meta.lastUpdated`."""
    moved = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    text = moved.isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z") if zulu else text


def instant_bounds(text: str) -> tuple[int, int]:
    """The epoch milliseconds [lower, upper) a FHIR date, dateTime or instant covers (a year,
    a month, a day, or the precision the time is written to). Raises ValueError for a value
    that is not one."""
    value = text.strip()
    if len(value) == 4 and value.isdigit():
        start = datetime(int(value), 1, 1, tzinfo=UTC)
        end = datetime(int(value) + 1, 1, 1, tzinfo=UTC)
    elif len(value) == 7:
        year, month = int(value[:4]), int(value[5:7])
        start = datetime(year, month, 1, tzinfo=UTC)
        end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    elif len(value) == 10:
        start = datetime.fromisoformat(value).replace(tzinfo=UTC)
        end = start + timedelta(days=1)
    else:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        start = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        time_part = value[11:]
        if "." in time_part:
            step = timedelta(milliseconds=1)
        elif time_part.count(":") >= 2:
            step = timedelta(seconds=1)
        else:
            step = timedelta(minutes=1)
        end = start + step
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


# --------------------------------------------------------------------------- partial dates

# A FHIR date by its precision: its shape (the whole value; Python `fullmatch`, SQL
# `~ '^...$'`) and what its day range's bounds append to it (None: the month's last day).
_DAY_SHAPE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
PARTIAL_DATE: tuple[tuple[str, str, str | None], ...] = (
    (r"[0-9]{4}", "-01-01", "-12-31"),  # a year
    (r"[0-9]{4}-(?:0[1-9]|1[0-2])", "-01", None),  # a month
    (_DAY_SHAPE, "", ""),  # a day: its own range
)
_PARTIAL_DATE_RE = tuple((re.compile(shape), low, high) for shape, low, high in PARTIAL_DATE)


def last_day(year: int, month: int) -> int:
    """The number of days of that month (Gregorian calendar)."""
    return calendar.monthrange(year, month)[1]


def date_range(text: Any) -> tuple[str, str] | None:
    """The day range [low, high] a FHIR date covers ("1970" is the whole year), as
    YYYY-MM-DD text; None when it is not a date. `date_range_sql` computes the same in SQL."""
    if not isinstance(text, str):
        return None
    for shape, low, high in _PARTIAL_DATE_RE:
        if shape.fullmatch(text):
            end = f"-{last_day(int(text[:4]), int(text[5:7])):02d}" if high is None else high
            return text + low, text + end
    return None


def _month_end_sql(column: str) -> str:
    """SQL text: the last day (DD) of the month a YYYY-MM `column` names."""
    year = f"substr({column}, 1, 4)::int"
    leap = f"(mod({year}, 4) = 0 AND (mod({year}, 100) <> 0 OR mod({year}, 400) = 0))"
    # The month lengths of a common year; February is the leap rule's.
    lengths = {m: last_day(2001, m) for m in range(1, 13)}
    short = " ".join(f"WHEN '{m:02d}' THEN '{n}'" for m, n in lengths.items() if n == 30)
    return (
        f"(CASE substr({column}, 6, 2) WHEN '02' THEN (CASE WHEN {leap} THEN '29' ELSE '28' END)"
        f" {short} ELSE '31' END)"
    )


def date_range_sql(column: str) -> tuple[str, str]:
    """SQL text expressions of `date_range`'s low and high for a text column (NULL when the
    value is not a date), from the same PARTIAL_DATE table."""
    lows: list[str] = []
    highs: list[str] = []
    for shape, low, high in PARTIAL_DATE:
        when = f"WHEN {column} ~ {_lit('^' + shape + '$')} THEN {column}"
        lows.append(f"{when} || {_lit(low)}" if low else when)
        end = (
            f" || '-' || {_month_end_sql(column)}"
            if high is None
            else (f" || {_lit(high)}" if high else "")
        )
        highs.append(when + end)
    return f"(CASE {' '.join(lows)} END)", f"(CASE {' '.join(highs)} END)"


# A dateTime search value (FHIR R4 search, "date": yyyy-mm-ddThh:mm[:ss[.sss]][Z|(+|-)hh:mm]).
_SEARCH_DATETIME_RE = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})T([01][0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9])(\.[0-9]+)?)?"
    r"(Z|[+-](?:0[0-9]|1[0-4]):[0-5][0-9])?"
)
# A day as the instants it covers, in UTC to the millisecond (bounds inclusive).
_DAY_START, _DAY_END = "T00:00:00.000", "T23:59:59.999"


def _instant_text(moment: datetime) -> str:
    m = moment  # strftime's %Y does not pad years before 1000
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
        f".{m.microsecond // 1000:03d}"
    )


def datetime_search_range(text: str) -> tuple[str, str] | None:
    """The instants [low, high] (inclusive, UTC, YYYY-MM-DDThh:mm:ss.sss text) a dateTime
    search value covers at the precision it is written to (a minute, a second, a
    millisecond; finer fractions are read to the millisecond, which FHIR lets a server do).
    Without a zone the value is UTC (FHIR: the server's zone, UTC here). None when `text`
    is no such value; a date part out of the calendar raises ValueError."""
    match = _SEARCH_DATETIME_RE.fullmatch(text)
    if match is None:
        return None
    day, hour, minute, second, fraction, zone = match.groups()
    step = timedelta(minutes=1)
    clock = f"{hour}:{minute}:00"
    if second is not None:
        step = timedelta(seconds=1) if not fraction else timedelta(milliseconds=1)
        clock = f"{hour}:{minute}:{second}" + (fraction[:4].ljust(4, "0") if fraction else "")
    moment = datetime.fromisoformat(f"{day}T{clock}{'+00:00' if zone in (None, 'Z') else zone}")
    try:
        start = moment.astimezone(UTC)
        end = start + step - timedelta(milliseconds=1)
    except OverflowError:
        raise ValueError(f"{text} is outside the years 0001-9999 in UTC") from None
    return _instant_text(start), _instant_text(end)


def day_instants(days: tuple[str, str]) -> tuple[str, str]:
    """A day range (`date_range`) as the instants it covers, comparable with
    `datetime_search_range`'s: a date has no zone, and is read in UTC (the server's)."""
    return days[0] + _DAY_START, days[1] + _DAY_END


def day_instants_sql(low: str, high: str) -> tuple[str, str]:
    """SQL of `day_instants` over day-range bound expressions."""
    return f"({low} || {_lit(_DAY_START)})", f"({high} || {_lit(_DAY_END)})"


# --------------------------------------------------------------------------- search prefixes

# How a target range [low, high] compares with a search range [low, high] (bounds inclusive):
# (the test in Python, in SQL over the target's bounds `{low}`/`{high}` and placeholders for
# the search range's bounds (which: 0 low, 1 high), and whether a part of the target range
# could meet it).
_RangeTest = tuple[
    Callable[[tuple[Any, Any], tuple[Any, Any]], bool],
    str,
    tuple[int, ...],
    Callable[[tuple[Any, Any], tuple[Any, Any]], bool],
]
_RANGE_TESTS: dict[str, _RangeTest] = {
    "within": (
        lambda t, s: t[0] >= s[0] and t[1] <= s[1],
        "({low} >= %s AND {high} <= %s)",
        (0, 1),
        lambda t, s: t[0] <= s[1] and t[1] >= s[0],
    ),
    "above": (lambda t, s: t[1] > s[1], "({high} > %s)", (1,), lambda t, s: t[1] > s[1]),
    "below": (lambda t, s: t[0] < s[0], "({low} < %s)", (0,), lambda t, s: t[0] < s[0]),
    "after": (lambda t, s: t[0] > s[1], "({low} > %s)", (1,), lambda t, s: t[1] > s[1]),
    "before": (lambda t, s: t[1] < s[0], "({high} < %s)", (0,), lambda t, s: t[0] < s[0]),
}
# FHIR R4 search, "prefix" (date and number ranges): a target meets a prefix when one of its
# tests holds (or, negated, none does). `ap` (approximately) is taken as `eq` here.
SEARCH_PREFIXES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "eq": (False, ("within",)),
    "ne": (True, ("within",)),
    "gt": (False, ("above",)),
    "lt": (False, ("below",)),
    "ge": (False, ("above", "within")),
    "le": (False, ("below", "within")),
    "sa": (False, ("after",)),
    "eb": (False, ("before",)),
    "ap": (False, ("within",)),
}


def range_matches(target: tuple[Any, Any], search: tuple[Any, Any], prefix: str) -> bool:
    """Whether the target range [low, high] meets `prefix` against the search range (both
    inclusive, of any ordered values: day texts, epoch milliseconds)."""
    negated, tests = SEARCH_PREFIXES[prefix]
    met = any(_RANGE_TESTS[name][0](target, search) for name in tests)
    return met != negated


def range_may_match(target: tuple[Any, Any], search: tuple[Any, Any], prefix: str) -> bool:
    """Whether some range within the target range could meet `prefix` (a year's range for
    the dates in it): never False for a date that `range_matches`."""
    negated, tests = SEARCH_PREFIXES[prefix]
    return negated or any(_RANGE_TESTS[name][3](target, search) for name in tests)


def range_sql(prefix: str, low: str, high: str, search: tuple[Any, Any], params: list[Any]) -> str:
    """SQL of `range_matches` for the target bounds `low`/`high` (SQL expressions), with `%s`
    placeholders whose values (from `search`) are appended to `params` in order."""
    negated, tests = SEARCH_PREFIXES[prefix]
    parts = []
    for name in tests:
        _, template, bounds, _ = _RANGE_TESTS[name]
        parts.append(template.format(low=low, high=high))
        params.extend(search[b] for b in bounds)
    text = parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"
    return f"NOT {text}" if negated else text


# --------------------------------------------------------------------------- dates and times

TEMPORAL_TYPES = frozenset({"date", "dateTime", "instant", "time"})
# Precisions: year, month, day, hour, minute, second (with its fraction).
_SECOND = 6
_CLOCK = r"(?:[01][0-9]|2[0-3])(?::[0-5][0-9](?::[0-5][0-9](?:\.[0-9]+)?)?)?"
_ZONE = r"(?:Z|[+-](?:0[0-9]|1[0-4]):[0-5][0-9])"
# The shape of a FHIR date/dateTime/instant or a FHIRPath date/dateTime literal (without
# `@`; `2024-01-01T` is a dateTime to the day). No capture groups: PostgreSQL matches such a
# pattern about 7 times faster than one that captures; the parts are then read by position.
DATETIME_SHAPE = (
    r"^[0-9]{4}(?:-(?:0[1-9]|1[0-2])(?:-(?:0[1-9]|[12][0-9]|3[01])"
    f"(?:T(?:{_CLOCK}{_ZONE}?)?)?)?)?$"
)
# A FHIR time or a FHIRPath time literal (`T10:30` without `@`).
TIME_SHAPE = f"^T?{_CLOCK}$"
_DATETIME_RE = re.compile(DATETIME_SHAPE)
_TIME_RE = re.compile(TIME_SHAPE)


def is_temporal_type(type_name: str | None) -> bool:
    """True for the FHIR types compared by the date/time rules."""
    return type_name in TEMPORAL_TYPES


@dataclass(frozen=True)
class _Reading:
    parts: tuple[int | Decimal, ...]  # year..second, as far as the value's precision goes
    zone: int | None  # the UTC offset in minutes, None when the value has none


def _split(text: str, time: bool) -> tuple[list[str | None], str | None]:
    """A well-formed value's parts by position (year, month, day, hour, minute, seconds) and
    its zone; `temporal_compare_sql` reads them the same way."""
    if time:
        date: list[str | None] = [None, None, None]
        clock, zone = (text[1:] if text.startswith("T") else text), None
    else:
        date = [
            text[0:4],
            text[5:7] if len(text) >= 7 else None,
            text[8:10] if len(text) >= 10 else None,
        ]
        rest = text[11:] if len(text) > 11 else ""
        if rest.endswith("Z"):
            zone = "Z"
        elif len(rest) >= 6 and rest[-6] in "+-":
            zone = rest[-6:]
        else:
            zone = None
        clock = rest[: len(rest) - len(zone)] if zone else rest
    times = [
        clock[0:2] if len(clock) >= 2 else None,
        clock[3:5] if len(clock) >= 5 else None,
        clock[6:] if len(clock) >= 8 else None,
    ]
    return date + times, zone


def has_temporal_shape(text: str, time: bool = False) -> bool:
    """Whether `text` is written as a FHIR date/dateTime/instant (or, when `time`, a time):
    DATETIME_SHAPE / TIME_SHAPE. The shape only: a day past its month's end still passes."""
    return (_TIME_RE if time else _DATETIME_RE).fullmatch(text) is not None


def _read(text: str, time: bool) -> _Reading | None:
    if not has_temporal_shape(text, time):
        return None
    fields, zone = _split(text, time)
    year, month, day = fields[0], fields[1], fields[2]
    if day is not None and int(day) > calendar.monthrange(int(year or 0), int(month or 0))[1]:
        return None
    parts: list[int | Decimal] = []
    for n, g in enumerate(fields):
        if g is None:
            continue
        parts.append(Decimal(g) if n == 5 else int(g))
    offset = None
    if zone is not None:
        offset = 0 if zone == "Z" else int(zone[0] + "1") * (int(zone[1:3]) * 60 + int(zone[4:6]))
    return _Reading(tuple(parts), offset)


def _in_utc(reading: _Reading) -> tuple[int | Decimal, ...] | None:
    """The value's parts moved to UTC (precision kept), or None when that cannot be said."""
    parts, offset = reading.parts, reading.zone
    assert offset is not None and len(parts) >= 4
    if len(parts) == 4 and offset % 60:
        return None  # an hour shifted by a part of an hour has no hour precision left
    start = datetime(int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]))
    if len(parts) > 4:
        start += timedelta(minutes=int(parts[4]))
    try:
        moved = start - timedelta(minutes=offset)
    except OverflowError:
        return None
    if not 1 <= moved.year <= 9999:
        return None
    shifted: tuple[int | Decimal, ...] = (
        moved.year,
        moved.month,
        moved.day,
        moved.hour,
        moved.minute,
    )
    return shifted[: len(parts)] + parts[5:]


def compare_temporal(left: str, right: str, time: bool = False) -> int | None:
    """-1, 0 or 1 as FHIRPath orders two dates/dateTimes (or two times when `time`);
    None when unknown (different precisions that agree as far as both go, an offset on one
    side only above the hour, or a value that is not a date/time)."""
    a, b = _read(left, time), _read(right, time)
    if a is None or b is None:
        return None
    pa, pb = a.parts, b.parts
    if a.zone is not None and b.zone is not None:
        ua, ub = _in_utc(a), _in_utc(b)
        if ua is None or ub is None:
            return None
        pa, pb = ua, ub
    elif (a.zone is None) != (b.zone is None) and len(pa) > 3 and len(pb) > 3:
        return None
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            return -1 if x < y else 1
    return 0 if len(pa) == len(pb) else None


def _fields_sql(x: str, clock: str, time: bool) -> list[str]:
    """SQL of `_split`'s parts (text or NULL) of value `x` whose clock part is `clock`."""
    date = (
        ["NULL", "NULL", "NULL"]
        if time
        else [
            f"substr({x}, 1, 4)",
            f"CASE WHEN length({x}) >= 7 THEN substr({x}, 6, 2) END",
            f"CASE WHEN length({x}) >= 10 THEN substr({x}, 9, 2) END",
        ]
    )
    return [
        *date,
        f"CASE WHEN length({clock}) >= 2 THEN substr({clock}, 1, 2) END",
        f"CASE WHEN length({clock}) >= 5 THEN substr({clock}, 4, 2) END",
        f"CASE WHEN length({clock}) >= 8 THEN substr({clock}, 7) END",
    ]


def temporal_compare_sql(left: str, right: str, time: bool = False) -> str:
    """SQL (integer -1/0/1 or NULL) giving `compare_temporal` of two SQL text expressions.

    Each value becomes (precision, key, seconds): the key is its parts to the minute as
    fixed-width text ("YYYY-MM-DDTHH:MI", moved to UTC when both have an offset), so comparing
    the first characters of two keys compares the parts in order; the seconds (with their
    fraction) compare as a decimal. Every step is a subquery of its own (OFFSET 0): pulled
    up into one expression, PostgreSQL would compute each part again at every use.
    """
    shape = sql.Literal(TIME_SHAPE if time else DATETIME_SHAPE).as_string(None)

    def rest(x: str) -> str:
        if time:
            return f"CASE WHEN left({x}, 1) = 'T' THEN substr({x}, 2) ELSE {x} END"
        return f"CASE WHEN length({x}) > 11 THEN substr({x}, 12) ELSE '' END"

    def zone(r: str) -> str:
        if time:
            return "NULL::text"
        return (
            f"CASE WHEN right({r}, 1) = 'Z' THEN 'Z' WHEN length({r}) >= 6"
            f" AND substr({r}, length({r}) - 5, 1) IN ('+', '-') THEN right({r}, 6) END"
        )

    fa = _fields_sql("t.a", "c.ca", time)
    fb = _fields_sql("t.b", "c.cb", time)
    parts = ", ".join(
        [*(f"{f} AS a{n}" for n, f in enumerate(fa)), *(f"{f} AS b{n}" for n, f in enumerate(fb))]
    )
    if time:
        groups, widths = 3, "(ARRAY[2, 5, 5])"
        precision = "3 - num_nulls(f.{x}4, f.{x}5)"
        clock_key = "f.{x}3 || ':' || COALESCE(f.{x}4, '00')"
        key_a, key_b = clock_key.format(x="a"), clock_key.format(x="b")
        checks = "TRUE"
        moved = ""
    else:
        groups, widths = _SECOND, "(ARRAY[4, 7, 10, 13, 16, 16])"
        precision = "6 - num_nulls(f.{x}1, f.{x}2, f.{x}3, f.{x}4, f.{x}5)"

        def valid_day(x: str) -> str:
            return (
                f"(f.{x}2 IS NULL OR f.{x}2 < '29' OR f.{x}2::int <= extract(day from"
                f" make_date(f.{x}0::int, f.{x}1::int, 1) + interval '1 month - 1 day'))"
            )

        # An offset on one side only, both above the day: unknown.
        checks = (
            f"{valid_day('a')} AND {valid_day('b')} AND NOT ((z.za IS NULL) <> (z.zb IS NULL)"
            " AND f.a3 IS NOT NULL AND f.b3 IS NOT NULL)"
        )

        def utc(x: str) -> str:
            return (
                f"(f.{x}0 || '-' || f.{x}1 || '-' || f.{x}2 || ' ' || f.{x}3 || ':'"
                f" || COALESCE(f.{x}4, '00') || z.z{x})::timestamptz AT TIME ZONE 'UTC'"
            )

        both = "z.za IS NOT NULL AND z.zb IS NOT NULL"
        moved = (
            f" CROSS JOIN LATERAL (SELECT CASE WHEN {both} THEN {utc('a')} END AS ta,"
            f" CASE WHEN {both} THEN {utc('b')} END AS tb OFFSET 0) AS u"
        )

        def key(x: str) -> str:
            written = (
                f"f.{x}0 || '-' || COALESCE(f.{x}1, '01') || '-' || COALESCE(f.{x}2, '01')"
                f" || 'T' || COALESCE(f.{x}3, '00') || ':' || COALESCE(f.{x}4, '00')"
            )
            # An hour moved by part of an hour has no hour left to compare; years stay 1-9999.
            in_utc = (
                f"CASE WHEN f.{x}4 IS NULL AND z.z{x} <> 'Z' AND substr(z.z{x}, 5, 2) <> '00'"
                f" THEN NULL WHEN u.t{x} < '0001-01-01' OR u.t{x} >= '10000-01-01' THEN NULL"
                f" ELSE to_char(u.t{x}, 'YYYY-MM-DD\"T\"HH24:MI') END"
            )
            return f"CASE WHEN {both} THEN {in_utc} ELSE {written} END"

        key_a, key_b = key("a"), key("b")
    n = f"{widths}[least(k.pa, k.pb)]"
    return (
        "(SELECT CASE WHEN k.ka IS NULL OR k.kb IS NULL THEN NULL"
        f" WHEN left(k.ka, {n}) <> left(k.kb, {n})"
        f' THEN (CASE WHEN left(k.ka, {n}) COLLATE "C" < left(k.kb, {n}) THEN -1 ELSE 1 END)'
        f" WHEN least(k.pa, k.pb) = {groups} AND f.a5::numeric <> f.b5::numeric"
        " THEN (CASE WHEN f.a5::numeric < f.b5::numeric THEN -1 ELSE 1 END)"
        " WHEN k.pa = k.pb THEN 0 END"
        f" FROM (SELECT ({left})::text AS a, ({right})::text AS b OFFSET 0) AS t"
        f" CROSS JOIN LATERAL (SELECT {rest('t.a')} AS ra, {rest('t.b')} AS rb"
        f" WHERE t.a ~ {shape} AND t.b ~ {shape} OFFSET 0) AS s"
        f" CROSS JOIN LATERAL (SELECT {zone('s.ra')} AS za, {zone('s.rb')} AS zb OFFSET 0) AS z"
        " CROSS JOIN LATERAL (SELECT left(s.ra, length(s.ra) - COALESCE(length(z.za), 0)) AS ca,"
        " left(s.rb, length(s.rb) - COALESCE(length(z.zb), 0)) AS cb OFFSET 0) AS c"
        f" CROSS JOIN LATERAL (SELECT {parts} OFFSET 0) AS f"
        f"{moved}"
        f" CROSS JOIN LATERAL (SELECT {precision.format(x='a')} AS pa,"
        f" {precision.format(x='b')} AS pb, {key_a} AS ka, {key_b} AS kb"
        f" WHERE {checks} OFFSET 0) AS k)"
    )


# --------------------------------------------------------------------------- boundaries


def _decimal_boundary(value: Decimal, high: bool) -> Decimal:
    half = half_unit(value) if value.as_tuple().exponent < 0 else Decimal("0.5")  # type: ignore[operator]
    return EXACT.add(value, half) if high else EXACT.subtract(value, half)


_BOUNDARY_DATE_RE = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2}))?)?"
    r"(?:T(?P<time>[0-9:.]*)(?P<tz>Z|[+-]\d{2}:\d{2})?)?$"
)
_BOUNDARY_TIME_RE = re.compile(
    r"^(?P<h>\d{2})(?::(?P<m>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d+))?)?)?$"
)
_SQL_BOUNDARY_DATE = r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T([0-9:.]*)(Z|[+-]\d{2}:\d{2})?)?$"
_SQL_BOUNDARY_TIME = r"^(\d{2})(?::(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?$"


def _time_boundary(text: str, high: bool) -> str | None:
    match = _BOUNDARY_TIME_RE.match(text)
    if not match:
        return None
    fill = "59" if high else "00"
    frac = (match["f"] or "")[:3].ljust(3, "9" if high else "0")
    return f"{match['h']}:{match['m'] or fill}:{match['s'] or fill}.{frac}"


def _date_boundary(text: str, high: bool, with_time: bool) -> str | None:
    match = _BOUNDARY_DATE_RE.match(text)
    if not match:
        return None
    year = int(match["year"])
    month = int(match["month"] or (12 if high else 1))
    if not 1 <= month <= 12:
        return None
    day = int(match["day"] or (calendar.monthrange(year, month)[1] if high else 1))
    date = f"{year:04d}-{month:02d}-{day:02d}"
    if not with_time:
        return date
    time = _time_boundary(match["time"] or ("23" if high else "00"), high)
    if time is None:
        return None
    # Without a zone the instant could be in any zone: the extremes are +14:00 / -12:00.
    tz = match["tz"] or ("-12:00" if high else "+14:00")
    return f"{date}T{time}{tz}"


def boundary(value: Any, kind: str | None, high: bool) -> Any:
    """lowBoundary()/highBoundary() of one value (`kind`: its static FHIR type, or None to
    decide from the value: a number, a time `hh:mm...`, else a dateTime). None if it has none."""
    kind = {"integer": "decimal", "instant": "dateTime"}.get(kind or "", kind)
    number = isinstance(value, int | Decimal) and not isinstance(value, bool)
    if kind == "decimal" or (kind not in ("date", "dateTime", "time") and number):
        return _decimal_boundary(Decimal(value), high) if number else None
    if not isinstance(value, str):
        return None
    if kind == "time" or (kind not in ("date", "dateTime") and _BOUNDARY_TIME_RE.match(value)):
        return _time_boundary(value, high)
    if kind == "date":
        return _date_boundary(value, high, with_time=False)
    return _date_boundary(value, high, with_time=True)


def _lit(value: str) -> str:
    return sql.Literal(value).as_string(None)


def _time_boundary_sql(text: str, high: bool) -> str:
    fill, digit = ("59", "9") if high else ("00", "0")
    t = f"regexp_match({text}, {_lit(_SQL_BOUNDARY_TIME)})"
    return (
        f"(SELECT m[1] || ':' || COALESCE(m[2], '{fill}') || ':' || COALESCE(m[3], '{fill}')"
        f" || '.' || rpad(left(COALESCE(m[4], ''), 3), 3, '{digit}') FROM (SELECT {t} AS m) AS t)"
    )


def _date_boundary_sql(text: str, high: bool, with_time: bool) -> str:
    month = "COALESCE(m[2], '12')" if high else "COALESCE(m[2], '01')"
    last_day = (
        f"to_char(make_date(m[1]::integer, {month}::integer, 1)"
        " + interval '1 month' - interval '1 day', 'DD')"
    )
    day = f"COALESCE(m[3], {last_day})" if high else "COALESCE(m[3], '01')"
    date = f"m[1] || '-' || {month} || '-' || {day}"
    if with_time:
        clock = _time_boundary_sql(f"COALESCE(NULLIF(m[4], ''), '{'23' if high else '00'}')", high)
        zone = f"COALESCE(m[5], '{'-12:00' if high else '+14:00'}')"
        date = f"{date} || 'T' || {clock} || {zone}"
    return (
        f"(SELECT CASE WHEN {month}::integer BETWEEN 1 AND 12 THEN {date} END"
        f" FROM (SELECT regexp_match({text}, {_lit(_SQL_BOUNDARY_DATE)}) AS m) AS d)"
    )


def boundary_sql(element: str, kind: str | None, high: bool) -> str:
    """SQL (jsonb or NULL) giving `boundary` of one jsonb element."""
    text = f"({element} #>> '{{}}')"
    number = f"({element})::numeric"
    # Exactly half a unit of the last digit, at one more digit (1.0 -> 0.95, 7 -> 6.5).
    decimal = (
        f"to_jsonb(round({number} {'+' if high else '-'} 0.5 * power(10::numeric,"
        f" -scale({number})), scale({number}) + 1))"
    )
    options = {
        "decimal": decimal,
        "date": f"to_jsonb({_date_boundary_sql(text, high, with_time=False)})",
        "dateTime": f"to_jsonb({_date_boundary_sql(text, high, with_time=True)})",
        "time": f"to_jsonb({_time_boundary_sql(text, high)})",
    }
    kind = {"integer": "decimal", "instant": "dateTime"}.get(kind or "", kind)
    by_value = {
        "decimal": f"(CASE WHEN jsonb_typeof({element}) = 'number' THEN {decimal} END)",
        "date": f"(CASE WHEN jsonb_typeof({element}) = 'string' THEN {options['date']} END)",
        "dateTime": (
            f"(CASE WHEN jsonb_typeof({element}) = 'string' THEN {options['dateTime']} END)"
        ),
        "time": f"(CASE WHEN jsonb_typeof({element}) = 'string' THEN {options['time']} END)",
    }
    if kind in by_value:
        return by_value[kind]
    return (
        f"(CASE WHEN jsonb_typeof({element}) = 'number' THEN {decimal}"
        f" WHEN jsonb_typeof({element}) <> 'string' THEN NULL"
        f" WHEN {text} ~ {_lit(_SQL_BOUNDARY_TIME)} THEN {options['time']}"
        f" ELSE {options['dateTime']} END)"
    )


# --------------------------------------------------------------------------- case mapping

CaseKind = Literal["fold", "lower", "upper"]
_MAPPERS: dict[str, Callable[[str], str]] = {
    "fold": str.casefold,
    "lower": str.lower,
    "upper": str.upper,
}


@lru_cache(maxsize=3)
def _table(kind: CaseKind) -> Mapping[int, str]:
    """Code point -> its mapping, for every code point the mapping changes."""
    mapper = _MAPPERS[kind]
    table: dict[int, str] = {}
    for cp in range(1, 0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        char = chr(cp)
        mapped = mapper(char)
        if mapped != char:
            table[cp] = mapped
    return table


def case_map(text: str, kind: CaseKind) -> str:
    """`text` with each code point mapped on its own (no context rules, so a final sigma is
    folded like any other): the same string `case_map_sql` gives in PostgreSQL."""
    return text.translate(_table(kind))


def fold(text: str) -> str:
    """Unicode default case folding (full, per code point): "ΔΙΑΒΗΤΗΣ" and "διαβητης" fold
    to the same string, "Straße" to "strasse". What condition-text compares, in both layers."""
    return text.translate(_table("fold"))


@lru_cache(maxsize=3)
def _sql_parts(kind: CaseKind) -> tuple[str, str, str, str, tuple[tuple[str, str], ...]]:
    table = _table(kind)
    single = {cp: m for cp, m in table.items() if len(m) == 1}
    ascii_from = "".join(chr(cp) for cp in sorted(single) if cp < 128)
    ascii_to = "".join(single[cp] for cp in sorted(single) if cp < 128)
    all_from = "".join(chr(cp) for cp in sorted(single))
    all_to = "".join(single[cp] for cp in sorted(single))
    multi = tuple((chr(cp), m) for cp, m in sorted(table.items()) if len(m) > 1)
    return ascii_from, ascii_to, all_from, all_to, multi


def case_map_sql(text_sql: str, kind: CaseKind) -> str:
    """SQL text giving `case_map(text, kind)` of a SQL text expression (NULL stays NULL).

    translate() maps the code points that map to one code point, replace() the ~100 that map
    to several; ASCII text (most of it) takes a 26-letter translate only.
    """
    ascii_from, ascii_to, all_from, all_to, multi = _sql_parts(kind)
    full = f"translate(s.t, {_lit(all_from)}, {_lit(all_to)})"
    for source, target in multi:
        full = f"replace({full}, {_lit(source)}, {_lit(target)})"
    return (
        f"(SELECT CASE WHEN octet_length(s.t) = length(s.t)"
        f" THEN translate(s.t, {_lit(ascii_from)}, {_lit(ascii_to)}) ELSE {full} END"
        f" FROM (SELECT ({text_sql})::text AS t) AS s)"
    )


# --------------------------------------------------------------------------- references


def split_reference(url: str | None) -> tuple[str | None, str | None, str | None]:
    """(type, id, version) from `.../Type/id` or `.../Type/id/_history/N`."""
    if not url:
        return None, None, None
    parts = [p for p in urlsplit(url).path.split("/") if p]
    version = None
    if len(parts) >= 2 and parts[-2] == "_history":
        version = parts[-1]
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2], parts[-1], version
    return None, None, version
