"""Evaluate SQL-on-FHIR v2 ViewDefinitions over FHIR resources in Python.

Every expression is resolved by `serving.fhirpath` (the same typed tree the PostgreSQL compiler
compiles) and turned once into nested Python closures over plain JSON values (dict, list, str,
int, Decimal, bool). Each operation does what its SQL counterpart in `serving.engines.postgres`
does, rule for rule (collections, empty propagation, the date/time and decimal rules of
`core.fhir_values`, PostgreSQL's casts for typed columns), so both engines give the same
rows by construction (`serving.engines.sqlvalues` holds what PostgreSQL does to values);
`tests/test_exact_views.py` checks both engines against an independent oracle.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from decimal import ROUND_DOWN, Decimal
from typing import Any

from core.errors import InvalidViewDefinition
from core.fhir_values import (
    EXACT,
    boundary,
    case_map,
    compare_temporal,
    fold,
    is_temporal_type,
)
from serving.engines.sqlvalues import (
    ViewEvaluationError,
    canonical,
    cast,
    distinct,
    is_number,
    json_equal,
    json_type_matches,
    jsonb_key,
    jsonb_text,
    pg_divide,
    pg_integer,
    pg_numeric,
    round_half_away,
    scale,
    text_of,
)
from serving.fhirpath import REFERENCE_KEY_PATTERN, Expr, Scope, Typer, json_type_of
from serving.viewdef import Column, Select, ViewDefinition, load_view, sql_type

__all__ = [
    "CompiledView",
    "ViewEvaluationError",
    "compile_view",
    "evaluate",
    "pg_divide",
    "python_engine",
    "reference_key",
    "text_of",
]


# An evaluation context: the resource and the %rowIndex of the current iteration.
class _Env:
    __slots__ = ("resource", "row_index")

    def __init__(self, resource: Mapping[str, Any], row_index: int = 0) -> None:
        self.resource = resource
        self.row_index = row_index


Fn = Callable[[list[Any], _Env], list[Any]]

_REFERENCE_KEY_RE = re.compile(REFERENCE_KEY_PATTERN)
_WHITESPACE = str.maketrans({"\t": " ", "\r": " ", "\n": " "})


def reference_key(reference: Any, type_name: str | None = None) -> str | None:
    """The key (the id) a Reference points at, as getReferenceKey([type]) defines it.

    "Patient/123", "Patient/123/_history/2" and "https://host/fhir/Patient/123" all give
    "123"; with a type, a reference to another type gives None. Contained ("#x") and
    URN references have no key.
    """
    if not isinstance(reference, Mapping):
        return None
    ref = reference.get("reference")
    if not isinstance(ref, str):
        return None
    match = _REFERENCE_KEY_RE.match(ref)
    if match is None or (type_name is not None and match.group(1) != type_name):
        return None
    return match.group(2)


# --------------------------------------------------------------------------- values


def _text(items: list[Any]) -> str | None:
    return text_of(items[0]) if items else None


def _boolean(items: list[Any]) -> bool | None:
    """A collection as a condition (FHIRPath's singleton evaluation of collections): empty
    is unknown, one item `false` is false, any other single item true, several an error."""
    if not items:
        return None
    if len(items) > 1:
        raise ViewEvaluationError(f"a condition got {len(items)} values, not one")
    return items[0] is not False


def _number(items: list[Any], what: str) -> Decimal | int | None:
    if not items:
        return None
    value = items[0]
    if not is_number(value):
        raise ViewEvaluationError(f"{what} needs a number, got {jsonb_text(value)[:60]}")
    return value  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- compiling


def _const(items: list[Any]) -> Fn:
    def run(focus: list[Any], env: _Env) -> list[Any]:
        return list(items)

    return run


def _this(focus: list[Any], env: _Env) -> list[Any]:
    return focus


def _root(focus: list[Any], env: _Env) -> list[Any]:
    return [env.resource]


def _row_index(focus: list[Any], env: _Env) -> list[Any]:
    return [env.row_index]


def _exact(value: Any) -> Any:
    # Resources come from core.fhir_values.loads (Decimal); a float from elsewhere is
    # read as the decimal it prints as, never as its binary value.
    return Decimal(repr(value)) if type(value) is float else value


def _step(items: Iterable[Any], key: str) -> list[Any]:
    """Member access: the key's values of every object in `items`, arrays flattened, nulls
    (the holes beside an `_element` array) and absent keys dropped."""
    out: list[Any] = []
    append = out.append
    for item in items:
        if type(item) is dict:
            value = item.get(key)
            if value is None:
                continue
            kind = type(value)
            if kind is list:
                for v in value:
                    if v is not None:
                        append(Decimal(repr(v)) if type(v) is float else v)
            elif kind is float:
                append(Decimal(repr(value)))
            else:
                append(value)
    return out


class _Node:
    """A primitive element that has its `_name` element beside it in the JSON (FHIR R4 JSON
    §2.6.2): its value (None: it has none, only extensions) and that element. A primitive
    without one is its plain value. Only `values` and `element` look inside."""

    __slots__ = ("element", "value")

    def __init__(self, value: Any, element: dict[str, Any]) -> None:
        self.value = value
        self.element = element


def _step_elements(items: Iterable[Any], key: str) -> list[Any]:
    """Member access to a primitive element: as `_step`, but where the JSON has `_key` beside
    `key`, the items pair up by position (`"given": ["A", null]`, `"_given": [null, {...}]`)
    and each one with an element object is a _Node, a value-less one included."""
    out: list[Any] = []
    for item in items:
        if type(item) is not dict:
            continue
        element = item.get("_" + key)
        if element is None:
            out.extend(_step((item,), key))
            continue
        value = item.get(key)
        found = value if type(value) is list else [] if value is None else [value]
        beside = element if type(element) is list else [element]
        for n in range(max(len(found), len(beside))):
            v = _exact(found[n]) if n < len(found) else None
            e = beside[n] if n < len(beside) else None
            if type(e) is dict:
                out.append(_Node(v, e))
            elif v is not None:
                out.append(v)
    return out


def _values(items: list[Any]) -> list[Any]:
    """The values of items that may be _Nodes (a node without a value gives none)."""
    return [
        item.value if type(item) is _Node else item
        for item in items
        if type(item) is not _Node or item.value is not None
    ]


def _elements(items: list[Any]) -> list[Any]:
    """The `_name` element objects of _Nodes (a plain value has none)."""
    return [item.element for item in items if type(item) is _Node]


def _member_chain(expr: Expr) -> tuple[Expr, tuple[str, ...]]:
    keys: list[str] = []
    while expr.tag == "member":
        keys.append(expr.args[1])
        expr = expr.args[0]
    return expr, tuple(reversed(keys))


class _Compiler:
    """Turns resolved expressions into closures."""

    def compile(self, expr: Expr) -> Fn:
        tag = expr.tag
        if tag == "lit":
            return _const([expr.args[0]])
        if tag == "temporal":
            return _const([expr.args[0]])
        if tag == "empty":
            return _const([])
        if tag == "this":
            return _this
        if tag == "root":
            return _root
        if tag == "rowindex":
            return _row_index
        if tag == "values":
            (inner,) = expr.args
            if inner.tag == "member":
                # The values of a member step are the plain step's (no _Node on the way).
                return self.compile(replace(inner, elements=False))
            node_fn = self.compile(inner)
            return lambda focus, env: _values(node_fn(focus, env))
        if tag == "element":
            (inner,) = expr.args
            nodes = self.compile(inner)
            return lambda focus, env: _elements(nodes(focus, env))
        if tag == "member" and expr.elements:
            parent = self.compile(expr.args[0])
            key = expr.args[1]
            return lambda focus, env: _step_elements(parent(focus, env), key)
        if tag == "member":
            start, keys = _member_chain(expr)
            base = self.compile(start)
            if base is _this:
                if len(keys) == 1:
                    (only,) = keys
                    return lambda focus, env: _step(focus, only)

                def path(focus: list[Any], env: _Env) -> list[Any]:
                    items = focus
                    for key in keys:
                        if not items:
                            break
                        items = _step(items, key)
                    return items

                return path

            def member(focus: list[Any], env: _Env) -> list[Any]:
                items = base(focus, env)
                for key in keys:
                    items = _step(items, key)
                return items

            return member
        if tag == "choice":
            return self.choice(expr)
        if tag == "oftype_member":
            return self.oftype_member(expr)
        if tag == "index":
            return self.index(expr)
        if tag == "call":
            return self.call(expr)
        if tag == "unary":
            return self.unary(expr)
        if tag == "bin":
            return self.binary(expr)
        raise InvalidViewDefinition(f"unsupported FHIRPath construct {tag}")

    def choice(self, expr: Expr) -> Fn:
        base_expr, name, suffixes = expr.args
        base = self.compile(base_expr)
        keys = sorted((name + s for s in suffixes), key=jsonb_key)

        def run(focus: list[Any], env: _Env) -> list[Any]:
            out: list[Any] = []
            for item in base(focus, env):
                if type(item) is dict:
                    for key in keys:
                        value = item.get(key)
                        if value is None:
                            continue
                        if type(value) is list:
                            out.extend(_exact(v) for v in value if v is not None)
                        else:
                            out.append(_exact(value))
            return out

        return run

    def oftype_member(self, expr: Expr) -> Fn:
        base_expr, name, type_name = expr.args
        base = self.compile(base_expr)
        typed_key = name + type_name[:1].upper() + type_name[1:]
        wanted = json_type_of(type_name)

        def run(focus: list[Any], env: _Env) -> list[Any]:
            items = base(focus, env)
            plain = [v for v in _step(items, name) if json_type_matches(v, wanted, type_name)]
            return _step(items, typed_key) + plain

        return run

    def index(self, expr: Expr) -> Fn:
        base_expr, index_expr = expr.args
        base = self.compile(base_expr)
        if index_expr.tag == "lit" and type(index_expr.args[0]) is int:
            n = index_expr.args[0]

            def literal(focus: list[Any], env: _Env) -> list[Any]:
                return base(focus, env)[n : n + 1]

            return literal
        index = self.compile(index_expr)

        def computed(focus: list[Any], env: _Env) -> list[Any]:
            number = _number(index(focus, env), "an index")
            if number is None:
                return []
            n = pg_integer(number, 32, "an index")
            items = base(focus, env)
            return [items[n]] if -len(items) <= n < len(items) else []

        return computed

    def unary(self, expr: Expr) -> Fn:
        op, operand_expr = expr.args
        operand = self.compile(operand_expr)
        if op == "+":
            return operand

        def negate(focus: list[Any], env: _Env) -> list[Any]:
            number = _number(operand(focus, env), "unary -")
            if number is None:
                return []
            return [number.copy_negate() if isinstance(number, Decimal) else -number]

        return negate

    # ---- functions

    def call(self, expr: Expr) -> Fn:
        base_expr, name, args = expr.args
        base = self.compile(base_expr)
        if name == "ofType":
            (type_name,) = args
            wanted = json_type_of(type_name)

            def of_type(focus: list[Any], env: _Env) -> list[Any]:
                return [v for v in base(focus, env) if json_type_matches(v, wanted, type_name)]

            return of_type
        if name == "extension":
            (url,) = args

            def extension(focus: list[Any], env: _Env) -> list[Any]:
                return [
                    e
                    for e in _step(base(focus, env), "extension")
                    if type(e) is dict and e.get("url") == url
                ]

            return extension
        if name == "getResourceKey":
            return lambda focus, env: _step(base(focus, env), "id")
        if name == "getReferenceKey":
            (wanted_type,) = args

            def reference_keys(focus: list[Any], env: _Env) -> list[Any]:
                out = []
                for ref in _step(base(focus, env), "reference"):
                    if isinstance(ref, str):
                        match = _REFERENCE_KEY_RE.match(ref)
                        if match and (wanted_type is None or match.group(1) == wanted_type):
                            out.append(match.group(2))
                return out

            return reference_keys
        if name in ("skip", "take"):
            (n,) = args
            if name == "skip":
                return lambda focus, env: base(focus, env)[max(n, 0) :]
            return lambda focus, env: base(focus, env)[:n] if n > 0 else []
        if name in ("lowBoundary", "highBoundary"):
            high = name == "highBoundary"
            kind = base_expr.ftype

            def bound(focus: list[Any], env: _Env) -> list[Any]:
                values = (boundary(v, kind, high) for v in base(focus, env))
                return [v for v in values if v is not None]

            return bound
        compiled = [self.compile(a) for a in args]
        return self.function(name, base, compiled)

    def function(self, name: str, base: Fn, args: list[Fn]) -> Fn:
        if name in ("exists", "where", "all", "select"):
            return self.lambda_function(name, base, args)
        if name == "empty":
            return lambda focus, env: [not base(focus, env)]
        if name == "count":
            return lambda focus, env: [len(base(focus, env))]
        if name == "first":
            return lambda focus, env: base(focus, env)[:1]
        if name == "last":
            return lambda focus, env: base(focus, env)[-1:]
        if name == "tail":
            return lambda focus, env: base(focus, env)[1:]
        if name == "not":

            def not_(focus: list[Any], env: _Env) -> list[Any]:
                value = _boolean(base(focus, env))
                return [] if value is None else [not value]

            return not_
        if name == "hasValue":

            def has_value(focus: list[Any], env: _Env) -> list[Any]:
                items = base(focus, env)
                return [len(items) == 1 and not isinstance(items[0], dict | list)]

            return has_value
        if name == "distinct":
            return lambda focus, env: distinct(base(focus, env))
        if name == "join":
            separator = args[0] if args else None

            def join(focus: list[Any], env: _Env) -> list[Any]:
                sep = _text(separator(focus, env)) if separator is not None else ""
                parts = [text_of(v) or "" for v in base(focus, env)]
                return [(sep or "").join(parts)]

            return join
        if name in ("lower", "upper"):
            kind = name

            def case(focus: list[Any], env: _Env) -> list[Any]:
                text = _text(base(focus, env))
                return [] if text is None else [case_map(text, kind)]  # type: ignore[arg-type]

            return case
        if name in ("length", "toString"):

            def string(focus: list[Any], env: _Env) -> list[Any]:
                text = _text(base(focus, env))
                if text is None:
                    return []
                return [len(text)] if name == "length" else [text]

            return string
        if name in ("startsWith", "endsWith"):
            (arg,) = args

            def affix(focus: list[Any], env: _Env) -> list[Any]:
                text = _text(base(focus, env))
                other = _text(arg(focus, env))
                if text is None or other is None:
                    return []
                if name == "startsWith":
                    return [text.startswith(other)]
                return [text.endswith(other)]

            return affix
        raise InvalidViewDefinition(f"unsupported FHIRPath function {name}()")

    def lambda_function(self, name: str, base: Fn, args: list[Fn]) -> Fn:
        if name == "exists" and not args:
            return lambda focus, env: [bool(base(focus, env))]
        (arg,) = args
        if name == "select":

            def select(focus: list[Any], env: _Env) -> list[Any]:
                out: list[Any] = []
                for item in base(focus, env):
                    out.extend(arg([item], env))
                return out

            return select

        def matching(focus: list[Any], env: _Env) -> list[Any]:
            return [item for item in base(focus, env) if _boolean(arg([item], env)) is True]

        if name == "where":
            return matching
        if name == "exists":
            return lambda focus, env: [bool(matching(focus, env))]

        def all_(focus: list[Any], env: _Env) -> list[Any]:
            return [all(_boolean(arg([item], env)) is True for item in base(focus, env))]

        return all_

    # ---- operators

    def binary(self, expr: Expr) -> Fn:
        op, left_expr, right_expr = expr.args
        left, right = self.compile(left_expr), self.compile(right_expr)
        if op in ("and", "or", "xor", "implies"):
            return _logic(op, left, right)
        if op in ("=", "!=", "~", "!~", "<", ">", "<=", ">="):
            temporal = None
            for side in (left_expr, right_expr):
                if is_temporal_type(side.ftype):
                    temporal = side.ftype == "time"
            return _comparison(op, left, right, temporal)
        if op == "|":
            return lambda focus, env: distinct(left(focus, env) + right(focus, env))
        if op in ("in", "contains"):
            item, coll = (left, right) if op == "in" else (right, left)

            def membership(focus: list[Any], env: _Env) -> list[Any]:
                wanted = item(focus, env)
                if not wanted:
                    return []
                return [any(json_equal(v, wanted[0]) for v in coll(focus, env))]

            return membership
        if op == "&":

            def concat(focus: list[Any], env: _Env) -> list[Any]:
                return [(_text(left(focus, env)) or "") + (_text(right(focus, env)) or "")]

            return concat
        strings = any(
            e.tag == "lit" and isinstance(e.args[0], str) for e in (left_expr, right_expr)
        )
        if op == "+" and strings:

            def plus_text(focus: list[Any], env: _Env) -> list[Any]:
                a, b = _text(left(focus, env)), _text(right(focus, env))
                return [] if a is None or b is None else [a + b]

            return plus_text
        return _arithmetic(op, left, right)


def _logic(op: str, left: Fn, right: Fn) -> Fn:
    def run(focus: list[Any], env: _Env) -> list[Any]:
        a, b = _boolean(left(focus, env)), _boolean(right(focus, env))
        result: bool | None
        if op == "and":
            result = (
                False if a is False or b is False else (None if a is None or b is None else True)
            )
        elif op == "or":
            result = True if a is True or b is True else (None if a is None or b is None else False)
        elif op == "xor":
            result = None if a is None or b is None else a != b
        else:  # implies: (not a) or b
            na = None if a is None else not a
            result = (
                True if na is True or b is True else (None if na is None or b is None else False)
            )
        return [] if result is None else [result]

    return run


def _equivalent_scalar(a: Any, b: Any, temporal: bool | None) -> bool:
    if temporal is not None and isinstance(a, str) and isinstance(b, str):
        return compare_temporal(a, b, temporal) == 0
    if isinstance(a, str) and isinstance(b, str):
        return fold(a.translate(_WHITESPACE)) == fold(b.translate(_WHITESPACE))
    if is_number(a) and is_number(b):
        places = min(scale(a), scale(b))
        return round_half_away(Decimal(a), places) == round_half_away(Decimal(b), places)
    return json_equal(a, b)


def _equal_collections(a: list[Any], b: list[Any], temporal: bool | None) -> bool | None:
    """FHIRPath `=` of two non-empty collections: item by item, in order; dates by the date
    rules (a pair that cannot be told makes the answer unknown unless another pair differs)."""
    if len(a) != len(b):
        return False
    unknown = False
    for x, y in zip(a, b, strict=True):
        if temporal is not None and isinstance(x, str) and isinstance(y, str):
            order = compare_temporal(x, y, temporal)
            if order is None:
                unknown = True
            elif order != 0:
                return False
        elif not json_equal(x, y):
            return False
    return None if unknown else True


def _comparison(op: str, left: Fn, right: Fn, temporal: bool | None) -> Fn:
    """=, !=, ~, !~, <, >, <=, >=. `temporal`: None, or whether the dates are times."""

    def run(focus: list[Any], env: _Env) -> list[Any]:
        a, b = left(focus, env), right(focus, env)
        result: bool | None
        if op in ("~", "!~"):
            if not a or not b:
                result = not a and not b
            elif len(a) == 1 and len(b) == 1:
                result = _equivalent_scalar(a[0], b[0], temporal)
            else:
                result = sorted(map(repr, map(canonical, a))) == sorted(
                    map(repr, map(canonical, b))
                )
            return [result if op == "~" else not result]
        if not a or not b:
            return []
        if op in ("=", "!="):
            result = _equal_collections(a, b, temporal)
            if result is None:
                return []
            return [result if op == "=" else not result]
        if len(a) > 1 or len(b) > 1:
            raise ViewEvaluationError(
                f"operator {op} needs one value on each side, got {len(a)} and {len(b)}"
            )
        x, y = a[0], b[0]
        order_: int | None = None
        if temporal is not None:
            if isinstance(x, str) and isinstance(y, str):
                order_ = compare_temporal(x, y, temporal)
        elif is_number(x) and is_number(y):
            order_ = (x > y) - (x < y)
        elif isinstance(x, str) and isinstance(y, str):
            order_ = (x > y) - (x < y)
        if order_ is None:
            return []
        if op == "<":
            return [order_ < 0]
        if op == ">":
            return [order_ > 0]
        if op == "<=":
            return [order_ <= 0]
        return [order_ >= 0]

    return run


def _arithmetic(op: str, left: Fn, right: Fn) -> Fn:
    def run(focus: list[Any], env: _Env) -> list[Any]:
        a = _number(left(focus, env), f"operator {op}")
        b = _number(right(focus, env), f"operator {op}")
        if a is None or b is None:
            return []
        if isinstance(a, int) and isinstance(b, int) and op in ("+", "-", "*"):
            return [a + b if op == "+" else a - b if op == "-" else a * b]
        x, y = pg_numeric(a), pg_numeric(b)
        if op == "+":
            return [EXACT.add(x, y)]
        if op == "-":
            return [EXACT.subtract(x, y)]
        if op == "*":
            return [EXACT.multiply(x, y)]
        if y.is_zero():
            return []
        if op == "/":
            return [pg_divide(x, y)]
        if op == "div":
            return [pg_divide(x, y).to_integral_value(rounding=ROUND_DOWN, context=EXACT)]
        # PostgreSQL's % keeps the dividend's sign (truncated division), as Decimal's does.
        remainder = EXACT.remainder(x, y)
        return [int(remainder) if isinstance(a, int) and isinstance(b, int) else remainder]

    return run


# --------------------------------------------------------------------------- views


def _as_text(value: Any) -> Any:
    return value if type(value) is str else text_of(value)


def _as_is(value: Any) -> Any:
    return value


class _Column:
    __slots__ = ("collection", "convert", "fn", "name")

    def __init__(self, column: Column, fn: Fn) -> None:
        self.name = column.name
        self.collection = column.collection
        target = sql_type(column.type, column.collection)
        self.convert: Callable[[Any], Any]
        if target == "jsonb":
            self.convert = _as_is
        elif target == "text":
            self.convert = _as_text
        else:
            name = column.name
            self.convert = lambda value: cast(value, target, name)
        self.fn = fn

    def value(self, focus: list[Any], env: _Env) -> Any:
        values = self.fn(focus, env)
        if self.collection:
            return values
        if not values:
            return None
        if len(values) > 1:
            raise ViewEvaluationError(
                f"column {self.name!r} gave {len(values)} values;"
                " set collection: true to keep them all"
            )
        return self.convert(values[0])


class _CompiledSelect:
    __slots__ = (
        "columns",
        "focus",
        "mode",
        "null_row",
        "repeat",
        "repeat_step",
        "selects",
        "union_all",
    )

    def __init__(self, select: Select, scope: Scope, typer: Typer, compiler: _Compiler) -> None:
        self.mode = "same"
        self.focus: Fn | None = None
        self.repeat: tuple[Fn, ...] = ()
        self.repeat_step: tuple[Fn, ...] = ()
        inner = scope
        if select.for_each is not None or select.for_each_or_null is not None:
            self.mode = "forEach" if select.for_each is not None else "forEachOrNull"
            path = select.for_each if select.for_each is not None else select.for_each_or_null
            assert path is not None
            items = typer.expression(path, scope)
            self.focus = compiler.compile(items)
            inner = Scope(items.fpath, elements=items.elements)
        elif select.repeat:
            self.mode = "repeat"
            # The first step starts from the focus; deeper steps from items of no one type.
            inner = Scope(None)
            self.repeat = tuple(
                compiler.compile(typer.value_expression(p, scope)) for p in select.repeat
            )
            self.repeat_step = tuple(
                compiler.compile(typer.value_expression(p, inner)) for p in select.repeat
            )
        self.columns = tuple(
            _Column(c, compiler.compile(typer.value_expression(c.path, inner)))
            for c in select.column
        )
        self.selects = tuple(_CompiledSelect(s, inner, typer, compiler) for s in select.select)
        self.union_all = tuple(_CompiledSelect(s, inner, typer, compiler) for s in select.union_all)
        self.null_row = select.null_row()

    def rows(self, item: Any, env: _Env) -> list[dict[str, Any]]:
        if self.mode == "same":
            return self._rows_for(item, env)
        if self.focus is not None:
            foci = self.focus([item], env)
            if not foci and self.mode == "forEachOrNull":
                return [dict(self.null_row)]
        else:
            foci = []
            self._walk(item, env, foci, self.repeat)
        out: list[dict[str, Any]] = []
        outer = env.row_index
        for index, focus in enumerate(foci):
            env.row_index = index
            out.extend(self._rows_for(focus, env))
        env.row_index = outer
        return out

    def _walk(self, item: Any, env: _Env, out: list[Any], paths: tuple[Fn, ...]) -> None:
        # Depth first, in document order: %rowIndex numbers the items in that order.
        for expression in paths:
            for child in expression([item], env):
                out.append(child)
                self._walk(child, env, out, self.repeat_step)

    def _rows_for(self, item: Any, env: _Env) -> list[dict[str, Any]]:
        focus = [item]
        row = {column.name: column.value(focus, env) for column in self.columns}
        rows = [row]
        for sub in self.selects:
            sub_rows = sub.rows(item, env)
            if not sub_rows:
                return []
            rows = _product(rows, sub_rows)
        if self.union_all:
            union_rows: list[dict[str, Any]] = []
            for branch in self.union_all:
                union_rows.extend(branch.rows(item, env))
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
    """A ViewDefinition with every FHIRPath expression resolved and compiled once."""

    __slots__ = ("_root", "_wheres", "view")

    def __init__(self, view: ViewDefinition) -> None:
        self.view = view
        typer = Typer(view.resource, {c.name: (c.value, c.value_type) for c in view.constant})
        compiler = _Compiler()
        scope = Scope(view.resource, at_root=True)
        self._wheres = tuple(
            (w.path, compiler.compile(typer.value_expression(w.path, scope))) for w in view.where
        )
        self._root = _CompiledSelect(Select(select=view.select), scope, typer, compiler)

    def rows(self, resource: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The view's rows for one resource ([] for another resource type or a where miss)."""
        if resource.get("resourceType") != self.view.resource:
            return []
        env = _Env(resource)
        focus = [resource]
        for text, where in self._wheres:
            result = where(focus, env)
            if result == [] or (len(result) == 1 and result[0] is False):
                return []
            if len(result) != 1 or result[0] is not True:
                raise ViewEvaluationError(
                    f"where {text!r} must give a boolean, gave {result[:3]!r}"
                )
        return self._root.rows(resource, env)

    def evaluate(self, resources: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The view's rows over many resources, in input order."""
        out: list[dict[str, Any]] = []
        for resource in resources:
            out.extend(self.rows(resource))
        return out


def compile_view(view: ViewDefinition) -> CompiledView:
    """Resolve and compile every expression of `view` once. Raises InvalidViewDefinition."""
    return CompiledView(view)


def evaluate(view: ViewDefinition, resources: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Evaluate `view` over `resources` (compiles it first; reuse compile_view in loops)."""
    return compile_view(view).evaluate(resources)


def python_engine() -> Callable[[dict[str, Any], list[dict[str, Any]]], list[dict[str, Any]]]:
    """This engine as the conformance runner takes one: `engine(view JSON, resources) -> rows`."""

    def run(view: dict[str, Any], resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return evaluate(load_view(view), resources)

    return run
