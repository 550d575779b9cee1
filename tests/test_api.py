"""The query API over HTTP (lifespan running): auth, every error status, paging, views, health."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import logging
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.settings import Settings
from core.store import EPOCH_KEY, SpeedStore
from serving.api import create_app, require_token
from tests.asgi import running
from tests.procs import free_port
from tests.test_cohort import (
    OWN_REDIS_URL,
    condition,
    delete,
    load_batch,
    observation,
    own_store,
    patient,
    put,
)

__all__ = ["own_store"]

AUTH = {"Authorization": "Bearer serve-token"}


async def status_page(request: Request) -> Response:
    return JSONResponse({"token": require_token(request, allow_basic=True)})


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings, redis_url=OWN_REDIS_URL, serving_tokens=("serve-token", "other")
    )


@pytest.fixture
async def loaded(api_settings: Settings, own_store: SpeedStore) -> SpeedStore:
    load_batch(
        api_settings.database_url,
        [patient(f"p{i:02d}", "male" if i % 2 else "female", f"19{60 + i}") for i in range(12)]
        + [condition(f"c{i}", f"p{i:02d}", text="Diabetes") for i in range(6)]
        + [observation("o1", "p01", value=7.5)],
        watermark="2024-01-01T02:00:00Z",
    )
    await own_store.mark_epoch()
    await own_store.set_poller_watermark("2024-01-01T14:00:05Z")
    return own_store


async def get(settings: Settings, path: str, **kwargs: Any) -> httpx.Response:
    app = create_app(settings, extra_routes=[Route("/status", status_page)])
    async with running(app) as client:
        return await client.get(path, headers=kwargs.pop("headers", AUTH), **kwargs)


async def test_cohort_answer_fields_and_audit(
    api_settings: Settings, loaded: SpeedStore, caplog: pytest.LogCaptureFixture
) -> None:
    await put(loaded, patient("p99", "male", "1999"))
    await put(loaded, condition("c99", "p99"))
    await put(loaded, condition("c1", "p02", v=2))  # moves from p01 (male) to p02 (female)
    caplog.set_level(logging.INFO, logger="serving.audit")
    r = await get(api_settings, "/cohort?gender=male&condition=44054006&_pretty=true")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["total_count"] == 3
    assert body["patient_ids"] == ["p03", "p05", "p99"]
    assert body["batch_count"] == 3 and body["added_count"] == 1 and body["removed_count"] == 1
    assert body["sources"] == ["batch_layer", "speed_layer"]
    assert body["batch_as_of"] == "2024-01-01T02:00:00Z"
    assert body["speed_as_of"] == "2024-01-01T14:00:05Z"
    assert body["degraded"] is False and body["next"] is None
    assert body["query_timestamp"].endswith("Z")
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "serving.audit"]
    assert lines[-1]["token"] == 0 and lines[-1]["count"] == 3
    assert ["gender", "male"] in lines[-1]["parameters"]
    assert "serve-token" not in caplog.text


async def test_paging_ids_false_and_suppression(api_settings: Settings, loaded: SpeedStore) -> None:
    r = await get(api_settings, "/cohort?_count=5")
    body = r.json()
    assert body["total_count"] == 12 and body["patient_ids"] == [f"p{i:02d}" for i in range(5)]
    seen = list(body["patient_ids"])
    while body["next"]:
        url = httpx.URL(body["next"])
        body = (await get(api_settings, f"{url.path}?{url.query.decode()}")).json()
        seen += body["patient_ids"]
    assert seen == [f"p{i:02d}" for i in range(12)]
    body = (await get(api_settings, "/cohort?ids=false&gender=male")).json()
    assert "patient_ids" not in body and body["total_count"] == 6
    small = dataclasses.replace(api_settings, min_cell_count=5)
    body = (await get(small, "/cohort?condition-text=diabetes&gender=male")).json()
    assert body["total_count"] is None and body["suppressed"] is True and body["patient_ids"] == []
    body = (await get(small, "/cohort?gender=female&condition=nothing")).json()
    assert body["total_count"] == 0 and body["suppressed"] is False


async def test_deletes_vanish_and_updates_move_in_and_out(
    api_settings: Settings, loaded: SpeedStore
) -> None:
    await delete(loaded, "Patient", "p03", 2)
    await put(loaded, patient("p04", "male", "1964", v=2))
    await put(loaded, observation("o1", "p01", value=5.0, v=2))
    body = (await get(api_settings, "/cohort?gender=male&condition-text=DIAB")).json()
    assert body["patient_ids"] == ["p01", "p04", "p05"]
    assert (await get(api_settings, "/cohort?observation=http://loinc.org|4548-4$gt6")).json()[
        "total_count"
    ] == 0
    body = (await get(api_settings, "/cohort?observation=4548-4&observation-value=le5")).json()
    assert body["patient_ids"] == ["p01"]
    body = (await get(api_settings, "/cohort?birthdate=ge1964&birthdate=lt1966")).json()
    assert body["patient_ids"] == ["p04", "p05"]
    # FHIR dateTime search values (R4 search, "date"), a birth date's days in UTC.
    at = "/cohort?birthdate=ge1964-01-01T10:00:00%2B02:00&birthdate=lt1966-01-01T00:00:00Z"
    assert (await get(api_settings, at)).json()["patient_ids"] == ["p04", "p05"]
    assert (await get(api_settings, "/cohort?birthdate=1964-05-01T00:00:00Z")).json()[
        "total_count"
    ] == 0


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("colour=red", "colour"),
        ("birthdate=1970-99", "birthdate"),
        ("observation-value=gt5", "observation-value"),
        ("_count=abc", "_count"),
        ("observation=x$zz", "observation"),
        ("gender=mal", "AdministrativeGender"),
        ("gender=male,robot", "'robot'"),
        ("birthdate=0000-01-01", "year 0000"),
        ("birthdate=1970-13", "month 13"),
        ("birthdate=xx1970", "unknown prefix 'xx'"),
        ("birthdate=1970-02-30", "day 30"),
    ],
)
async def test_bad_parameters_are_400(
    api_settings: Settings, loaded: SpeedStore, query: str, names: str
) -> None:
    r = await get(api_settings, f"/cohort?{query}")
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"
    assert names in json.dumps(r.json())


async def test_auth(api_settings: Settings, loaded: SpeedStore) -> None:
    assert (await get(api_settings, "/cohort", headers={})).status_code == 401
    r = await get(api_settings, "/cohort", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
    basic = "Basic " + base64.b64encode(b"anyone:other").decode()
    assert (await get(api_settings, "/cohort", headers={"Authorization": basic})).status_code == 401
    r = await get(api_settings, "/status", headers={"Authorization": basic})
    assert r.status_code == 200 and r.json() == {"token": 1}
    assert (await get(api_settings, "/health", headers={})).status_code == 200
    r = await get(api_settings, "/metrics", headers={})
    assert r.status_code == 200 and "researchflow_query_seconds" in r.text


async def test_degraded_when_redis_down_or_epoch_missing(
    api_settings: Settings, loaded: SpeedStore
) -> None:
    await put(loaded, patient("p99", "male"))
    down = dataclasses.replace(api_settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    body = (await get(down, "/cohort?gender=male")).json()
    assert body["degraded"] is True and body["sources"] == ["batch_layer"]
    assert body["total_count"] == 6 and body["speed_as_of"] is None
    r = await get(down, "/health", headers={})
    assert r.status_code == 200 and r.json()["status"] == "degraded"
    off = dataclasses.replace(api_settings, use_speed_layer=False)
    body = (await get(off, "/cohort?gender=male")).json()
    assert body["degraded"] is False and body["sources"] == ["batch_layer"]
    await loaded.client.delete(EPOCH_KEY)
    body = (await get(api_settings, "/cohort?gender=male")).json()
    assert body["degraded"] is True and body["total_count"] == 6
    assert (await get(api_settings, "/health", headers={})).json()["speed_layer_complete"] is False


async def test_503_when_postgresql_is_down(api_settings: Settings, own_store: SpeedStore) -> None:
    down = dataclasses.replace(
        api_settings, database_url=f"postgresql://127.0.0.1:{free_port()}/nothing"
    )
    r = await get(down, "/cohort?gender=male")
    assert r.status_code == 503 and r.json()["resourceType"] == "OperationOutcome"
    r = await get(down, "/health", headers={})
    assert r.status_code == 503 and r.json()["postgresql"] == "down"


async def test_views_and_rows_in_three_formats(api_settings: Settings, loaded: SpeedStore) -> None:
    await put(loaded, condition("c0", "p00", code="123", v=2))
    await put(loaded, condition("c77", "p07", code="123"))
    await delete(loaded, "Condition", "c5", 2)
    body = (await get(api_settings, "/views")).json()
    by_name = {v["name"]: v for v in body["views"]}
    assert by_name["condition_simple"]["batch_rows"] == 6
    assert by_name["condition_simple"]["speed_resources"] == 3
    assert by_name["patient_demographics"]["resource"] == "Patient"
    assert "gender" in by_name["patient_demographics"]["columns"]
    r = await get(api_settings, "/views/condition_simple/rows?code=123")
    assert r.status_code == 200
    assert [(row["id"], row["patient_id"]) for row in r.json()["rows"]] == [
        ("c0", "p00"),
        ("c77", "p07"),
    ]
    r = await get(api_settings, "/views/condition_simple/rows?_count=2&_format=ndjson")
    lines = [orjson.loads(line) for line in r.text.splitlines()]
    assert [row["id"] for row in lines] == ["c0", "c1"]
    assert 'rel="next"' in r.headers["link"]
    every = (await get(api_settings, "/views/condition_simple/rows")).json()["rows"]
    assert [row["id"] for row in every] == ["c0", "c1", "c2", "c3", "c4", "c77"]
    r = await get(api_settings, "/views/observation_simple/rows?_format=csv&value=7.5")
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert r.headers["content-type"].startswith("text/csv")
    assert [(t["id"], t["value"]) for t in table] == [("o1", "7.5")]
    assert (await get(api_settings, "/views/nope/rows")).status_code == 404
    r = await get(api_settings, "/views/condition_simple/rows?colour=red")
    assert r.status_code == 400 and "colour" in r.text
    r = await get(api_settings, "/views/observation_simple/rows?value=abc")
    assert r.status_code == 400


@pytest.mark.parametrize(
    "damage",
    [
        # a codec id of no release we know
        lambda raw: b"|".join([*raw.split(b"|", 6)[:5], b"9", raw.split(b"|", 6)[6]]),
        lambda raw: raw[: raw.rindex(b"|") + 1] + b"not zstd",  # a damaged frame
        lambda raw: b"p|x|y",  # a header that is none
    ],
)
async def test_an_unreadable_speed_record_is_a_503_naming_it_never_a_500(
    api_settings: Settings,
    loaded: SpeedStore,
    caplog: pytest.LogCaptureFixture,
    damage: Any,
) -> None:
    from core.store import entries_key

    await put(loaded, patient("p99", "male", "1999"))
    key = entries_key("Patient", "p99")
    raw = await loaded.client.hget(key, "p99")
    assert raw is not None and raw.split(b"|")[5] == b"1"  # zstd with the R4 dictionary
    await loaded.client.hset(key, "p99", damage(raw))
    caplog.set_level(logging.ERROR)
    for path in ("/cohort?gender=male", "/views/patient_demographics/rows"):
        caplog.clear()
        r = await get(api_settings, path)
        assert r.status_code == 503, (path, r.text)
        assert "cannot read" in r.json()["issue"][0]["diagnostics"]
        logged = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert any("'p99'" in line and "\n" not in line for line in logged), logged
