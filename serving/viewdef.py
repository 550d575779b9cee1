"""SQL-on-FHIR v2 ViewDefinitions: parsing and validation into an immutable, typed tree."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from core.errors import InvalidViewDefinition
from core.fhir_values import JsonError
from core.fhir_values import loads as exact_loads
from core.r4schema import R4_RESOURCE_TYPES
from serving.fhirpath import BUILTIN_VARIABLES, parse, variables_used

__all__ = [
    "BUILTIN_VARIABLES",
    "Column",
    "ColumnInfo",
    "Constant",
    "Select",
    "ViewDefinition",
    "Where",
    "load_view",
    "load_view_file",
    "shipped_views",
    "sql_type",
]

# SQL-on-FHIR names must be usable as SQL identifiers without quoting.
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# ViewDefinition.status (1..1), the PublicationStatus codes.
STATUSES = ("draft", "active", "retired", "unknown")

# The value[x] types a ViewDefinition.constant may carry, mapped to the Python
# type the JSON value must have (bool is checked before int on purpose).
_CONSTANT_TYPES: dict[str, tuple[type, ...]] = {
    "base64Binary": (str,),
    "boolean": (bool,),
    "canonical": (str,),
    "code": (str,),
    "date": (str,),
    "dateTime": (str,),
    "decimal": (int, Decimal),
    "id": (str,),
    "instant": (str,),
    "integer": (int,),
    "integer64": (int, str),
    "oid": (str,),
    "positiveInt": (int,),
    "string": (str,),
    "time": (str,),
    "unsignedInt": (int,),
    "uri": (str,),
    "url": (str,),
    "uuid": (str,),
}


class ColumnInfo(NamedTuple):
    """One output column of a view: what a table built from it holds."""

    name: str
    type: str | None
    collection: bool


@dataclass(frozen=True, slots=True)
class Constant:
    """A `constant` entry: usable in every expression of the view as `%name`."""

    name: str
    value: str | int | Decimal | bool
    value_type: str  # the FHIR type from the value[x] key, e.g. "string", "integer"


@dataclass(frozen=True, slots=True)
class Column:
    """A `column` entry: `path` evaluated on the current focus gives the value."""

    name: str
    path: str
    type: str | None = None
    collection: bool = False
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Where:
    """A `where` entry: a resource is kept only when `path` is true."""

    path: str
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Select:
    """A `select` entry.

    The focus of a select is its parent's focus, or each item of `for_each` /
    `for_each_or_null` (a null row when that is empty) or of the recursive `repeat`
    traversal. Its rows are the cross product of its own `column` values, each nested
    `select`'s rows, and the concatenated rows of its `union_all` branches.
    At most one of `for_each`, `for_each_or_null` and `repeat` is set.
    """

    column: tuple[Column, ...] = ()
    select: tuple[Select, ...] = ()
    union_all: tuple[Select, ...] = ()
    for_each: str | None = None
    for_each_or_null: str | None = None
    repeat: tuple[str, ...] = ()

    @property
    def iterates(self) -> bool:
        """True when this select changes the focus (and so restarts %rowIndex)."""
        return self.for_each is not None or self.for_each_or_null is not None or bool(self.repeat)

    def column_paths(self) -> Iterator[Column]:
        """Every column of this select's rows in order: own, nested selects, then unionAll."""
        yield from self.column
        for sub in self.select:
            yield from sub.column_paths()
        if self.union_all:
            yield from self.union_all[0].column_paths()

    def null_row(self) -> dict[str, Any]:
        """The one row a `forEachOrNull` over an empty collection gives: every column of this
        select and the selects it holds null, except a column whose path is `%rowIndex`,
        which is 0 (SQL-on-FHIR v2, Processing Algorithm, Process(S, N) step 3). Both engines
        build it from here, whatever the nested selects would give on an empty focus."""
        return {c.name: 0 if c.path.strip() == "%rowIndex" else None for c in self.column_paths()}

    def columns(self) -> Iterator[ColumnInfo]:
        """This select's output columns in order: own, nested selects, then unionAll."""
        for col in self.column:
            yield ColumnInfo(col.name, col.type, col.collection)
        for sub in self.select:
            yield from sub.columns()
        if self.union_all:
            # All branches have the same columns (checked at load time).
            yield from self.union_all[0].columns()


@dataclass(frozen=True, slots=True)
class ViewDefinition:
    """A validated SQL-on-FHIR v2 ViewDefinition.

    `select` holds the top-level selects (combined as a cross product per resource),
    `columns` the output columns in order.
    """

    resource: str
    select: tuple[Select, ...]
    name: str | None = None
    status: str | None = None
    constant: tuple[Constant, ...] = ()
    where: tuple[Where, ...] = ()
    url: str | None = None
    title: str | None = None
    description: str | None = None
    columns: tuple[ColumnInfo, ...] = field(default=())

    @property
    def column_names(self) -> tuple[str, ...]:
        """The output column names in order."""
        return tuple(col.name for col in self.columns)

    def expressions(self) -> Iterator[str]:
        """Every FHIRPath expression of the view (where, forEach..., repeat, column paths)."""
        for where in self.where:
            yield where.path
        stack = list(self.select)
        while stack:
            sel = stack.pop()
            if sel.for_each is not None:
                yield sel.for_each
            if sel.for_each_or_null is not None:
                yield sel.for_each_or_null
            yield from sel.repeat
            for col in sel.column:
                yield col.path
            stack.extend(sel.select)
            stack.extend(sel.union_all)


_TEXT_TYPES = frozenset(
    {
        "string", "code", "id", "uri", "url", "canonical", "markdown", "oid", "uuid",
        "base64Binary", "date", "dateTime", "instant", "time", "xhtml",
    }
)  # fmt: skip
_INTEGER_TYPES = frozenset({"integer", "positiveInt", "unsignedInt"})


# FHIR R4's primitive types (https://hl7.org/fhir/R4/datatypes.html) and SQL-on-FHIR v2's
# integer64; a complex type is named in UpperCamelCase (Coding, CodeableConcept, ...).
PRIMITIVE_TYPES = _TEXT_TYPES | _INTEGER_TYPES | {"integer64", "decimal", "boolean"}
_COMPLEX_TYPE_RE = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")


def _is_fhir_type(name: str) -> bool:
    return name in PRIMITIVE_TYPES or bool(_COMPLEX_TYPE_RE.fullmatch(name))


def sql_type(fhir_type: str | None, collection: bool) -> str:
    """The SQL type of a column of this FHIR type (both engines cast a column's value to it:
    text, integer, bigint, numeric, boolean, or jsonb for collections and other types)."""
    if collection or fhir_type is None:
        return "jsonb"
    if fhir_type in _TEXT_TYPES:
        return "text"
    if fhir_type in _INTEGER_TYPES:
        return "integer"
    if fhir_type == "integer64":
        return "bigint"
    if fhir_type == "decimal":
        return "numeric"
    if fhir_type == "boolean":
        return "boolean"
    return "jsonb"


def load_view(data: Mapping[str, Any], *, require_status: bool = False) -> ViewDefinition:
    """Validate a ViewDefinition (parsed JSON) and return its typed form.

    `resource` must be a FHIR R4 resource type (`core.r4schema.R4_RESOURCE_TYPES`) and
    `status` one of STATUSES (1..1 in SQL-on-FHIR v2's ViewDefinition). A view an operator
    gives (`views run`, a file, the shipped ones) is loaded with `require_status=True`; the
    engines' own callers take one without, as the official SQL-on-FHIR v2 tests write most
    of theirs. A status that is there is checked either way. Raises InvalidViewDefinition
    naming what is wrong and where.
    """
    if not isinstance(data, Mapping):
        raise InvalidViewDefinition("a ViewDefinition must be a JSON object")
    resource_type = data.get("resourceType")
    if resource_type is not None and resource_type != "ViewDefinition":
        raise InvalidViewDefinition(f"resourceType is {resource_type!r}, not 'ViewDefinition'")
    resource = data.get("resource")
    if not isinstance(resource, str) or not resource:
        raise InvalidViewDefinition("'resource' must name a FHIR resource type, e.g. 'Patient'")
    if resource not in R4_RESOURCE_TYPES:
        raise InvalidViewDefinition(
            f"'resource' {resource[:80]!r} is not a FHIR R4 resource type (e.g. 'Patient')"
        )
    status = data.get("status")
    if (status is not None or require_status) and status not in STATUSES:
        raise InvalidViewDefinition(
            f"'status' must be one of {', '.join(STATUSES)}, not {status!r}"
            if status is not None
            else f"'status' is missing: a ViewDefinition has one of {', '.join(STATUSES)}"
        )

    constants = tuple(_constant(c, f"constant[{i}]") for i, c in enumerate(_list(data, "constant")))
    seen_constants: set[str] = set()
    for const in constants:
        if const.name in seen_constants:
            raise InvalidViewDefinition(f"constant {const.name!r} is defined twice")
        seen_constants.add(const.name)

    wheres = tuple(_where(w, f"where[{i}]") for i, w in enumerate(_list(data, "where")))
    raw_selects = _list(data, "select")
    if not raw_selects:
        raise InvalidViewDefinition("'select' must be a non-empty array")
    selects = tuple(_select(s, f"select[{i}]") for i, s in enumerate(raw_selects))

    columns: list[ColumnInfo] = []
    for sel in selects:
        columns.extend(sel.columns())
    names = [col.name for col in columns]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidViewDefinition(f"column names must be unique: {', '.join(duplicates)}")

    view = ViewDefinition(
        resource=resource,
        select=selects,
        name=_optional_str(data, "name"),
        status=_optional_str(data, "status"),
        constant=constants,
        where=wheres,
        url=_optional_str(data, "url"),
        title=_optional_str(data, "title"),
        description=_optional_str(data, "description"),
        columns=tuple(columns),
    )
    if view.name is not None and not _NAME_RE.match(view.name):
        raise InvalidViewDefinition(f"view name {view.name!r} is not a valid SQL name")
    known = BUILTIN_VARIABLES | seen_constants
    for expression in view.expressions():
        _check_expression(expression, known)
    return view


def load_view_file(path: str | Path) -> ViewDefinition:
    """Load and validate a ViewDefinition from a JSON file."""
    try:
        data = exact_loads(Path(path).read_bytes())
    except (OSError, JsonError) as exc:
        raise InvalidViewDefinition(f"cannot read ViewDefinition {path}: {exc}") from exc
    return load_view(data, require_status=True)


def shipped_views() -> dict[str, ViewDefinition]:
    """The ViewDefinitions shipped in serving/viewdefs, by view name."""
    views: dict[str, ViewDefinition] = {}
    for entry in sorted(resources.files("serving.viewdefs").iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            data = exact_loads(entry.read_bytes())
        except JsonError as exc:
            raise InvalidViewDefinition(f"{entry.name}: {exc}") from exc
        view = load_view(data, require_status=True)
        views[view.name or entry.name.removesuffix(".json")] = view
    return views


def served_types(views: Mapping[str, ViewDefinition] | None = None) -> tuple[str, ...]:
    """The resource types the served views read, Patient always (cohorts are of patients).

    What the poller, the batch sync and `subscriptions bootstrap` read from HAPI: nothing else
    (a Subscription, which holds the receiver's token, above all) enters either layer.
    """
    chosen = shipped_views() if views is None else views
    return tuple(sorted({view.resource for view in chosen.values()} | {"Patient"}))


def _list(data: Mapping[str, Any], key: str, where: str = "") -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise InvalidViewDefinition(f"{where}{'.' if where else ''}{key} must be an array")
    return value


def _optional_str(data: Mapping[str, Any], key: str, where: str = "") -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidViewDefinition(f"{where}{'.' if where else ''}{key} must be a string")
    return value


def _required_str(data: Mapping[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidViewDefinition(f"{where}.{key} must be a non-empty string")
    return value


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidViewDefinition(f"{where} must be an object")
    return value


def _constant(raw: Any, where: str) -> Constant:
    data = _object(raw, where)
    name = _required_str(data, "name", where)
    if not _NAME_RE.match(name):
        raise InvalidViewDefinition(f"{where}.name {name!r} is not a valid name")
    values = [key for key in data if key.startswith("value")]
    if len(values) != 1:
        raise InvalidViewDefinition(f"{where} ({name}) must have exactly one value[x]")
    key = values[0]
    value_type = key[len("value") :]
    value_type = value_type[:1].lower() + value_type[1:]
    accepted = _CONSTANT_TYPES.get(value_type)
    if accepted is None:
        raise InvalidViewDefinition(f"{where} ({name}) has an unsupported type {key}")
    value: str | int | Decimal | bool = data[key]
    if isinstance(value, float) and Decimal in accepted:
        value = Decimal(repr(value))  # a view parsed without exact numbers: its shortest form
    if (isinstance(value, bool) and bool not in accepted) or not isinstance(value, accepted):
        raise InvalidViewDefinition(f"{where} ({name}): {key} has the wrong JSON type")
    return Constant(name=name, value=value, value_type=value_type)


def _where(raw: Any, where: str) -> Where:
    data = _object(raw, where)
    return Where(
        path=_required_str(data, "path", where),
        description=_optional_str(data, "description", where),
    )


def _column(raw: Any, where: str) -> Column:
    data = _object(raw, where)
    name = _required_str(data, "name", where)
    if not _NAME_RE.match(name):
        raise InvalidViewDefinition(f"{where}.name {name!r} is not a valid column name")
    collection = data.get("collection", False)
    if not isinstance(collection, bool):
        raise InvalidViewDefinition(f"{where}.collection must be true or false")
    fhir_type = _optional_str(data, "type", where)
    if fhir_type is not None and not _is_fhir_type(fhir_type):
        raise InvalidViewDefinition(
            f"{where}.type {fhir_type[:40]!r} is not a FHIR type (a primitive such as"
            " 'string', 'date', 'decimal', or a complex type such as 'CodeableConcept')"
        )
    return Column(
        name=name,
        path=_required_str(data, "path", where),
        type=fhir_type,
        collection=collection,
        description=_optional_str(data, "description", where),
    )


def _select(raw: Any, where: str) -> Select:
    data = _object(raw, where)
    for_each = _optional_str(data, "forEach", where)
    for_each_or_null = _optional_str(data, "forEachOrNull", where)
    repeat = _list(data, "repeat", where)
    if any(not isinstance(p, str) or not p for p in repeat):
        raise InvalidViewDefinition(f"{where}.repeat must be an array of FHIRPath strings")
    if "repeat" in data and not repeat:
        raise InvalidViewDefinition(f"{where}.repeat must not be empty")
    if sum(x is not None for x in (for_each, for_each_or_null, repeat or None)) > 1:
        raise InvalidViewDefinition(
            f"{where} may have only one of forEach, forEachOrNull and repeat"
        )
    union_all = tuple(
        _select(s, f"{where}.unionAll[{i}]") for i, s in enumerate(_list(data, "unionAll", where))
    )
    if union_all:
        first = [c.name for c in union_all[0].columns()]
        for i, branch in enumerate(union_all[1:], start=1):
            names = [c.name for c in branch.columns()]
            if names != first:
                raise InvalidViewDefinition(
                    f"{where}.unionAll[{i}] has columns {names}, but unionAll[0] has {first}:"
                    " every branch must have the same columns in the same order"
                )
            # One table column per name: its type must be the same in every branch.
            for a, b in zip(union_all[0].columns(), branch.columns(), strict=True):
                kind_a, kind_b = sql_type(a.type, a.collection), sql_type(b.type, b.collection)
                if kind_a != kind_b:
                    raise InvalidViewDefinition(
                        f"{where}.unionAll[{i}] column {a.name!r} is {kind_b}"
                        f" ({b.type or 'no type'}{', collection' if b.collection else ''}),"
                        f" but in unionAll[0] it is {kind_a}: every branch must agree"
                    )
    return Select(
        column=tuple(
            _column(c, f"{where}.column[{i}]") for i, c in enumerate(_list(data, "column", where))
        ),
        select=tuple(
            _select(s, f"{where}.select[{i}]") for i, s in enumerate(_list(data, "select", where))
        ),
        union_all=union_all,
        for_each=for_each,
        for_each_or_null=for_each_or_null,
        repeat=tuple(repeat),
    )


def _check_expression(expression: str, known_variables: frozenset[str] | set[str]) -> None:
    """Reject a FHIRPath expression that does not parse or names an undefined %variable."""
    tree = parse(expression)
    for name in sorted(variables_used(tree)):
        # %`vs-...` and %`ext-...` are FHIR's predefined value set/extension names.
        if name.startswith(("vs-", "ext-")):
            continue
        if name not in known_variables:
            raise InvalidViewDefinition(
                f"FHIRPath {expression!r} uses %{name}, which is not a constant of the view"
            )
