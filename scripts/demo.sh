#!/usr/bin/env bash
# The main job on a fresh machine: set up what is missing, then run the whole flow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The demo keeps to its own PostgreSQL database and Redis database number, and starts them
# empty (--reset): its stand-in HAPI numbers versions from 1 on every run.
if ! psql -h 127.0.0.1 -d postgres -Atc "select 1 from pg_database where datname='researchflow_demo'" | grep -q 1; then
  psql -h 127.0.0.1 -d postgres -qc "CREATE DATABASE researchflow_demo"
fi
export DATABASE_URL="${DATABASE_URL:-postgresql://127.0.0.1:5432/researchflow_demo}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/3}"
exec .venv/bin/researchflow demo --reset "$@"
