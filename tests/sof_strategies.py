"""Hypothesis strategies: FHIR resources with the hard shapes and random ViewDefinitions.

Resources carry UTC offsets (`Z`, `+00:00`, `+02:00`, `-05:00`), partial dates, seconds with
and without milliseconds, extensions on primitive elements (`_birthDate`, `_given` arrays with
holes, value-less primitives), long decimals, non-ASCII text and empty collections. Views are
built from `tests.oracle` expression trees (select, forEach, forEachOrNull, unionAll, repeat,
where, constants, collection columns), so the oracle evaluates exactly what the engines get.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import hypothesis.strategies as st

from tests.oracle import (
    Column,
    Compare,
    Constant,
    Empty,
    Exists,
    Expr,
    Extension,
    Function,
    Index,
    Literal,
    Logic,
    Path,
    RowIndex,
    Select,
    Step,
    Then,
    This,
    View,
)

TEXTS = [
    "ΔΙΑΒΗΤΗΣ",
    "διαβητης",
    "Straße",
    "STRASSE",
    "İstanbul",
    "ﬁle",
    "O'Brien",
    "a\\b",
    "Ωμέγα",
    "😀 smile",
    "Diabetes",
    "diabetes mellitus",
    "M",
    "z",
]
DECIMALS = [
    Decimal("6.50000000000000001"),
    Decimal("6.5"),
    Decimal("6.49999999999999999"),
    Decimal("7"),
    Decimal("7.0"),
    Decimal("7.2"),
    Decimal("7.50"),
    Decimal("-0.0"),
    Decimal("123456789012345678.123456789"),
    6,
    7,
]
DATES = ["1970", "1970-05", "1970-05-17", "1980-01-01", "2000-02-29"]
DATE_TIMES = [
    "2024-01-01T01:00:00+02:00",
    "2023-12-31T23:30:00-05:00",
    "2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00.000+00:00",
    "2024-01-01T00:00:00.5Z",
    "2023-12-31T22:00:00-02:00",
    "2024-01-01",
    "2024-01",
    "2024",
    "2023-12-31",
]
EXT_URLS = ["http://example.org/a", "http://example.org/b"]
ABSENT = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"


def _maybe(draw: st.DrawFn, value: Any) -> Any:
    return value if draw(st.booleans()) else None


@st.composite
def extension(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    # FHIR's ext-1: a value[x] or extensions, never both nor neither.
    ext: dict[str, Any] = {"url": draw(st.sampled_from(EXT_URLS))}
    kinds = ["string", "decimal", "dateTime"] + (["nested"] if depth < 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "string":
        ext["valueString"] = draw(st.sampled_from(TEXTS))
    elif kind == "decimal":
        ext["valueDecimal"] = draw(st.sampled_from(DECIMALS))
    elif kind == "dateTime":
        ext["valueDateTime"] = draw(st.sampled_from(DATE_TIMES))
    else:
        ext["extension"] = draw(st.lists(extension(depth + 1), min_size=1, max_size=2))
    return ext


def _primitive_element(draw: st.DrawFn) -> dict[str, Any]:
    url = draw(st.sampled_from([*EXT_URLS, ABSENT]))
    value = "masked" if url == ABSENT else draw(st.sampled_from(TEXTS))
    key = "valueCode" if url == ABSENT else "valueString"
    return {"extension": [{"url": url, key: value}]}


@st.composite
def human_name(draw: st.DrawFn) -> dict[str, Any]:
    name: dict[str, Any] = {}
    if draw(st.booleans()):
        name["family"] = draw(st.sampled_from(TEXTS))
    if draw(st.booleans()):
        name["use"] = draw(st.sampled_from(["official", "usual"]))
    count = draw(st.integers(0, 3))
    given: list[Any] = []
    elements: list[Any] = []
    for _ in range(count):
        shape = draw(st.sampled_from(["value", "value+ext", "ext only"]))
        given.append(None if shape == "ext only" else draw(st.sampled_from(TEXTS)))
        elements.append(_primitive_element(draw) if shape != "value" else None)
    if count and any(g is not None for g in given):
        name["given"] = given
    elif count:
        name["given"] = given  # all holes: value-less primitives only
    if any(e is not None for e in elements):
        name["_given"] = elements
    if not name:  # FHIR JSON has no empty objects
        name["text"] = draw(st.sampled_from(TEXTS))
    return name


@st.composite
def patient(draw: st.DrawFn, rid: str) -> dict[str, Any]:
    data: dict[str, Any] = {"resourceType": "Patient", "id": rid}
    if draw(st.booleans()):
        data["gender"] = draw(st.sampled_from(["male", "female", "other", "unknown"]))
    if draw(st.integers(0, 3)) == 0:
        data["_gender"] = _primitive_element(draw)
    birth = draw(st.sampled_from(["value", "value+ext", "ext only", "none"]))
    if birth in ("value", "value+ext"):
        data["birthDate"] = draw(st.sampled_from(DATES))
    if birth in ("value+ext", "ext only"):
        data["_birthDate"] = _primitive_element(draw)
    if draw(st.booleans()):
        data["active"] = draw(st.booleans())
    data["name"] = draw(
        st.lists(human_name(), min_size=draw(st.sampled_from([0, 1, 1])), max_size=2)
    )
    if not data["name"]:  # FHIR JSON has no empty arrays
        del data["name"]
    telecom = draw(st.lists(st.sampled_from(TEXTS), max_size=2))
    if telecom:
        data["telecom"] = [{"system": "phone", "value": t} for t in telecom]
    extensions = draw(st.lists(extension(), min_size=draw(st.sampled_from([0, 1, 1])), max_size=2))
    if extensions:
        data["extension"] = extensions
    deceased = draw(st.sampled_from(["none", "boolean", "dateTime"]))
    if deceased == "boolean":
        data["deceasedBoolean"] = draw(st.booleans())
    elif deceased == "dateTime":
        data["deceasedDateTime"] = draw(st.sampled_from(DATE_TIMES))
    return data


@st.composite
def observation(draw: st.DrawFn, rid: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "status": draw(st.sampled_from(["final", "cancelled", "amended"])),
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": c, "display": draw(st.sampled_from(TEXTS))}
                for c in draw(st.lists(st.sampled_from(["4548-4", "2345-7"]), max_size=2))
            ]
        },
    }
    if not data["code"]["coding"]:  # FHIR JSON has no empty arrays
        del data["code"]["coding"]
    if draw(st.booleans()) or not data["code"]:
        data["code"]["text"] = draw(st.sampled_from(TEXTS))
    value = draw(st.sampled_from(["quantity", "string", "none"]))
    if value == "quantity":
        data["valueQuantity"] = {"value": draw(st.sampled_from(DECIMALS)), "unit": "%"}
    elif value == "string":
        data["valueString"] = draw(st.sampled_from(TEXTS))
    if draw(st.booleans()):
        data["effectiveDateTime"] = draw(st.sampled_from(DATE_TIMES))
    components = draw(st.lists(st.sampled_from(DECIMALS), max_size=2))
    if components:
        data["component"] = [{"valueQuantity": {"value": v}} for v in components]
    return data


# --------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Candidate:
    """An expression usable at a focus: its FHIR type and whether it can give several."""

    expr: Expr
    type: str | None
    many: bool


def _path(*steps: Step, type_: str | None) -> Path:
    return Path(tuple(steps), type=type_)


def _value_of(first: Expr, of_type: str, type_: str) -> Expr:
    return Then(first, _path(Step("value", of_type=of_type), type_=type_), type=type_)


def _given_extensions(given: Path) -> list[Candidate]:
    """Extensions of `given` items reached through first(), last(), [n] and where(): a
    primitive element keeps its extensions on every evaluation path."""
    s = Step
    picks: list[Expr] = [
        Function(given, "first", type="string"),
        Function(given, "last", type="string"),
        Index(given, 1, type="string"),
        Function(
            given, "where", Compare("!=", This(type="string"), Literal(TEXTS[0], "string")),
            type="string",
        ),
    ]  # fmt: skip
    out = [
        Candidate(_value_of(Extension(pick, url), "string", "string"), "string", True)
        for pick, url in zip(picks, EXT_URLS * 2, strict=True)
    ]
    out.append(
        Candidate(
            Then(Extension(picks[0], ABSENT), _path(s("value", of_type="code"), type_="code")),
            "code",
            True,
        )
    )
    return out


def candidates(focus: str) -> list[Candidate]:
    """Expressions at a focus type, with what they give."""
    s = Step
    if focus == "Patient":
        return [
            *_given_extensions(_path(s("name"), s("given"), type_="string")),
            Candidate(
                Then(
                    Extension(_path(s("birthDate"), type_="date"), ABSENT),
                    _path(s("value", choices=("Code", "String")), type_=None),
                ),
                None,
                True,
            ),
            Candidate(Function(_path(s("id"), type_="id"), "getResourceKey"), "id", False),
            Candidate(_path(s("gender"), type_="code"), "code", False),
            Candidate(_path(s("birthDate"), type_="date"), "date", False),
            Candidate(_path(s("active"), type_="boolean"), "boolean", False),
            Candidate(_path(s("name"), s("family"), type_="string"), "string", True),
            Candidate(_path(s("name"), s("given"), type_="string"), "string", True),
            Candidate(_path(s("telecom"), s("value"), type_="string"), "string", True),
            Candidate(
                _value_of(
                    Extension(_path(s("birthDate", element=True), type_=None), ABSENT),
                    "code",
                    "code",
                ),
                "code",
                True,
            ),
            Candidate(
                _value_of(
                    Extension(_path(s("gender", element=True), type_=None), EXT_URLS[0]),
                    "string",
                    "string",
                ),
                "string",
                True,
            ),
            Candidate(
                _value_of(
                    Extension(_path(s("name"), s("given", element=True), type_=None), EXT_URLS[1]),
                    "string",
                    "string",
                ),
                "string",
                True,
            ),
            Candidate(
                Then(
                    _path(s("name"), s("given", element=True), type_=None),
                    _path(s("extension"), s("url"), type_="uri"),
                    type="uri",
                ),
                "uri",
                True,
            ),
            Candidate(
                _value_of(Extension(_path(type_=None), EXT_URLS[0]), "decimal", "decimal"),
                "decimal",
                True,
            ),
            Candidate(
                _value_of(Extension(_path(type_=None), EXT_URLS[1]), "dateTime", "dateTime"),
                "dateTime",
                True,
            ),
            Candidate(
                _path(s("deceased", of_type="dateTime"), type_="dateTime"), "dateTime", False
            ),
            Candidate(_path(s("deceased", of_type="boolean"), type_="boolean"), "boolean", False),
            Candidate(_path(s("extension"), s("url"), type_="uri"), "uri", True),
        ]
    if focus == "HumanName":
        return [
            *_given_extensions(_path(s("given"), type_="string")),
            Candidate(_path(s("family"), type_="string"), "string", False),
            Candidate(_path(s("use"), type_="code"), "code", False),
            Candidate(_path(s("given"), type_="string"), "string", True),
            Candidate(
                _value_of(
                    Extension(_path(s("given", element=True), type_=None), EXT_URLS[0]),
                    "string",
                    "string",
                ),
                "string",
                True,
            ),
        ]
    if focus == "Extension":
        return [
            Candidate(_path(s("url"), type_="uri"), "uri", False),
            Candidate(_path(s("value", of_type="string"), type_="string"), "string", False),
            Candidate(_path(s("value", of_type="decimal"), type_="decimal"), "decimal", False),
            Candidate(_path(s("value", of_type="dateTime"), type_="dateTime"), "dateTime", False),
            Candidate(_path(s("extension"), s("url"), type_="uri"), "uri", True),
        ]
    if focus == "Observation":
        return [
            Candidate(Function(_path(s("id"), type_="id"), "getResourceKey"), "id", False),
            Candidate(_path(s("status"), type_="code"), "code", False),
            Candidate(
                Then(
                    _path(s("value", of_type="Quantity"), type_=None),
                    _path(s("value"), type_="decimal"),
                    type="decimal",
                ),
                "decimal",
                False,
            ),
            Candidate(_path(s("value", of_type="string"), type_="string"), "string", False),
            Candidate(
                _path(s("effective", of_type="dateTime"), type_="dateTime"), "dateTime", False
            ),
            Candidate(_path(s("code"), s("text"), type_="string"), "string", False),
            Candidate(_path(s("code"), s("coding"), s("display"), type_="string"), "string", True),
            Candidate(_path(s("code"), s("coding"), s("code"), type_="code"), "code", True),
            Candidate(
                _path(s("component"), s("value", of_type="Quantity"), s("value"), type_="decimal"),
                "decimal",
                True,
            ),
        ]
    if focus == "Coding":
        return [
            Candidate(_path(s("code"), type_="code"), "code", False),
            Candidate(_path(s("display"), type_="string"), "string", False),
        ]
    if focus == "ObservationComponent":
        return [
            Candidate(
                _path(s("value", of_type="Quantity"), s("value"), type_="decimal"), "decimal", False
            ),
        ]
    raise AssertionError(focus)


# forEach-able paths from each focus: (path, the focus type of its items)
ITERATIONS: dict[str, list[tuple[Path, str]]] = {
    "Patient": [
        (Path((Step("name"),)), "HumanName"),
        (Path((Step("extension"),)), "Extension"),
        (Path((Step("name"), Step("given"))), "string"),
    ],
    "HumanName": [(Path((Step("given"),)), "string")],
    "Extension": [(Path((Step("extension"),)), "Extension")],
    "Observation": [
        (Path((Step("code"), Step("coding"))), "Coding"),
        (Path((Step("component"),)), "ObservationComponent"),
    ],
    "Coding": [],
    "ObservationComponent": [],
    "string": [],
}


def _literal(draw: st.DrawFn, type_: str | None) -> Expr:
    if type_ == "date":
        return Literal(draw(st.sampled_from(DATES)), "date")
    if type_ == "dateTime":
        text = draw(st.sampled_from(DATE_TIMES))
        return Literal(text, "dateTime" if "T" in text else "date")
    if type_ == "decimal":
        return Literal(
            draw(
                st.sampled_from(
                    [Decimal("6.5"), Decimal("7"), Decimal("7.0"), Decimal("6.50000000000000001")]
                )
            ),
            "decimal",
        )
    if type_ == "boolean":
        return Literal(draw(st.booleans()), "boolean")
    return Literal(draw(st.sampled_from(TEXTS)), "string")


@st.composite
def condition(draw: st.DrawFn, focus: str, constants: list[tuple[str, str, Any]]) -> Expr:
    """A boolean expression at `focus`."""
    options = (
        [c for c in candidates(focus) if c.type not in ("uri", None)] if focus != "string" else []
    )
    kinds = ["compare", "compare", "compare", "exists", "logic"]
    kind = draw(st.sampled_from(kinds if options else ["rowindex"]))
    if kind == "rowindex":
        return Compare("=", RowIndex(), Literal(draw(st.integers(0, 2)), "integer"))
    if kind == "exists":
        return Exists(draw(st.sampled_from(options)).expr)
    if kind == "logic":
        return Logic(
            draw(st.sampled_from(["and", "or"])),
            draw(condition(focus, constants)),
            draw(condition(focus, constants)),
        )
    chosen = draw(st.sampled_from(options))
    left = chosen.expr
    if chosen.many:
        left = Function(left, "first", type=chosen.type)
    ops = (
        ["=", "!="]
        if chosen.type in ("boolean", "code", "id")
        else ["=", "!=", "<", ">", "<=", ">="]
    )
    right: Expr = _literal(draw, chosen.type)
    typed = [
        c
        for c in constants
        if c[1] == {"dateTime": "dateTime", "date": "date"}.get(chosen.type or "", chosen.type)
    ]
    if typed and draw(st.booleans()):
        name, type_, _ = draw(st.sampled_from(typed))
        right = Constant(name, type_)
    return Compare(draw(st.sampled_from(ops)), left, right)


_COLUMN_TYPES = {
    "id": "id",
    "code": "code",
    "date": "date",
    "dateTime": "dateTime",
    "string": "string",
    "decimal": "decimal",
    "boolean": "boolean",
    "uri": "uri",
}


@st.composite
def column(draw: st.DrawFn, focus: str, name: str, constants: list[tuple[str, str, Any]]) -> Column:
    if focus == "string":  # an item of name.given: a primitive element, maybe value-less
        kind = draw(st.sampled_from(["this", "rowindex", "extension", "exists", "url"]))
        if kind == "rowindex":
            return Column(name, RowIndex(), "integer")
        if kind == "extension":
            url = draw(st.sampled_from(EXT_URLS))
            return Column(name, _value_of(Extension(This(), url), "string", "string"), "string")
        if kind == "exists":
            return Column(name, Exists(This()), "boolean")
        if kind == "url":
            urls = Then(Extension(This(), ABSENT), _path(Step("url"), type_="uri"), type="uri")
            return Column(name, Function(urls, "first", type="uri"), "uri")
        return Column(name, This(type="string"), "string")
    roll = draw(st.integers(0, 9))
    if roll == 0:
        return Column(name, RowIndex(), draw(st.sampled_from(["integer", None])))
    if roll in (1, 2, 3):
        return Column(name, draw(condition(focus, constants)), "boolean")
    chosen = draw(st.sampled_from(candidates(focus)))
    typed = _COLUMN_TYPES.get(chosen.type or "") if draw(st.integers(0, 4)) else None
    if not chosen.many:
        return Column(name, chosen.expr, typed)
    how = draw(st.sampled_from(["collection", "first", "count", "exists", "join", "last"]))
    if how == "collection":
        return Column(name, chosen.expr, typed, collection=True)
    if how == "count":
        return Column(name, Function(chosen.expr, "count", type="integer"), "integer")
    if how == "exists":
        return Column(name, Exists(chosen.expr), "boolean")
    if how == "join" and chosen.type == "string":
        return Column(name, Function(chosen.expr, "join", ",", type="string"), "string")
    return Column(
        name, Function(chosen.expr, "last" if how == "last" else "first", type=chosen.type), typed
    )


@st.composite
def branch_like(
    draw: st.DrawFn, first: Select, focus: str, constants: list[tuple[str, str, Any]]
) -> Select:
    """Another unionAll branch: its own iteration, the first branch's columns (names, types)."""
    branch = Select()
    inner = focus
    how = draw(st.sampled_from(["same", "forEach", "forEachOrNull", "repeat"]))
    if how in ("forEach", "forEachOrNull") and ITERATIONS[focus]:
        path, inner = draw(st.sampled_from(ITERATIONS[focus]))
        if how == "forEach":
            branch.for_each = path
        else:
            branch.for_each_or_null = path
    elif how == "repeat" and focus in ("Patient", "Extension"):
        branch.repeat = [Path((Step("extension"),))]
        inner = "Extension"
    for col in first.all_columns():
        branch.column.append(draw(column_like(col, inner, constants)))
    return branch


@st.composite
def column_like(
    draw: st.DrawFn, like: Column, focus: str, constants: list[tuple[str, str, Any]]
) -> Column:
    """A column named and typed as `like`, with an expression of that type at `focus`."""
    if isinstance(like.path, RowIndex) or (like.type == "integer" and not like.collection):
        return Column(like.name, RowIndex(), like.type)
    if like.type == "boolean" and not like.collection and focus != "string":
        return Column(like.name, draw(condition(focus, constants)), "boolean")
    if focus == "string":
        if like.type in ("string", None) and not like.collection:
            return Column(like.name, This(type="string"), like.type)
        return Column(like.name, Empty(), like.type, like.collection)
    wanted = {v: k for k, v in _COLUMN_TYPES.items()}.get(like.type or "", None)
    options = [c for c in candidates(focus) if c.type == wanted]
    if not options or (like.type is None and draw(st.booleans())):
        return Column(like.name, Empty(), like.type, like.collection)
    chosen = draw(st.sampled_from(options))
    expr = chosen.expr
    if chosen.many and not like.collection:
        expr = Function(expr, "first", type=chosen.type)
    return Column(like.name, expr, like.type, like.collection)


class _Names:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"c{self.n}"


@st.composite
def select(
    draw: st.DrawFn, focus: str, depth: int, names: _Names, constants: list[tuple[str, str, Any]]
) -> Select:
    sel = Select()
    inner = focus
    iterations = ITERATIONS[focus]
    how = (
        draw(st.sampled_from(["same", "forEach", "forEachOrNull", "repeat"]))
        if depth < 3
        else "same"
    )
    if how in ("forEach", "forEachOrNull") and iterations:
        path, inner = draw(st.sampled_from(iterations))
        if how == "forEach":
            sel.for_each = path
        else:
            sel.for_each_or_null = path
    elif how == "repeat" and focus in ("Patient", "Extension"):
        sel.repeat = [Path((Step("extension"),))]
        inner = "Extension"
    sel.column = [
        draw(column(inner, names.next(), constants))
        for _ in range(draw(st.integers(0 if depth else 1, 2)))
    ]
    if depth < 3 and draw(st.integers(0, 2)) == 0:
        sel.select = [
            draw(select(inner, depth + 1, names, constants)) for _ in range(draw(st.integers(1, 2)))
        ]
    if depth < 3 and draw(st.integers(0, 3)) == 0:
        first = draw(select(inner, depth + 1, names, constants))
        branches = [first]
        for _ in range(draw(st.integers(1, 2))):
            branches.append(draw(branch_like(first, inner, constants)))
        sel.union_all = branches
    if not list(sel.all_columns()):
        sel.column = [draw(column(inner, names.next(), constants))]
    return sel


@st.composite
def view(draw: st.DrawFn) -> View:
    resource = draw(st.sampled_from(["Patient", "Observation"]))
    constants: list[tuple[str, str, Any]] = []
    if draw(st.booleans()):
        constants.append(("t", "string", draw(st.sampled_from(TEXTS))))
    if draw(st.booleans()):
        constants.append(
            ("d", "dateTime", draw(st.sampled_from([d for d in DATE_TIMES if "T" in d])))
        )
    if draw(st.booleans()):
        constants.append(("n", "decimal", draw(st.sampled_from([Decimal("6.5"), Decimal("7.0")]))))
    names = _Names()
    selects = [draw(select(resource, 0, names, constants)) for _ in range(draw(st.integers(1, 2)))]
    wheres = [draw(condition(resource, constants)) for _ in range(draw(st.sampled_from([0, 0, 1])))]
    return View(resource, selects, wheres, constants)


@st.composite
def resources(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = [draw(patient(f"p{i}")) for i in range(draw(st.integers(1, 4)))]
    out += [draw(observation(f"o{i}")) for i in range(draw(st.integers(1, 3)))]
    return out
