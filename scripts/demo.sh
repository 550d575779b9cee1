#!/usr/bin/env bash
# The main job on a fresh machine: set up what is missing, then run the whole flow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! psql -h 127.0.0.1 -d postgres -Atc "select 1 from pg_database where datname='researchflow'" | grep -q 1; then
  psql -h 127.0.0.1 -d postgres -qc "CREATE DATABASE researchflow"
fi
export DATABASE_URL="${DATABASE_URL:-postgresql://127.0.0.1:5432/researchflow}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
exec .venv/bin/researchflow demo "$@"
