"""The receiver against a real Redis: every status of the contract, and nothing written on error."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from core import auth
from core.settings import Settings
from core.store import SpeedStore
from core.validation import NEVER_STORED
from receiver.app import create_app
from tests.asgi import running
from tests.conftest import TEST_REDIS_URL
from tests.examples import official_examples

TOKEN = "test-token"
HEADERS = {
    "Authorization": f"Bearer {TOKEN}",
    "Content-Type": "application/fhir+json; charset=UTF-8",
}


def patient(
    pid: str = "p1", version: int = 1, gender: str = "male", **extra: Any
) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {
            "versionId": str(version),
            "lastUpdated": f"2026-11-25T10:00:{version:02d}.000+00:00",
        },
        "gender": gender,
        **extra,
    }


def receiver_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"redis_url": TEST_REDIS_URL, "receiver_tokens": (TOKEN, "rotated")}
    base.update(overrides)
    return Settings(**base)


async def no_hapi(resource_type: str, resource_id: str) -> None:
    raise httpx.ConnectError("HAPI is down")


@pytest.fixture
async def client(redis_client: aioredis.Redis) -> Any:
    app = create_app(receiver_settings(), latest_version=no_hapi)
    async with running(app) as c:
        yield c


async def total_keys(redis_client: aioredis.Redis) -> int:
    return int(await redis_client.dbsize())


async def test_put_creates_then_updates_and_keeps_original_bytes(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    raw = b'{"resourceType":"Patient","id":"p1","meta":{"versionId":"1"},   "gender":"male"}'
    response = await client.put("/fhir/Patient/p1", content=raw, headers=HEADERS)
    assert response.status_code == 204
    assert response.content == b""
    entry = await store.get("Patient", "p1")
    assert entry is not None and entry.body == raw and entry.version_id == "1"

    # HAPI sends If-Match with the version; it is ignored.
    v2 = json.dumps(patient(version=2, gender="female")).encode()
    response = await client.put(
        "/fhir/Patient/p1", content=v2, headers={**HEADERS, "If-Match": 'W/"2"'}
    )
    assert response.status_code == 204
    entry = await store.get("Patient", "p1")
    assert entry is not None and entry.version_id == "2" and entry.body == v2


async def test_duplicate_and_older_versions_are_no_ops(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    for version in (3, 3, 1, 2):
        body = json.dumps(patient(version=version, gender="other" if version == 3 else "male"))
        response = await client.put("/fhir/Patient/p1", content=body, headers=HEADERS)
        assert response.status_code == 204
    entry = await store.get("Patient", "p1")
    assert entry is not None and entry.version_id == "3"
    assert json.loads(entry.body or b"")["gender"] == "other"


async def test_plain_application_json_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.put(
        "/fhir/Patient/p1",
        content=json.dumps(patient()),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert response.status_code == 204


async def test_second_token_of_the_list_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.put(
        "/fhir/Patient/p1",
        content=json.dumps(patient()),
        headers={**HEADERS, "Authorization": "Bearer rotated"},
    )
    assert response.status_code == 204


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "expression"),
    [
        ("/fhir/Patient/p1", b"{not json", HEADERS, 400, None),
        ("/fhir/Patient/p1", b"[1, 2]", HEADERS, 400, None),
        ("/fhir/Spaceship/p1", json.dumps(patient()).encode(), HEADERS, 400, "resourceType"),
        (
            "/fhir/Patient/p1",
            json.dumps({**patient(), "resourceType": "Observation"}).encode(),
            HEADERS,
            400,
            "resourceType",
        ),
        ("/fhir/Patient/p2", json.dumps(patient("p1")).encode(), HEADERS, 400, "id"),
        ("/fhir/Patient/bad_id!", json.dumps(patient("bad_id!")).encode(), HEADERS, 400, "id"),
        ("/fhir/Patient/" + "a" * 65, json.dumps(patient("a" * 65)).encode(), HEADERS, 400, "id"),
        (
            "/fhir/Patient/p1",
            json.dumps({k: v for k, v in patient().items() if k != "resourceType"}).encode(),
            HEADERS,
            400,
            "resourceType",
        ),
        (
            "/fhir/Patient/p1",
            json.dumps(patient()).encode(),
            {"Content-Type": "application/fhir+json"},
            401,
            None,
        ),
        (
            "/fhir/Patient/p1",
            json.dumps(patient()).encode(),
            {**HEADERS, "Authorization": "Bearer wrong"},
            401,
            None,
        ),
        (
            "/fhir/Patient/p1",
            json.dumps(patient()).encode(),
            {**HEADERS, "Authorization": f"Basic {TOKEN}"},
            401,
            None,
        ),
        (
            "/fhir/Patient/p1",
            json.dumps(patient()).encode(),
            {**HEADERS, "Content-Type": "text/plain"},
            415,
            None,
        ),
        (
            "/fhir/Patient/p1",
            json.dumps(patient()).encode(),
            {**HEADERS, "Content-Type": "application/xml"},
            415,
            None,
        ),
        ("/fhir/Patient/p1", json.dumps(patient(gender="robot")).encode(), HEADERS, 422, "gender"),
        (
            "/fhir/Patient/p1",
            json.dumps(patient(birthDate="1970-13-45")).encode(),
            HEADERS,
            422,
            "birthDate",
        ),
        (
            "/fhir/Patient/p1",
            json.dumps(patient(unknownElement=1)).encode(),
            HEADERS,
            422,
            "unknownElement",
        ),
        # A NUL character: valid JSON, but PostgreSQL's jsonb cannot hold it (the batch
        # layer could never take the resource), in a value and in a list of strings.
        (
            "/fhir/Patient/p1",
            json.dumps(patient(name=[{"family": "a\u0000b"}])).encode(),
            HEADERS,
            422,
            "name[0].family",
        ),
        (
            "/fhir/Patient/p1",
            json.dumps(patient(name=[{"given": ["A", "\u0000"]}])).encode(),
            HEADERS,
            422,
            "name[0].given[1]",
        ),
    ],
)
async def test_errors_answer_operation_outcome_and_write_nothing(
    client: httpx.AsyncClient,
    redis_client: aioredis.Redis,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    expression: str | None,
) -> None:
    response = await client.put(path, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"] and all(i["diagnostics"] for i in outcome["issue"])
    if expression is not None:
        expressions = [e for i in outcome["issue"] for e in i.get("expression", [])]
        assert any(expression in e for e in expressions), expressions
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    store = SpeedStore(redis_client)
    assert await store.get("Patient", "p1") is None
    assert await store.count("Patient") == 0
    # A 422 leaves a trace in the bounded reject store (never the body); nothing else does.
    assert await store.reject_count() == (1 if status == 422 else 0)


async def test_reject_store_records_issues_not_the_body(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    secret_name = "Very Private Name"
    body = patient(gender="robot", name=[{"family": secret_name}])
    for _ in range(2):
        response = await client.put("/fhir/Patient/p1", content=json.dumps(body), headers=HEADERS)
        assert response.status_code == 422
    rejects = await store.recent_rejects()
    assert len(rejects) == 1, "the same version is recorded once"
    assert rejects[0]["type"] == "Patient" and rejects[0]["id"] == "p1"
    assert rejects[0]["issues"][0]["expression"] == "gender"
    assert secret_name not in json.dumps(rejects)
    assert await store.reject_count() == 1


async def test_body_over_the_limit_is_413(redis_client: aioredis.Redis) -> None:
    app = create_app(receiver_settings(receiver_max_body_bytes=64 * 1024), latest_version=no_hapi)
    big = patient(text={"status": "generated", "div": "<div>" + "x" * 70_000 + "</div>"})
    async with running(app) as client:
        response = await client.put("/fhir/Patient/p1", content=json.dumps(big), headers=HEADERS)
        assert response.status_code == 413
        assert response.json()["resourceType"] == "OperationOutcome"

        async def chunks() -> Any:  # no Content-Length: the limit holds while streaming too
            for _ in range(20):
                yield b"x" * 8192

        response = await client.put("/fhir/Patient/p1", content=chunks(), headers=HEADERS)
        assert response.status_code == 413
    assert await SpeedStore(redis_client).get("Patient", "p1") is None


async def test_unknown_route_and_method_answer_operation_outcome(client: httpx.AsyncClient) -> None:
    response = await client.get("/fhir/Patient/p1", headers=HEADERS)
    assert response.status_code == 405
    assert response.json()["resourceType"] == "OperationOutcome"
    response = await client.put("/nothing", headers=HEADERS)
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_official_examples_71_taken_and_questionnaire_refused(
    client: httpx.AsyncClient, store: SpeedStore, shared_dir: Path
) -> None:
    taken, refused = [], []
    for example in official_examples(shared_dir):
        response = await client.put(
            f"/fhir/{example.resource_type}/{example.resource_id}",
            content=example.raw,
            headers=HEADERS,
        )
        if response.status_code == 204:
            taken.append(example.name)
            entry = await store.get(example.resource_type, example.resource_id)
            if example.resource_type in NEVER_STORED:
                # Taken (HAPI must not retry it) but never cached: it holds the token.
                assert entry is None, example.name
            else:
                assert entry is not None and entry.body == example.raw, example.name
        else:
            refused.append((example.name, response.status_code, response.json()))
    assert len(taken) == 71, refused
    assert "subscription-example.json" in taken
    assert [r[0] for r in refused] == ["bundle-questionnaire.json"]
    _name, status, outcome = refused[0]
    assert status == 422
    expressions = [e for i in outcome["issue"] for e in i.get("expression", [])]
    assert any(e.endswith("linkId") for e in expressions), expressions


async def test_delete_uses_the_version_hapi_reports(redis_client: aioredis.Redis) -> None:
    calls: list[tuple[str, str]] = []

    async def hapi(resource_type: str, resource_id: str) -> tuple[str, str, bool]:
        calls.append((resource_type, resource_id))
        return ("4", "2026-11-25T11:00:00Z", True)

    app = create_app(receiver_settings(), latest_version=hapi)
    async with running(app) as client:
        await client.put(
            "/fhir/Patient/p1", content=json.dumps(patient(version=3)), headers=HEADERS
        )
        response = await client.delete(
            "/fhir/Patient/p1", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert response.status_code == 204
        # A late PUT of version 3 after the delete changes nothing; a re-create (5) wins.
        await client.put(
            "/fhir/Patient/p1", content=json.dumps(patient(version=3)), headers=HEADERS
        )
    store = SpeedStore(redis_client)
    entry = await store.get("Patient", "p1")
    assert calls == [("Patient", "p1")]
    assert entry is not None and entry.state == "deleted" and entry.version_id == "4"


async def test_delete_without_hapi_tombstones_after_held_and_asks_for_catch_up(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    await client.put("/fhir/Patient/p1", content=json.dumps(patient(version=2)), headers=HEADERS)
    response = await client.delete("/fhir/Patient/p1", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 204
    entry = await store.get("Patient", "p1")
    assert entry is not None and entry.state == "deleted"
    assert await store.take_catchup() is not None
    # A late PUT of the held version is ignored; a higher version (a re-create) wins.
    await client.put("/fhir/Patient/p1", content=json.dumps(patient(version=2)), headers=HEADERS)
    assert (await store.get("Patient", "p1")).state == "deleted"  # type: ignore[union-attr]
    await client.put("/fhir/Patient/p1", content=json.dumps(patient(version=3)), headers=HEADERS)
    entry = await store.get("Patient", "p1")
    assert entry is not None and entry.state == "present" and entry.version_id == "3"


async def test_stale_delete_after_recreate_writes_nothing(redis_client: aioredis.Redis) -> None:
    async def hapi(resource_type: str, resource_id: str) -> tuple[str, str, bool]:
        return ("6", "2026-11-25T11:00:00Z", False)  # re-created since the delete

    app = create_app(receiver_settings(), latest_version=hapi)
    async with running(app) as client:
        await client.put(
            "/fhir/Patient/p1", content=json.dumps(patient(version=6)), headers=HEADERS
        )
        response = await client.delete(
            "/fhir/Patient/p1", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert response.status_code == 204
    entry = await SpeedStore(redis_client).get("Patient", "p1")
    assert entry is not None and entry.state == "present" and entry.version_id == "6"


async def test_delete_of_unknown_type_or_bad_id_is_400(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    auth_only = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.delete("/fhir/Nope/p1", headers=auth_only)).status_code == 400
    assert (await client.delete("/fhir/Patient/a$b", headers=auth_only)).status_code == 400
    assert (await client.delete("/fhir/Patient/p1")).status_code == 401
    assert await store.get("Patient", "p1") is None


async def test_empty_form_post_records_a_catch_up(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    # HAPI's no-payload notification: POST {endpoint} with an empty form body.
    response = await client.post(
        "/fhir",
        content=b"",
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert response.status_code == 204
    assert await store.take_catchup() is not None
    assert await store.take_catchup() is None
    response = await client.post("/fhir", content=b"")
    assert response.status_code == 401


def topic_bundle(*entries: dict[str, Any]) -> dict[str, Any]:
    status = {
        "resourceType": "Parameters",
        "meta": {
            "profile": [
                "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
            ]
        },
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
            {"name": "topic", "valueCanonical": "http://example.org/topic/patient"},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": "2"},
        ],
    }
    return {"resourceType": "Bundle", "type": "history", "entry": [{"resource": status}, *entries]}


async def test_topic_notification_full_resource(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    bundle = topic_bundle(
        {
            "fullUrl": "Patient/p1",
            "resource": patient(version=1),
            "request": {"method": "PUT", "url": "Patient/p1"},
        },
        {
            "fullUrl": "Patient/p2",
            "resource": patient("p2", 2),
            "request": {"method": "PUT", "url": "Patient/p2"},
        },
    )
    response = await client.post("/fhir", content=json.dumps(bundle), headers=HEADERS)
    assert response.status_code == 204
    assert (await store.get("Patient", "p1")) is not None
    assert (await store.get("Patient", "p2")).version_id == "2"  # type: ignore[union-attr]
    assert await store.take_catchup() is None


async def test_topic_notification_id_only_fetches_each_focus_from_hapi(
    redis_client: aioredis.Redis,
) -> None:
    asked: list[tuple[str, str]] = []
    held = {("Patient", "p1"): patient("p1", 3), ("Patient", "gone"): None}

    async def fetch(resource_type: str, resource_id: str) -> dict[str, Any] | None:
        asked.append((resource_type, resource_id))
        return held[(resource_type, resource_id)]

    async def deleted_at_4(resource_type: str, resource_id: str) -> tuple[str, str, bool]:
        return ("4", "2026-11-25T11:00:00Z", True)

    app = create_app(receiver_settings(), latest_version=deleted_at_4, fetch_resource=fetch)
    store = SpeedStore(redis_client)
    async with running(app) as client:
        bundle = topic_bundle(
            {"fullUrl": "http://hapi/fhir/Patient/p1", "request": {"method": "PUT"}},
            {"fullUrl": "http://hapi/fhir/Patient/gone/_history/3"},
        )
        response = await client.post("/fhir", content=json.dumps(bundle), headers=HEADERS)
        assert response.status_code == 204
    assert asked == [("Patient", "p1"), ("Patient", "gone")]
    entry = await store.get("Patient", "p1")
    assert entry is not None and entry.version_id == "3"
    gone = await store.get("Patient", "gone")
    assert gone is not None and gone.state == "deleted" and gone.version_id == "4"
    assert await store.take_catchup() is None, "HAPI answered: no poll needed"


async def test_topic_notification_id_only_polls_only_when_hapi_cannot_answer(
    store: SpeedStore,
) -> None:
    async def down(resource_type: str, resource_id: str) -> dict[str, Any] | None:
        raise httpx.ConnectError("HAPI is down")

    app = create_app(receiver_settings(), latest_version=no_hapi, fetch_resource=down)
    async with running(app) as hapi_down:
        bundle = topic_bundle(
            {"fullUrl": "http://hapi/fhir/Patient/p1", "request": {"method": "PUT"}}
        )
        response = await hapi_down.post("/fhir", content=json.dumps(bundle), headers=HEADERS)
        assert response.status_code == 204
    assert await store.take_catchup() is not None
    assert await store.get("Patient", "p1") is None


async def test_a_put_body_without_an_id_is_400_and_writes_nothing(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    body = {k: v for k, v in patient("p1").items() if k != "id"}
    response = await client.put("/fhir/Patient/p1", content=json.dumps(body), headers=HEADERS)
    assert response.status_code == 400
    expressions = [e for i in response.json()["issue"] for e in i.get("expression", [])]
    assert expressions == ["id"]
    assert await store.get("Patient", "p1") is None


async def test_refused_deliveries_are_counted_and_logged_without_the_token(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="receiver.app")
    wrong = "wrong-token-value-123"
    body = json.dumps(patient("p1"))
    for headers in (
        {**HEADERS, "Authorization": f"Bearer {wrong}"},
        {**HEADERS, "Authorization": f"Bearer {wrong}"},
        {k: v for k, v in HEADERS.items() if k != "Authorization"},
    ):
        assert (
            await client.put("/fhir/Patient/p1", content=body, headers=headers)
        ).status_code == 401
    bad = json.dumps(patient("p2", gender="robot"))
    assert (await client.put("/fhir/Patient/p2", content=bad, headers=HEADERS)).status_code == 422
    metrics = (await client.get("/metrics")).text
    assert (
        'researchflow_refused_deliveries_total{reason="unauthorized",status="401"} 3.0' in metrics
    )
    assert 'researchflow_refused_deliveries_total{reason="rejected",status="422"} 1.0' in metrics
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals[0].startswith("refused PUT /fhir/Patient/p1") and "401" in refusals[0]
    assert "not one of RECEIVER_TOKEN" in refusals[0]
    assert len([r for r in refusals if " 401," in r]) == 1, "one line per status every 10 s"
    assert any(" 422," in r and "gender" in r for r in refusals)
    assert wrong not in caplog.text and TOKEN not in caplog.text


async def test_topic_notification_with_one_bad_resource_writes_nothing(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    bundle = topic_bundle({"resource": patient("p1")}, {"resource": patient("p2", gender="robot")})
    response = await client.post("/fhir", content=json.dumps(bundle), headers=HEADERS)
    assert response.status_code == 422
    expressions = [e for i in response.json()["issue"] for e in i.get("expression", [])]
    assert expressions == ["Bundle.entry[2].resource.gender"]
    assert await store.get("Patient", "p1") is None


async def test_post_of_something_else_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/fhir", content=json.dumps(patient()), headers=HEADERS)
    assert response.status_code == 400
    response = await client.post(
        "/fhir",
        content=json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []}),
        headers=HEADERS,
    )
    assert response.status_code == 400
    response = await client.post(
        "/fhir", content=b"<xml/>", headers={**HEADERS, "Content-Type": "application/xml"}
    )
    assert response.status_code == 415


async def test_hmac_signature_authenticates_instead_of_the_bearer(
    redis_client: aioredis.Redis,
) -> None:
    secret = "hmac-secret"
    app = create_app(receiver_settings(receiver_hmac_secret=secret), latest_version=no_hapi)
    body = json.dumps(patient()).encode()
    async with running(app) as client:
        good = {
            "Content-Type": "application/fhir+json",
            auth.SIGNATURE_HEADER: auth.sign(secret, body),
        }
        assert (await client.put("/fhir/Patient/p1", content=body, headers=good)).status_code == 204
        tampered = body.replace(b"male", b"female")
        response = await client.put("/fhir/Patient/p1", content=tampered, headers=good)
        assert response.status_code == 401
        old = {**good, auth.SIGNATURE_HEADER: auth.sign(secret, body, timestamp=1_000_000)}
        assert (await client.put("/fhir/Patient/p1", content=body, headers=old)).status_code == 401
        wrong = {**good, auth.SIGNATURE_HEADER: auth.sign("other", body)}
        assert (
            await client.put("/fhir/Patient/p1", content=body, headers=wrong)
        ).status_code == 401


async def test_many_concurrent_puts_of_one_id_end_at_the_newest(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    versions = list(range(1, 41)) * 2
    import random

    random.Random(7).shuffle(versions)
    bodies = [
        json.dumps(patient(version=v, gender="female" if v == 40 else "male")) for v in versions
    ]
    results = await asyncio.gather(
        *(client.put("/fhir/Patient/p1", content=b, headers=HEADERS) for b in bodies)
    )
    assert {r.status_code for r in results} == {204}
    entry = await store.get("Patient", "p1")
    assert entry is not None and entry.version_id == "40"
    assert json.loads(entry.body or b"")["gender"] == "female"


async def test_health_and_metrics(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json()["redis"] == "up"
    await client.put("/fhir/Patient/p1", content=json.dumps(patient()), headers=HEADERS)
    await client.put(
        "/fhir/Patient/p1", content=json.dumps(patient(gender="robot", version=2)), headers=HEADERS
    )
    text = (await client.get("/metrics")).text
    assert 'researchflow_notifications_total{outcome="written",resource_type="Patient"} 1.0' in text
    assert 'researchflow_rejects_total{resource_type="Patient"} 1.0' in text
    assert "researchflow_write_seconds_count 1.0" in text


async def test_topic_notification_delete_entry_uses_hapis_version(
    redis_client: aioredis.Redis,
) -> None:
    async def hapi(resource_type: str, resource_id: str) -> tuple[str, str, bool]:
        return ("7", "2026-11-25T12:00:00Z", True)

    app = create_app(receiver_settings(), latest_version=hapi)
    bundle = topic_bundle({"request": {"method": "DELETE", "url": "Patient/p1"}})
    async with running(app) as client:
        await client.put(
            "/fhir/Patient/p1", content=json.dumps(patient(version=6)), headers=HEADERS
        )
        response = await client.post("/fhir", content=json.dumps(bundle), headers=HEADERS)
        assert response.status_code == 204
    store = SpeedStore(redis_client)
    entry = await store.get("Patient", "p1")
    assert entry is not None and entry.state == "deleted" and entry.version_id == "7"
    assert await store.take_catchup() is None


async def test_resource_types_can_be_limited(redis_client: aioredis.Redis) -> None:
    app = create_app(
        receiver_settings(receiver_resource_types=("Patient", "Condition")), latest_version=no_hapi
    )
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"text": "x"},
    }
    async with running(app) as client:
        assert (
            await client.put("/fhir/Patient/p1", content=json.dumps(patient()), headers=HEADERS)
        ).status_code == 204
        refused = await client.put(
            "/fhir/Observation/o1", content=json.dumps(observation), headers=HEADERS
        )
        assert refused.status_code == 400
        assert "RECEIVER_RESOURCE_TYPES" in refused.json()["issue"][0]["diagnostics"]
        bundle = topic_bundle({"resource": observation})
        assert (
            await client.post("/fhir", content=json.dumps(bundle), headers=HEADERS)
        ).status_code == 400
        assert (
            await client.delete(
                "/fhir/Observation/o1", headers={"Authorization": f"Bearer {TOKEN}"}
            )
        ).status_code == 400
    store = SpeedStore(redis_client)
    assert await store.get("Observation", "o1") is None
    assert Settings.from_env(
        {"RECEIVER_RESOURCE_TYPES": "Patient, Condition"}
    ).receiver_resource_types == ("Patient", "Condition")


async def test_contained_resource_without_a_type_is_422(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    # Found by the fuzzer: fhir.resources raised KeyError('R4.Type') here (a 500).
    body = {**patient(), "contained": [{"resourceType": "", "id": "pr1"}]}
    response = await client.put("/fhir/Patient/p1", content=json.dumps(body), headers=HEADERS)
    assert response.status_code == 422
    assert response.json()["resourceType"] == "OperationOutcome"
    assert await store.get("Patient", "p1") is None
