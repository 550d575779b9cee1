"""The SQL-on-FHIR v2 suite and the shipped views on the Python evaluator."""

from __future__ import annotations

import copy
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from core.errors import BatchLayerUnavailable, InvalidViewDefinition
from serving.engines.conformance import (
    ENGINES,
    SuiteCase,
    compare_rows,
    default_suite_dir,
    load_suite,
    main,
    python_engine,
    register_engine,
    run_case,
    run_suite,
)
from serving.engines.python import (
    ViewEvaluationError,
    compile_view,
    evaluate,
    reference_key,
)
from serving.viewdef import ColumnInfo, load_view, load_view_file, shipped_views

SUITE = load_suite(default_suite_dir())
CASES = [(f.resources, case) for f in SUITE for case in f.cases]
EXAMPLES = default_suite_dir().parent / "fhir-r4-examples"


def test_suite_is_complete() -> None:
    assert len(SUITE) == 22
    assert len(CASES) == 134


@pytest.mark.parametrize(("resources", "case"), CASES, ids=[case.id for _, case in CASES])
def test_official_suite(resources: list[dict[str, Any]], case: SuiteCase) -> None:
    result = run_case(case, resources, python_engine())
    assert result.passed, result.reason


def test_run_suite_report_is_official_format(tmp_path: Path) -> None:
    report = run_suite(default_suite_dir(), python_engine())
    assert (report.passed, report.total) == (134, 134)
    official = report.to_official_json()
    assert set(official) == {f.name for f in SUITE}
    first = official["basic.json"]["tests"][0]
    assert first == {"name": "basic attribute", "result": {"passed": True}}
    assert "all" in report.table()


def test_cli_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert main(["--engine", "python", "--out", str(out)]) == 0
    assert "basic.json" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert all(t["result"]["passed"] for f in data.values() for t in f["tests"])


def test_cli_unknown_engine() -> None:
    assert main(["--engine", "nope"]) == 2


def test_register_engine_and_failures_are_reported() -> None:
    def broken(view: dict[str, Any], resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return []

    register_engine("broken-for-test", lambda: broken)
    try:
        report = run_suite(default_suite_dir(), ENGINES["broken-for-test"]())
    finally:
        del ENGINES["broken-for-test"]
    assert 0 < report.passed < report.total
    failed = report.to_official_json()["basic.json"]["tests"][0]["result"]
    assert failed["passed"] is False and "rows" in failed["reason"]


def test_expected_errors_are_only_invalid_view_definitions() -> None:
    # An expectError test passes when the engine refuses the view, not when it crashes or
    # cannot reach its database: those are failures of the engine, whatever the test expects.
    case = next(c for f in SUITE for c in f.cases if c.expect_error)

    def raising(exc: Exception) -> Any:
        def engine(view: dict[str, Any], resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
            raise exc

        return engine

    crashed = run_case(case, [], raising(RuntimeError("boom")))
    assert not crashed.passed and crashed.reason == "RuntimeError: boom"
    assert not run_case(case, [], raising(BatchLayerUnavailable("PostgreSQL is down"))).passed
    assert not run_case(case, [], raising(KeyError("x"))).passed
    assert run_case(case, [], raising(InvalidViewDefinition("refused"))).passed
    assert run_case(case, [], raising(ViewEvaluationError("failed on a resource"))).passed
    ok = next(c for f in SUITE for c in f.cases if not c.expect_error)
    refused = run_case(ok, [], raising(InvalidViewDefinition("refused")))
    assert not refused.passed and "refused" in (refused.reason or "")


def test_compare_rows_ignores_order_but_not_values() -> None:
    assert compare_rows([{"a": 1, "b": 2.0}, {"a": 3}], [{"a": 3}, {"b": 2, "a": 1}]) is None
    assert compare_rows([{"a": True}], [{"a": 1}]) is not None
    assert compare_rows([{"a": None}], [{"a": None}, {"a": None}]) is not None
    assert compare_rows([{"a": [1, 2]}], [{"a": [2, 1]}]) is not None


# ---------------------------------------------------------------------------
# shipped views


def _example(name: str) -> dict[str, Any]:
    return dict(json.loads((EXAMPLES / name).read_text()))


def test_shipped_views_columns() -> None:
    views = shipped_views()
    assert set(views) == {"patient_demographics", "condition_simple", "observation_simple"}
    names = {name: [c.name for c in view.columns] for name, view in views.items()}
    assert names["patient_demographics"] == [
        "id",
        "gender",
        "birth_date",
        "deceased",
        "version_id",
        "last_updated",
    ]
    assert names["condition_simple"] == [
        "id",
        "patient_id",
        "code_system",
        "code",
        "code_display",
        "code_text",
        "clinical_status",
        "verification_status",
        "onset",
        "version_id",
        "last_updated",
    ]
    assert names["observation_simple"] == [
        "id",
        "patient_id",
        "code_system",
        "code",
        "code_display",
        "value",
        "unit",
        "effective",
        "status",
        "version_id",
        "last_updated",
    ]
    value = views["observation_simple"].columns[5]
    assert value == ColumnInfo("value", "decimal", False)
    name, type_, collection = value
    assert (name, type_, collection) == ("value", "decimal", False)


def test_load_view_file_matches_shipped() -> None:
    path = Path(__file__).resolve().parents[1] / "serving/viewdefs/condition_simple.json"
    assert load_view_file(path) == shipped_views()["condition_simple"]


def test_patient_demographics_on_official_example() -> None:
    view = shipped_views()["patient_demographics"]
    patient = _example("patient-example.json")
    # The example carries a _birthDate extension: it must not become a second value.
    assert "_birthDate" in patient
    patient["meta"] = {"versionId": "3", "lastUpdated": "2024-01-02T03:04:05.678Z"}
    assert compile_view(view).rows(patient) == [
        {
            "id": "example",
            "gender": "male",
            "birth_date": "1974-12-25",
            "deceased": False,
            "version_id": "3",
            "last_updated": "2024-01-02T03:04:05.678Z",
        }
    ]


@pytest.mark.parametrize(
    ("deceased", "expected"),
    [
        ({"deceasedBoolean": True}, True),
        ({"deceasedBoolean": False}, False),
        ({"deceasedDateTime": "2020-02-02"}, True),
        ({}, None),
    ],
)
def test_patient_deceased(deceased: dict[str, Any], expected: bool | None) -> None:
    view = compile_view(shipped_views()["patient_demographics"])
    rows = view.rows({"resourceType": "Patient", "id": "p1", **deceased})
    assert rows[0]["deceased"] is expected
    assert rows[0]["gender"] is None and rows[0]["birth_date"] is None


def test_condition_simple_on_official_example() -> None:
    view = compile_view(shipped_views()["condition_simple"])
    rows = view.rows(_example("condition-example.json"))
    assert rows == [
        {
            "id": "example",
            "patient_id": "example",
            "code_system": "http://snomed.info/sct",
            "code": "39065001",
            "code_display": "Burn of ear",
            "code_text": "Burnt Ear",
            "clinical_status": "active",
            "verification_status": "confirmed",
            "onset": "2012-05-24",
            "version_id": None,
            "last_updated": None,
        }
    ]


REALISTIC_CONDITION: dict[str, Any] = {
    "resourceType": "Condition",
    "id": "c1",
    "meta": {"versionId": "2", "lastUpdated": "2025-11-25T14:00:00.123+00:00"},
    "clinicalStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active",
            }
        ]
    },
    "verificationStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": "confirmed",
            }
        ]
    },
    "code": {
        "coding": [
            {"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"},
            {"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"},
        ],
        "text": "Type 2 diabetes",
    },
    "subject": {"reference": "Patient/p42"},
    "onsetDateTime": "2019-04-01",
}


def test_condition_one_row_per_coding() -> None:
    view = compile_view(shipped_views()["condition_simple"])
    rows = view.rows(REALISTIC_CONDITION)
    assert [(r["code_system"], r["code"], r["code_display"]) for r in rows] == [
        ("http://snomed.info/sct", "44054006", "Diabetes"),
        ("http://hl7.org/fhir/sid/icd-10", "E11.9", None),
    ]
    for row in rows:
        assert row["patient_id"] == "p42"
        assert row["version_id"] == "2"
        assert row["last_updated"] == "2025-11-25T14:00:00.123+00:00"
        assert row["onset"] == "2019-04-01"
        assert row["code_text"] == "Type 2 diabetes"
        assert row["clinical_status"] == "active"
        assert row["verification_status"] == "confirmed"


def test_condition_with_only_text_still_has_a_row() -> None:
    condition = {
        "resourceType": "Condition",
        "id": "c2",
        "code": {"text": "something vague"},
        "subject": {"reference": "Group/g1"},
    }
    rows = compile_view(shipped_views()["condition_simple"]).rows(condition)
    assert len(rows) == 1
    assert rows[0]["code"] is None and rows[0]["code_system"] is None
    assert rows[0]["code_text"] == "something vague"
    # A subject that is not a Patient gives no patient_id.
    assert rows[0]["patient_id"] is None


def test_observation_simple_on_official_example() -> None:
    view = compile_view(shipped_views()["observation_simple"])
    rows = view.rows(_example("observation-example.json"))
    assert len(rows) == 4
    assert {r["code"] for r in rows} == {"29463-7", "3141-9", "27113001", "body-weight"}
    for row in rows:
        assert row["id"] == "example"
        assert row["patient_id"] == "example"
        assert row["value"] == 185
        assert row["unit"] == "lbs"
        assert row["effective"] == "2016-03-28"
        assert row["status"] == "final"


def test_observation_decimal_value_and_other_types() -> None:
    view = compile_view(shipped_views()["observation_simple"])
    obs = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "subject": {"reference": "Patient/p1"},
        "valueQuantity": {"value": Decimal("6.70000000000000001"), "unit": "%"},
        "effectiveDateTime": "2024-05-01T10:00:00Z",
    }
    (row,) = view.rows(obs)
    # A FHIR decimal stays exact: never a double.
    assert str(row["value"]) == "6.70000000000000001" and isinstance(row["value"], Decimal)
    assert (row["unit"], row["effective"], row["code"]) == ("%", "2024-05-01T10:00:00Z", "4548-4")
    obs.pop("valueQuantity")
    obs["valueString"] = "positive"
    obs.pop("effectiveDateTime")
    obs["effectivePeriod"] = {"start": "2024-01-01"}
    (row,) = view.rows(obs)
    assert row["value"] is None and row["unit"] is None and row["effective"] is None


def test_view_ignores_other_resource_types() -> None:
    view = compile_view(shipped_views()["observation_simple"])
    assert view.rows(REALISTIC_CONDITION) == []
    assert evaluate(shipped_views()["condition_simple"], [REALISTIC_CONDITION] * 3) != []


def test_shipped_views_are_fast() -> None:
    # The receiver evaluates views at write time: well under 1 ms per resource and view.
    resources = {
        "Patient": _example("patient-example.json"),
        "Condition": REALISTIC_CONDITION,
        "Observation": _example("observation-example.json"),
    }
    for view in shipped_views().values():
        compiled = compile_view(view)
        resource = resources[view.resource]
        start = time.perf_counter()
        for _ in range(200):
            compiled.rows(resource)
        per_resource = (time.perf_counter() - start) / 200
        assert per_resource < 0.001, (view.name, per_resource)


# ---------------------------------------------------------------------------
# typed children of a forEach


def test_for_each_keeps_types_for_its_children() -> None:
    # forEach on a plain path with a choice-type child must still resolve value[x] on the
    # iterated element (the static type of the focus is Observation.component).
    view = load_view(
        {
            "resource": "Observation",
            "select": [
                {
                    "forEach": "component",
                    "column": [
                        {"name": "code", "path": "code.coding.code.first()"},
                        {"name": "v", "path": "value.ofType(Quantity).value"},
                    ],
                }
            ],
        }
    )
    obs = {
        "resourceType": "Observation",
        "id": "bp",
        "component": [
            {"code": {"coding": [{"code": "8480-6"}]}, "valueQuantity": {"value": 120}},
            {"code": {"coding": [{"code": "8462-4"}]}, "valueQuantity": {"value": 80.5}},
        ],
    }
    assert compile_view(view).rows(obs) == [
        {"code": "8480-6", "v": 120},
        {"code": "8462-4", "v": 80.5},
    ]


# ---------------------------------------------------------------------------
# getReferenceKey


@pytest.mark.parametrize(
    ("reference", "type_name", "expected"),
    [
        ({"reference": "Patient/123"}, None, "123"),
        ({"reference": "Patient/123"}, "Patient", "123"),
        ({"reference": "Patient/123"}, "Group", None),
        ({"reference": "Patient/123/_history/4"}, "Patient", "123"),
        ({"reference": "https://fhir.example.org/fhir/Patient/abc-1"}, "Patient", "abc-1"),
        ({"reference": "http://x/fhir/Patient/abc/_history/2"}, None, "abc"),
        ({"reference": "#contained"}, None, None),
        ({"reference": "urn:uuid:53fefa32-fcbb-4ff8-8a92-55ee120877b7"}, None, None),
        ({"reference": ""}, None, None),
        ({"reference": "123"}, None, None),
        ({"display": "no reference"}, None, None),
        ({"identifier": {"value": "x"}}, "Patient", None),
        ("Patient/1", None, None),
    ],
)
def test_reference_key(reference: Any, type_name: str | None, expected: str | None) -> None:
    assert reference_key(reference, type_name) == expected


def test_get_reference_key_in_views() -> None:
    resource = {
        "resourceType": "Observation",
        "id": "o1",
        "subject": {"reference": "Patient/p1"},
        "performer": [{"reference": "Practitioner/d1"}, {"reference": "Patient/p1"}],
    }
    view = load_view(
        {
            "resource": "Observation",
            "select": [
                {
                    "column": [
                        {"name": "s", "path": "subject.getReferenceKey(Patient)"},
                        {"name": "any", "path": "subject.getReferenceKey()"},
                        {"name": "wrong", "path": "subject.getReferenceKey(Group)"},
                        {
                            "name": "perf",
                            "path": "performer.getReferenceKey(Practitioner)",
                        },
                        {
                            "name": "all_perf",
                            "path": "performer.getReferenceKey()",
                            "collection": True,
                        },
                        {"name": "same", "path": "subject.getReferenceKey() = 'p1'"},
                    ]
                }
            ],
        }
    )
    assert compile_view(view).rows(resource) == [
        {
            "s": "p1",
            "any": "p1",
            "wrong": None,
            "perf": "d1",
            "all_perf": ["d1", "p1"],
            "same": True,
        }
    ]


# ---------------------------------------------------------------------------
# invalid views


VALID: dict[str, Any] = {
    "resource": "Patient",
    "select": [{"column": [{"name": "id", "path": "id"}]}],
}


def _with(**changes: Any) -> dict[str, Any]:
    view = copy.deepcopy(VALID)
    view.update(changes)
    return view


@pytest.mark.parametrize(
    ("view", "reason"),
    [
        ([], "JSON object"),
        ({}, "resource"),
        (_with(resource="patient"), "resource"),
        (_with(resourceType="Patient"), "ViewDefinition"),
        (_with(select=[]), "select"),
        (_with(select={"column": []}), "select"),
        (_with(select=[{"column": [{"name": "id"}]}]), "path"),
        (_with(select=[{"column": [{"name": "bad name", "path": "id"}]}]), "column name"),
        (_with(select=[{"column": [{"name": "a", "path": "id", "collection": "yes"}]}]), "true"),
        (
            _with(select=[{"column": [{"name": "a", "path": "id"}, {"name": "a", "path": "id"}]}]),
            "unique",
        ),
        (_with(select=[{"forEach": "name", "forEachOrNull": "name"}]), "only one"),
        (_with(select=[{"forEach": 1}]), "forEach"),
        (_with(select=[{"repeat": "item"}]), "repeat"),
        (_with(select=[{"column": [{"name": "a", "path": "name.("}]}]), "FHIRPath"),
        (_with(select=[{"column": [{"name": "a", "path": "name.nosuchfn()"}]}]), "nosuchfn"),
        (_with(select=[{"column": [{"name": "a", "path": "%nope"}]}]), "%nope"),
        (_with(constant=[{"name": "x"}]), "value"),
        (_with(constant=[{"name": "x", "valueString": 1}]), "wrong JSON type"),
        (_with(constant=[{"name": "x", "valueFoo": "a"}]), "unsupported"),
        (
            _with(constant=[{"name": "x", "valueString": "a"}, {"name": "x", "valueInteger": 1}]),
            "twice",
        ),
        (_with(where=[{"description": "no path"}]), "path"),
        (_with(where={"path": "true"}), "where"),
        (
            _with(
                select=[
                    {
                        "unionAll": [
                            {"column": [{"name": "a", "path": "id"}]},
                            {"column": [{"name": "b", "path": "id"}]},
                        ]
                    }
                ]
            ),
            "same columns",
        ),
    ],
)
def test_invalid_views(view: Any, reason: str) -> None:
    with pytest.raises(InvalidViewDefinition, match=None) as info:
        compile_view(load_view(view))
    assert reason in str(info.value)


def test_load_view_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidViewDefinition, match=r"bad\.json"):
        load_view_file(bad)
    with pytest.raises(InvalidViewDefinition, match="cannot read"):
        load_view_file(tmp_path / "missing.json")


def test_runtime_errors_are_view_evaluation_errors() -> None:
    patient = {"resourceType": "Patient", "id": "p", "name": [{"family": "A"}, {"family": "B"}]}
    many = load_view(_with(select=[{"column": [{"name": "f", "path": "name.family"}]}]))
    with pytest.raises(ViewEvaluationError, match="collection: true"):
        compile_view(many).rows(patient)
    not_boolean = load_view(_with(where=[{"path": "name.family.first()"}]))
    with pytest.raises(ViewEvaluationError, match="boolean"):
        compile_view(not_boolean).rows(patient)
    assert isinstance(ViewEvaluationError("x"), InvalidViewDefinition)


def test_constants_and_view_metadata() -> None:
    view = load_view(
        _with(
            name="named_view",
            status="active",
            constant=[{"name": "fam", "valueString": "B"}, {"name": "n", "valueInteger": 1}],
            where=[{"path": "name.where(family = %fam).exists()"}],
            select=[{"column": [{"name": "f", "path": "name[%n].family"}]}],
        )
    )
    assert view.name == "named_view" and view.status == "active"
    assert [(c.name, c.value, c.value_type) for c in view.constant] == [
        ("fam", "B", "string"),
        ("n", 1, "integer"),
    ]
    patient = {"resourceType": "Patient", "id": "p", "name": [{"family": "A"}, {"family": "B"}]}
    assert compile_view(view).rows(patient) == [{"f": "B"}]
    assert sorted(view.expressions()) == sorted(
        ["name.where(family = %fam).exists()", "name[%n].family"]
    )


CHOICE_CASES = [
    ("Condition", "onset.ofType(dateTime)", {"onsetDateTime": "2025-06"}, "2025-06"),
    ("Condition", "onset.ofType(dateTime)", {"onsetString": "childhood"}, None),
    ("Condition", "onset.ofType(string)", {"onsetString": "childhood"}, "childhood"),
    (
        "Condition",
        "onset.ofType(Period).start",
        {"onsetPeriod": {"start": "2020-01-01"}},
        "2020-01-01",
    ),
    (
        "Observation",
        "value.ofType(Quantity).value",
        {"valueQuantity": {"value": Decimal("6.5"), "unit": "%"}},
        Decimal("6.5"),
    ),
    ("Observation", "value.ofType(Quantity).unit", {"valueString": "high"}, None),
    ("Observation", "value.ofType(string)", {"valueString": "high"}, "high"),
    ("Observation", "value.ofType(integer)", {"valueInteger": 3}, 3),
    ("Observation", "value.ofType(boolean)", {"valueBoolean": False}, False),
    (
        "Observation",
        "effective.ofType(dateTime)",
        {"effectiveDateTime": "2025-01-02T08:30:00Z"},
        "2025-01-02T08:30:00Z",
    ),
    ("Observation", "value", {"valueString": "high"}, "high"),
    ("Observation", "value.unit", {"valueQuantity": {"value": 1, "unit": "mg"}}, "mg"),
    ("Patient", "deceased.ofType(boolean)", {"deceasedBoolean": True}, True),
    ("Patient", "deceased.ofType(dateTime)", {"deceasedBoolean": True}, None),
]


@pytest.mark.parametrize(("resource_type", "path", "fields", "expected"), CHOICE_CASES)
def test_choice_elements(
    resource_type: str, path: str, fields: dict[str, Any], expected: Any
) -> None:
    # A choice element is every value[x] key; ofType(T) is the valueT key (FHIR JSON).
    view = load_view(
        {
            "resourceType": "ViewDefinition",
            "resource": resource_type,
            "select": [{"column": [{"name": "v", "path": path}]}],
        }
    )
    resource = {"resourceType": resource_type, "id": "x", **fields}
    assert compile_view(view).rows(resource) == [{"v": expected}]
