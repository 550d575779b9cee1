#!/usr/bin/env bash
# Run ResearchFlow's local HAPI FHIR JPA server (HAPI FHIR 8.8.0, R4, PostgreSQL, rest-hook
# Subscriptions on): the small Spring Boot application in this folder.
#
#   bash hapi-config/hapi.sh start   # build when needed, start, wait for /fhir/metadata,
#                                    # print the FHIR base URL as the last line
#   bash hapi-config/hapi.sh stop    # stop the server started with the same HAPI_PORT
#
# Environment:
#   HAPI_PORT          port on 127.0.0.1 (default 8080)
#   HAPI_DATABASE_URL  libpq URL of HAPI's PostgreSQL database, created when missing
#                      (default postgresql://127.0.0.1:5432/hapi)
#   HAPI_JAVA_OPTS     JVM options (default: a 1 GiB heap, see JAVA_OPTS_DEFAULT)
#   HAPI_START_TIMEOUT seconds to wait for /fhir/metadata after the JVM starts (default 300)
#   HAPI_RUN_DIR       where pid and log files go (default hapi-config/run)
# The first build downloads HAPI's and Spring's artifacts from Maven Central into ~/.m2
# (about 330 MB); later starts reuse the jar until pom.xml, src/ or application.yaml change.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PORT="${HAPI_PORT:-8080}"
DB_URL="${HAPI_DATABASE_URL:-postgresql://127.0.0.1:5432/hapi}"
RUN_DIR="${HAPI_RUN_DIR:-$HERE/run}"
TIMEOUT="${HAPI_START_TIMEOUT:-300}"
JAR="$HERE/target/researchflow-hapi.jar"
STAMP="$HERE/target/.source-hash"
PID_FILE="$RUN_DIR/hapi-$PORT.pid"
LOG_FILE="$RUN_DIR/hapi-$PORT.log"
# A 1 GiB heap holds HAPI's R4 context, its caches and the subscription queues with room to
# spare; the serial collector suits a small heap on a machine with few cores.
JAVA_OPTS_DEFAULT="-Xms256m -Xmx1g -XX:+UseSerialGC -XX:MaxMetaspaceSize=384m"

say() { echo "hapi.sh: $*" >&2; }
die() { say "$*"; exit 1; }

[[ "$PORT" =~ ^[0-9]+$ ]] && (( PORT >= 1 && PORT <= 65535 )) \
  || die "HAPI_PORT must be a port number, not '$PORT'"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "HAPI_START_TIMEOUT must be a number of seconds, not '$TIMEOUT'"

base_url() { echo "http://127.0.0.1:$PORT/fhir"; }

answers() { curl -sf -o /dev/null --max-time 5 "$(base_url)/metadata"; }

running_pid() {
  # The pid in the pid file, if that process is still alive.
  [ -f "$PID_FILE" ] || return 1
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

port_taken() {
  # True when something listens on 127.0.0.1:PORT (bash's /dev/tcp: no extra tool needed).
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

source_hash() {
  (cd "$HERE" && find pom.xml application.yaml src -type f -print0 | LC_ALL=C sort -z \
    | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

build() {
  local want
  want="$(source_hash)"
  if [ -f "$JAR" ] && [ "$(cat "$STAMP" 2>/dev/null || true)" = "$want" ]; then
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found: Maven 3.8+ is needed to build the server"
  mkdir -p "$RUN_DIR"
  local build_log="$RUN_DIR/build.log" m2="${HOME}/.m2/repository" started pid code
  say "building the server with Maven (the first build downloads ~330 MB; log: $build_log)"
  started=$SECONDS
  (cd "$HERE" && exec mvn -B -q -DskipTests package) >"$build_log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    kill -0 "$pid" 2>/dev/null || break
    if (( (SECONDS - started) % 15 < 5 )); then
      say "building... $((SECONDS - started)) s, Maven repository $(du -sm "$m2" 2>/dev/null | cut -f1) MB"
    fi
  done
  code=0
  wait "$pid" || code=$?
  if (( code != 0 )) || [ ! -f "$JAR" ]; then
    local reason
    reason="$(grep -m1 -E '^\[ERROR\]' "$build_log" | cut -c1-300 || true)"
    die "the Maven build failed (exit $code): ${reason:-see $build_log}"
  fi
  echo "$want" >"$STAMP"
  say "built in $((SECONDS - started)) s"
}

# Turn the libpq URL into JDBC settings; create the database when it is missing.
parse_db_url() {
  python3 - "$DB_URL" <<'PY'
import sys
from urllib.parse import parse_qsl, unquote, urlsplit, urlencode

url = sys.argv[1]
try:
    parts = urlsplit(url)
    port = parts.port or 5432
except ValueError as exc:
    sys.exit(f"HAPI_DATABASE_URL is not a valid URL: {exc}")
if parts.scheme not in ("postgresql", "postgres"):
    sys.exit(f"HAPI_DATABASE_URL must start with postgresql://, not {url.split(':', 1)[0]!r}")
query = dict(parse_qsl(parts.query))
host = parts.hostname or query.pop("host", "")
if not host or host.startswith("/"):
    sys.exit("HAPI_DATABASE_URL must name a TCP host (JDBC cannot use a Unix socket)")
db = unquote(parts.path.lstrip("/"))
if not db:
    sys.exit("HAPI_DATABASE_URL names no database")
user = unquote(parts.username or "")
password = unquote(parts.password or "")
jdbc_host = f"[{host}]" if ":" in host else host
jdbc = f"jdbc:postgresql://{jdbc_host}:{port}/{db}"
if query:
    jdbc += "?" + urlencode(query)
admin = parts._replace(path="/postgres").geturl()
for value in (jdbc, user, password, db, admin):
    print(value.replace("\n", " "))
PY
}

ensure_database() {
  # $1 admin URL (same server, database "postgres"), $2 database name
  command -v psql >/dev/null 2>&1 || return 0  # HAPI itself then names a missing database
  local exists
  # psql quotes the name itself (:'name'); it interpolates variables only in its input.
  if ! exists="$(psql "$1" -Atq -v ON_ERROR_STOP=1 -v name="$2" 2>&1 \
      <<<"SELECT 1 FROM pg_database WHERE datname = :'name'")"; then
    die "PostgreSQL at HAPI_DATABASE_URL cannot be reached: $(echo "$exists" | head -n 1)"
  fi
  if [ "$exists" != "1" ]; then
    say "creating database $2"
    local out
    out="$(psql "$1" -q -v ON_ERROR_STOP=1 -v name="$2" 2>&1 <<<'CREATE DATABASE :"name"')" \
      || die "cannot create database $2: $(echo "$out" | head -n 1)"
  fi
}

failure_reason() {
  # Spring Boot's own diagnosis ("Description:" block), else the innermost cause.
  local reason
  reason="$(awk '/^Description:/{d=1; next} d && NF {print; exit}' "$LOG_FILE")"
  [ -n "$reason" ] || reason="$(grep -E '^Caused by:' "$LOG_FILE" | tail -n 1 || true)"
  [ -n "$reason" ] || reason="$(grep -m1 -E ' ERROR ' "$LOG_FILE" || true)"
  echo "${reason:-no reason in the log}" | cut -c1-300
}

start() {
  command -v java >/dev/null 2>&1 || die "java not found: Java 17+ is needed to run HAPI FHIR"
  command -v curl >/dev/null 2>&1 || die "curl not found: it is needed to wait for /fhir/metadata"
  command -v python3 >/dev/null 2>&1 || die "python3 not found: it reads HAPI_DATABASE_URL"
  mkdir -p "$RUN_DIR" "$HERE/target"
  exec 9>"$HERE/target/.hapi-sh.lock"
  # One build and one start at a time per checkout (parallel test sessions share the jar).
  flock 9

  local db_info
  db_info="$(parse_db_url 2>&1)" || die "$(echo "$db_info" | tail -n 1)"
  local jdbc user password db admin
  { read -r jdbc; read -r user; read -r password; read -r db; read -r admin; } <<<"$db_info"

  local pid
  if pid="$(running_pid)"; then
    if [ "$(cat "$RUN_DIR/hapi-$PORT.db" 2>/dev/null || true)" != "$jdbc" ]; then
      die "a server started here already runs on port $PORT with another database: stop it first"
    fi
    answers || die "the server on port $PORT (pid $pid) is still starting or does not answer"
    say "already running on port $PORT (pid $pid)"
    base_url
    return 0
  fi
  port_taken && die "port $PORT is taken by another program (set HAPI_PORT)"

  build
  ensure_database "$admin" "$db"

  say "starting HAPI FHIR on 127.0.0.1:$PORT (database $db; log: $LOG_FILE)"
  local opts="${HAPI_JAVA_OPTS:-$JAVA_OPTS_DEFAULT}"
  # shellcheck disable=SC2086  # word-splitting of the JVM options is intended
  HAPI_JDBC_URL="$jdbc" HAPI_DB_USER="${user:-$(id -un)}" HAPI_DB_PASSWORD="$password" \
    HAPI_PORT="$PORT" nohup setsid java $opts -jar "$JAR" --server.address=127.0.0.1 \
    >"$LOG_FILE" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$PID_FILE"
  echo "$jdbc" >"$RUN_DIR/hapi-$PORT.db"
  local started=$SECONDS
  while ! answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PID_FILE"
      die "HAPI FHIR stopped while starting: $(failure_reason) (log: $LOG_FILE)"
    fi
    if (( SECONDS - started > TIMEOUT )); then
      kill "$pid" 2>/dev/null || true
      rm -f "$PID_FILE"
      die "HAPI FHIR did not answer /fhir/metadata within $TIMEOUT s (log: $LOG_FILE)"
    fi
    if (( (SECONDS - started) % 15 == 14 )); then
      say "waiting for /fhir/metadata... $((SECONDS - started)) s"
    fi
    sleep 1
  done
  say "started in $((SECONDS - started)) s (pid $pid)"
  base_url
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$PID_FILE"
    say "no server started here runs on port $PORT"
    return 0
  fi
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "the server (pid $pid) did not stop within 30 s: killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_FILE" "$RUN_DIR/hapi-$PORT.db"
  say "stopped the server on port $PORT"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) die "usage: bash hapi-config/hapi.sh start|stop (HAPI_PORT, HAPI_DATABASE_URL)" ;;
esac
