"""Evaluate SQL-on-FHIR v2 ViewDefinitions over FHIR resources in Python (fhirpathpy)."""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any, cast

from fhirpathpy.engine import do_eval as _untyped_do_eval
from fhirpathpy.engine.invocations import invocation_registry
from fhirpathpy.engine.invocations.constants import constants as fhirpath_constants
from fhirpathpy.engine.nodes import FP_Type, ResourceNode
from fhirpathpy.models import models

from receiver.errors import InvalidViewDefinition
from serving.viewdef import Column, Select, ViewDefinition, parse_fhirpath

__all__ = ["CompiledView", "ViewEvaluationError", "compile_view", "evaluate", "reference_key"]

# fhirpathpy has no type hints: give the few entry points used here their types.
do_eval = cast(Callable[[dict[str, Any], list[Any], Any], Any], _untyped_do_eval)
_new_node = cast(Callable[[Any, "str | None"], Any], ResourceNode)
_reset_constants = cast(Callable[[], None], fhirpath_constants.reset)

_MODEL: dict[str, Any] = models["r4"]
_CHOICE_PATHS: dict[str, Any] = _MODEL["choiceTypePaths"]
_DEFINED_ELSEWHERE: dict[str, str] = _MODEL["pathsDefinedElsewhere"]
_PATH_TO_TYPE: dict[str, str] = _MODEL["path2Type"]

_INTEGER_TYPES = frozenset({"integer", "positiveInt", "unsignedInt", "integer64"})

# A plain dotted path of lower-case identifiers, optionally ending in first() or one of
# the SQL-on-FHIR key functions: this is what most real views use, and walking the
# JSON directly is an order of magnitude faster than fhirpathpy's tree interpreter.
_FAST_RE = re.compile(
    r"^(?P<path>[a-z][A-Za-z0-9_]*(?:\.[a-z][A-Za-z0-9_]*)*)?"
    r"(?P<fn>(?:^|\.)(?:first\(\)|getResourceKey\(\)|getReferenceKey\((?P<type>[A-Z][A-Za-z]*)?\)))?$"
)
# FHIRPath keywords that look like identifiers but are operators or literals.
_KEYWORDS = frozenset(
    {"and", "or", "xor", "implies", "div", "mod", "in", "contains", "is", "as", "true", "false"}
)


class ViewEvaluationError(InvalidViewDefinition):
    """The view cannot be evaluated on a resource (a non-collection column got several
    values, a where clause was not boolean, or a FHIRPath function failed)."""


class _Unsupported(Exception):
    """The fast path cannot evaluate this expression; fhirpathpy must."""


# ---------------------------------------------------------------------------
# SQL-on-FHIR functions added to FHIRPath


def reference_key(reference: Any, type_name: str | None = None) -> str | None:
    """The key (the id) a Reference points at, as getReferenceKey([type]) defines it.

    "Patient/123", "Patient/123/_history/2" and "https://host/fhir/Patient/123" all give
    "123"; with a type, a reference to another type gives None. Contained ("#x") and
    URN references have no key.
    """
    if not isinstance(reference, Mapping):
        return None
    ref = reference.get("reference")
    if not isinstance(ref, str) or not ref or ref.startswith("#"):
        return None
    parts = ref.split("?", 1)[0].rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-1]:
        return None
    ref_type, ref_id = parts[-2], parts[-1]
    if not ref_type[:1].isupper():
        return None
    if type_name is not None and ref_type != type_name:
        return None
    return ref_id


def _data(item: Any) -> Any:
    return item.data if isinstance(item, ResourceNode) else item


def _type_name(type_info: Any) -> str | None:
    if type_info is None or type_info == []:
        return None
    name = getattr(type_info, "name", None)
    if isinstance(name, str):
        return name.strip("'\"`")
    return None


def _fn_get_resource_key(ctx: dict[str, Any], inputs: list[Any]) -> list[Any]:
    out = []
    for item in inputs:
        data = _data(item)
        if isinstance(data, Mapping) and isinstance(data.get("id"), str):
            out.append(data["id"])
    return out


def _fn_get_reference_key(
    ctx: dict[str, Any], inputs: list[Any], type_info: Any = None
) -> list[Any]:
    wanted = _type_name(type_info)
    keys = (reference_key(_data(item), wanted) for item in inputs)
    return [key for key in keys if key is not None]


def _fn_join(ctx: dict[str, Any], inputs: list[Any], separator: Any = "") -> list[Any]:
    # SQL-on-FHIR expects "" for an empty collection (fhirpathpy gives empty).
    values = [_data(item) for item in inputs]
    if not all(isinstance(v, str) for v in values):
        raise TypeError("join() requires a collection of strings")
    sep = separator if isinstance(separator, str) else ""
    return [sep.join(values)]


_DATETIME_RE = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2}))?)?"
    r"(?:T(?P<time>[0-9:.]*)(?P<tz>Z|[+-]\d{2}:\d{2})?)?$"
)
_TIME_RE = re.compile(r"^(?P<h>\d{2})(?::(?P<m>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d+))?)?)?$")


def _time_boundary(text: str, high: bool) -> str | None:
    match = _TIME_RE.match(text)
    if not match:
        return None
    fill = "59" if high else "00"
    frac = (match["f"] or "")[:3].ljust(3, "9" if high else "0")
    return f"{match['h']}:{match['m'] or fill}:{match['s'] or fill}.{frac}"


def _date_boundary(text: str, high: bool, with_time: bool) -> str | None:
    match = _DATETIME_RE.match(text)
    if not match:
        return None
    year = int(match["year"])
    month = int(match["month"] or (12 if high else 1))
    day = int(match["day"] or (calendar.monthrange(year, month)[1] if high else 1))
    date = f"{year:04d}-{month:02d}-{day:02d}"
    if not with_time:
        return date
    time = _time_boundary(match["time"] or ("23" if high else "00"), high)
    # Without a zone the instant could be in any zone: the extremes are +14:00 / -12:00.
    tz = match["tz"] or ("-12:00" if high else "+14:00")
    return f"{date}T{time}{tz}"


def _decimal_boundary(value: Decimal | int, high: bool) -> Decimal:
    number = Decimal(value)
    exponent = number.as_tuple().exponent
    digits = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    half = Decimal(5).scaleb(-(digits + 1))
    return number + half if high else number - half


def _boundary(inputs: list[Any], high: bool) -> list[Any]:
    out: list[Any] = []
    for item in inputs:
        value = _data(item)
        type_name = item.path if isinstance(item, ResourceNode) else None
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float | Decimal):
            out.append(_decimal_boundary(Decimal(str(value)), high))
        elif isinstance(value, str):
            result: str | None
            if type_name == "time" or (type_name is None and _TIME_RE.match(value)):
                result = _time_boundary(value, high)
            elif type_name == "date":
                result = _date_boundary(value, high, with_time=False)
            else:
                result = _date_boundary(value, high, with_time=True)
            if result is not None:
                out.append(result)
    return out


def _fn_low_boundary(ctx: dict[str, Any], inputs: list[Any], *_: Any) -> list[Any]:
    return _boundary(inputs, high=False)


def _fn_high_boundary(ctx: dict[str, Any], inputs: list[Any], *_: Any) -> list[Any]:
    return _boundary(inputs, high=True)


# Passed to fhirpathpy as its user invocation table, unwrapped so the functions see
# the typed nodes (lowBoundary must tell a date from a dateTime).
_FUNCTIONS: dict[str, dict[str, Any]] = {
    "getResourceKey": {"fn": _fn_get_resource_key},
    "getReferenceKey": {"fn": _fn_get_reference_key, "arity": {0: [], 1: ["TypeSpecifier"]}},
    "join": {"fn": _fn_join, "arity": {0: [], 1: ["String"]}},
    "lowBoundary": {"fn": _fn_low_boundary, "arity": {0: [], 1: ["Integer"]}},
    "highBoundary": {"fn": _fn_high_boundary, "arity": {0: [], 1: ["Integer"]}},
}
_KNOWN_FUNCTIONS = frozenset(invocation_registry) | frozenset(_FUNCTIONS)


# ---------------------------------------------------------------------------
# Compiled expressions


class _Expression:
    """One FHIRPath expression, parsed once; evaluated on a focus collection."""

    __slots__ = ("fast", "text", "tree", "type_after")

    def __init__(self, text: str, context_type: str | None, fast_path: bool = True) -> None:
        self.text = text
        try:
            parsed = parse_fhirpath(text)
        except Exception as exc:  # antlr raises several unrelated exception types
            raise InvalidViewDefinition(f"invalid FHIRPath {text!r}: {exc}") from exc
        _check_functions(text, parsed)
        self.tree: Any = parsed["children"][0]
        self.fast: Callable[[list[Any]], list[Any]] | None = None
        # The FHIR type of what a plain path yields (None when unknown).
        self.type_after: str | None = None
        if fast_path:
            try:
                self.fast, self.type_after = _compile_fast(text, context_type)
            except _Unsupported:
                pass

    def slow(self, focus: list[Any], variables: dict[str, Any]) -> list[Any]:
        """Evaluate with fhirpathpy; returns its raw nodes (type information kept)."""
        # fhirpathpy keeps per-evaluation state (now(), today()) in a module global.
        _reset_constants()
        ctx = {
            "dataRoot": focus,
            "$this": focus,
            "vars": variables,
            "model": _MODEL,
            "userInvocationTable": _FUNCTIONS,
        }
        try:
            result = do_eval(ctx, focus, self.tree)
        except ViewEvaluationError:
            raise
        except Exception as exc:
            raise ViewEvaluationError(f"FHIRPath {self.text!r} failed: {exc}") from exc
        return result if isinstance(result, list) else [result]

    def nodes(self, focus: list[Any], variables: dict[str, Any]) -> list[Any]:
        """Evaluate for use as a new focus (forEach, repeat): nodes keep their FHIR type."""
        if self.fast is not None:
            type_name = self.type_after
            return [_new_node(item, type_name) for item in self.fast(focus)]
        return self.slow(focus, variables)

    def values(self, focus: list[Any], variables: dict[str, Any]) -> list[Any]:
        """Evaluate to plain JSON-like values."""
        if self.fast is not None:
            return self.fast(focus)
        return _plain_values(self.slow(focus, variables))


def _check_functions(text: str, tree: Any) -> None:
    stack = [tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        children = node.get("children", [])
        if node.get("type") == "Functn" and children:
            name = str(children[0].get("text", "")).strip("`")
            if name not in _KNOWN_FUNCTIONS:
                raise InvalidViewDefinition(f"FHIRPath {text!r}: unknown function {name}()")
        stack.extend(children)


def _static_type(parent_type: str, key: str) -> str:
    """The FHIR type of `parent_type.key`, resolved as fhirpathpy resolves it."""
    child = _DEFINED_ELSEWHERE.get(f"{parent_type}.{key}", f"{parent_type}.{key}")
    if child in _CHOICE_PATHS:
        raise _Unsupported(child)
    if key == "extension":
        child = "Extension"
    return _PATH_TO_TYPE.get(child, child)


_OF_TYPE_RE = re.compile(
    r"^(?P<name>[a-z][A-Za-z0-9]*)\.ofType\((?P<type>[A-Za-z]+)\)(?P<rest>(?:\..*)?)$"
)


def _concrete_choice(text: str, context_type: str) -> str:
    """`onset.ofType(dateTime)...` -> `onsetDateTime...` when `onset` is a choice element of
    the context type with that type: the JSON holds exactly that key (FHIR's JSON form)."""
    match = _OF_TYPE_RE.match(text)
    if match is None:
        return text
    name, wanted = match["name"], match["type"]
    suffix = wanted[0].upper() + wanted[1:]
    if suffix not in _CHOICE_PATHS.get(f"{context_type}.{name}", ()):
        return text
    return f"{name}{suffix}{match['rest']}"


def _compile_fast(
    text: str, context_type: str | None
) -> tuple[Callable[[list[Any]], list[Any]], str | None]:
    """A direct JSON walk equivalent to fhirpathpy for a plain path, or _Unsupported."""
    if context_type is None:
        raise _Unsupported(text)
    match = _FAST_RE.match(_concrete_choice(text.strip(), context_type))
    if match is None:
        raise _Unsupported(text)
    keys = tuple(match["path"].split(".")) if match["path"] else ()
    if any(key in _KEYWORDS for key in keys):
        raise _Unsupported(text)
    type_name = context_type
    for key in keys:
        type_name = _static_type(type_name, key)
    fn = match["fn"].lstrip(".") if match["fn"] else None

    def walk(focus: list[Any]) -> list[Any]:
        items = focus
        for key in keys:
            out: list[Any] = []
            for item in items:
                data = item.data if type(item) is ResourceNode else item
                if type(data) is dict:
                    value = data.get(key)
                    if value is None:
                        continue
                    if type(value) is list:
                        out.extend(v for v in value if v is not None)
                    else:
                        out.append(value)
            items = out
        return [item.data if type(item) is ResourceNode else item for item in items]

    if fn is None:
        return walk, type_name
    if fn == "first()":

        def first(focus: list[Any]) -> list[Any]:
            return walk(focus)[:1]

        return first, type_name
    if fn == "getResourceKey()":

        def resource_key(focus: list[Any]) -> list[Any]:
            return [
                item["id"]
                for item in walk(focus)
                if type(item) is dict and isinstance(item.get("id"), str)
            ]

        return resource_key, None
    wanted = match["type"]

    def ref_key(focus: list[Any]) -> list[Any]:
        keys_ = (reference_key(item, wanted) for item in walk(focus))
        return [key for key in keys_ if key is not None]

    return ref_key, None


def _plain_values(result: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in result:
        value = item.data if isinstance(item, ResourceNode) else item
        if value is None or _is_primitive_extension(item, value):
            continue
        if isinstance(value, FP_Type):
            value = str(value)
        out.append(value)
    return out


def _is_primitive_extension(item: Any, value: Any) -> bool:
    # fhirpathpy also yields a primitive's `_element` (its id/extensions) as a sibling
    # node typed as the primitive (lower-case type name); it is not a value.
    return (
        isinstance(value, dict)
        and isinstance(item, ResourceNode)
        and isinstance(item.path, str)
        and item.path[:1].islower()
        and set(value) <= {"id", "extension"}
    )


def _column_value(value: Any, column: Column) -> Any:
    if isinstance(value, Decimal):
        if column.type in _INTEGER_TYPES and value == value.to_integral_value():
            return int(value)
        return float(value)
    return value


# ---------------------------------------------------------------------------
# Compiled views


class _CompiledSelect:
    __slots__ = (
        "column_exprs",
        "columns",
        "focus",
        "mode",
        "null_row",
        "repeat",
        "selects",
        "union_all",
    )

    def __init__(self, select: Select, context_type: str | None, fast_path: bool) -> None:
        self.mode = "same"
        self.focus: _Expression | None = None
        self.repeat: tuple[_Expression, ...] = ()
        child_type = context_type
        if select.for_each is not None or select.for_each_or_null is not None:
            self.mode = "forEach" if select.for_each is not None else "forEachOrNull"
            self.focus = _Expression(
                select.for_each or select.for_each_or_null or "", context_type, fast_path
            )
            child_type = self.focus.type_after if self.focus.fast is not None else None
        elif select.repeat:
            self.mode = "repeat"
            # The items of a recursive walk have no one static type: evaluate them slowly.
            self.repeat = tuple(_Expression(path, None) for path in select.repeat)
            child_type = None
        self.columns = select.column
        self.column_exprs = tuple(
            _Expression(col.path, child_type, fast_path) for col in select.column
        )
        self.selects = tuple(_CompiledSelect(sub, child_type, fast_path) for sub in select.select)
        self.union_all = tuple(
            _CompiledSelect(sub, child_type, fast_path) for sub in select.union_all
        )
        self.null_row: dict[str, Any] = {col.name: None for col in select.columns()}

    def rows(self, item: Any, row_index: int, variables: dict[str, Any]) -> list[dict[str, Any]]:
        if self.mode == "same":
            return self._rows_for(item, row_index, variables)
        if self.focus is not None:
            variables["rowIndex"] = row_index
            foci = self.focus.nodes([item], variables)
            if not foci and self.mode == "forEachOrNull":
                return [self._null_row(variables)]
        else:
            foci = []
            self._walk(item, variables, foci)
        out: list[dict[str, Any]] = []
        for index, focus in enumerate(foci):
            out.extend(self._rows_for(focus, index, variables))
        return out

    def _null_row(self, variables: dict[str, Any]) -> dict[str, Any]:
        # The row forEachOrNull emits for an empty collection: every column null, except
        # what an own column computes without a focus (%rowIndex is 0 there).
        row = dict(self.null_row)
        variables["rowIndex"] = 0
        for column, expression in zip(self.columns, self.column_exprs, strict=True):
            if expression.fast is None:
                values = expression.values([], variables)
                if len(values) == 1 and not column.collection:
                    row[column.name] = _column_value(values[0], column)
        return row

    def _walk(self, item: Any, variables: dict[str, Any], out: list[Any]) -> None:
        # Depth first, in document order: %rowIndex numbers the items in that order.
        for expression in self.repeat:
            for child in expression.nodes([item], variables):
                out.append(child)
                self._walk(child, variables, out)

    def _rows_for(
        self, item: Any, row_index: int, variables: dict[str, Any]
    ) -> list[dict[str, Any]]:
        row: dict[str, Any] = {}
        focus = [item]
        for column, expression in zip(self.columns, self.column_exprs, strict=True):
            variables["rowIndex"] = row_index
            values = expression.values(focus, variables)
            if column.collection:
                row[column.name] = [_column_value(v, column) for v in values]
            elif not values:
                row[column.name] = None
            elif len(values) == 1:
                row[column.name] = _column_value(values[0], column)
            else:
                raise ViewEvaluationError(
                    f"column {column.name!r} ({column.path}) gave {len(values)} values;"
                    " set collection: true to keep them all"
                )
        rows = [row]
        for sub in self.selects:
            sub_rows = sub.rows(item, row_index, variables)
            if not sub_rows:
                return []
            rows = _product(rows, sub_rows)
        if self.union_all:
            union_rows: list[dict[str, Any]] = []
            for branch in self.union_all:
                union_rows.extend(branch.rows(item, row_index, variables))
            rows = _product(rows, union_rows)
        return rows


def _product(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(right) == 1:
        only = right[0]
        for row in left:
            row.update(only)
        return left
    return [{**a, **b} for a in left for b in right]


class CompiledView:
    """A ViewDefinition with every FHIRPath expression parsed once, ready to run."""

    __slots__ = ("_constants", "_root", "_wheres", "view")

    def __init__(self, view: ViewDefinition, fast_path: bool = True) -> None:
        self.view = view
        self._constants = {c.name: c.value for c in view.constant}
        self._wheres = tuple(_Expression(w.path, view.resource, fast_path) for w in view.where)
        self._root = _CompiledSelect(Select(select=view.select), view.resource, fast_path)

    def rows(self, resource: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The view's rows for one resource ([] for another resource type or a where miss)."""
        if resource.get("resourceType") != self.view.resource:
            return []
        variables: dict[str, Any] = {
            **self._constants,
            "resource": resource,
            "rootResource": resource,
            "context": resource,
            "ucum": "http://unitsofmeasure.org",
            "sct": "http://snomed.info/sct",
            "loinc": "http://loinc.org",
            "rowIndex": 0,
        }
        focus = [resource]
        for where in self._wheres:
            result = where.values(focus, variables)
            if not result:
                return []
            if len(result) != 1 or not isinstance(result[0], bool):
                raise ViewEvaluationError(
                    f"where {where.text!r} must give a boolean, gave {result[:3]!r}"
                )
            if not result[0]:
                return []
        return self._root.rows(resource, 0, variables)

    def evaluate(self, resources: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The view's rows over many resources, in input order."""
        out: list[dict[str, Any]] = []
        for resource in resources:
            out.extend(self.rows(resource))
        return out


def compile_view(view: ViewDefinition, *, fast_path: bool = True) -> CompiledView:
    """Parse every expression of `view` once. Raises InvalidViewDefinition.

    Plain dotted paths skip fhirpathpy (same results, much faster); `fast_path=False`
    sends every expression through fhirpathpy, for comparison.
    """
    return CompiledView(view, fast_path)


def evaluate(view: ViewDefinition, resources: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Evaluate `view` over `resources` (compiles it first; reuse compile_view in loops)."""
    return compile_view(view).evaluate(resources)
