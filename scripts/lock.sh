#!/usr/bin/env bash
# Pin every dependency, with hashes, from pyproject.toml: requirements.lock (what the service
# runs on: the image installs it) and requirements-dev.lock (that plus the test and lint tools:
# scripts/setup.sh and CI install it). Run after changing pyproject.toml's dependencies; commit
# both files. pip-tools (pip-compile) runs in a throwaway virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3.11 -m venv "$tools/venv" 2>/dev/null || python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q pip-tools
compile() {
  "$tools/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras \
    --no-emit-index-url --no-emit-trusted-host --no-emit-find-links --resolver=backtracking "$@" pyproject.toml
}
compile --output-file requirements.lock
compile --extra dev --output-file requirements-dev.lock
echo "lock: wrote requirements.lock and requirements-dev.lock"
