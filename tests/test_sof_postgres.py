"""The SQL-on-FHIR v2 suite, the shipped views and quoting safety on the PostgreSQL engine."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from core.errors import BatchLayerUnavailable, InvalidViewDefinition
from serving.engines.conformance import ENGINES, SuiteCase, compare_rows, load_suite, run_case
from serving.engines.postgres import column_sql_types, compile_view, postgres_engine
from serving.engines.python import evaluate
from serving.viewdef import load_view
from tests.conftest import fresh_database

SUITE = load_suite()
CASES = [(case, suite_file.resources) for suite_file in SUITE for case in suite_file.cases]
VIEWDEFS = Path(__file__).resolve().parents[1] / "serving" / "viewdefs"


@pytest.fixture(scope="module")
def module_pg_url() -> Iterator[str]:
    """One empty database for the whole module: the engine only uses temporary tables."""
    with fresh_database("rf_test_sof") as url:
        yield url


def test_suite_is_complete() -> None:
    assert len(CASES) == 134
    assert sum("shareable" in case.tags for case, _ in CASES) == 123


@pytest.mark.parametrize(("case", "resources"), CASES, ids=[case.id for case, _ in CASES])
def test_official_suite(
    case: SuiteCase, resources: list[dict[str, Any]], module_pg_url: str
) -> None:
    result = run_case(case, resources, postgres_engine(module_pg_url))
    assert result.passed, result.reason


def test_engine_is_registered() -> None:
    assert "postgres" in ENGINES


# --------------------------------------------------------------------------- shipped views

PATIENTS: list[dict[str, Any]] = [
    {
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"versionId": "3", "lastUpdated": "2026-11-20T10:00:00.000+00:00"},
        "gender": "female",
        "birthDate": "1970-03-12",
        "deceasedDateTime": "2020-01-01T00:00:00Z",
        "name": [{"family": "O'Brien", "given": ["Ann"]}],
    },
    {
        "resourceType": "Patient",
        "id": "p2",
        "meta": {"versionId": "1", "lastUpdated": "2026-11-21T10:00:00Z"},
        "gender": "male",
        "birthDate": "1985",
        "deceasedBoolean": False,
    },
    {"resourceType": "Patient", "id": "p3"},
]
CONDITIONS: list[dict[str, Any]] = [
    {
        "resourceType": "Condition",
        "id": "c1",
        "meta": {"versionId": "2", "lastUpdated": "2026-11-22T08:00:00Z"},
        "subject": {"reference": "Patient/p1"},
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
        "code": {
            "text": "Diabetes",
            "coding": [
                {"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"},
                {"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11"},
            ],
        },
        "onsetDateTime": "2019-05-01",
    },
    {
        "resourceType": "Condition",
        "id": "c2",
        "subject": {"reference": "https://hapi.example/fhir/Patient/p2/_history/4"},
        "code": {"text": "only text"},
    },
    {"resourceType": "Condition", "id": "c3", "subject": {"reference": "Group/g1"}},
]
OBSERVATIONS: list[dict[str, Any]] = [
    {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "valueQuantity": {"value": 7.25, "unit": "%"},
        "effectiveDateTime": "2026-11-01T09:30:00+01:00",
    },
    {
        "resourceType": "Observation",
        "id": "o2",
        "status": "cancelled",
        "subject": {"reference": "Patient/p2"},
        "code": {"text": "no coding"},
        "valueString": "n/a",
    },
]
RESOURCES = PATIENTS + CONDITIONS + OBSERVATIONS


def _shipped() -> list[Path]:
    return sorted(VIEWDEFS.glob("*.json"))


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: p.stem)
def test_shipped_view_matches_python_engine(path: Path, module_pg_url: str) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = postgres_engine(module_pg_url)(data, RESOURCES)
    expected = evaluate(load_view(data), RESOURCES)
    assert rows, "the fixture should give rows"
    assert compare_rows(rows, expected) is None, (rows, expected)


def test_shipped_views_exist() -> None:
    names = {p.stem for p in _shipped()}
    assert {"patient_demographics", "condition_simple", "observation_simple"} <= names


def test_shipped_view_values(module_pg_url: str) -> None:
    engine = postgres_engine(module_pg_url)
    patients = {r["id"]: r for r in engine(_view("patient_demographics"), RESOURCES)}
    assert patients["p1"]["deceased"] is True
    assert patients["p2"] == {
        "id": "p2",
        "gender": "male",
        "birth_date": "1985",
        "deceased": False,
        "version_id": "1",
        "last_updated": "2026-11-21T10:00:00Z",
    }
    assert patients["p3"]["deceased"] is None
    conditions = engine(_view("condition_simple"), RESOURCES)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in conditions:
        by_id.setdefault(row["id"], []).append(row)
    assert sorted(r["code"] for r in by_id["c1"]) == ["44054006", "E11"]
    assert {r["patient_id"] for r in by_id["c1"]} == {"p1"}
    assert by_id["c2"][0]["patient_id"] == "p2"  # absolute URL with _history
    assert by_id["c2"][0]["code"] is None and by_id["c2"][0]["code_text"] == "only text"
    assert by_id["c3"][0]["patient_id"] is None  # a Group reference is not a Patient key
    observations = {r["id"]: r for r in engine(_view("observation_simple"), RESOURCES)}
    assert observations["o1"]["value"] == 7.25 and observations["o1"]["unit"] == "%"
    assert observations["o2"]["value"] is None and observations["o2"]["status"] == "cancelled"


def _view(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VIEWDEFS / f"{name}.json").read_text(encoding="utf-8"))
    return data


def test_compiled_view_over_batch_table(pg_url: str) -> None:
    """What the batch layer does: a materialized view over its raw table, deleted rows out."""
    view = _view("condition_simple")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA rf_batch")
        conn.execute(
            "CREATE TABLE rf_batch.resources (resource_type text, resource jsonb,"
            " deleted boolean NOT NULL DEFAULT false)"
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO rf_batch.resources VALUES (%s, %s, %s)",
                [(r["resourceType"], Jsonb(r), r["id"] == "c3") for r in RESOURCES],
            )
        conn.execute("CREATE SCHEMA sqlonfhir")
        query = compile_view(view, table="rf_batch.resources")
        conn.execute(f"CREATE MATERIALIZED VIEW sqlonfhir.condition_simple AS {query}".encode())
        ids = conn.execute("SELECT DISTINCT id FROM sqlonfhir.condition_simple").fetchall()
        assert sorted(i for (i,) in ids) == ["c1", "c2"]
        types = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'sqlonfhir.condition_simple'::regclass AND attnum > 0"
            " ORDER BY attnum"
        ).fetchall()
    assert [tuple(t) for t in types] == column_sql_types(view)


def test_column_sql_types() -> None:
    view = {
        "resource": "Patient",
        "select": [
            {
                "column": [
                    {"name": "id", "path": "id", "type": "id"},
                    {"name": "n", "path": "multipleBirth.ofType(integer)", "type": "integer"},
                    {"name": "d", "path": "1.5", "type": "decimal"},
                    {"name": "b", "path": "active", "type": "boolean"},
                    {"name": "when", "path": "birthDate", "type": "date"},
                    {"name": "names", "path": "name.family", "collection": True},
                    {"name": "raw", "path": "name.first()"},
                ]
            }
        ],
    }
    assert column_sql_types(view) == [
        ("id", "text"),
        ("n", "integer"),
        ("d", "numeric"),
        ("b", "boolean"),
        ("when", "text"),
        ("names", "jsonb"),
        ("raw", "jsonb"),
    ]


# --------------------------------------------------------------------------- safety


def _id_view(where: str, **extra: Any) -> dict[str, Any]:
    return {
        "resource": "Patient",
        "select": [{"column": [{"name": "id", "path": "id", "type": "id"}]}],
        "where": [{"path": where}],
        **extra,
    }


HOSTILE = [
    "'; DROP TABLE pg_temp.rf_sof_resources; --",
    "O'Brien",
    'a"b\\c',
    "$$; SELECT 1; $$",
    "\\' OR 1=1 --",
    "é 😀 \u2028",
    "%s %(x)s {} %%",
    "\u0001\t\n",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_constant_cannot_break_out(text: str, module_pg_url: str) -> None:
    resources = [
        {"resourceType": "Patient", "id": "hit", "name": [{"family": text}]},
        {"resourceType": "Patient", "id": "miss", "name": [{"family": "Smith"}]},
    ]
    view = _id_view(
        "name.where(family = %fam).exists()", constant=[{"name": "fam", "valueString": text}]
    )
    assert postgres_engine(module_pg_url)(view, resources) == [{"id": "hit"}]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_string_literal_and_extension_url(text: str, module_pg_url: str) -> None:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    resources = [
        {
            "resourceType": "Patient",
            "id": "hit",
            "name": [{"family": text}],
            "extension": [{"url": text, "valueCode": "x"}],
        },
        {"resourceType": "Patient", "id": "miss", "extension": [{"url": "u", "valueCode": "y"}]},
    ]
    engine = postgres_engine(module_pg_url)
    assert engine(_id_view(f"name.family = '{escaped}'"), resources) == [{"id": "hit"}]
    view = _id_view(f"extension('{escaped}').value.ofType(code) = 'x'")
    assert engine(view, resources) == [{"id": "hit"}]


def test_backtick_member_name_is_quoted(module_pg_url: str) -> None:
    resources = [{"resourceType": "Patient", "id": "p", 'we"ird': "v"}]
    view = {
        "resource": "Patient",
        "select": [{"column": [{"name": "v", "path": '`we"ird`', "type": "string"}]}],
    }
    assert postgres_engine(module_pg_url)(view, resources) == [{"v": "v"}]


@pytest.mark.parametrize(
    "table", ['x"; DROP TABLE y; --', "a b", "a.b.c.d", "", "rf_batch.resources; SELECT 1"]
)
def test_unsafe_table_name_is_refused(table: str) -> None:
    with pytest.raises(InvalidViewDefinition):
        compile_view(_id_view("active"), table=table)


def test_resource_type_is_a_literal() -> None:
    with pytest.raises(InvalidViewDefinition):
        compile_view({**_id_view("active"), "resource": "Patient' OR true --"}, table="t")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "path",
    ["name.family.frobnicate()", "name.(", "@@", "name[", "%undefined", "extension(url)"],
)
def test_uncompilable_paths_are_invalid(path: str) -> None:
    view = {"resource": "Patient", "select": [{"column": [{"name": "c", "path": path}]}]}
    with pytest.raises(InvalidViewDefinition):
        compile_view(view, table="t")


def test_runtime_errors_name_the_reason(module_pg_url: str) -> None:
    resources = [{"resourceType": "Patient", "id": "p", "name": [{"family": "a"}, {"family": "b"}]}]
    view = {
        "resource": "Patient",
        "select": [{"column": [{"name": "fam", "path": "name.family", "type": "string"}]}],
    }
    with pytest.raises(InvalidViewDefinition, match='column "fam" is not a collection'):
        postgres_engine(module_pg_url)(view, resources)
    with pytest.raises(InvalidViewDefinition, match=re.escape("where path 'name.family' returned")):
        postgres_engine(module_pg_url)(_id_view("name.family"), resources)


def test_unreachable_database() -> None:
    engine = postgres_engine("postgresql://127.0.0.1:1/nothing?connect_timeout=2")
    with pytest.raises(BatchLayerUnavailable):
        engine(_id_view("active"), [])


def test_compile_view_is_one_select() -> None:
    query = compile_view(_view("observation_simple"), table="rf_batch.resources")
    assert query.startswith("SELECT ") and ";" not in query
    assert '"rf_batch"."resources"' in query
    assert "NOT _r.deleted" in query


# --------------------------------------------------------------------------- beyond the suite

EXTRA_PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "gender": "male",
    "birthDate": "1990-01-01",
    "name": [{"family": "A", "given": ["x", "y"]}, {"family": "B"}],
    "telecom": [{"system": "phone", "value": "1"}, {"system": "phone", "value": "1"}],
}
EXTRA_PATHS = [
    "name.given.count()",
    "name.select(given)",
    "(name.family | name.given)",
    "birthDate < @2000-01-01",
    "name.family.first() + ' x'",
    "gender in ('male' | 'female')",
    "name.all(family.exists())",
    "'a' & {}",
    "telecom.where(system='phone').value.distinct()",
    "%resource.id",
    "Patient.name.family",
    "name.first().given.first().upper()",
    "name.family.first().startsWith('A')",
    "name.exists(family = 'B')",
    "2 * 3 - 1",
    "7 div 2",
    "7 mod 2",
    "name.last().family",
    "name.tail().family",
    "name.skip(1).family",
    "name.take(1).family",
    "name.given.join('|')",
    "-(1.5)",
    "name.family.first().length()",
    "true implies false",
    "true xor false",
    "name.family ~ name.family",
    "gender != 'female'",
]


@pytest.mark.parametrize("path", EXTRA_PATHS)
def test_fhirpath_agrees_with_python_engine(path: str, module_pg_url: str) -> None:
    view = {
        "resource": "Patient",
        "select": [{"column": [{"name": "c", "path": path, "collection": True}]}],
    }
    rows = postgres_engine(module_pg_url)(view, [EXTRA_PATIENT])
    assert compare_rows(rows, evaluate(load_view(view), [EXTRA_PATIENT])) is None, rows
