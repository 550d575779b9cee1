"""An independent reference for view rows and /cohort, written from the definitions alone.

Nothing here comes from `core/`, `receiver/`, `serving/` or `subscriptions/`: it reads FHIR JSON
the way FHIR's JSON format and the specifications define it, so a shared bug cannot hide in both.

- View rows: the SQL-on-FHIR v2 Processing Algorithm (ViewDefinition notes, "Process(S, N)"),
  over expression trees built by the tests (`Expr` subclasses render themselves as FHIRPath
  text for the engines and evaluate themselves here) with FHIRPath N1 semantics: empty
  propagation, three-valued logic, singleton evaluation, date/time comparison by precision
  (§6.1.1, §6.2). Policies the spec leaves open are the contract's: values that both carry
  a UTC offset compare in UTC; an offset on one side only is unknown at hour precision and
  above (a date against a dateTime compares the dateTime's written date). A primitive
  element is a node, its value and its `_name` object (FHIR JSON, "Representing primitive
  elements"): one with only extensions (`_birthDate` without `birthDate`) exists, has
  extensions on every path (`name.given.first().extension(...)`), and no value.
- /cohort: the contract's Query API section (../shared/interfaces.md) over the newest
  version of every resource: FHIR date ranges, number search with implied precision,
  condition-text by Unicode default case folding (`str.casefold`).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

Json = Any


class OracleError(Exception):
    """The specification says this evaluation is an error."""


# --------------------------------------------------------------------------- FHIR JSON


def element_values(item: Json, name: str) -> list[Json]:
    """FHIR JSON member access: the element's values, arrays flattened; a value-less entry
    (null, kept only to line up with an `_name` array) is no value."""
    if not isinstance(item, dict):
        return []
    value = item.get(name)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if v is not None]


@dataclass(frozen=True)
class Node:
    """A primitive element that has its `_name` object: its value (None: none) and that
    object. One without an `_name` object is just its value."""

    value: Json
    element: dict[str, Json]


def element_nodes(item: Json, name: str) -> list[Json]:
    """FHIR JSON member access that keeps primitive elements whole: `name` and `_name` line
    up by position; an entry with an `_name` object is a Node (with or without a value)."""
    if not isinstance(item, dict):
        return []
    objects = item.get("_" + name)
    if objects is None:
        return element_values(item, name)
    value = item.get(name)
    found = [] if value is None else value if isinstance(value, list) else [value]
    beside = objects if isinstance(objects, list) else [objects]
    out: list[Json] = []
    for n in range(max(len(found), len(beside))):
        v = found[n] if n < len(found) else None
        e = beside[n] if n < len(beside) else None
        if isinstance(e, dict):
            out.append(Node(v, e))
        elif v is not None:
            out.append(v)
    return out


def values(items: list[Json]) -> list[Json]:
    """What items are as values: a Node's value (a Node without one is no value)."""
    return [
        i.value if isinstance(i, Node) else i
        for i in items
        if not isinstance(i, Node) or i.value is not None
    ]


def primitive_elements(item: Json, name: str) -> list[Json]:
    """The `_name` objects (id, extension) of a primitive element, for FHIRPath's
    `name.extension` (FHIR JSON: "Representing primitive elements")."""
    if not isinstance(item, dict):
        return []
    value = item.get("_" + name)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, dict)]


def is_number(value: Json) -> bool:
    return isinstance(value, int | Decimal) and not isinstance(value, bool)


# --------------------------------------------------------------------------- dates

_DATE_TIME = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2})(?::(\d{2})(?::(\d{2}(?:\.\d+)?))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?"
)


def read_date(text: str) -> tuple[list[Any], int | None] | None:
    """(parts year..seconds as far as written, UTC offset in minutes or None)."""
    m = _DATE_TIME.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second, zone = m.groups()
    parts: list[Any] = [int(year)]
    for value in (month, day, hour, minute):
        if value is None:
            break
        parts.append(int(value))
    if len(parts) == 5 and second is not None:
        parts.append(Decimal(second))
    if len(parts) >= 2 and not 1 <= parts[1] <= 12:
        return None
    if len(parts) >= 3 and not 1 <= parts[2] <= calendar.monthrange(parts[0], parts[1])[1]:
        return None
    offset = None
    if zone == "Z":
        offset = 0
    elif zone is not None:
        sign = -1 if zone[0] == "-" else 1
        offset = sign * (int(zone[1:3]) * 60 + int(zone[4:6]))
    return parts, offset


def _to_utc(parts: list[Any], offset: int) -> list[Any] | None:
    if len(parts) == 4 and offset % 60:
        return None
    moment = datetime(parts[0], parts[1], parts[2], parts[3], parts[4] if len(parts) > 4 else 0)
    moment -= timedelta(minutes=offset)
    fields = [moment.year, moment.month, moment.day, moment.hour, moment.minute]
    return fields[: min(len(parts), 5)] + parts[5:]


def date_order(a: str, b: str) -> int | None:
    """FHIRPath's comparison of two dates/dateTimes: -1, 0, 1, or None when unknown."""
    ra, rb = read_date(a), read_date(b)
    if ra is None or rb is None:
        return None
    (pa, za), (pb, zb) = ra, rb
    if za is not None and zb is not None:
        ua, ub = _to_utc(pa, za), _to_utc(pb, zb)
        if ua is None or ub is None:
            return None
        pa, pb = ua, ub
    elif (za is None) != (zb is None) and len(pa) >= 4 and len(pb) >= 4:
        return None
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            return -1 if x < y else 1
    return 0 if len(pa) == len(pb) else None


# --------------------------------------------------------------------------- expressions


@dataclass
class Env:
    resource: Json
    row_index: int = 0
    constants: dict[str, Json] = field(default_factory=dict)


class Expr:
    """An expression the tests generate: FHIRPath text for the engines, a value here."""

    type: str | None = None  # the FHIR type of its values, when the tests know it

    def text(self) -> str:
        raise NotImplementedError

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        raise NotImplementedError


def _string_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Literal(Expr):
    value: Json
    type: str | None = None

    def text(self) -> str:
        if isinstance(self.value, bool):
            return "true" if self.value else "false"
        if self.type in ("date", "dateTime", "instant"):
            return "@" + self.value
        if isinstance(self.value, str):
            return _string_literal(self.value)
        return format(self.value, "f") if isinstance(self.value, Decimal) else str(self.value)

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        return [self.value]


@dataclass
class Constant(Expr):
    name: str
    type: str | None = None

    def text(self) -> str:
        return "%" + self.name

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        return [env.constants[self.name]]


@dataclass
class This(Expr):
    type: str | None = None

    def text(self) -> str:
        return "$this"

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        return list(focus)


@dataclass
class Empty(Expr):
    type: str | None = None

    def text(self) -> str:
        return "{}"

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        return []


@dataclass
class RowIndex(Expr):
    type: str | None = "integer"

    def text(self) -> str:
        return "%rowIndex"

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        return [env.row_index]


@dataclass
class Step:
    """One member step: `name`, or a choice element read as `name.ofType(T)` (the JSON key
    nameT) or as `name` (every nameX key); `element` reads the primitive's `_name`."""

    name: str
    of_type: str | None = None
    choices: tuple[str, ...] = ()
    element: bool = False

    def text(self) -> str:
        if self.of_type is not None:
            return f"{self.name}.ofType({self.of_type})"
        return self.name

    def apply(self, items: list[Json]) -> list[Json]:
        out: list[Json] = []
        for item in items:
            if self.element:
                out.extend(primitive_elements(item, self.name))
            elif self.of_type is not None:
                out.extend(
                    element_nodes(item, self.name + self.of_type[0].upper() + self.of_type[1:])
                )
            elif self.choices:
                for suffix in self.choices:
                    out.extend(element_values(item, self.name + suffix))
            else:
                out.extend(element_nodes(item, self.name))
        return out


@dataclass
class Path(Expr):
    """Member steps from the focus; `extension_url` filters extension steps by url."""

    steps: tuple[Step, ...]
    type: str | None = None

    def text(self) -> str:
        return ".".join(s.text() for s in self.steps)

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        items = focus
        for step in self.steps:
            items = step.apply(items)
        return items


@dataclass
class Extension(Expr):
    """`base.extension('url')` (base a primitive element, a node, or any element)."""

    base: Expr
    url: str
    type: str | None = "Extension"

    def text(self) -> str:
        call = f"extension({_string_literal(self.url)})"
        if isinstance(self.base, Path) and not self.base.steps:
            return call
        return f"{self.base.text()}.{call}"

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        owners = self.base.evaluate(focus, env)
        out: list[Json] = []
        for owner in owners:
            if isinstance(owner, Node):
                owner = owner.element
            for ext in element_values(owner, "extension"):
                if isinstance(ext, dict) and ext.get("url") == self.url:
                    out.append(ext)
        return out


@dataclass
class Then(Expr):
    """`first.rest`: member steps after another expression."""

    first: Expr
    rest: Path
    type: str | None = None

    def text(self) -> str:
        return f"{self.first.text()}.{self.rest.text()}"

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        return self.rest.evaluate(self.first.evaluate(focus, env), env)


def singleton_boolean(values: list[Json]) -> bool | None:
    """FHIRPath N1 §4.5: empty is empty, one boolean is itself, one other item true."""
    if not values:
        return None
    if len(values) > 1:
        raise OracleError("a boolean context got several values")
    return values[0] is not False


@dataclass
class Function(Expr):
    base: Expr
    name: str  # first, last, count, exists, empty, not, join, where, getResourceKey
    argument: Expr | str | None = None
    type: str | None = None

    def text(self) -> str:
        # A function of the focus itself (an empty base path): `getResourceKey()`.
        base = f"{self.base.text()}." if self.base.text() else ""
        if self.name == "join":
            return f"{base}join({_string_literal(str(self.argument))})"
        if isinstance(self.argument, Expr):
            return f"{base}{self.name}({self.argument.text()})"
        return f"{base}{self.name}()"

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        items = self.base.evaluate(focus, env)
        if self.name == "first":
            return items[:1]
        if self.name == "last":
            return items[-1:]
        if self.name == "count":
            return [len(items)]
        if self.name == "empty":
            return [not items]
        if self.name == "getResourceKey":
            return [i["id"] for i in items if isinstance(i, dict) and "id" in i]
        if self.name == "not":
            value = singleton_boolean(values(items))
            return [] if value is None else [not value]
        if self.name == "join":
            return [str(self.argument).join(values(items))]
        assert isinstance(self.argument, Expr)
        kept = [
            i for i in items if singleton_boolean(values(self.argument.evaluate([i], env))) is True
        ]
        if self.name == "where":
            return kept
        return [bool(kept)]  # exists(criterion)


@dataclass
class Index(Expr):
    """`base[n]`: the item at position n, if there is one."""

    base: Expr
    n: int
    type: str | None = None

    def text(self) -> str:
        return f"{self.base.text()}[{self.n}]"

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        return self.base.evaluate(focus, env)[self.n : self.n + 1]


@dataclass
class Exists(Expr):
    base: Expr
    type: str | None = "boolean"

    def text(self) -> str:
        return f"{self.base.text()}.exists()"

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        return [bool(self.base.evaluate(focus, env))]


TEMPORAL = ("date", "dateTime", "instant")


@dataclass
class Compare(Expr):
    op: str  # = != < > <= >=
    left: Expr
    right: Expr
    type: str | None = "boolean"

    def text(self) -> str:
        return f"({self.left.text()}) {self.op} ({self.right.text()})"

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        a, b = values(self.left.evaluate(focus, env)), values(self.right.evaluate(focus, env))
        if not a or not b:
            return []
        dates = self.left.type in TEMPORAL or self.right.type in TEMPORAL
        if self.op in ("=", "!="):
            if len(a) != len(b):
                result: bool | None = False
            else:
                result = True
                for x, y in zip(a, b, strict=True):
                    same = _same(x, y, dates)
                    if same is False:
                        result = False
                        break
                    if same is None:
                        result = None
            if result is None:
                return []
            return [result if self.op == "=" else not result]
        if len(a) > 1 or len(b) > 1:
            raise OracleError("a comparison needs one value on each side")
        x, y = a[0], b[0]
        if dates and isinstance(x, str) and isinstance(y, str):
            order = date_order(x, y)
        elif (is_number(x) and is_number(y)) or (isinstance(x, str) and isinstance(y, str)):
            order = (x > y) - (x < y)
        else:
            order = None
        if order is None:
            return []
        return [{"<": order < 0, ">": order > 0, "<=": order <= 0, ">=": order >= 0}[self.op]]


def _same(x: Json, y: Json, dates: bool) -> bool | None:
    if dates and isinstance(x, str) and isinstance(y, str):
        order = date_order(x, y)
        return None if order is None else order == 0
    if isinstance(x, bool) or isinstance(y, bool):
        return x is y
    if is_number(x) and is_number(y):
        return bool(x == y)
    if type(x) is not type(y):
        return False
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k], False) for k in x)
    if isinstance(x, list):
        return len(x) == len(y) and all(_same(p, q, False) for p, q in zip(x, y, strict=True))
    return bool(x == y)


@dataclass
class Logic(Expr):
    op: str  # and, or
    left: Expr
    right: Expr
    type: str | None = "boolean"

    def text(self) -> str:
        return f"({self.left.text()}) {self.op} ({self.right.text()})"

    def evaluate(self, focus: list[Json], env: Env) -> list[Json]:
        a = singleton_boolean(values(self.left.evaluate(focus, env)))
        b = singleton_boolean(values(self.right.evaluate(focus, env)))
        if self.op == "and":
            if a is False or b is False:
                return [False]
            return [] if a is None or b is None else [True]
        if a is True or b is True:
            return [True]
        return [] if a is None or b is None else [False]


# --------------------------------------------------------------------------- views


@dataclass
class Column:
    name: str
    path: Expr
    type: str | None = None
    collection: bool = False

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "path": self.path.text()}
        if self.type is not None:
            out["type"] = self.type
        if self.collection:
            out["collection"] = True
        return out


@dataclass
class Select:
    column: list[Column] = field(default_factory=list)
    select: list[Select] = field(default_factory=list)
    union_all: list[Select] = field(default_factory=list)
    for_each: Expr | None = None
    for_each_or_null: Expr | None = None
    repeat: list[Expr] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.for_each is not None:
            out["forEach"] = self.for_each.text()
        if self.for_each_or_null is not None:
            out["forEachOrNull"] = self.for_each_or_null.text()
        if self.repeat:
            out["repeat"] = [r.text() for r in self.repeat]
        if self.column:
            out["column"] = [c.json() for c in self.column]
        if self.select:
            out["select"] = [s.json() for s in self.select]
        if self.union_all:
            out["unionAll"] = [s.json() for s in self.union_all]
        return out

    def all_columns(self) -> Iterator[Column]:
        """ValidateColumns(S): own columns, then the selects', then the first branch's."""
        yield from self.column
        for sub in self.select:
            yield from sub.all_columns()
        if self.union_all:
            yield from self.union_all[0].all_columns()


@dataclass
class View:
    resource: str
    select: list[Select]
    where: list[Expr] = field(default_factory=list)
    constants: list[tuple[str, str, Json]] = field(default_factory=list)  # name, type, value

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "resourceType": "ViewDefinition",
            "resource": self.resource,
            "status": "active",
            "select": [s.json() for s in self.select],
        }
        if self.where:
            out["where"] = [{"path": w.text()} for w in self.where]
        if self.constants:
            out["constant"] = [
                {"name": n, "value" + t[0].upper() + t[1:]: v} for n, t, v in self.constants
            ]
        return out

    def rows(self, resource: Json) -> list[dict[str, Json]]:
        """Process a Resource: its rows, or OracleError where the spec raises."""
        if resource.get("resourceType") != self.resource:
            return []
        env = Env(resource, 0, {n: v for n, _, v in self.constants})
        for where in self.where:
            result = values(where.evaluate([resource], env))
            if result not in ([], [True], [False]):
                raise OracleError("a where clause gave no boolean")
            if result != [True]:
                return []
        return process(Select(select=self.select), resource, env)


def process(sel: Select, node: Json, env: Env) -> list[dict[str, Json]]:
    """Process(S, N) of the SQL-on-FHIR v2 Processing Algorithm."""
    iterates = sel.for_each is not None or sel.for_each_or_null is not None or bool(sel.repeat)
    if sel.repeat:
        foci: list[Json] = []

        def traverse(item: Json) -> None:
            for path in sel.repeat:
                for child in values(path.evaluate([item], env)):
                    foci.append(child)
                    traverse(child)

        traverse(node)
    elif sel.for_each is not None:
        foci = sel.for_each.evaluate([node], env)
    elif sel.for_each_or_null is not None:
        foci = sel.for_each_or_null.evaluate([node], env)
    else:
        foci = [node]
    outer = env.row_index
    rows: list[dict[str, Json]] = []
    for index, focus in enumerate(foci):
        if iterates:  # a select without iteration keeps its parent's %rowIndex
            env.row_index = index
        parts: list[list[dict[str, Json]]] = []
        for col in sel.column:
            found = values(col.path.evaluate([focus], env))
            if col.collection:
                value: Json = found
            elif not found:
                value = None
            elif len(found) == 1:
                value = found[0]
            else:
                raise OracleError(f"column {col.name} got several values")
            parts.append([{col.name: value}])
        for sub in sel.select:
            parts.append(process(sub, focus, env))
        if sel.union_all:
            union: list[dict[str, Json]] = []
            for branch in sel.union_all:
                union.extend(process(branch, focus, env))
            parts.append(union)
        combined: list[dict[str, Json]] = [{}]
        for part in parts:
            combined = [{**a, **b} for a in combined for b in part]
        rows.extend(combined)
        env.row_index = outer
    env.row_index = outer
    if not foci and sel.for_each_or_null is not None:
        rows.append(
            {c.name: 0 if isinstance(c.path, RowIndex) else None for c in sel.all_columns()}
        )
    return rows


def view_rows(view: View, resources: Sequence[Json]) -> list[dict[str, Json]]:
    out: list[dict[str, Json]] = []
    for resource in resources:
        out.extend(view.rows(resource))
    return out


# --------------------------------------------------------------------------- /cohort


def _reference_id(reference: Json, resource_type: str) -> str | None:
    if not isinstance(reference, dict):
        return None
    ref = reference.get("reference")
    if isinstance(ref, str) and ref.startswith(resource_type + "/"):
        return ref.split("/")[1]
    return None


def _day_range(text: Any) -> tuple[str, str] | None:
    """The days a FHIR date covers: "1970" is 1970-01-01 .. 1970-12-31."""
    if not isinstance(text, str):
        return None
    if re.fullmatch(r"\d{4}", text):
        return f"{text}-01-01", f"{text}-12-31"
    if re.fullmatch(r"\d{4}-\d{2}", text):
        last = calendar.monthrange(int(text[:4]), int(text[5:]))[1]
        return f"{text}-01", f"{text}-{last:02d}"
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return text, text
    return None


def _epoch_ms(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _instant_range(text: str) -> tuple[int, int]:
    """The epoch milliseconds [first, last] a dateTime search value covers (UTC without a
    zone; a minute, a second or a millisecond, as written)."""
    clock = text[11:]
    zone = ""
    for mark in ("Z", "+", "-"):
        if mark in clock:
            clock, zone = clock[: clock.index(mark)], clock[clock.index(mark) :]
            break
    parts = clock.split(":")
    step = 60_000 if len(parts) == 2 else 1_000 if "." not in parts[2] else 1
    seconds = Decimal(parts[2]) if len(parts) == 3 else Decimal(0)
    moment = datetime(
        int(text[:4]), int(text[5:7]), int(text[8:10]), int(parts[0]), int(parts[1]),
        tzinfo=UTC,
    )  # fmt: skip
    if zone not in ("", "Z"):
        sign = 1 if zone[0] == "+" else -1
        moment -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    first = _epoch_ms(moment) + int(seconds * 1000)
    return first, first + step - 1


def _birth_instants(value: Any) -> tuple[int, int] | None:
    days = _day_range(value)
    if days is None:
        return None
    low = datetime.fromisoformat(days[0]).replace(tzinfo=UTC)
    high = datetime.fromisoformat(days[1]).replace(tzinfo=UTC) + timedelta(days=1)
    return _epoch_ms(low), _epoch_ms(high) - 1


def _birthdate_matches(value: Any, query: str) -> bool:
    prefix = query[:2] if query[:2] in ("eq", "ne", "gt", "lt", "ge", "le") else "eq"
    searched = query[2:] if query[:2] == prefix else query
    bounds: tuple[Any, Any] | None
    target: tuple[Any, Any] | None
    if "T" in searched:  # a dateTime: instants, a birth date's days taken in UTC
        bounds, target = _instant_range(searched), _birth_instants(value)
    else:
        bounds, target = _day_range(searched), _day_range(value)
    if target is None or bounds is None:
        return False
    # FHIR R4 search, "date": ranges against ranges.
    contained = bounds[0] <= target[0] and target[1] <= bounds[1]
    above = target[1] > bounds[1]  # the target reaches after the search range
    below = target[0] < bounds[0]
    return {
        "eq": contained,
        "ne": not contained,
        "gt": above,
        "lt": below,
        "ge": above or contained,
        "le": below or contained,
    }[prefix]


def _number_matches(value: Any, query: str) -> bool:
    if not is_number(value):
        return False
    prefix = query[:2] if query[:2].isalpha() else "eq"
    text = query[2:] if query[:2].isalpha() else query
    number = Decimal(text)
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    half = Decimal(5) * Decimal(10) ** (exponent - 1)  # half a unit of the last digit given
    inside = number - half <= value < number + half
    return {
        "eq": inside,
        "ne": not inside,
        "gt": value > number,
        "lt": value < number,
        "ge": value >= number,
        "le": value <= number,
    }[prefix]


def _codings(resource: Json) -> list[Json]:
    code = resource.get("code")
    return element_values(code, "coding") if isinstance(code, dict) else []


def _code_matches(coding: Json, token: str) -> bool:
    system, bar, code = token.rpartition("|")
    if coding.get("code") != code:
        return False
    if not bar:
        return True
    return (coding.get("system") or "") == system


def _condition_counts(condition: Json) -> bool:
    status = condition.get("verificationStatus")
    codes = [c.get("code") for c in element_values(status, "coding")] if status else []
    return (codes[0] if codes else None) != "entered-in-error"


def _observation_counts(observation: Json) -> bool:
    return observation.get("status") not in ("entered-in-error", "cancelled")


def cohort(
    resources: Mapping[tuple[str, str], Json], params: Sequence[tuple[str, str]]
) -> list[str]:
    """The sorted ids of the Patients the contract's /cohort gives for these resources
    (`resources`: (type, id) -> the newest version, absent when deleted)."""
    patients = {rid: r for (t, rid), r in resources.items() if t == "Patient"}
    conditions = [r for (t, _), r in resources.items() if t == "Condition"]
    observations = [r for (t, _), r in resources.items() if t == "Observation"]
    observation_values = [v for k, v in params if k == "observation-value"]
    members = []
    for pid, patient in patients.items():
        ok = True
        for name, value in params:
            alternatives = value.split(",")
            if name == "gender":
                ok = patient.get("gender") in alternatives
            elif name == "birthdate":
                ok = any(_birthdate_matches(patient.get("birthDate"), a) for a in alternatives)
            elif name == "condition":
                ok = any(
                    _reference_id(c.get("subject"), "Patient") == pid
                    and _condition_counts(c)
                    and any(_code_matches(k, a) for k in _codings(c))
                    for c in conditions
                    for a in alternatives
                )
            elif name == "condition-text":
                ok = any(
                    _reference_id(c.get("subject"), "Patient") == pid
                    and _condition_counts(c)
                    and any(
                        isinstance(t, str) and a.casefold() in t.casefold()
                        for t in [
                            (c.get("code") or {}).get("text"),
                            *[k.get("display") for k in _codings(c)],
                        ]
                    )
                    for c in conditions
                    for a in alternatives
                )
            elif name == "observation":
                ok = False
                for o in observations:
                    if _reference_id(o.get("subject"), "Patient") != pid:
                        continue
                    if not _observation_counts(o):
                        continue
                    value_q = o.get("valueQuantity")
                    number = value_q.get("value") if isinstance(value_q, dict) else None
                    for a in alternatives:
                        token, _, comparison = a.partition("$")
                        if not comparison and observation_values:
                            comparison = observation_values[0]
                        if any(_code_matches(k, token) for k in _codings(o)) and (
                            not comparison or _number_matches(number, comparison)
                        ):
                            ok = True
            if not ok:
                break
        if ok:
            members.append(pid)
    return sorted(members)
