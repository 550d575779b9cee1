"""The official SQL-on-FHIR v2 test suite, run against any engine (python, postgres...)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from core.errors import InvalidViewDefinition
from core.fhir_values import loads
from serving.engines.postgres import engine_from_env
from serving.engines.python import python_engine

__all__ = [
    "ENGINES",
    "CaseResult",
    "Engine",
    "Report",
    "SuiteCase",
    "SuiteFile",
    "compare_rows",
    "default_suite_dir",
    "load_suite",
    "main",
    "register_engine",
    "run_case",
    "run_suite",
]

# An engine turns (ViewDefinition JSON, resources) into rows; it raises for a view it
# rejects. A factory builds one (it may open a database connection).
Engine = Callable[[dict[str, Any], list[dict[str, Any]]], list[dict[str, Any]]]
EngineFactory = Callable[[], Engine]

# The engines the CLI's `--engine` names.
ENGINES: dict[str, EngineFactory] = {"python": python_engine, "postgres": engine_from_env}


def register_engine(name: str, factory: EngineFactory) -> None:
    """Make another engine available to the suite's CLI as `--engine name`."""
    ENGINES[name] = factory


def default_suite_dir() -> Path:
    """$RESEARCHFLOW_SHARED/sql-on-fhir-v2-tests, or ../shared next to the repository."""
    shared = os.environ.get("RESEARCHFLOW_SHARED")
    base = Path(shared) if shared else Path(__file__).resolve().parents[3] / "shared"
    return base / "sql-on-fhir-v2-tests"


@dataclass(frozen=True)
class SuiteCase:
    """One test of a suite file."""

    file: str
    name: str
    view: dict[str, Any]
    expect: list[dict[str, Any]] | None = None
    expect_count: int | None = None
    expect_error: bool = False
    expect_columns: list[str] | None = None
    tags: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.file}::{self.name}"


@dataclass(frozen=True)
class SuiteFile:
    """One JSON file of the suite: fixture resources and the tests over them."""

    name: str  # the file name, e.g. "basic.json"
    title: str
    resources: list[dict[str, Any]]
    cases: tuple[SuiteCase, ...]


def load_suite(directory: str | Path | None = None) -> list[SuiteFile]:
    """Every suite file in `directory` (default: default_suite_dir()), sorted by name."""
    root = Path(directory) if directory is not None else default_suite_dir()
    files: list[SuiteFile] = []
    for path in sorted(root.glob("*.json")):
        if path.name == "tests.schema.json":
            continue
        data = loads(path.read_bytes())
        if not isinstance(data, dict) or "tests" not in data:
            continue
        cases = tuple(
            SuiteCase(
                file=path.name,
                name=test["title"],
                view=test["view"],
                expect=test.get("expect"),
                expect_count=test.get("expectCount"),
                expect_error=bool(test.get("expectError", False)),
                expect_columns=test.get("expectColumns"),
                tags=tuple(test.get("tags", ())),
            )
            for test in data["tests"]
        )
        files.append(
            SuiteFile(
                name=path.name,
                title=data.get("title", path.stem),
                resources=data.get("resources", []),
                cases=cases,
            )
        )
    return files


def _canonical(value: Any) -> Any:
    """A form where equal SQL values compare equal: 5 == 5.0 == Decimal("5.00"), True != 1."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return ["s", value]
    if isinstance(value, int | float | Decimal):
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        return ["n", format(number.normalize(), "f") if number else "0"]
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return ["?", repr(value)]


def _row_key(row: dict[str, Any]) -> str:
    return json.dumps(_canonical(row), sort_keys=True)


def compare_rows(
    actual: Sequence[dict[str, Any]], expected: Sequence[dict[str, Any]]
) -> str | None:
    """None when the rows match as a multiset (row order and key order ignored), else why."""
    if len(actual) != len(expected):
        return f"expected {len(expected)} rows, got {len(actual)}"
    got = sorted(_row_key(r) for r in actual)
    want = sorted(_row_key(r) for r in expected)
    if got != want:
        missing = [w for w in want if w not in got][:3]
        extra = [g for g in got if g not in want][:3]
        return f"rows differ; missing {missing}, unexpected {extra}"
    return None


@dataclass(frozen=True)
class CaseResult:
    """The outcome of one test."""

    case: SuiteCase
    passed: bool
    reason: str | None = None


def run_case(case: SuiteCase, resources: list[dict[str, Any]], engine: Engine) -> CaseResult:
    """Run one test: an expectError test passes only when the engine refuses the view with
    InvalidViewDefinition (invalid, or failing on these resources: ViewEvaluationError);
    any other exception (a crash, a database that cannot be reached) fails it."""
    try:
        rows = engine(case.view, resources)
    except InvalidViewDefinition as exc:
        if case.expect_error:
            return CaseResult(case, True)
        return CaseResult(case, False, f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        return CaseResult(case, False, f"{type(exc).__name__}: {exc}")
    if case.expect_error:
        return CaseResult(case, False, "expected an error, got rows")
    if case.expect_count is not None and len(rows) != case.expect_count:
        return CaseResult(case, False, f"expected {case.expect_count} rows, got {len(rows)}")
    if case.expect_columns is not None:
        for row in rows:
            if list(row) != list(case.expect_columns):
                return CaseResult(
                    case, False, f"expected columns {case.expect_columns}, got {list(row)}"
                )
    if case.expect is not None:
        reason = compare_rows(rows, case.expect)
        if reason is not None:
            return CaseResult(case, False, reason)
    return CaseResult(case, True)


@dataclass
class Report:
    """Results per suite file, in the order the suite lists them."""

    results: dict[str, list[CaseResult]] = field(default_factory=dict)

    @property
    def passed(self) -> int:
        return sum(r.passed for rs in self.results.values() for r in rs)

    @property
    def total(self) -> int:
        return sum(len(rs) for rs in self.results.values())

    def failures(self) -> list[CaseResult]:
        return [r for rs in self.results.values() for r in rs if not r.passed]

    def to_official_json(self) -> dict[str, Any]:
        """The report format of the SQL-on-FHIR v2 test runner."""
        report: dict[str, Any] = {}
        for file, results in self.results.items():
            tests = []
            for result in results:
                outcome: dict[str, Any] = {"passed": result.passed}
                if result.reason:
                    outcome["reason"] = result.reason
                tests.append({"name": result.case.name, "result": outcome})
            report[file] = {"tests": tests}
        return report

    def table(self) -> str:
        """A per-file pass table for a terminal."""
        width = max([len(f) for f in self.results] + [4])
        lines = [f"{'file':<{width}}  passed  total"]
        for file, results in self.results.items():
            passed = sum(r.passed for r in results)
            lines.append(f"{file:<{width}}  {passed:>6}  {len(results):>5}")
        lines.append(f"{'all':<{width}}  {self.passed:>6}  {self.total:>5}")
        return "\n".join(lines)


def run_suite(directory: str | Path | None, engine: Engine) -> Report:
    """Run every test of the suite in `directory` on `engine`."""
    return run_files(load_suite(directory), engine)


def run_files(files: Iterable[SuiteFile], engine: Engine) -> Report:
    report = Report()
    for suite_file in files:
        report.results[suite_file.name] = [
            run_case(case, suite_file.resources, engine) for case in suite_file.cases
        ]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.engines.conformance",
        description="Run the official SQL-on-FHIR v2 test suite on an engine.",
    )
    parser.add_argument("--engine", default="python", help=f"one of {sorted(ENGINES)}")
    parser.add_argument("--out", type=Path, help="write the official JSON test report here")
    parser.add_argument("--suite", type=Path, default=None, help="the suite's directory")
    args = parser.parse_args(argv)
    factory = ENGINES.get(args.engine)
    if factory is None:
        print(f"unknown engine {args.engine!r}; known: {', '.join(sorted(ENGINES))}")
        return 2
    report = run_suite(args.suite, factory())
    print(report.table())
    for failure in report.failures():
        print(f"FAIL {failure.case.id}: {failure.reason}")
    if args.out is not None:
        args.out.write_text(json.dumps(report.to_official_json(), indent=2) + "\n")
    return 0 if report.passed == report.total else 1


if __name__ == "__main__":
    sys.exit(main())
