"""Compile SQL-on-FHIR v2 ViewDefinitions to one PostgreSQL SELECT over a jsonb resource table.

Every FHIRPath collection is a jsonb array at run time; member access becomes SQL/JSON path
(`$[*]."name"[*]` unwraps arrays, and `[*]` on a scalar wraps it, in lax mode), and the
operations SQL/JSON path cannot express (where, first, join, ...) become correlated
subqueries over `jsonb_array_elements`. Errors the spec raises at evaluation time (a
non-collection column with several values, a where clause that is not boolean) are raised
by PostgreSQL through a failing cast whose message starts with `SQL-on-FHIR:`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import psycopg
from fhirpathpy.models import models as fhir_models
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from receiver.errors import BatchLayerUnavailable, InvalidViewDefinition
from serving.conformance import register_engine
from serving.evaluator import ViewEvaluationError
from serving.viewdef import Select, ViewDefinition, load_view

__all__ = ["column_sql_types", "compile_view", "postgres_engine"]

ERROR_MARKER = "SQL-on-FHIR:"

_TEXT_TYPES = frozenset(
    {
        "string", "code", "id", "uri", "url", "canonical", "markdown", "oid", "uuid",
        "base64Binary", "date", "dateTime", "instant", "time", "xhtml",
    }
)  # fmt: skip
_INTEGER_TYPES = frozenset({"integer", "positiveInt", "unsignedInt"})
_NUMBER_TYPES = _INTEGER_TYPES | {"decimal"}
_PRIMITIVE_TYPES = _TEXT_TYPES | _NUMBER_TYPES | {"boolean", "integer64"}


def _sql_type(fhir_type: str | None, collection: bool) -> str:
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


def _lit(value: str) -> str:
    if "\x00" in value:
        raise InvalidViewDefinition("text with a NUL character cannot be compiled")
    return sql.Literal(value).as_string(None)


def _ident(name: str) -> str:
    return sql.Identifier(name).as_string(None)


def _jsonb(value: Any) -> str:
    return f"{_lit(json.dumps(value))}::jsonb"


def _jp_string(value: str) -> str:
    """A SQL/JSON path string literal (JSON escapes; ASCII only so nothing can break out)."""
    return json.dumps(value, ensure_ascii=True)


# --------------------------------------------------------------------------- FHIRPath parser

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<date>@[0-9T][0-9T:.\-+Z]*)
  | (?P<num>\d+(?:\.\d+)?)
  | (?P<str>'(?:[^'\\]|\\.)*')
  | (?P<bt>`(?:[^`\\]|\\.)*`)
  | (?P<ext>%(?:[A-Za-z_][A-Za-z0-9_]*|`(?:[^`\\]|\\.)*`|'(?:[^'\\]|\\.)*'))
  | (?P<var>\$(?:this|index|total))
  | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|!=|!~|[-+*/&|=~<>(),.\[\]{}])
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "'": "'", '"': '"', "`": "`", "\\": "\\"}

Node = tuple[Any, ...]


def _unescape(body: str) -> str:
    def repl(match: re.Match[str]) -> str:
        esc = match.group(1)
        if esc.startswith("u"):
            return chr(int(esc[1:], 16))
        return _ESCAPES.get(esc, esc)

    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", repl, body)


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise InvalidViewDefinition(f"invalid FHIRPath {text!r} at {text[pos : pos + 10]!r}")
        pos = match.end()
        kind = match.lastgroup or ""
        value = match.group()
        if kind == "ws":
            continue
        if kind == "str":
            value = _unescape(value[1:-1])
        elif kind == "bt":
            kind, value = "id", _unescape(value[1:-1])
        elif kind == "ext":
            value = value[1:]
            if value[:1] in "`'":
                value = _unescape(value[1:-1])
        tokens.append((kind, value))
    tokens.append(("eof", ""))
    return tokens


# Binary operators by precedence, loosest first (FHIRPath spec section 6).
_LEVELS: list[set[str]] = [
    {"implies"},
    {"or", "xor"},
    {"and"},
    {"in", "contains"},
    {"=", "~", "!=", "!~"},
    {"<", ">", "<=", ">="},
    {"|"},
    {"is", "as"},
    {"+", "-", "&"},
    {"*", "/", "div", "mod"},
]


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    def fail(self, why: str) -> InvalidViewDefinition:
        return InvalidViewDefinition(f"invalid FHIRPath {self.text!r}: {why}")

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.pos]

    def take(self) -> tuple[str, str]:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def expect(self, value: str) -> None:
        kind, got = self.take()
        if kind != "op" or got != value:
            raise self.fail(f"expected {value!r}, got {got or 'end'!r}")

    def parse(self) -> Node:
        node = self.binary(0)
        if self.peek()[0] != "eof":
            raise self.fail(f"unexpected {self.peek()[1]!r}")
        return node

    def binary(self, level: int) -> Node:
        if level == len(_LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while True:
            kind, value = self.peek()
            if kind not in ("op", "id") or value not in _LEVELS[level]:
                return left
            self.take()
            if value in ("is", "as"):
                left = ("type", value, left, self.type_name())
            else:
                left = ("bin", value, left, self.binary(level + 1))

    def type_name(self) -> str:
        kind, name = self.take()
        if kind != "id":
            raise self.fail("expected a type name")
        while self.peek() == ("op", "."):
            self.take()
            kind, name = self.take()
            if kind != "id":
                raise self.fail("expected a type name")
        return name

    def unary(self) -> Node:
        kind, value = self.peek()
        if kind == "op" and value in ("+", "-"):
            self.take()
            return ("unary", value, self.unary())
        return self.postfix(self.term())

    def term(self) -> Node:
        kind, value = self.take()
        if kind == "num":
            return ("lit", Decimal(value) if "." in value else int(value))
        if kind == "str":
            return ("lit", value)
        if kind == "date":
            return ("lit", value[1:])
        if kind == "ext":
            return ("ext", value)
        if kind == "var":
            if value != "$this":
                raise self.fail(f"{value} is not supported")
            return ("this",)
        if kind == "op" and value == "(":
            node = self.binary(0)
            self.expect(")")
            return node
        if kind == "op" and value == "{":
            self.expect("}")
            return ("empty",)
        if kind == "id":
            if value in ("true", "false"):
                return ("lit", value == "true")
            return self.invocation(("this",), value)
        raise self.fail(f"unexpected {value or 'end'!r}")

    def invocation(self, base: Node, name: str) -> Node:
        if self.peek() != ("op", "("):
            return ("member", base, name)
        self.take()
        args: list[Node] = []
        if self.peek() != ("op", ")"):
            args.append(self.binary(0))
            while self.peek() == ("op", ","):
                self.take()
                args.append(self.binary(0))
        self.expect(")")
        return ("call", base, name, tuple(args))

    def postfix(self, node: Node) -> Node:
        while True:
            kind, value = self.peek()
            if kind == "op" and value == ".":
                self.take()
                kind, name = self.take()
                if kind != "id":
                    raise self.fail(f"expected a name after '.', got {name or 'end'!r}")
                node = self.invocation(node, name)
            elif kind == "op" and value == "[":
                self.take()
                index = self.binary(0)
                self.expect("]")
                node = ("index", node, index)
            else:
                return node


def parse_fhirpath(text: str) -> Node:
    """Parse a FHIRPath expression into a small tuple tree (raises InvalidViewDefinition)."""
    return _Parser(text).parse()


# --------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class _E:
    """A compiled expression.

    kind "coll": `sql` is a non-null jsonb array (optionally `base` + SQL/JSON `path`);
    "value": a jsonb scalar or NULL for empty; "bool": SQL boolean, NULL for empty;
    "num": SQL numeric, NULL for empty; "text": SQL text, NULL for empty.
    """

    kind: str
    sql: str
    base: str | None = None
    path: str = ""
    literal: Any = None
    fpath: str | None = None  # the FHIR element path, e.g. "Patient.birthDate", when known
    ftype: str | None = None  # the FHIR type, when known (from the model or ofType)


def _path_coll(base: str, path: str) -> _E:
    return _E("coll", f"jsonb_path_query_array({base}, {_lit(path)})", base, path)


def _coll_of(value_sql: str) -> str:
    return (
        f"(CASE WHEN ({value_sql}) IS NULL THEN '[]'::jsonb"
        f" ELSE jsonb_build_array({value_sql}) END)"
    )


_MODEL: dict[str, Any] = fhir_models["r4"]
_PATH_TO_TYPE: dict[str, str] = _MODEL["path2Type"]
_DEFINED_ELSEWHERE: dict[str, str] = _MODEL["pathsDefinedElsewhere"]
_DATE_RE = r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T([0-9:.]*)(Z|[+-]\d{2}:\d{2})?)?$"
_TIME_RE = r"^(\d{2})(?::(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?$"


def _model_type(fpath: str | None) -> str | None:
    if fpath is None:
        return None
    if "." not in fpath:
        return fpath
    return _PATH_TO_TYPE.get(fpath)


def _time_boundary(text: str, high: bool) -> str:
    fill, digit = ("59", "9") if high else ("00", "0")
    t = f"regexp_match({text}, {_lit(_TIME_RE)})"
    return (
        f"(SELECT m[1] || ':' || COALESCE(m[2], '{fill}') || ':' || COALESCE(m[3], '{fill}')"
        f" || '.' || rpad(left(COALESCE(m[4], ''), 3), 3, '{digit}') FROM (SELECT {t} AS m) AS t)"
    )


def _date_boundary(text: str, high: bool, with_time: bool) -> str:
    month = "COALESCE(m[2], '12')" if high else "COALESCE(m[2], '01')"
    last_day = (
        f"to_char(make_date(m[1]::integer, {month}::integer, 1)"
        " + interval '1 month' - interval '1 day', 'DD')"
    )
    day = f"COALESCE(m[3], {last_day})" if high else "COALESCE(m[3], '01')"
    date = f"m[1] || '-' || {month} || '-' || {day}"
    if with_time:
        clock = _time_boundary(f"COALESCE(NULLIF(m[4], ''), '{'23' if high else '00'}')", high)
        zone = f"COALESCE(m[5], '{'-12:00' if high else '+14:00'}')"
        date = f"{date} || 'T' || {clock} || {zone}"
    return f"(SELECT {date} FROM (SELECT regexp_match({text}, {_lit(_DATE_RE)}) AS m) AS d)"


def _raise_sql(message_sql: str, sql_type: str) -> str:
    """An expression that fails at run time with `message_sql` (text) in the error.

    A failing cast of text that depends on the row: PostgreSQL cannot fold it at plan time.
    """
    failing = f"(({_lit(ERROR_MARKER + ' ')} || {message_sql})::integer)"
    return f"to_jsonb{failing}" if sql_type == "jsonb" else f"({failing})::{sql_type}"


@dataclass(frozen=True)
class _Ctx:
    focus: str  # jsonb array: the focus collection ($this)
    row_index: str  # SQL integer
    root: str  # jsonb array holding the resource
    fpath: str | None = None  # the FHIR element path of the focus, when known


class _Compiler:
    def __init__(self, view: ViewDefinition) -> None:
        self.view = view
        self.constants = {c.name: c for c in view.constant}
        self.counter = 0

    def alias(self) -> str:
        self.counter += 1
        return f"_a{self.counter}"

    # ---- conversions between kinds

    def coll(self, e: _E) -> str:
        if e.kind == "coll":
            return e.sql
        if e.kind == "bool" and e.literal is not None:
            return _jsonb([e.literal])
        return _coll_of(self.value(e))

    def value(self, e: _E) -> str:
        if e.kind == "value":
            return e.sql
        if e.kind in ("bool", "num", "text"):
            return f"to_jsonb({e.sql})"
        return f"({e.sql} -> 0)"

    def boolean(self, e: _E) -> str:
        if e.kind == "bool":
            return e.sql
        v = self.value(e) if e.kind != "coll" else f"({e.sql} -> 0)"
        return (
            f"(CASE WHEN {v} IS NULL THEN NULL WHEN {v} = 'false'::jsonb THEN false ELSE true END)"
        )

    def num(self, e: _E) -> str:
        if e.kind == "num":
            return e.sql
        return f"({self.value(e)})::numeric"

    def text(self, e: _E) -> str:
        if e.kind == "text":
            return e.sql
        if e.kind in ("bool", "num"):
            return f"({e.sql})::text"
        return f"({self.value(e)} #>> '{{}}')"

    # ---- compilation

    def compile(self, expression: str, ctx: _Ctx) -> _E:
        return self.expr(parse_fhirpath(expression), ctx)

    def expr(self, node: Node, ctx: _Ctx) -> _E:
        tag = node[0]
        if tag == "lit":
            value = node[1]
            if isinstance(value, bool):
                return _E("bool", "true" if value else "false", literal=value)
            if isinstance(value, Decimal):
                return _E("value", f"{_lit(str(value))}::jsonb", literal=value)
            return _E("value", _jsonb(value), literal=value)
        if tag == "empty":
            return _E("coll", "'[]'::jsonb")
        if tag == "this":
            return _E("coll", ctx.focus, fpath=ctx.fpath, ftype=_model_type(ctx.fpath))
        if tag == "ext":
            return self.external(node[1], ctx)
        if tag == "member":
            base = self.expr(node[1], ctx)
            if node[1] == ("this",) and node[2] == self.view.resource and ctx.focus == ctx.root:
                return base
            return self.member(base, node[2])
        if tag == "index":
            return self.index(self.expr(node[1], ctx), node[2], ctx)
        if tag == "call":
            return self.call(node[1], node[2], node[3], ctx)
        if tag == "unary":
            operand = self.expr(node[2], ctx)
            return _E("num", f"(-{self.num(operand)})") if node[1] == "-" else operand
        if tag == "type":
            filtered = self.of_type(self.expr(node[2], ctx), node[3])
            if node[1] == "is":
                return _E("bool", f"(jsonb_array_length({filtered.sql}) > 0)")
            return filtered
        if tag == "bin":
            return self.binary(node[1], node[2], node[3], ctx)
        raise InvalidViewDefinition(f"unsupported FHIRPath construct {tag}")

    def external(self, name: str, ctx: _Ctx) -> _E:
        if name == "rowIndex":
            return _E("num", ctx.row_index)
        if name in ("resource", "rootResource", "context"):
            return _E("coll", ctx.root)
        if name == "ucum":
            return _E("value", _jsonb("http://unitsofmeasure.org"))
        if name == "sct":
            return _E("value", _jsonb("http://snomed.info/sct"))
        if name == "loinc":
            return _E("value", _jsonb("http://loinc.org"))
        const = self.constants.get(name)
        if const is None:
            raise InvalidViewDefinition(f"%{name} is not a constant of the view")
        if isinstance(const.value, bool):
            return _E("bool", "true" if const.value else "false", literal=const.value)
        return _E("value", _jsonb(const.value), literal=const.value)

    def member(self, base: _E, name: str) -> _E:
        step = f".{_jp_string(name)}[*]"
        if base.kind == "coll" and base.base is not None:
            out = _path_coll(base.base, base.path + step)
        else:
            out = _path_coll(self.coll(base), "$[*]" + step)
        if base.fpath is None:
            return out
        fpath = _DEFINED_ELSEWHERE.get(f"{base.fpath}.{name}", f"{base.fpath}.{name}")
        return replace(out, fpath=fpath, ftype=_model_type(fpath))

    def jsonpath(self, base: _E, tail: str) -> _E:
        """Apply SQL/JSON path `tail` (starting at `$`) to the collection as a whole."""
        return replace(_path_coll(self.coll(base), tail), fpath=base.fpath, ftype=base.ftype)

    def index(self, base: _E, index_node: Node, ctx: _Ctx) -> _E:
        if index_node[0] == "lit" and type(index_node[1]) is int:
            return self.jsonpath(base, f"$[{index_node[1]}]")
        idx = self.num(self.expr(index_node, ctx))
        return _E("coll", _coll_of(f"({self.coll(base)} -> ({idx})::integer)"))

    def elements(self, coll: str) -> tuple[str, str]:
        """(FROM item, alias) iterating a collection's elements as alias.e, alias.o."""
        a = self.alias()
        return f"jsonb_array_elements({coll}) WITH ORDINALITY AS {a}(e, o)", a

    def lambda_ctx(self, alias: str, ctx: _Ctx, base: _E | None = None) -> _Ctx:
        fpath = base.fpath if base is not None else None
        return _Ctx(f"jsonb_build_array({alias}.e)", ctx.row_index, ctx.root, fpath)

    def filter(self, base: _E, cond: Node, ctx: _Ctx) -> _E:
        src, a = self.elements(self.coll(base))
        test = self.boolean(self.expr(cond, self.lambda_ctx(a, ctx, base)))
        return _E(
            "coll",
            f"(SELECT COALESCE(jsonb_agg({a}.e ORDER BY {a}.o), '[]'::jsonb) FROM {src}"
            f" WHERE {test})",
            fpath=base.fpath,
            ftype=base.ftype,
        )

    def of_type(self, base: _E, type_name: str) -> _E:
        checks = {"boolean": "boolean", "integer64": "string"}
        if type_name in _PRIMITIVE_TYPES:
            json_type = checks.get(type_name, "number" if type_name in _NUMBER_TYPES else "string")
            filtered = self.jsonpath(base, f'$[*] ? (@.type() == "{json_type}")')
        else:
            resource = _jp_string(type_name)
            filtered = self.jsonpath(base, f"$[*] ? (@.resourceType == {resource})")
        if base.kind == "coll" and base.base is not None and base.path.endswith("[*]"):
            # A choice element: value.ofType(Quantity) is the JSON property valueQuantity.
            match = re.search(r'\.("(?:[^"\\]|\\.)*")\[\*\]$', base.path)
            if match:
                name = json.loads(match.group(1))
                choice = name + type_name[:1].upper() + type_name[1:]
                prefix = base.path[: match.start()]
                typed = _path_coll(base.base, f"{prefix}.{_jp_string(choice)}[*]")
                return _E("coll", f"({typed.sql} || {filtered.sql})", ftype=type_name)
        return replace(filtered, fpath=None, ftype=type_name)

    def call(self, base_node: Node, name: str, args: tuple[Node, ...], ctx: _Ctx) -> _E:
        base = self.expr(base_node, ctx)

        def arity(*allowed: int) -> None:
            if len(args) not in allowed:
                raise InvalidViewDefinition(f"{name}() takes {allowed} arguments, not {len(args)}")

        if name == "exists":
            arity(0, 1)
            target = self.filter(base, args[0], ctx) if args else base
            return _E("bool", f"(jsonb_array_length({self.coll(target)}) > 0)")
        if name == "empty":
            arity(0)
            return _E("bool", f"(jsonb_array_length({self.coll(base)}) = 0)")
        if name == "count":
            arity(0)
            return _E("num", f"jsonb_array_length({self.coll(base)})::numeric")
        if name == "where":
            arity(1)
            return self.filter(base, args[0], ctx)
        if name == "first":
            arity(0)
            return self.jsonpath(base, "$[0]")
        if name == "last":
            arity(0)
            return self.jsonpath(base, "$[last]")
        if name == "tail":
            arity(0)
            return self.jsonpath(base, "$[1 to last]")
        if name in ("skip", "take"):
            arity(1)
            if args[0][0] != "lit" or type(args[0][1]) is not int:
                raise InvalidViewDefinition(f"{name}() needs an integer literal")
            n = int(args[0][1])
            if name == "skip":
                return self.jsonpath(base, f"$[{max(n, 0)} to last]")
            return self.jsonpath(base, f"$[0 to {n - 1}]") if n > 0 else _E("coll", "'[]'::jsonb")
        if name == "not":
            arity(0)
            return _E("bool", f"(NOT {self.boolean(base)})")
        if name == "hasValue":
            arity(0)
            return _E("bool", f"(jsonb_array_length({self.coll(base)}) = 1)")
        if name == "join":
            arity(0, 1)
            sep = self.text(self.expr(args[0], ctx)) if args else "''"
            src, a = self.elements(self.coll(base))
            return _E(
                "text",
                f"(SELECT COALESCE(string_agg({a}.e #>> '{{}}', {sep} ORDER BY {a}.o), '')"
                f" FROM {src})",
            )
        if name == "ofType":
            arity(1)
            return self.of_type(base, self.type_arg(args[0]))
        if name == "extension":
            arity(1)
            if args[0][0] != "lit" or not isinstance(args[0][1], str):
                raise InvalidViewDefinition("extension() needs a string literal url")
            url = _jp_string(args[0][1])
            ext = self.member(base, "extension")
            assert ext.base is not None
            return _path_coll(ext.base, f'{ext.path} ? (@."url" == {url})')
        if name == "getResourceKey":
            arity(0)
            return self.member(base, "id")
        if name == "getReferenceKey":
            arity(0, 1)
            return self.reference_key(base, self.type_arg(args[0]) if args else None)
        if name == "select":
            arity(1)
            src, a = self.elements(self.coll(base))
            inner = self.coll(self.expr(args[0], self.lambda_ctx(a, ctx)))
            b = self.alias()
            return _E(
                "coll",
                f"(SELECT COALESCE(jsonb_agg({b}.e ORDER BY {a}.o, {b}.o), '[]'::jsonb)"
                f" FROM {src} CROSS JOIN LATERAL jsonb_array_elements({inner})"
                f" WITH ORDINALITY AS {b}(e, o))",
            )
        if name == "all":
            arity(1)
            src, a = self.elements(self.coll(base))
            test = self.boolean(self.expr(args[0], self.lambda_ctx(a, ctx)))
            return _E("bool", f"(NOT EXISTS (SELECT 1 FROM {src} WHERE {test} IS NOT TRUE))")
        if name == "distinct":
            arity(0)
            return self.distinct(self.coll(base))
        if name in ("lowBoundary", "highBoundary"):
            arity(0)
            return self.boundary(base, high=name == "highBoundary")
        if name in ("lower", "upper", "length", "toString", "startsWith", "endsWith"):
            return self.string_function(name, base, args, ctx)
        raise InvalidViewDefinition(f"unsupported FHIRPath function {name}()")

    def string_function(self, name: str, base: _E, args: tuple[Node, ...], ctx: _Ctx) -> _E:
        text = self.text(base)
        if name in ("lower", "upper"):
            return _E("text", f"{name}({text})")
        if name == "length":
            return _E("num", f"length({text})::numeric")
        if name == "toString":
            return _E("text", text)
        if len(args) != 1:
            raise InvalidViewDefinition(f"{name}() takes one argument")
        arg = self.text(self.expr(args[0], ctx))
        if name == "startsWith":
            return _E("bool", f"starts_with({text}, {arg})")
        return _E("bool", f"(right({text}, length({arg})) = {arg})")

    def boundary(self, base: _E, high: bool) -> _E:
        """lowBoundary()/highBoundary() of decimals, dates, dateTimes and times."""
        src, a = self.elements(self.coll(base))
        text = f"({a}.e #>> '{{}}')"
        number = f"({a}.e)::numeric"
        decimal = (
            f"to_jsonb({number} {'+' if high else '-'} 0.5 * power(10::numeric, -scale({number})))"
        )
        options = {
            "decimal": decimal,
            "date": f"to_jsonb({_date_boundary(text, high, with_time=False)})",
            "dateTime": f"to_jsonb({_date_boundary(text, high, with_time=True)})",
            "time": f"to_jsonb({_time_boundary(text, high)})",
        }
        kind = {"integer": "decimal", "instant": "dateTime"}.get(base.ftype or "", base.ftype)
        if kind in options:
            value = options[kind]
        else:
            value = (
                f"(CASE WHEN jsonb_typeof({a}.e) = 'number' THEN {decimal}"
                f" WHEN jsonb_typeof({a}.e) <> 'string' THEN NULL"
                f" WHEN {text} ~ {_lit(_TIME_RE)} THEN {options['time']}"
                f" ELSE {options['dateTime']} END)"
            )
        v = self.alias()
        return _E(
            "coll",
            f"(SELECT COALESCE(jsonb_agg({v}.x ORDER BY {a}.o), '[]'::jsonb) FROM {src}"
            f" CROSS JOIN LATERAL (SELECT {value} AS x) AS {v} WHERE {v}.x IS NOT NULL)",
            ftype=base.ftype,
        )

    def type_arg(self, node: Node) -> str:
        if node[0] == "member" and node[1] == ("this",):
            return str(node[2])
        if node[0] == "member" and node[1][0] == "member" and node[1][1] == ("this",):
            return str(node[2])  # FHIR.Quantity, System.String
        raise InvalidViewDefinition("expected a type name")

    def reference_key(self, base: _E, type_name: str | None) -> _E:
        refs = self.jsonpath(self.member(base, "reference"), '$[*] ? (@.type() == "string")')
        src, a = self.elements(refs.sql)
        m = self.alias()
        wanted = f" AND {m}.v[1] = {_lit(type_name)}" if type_name else ""
        # Same keys as serving.evaluator.reference_key: "Patient/1", ".../fhir/Patient/1",
        # "Patient/1/_history/2" all give "1"; contained ("#x") and URN references none.
        pattern = _lit(r"^(?:.*/)?([A-Z][A-Za-z0-9]*)/([^/?#]+)(?:/_history/[^/?]+)?/?(?:\?.*)?$")
        return _E(
            "coll",
            f"(SELECT COALESCE(jsonb_agg(to_jsonb({m}.v[2]) ORDER BY {a}.o), '[]'::jsonb)"
            f" FROM {src} CROSS JOIN LATERAL regexp_match({a}.e #>> '{{}}', {pattern}) AS {m}(v)"
            f" WHERE {m}.v IS NOT NULL{wanted})",
        )

    def distinct(self, coll: str) -> _E:
        src, a = self.elements(coll)
        d = self.alias()
        return _E(
            "coll",
            f"(SELECT COALESCE(jsonb_agg({d}.e ORDER BY {d}.o), '[]'::jsonb) FROM"
            f" (SELECT DISTINCT ON ({a}.e) {a}.e, {a}.o FROM {src} ORDER BY {a}.e, {a}.o) AS {d})",
        )

    def binary(self, op: str, left_node: Node, right_node: Node, ctx: _Ctx) -> _E:
        left = self.expr(left_node, ctx)
        right = self.expr(right_node, ctx)
        if op in ("and", "or"):
            return _E("bool", f"({self.boolean(left)} {op.upper()} {self.boolean(right)})")
        if op == "xor":
            return _E("bool", f"({self.boolean(left)} <> {self.boolean(right)})")
        if op == "implies":
            return _E("bool", f"(NOT {self.boolean(left)} OR {self.boolean(right)})")
        if op in ("=", "!=", "~", "!~"):
            return self.equality(op, left, right)
        if op in ("<", ">", "<=", ">="):
            if left.kind == "num" or right.kind == "num":
                return _E("bool", f"({self.num(left)} {op} {self.num(right)})")
            return _E("bool", f"({self.value(left)} {op} {self.value(right)})")
        if op == "|":
            return self.distinct(f"({self.coll(left)} || {self.coll(right)})")
        if op == "&":
            return _E(
                "text", f"(COALESCE({self.text(left)}, '') || COALESCE({self.text(right)}, ''))"
            )
        if op in ("in", "contains"):
            item, coll = (left, right) if op == "in" else (right, left)
            src, a = self.elements(self.coll(coll))
            v = self.value(item)
            return _E(
                "bool",
                f"(CASE WHEN {v} IS NULL THEN NULL ELSE EXISTS (SELECT 1 FROM {src}"
                f" WHERE {a}.e = {v}) END)",
            )
        if op == "+" and (isinstance(left.literal, str) or isinstance(right.literal, str)):
            return _E("text", f"({self.text(left)} || {self.text(right)})")
        if op in ("+", "-", "*"):
            return _E("num", f"({self.num(left)} {op} {self.num(right)})")
        if op == "/":
            return _E("num", f"({self.num(left)} / NULLIF({self.num(right)}, 0))")
        if op == "div":
            return _E("num", f"trunc({self.num(left)} / NULLIF({self.num(right)}, 0))")
        if op == "mod":
            return _E("num", f"({self.num(left)} % NULLIF({self.num(right)}, 0))")
        raise InvalidViewDefinition(f"unsupported FHIRPath operator {op}")

    def equality(self, op: str, left: _E, right: _E) -> _E:
        negate = op.startswith("!")
        scalar = ("value", "bool", "num", "text")
        if left.kind in scalar and right.kind in scalar:
            if left.kind == "num" or right.kind == "num":
                test = f"({self.num(left)} = {self.num(right)})"
            else:
                test = f"({self.value(left)} = {self.value(right)})"
            if "~" in op:
                test = (
                    f"COALESCE({test}, {self.value(left)} IS NULL AND {self.value(right)} IS NULL)"
                )
        else:
            lc, rc = self.coll(left), self.coll(right)
            empty = (
                "NULL"
                if "~" not in op
                else f"(jsonb_array_length({lc}) = jsonb_array_length({rc}))"
            )
            test = (
                f"(CASE WHEN jsonb_array_length({lc}) = 0 OR jsonb_array_length({rc}) = 0"
                f" THEN {empty} ELSE {lc} = {rc} END)"
            )
        return _E("bool", f"(NOT {test})" if negate else test)

    # ---- columns and row sources

    def column(
        self, path: str, fhir_type: str | None, collection: bool, name: str, ctx: _Ctx
    ) -> str:
        e = self.compile(path, ctx)
        sql_type = _sql_type(fhir_type, collection)
        if collection:
            return self.coll(e)
        if e.kind == "coll":
            message = _lit(f'column "{name}" is not a collection but its path returned ')
            count = f"jsonb_array_length({e.sql})"
            error = _raise_sql(f"{message} || {count} || ' values'", "jsonb")
            single = f"(CASE WHEN {count} > 1 THEN {error} ELSE {e.sql} -> 0 END)"
            e = _E("value", single)
        if sql_type == "jsonb":
            return self.value(e)
        if sql_type == "text":
            return self.text(e)
        if sql_type == "boolean":
            return self.boolean(e) if e.kind != "value" else f"({e.sql})::boolean"
        if sql_type == "bigint" and e.kind == "value":
            return f"({self.text(e)})::bigint"
        if e.kind == "num":
            return f"({e.sql})::{sql_type}"
        return f"({self.value(e)})::{sql_type}"

    def where(self, path: str, ctx: _Ctx) -> str:
        e = self.compile(path, ctx)
        if e.kind == "bool":
            return f"COALESCE({e.sql}, false)"
        c = self.coll(e)
        message = _lit(f"where path {path!r} returned ")
        return (
            f"(CASE WHEN {c} = '[true]'::jsonb THEN true"
            f" WHEN {c} = '[false]'::jsonb OR {c} = '[]'::jsonb THEN false"
            f" ELSE {_raise_sql(f'{message} || {c}::text', 'boolean')} END)"
        )

    def iterate(self, sel: Select, ctx: _Ctx) -> tuple[str, _Ctx]:
        """The FROM item that sets this select's focus, and the context inside it."""
        if sel.for_each is not None or sel.for_each_or_null is not None:
            path = sel.for_each if sel.for_each is not None else sel.for_each_or_null
            assert path is not None
            items = self.compile(path, ctx)
            src, a = self.elements(self.coll(items))
            if sel.for_each is not None:
                focus = _Ctx(f"jsonb_build_array({a}.e)", f"({a}.o - 1)", ctx.root, items.fpath)
                return src, focus
            return (
                f"(VALUES (1)) AS {a}_one(x) LEFT JOIN LATERAL {src} ON true",
                _Ctx(_coll_of(f"{a}.e"), f"COALESCE({a}.o - 1, 0)", ctx.root, items.fpath),
            )
        if sel.repeat:
            a = self.alias()
            step_ctx = _Ctx(f"{a}_r.c", ctx.row_index, ctx.root)
            first = " || ".join(self.coll(self.compile(p, ctx)) for p in sel.repeat)
            step = " || ".join(self.coll(self.compile(p, step_ctx)) for p in sel.repeat)
            recursive = (
                f"WITH RECURSIVE {a}_r(c, k) AS ("
                f"SELECT jsonb_build_array({a}_i.e), ARRAY[{a}_i.o]"
                f" FROM jsonb_array_elements({first}) WITH ORDINALITY AS {a}_i(e, o)"
                f" UNION ALL SELECT jsonb_build_array({a}_s.e), {a}_r.k || {a}_s.o"
                f" FROM {a}_r CROSS JOIN LATERAL jsonb_array_elements({step})"
                f" WITH ORDINALITY AS {a}_s(e, o))"
                f" SELECT {a}_r.c, row_number() OVER (ORDER BY {a}_r.k) - 1 AS i FROM {a}_r"
            )
            return f"({recursive}) AS {a}", _Ctx(f"{a}.c", f"{a}.i", ctx.root)
        a = self.alias()
        return f"(VALUES (1)) AS {a}(x)", ctx

    def rowsource(self, sel: Select, ctx: _Ctx) -> tuple[str, list[str]]:
        """A SELECT giving this select's rows for the current focus, and its column names."""
        source, inner = self.iterate(sel, ctx)
        items: list[str] = []
        names: list[str] = []
        for col in sel.column:
            expr = self.column(col.path, col.type, col.collection, col.name, inner)
            items.append(f"{expr} AS {_ident(col.name)}")
            names.append(col.name)
        for child in sel.select:
            sub, sub_names = self.rowsource(child, inner)
            b = self.alias()
            source += f" CROSS JOIN LATERAL ({sub}) AS {b}"
            items.extend(f"{b}.{_ident(n)}" for n in sub_names)
            names.extend(sub_names)
        if sel.union_all:
            branches = [self.rowsource(branch, inner) for branch in sel.union_all]
            first_names = branches[0][1]
            for _, branch_names in branches[1:]:
                if branch_names != first_names:
                    raise InvalidViewDefinition("unionAll branches must have the same columns")
            b = self.alias()
            union = " UNION ALL ".join(f"({sub})" for sub, _ in branches)
            source += f" CROSS JOIN LATERAL ({union}) AS {b}"
            items.extend(f"{b}.{_ident(n)}" for n in first_names)
            names.extend(first_names)
        return f"SELECT {', '.join(items)} FROM {source}", names

    def view_sql(self, table: str) -> str:
        root = "jsonb_build_array(_r.resource)"
        ctx = _Ctx(root, "0", root, self.view.resource)
        top = Select(select=self.view.select)
        body, names = self.rowsource(top, ctx)
        conditions = [f"_r.resource_type = {_lit(self.view.resource)}", "NOT _r.deleted"]
        conditions.extend(self.where(w.path, ctx) for w in self.view.where)
        columns = ", ".join(f"_v.{_ident(n)}" for n in names)
        return (
            f"SELECT {columns} FROM {_qualified(table)} AS _r CROSS JOIN LATERAL ({body}) AS _v"
            f" WHERE {' AND '.join(conditions)}"
        )


def _qualified(table: str) -> str:
    parts = table.split(".")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", p) for p in parts) or len(parts) > 3:
        raise InvalidViewDefinition(f"table name {table!r} must be a plain [schema.]name")
    return ".".join(_ident(p) for p in parts)


def _as_view(view: Mapping[str, Any] | ViewDefinition) -> ViewDefinition:
    return view if isinstance(view, ViewDefinition) else load_view(view)


def compile_view(view: Mapping[str, Any] | ViewDefinition, *, table: str) -> str:
    """One PostgreSQL SELECT giving the view's rows over `table`.

    `table` has columns `resource_type text, resource jsonb, deleted boolean`. Raises
    InvalidViewDefinition (with the reason) for a view that is invalid or uses FHIRPath
    this compiler cannot translate.
    """
    return _Compiler(_as_view(view)).view_sql(table)


def column_sql_types(view: Mapping[str, Any] | ViewDefinition) -> list[tuple[str, str]]:
    """The view's output columns in order with the PostgreSQL type compile_view gives them."""
    return [(c.name, _sql_type(c.type, c.collection)) for c in _as_view(view).columns]


# --------------------------------------------------------------------------- engine


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _evaluation_error(exc: psycopg.Error) -> str:
    message = exc.diag.message_primary or str(exc)
    start = message.find(ERROR_MARKER)
    if start >= 0:
        return message[start + len(ERROR_MARKER) :].strip().removesuffix('"')
    return f"evaluating the view failed: {message}"


def postgres_engine(
    dsn: str,
) -> Callable[[Mapping[str, Any], list[dict[str, Any]]], list[dict[str, Any]]]:
    """An engine evaluating a view with PostgreSQL: `engine(view, resources) -> rows`.

    Each call loads the resources into a temporary table (PostgreSQL's per-session
    temporary schema, dropped when the transaction ends), runs the compiled SQL and
    returns JSON-compatible rows. Errors the view raises at evaluation time become
    ViewEvaluationError (an InvalidViewDefinition, as in the Python engine); an unreachable
    database BatchLayerUnavailable.
    """

    def run(view: Mapping[str, Any], resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        query = compile_view(view, table="pg_temp.rf_sof_resources")
        try:
            conn = psycopg.connect(dsn)
        except psycopg.OperationalError as exc:
            raise BatchLayerUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        with conn:
            conn.execute(
                "CREATE TEMP TABLE rf_sof_resources (resource_type text NOT NULL,"
                " resource jsonb NOT NULL, deleted boolean NOT NULL DEFAULT false)"
                " ON COMMIT DROP"
            )
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO rf_sof_resources (resource_type, resource) VALUES (%s, %s)",
                    [(str(r.get("resourceType", "")), Jsonb(r)) for r in resources],
                )
            try:
                with conn.cursor(row_factory=dict_row) as cur:
                    rows = cur.execute(query.encode()).fetchall()
            except psycopg.errors.DataError as exc:
                raise ViewEvaluationError(_evaluation_error(exc)) from exc
            finally:
                conn.rollback()
        return [{k: _jsonable(v) for k, v in row.items()} for row in rows]

    return run


def _postgres_from_env() -> Callable[
    [Mapping[str, Any], list[dict[str, Any]]], list[dict[str, Any]]
]:
    # The conformance CLI's factories take no arguments; DATABASE_URL is the documented knob.
    return postgres_engine(os.environ.get("DATABASE_URL", "postgresql://localhost/researchflow"))


register_engine("postgres", _postgres_from_env)
