"""Every command's start-up: a malformed setting, a dependency that cannot be reached or a
taken port stops it with one line naming the cause, a non-zero exit within seconds and no
traceback. Servers are real subprocesses here: `run` on a busy port must exit, not keep
running with nothing bound."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import researchflow_cli
from tests.conftest import TEST_REDIS_URL
from tests.procs import free_port

VIEW = Path(__file__).resolve().parents[1] / "serving" / "viewdefs" / "patient_demographics.json"

# Every command of the contract, with arguments that would otherwise let it start.
COMMANDS: dict[str, list[str]] = {
    "receiver": ["receiver", "--port", "0"],
    "serve": ["serve", "--port", "0"],
    "poll": ["poll"],
    "poll --once": ["poll", "--once"],
    "run": ["run", "--receiver-port", "0", "--serve-port", "0"],
    "demo": [
        "demo",
        "--duration",
        "1",
        "--patients",
        "2",
        "--receiver-port",
        "0",
        "--serve-port",
        "0",
    ],
    "subscriptions bootstrap": ["subscriptions", "bootstrap", "--wait", "0"],
    "subscriptions status": ["subscriptions", "status"],
    "subscriptions remove": ["subscriptions", "remove"],
    "batch init": ["batch", "init"],
    "batch refresh": ["batch", "refresh"],
    "speed get": ["speed", "get", "Patient/x"],
    "speed stats": ["speed", "stats"],
    "views run": ["views", "run", str(VIEW), "--resources", str(VIEW)],
    "views run --engine postgres": [
        "views",
        "run",
        str(VIEW),
        "--resources",
        str(VIEW),
        "--engine",
        "postgres",
    ],
}

# A malformed value of each kind, and the setting the one line must name.
BAD_SETTINGS: list[tuple[str, str]] = [
    ("REDIS_URL", "localhost:6379"),
    ("REDIS_URL", "redis://localhost:notaport/0"),
    ("REDIS_URL", "redis://localhost:6379/zero"),
    ("FHIR_BASE_URL", "localhost:8080/fhir"),
    ("RECEIVER_URL", "hapi.example/fhir"),
    ("DATABASE_URL", "localhost/researchflow"),
    ("DATABASE_URL", "mysql://localhost/researchflow"),
    ("HAPI_DATABASE_URL", "localhost:5432"),
    ("POLL_INTERVAL_SECONDS", "five"),
    ("RECEIVER_MAX_BODY_BYTES", "8MB"),
    ("MIN_CELL_COUNT", "-3"),
    ("REDIS_CLUSTER", "perhaps"),
    ("RECEIVER_RESOURCE_TYPES", "Patient,Unicorn"),
    # Values a URL parser or a library refuses with its own exception: still one line.
    ("FHIR_BASE_URL", "http://[::1"),
    ("RECEIVER_URL", "http://hapi:99999/fhir"),
    ("DATABASE_URL", "postgresql://[::1"),
    ("DATABASE_URL", "postgresql://localhost:70000/x"),
    ("HAPI_DATABASE_URL", "postgresql://[::1/hapi"),
    ("REDIS_URL", "redis://[::1"),
    ("REDIS_URL", "redis://localhost:6379/0?db=x"),
    ("REDIS_URL", "redis://localhost:6379/0?socket_timeout=soon"),
    ("REDIS_URL", "rediss://localhost:6379/0?protocol=9"),
    ("REDIS_CLUSTER", "yes"),  # the contract's words are true and false
    ("SPEED_MAX_AGE_HOURS", "99999999999"),  # past what Redis takes as an expiry
    ("RESEARCHFLOW_INSTANCE", "ours,theirs"),  # a `_tag` search would OR it
]


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECEIVER_TOKEN", "startup-receiver")
    monkeypatch.setenv("SERVING_TOKEN", "startup-serving")
    for name, _ in BAD_SETTINGS:
        monkeypatch.delenv(name, raising=False)


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS)
def test_a_malformed_setting_stops_every_command_with_one_line(
    tokens: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    name: str,
    value: str,
) -> None:
    monkeypatch.setenv(name, value)
    started = time.monotonic()
    code = researchflow_cli.main(COMMANDS[command])
    err = capsys.readouterr().err
    assert code == 2
    line = one_line(err)
    assert name in line and line.startswith(f"researchflow {COMMANDS[command][0]}:")
    assert time.monotonic() - started < 5
    if "://" in value or "@" in value:
        assert value not in line, "a URL is never echoed (it may hold a password)"


def test_a_well_formed_setting_of_each_kind_is_taken(tokens: None) -> None:
    from core.settings import Settings

    settings = Settings.from_env(
        {
            "REDIS_URL": "rediss://user:pw@redis.internal:6380/3",
            "DATABASE_URL": "postgresql://user@/db?host=/run/postgresql",
            "HAPI_DATABASE_URL": "host=hapi-db dbname=hapi",
            "FHIR_BASE_URL": "https://hapi.internal/fhir/",
            "RECEIVER_URL": "http://10.0.0.5:8081/fhir",
            "POLL_INTERVAL_SECONDS": "60",
        }
    )
    assert settings.fhir_base_url == "https://hapi.internal/fhir"
    assert settings.redis_url.endswith("/3") and settings.poll_interval_seconds == 60


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("-5", "must be from 1 to"),  # a whole number, just not a positive one
        ("0", "must be from 1 to"),
        ("+0", "must be from 1 to"),
        ("five", "must be a whole number"),
        ("5.0", "must be a whole number"),
        ("--5", "must be a whole number"),
    ],
)
def test_a_number_setting_says_which_rule_it_breaks(value: str, said: str) -> None:
    from core.settings import Settings, SettingsError

    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"POLL_INTERVAL_SECONDS": value})
    assert "POLL_INTERVAL_SECONDS" in str(caught.value) and said in str(caught.value)


UNREACHABLE = {
    "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    "DATABASE_URL": f"postgresql://127.0.0.1:{free_port()}/nothing",
    "FHIR_BASE_URL": f"http://127.0.0.1:{free_port()}/fhir",
}
# What each command needs that is down, and the word its one line must carry.
DEPENDENCIES: dict[str, tuple[str, str]] = {
    "receiver": ("REDIS_URL", "Redis"),
    "serve": ("DATABASE_URL", "PostgreSQL"),
    "poll": ("REDIS_URL", "Redis"),
    "poll --once": ("FHIR_BASE_URL", "HAPI"),
    "run": ("DATABASE_URL", "PostgreSQL"),
    "demo": ("REDIS_URL", "Redis"),
    "subscriptions bootstrap": ("FHIR_BASE_URL", "HAPI"),
    "subscriptions status": ("FHIR_BASE_URL", "HAPI"),
    "subscriptions remove": ("FHIR_BASE_URL", "HAPI"),
    "batch init": ("DATABASE_URL", "PostgreSQL"),
    "batch refresh": ("DATABASE_URL", "PostgreSQL"),
    "speed get": ("REDIS_URL", "Redis"),
    "speed stats": ("REDIS_URL", "Redis"),
    "views run --engine postgres": ("DATABASE_URL", "PostgreSQL"),
}


@pytest.mark.parametrize("command", sorted(DEPENDENCIES))
def test_a_dependency_down_stops_every_command_with_one_line(
    tokens: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    pg_url: str,
    command: str,
) -> None:
    name, word = DEPENDENCIES[command]
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv(name, UNREACHABLE[name])
    if name != "FHIR_BASE_URL":
        monkeypatch.setenv("FHIR_BASE_URL", UNREACHABLE["FHIR_BASE_URL"])
    started = time.monotonic()
    code = researchflow_cli.main(COMMANDS[command])
    err = capsys.readouterr().err
    assert code == 1, err
    assert word in err.strip().splitlines()[-1], err
    assert "Traceback" not in err
    assert time.monotonic() - started < 10


MAIN = "import sys; from researchflow_cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield int(holder.getsockname()[1])


def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", MAIN, *argv],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def services_env(database_url: str) -> dict[str, str]:
    """The settings a service command needs, HAPI unreachable."""
    return {
        "REDIS_URL": TEST_REDIS_URL,
        "DATABASE_URL": database_url,
        "FHIR_BASE_URL": UNREACHABLE["FHIR_BASE_URL"],
        "RECEIVER_TOKEN": "t",
        "SERVING_TOKEN": "s",
    }


def finished(proc: subprocess.Popen[str], what: str) -> str:
    """`proc`'s stderr once it has exited, which it must within 20 s: else it is killed and
    the test fails ("<what> kept running")."""
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{what} kept running")
    return err


@pytest.mark.parametrize(
    "argv",
    [
        ["receiver", "--port", "{taken}"],
        ["serve", "--port", "{taken}"],
        ["run", "--receiver-port", "{taken}", "--serve-port", "{free}"],
        ["run", "--receiver-port", "{free}", "--serve-port", "{taken}"],
        ["demo", "--receiver-port", "{taken}", "--duration", "1"],
    ],
    ids=["receiver", "serve", "run-receiver-port", "run-serve-port", "demo"],
)
def test_a_taken_port_stops_the_server_at_once(
    taken_port: int, pg_url: str, argv: list[str]
) -> None:
    args = [a.format(taken=taken_port, free=free_port()) for a in argv]
    proc = start(
        args,
        services_env(pg_url),
    )
    err = finished(proc, f"{args[0]} on a taken port")
    assert proc.returncode == 1
    line = one_line(err)
    assert f"port {taken_port}" in line and "already in use" in line, line


def test_run_without_its_batch_layer_exits_and_leaves_nothing_listening(pg_url: str) -> None:
    receiver_port = free_port()
    proc = start(
        ["run", "--receiver-port", str(receiver_port), "--serve-port", str(free_port())],
        services_env(UNREACHABLE["DATABASE_URL"]),
    )
    err = finished(proc, "run without its batch layer")
    assert proc.returncode == 1 and "PostgreSQL" in one_line(err)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", receiver_port)) != 0, "nothing left listening"


def test_a_port_is_bound_once_in_one_process_too() -> None:
    """Two SO_REUSEADDR sockets may bind one port on Linux while neither listens: `bind`
    listens at once, so a port named twice fails there, before anything starts."""
    from core.errors import StartupError
    from core.serve import bind

    first = bind("127.0.0.1", 0, "first")
    try:
        port = first.getsockname()[1]
        with pytest.raises(StartupError, match=rf"second: port {port} .* already in use"):
            bind("127.0.0.1", port, "second")
    finally:
        first.close()


@pytest.mark.parametrize("command", ["run", "demo"])
def test_the_same_port_for_both_servers_is_one_line_and_exit_2(command: str, pg_url: str) -> None:
    port = free_port()
    proc = start(
        [command, "--receiver-port", str(port), "--serve-port", str(port)],
        services_env(pg_url),
    )
    err = finished(proc, f"{command} with one port for both servers")
    assert proc.returncode == 2, err
    line = one_line(err)
    assert "--receiver-port and --serve-port" in line and str(port) in line, line


async def test_serving_runs_its_block_only_once_every_server_has_started() -> None:
    """What has effects elsewhere (the watchdog's Subscriptions, the poller's lease) runs in
    the block: a server that never starts means the block never runs."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette

    from core.errors import StartupError
    from core.serve import Listener, bind, serving

    @asynccontextmanager
    async def failing(app: Starlette) -> Any:
        raise RuntimeError("no database")
        yield

    listeners = [
        Listener(Starlette(), bind("127.0.0.1", 0, "good"), "good"),
        Listener(Starlette(lifespan=failing), bind("127.0.0.1", 0, "bad"), "bad"),
    ]
    ran = []
    try:
        with pytest.raises(StartupError, match=r"the bad on .* did not start"):
            async with serving(listeners):
                ran.append("block")
    finally:
        for item in listeners:
            item.sock.close()
    assert ran == []
    # Both started: the block runs, and ending it stops the servers.
    listeners = [Listener(Starlette(), bind("127.0.0.1", 0, n), n) for n in ("a", "b")]
    try:
        async with serving(listeners) as stopped:
            ran.append("block")
            assert not stopped.is_set()
    finally:
        for item in listeners:
            item.sock.close()
    assert ran == ["block"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"REDIS_CLUSTER": "true", "REDIS_URL": "redis://localhost:6379/3"}, "database 0"),
        ({"RECEIVER_TOKEN": "two words"}, "RECEIVER_TOKEN: token 1"),
        ({"SERVING_TOKEN": "ok,caf\u00e9"}, "SERVING_TOKEN: token 2"),
    ],
)
def test_settings_that_only_together_or_inside_a_list_are_malformed(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    named: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for argv in (COMMANDS["run"], COMMANDS["speed stats"]):
        assert researchflow_cli.main(argv) == 2
        line = one_line(capsys.readouterr().err)
        assert named in line and "bad setting" in line, line
        assert "two words" not in line and "caf" not in line, "a token is never echoed"


def test_redis_cluster_true_against_a_plain_redis_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL.rsplit("/", 1)[0] + "/0")
    assert researchflow_cli.main(COMMANDS["speed stats"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "not a cluster node" in line and "REDIS_CLUSTER" in line, line


@pytest.mark.parametrize("missing", ["database", "role"])
@pytest.mark.parametrize("command", ["batch init", "serve", "poll --once"])
def test_a_postgresql_that_answers_no_is_not_called_unreachable(
    tokens: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    missing: str,
    command: str,
) -> None:
    """README's first steps: DATABASE_URL naming a database not created yet. The server
    answered, so the line says what it answered, and how to create the database."""
    from tests.conftest import TEST_PG_ADMIN_URL

    base = TEST_PG_ADMIN_URL.rsplit("/", 1)[0]
    name = f"rf_never_created_{os.getpid()}"
    if missing == "database":
        url = f"{base}/{name}"
    else:
        url = base.replace("postgresql://", f"postgresql://{name}@", 1) + "/postgres"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("FHIR_BASE_URL", UNREACHABLE["FHIR_BASE_URL"])
    assert researchflow_cli.main(COMMANDS[command]) == 1
    line = one_line(capsys.readouterr().err)
    assert f'{missing} "{name}" does not exist' in line and "cannot be reached" not in line, line
    if missing == "database":
        assert f"createdb {name}" in line, line
