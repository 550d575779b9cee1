#!/usr/bin/env bash
# The one check command: ruff (format + lint), mypy, then pytest with coverage (floor 80%).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff format --check"; ruff format --check .
echo "== ruff check"; ruff check .
echo "== mypy"; mypy
echo "== pytest"
rm -f .coverage .coverage.*
set +e
COVERAGE_PROCESS_START="$PWD/pyproject.toml" python -m pytest --cov --cov-report=term --cov-fail-under=80 "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then echo "check: pytest collected no tests"; exit 1; fi
exit "$code"
