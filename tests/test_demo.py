"""`researchflow demo` end to end: every part together, and the merged answer proven exact."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from typing import Any

import httpx
import psycopg
import pytest

import researchflow_cli
from core.settings import Settings
from researchflow_demo import COHORT_QUERY, DemoError, run_demo
from subscriptions.standin.hapi import StandInHapi
from tests.conftest import TEST_PG_ADMIN_URL, TEST_REDIS_URL, empty_redis, redis_db
from tests.oracle import cohort as oracle_cohort
from tests.procs import free_port


def test_demo_streams_changes_and_the_answer_matches_a_full_refresh(pg_url: str) -> None:
    lines: list[str] = []
    events: list[dict[str, Any]] = []
    settings = Settings(redis_url=TEST_REDIS_URL, database_url=pg_url)
    hapi = StandInHapi(activation_delay=0.2, retry_initial=0.5, retry_total=10.0)
    answer = asyncio.run(
        run_demo(
            settings,
            patients=60,
            duration=6.0,
            rate=8.0,
            receiver_port=0,
            serve_port=0,
            reset=True,
            emit=events.append,
            say=lines.append,
            standin=hapi,
        )
    )
    text = "\n".join(lines)
    assert answer["verified"] is True, text
    # "verified" is checked against the oracle over HAPI's final state, not the demo itself.
    truth = {k: t.resource for k, t in hapi.resources.items() if not t.deleted}
    query = [(k, v) for k, v in COHORT_QUERY.items() if k != "ids"]
    assert answer["total_count"] == len(oracle_cohort(truth, query)), text
    assert answer["sources"] == ["batch_layer", "speed_layer"]
    assert "male patients with diabetes: total" in text
    assert "the merged answer was exact" in text
    kinds = [e["event"] for e in events]
    assert kinds[0] == "ready" and kinds[-1] == "verified" and "answer" in kinds
    assert "/cohort" in events[0]["query_url"] and events[0]["status_url"].endswith("/status")


def test_demo_refuses_a_speed_layer_that_holds_data(pg_url: str) -> None:
    async def go() -> None:
        from core.store import SpeedStore, connect

        settings = Settings(redis_url=TEST_REDIS_URL, database_url=pg_url)
        client = connect(settings)
        try:
            await client.flushdb()
            await SpeedStore(client).mark_epoch()
            with pytest.raises(DemoError, match="--reset"):
                await run_demo(settings, patients=5, duration=0.1, receiver_port=0, serve_port=0)
        finally:
            await client.flushdb()
            await client.aclose()

    asyncio.run(go())


def test_demo_command_exits_1_with_the_reason(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("DATABASE_URL", pg_url)
    code = researchflow_cli.main(
        ["demo", "--duration", "1", "--patients", "2", "--receiver-port", "0", "--serve-port", "0"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "Redis" in err and "Traceback" not in err


DEMO_REDIS_URL = redis_db(13)
MAIN = "import sys; from researchflow_cli import main; sys.exit(main())"
DEMO_ARGS = "demo --patients 20 --duration 2 --serve --receiver-port 0 --serve-port 0".split()


def test_demo_alone_creates_its_database_prints_json_only_and_keeps_serving() -> None:
    """As a newcomer runs it, without scripts/demo.sh: no database yet, `--serve`."""
    name = f"rf_demo_alone_{os.getpid()}"
    database_url = TEST_PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    asyncio.run(_flush(DEMO_REDIS_URL))
    env = {**os.environ, "REDIS_URL": DEMO_REDIS_URL, "DATABASE_URL": database_url}
    for secret in ("RECEIVER_TOKEN", "SERVING_TOKEN"):
        env.pop(secret, None)
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN, *DEMO_ARGS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events: list[dict[str, Any]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            events.append(json.loads(line))  # stdout is JSON, one object a line
            if events[-1]["event"] == "verified":
                break
        assert events and events[-1]["event"] == "verified", events
        assert events[-1]["verified"] is True
        ready = events[0]
        # The URLs live on after the stream: --serve keeps everything running.
        with httpx.Client(timeout=10) as http:
            answer = http.get(
                ready["query_url"],
                headers={"Authorization": f"Bearer {ready['serving_token']}"},
            )
            assert answer.status_code == 200 and answer.json()["degraded"] is False
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        with psycopg.connect(TEST_PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
        asyncio.run(_flush(DEMO_REDIS_URL))
    assert proc.returncode == 0, err[-2000:]
    for line in out.splitlines():
        json.loads(line)
    assert "created the PostgreSQL database" in err
    assert "What next" in err and "curl" in err
    assert "Traceback" not in err and "audit" not in err


async def _flush(url: str) -> None:
    async with empty_redis(url):
        pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_demo_ends_it_with_one_true_line(pg_url: str, sig: int) -> None:
    """Ctrl-C (or SIGTERM) while changes stream: the servers stop with the demo, not before
    it (uvicorn would take the signal for itself and the demo's next request would fail
    with "the FHIR server cannot be reached")."""
    asyncio.run(_flush(DEMO_REDIS_URL))
    env = {**os.environ, "REDIS_URL": DEMO_REDIS_URL, "DATABASE_URL": pg_url}
    args = "demo --patients 20 --duration 60 --receiver-port 0 --serve-port 0 --reset".split()
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line)["event"] == "answer":
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        asyncio.run(_flush(DEMO_REDIS_URL))
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "demo interrupted", err[-2000:]
    assert "cannot be reached" not in err and "Traceback" not in err, err[-2000:]


def test_each_demo_tags_its_subscriptions_as_its_own() -> None:
    from core.settings import instance_from_url
    from researchflow_demo import demo_instance

    assert demo_instance(18131) != demo_instance(18132)
    assert demo_instance(18131) != instance_from_url("http://127.0.0.1:18131/fhir")
