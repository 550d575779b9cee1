"""The `researchflow` command: output shapes, exit codes and one-line reasons."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

import researchflow_cli
from core.errors import InvalidResource
from core.store import SpeedStore
from receiver.ingest import ingest
from tests.conftest import TEST_REDIS_URL
from tests.procs import free_port


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = researchflow_cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, pg_url: str) -> None:
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    for name in ("RECEIVER_TOKEN", "SERVING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def in_redis(action: Any) -> Any:
    """Run `action(store)` against the test Redis (the CLI runs its own event loop)."""

    async def go() -> Any:
        client = aioredis.Redis.from_url(TEST_REDIS_URL)
        try:
            return await action(SpeedStore(client))
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.fixture
def clean_redis() -> Any:
    in_redis(lambda store: store.client.flushdb())
    yield
    in_redis(lambda store: store.client.flushdb())


def test_speed_get_prints_the_contract_shape(
    env: None, clean_redis: None, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"versionId": "3", "lastUpdated": "2026-11-25T10:00:00.5+01:00"},
    }
    in_redis(lambda store: ingest(store, json.dumps(body).encode()))
    code, out, _ = run(["speed", "get", "Patient/p1"], capsys)
    assert code == 0
    assert json.loads(out) == {
        "state": "present",
        "version_id": "3",
        "last_updated": "2026-11-25T10:00:00.5+01:00",
        "resource": body,
    }
    code, out, _ = run(["speed", "get", "Patient/nope"], capsys)
    assert json.loads(out) == {
        "state": "absent",
        "version_id": None,
        "last_updated": None,
        "resource": None,
    }
    in_redis(
        lambda store: store.upsert(
            "Patient", "p1", body=None, version_id="4", last_updated=None, deleted=True
        )
    )
    code, out, _ = run(["speed", "get", "Patient/p1"], capsys)
    assert json.loads(out)["state"] == "deleted" and json.loads(out)["version_id"] == "4"
    code, _, err = run(["speed", "get", "no-slash"], capsys)
    assert code == 2 and "TYPE/ID" in err


def test_speed_stats(env: None, clean_redis: None, capsys: pytest.CaptureFixture[str]) -> None:
    in_redis(
        lambda store: ingest(store, json.dumps({"resourceType": "Patient", "id": "p1"}).encode())
    )
    with pytest.raises(InvalidResource):
        in_redis(
            lambda store: ingest(
                store,
                json.dumps({"resourceType": "Patient", "id": "p2", "gender": "robot"}).encode(),
            )
        )
    code, out, _ = run(["speed", "stats"], capsys)
    stats = json.loads(out)
    assert code == 0
    assert stats["types"]["Patient"]["entries"] == 1
    assert stats["rejects"] == 1
    assert stats["maxmemory_policy"] == "noeviction"
    assert "appendonly" in stats["persistence"] and stats["memory_used_bytes"] > 0


def test_unreachable_redis_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    code, _, err = run(["speed", "stats"], capsys)
    assert code == 1
    assert "Redis" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_setting_is_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("USE_SPEED_LAYER", "perhaps")
    code, _, err = run(["speed", "stats"], capsys)
    assert code == 2 and "USE_SPEED_LAYER" in err


def test_servers_refuse_to_start_without_tokens(
    env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["receiver"], capsys)
    assert code == 1 and "RECEIVER_TOKEN" in err
    code, _, err = run(["serve"], capsys)
    assert code == 1 and "SERVING_TOKEN" in err
    code, _, err = run(["run"], capsys)
    assert code == 1 and "TOKEN" in err


def view_file(tmp_path: Path, view: dict[str, Any]) -> str:
    path = tmp_path / "view.json"
    path.write_text(json.dumps(view))
    return str(path)


VIEW = {
    "resourceType": "ViewDefinition",
    "resource": "Patient",
    "status": "active",
    "select": [{"column": [{"name": "id", "path": "id"}, {"name": "gender", "path": "gender"}]}],
}
RESOURCES = [
    {"resourceType": "Patient", "id": "a", "gender": "male"},
    {"resourceType": "Patient", "id": "b"},
    {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"}},
]


@pytest.mark.parametrize("engine", ["python", "postgres"])
@pytest.mark.parametrize("form", ["array", "bundle", "ndjson"])
def test_views_run_both_engines_and_file_forms(
    env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: str, form: str
) -> None:
    path = tmp_path / "resources"
    if form == "array":
        path.write_text(json.dumps(RESOURCES))
    elif form == "bundle":
        path.write_text(
            json.dumps(
                {
                    "resourceType": "Bundle",
                    "type": "collection",
                    "entry": [{"resource": r} for r in RESOURCES],
                }
            )
        )
    else:
        path.write_text("\n".join(json.dumps(r) for r in RESOURCES) + "\n")
    code, out, err = run(
        ["views", "run", view_file(tmp_path, VIEW), "--resources", str(path), "--engine", engine],
        capsys,
    )
    assert code == 0, err
    rows = sorted(json.loads(out), key=lambda r: r["id"])
    assert rows == [{"id": "a", "gender": "male"}, {"id": "b", "gender": None}]


@pytest.mark.parametrize("engine", ["python", "postgres"])
def test_views_run_invalid_view_exits_2(
    env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    resources = tmp_path / "r.json"
    resources.write_text("[]")
    bad = {
        "resourceType": "ViewDefinition",
        "resource": "Patient",
        "status": "active",
        "select": [{"column": [{"name": "bad name!", "path": "id"}]}],
    }
    code, _, err = run(
        [
            "views",
            "run",
            view_file(tmp_path, bad),
            "--resources",
            str(resources),
            "--engine",
            engine,
        ],
        capsys,
    )
    assert code == 2 and "ViewDefinition" in err
    (tmp_path / "nojson.json").write_text("{")
    code, _, err = run(
        ["views", "run", str(tmp_path / "nojson.json"), "--resources", str(resources)], capsys
    )
    assert code == 2
    code, _, err = run(
        ["views", "run", view_file(tmp_path, VIEW), "--resources", str(tmp_path / "missing")],
        capsys,
    )
    assert code == 2 and "cannot read" in err


# ViewDefinitions that are invalid as a whole: (what is wrong, the words the reason names).
INVALID_VIEWS = [
    ({**VIEW, "resource": "Nope"}, "not a FHIR R4 resource type"),
    ({**VIEW, "resource": "Citation"}, "not a FHIR R4 resource type"),  # R4B only
    ({**VIEW, "resource": "patient"}, "not a FHIR R4 resource type"),
    ({k: v for k, v in VIEW.items() if k != "status"}, "'status' is missing"),
    ({**VIEW, "status": "final"}, "'status' must be one of"),
]


@pytest.mark.parametrize("engine", ["python", "postgres"])
@pytest.mark.parametrize(("view", "reason"), INVALID_VIEWS, ids=[r for _, r in INVALID_VIEWS])
def test_views_run_refuses_a_view_that_is_no_viewdefinition(
    env: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    engine: str,
    view: dict[str, Any],
    reason: str,
) -> None:
    resources = tmp_path / "r.json"
    resources.write_text(json.dumps(RESOURCES))
    code, out, err = run(
        ["views", "run", view_file(tmp_path, view), "--resources", str(resources), "--engine",
         engine],
        capsys,
    )  # fmt: skip
    assert code == 2 and reason in err and out == "", err
    assert "Traceback" not in err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        researchflow_cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in (
        "receiver",
        "serve",
        "poll",
        "run",
        "demo",
        "subscriptions",
        "batch",
        "speed",
        "views",
    ):
        assert command in out
