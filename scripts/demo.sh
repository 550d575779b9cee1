#!/usr/bin/env bash
# The main job on a fresh machine: set up what is missing, then run the whole flow.
# `researchflow demo` also runs alone (it creates its database); this adds the set-up and keeps
# the demo in its own PostgreSQL database and Redis database number, started empty (--reset):
# its stand-in HAPI numbers versions from 1 on every run. Standard output is the demo's JSON
# events only; the set-up and the story go to standard error.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
export DATABASE_URL="${DATABASE_URL:-postgresql://127.0.0.1:5432/researchflow_demo}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/3}"
exec .venv/bin/researchflow demo --reset "$@"
