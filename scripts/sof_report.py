"""Write the official SQL-on-FHIR v2 reports of both engines and print the README's pass table.

Run: `DATABASE_URL=postgresql://127.0.0.1:5432/test .venv/bin/python scripts/sof_report.py`
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from serving.engines.conformance import ENGINES, run_suite

REPORTS = Path(__file__).resolve().parents[1] / "reports"


def main() -> int:
    REPORTS.mkdir(exist_ok=True)
    reports = {}
    for engine in ("python", "postgres"):
        reports[engine] = run_suite(None, ENGINES[engine]()).to_official_json()
        out = REPORTS / f"sof-{engine}.json"
        out.write_text(json.dumps(reports[engine], indent=2) + "\n")
    print("| file | tests | python | postgres |")
    print("| --- | ---: | ---: | ---: |")
    totals = {"tests": 0, "python": 0, "postgres": 0}
    for name in sorted(reports["python"]):
        tests = reports["python"][name]["tests"]
        passed = {
            e: sum(1 for t in reports[e].get(name, {}).get("tests", []) if t["result"]["passed"])
            for e in reports
        }
        totals["tests"] += len(tests)
        for e in reports:
            totals[e] += passed[e]
        print(f"| {name} | {len(tests)} | {passed['python']} | {passed['postgres']} |")
    print(
        f"| **all** | **{totals['tests']}** | **{totals['python']}** | **{totals['postgres']}** |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
