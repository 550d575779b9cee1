"""`researchflow demo` end to end: every part together, and the merged answer proven exact."""

from __future__ import annotations

import asyncio

import pytest

import researchflow_cli
from receiver.settings import Settings
from serving.demo import COHORT_QUERY, DemoError, run_demo
from subscriptions.standin import StandInHapi
from tests.conftest import TEST_REDIS_URL
from tests.oracle import cohort as oracle_cohort
from tests.procs import free_port


def test_demo_streams_changes_and_the_answer_matches_a_full_refresh(pg_url: str) -> None:
    lines: list[str] = []
    settings = Settings(redis_url=TEST_REDIS_URL, database_url=pg_url)
    hapi = StandInHapi(activation_delay=0.2, retry_initial=0.5, retry_total=10.0)
    answer = asyncio.run(
        run_demo(
            settings,
            patients=60,
            duration=6.0,
            rate=8.0,
            receiver_port=free_port(),
            serve_port=free_port(),
            reset=True,
            out=lines.append,
            hapi=hapi,
        )
    )
    text = "\n".join(lines)
    # "verified" is checked against the oracle over HAPI's final state, not the demo itself.
    truth = {k: t.resource for k, t in hapi.resources.items() if not t.deleted}
    query = [(k, v) for k, v in COHORT_QUERY.items() if k != "ids"]
    assert answer["total_count"] == len(oracle_cohort(truth, query)), text
    assert answer["verified"] is True, text
    assert answer["sources"] == ["batch_layer", "speed_layer"]
    assert "male patients with diabetes: total" in text
    assert "/status" in text and "/cohort" in text
    assert "the merged answer was exact" in text


def test_demo_refuses_a_speed_layer_that_holds_data(pg_url: str) -> None:
    async def go() -> None:
        from receiver.store import SpeedStore, connect

        settings = Settings(redis_url=TEST_REDIS_URL, database_url=pg_url)
        client = connect(settings)
        try:
            await client.flushdb()
            await SpeedStore(client).mark_epoch()
            with pytest.raises(DemoError, match="--reset"):
                await run_demo(
                    settings,
                    patients=5,
                    duration=0.1,
                    receiver_port=free_port(),
                    serve_port=free_port(),
                )
        finally:
            await client.flushdb()
            await client.aclose()

    asyncio.run(go())


def test_demo_command_exits_1_with_the_reason(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("DATABASE_URL", pg_url)
    code = researchflow_cli.main(["demo", "--duration", "1", "--patients", "2"])
    assert code == 1
    err = capsys.readouterr().err
    assert "Redis" in err and "Traceback" not in err
