"""The `researchflow` commands that talk to HAPI and run services, against the stand-in HAPI."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio

import researchflow_cli
from core.store import POLLER_LEASE_KEY
from subscriptions.standin import synthetic
from subscriptions.standin.hapi import StandInHapi
from subscriptions.standin.run import ThreadedStandIn, serve_standin_in_thread
from tests.conftest import redis_db
from tests.procs import free_port, wait_port

CLI_REDIS_URL = redis_db(6)


@pytest.fixture
def standin() -> Iterator[ThreadedStandIn]:
    hapi = StandInHapi(activation_delay=0.05)
    with serve_standin_in_thread(hapi) as handle:
        rnd = random.Random(2)
        for resource in synthetic.population(15, seed=2):
            handle.call(hapi.update(resource))
        del rnd
        yield handle


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, pg_url: str, standin: ThreadedStandIn) -> dict[str, str]:
    values = {
        "REDIS_URL": CLI_REDIS_URL,
        "DATABASE_URL": pg_url,
        "FHIR_BASE_URL": standin.base_url,
        "RECEIVER_URL": "http://127.0.0.1:9/fhir",
        "RECEIVER_TOKEN": "cli-receiver-token",
        "SERVING_TOKEN": "cli-serving-token",
        "RESEARCHFLOW_INSTANCE": "cli-test",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    r = redis.Redis.from_url(CLI_REDIS_URL)
    r.flushdb()
    yield values
    r.flushdb()
    r.close()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = researchflow_cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_subscriptions_bootstrap_status_remove(
    env: dict[str, str], standin: ThreadedStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["subscriptions", "bootstrap", "--wait", "10"], capsys)
    assert code == 0, err
    assert out.count("active") == 3 and "Patient?" in out
    code, out, _ = run(["subscriptions", "bootstrap", "--wait", "10"], capsys)
    assert code == 0
    subs = [
        r for (t, _), r in standin.hapi.resources.items() if t == "Subscription" and not r.deleted
    ]
    assert len(subs) == 3, "re-running never duplicates"
    assert all(
        "Authorization: Bearer cli-receiver-token" in s.resource["channel"]["header"]
        for s in subs
        if s.resource
    )
    code, out, _ = run(["subscriptions", "status"], capsys)
    assert code == 0 and out.count("http://127.0.0.1:9/fhir") == 3
    code, out, _ = run(["subscriptions", "remove"], capsys)
    assert code == 0 and "removed 3" in out
    code, _, err = run(["subscriptions", "bootstrap", "--types", "Patient,Nope"], capsys)
    assert code == 2 and "Nope" in err


def test_subscriptions_bootstrap_reports_hapi_refusal(
    env: dict[str, str], standin: ThreadedStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    standin.hapi.fail_activation("endpoint unreachable: connection refused")
    code, _, err = run(["subscriptions", "bootstrap", "--wait", "5"], capsys)
    assert code == 1
    assert "connection refused" in err and "Traceback" not in err
    standin.hapi.fail_activation(None)


def test_batch_init_refresh_and_poll_once(
    env: dict[str, str], standin: ThreadedStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["batch", "refresh"], capsys)
    assert code == 1 and "batch init" in err, "refresh before init names the fix"
    code, out, err = run(["batch", "init"], capsys)
    assert code == 0 and "created view sqlonfhir.patient_demographics" in out
    assert out.count("created view sqlonfhir.patient_demographics") == 1
    assert "created view" not in err, "each line once, on stdout"
    code, out, _ = run(["batch", "init"], capsys)
    assert "unchanged view sqlonfhir.patient_demographics" in out
    code, out, err = run(["batch", "refresh"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["views"]["patient_demographics"] == 15 and result["watermark"]

    standin.call(standin.hapi.update({**synthetic.patient(99, random.Random(1))}))
    code, out, err = run(["poll", "--once"], capsys)
    assert code == 0, err
    polled = json.loads(out)
    assert polled["read"] >= 1 and polled["written"] >= 1
    code, out, _ = run(["speed", "get", "Patient/pat-99"], capsys)
    assert json.loads(out)["state"] == "present"
    code, _, err = run(["poll", "--once", "--since", "yesterday"], capsys)
    assert code == 2 and "--since" in err


def test_poll_with_hapi_unreachable_is_one_line(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FHIR_BASE_URL", f"http://127.0.0.1:{free_port()}/fhir")
    code, _, err = run(["poll", "--once"], capsys)
    assert code == 1
    assert "Traceback" not in err and err.strip()


async def _hold_lease(ttl_ms: int) -> None:
    from core.settings import Settings
    from core.store import SpeedStore, connect

    client = connect(Settings(redis_url=CLI_REDIS_URL))
    try:
        assert await SpeedStore(client).poller_lock(ttl_ms).acquire(blocking=False)
    finally:
        await client.aclose()


def test_poll_once_never_exits_0_having_done_nothing(
    env: dict[str, str],
    standin: ThreadedStandIn,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another poller's lease: `poll --once` waits for it (a dead holder's lease expires),
    and when the holder lives on, exits 1 saying so, not 0 with nothing read."""
    import asyncio

    import subscriptions.poller

    assert run(["batch", "init"], capsys)[0] == 0
    # A lease nobody renews (its process died): taken over once it expires.
    asyncio.run(_hold_lease(1500))
    code, out, err = run(["poll", "--once"], capsys)
    assert code == 0, err
    assert json.loads(out)["read"] == len(standin.hapi.resources)
    # A live holder (renewed past the wait).
    monkeypatch.setattr(subscriptions.poller, "LEASE_TTL_MS", 500)
    asyncio.run(_hold_lease(60_000))
    caplog.clear()
    code, out, err = run(["poll", "--once"], capsys)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("researchflow poll: another poller holds the lease"), err
    # Said before the wait, not only after it (tester2 finding 5: ~32 s of silence).
    assert any("waiting up to" in r.getMessage() for r in caplog.records), caplog.text


def test_poll_with_its_batch_layer_unreachable_is_one_line(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://127.0.0.1:{free_port()}/nothing")
    for argv in (["poll", "--once"], ["poll"]):
        code, out, err = run(argv, capsys)
        assert code == 1 and out == "", err
        assert "PostgreSQL" in err.strip().splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["speed", "get", "Foo/x"], "'Foo' is not a FHIR resource type"),
        (["speed", "get", "Patient/a b"], "'a b' is not a FHIR id"),
        (["subscriptions", "bootstrap", "--types", "Patient,Subscription"], "cannot be subscribed"),
        (["subscriptions", "bootstrap", "--types", ","], "names no resource type"),
        (["poll", "--once", "--since", "2026-11-29T22:00:00"], "needs a UTC offset"),
        (["poll", "--once", "--since", "2999-01-01T00:00:00Z"], "is in the future"),
    ],
)
def test_arguments_that_name_nothing_real_are_refused(
    env: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2 and out == "", err
    assert says in err.strip().splitlines()[-1], err


@pytest.mark.parametrize(
    "argv",
    [
        ["subscriptions", "bootstrap", "--wait", "-1"],
        ["run", "--serve-port", "70000"],
        ["receiver", "--port", "-2"],
    ],
)
def test_out_of_range_numbers_are_usage_errors(
    env: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        researchflow_cli.main(argv)
    assert exit_.value.code == 2 and "invalid" in capsys.readouterr().err


def test_the_servers_help_shows_their_defaults() -> None:
    parser = researchflow_cli.build_parser()
    for command, defaults in (
        ("run", ["8081", "8082"]),
        ("receiver", ["8081"]),
        ("serve", ["8082"]),
    ):
        text = parser._subparsers._group_actions[0].choices[command].format_help()  # type: ignore[union-attr]
        assert all(d in text for d in defaults) and "address to listen on" in text, text


RUN_MAIN = """
import sys
from researchflow_cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_run_hosts_receiver_api_poller_and_watchdog(
    env: dict[str, str], standin: ThreadedStandIn
) -> None:
    assert researchflow_cli.main(["batch", "init"]) == 0
    receiver_port, serve_port = free_port(), free_port()
    child_env: dict[str, Any] = {**os.environ, **env, "POLL_INTERVAL_SECONDS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUN_MAIN,
            "run",
            "--receiver-port",
            str(receiver_port),
            "--serve-port",
            str(serve_port),
        ],
        env=child_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_port(receiver_port, timeout=30)
        wait_port(serve_port, timeout=30)
        with httpx.Client(timeout=10) as http:
            assert http.get(f"http://127.0.0.1:{receiver_port}/health").status_code == 200
            body = {
                "resourceType": "Patient",
                "id": "via-run",
                "gender": "female",
                "meta": {"versionId": "1"},
            }
            put = http.put(
                f"http://127.0.0.1:{receiver_port}/fhir/Patient/via-run",
                content=json.dumps(body),
                headers={
                    "Authorization": f"Bearer {env['RECEIVER_TOKEN']}",
                    "Content-Type": "application/fhir+json",
                },
            )
            assert put.status_code == 204
            auth = {"Authorization": f"Bearer {env['SERVING_TOKEN']}"}
            answer: dict[str, Any] = {}
            for _ in range(100):  # until the poller has made the speed layer complete
                answer = http.get(
                    f"http://127.0.0.1:{serve_port}/cohort",
                    params={"gender": "female"},
                    headers=auth,
                ).json()
                if not answer.get("degraded"):
                    break
                __import__("time").sleep(0.1)
            assert answer["degraded"] is False
            assert "via-run" in answer["patient_ids"]
            assert (
                http.get(
                    f"http://127.0.0.1:{serve_port}/cohort", params={"gender": "female"}
                ).status_code
                == 401
            )
            metrics = http.get(f"http://127.0.0.1:{serve_port}/metrics").text
            assert "researchflow_missed_notifications_total" in metrics
        # The watchdog created this deployment's Subscriptions (none existed before).
        subs = [
            k for k, r in standin.hapi.resources.items() if k[0] == "Subscription" and not r.deleted
        ]
        assert len(subs) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert "Traceback" not in stderr, stderr[-2000:]
    assert env["RECEIVER_TOKEN"] not in stderr and env["SERVING_TOKEN"] not in stderr
    # A clean stop: the poller let its lease go (another poller may work at once).
    assert proc.returncode == 0, stderr[-2000:]
    with redis.Redis.from_url(CLI_REDIS_URL) as r:
        assert not r.exists(POLLER_LEASE_KEY)


def test_run_on_one_port_twice_registers_nothing_on_hapi(
    env: dict[str, str], standin: ThreadedStandIn
) -> None:
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_MAIN,
            "run",
            "--receiver-port",
            str(port),
            "--serve-port",
            str(port),
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not [k for k in standin.hapi.resources if k[0] == "Subscription"]


def test_batch_init_after_a_view_changed_rebuilds_it_and_its_speed_rows(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from core.store import Derived, SpeedStore
    from receiver.ingest import ingest
    from serving import batch
    from serving.viewdef import load_view, shipped_views

    shipped = shipped_views()
    old = dict(shipped)
    old["patient_demographics"] = load_view(
        {
            "resourceType": "ViewDefinition",
            "name": "patient_demographics",
            "resource": "Patient",
            "select": [{"column": [{"name": "id", "path": "getResourceKey()"}]}],
        }
    )
    batch.init(env["DATABASE_URL"], old)  # the batch layer as an older release built it

    async def write_with_old_rows() -> None:
        client = redis.asyncio.Redis.from_url(CLI_REDIS_URL)
        try:
            await ingest(
                SpeedStore(client),
                json.dumps(
                    {
                        "resourceType": "Patient",
                        "id": "p1",
                        "gender": "female",
                        "meta": {"versionId": "1"},
                    }
                ).encode(),
                derive=lambda r: Derived(rows={"patient_demographics": b'[{"id":"p1"}]'}),
            )
        finally:
            await client.aclose()

    async def rows_now() -> Any:
        client = redis.asyncio.Redis.from_url(CLI_REDIS_URL)
        try:
            return json.loads(
                (await SpeedStore(client).rows("Patient", "patient_demographics"))["p1"]
            )
        finally:
            await client.aclose()

    asyncio.run(write_with_old_rows())
    code, out, _ = run(["batch", "init"], capsys)
    assert code == 0
    assert "rebuilt view sqlonfhir.patient_demographics" in out
    assert "unchanged view sqlonfhir.condition_simple" in out
    assert "re-derived 1 speed-layer Patient entries" in out
    assert asyncio.run(rows_now())[0]["gender"] == "female"
