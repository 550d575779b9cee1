"""The FHIRPath both engines evaluate: one parser, one function table, one static typing.

`parse` turns an expression into a small tuple tree. `Typer.expression` then resolves it for
one ViewDefinition and focus into an `Expr` tree in which everything that depends on the FHIR
model is already decided, the same way for the Python evaluator and the PostgreSQL compiler:

- static FHIR types (`fpath`, `ftype`) from the R4 model (fhirpathpy's tables), which decide
  where the date/time rules apply (`core.fhir_values`);
- choice elements: `value` of an Observation is every `value[x]` key, `value.ofType(Quantity)`
  the `valueQuantity` key;
- primitive elements: a primitive element is a node, its value and the `_name` element FHIR's
  JSON keeps beside it (FHIR R4 JSON §2.6.2, "Representing primitive elements"). Expressions
  whose items are such nodes are marked `elements`; everything that keeps items as they are
  (where, first, [n], forEach's $this, ...) keeps the mark, so `extension()` and `id` reach the
  `_name` element on every evaluation path (an `element` node), and existence and counts see
  a node that has only extensions (`birthDate.exists()` is true for `_birthDate` alone).
  Everything that reads values (operators, string functions, columns, where clauses) takes
  the nodes' values through a `values` node: a node without a value gives none. A computed
  primitive (a literal, `lower()`, ...) has no extensions.
- constants become literals of their declared type.

An engine therefore cannot see a different expression than the other one does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from fhirpathpy.models import models as fhir_models

from core.errors import InvalidViewDefinition

__all__ = [
    "BUILTIN_VARIABLES",
    "FUNCTIONS",
    "PRIMITIVE_TYPES",
    "REFERENCE_KEY_PATTERN",
    "Expr",
    "Scope",
    "Typer",
    "json_type_of",
    "parse",
    "values",
    "variables_used",
]

_MODEL: dict[str, Any] = fhir_models["r4"]
_PATH_TO_TYPE: dict[str, str] = _MODEL["path2Type"]
_DEFINED_ELSEWHERE: dict[str, str] = _MODEL["pathsDefinedElsewhere"]
_CHOICE_PATHS: dict[str, list[str]] = _MODEL["choiceTypePaths"]
_TYPE_PARENT: dict[str, str] = _MODEL["type2Parent"]

# FHIR's primitive types: their elements may carry an `_element` with id and extensions.
PRIMITIVE_TYPES = frozenset(
    {
        "base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id",
        "instant", "integer", "integer64", "markdown", "oid", "positiveInt", "string", "time",
        "unsignedInt", "uri", "url", "uuid", "xhtml",
    }
)  # fmt: skip
_NUMBER_TYPES = frozenset({"decimal", "integer", "positiveInt", "unsignedInt"})

# Environment variables every view has besides its constants (FHIRPath's and SQL-on-FHIR's).
BUILTIN_VARIABLES = frozenset(
    {"resource", "rootResource", "context", "ucum", "sct", "loinc", "rowIndex"}
)
_FIXED_STRINGS = {
    "ucum": "http://unitsofmeasure.org",
    "sct": "http://snomed.info/sct",
    "loinc": "http://loinc.org",
}

# Every function both engines evaluate, with the argument counts each takes.
FUNCTIONS: dict[str, tuple[int, ...]] = {
    "exists": (0, 1),
    "empty": (0,),
    "count": (0,),
    "where": (1,),
    "first": (0,),
    "last": (0,),
    "tail": (0,),
    "skip": (1,),
    "take": (1,),
    "not": (0,),
    "hasValue": (0,),
    "join": (0, 1),
    "ofType": (1,),
    "extension": (1,),
    "getResourceKey": (0,),
    "getReferenceKey": (0, 1),
    "select": (1,),
    "all": (1,),
    "distinct": (0,),
    "lowBoundary": (0,),
    "highBoundary": (0,),
    "lower": (0,),
    "upper": (0,),
    "length": (0,),
    "toString": (0,),
    "startsWith": (1,),
    "endsWith": (1,),
}
# Functions whose argument is evaluated on each item of the input (a new focus).
_LAMBDAS = frozenset({"exists", "where", "select", "all"})

# getReferenceKey([type]): "Patient/1", "https://x/fhir/Patient/1", "Patient/1/_history/2"
# all give "1"; contained ("#x") and URN references have no key. Groups: type, id.
REFERENCE_KEY_PATTERN = r"^(?:.*/)?([A-Z][A-Za-z0-9]*)/([^/?#]+)(?:/_history/[^/?]+)?/?(?:\?.*)?$"


def json_type_of(type_name: str) -> str:
    """What ofType(type_name) keeps of a JSON value: "boolean", "number" or "string" for a
    FHIR primitive (integer64 is a string in JSON), else "resource" (a resourceType match)."""
    if type_name == "boolean":
        return "boolean"
    if type_name == "integer64":
        return "string"
    if type_name in _NUMBER_TYPES:
        return "number"
    if type_name in PRIMITIVE_TYPES:
        return "string"
    return "resource"


# --------------------------------------------------------------------------- parser

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


# Binary operators by precedence, loosest first (FHIRPath N1 §9).
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
            return ("date", value[1:])
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


def parse(text: str) -> Node:
    """Parse a FHIRPath expression into a tuple tree (raises InvalidViewDefinition)."""
    return _Parser(text).parse()


def variables_used(tree: Node) -> set[str]:
    """The %variables a parsed expression names."""
    found: set[str] = set()
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, tuple) and node:
            if node[0] == "ext":
                found.add(node[1])
            else:
                stack.extend(node[1:])
    return found


# --------------------------------------------------------------------------- typed tree


@dataclass(frozen=True, eq=False, slots=True)
class Expr:
    """One resolved expression node: `tag` and its `args`, with its static FHIR type.

    Tags: lit (value), temporal (text), empty, this, root, rowindex, member (base, key),
    choice (base, name, suffixes), oftype_member (base, name, type), index (base, index),
    call (base, name, args), unary (op, operand), bin (op, left, right), values (base):
    the values of primitive element nodes, element (base): their `_name` objects. `is` and
    `as` are an ofType (then exists()); a function's lambda arguments are Exprs, others
    literals.
    """

    tag: str
    args: tuple[Any, ...] = ()
    fpath: str | None = None  # the FHIR element path, e.g. "Patient.birthDate", when known
    ftype: str | None = None  # the FHIR type, e.g. "date", when known
    # The items are primitive element nodes: a value (or none) with its `_name` element
    # where the JSON has one. Engines give such an item as the plain value where there is
    # no `_name` element, else as a node (see serving.engines.python._Node).
    elements: bool = False


@dataclass(frozen=True, slots=True)
class Scope:
    """Where an expression is evaluated: the focus's element path, whether the focus is
    the resource itself (where a leading `Patient.` names it), and whether its items are
    primitive element nodes (forEach over `name.given`)."""

    fpath: str | None
    at_root: bool = False
    elements: bool = False


def model_type(fpath: str | None) -> str | None:
    """The FHIR type of an element path ("Patient.birthDate" -> "date")."""
    if fpath is None:
        return None
    if "." not in fpath:
        return fpath
    return _PATH_TO_TYPE.get(fpath)


def _prefixes() -> frozenset[str]:
    out: set[str] = set()
    for path in [*_PATH_TO_TYPE, *_CHOICE_PATHS]:
        parts = path.split(".")
        out.update(".".join(parts[:n]) for n in range(2, len(parts)))
    return frozenset(out)


_BACKBONE_PATHS = _prefixes()  # elements with children of their own (backbone elements)


def _known(path: str) -> str | None:
    if path in _DEFINED_ELSEWHERE:
        return _DEFINED_ELSEWHERE[path]
    known = path in _PATH_TO_TYPE or path in _CHOICE_PATHS or path in _BACKBONE_PATHS
    return path if known else None


def _child(fpath: str | None, name: str) -> str | None:
    """The element path of `name` under `fpath`: "Patient.name" + "given" is
    "HumanName.given" (a complex type's elements are defined on the type, and on its parent
    types: Age.value is Quantity.value, any element's extension is Element.extension);
    a backbone element's children keep the path ("QuestionnaireResponse.item.linkId")."""
    if fpath is None or name.startswith("_"):
        return None
    owner = model_type(fpath)
    if owner is None or not owner[:1].isupper():
        owners: list[str] = []
        found = _known(f"{fpath}.{name}")
        if found is not None:
            return found
        owners = ["BackboneElement"]
    else:
        owners = [owner]
    seen: set[str] = set()
    while owners:
        current = owners.pop()
        if current in seen:
            continue
        seen.add(current)
        found = _known(f"{current}.{name}")
        if found is not None:
            return found
        parent = _TYPE_PARENT.get(current)
        if parent:
            owners.append(parent)
    return f"{fpath}.{name}"


def _suffix(type_name: str) -> str:
    return type_name[:1].upper() + type_name[1:]


_BOOLEAN = frozenset({"exists", "empty", "not", "hasValue", "all", "startsWith", "endsWith"})
_SAME = frozenset({"where", "first", "last", "tail", "skip", "take", "distinct"})
# Functions whose result holds items of their input as they are (nodes stay nodes).
_KEEP = frozenset({"where", "first", "last", "tail", "skip", "take"})
_STRINGS = frozenset({"join", "lower", "upper", "toString"})


class Typer:
    """Resolves expressions of one ViewDefinition (its resource type and constants)."""

    def __init__(self, resource: str, constants: Mapping[str, tuple[Any, str]]) -> None:
        """`constants`: name -> (value, FHIR type), e.g. {"n": (1, "integer")}."""
        self.resource = resource
        self.constants = dict(constants)

    def expression(self, text: str, scope: Scope) -> Expr:
        """Parse and resolve `text` evaluated at `scope`: items as they are (a forEach's
        items may be primitive element nodes). Raises InvalidViewDefinition."""
        return self.resolve(parse(text), scope)

    def value_expression(self, text: str, scope: Scope) -> Expr:
        """`expression`, read for its values (a column, a where clause, repeat)."""
        return values(self.expression(text, scope))

    def resolve(self, node: Node, scope: Scope) -> Expr:
        tag = node[0]
        if tag == "lit":
            value = node[1]
            return Expr("lit", (value,), ftype=_literal_type(value))
        if tag == "date":
            text = node[1]
            kind = "time" if text.startswith("T") else "dateTime" if "T" in text else "date"
            return Expr("temporal", (text,), ftype=kind)
        if tag == "empty":
            return Expr("empty")
        if tag == "this":
            return Expr(
                "this", fpath=scope.fpath, ftype=model_type(scope.fpath), elements=scope.elements
            )
        if tag == "ext":
            return self.variable(node[1])
        if tag == "member":
            if node[1] == ("this",) and node[2] == self.resource and scope.at_root:
                return Expr("this", fpath=scope.fpath, ftype=model_type(scope.fpath))
            return self.member(self.resolve(node[1], scope), node[2])
        if tag == "index":
            base = self.resolve(node[1], scope)
            index = values(self.resolve(node[2], scope))
            return Expr("index", (base, index), base.fpath, base.ftype, base.elements)
        if tag == "call":
            return self.call(node[1], node[2], node[3], scope)
        if tag == "unary":
            operand = values(self.resolve(node[2], scope))
            return Expr("unary", (node[1], operand), ftype=operand.ftype)
        if tag == "type":
            typed = self.of_type(values(self.resolve(node[2], scope)), node[3])
            if node[1] == "is":
                return Expr("call", (typed, "exists", ()), ftype="boolean")
            return typed
        if tag == "bin":
            op = node[1]
            left = values(self.resolve(node[2], scope))
            right = values(self.resolve(node[3], scope))
            if op in ("and", "or", "xor", "implies", "=", "!=", "~", "!~", "<", ">", "<=", ">="):
                ftype: str | None = "boolean"
            elif op in ("in", "contains"):
                ftype = "boolean"
            elif op == "&":
                ftype = "string"
            else:
                ftype = None
            return Expr("bin", (op, left, right), ftype=ftype)
        raise InvalidViewDefinition(f"unsupported FHIRPath construct {tag}")

    def variable(self, name: str) -> Expr:
        if name == "rowIndex":
            return Expr("rowindex", ftype="integer")
        if name in ("resource", "rootResource", "context"):
            return Expr("root", fpath=self.resource, ftype=self.resource)
        if name in _FIXED_STRINGS:
            return Expr("lit", (_FIXED_STRINGS[name],), ftype="string")
        if name not in self.constants:
            raise InvalidViewDefinition(f"%{name} is not a constant of the view")
        value, value_type = self.constants[name]
        return Expr("lit", (value,), ftype=value_type)

    def member(self, base: Expr, name: str) -> Expr:
        if name in ("extension", "id"):
            owner = self.primitive_element(base)
            if owner is None:
                return Expr("empty")
            base = owner
        else:
            base = values(base)  # a primitive has no other children
        fpath = _child(base.fpath, name)
        if fpath is not None and fpath in _CHOICE_PATHS:
            suffixes = tuple(_CHOICE_PATHS[fpath])
            return Expr("choice", (base, name, suffixes), fpath=fpath)
        ftype = model_type(fpath)
        return Expr("member", (base, name), fpath, ftype, ftype in PRIMITIVE_TYPES)

    def primitive_element(self, base: Expr) -> Expr | None:
        """What `extension`/`id` are read on: the `_name` elements of primitive element nodes,
        None for a computed primitive value (it has none), else `base` itself."""
        if base.elements:
            return Expr("element", (base,), fpath="Element", ftype="Element")
        if base.ftype in PRIMITIVE_TYPES:
            return None
        return base

    def call(self, base_node: Node, name: str, args: tuple[Node, ...], scope: Scope) -> Expr:
        allowed = FUNCTIONS.get(name)
        if allowed is None:
            raise InvalidViewDefinition(f"unknown or unsupported FHIRPath function {name}()")
        if len(args) not in allowed:
            raise InvalidViewDefinition(f"{name}() takes {allowed} arguments, not {len(args)}")
        base = self.resolve(base_node, scope)
        if name == "ofType":
            return self.of_type(base, _type_arg(args[0]))
        if name == "extension":
            if args[0][0] != "lit" or not isinstance(args[0][1], str):
                raise InvalidViewDefinition("extension() needs a string literal url")
            owner = self.primitive_element(base)
            if owner is None:
                return Expr("empty", fpath="Extension", ftype="Extension")
            return Expr("call", (owner, name, (args[0][1],)), "Extension", "Extension")
        if name in ("exists", "empty", "count", "where", "select", "all") or name in _KEEP:
            pass  # these see the nodes themselves (a node without a value exists)
        else:
            base = values(base)
        if name == "getReferenceKey":
            wanted = _type_arg(args[0]) if args else None
            return Expr("call", (base, name, (wanted,)))
        if name in ("skip", "take"):
            if args[0][0] != "lit" or type(args[0][1]) is not int:
                raise InvalidViewDefinition(f"{name}() needs an integer literal")
            return Expr("call", (base, name, (args[0][1],)), base.fpath, base.ftype, base.elements)
        inner = Scope(base.fpath, elements=base.elements) if name in _LAMBDAS else scope
        resolved = tuple(self.resolve(a, inner) for a in args)
        if name != "select":
            resolved = tuple(values(a) for a in resolved)
        if name in _SAME:
            return Expr("call", (base, name, resolved), base.fpath, base.ftype, base.elements)
        if name in _BOOLEAN:
            return Expr("call", (base, name, resolved), ftype="boolean")
        if name in ("count", "length"):
            return Expr("call", (base, name, resolved), ftype="integer")
        if name in _STRINGS:
            return Expr("call", (base, name, resolved), ftype="string")
        if name == "select":
            (inner_expr,) = resolved
            return Expr(
                "call", (base, name, resolved), inner_expr.fpath, inner_expr.ftype,
                inner_expr.elements,
            )  # fmt: skip
        if name in ("lowBoundary", "highBoundary"):
            return Expr("call", (base, name, resolved), ftype=base.ftype)
        return Expr("call", (base, name, resolved))

    def of_type(self, base: Expr, type_name: str) -> Expr:
        if base.tag == "choice":
            parent, name, _ = base.args
            primitive = type_name in PRIMITIVE_TYPES
            return Expr("member", (parent, name + _suffix(type_name)), None, type_name, primitive)
        if base.tag == "member" and not base.args[1].startswith("_"):
            parent, name = base.args
            return Expr("oftype_member", (parent, name, type_name), ftype=type_name)
        return Expr("call", (values(base), "ofType", (type_name,)), ftype=type_name)


def values(expr: Expr) -> Expr:
    """`expr` read for its values: the values of primitive element nodes (a node without
    a value gives none), anything else as it is."""
    if not expr.elements:
        return expr
    return Expr("values", (expr,), expr.fpath, expr.ftype)


def _literal_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, Decimal):
        return "decimal"
    return "string"


def _type_arg(node: Node) -> str:
    if node[0] == "member" and node[1] == ("this",):
        return str(node[2])
    if node[0] == "member" and node[1][0] == "member" and node[1][1] == ("this",):
        return str(node[2])  # FHIR.Quantity, System.String
    raise InvalidViewDefinition("expected a type name")
