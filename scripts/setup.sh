#!/usr/bin/env bash
# Set up what is missing on a fresh machine: Redis and PostgreSQL (Debian packages) when not
# installed, both started when not running, Java 17 and Maven for the real HAPI FHIR server
# when missing (it is built on first use by hapi-config/hapi.sh), a virtual environment with
# the package installed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)
# The status page is tested in a real headless Chromium.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# The real HAPI FHIR server (hapi-config/hapi.sh): Java 17 and Maven build and run it, curl
# waits for it. Machines of this project's kind come with Java and Maven.
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} from Debian's packages"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "setup: starting Redis on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --maxmemory-policy noeviction >/dev/null
  for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# Loopback access for the tests and the demo: trust on 127.0.0.1 and ::1 (Debian's cluster asks
# for a password there), put first in pg_hba.conf once, between markers.
pg_version=$(ls /etc/postgresql | sort -V | tail -n 1)
pg_hba="/etc/postgresql/$pg_version/main/pg_hba.conf"
if [ -f "$pg_hba" ] && ! grep -q '^# researchflow: loopback trust' "$pg_hba"; then
  echo "setup: trusting loopback connections in $pg_hba"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  { printf '# researchflow: loopback trust (tests and demo)\n'
    printf 'host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n'
    printf '# researchflow: end\n'
    $SUDO cat "$pg_hba"; } > /tmp/researchflow_pg_hba.$$
  $SUDO install -o postgres -g postgres -m 640 /tmp/researchflow_pg_hba.$$ "$pg_hba"
  rm -f /tmp/researchflow_pg_hba.$$
  pg_hba_changed=1
fi

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  echo "setup: starting PostgreSQL $pg_version"
  pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start || true
  for _ in $(seq 1 100); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.2; done
elif [ -n "${pg_hba_changed:-}" ]; then
  pg_ctlcluster --skip-systemctl-redirect "$pg_version" main reload
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  echo "setup: PostgreSQL is not answering on 127.0.0.1:5432" >&2
  exit 1
fi
if ! psql -h 127.0.0.1 -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  echo "setup: creating a PostgreSQL role for $(id -un)"
  su postgres -c "psql -Atc \"CREATE ROLE \\\"$(id -un)\\\" SUPERUSER LOGIN\"" >/dev/null
fi
if ! psql -h 127.0.0.1 -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  echo "setup: cannot connect to PostgreSQL on 127.0.0.1:5432 as $(id -un)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
if ! .venv/bin/python -c "import core, receiver, subscriptions, serving, pytest, respx" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ] || [ requirements-dev.lock -nt .venv/.installed ]; then
  echo "setup: installing the package and its development tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # Every dependency at the version and hash requirements-dev.lock pins (scripts/lock.sh
  # writes it from pyproject.toml), then the package itself without resolving again.
  # pip's and setuptools' notices stay in a log (shown only on failure): whoever runs this
  # (scripts/demo.sh, CI) sees its own output, not a build backend's deprecation banners.
  if ! { .venv/bin/python -m pip install -q --require-hashes -r requirements-dev.lock \
         && .venv/bin/python -m pip install -q --no-deps -e .; } >.venv/pip-install.log 2>&1; then
    cat .venv/pip-install.log >&2
    echo "setup: pip install failed (the lines above say why)" >&2
    exit 1
  fi
  .venv/bin/python -c "import core, receiver, subscriptions, serving"
  touch .venv/.installed
fi
