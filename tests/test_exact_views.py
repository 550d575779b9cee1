"""Both engines give the same rows by construction, and the rows an independent oracle gives.

- The shared bug cases (../shared/cases/) through `researchflow views run` on both engines.
- A property test (300 examples): random ViewDefinitions (select, forEach, forEachOrNull,
  unionAll, repeat, where, constants, collection columns) over resources with the hard shapes
  (UTC offsets, partial dates, primitive extensions, long decimals, non-ASCII text, empty
  collections) give the same rows on the Python and the PostgreSQL engine, equal to
  `tests.oracle` (which imports nothing from the project).
- The rules each engine takes from core.fhir_values give the same answers in SQL and in
  Python: case folding over every code point, date/time comparison, decimal division.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import redirect_stdout
from decimal import Decimal
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import psycopg
import pytest
from hypothesis import HealthCheck, event, example, given, settings

import researchflow_cli
from core.errors import InvalidViewDefinition
from core.fhir_values import (
    case_map,
    case_map_sql,
    compare_temporal,
    decimal_text,
    dumps,
    fold,
    temporal_compare_sql,
)
from serving.engines.postgres import postgres_engine
from serving.engines.python import ViewEvaluationError, evaluate, pg_divide
from serving.viewdef import load_view
from tests.conftest import SHARED, fresh_database
from tests.oracle import OracleError, View, view_rows
from tests.sof_strategies import DATE_TIMES, DATES, resources, view

CASES = sorted((SHARED / "cases").glob("*/view.json"))
# The case without expected.json: decided from the spec's Processing Algorithm (Process(S, N)):
# qa's g1 has nested items, so its nested repeat gives rows; g2 has none, so the cross product
# with the empty nested rows is empty; qb has no item, so forEachOrNull gives its one row of
# nulls for every column of the select, the nested repeat's included (step 3).
DECIDED = {
    "sof-repeat-in-foreachornull": [
        {"id": "qa", "top": "g1", "nested": "g1.1"},
        {"id": "qa", "top": "g1", "nested": "g1.1.1"},
        {"id": "qa", "top": "g1", "nested": "g1.2"},
        {"id": "qb", "top": None, "nested": None},
    ]
}


@pytest.fixture(scope="module")
def module_pg_url() -> Iterator[str]:
    with fresh_database("rf_test_exact") as url:
        yield url


def _key(row: dict[str, Any]) -> str:
    return dumps(row, option=2048).decode()  # OPT_SORT_KEYS: exact text, numbers as written


def _canonical(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | Decimal):
        number = Decimal(value)
        return ["n", format(number.normalize(), "f") if number else "0"]
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return {k: _canonical(v) for k, v in value.items()}


def _multiset(rows: list[dict[str, Any]], exact: bool) -> list[str]:
    if exact:
        return sorted(_key(r) for r in rows)
    return sorted(json.dumps(_canonical(r), sort_keys=True) for r in rows)


@pytest.mark.parametrize("engine", ["python", "postgres"])
@pytest.mark.parametrize("case", CASES, ids=lambda p: p.parent.name)
def test_shared_cases_on_both_engines(
    case: Path, engine: str, module_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", module_pg_url)
    out = io.StringIO()
    argv = ["views", "run", str(case), "--resources", str(case.parent / "resources.json")]
    with redirect_stdout(out):
        assert researchflow_cli.main([*argv, "--engine", engine]) == 0
    rows = json.loads(out.getvalue())
    expected_file = case.parent / "expected.json"
    if expected_file.exists():
        expected = json.loads(expected_file.read_text())
    else:
        expected = DECIDED[case.parent.name]
    assert _multiset(rows, exact=True) == _multiset(expected, exact=True)


def _outcome(run: Any) -> list[dict[str, Any]] | str:
    try:
        rows: list[dict[str, Any]] = run()
    except (ViewEvaluationError, OracleError):
        return "error"
    return rows


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(the_view=view(), data=resources())
@pytest.mark.timeout(600)
def test_engines_and_oracle_give_the_same_rows(
    the_view: View, data: list[dict[str, Any]], module_pg_url: str
) -> None:
    definition = the_view.json()
    try:
        loaded = load_view(definition)
    except InvalidViewDefinition as exc:  # the generator only makes valid views
        raise AssertionError(f"{exc}: {json.dumps(definition)}") from exc
    python = _outcome(lambda: evaluate(loaded, data))
    postgres = _outcome(lambda: postgres_engine(module_pg_url)(definition, data))
    oracle = _outcome(lambda: view_rows(the_view, data))
    context = dumps(definition).decode()
    event("error" if isinstance(oracle, str) else "no rows" if not oracle else "rows")
    for feature in ("forEachOrNull", 'forEach"', "repeat", "unionAll", "where", "constant"):
        if feature in context:
            event(f"has {feature}")
    for marker in (
        "extension('http://hl7",
        "given.extension",
        "first().extension",
        "[1].extension",
        "$this.extension",
        "$this.exists()",
        "@2",
        "ofType(decimal)",
        "collection",
    ):
        if marker in context:
            event(f"uses {marker}")
    if isinstance(python, str) or isinstance(postgres, str) or isinstance(oracle, str):
        assert python == postgres == oracle, context
        return
    # The engines agree to the character (a decimal's digits and scale included) ...
    assert _multiset(python, exact=True) == _multiset(postgres, exact=True), context
    # ... and with the oracle, which keeps the numbers of the resources it reads.
    assert _multiset(python, exact=False) == _multiset(oracle, exact=False), context


# --------------------------------------------------------------------------- shared rules


@pytest.mark.timeout(600)
def test_case_folding_is_the_same_string_in_sql_for_every_code_point(module_pg_url: str) -> None:
    # Every code point PostgreSQL text can hold, in chunks: fold/lower/upper give exactly
    # the Python string (so a refresh never changes a condition-text answer).
    code_points = [c for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    chunk = 4096
    with psycopg.connect(module_pg_url) as conn:
        for kind in ("fold", "lower", "upper"):
            for start in range(0, len(code_points), chunk):
                text = "".join(chr(c) for c in code_points[start : start + chunk])
                row = conn.execute(
                    f"SELECT {case_map_sql('%(t)s::text', kind)}".encode(),  # type: ignore[arg-type]
                    {"t": text},
                ).fetchone()
                assert row is not None
                assert row[0] == case_map(text, kind), (kind, start)
    assert fold("ΔΙΑΒΗΤΗΣ") == fold("διαβητης") and fold("Straße") == fold("STRASSE")


TEMPORAL_VALUES = (
    DATE_TIMES
    + DATES
    + [
        "2024-01-01T10:00:00+05:30",
        "2024-01-01T04:30:00Z",
        "2024-01-01T10:00Z",
        "2024-01-01T10",
        "2024-02-30",
        "1999-12-31T23:59:59.999-00:00",
        "2000-01-01T00:00:00.0001Z",
        "not a date",
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.sampled_from(TEMPORAL_VALUES), st.sampled_from(TEMPORAL_VALUES)),
        min_size=1,
        max_size=20,
    )
)
def test_date_comparison_is_the_same_in_sql(
    pairs: list[tuple[str, str]], module_pg_url: str
) -> None:
    with psycopg.connect(module_pg_url) as conn:
        for a, b in pairs:
            sql_text = temporal_compare_sql("%(a)s::text", "%(b)s::text")
            row = conn.execute(f"SELECT {sql_text}".encode(), {"a": a, "b": b}).fetchone()
            assert row is not None and row[0] == compare_temporal(a, b), (a, b)


def test_date_comparison_rules() -> None:
    assert compare_temporal("2024-01-01T01:00:00+02:00", "2024-01-01T00:00:00Z") == -1
    assert compare_temporal("2023-12-31T23:30:00-05:00", "2024-01-01T00:00:00Z") == 1
    assert compare_temporal("2024-01-01T00:00:00Z", "2024-01-01T00:00:00.000+00:00") == 0
    assert compare_temporal("2024", "2024-06") is None  # different precision, same year
    assert compare_temporal("2023", "2024-06") == -1
    assert compare_temporal("2024-01-01T10:00:00Z", "2024-01-01T10:00:00") is None
    assert compare_temporal("10:30", "10:30:00", time=True) is None
    assert compare_temporal("10:30:00", "10:30:00.0", time=True) == 0


def _numbers(places: int, bound: int) -> st.SearchStrategy[Decimal]:
    fixed = st.decimals(
        allow_nan=False, allow_infinity=False, places=places, min_value=-bound, max_value=bound
    )
    # Any exponent (1E+2, 0.000120), zeros of every scale and sign.
    free = st.builds(
        lambda digits, exponent: Decimal(digits).scaleb(exponent),
        st.integers(-(10**12), 10**12),
        st.integers(-20, 8),
    )
    zeros = st.sampled_from([Decimal("0"), Decimal("-0.0"), Decimal("0.000"), Decimal("0E+3")])
    return st.one_of(fixed, free, zeros)


@settings(max_examples=300, deadline=None)
@given(a=_numbers(6, 10**9), b=_numbers(4, 10**6).filter(bool))
@example(a=Decimal("-0.0"), b=Decimal(3))
@example(a=Decimal("0"), b=Decimal("0.5"))
def test_division_is_postgresql_numeric_division(
    a: Decimal, b: Decimal, module_pg_url: str
) -> None:
    """PostgreSQL itself is the reference: the Python engine's `/` prints what it prints."""
    with psycopg.connect(module_pg_url) as conn:
        row = conn.execute("SELECT (%s::numeric / %s::numeric)::text", (a, b)).fetchone()
    assert row is not None and row[0] == decimal_text(pg_divide(a, b)), (a, b)


def test_both_engines_print_arithmetic_on_any_decimal_alike(module_pg_url: str) -> None:
    """Zeros of every scale and sign, exponents: the same digits from both engines."""
    values = ["-0.0", "0", "0.000", "0E+3", "1E+2", "-1E-24", "6.50000000000000001", "7"]
    observations = [
        {"resourceType": "Observation", "id": f"o{n}", "status": "final",
         "code": {"text": "x"}, "valueQuantity": {"value": Decimal(v)}}
        for n, v in enumerate(values)
    ]  # fmt: skip
    paths = ["value.ofType(Quantity).value / 3", "value.ofType(Quantity).value * 1.50",
             "value.ofType(Quantity).value + 0.0", "-value.ofType(Quantity).value",
             "value.ofType(Quantity).value div 7", "value.ofType(Quantity).value mod 7"]  # fmt: skip
    definition = {
        "resourceType": "ViewDefinition",
        "resource": "Observation",
        "status": "active",
        "select": [
            {"column": [{"name": "id", "path": "id"}]
             + [{"name": f"c{n}", "path": p} for n, p in enumerate(paths)]}
        ],
    }  # fmt: skip
    python = evaluate(load_view(definition), observations)
    postgres = postgres_engine(module_pg_url)(definition, observations)
    assert _multiset(python, exact=True) == _multiset(postgres, exact=True)


# FHIR JSON "Representing primitive elements": pa's birthDate has only its `_birthDate`, and
# its second given name is a null with an extension. Expected values from FHIRPath on FHIR:
# the element exists (no value), and extensions are reached on every evaluation path.
_ABSENT = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
_PRIMITIVE_PATIENTS = [
    {"resourceType": "Patient", "id": "pa",
     "_birthDate": {"extension": [{"url": _ABSENT, "valueCode": "masked"}]},
     "name": [{"given": ["Ann", None, "Cee"],
               "_given": [None, {"extension": [{"url": "g", "valueString": "mid"}]},
                          {"id": "g3", "extension": [{"url": "g", "valueString": "last"}]}]}]},
    {"resourceType": "Patient", "id": "pb", "birthDate": "1970", "name": [{"given": ["X"]}]},
]  # fmt: skip
_PRIMITIVE_PATHS = {
    "exists": ("birthDate.exists()", [True, True]),
    "has_value": ("birthDate.hasValue()", [False, True]),
    "birth": ("birthDate", [None, "1970"]),
    "absent": (f"birthDate.extension('{_ABSENT}').value", ["masked", None]),
    "count": ("name.given.count()", [3, 1]),
    "values": ("name.given.join(',')", ["Ann,Cee", "X"]),
    "first": ("name.given.first().extension('g').value.ofType(string)", [None, None]),
    "index": ("name.given[1].extension('g').value.ofType(string)", ["mid", None]),
    "last_id": ("name.given.last().id", ["g3", None]),
    "where": ("name.given.where($this = 'Cee').extension('g').value.ofType(string)",
              ["last", None]),
    "tail": ("name.given.tail().extension('g').value.ofType(string).join('|')",
             ["mid|last", ""]),
    "computed": ("name.given.first().lower().extension('g').exists()", [False, False]),
}  # fmt: skip


@pytest.mark.parametrize("engine", ["python", "postgres"])
def test_primitive_extensions_on_every_evaluation_path(engine: str, module_pg_url: str) -> None:
    definition = {
        "resourceType": "ViewDefinition",
        "resource": "Patient",
        "status": "active",
        "select": [
            {"column": [{"name": "id", "path": "id"}]
             + [{"name": n, "path": p} for n, (p, _) in _PRIMITIVE_PATHS.items()]},
            {"forEachOrNull": "name.given",
             "column": [{"name": "given", "path": "$this"},
                        {"name": "given_ext", "path": "$this.extension('g').value"},
                        {"name": "n", "path": "%rowIndex"}]},
        ],
    }  # fmt: skip
    if engine == "python":
        rows = evaluate(load_view(definition), _PRIMITIVE_PATIENTS)
    else:
        rows = postgres_engine(module_pg_url)(definition, _PRIMITIVE_PATIENTS)
    given = {"pa": [("Ann", None), (None, "mid"), ("Cee", "last")], "pb": [("X", None)]}
    expected = [
        {"id": rid, **{n: want[k] for n, (_, want) in _PRIMITIVE_PATHS.items()},
         "given": g, "given_ext": x, "n": i}
        for k, rid in enumerate(["pa", "pb"])
        for i, (g, x) in enumerate(given[rid])
    ]  # fmt: skip
    assert _multiset(rows, exact=True) == _multiset(expected, exact=True)
