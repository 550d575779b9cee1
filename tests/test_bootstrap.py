"""Subscriptions bootstrap, status, remove and the watchdog.

First against a small fake of HAPI's Subscription endpoints mocked with respx (client-level
behaviour: the exact requests sent), then end to end against the stand-in HAPI.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import respx

from core.settings import Settings
from subscriptions.bootstrap import (
    OWNER_TAG_SYSTEM,
    SEND_DELETE_MESSAGES,
    SubscriptionError,
    SubscriptionInfo,
    bootstrap,
    format_table,
    remove,
    status,
)
from subscriptions.fhir_client import FhirClient
from subscriptions.standin.hapi import StandInHapi
from subscriptions.standin.run import serve_standin
from subscriptions.watchdog import check_once, run_watchdog, watchdog_running

BASE = "http://hapi.test/fhir"


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "fhir_base_url": BASE,
        "receiver_url": "http://receiver.test:8081/fhir",
        "receiver_tokens": ("tok-1", "tok-0"),
        "instance": "test-instance",
    }
    values.update(overrides)
    return Settings(**values)


class FakeHapi:
    """HAPI's Subscription endpoints, enough for bootstrap: ids, versions, `_tag` search.

    `activate_after` reads of a `requested` Subscription it turns `active` (HAPI's
    asynchronous activation); `refuse` answers a 422 to creates of that criteria;
    `fail` sets that criteria to `error` with the given text.
    """

    def __init__(self, router: respx.MockRouter) -> None:
        self.subs: dict[str, dict[str, Any]] = {}
        self.next_id = 100
        self.activate_after = 1
        self.reads: dict[str, int] = {}
        self.refuse: dict[str, str] = {}
        self.fail: dict[str, str] = {}
        self.requests: list[httpx.Request] = []
        router.route(path__regex=r"^/fhir/Subscription.*").mock(side_effect=self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        parts = request.url.path.split("/")[3:]  # after /fhir/Subscription
        if request.method == "GET" and not parts:
            return self._search(request)
        if request.method == "POST" and not parts:
            body = json.loads(request.content)
            if body.get("criteria") in self.refuse:
                return self._outcome(422, self.refuse[body["criteria"]])
            self.next_id += 1
            return self._store(str(self.next_id), body, 201)
        sid = parts[0]
        if request.method == "PUT":
            return self._store(sid, json.loads(request.content), 200)
        if sid not in self.subs:
            return self._outcome(404, f"HAPI-2001: Resource Subscription/{sid} is not known")
        if request.method == "DELETE":
            del self.subs[sid]
            return httpx.Response(204)
        self.reads[sid] = self.reads.get(sid, 0) + 1
        sub = self.subs[sid]
        if sub["status"] == "requested" and sub["criteria"] in self.fail:
            sub.update(status="error", error=self.fail[sub["criteria"]])
        elif sub["status"] == "requested" and self.reads[sid] >= self.activate_after:
            sub["status"] = "active"
        return httpx.Response(200, json=sub)

    def _store(self, sid: str, body: dict[str, Any], code: int) -> httpx.Response:
        old = self.subs.get(sid)
        version = int(old["meta"]["versionId"]) + 1 if old else 1
        tags = (old or {}).get("meta", {}).get("tag", []) + body.get("meta", {}).get("tag", [])
        unique = [dict(t) for t in {tuple(sorted(t.items())) for t in tags}]
        body = {**body, "id": sid, "meta": {"versionId": str(version), "tag": unique}}
        self.subs[sid] = body
        return httpx.Response(code, json=body)

    def _search(self, request: httpx.Request) -> httpx.Response:
        wanted = request.url.params.get("_tag")
        found = [
            s
            for s in self.subs.values()
            if wanted is None
            or any(f"{t['system']}|{t['code']}" == wanted for t in s["meta"].get("tag", []))
        ]
        entries = [{"resource": s, "search": {"mode": "match"}} for s in found]
        return httpx.Response(
            200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries}
        )

    @staticmethod
    def _outcome(code: int, text: str) -> httpx.Response:
        return httpx.Response(
            code,
            json={
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
            },
        )

    def add_foreign(self) -> str:
        self.next_id += 1
        sid = str(self.next_id)
        self.subs[sid] = {
            "resourceType": "Subscription",
            "id": sid,
            "meta": {"versionId": "1", "tag": [{"system": "urn:other", "code": "x"}]},
            "status": "active",
            "criteria": "Patient?",
            "channel": {"type": "rest-hook", "endpoint": "http://elsewhere/fhir"},
        }
        return sid


@pytest.fixture
def fake() -> Iterator[FakeHapi]:
    with respx.mock(assert_all_called=False) as router:
        yield FakeHapi(router)


@pytest.fixture
async def fhir() -> AsyncIterator[FhirClient]:
    async with FhirClient(BASE, max_retries=1, backoff_initial=0.01) as client:
        yield client


async def test_bootstrap_creates_one_per_type(fake: FakeHapi, fhir: FhirClient) -> None:
    messages: list[str] = []
    rows = await bootstrap(make_settings(), fhir, wait=5, progress=messages.append)
    assert [(r.resource_type, r.status, r.action) for r in rows] == [
        ("Patient", "active", "created"),
        ("Condition", "active", "created"),
        ("Observation", "active", "created"),
    ]
    assert len(fake.subs) == 3 and messages
    sub = fake.subs[rows[0].id]
    assert sub["criteria"] == "Patient?"
    assert sub["channel"] == {
        "extension": [{"url": SEND_DELETE_MESSAGES, "valueBoolean": True}],
        "type": "rest-hook",
        "endpoint": "http://receiver.test:8081/fhir",
        "payload": "application/fhir+json",
        "header": ["Authorization: Bearer tok-1"],
    }
    assert {"system": OWNER_TAG_SYSTEM, "code": "test-instance"} in sub["meta"]["tag"]
    searches = [r for r in fake.requests if r.method == "GET" and "_tag" in r.url.params]
    assert searches and all(r.headers["Cache-Control"] == "no-cache" for r in searches)


async def test_bootstrap_is_idempotent_and_updates_on_change(
    fake: FakeHapi, fhir: FhirClient
) -> None:
    first = await bootstrap(make_settings(), fhir, wait=5, progress=None)
    again = await bootstrap(make_settings(), fhir, wait=5, progress=None)
    assert [r.id for r in again] == [r.id for r in first]
    assert {r.action for r in again} == {"unchanged"}
    assert len(fake.subs) == 3
    versions = {sid: s["meta"]["versionId"] for sid, s in fake.subs.items()}

    rotated = make_settings(receiver_tokens=("tok-2", "tok-1"), receiver_url="http://new:9/fhir")
    changed = await bootstrap(rotated, fhir, wait=5, progress=None)
    assert [r.id for r in changed] == [r.id for r in first]
    assert {r.action for r in changed} == {"updated"}
    assert len(fake.subs) == 3
    for sid, sub in fake.subs.items():
        assert sub["meta"]["versionId"] != versions[sid]
        assert sub["channel"]["header"] == ["Authorization: Bearer tok-2"]
        assert sub["channel"]["endpoint"] == "http://new:9/fhir"


async def test_bootstrap_removes_duplicates(fake: FakeHapi, fhir: FhirClient) -> None:
    settings = make_settings()
    await bootstrap(settings, fhir, types=["Patient"], wait=5, progress=None)
    (only,) = fake.subs.values()
    fake.next_id += 1
    fake.subs[str(fake.next_id)] = {**only, "id": str(fake.next_id), "status": "requested"}
    rows = await bootstrap(settings, fhir, types=["Patient"], wait=5, progress=None)
    assert [r.id for r in rows] == [only["id"]]
    assert list(fake.subs) == [only["id"]]


async def test_bootstrap_reports_a_422(fake: FakeHapi, fhir: FhirClient) -> None:
    fake.refuse["Condition?"] = "HAPI-0010: Invalid criteria: Condition?"
    with pytest.raises(SubscriptionError, match="HAPI-0010: Invalid criteria") as info:
        await bootstrap(make_settings(), fhir, wait=5, progress=None)
    assert "Condition" in info.value.message and "422" in info.value.message
    # The others were registered and became active all the same.
    assert [(r.resource_type, r.status) for r in info.value.results] == [
        ("Patient", "active"),
        ("Observation", "active"),
    ]


async def test_bootstrap_reports_subscription_error(fake: FakeHapi, fhir: FhirClient) -> None:
    fake.fail["Observation?"] = "Unknown endpoint: connection refused"
    with pytest.raises(SubscriptionError, match="Unknown endpoint: connection refused"):
        await bootstrap(make_settings(), fhir, wait=5, progress=None)


async def test_bootstrap_waits_with_back_off(fake: FakeHapi, fhir: FhirClient) -> None:
    fake.activate_after = 3
    rows = await bootstrap(make_settings(), fhir, types=["Patient"], wait=10, progress=None)
    assert rows[0].status == "active"
    assert fake.reads[rows[0].id] == 3


async def test_bootstrap_times_out(fake: FakeHapi, fhir: FhirClient) -> None:
    fake.activate_after = 1000
    with pytest.raises(SubscriptionError, match="still 'requested'"):
        await bootstrap(make_settings(), fhir, types=["Patient"], wait=0.3, progress=None)


async def test_bootstrap_without_waiting(fake: FakeHapi, fhir: FhirClient) -> None:
    fake.activate_after = 1000
    rows = await bootstrap(make_settings(), fhir, types=["Patient"], wait=0, progress=None)
    assert rows[0].status == "requested"


async def test_status_and_remove_touch_only_ours(fake: FakeHapi, fhir: FhirClient) -> None:
    foreign = fake.add_foreign()
    await bootstrap(make_settings(), fhir, wait=5, progress=None)
    rows = await status(make_settings(), fhir)
    assert [r.resource_type for r in rows] == ["Condition", "Observation", "Patient"]
    assert foreign not in {r.id for r in rows}
    table = format_table(rows)
    assert "criteria" in table and "Observation?" in table and "active" in table
    assert await remove(make_settings(), fhir) == 3
    assert list(fake.subs) == [foreign]
    assert await status(make_settings(), fhir) == []
    assert await remove(make_settings(), fhir) == 0


def test_format_table() -> None:
    rows = [
        SubscriptionInfo("1", "Patient", "Patient?", "active", "http://r/fhir"),
        SubscriptionInfo("22", "Condition", "Condition?", "error", "http://r/fhir", "boom\nx"),
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["id", "criteria", "status", "endpoint", "error"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[3].split() == ["22", "Condition?", "error", "http://r/fhir", "boom", "x"]
    assert "no Subscriptions" in format_table([])


async def test_watchdog_repairs_missing_error_and_off(fake: FakeHapi, fhir: FhirClient) -> None:
    settings = make_settings()
    rows = {r.resource_type: r for r in await bootstrap(settings, fhir, wait=5, progress=None)}
    assert await check_once(settings, fhir) == []

    fake.subs[rows["Patient"].id].update(status="error", error="delivery failed")
    fake.subs[rows["Condition"].id]["status"] = "off"
    del fake.subs[rows["Observation"].id]
    actions = await check_once(settings, fhir)
    assert len(actions) == 3
    assert any("re-requested Patient" in a and "delivery failed" in a for a in actions)
    assert any("re-requested Condition" in a and "was off" in a for a in actions)
    assert any("created missing Observation" in a for a in actions)
    patient = fake.subs[rows["Patient"].id]
    assert patient["status"] == "requested" and "error" not in patient
    assert len(fake.subs) == 3


async def test_watchdog_creating_what_a_first_start_lacks_is_no_warning(
    fake: FakeHapi, fhir: FhirClient, caplog: pytest.LogCaptureFixture
) -> None:
    """README's order is `run`, then `subscriptions bootstrap`: the watchdog creating them
    first is expected (INFO); re-requesting one in error is what needs a look (WARNING)."""
    import logging

    settings = make_settings()
    with caplog.at_level(logging.INFO, logger="subscriptions.watchdog"):
        created = await check_once(settings, fhir, ["Patient"])
        (sub,) = fake.subs.values()
        sub.update(status="error", error="delivery failed")
        await check_once(settings, fhir, ["Patient"])
    levels = {r.getMessage().split()[2]: r.levelname for r in caplog.records}
    assert created and levels == {"created": "INFO", "re-requested": "WARNING"}, levels


async def test_watchdog_leaves_a_differing_active_one_alone(
    fake: FakeHapi, fhir: FhirClient
) -> None:
    await bootstrap(make_settings(), fhir, types=["Patient"], wait=5, progress=None)
    newer_token = make_settings(receiver_tokens=("tok-0",))
    assert await check_once(newer_token, fhir, ["Patient"]) == []


async def test_watchdog_loop_stops_on_event(fake: FakeHapi, fhir: FhirClient) -> None:
    settings = make_settings()
    stop = asyncio.Event()
    task = asyncio.create_task(run_watchdog(settings, fhir, stop, ["Patient"], interval=0.05))
    for _ in range(100):
        if fake.subs:
            break
        await asyncio.sleep(0.02)
    assert len(fake.subs) == 1
    stop.set()
    await asyncio.wait_for(task, timeout=2)


async def test_watchdog_loop_survives_hapi_errors(fhir: FhirClient) -> None:
    with respx.mock(assert_all_called=False) as router:
        route = router.get(f"{BASE}/Subscription").mock(return_value=httpx.Response(503))
        async with watchdog_running(make_settings(), fhir, ["Patient"], interval=0.05) as task:
            for _ in range(100):
                if route.call_count >= 4:  # two rounds of (1 try + 1 retry)
                    break
                await asyncio.sleep(0.02)
            assert not task.done()
        assert task.done() and not task.cancelled()


# -- end to end against the stand-in HAPI ---------------------------------------------------


@pytest.fixture
async def standin() -> AsyncIterator[tuple[StandInHapi, FhirClient]]:
    hapi = StandInHapi(activation_delay=0.05)
    async with serve_standin(hapi) as base_url, FhirClient(base_url, max_retries=1) as client:
        yield hapi, client


def standin_settings(**overrides: Any) -> Settings:
    # Nothing but Subscriptions changes in these tests, so nothing is ever delivered here.
    return make_settings(**{"receiver_url": "http://127.0.0.1:1/fhir", **overrides})


async def subscriptions_on(hapi: StandInHapi) -> dict[str, dict[str, Any]]:
    return {
        rid: truth.resource
        for (rtype, rid), truth in hapi.resources.items()
        if rtype == "Subscription" and truth.resource is not None
    }


async def test_standin_bootstrap_idempotent_update_remove(
    standin: tuple[StandInHapi, FhirClient],
) -> None:
    hapi, client = standin
    foreign = await hapi.create(
        {
            "resourceType": "Subscription",
            "status": "requested",
            "criteria": "Patient?",
            "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:2/other"},
        }
    )
    settings = standin_settings()
    first = await bootstrap(settings, client, wait=10, progress=None)
    assert [(r.resource_type, r.status) for r in first] == [
        ("Patient", "active"),
        ("Condition", "active"),
        ("Observation", "active"),
    ]
    assert len(await subscriptions_on(hapi)) == 4

    again = await bootstrap(settings, client, wait=10, progress=None)
    assert [r.id for r in again] == [r.id for r in first]
    assert {r.action for r in again} == {"unchanged"}
    assert len(await subscriptions_on(hapi)) == 4

    rotated = standin_settings(receiver_tokens=("tok-2",), receiver_url="http://127.0.0.1:3/fhir")
    changed = await bootstrap(rotated, client, wait=10, progress=None)
    assert [r.id for r in changed] == [r.id for r in first]
    assert {(r.action, r.status) for r in changed} == {("updated", "active")}
    subs = await subscriptions_on(hapi)
    assert len(subs) == 4
    for row in changed:
        channel = subs[row.id]["channel"]
        assert channel["header"] == ["Authorization: Bearer tok-2"]
        assert channel["endpoint"] == "http://127.0.0.1:3/fhir"

    rows = await status(rotated, client)
    assert sorted(r.id for r in rows) == sorted(r.id for r in first)
    assert await remove(rotated, client) == 3
    assert list(await subscriptions_on(hapi)) == [foreign["id"]]
    assert await status(rotated, client) == []


async def test_standin_422_fails_with_its_text(standin: tuple[StandInHapi, FhirClient]) -> None:
    _, client = standin
    with pytest.raises(SubscriptionError, match="invalid/unsupported resource type: Bogus"):
        await bootstrap(standin_settings(), client, types=["Bogus"], wait=5, progress=None)


async def test_standin_error_status_fails_with_subscription_error(
    standin: tuple[StandInHapi, FhirClient],
) -> None:
    hapi, client = standin
    hapi.fail_activation("Failed to activate subscription: the endpoint is not reachable")
    with pytest.raises(SubscriptionError, match="the endpoint is not reachable") as info:
        await bootstrap(standin_settings(), client, types=["Patient"], wait=5, progress=None)
    assert [r.status for r in info.value.results] == ["error"]


async def test_standin_watchdog_rerequests(standin: tuple[StandInHapi, FhirClient]) -> None:
    hapi, client = standin
    settings = standin_settings()
    rows = {r.resource_type: r for r in await bootstrap(settings, client, wait=10, progress=None)}
    assert await check_once(settings, client) == []

    # One ends in error (re-activation fails), one is deleted by someone.
    hapi.fail_activation("endpoint refused")
    patient = await hapi.read("Subscription", rows["Patient"].id)
    await hapi.update({**patient, "status": "requested"})
    await hapi.wait_idle()
    assert (await hapi.read("Subscription", rows["Patient"].id))["status"] == "error"
    await client.delete("Subscription", rows["Observation"].id)
    hapi.fail_activation(None)

    actions = await check_once(settings, client)
    assert len(actions) == 2
    assert any("re-requested Patient" in a and "endpoint refused" in a for a in actions)
    assert any("created missing Observation" in a for a in actions)
    await hapi.wait_idle()
    now = await status(settings, client)
    assert sorted((r.resource_type, r.status) for r in now) == [
        ("Condition", "active"),
        ("Observation", "active"),
        ("Patient", "active"),
    ]
    assert await check_once(settings, client) == []


async def test_bootstrap_without_a_token_changes_nothing(fake: FakeHapi, fhir: FhirClient) -> None:
    await bootstrap(make_settings(), fhir, wait=0)
    before = json.dumps(fake.subs, sort_keys=True)
    sent = len(fake.requests)
    with pytest.raises(SubscriptionError, match="RECEIVER_TOKEN"):
        await bootstrap(make_settings(receiver_tokens=()), fhir, wait=0)
    assert len(fake.requests) == sent, "HAPI was not even asked"
    assert json.dumps(fake.subs, sort_keys=True) == before
    assert all(
        s["channel"]["header"] == ["Authorization: Bearer tok-1"] for s in fake.subs.values()
    ), "the live Subscriptions keep their header"


def test_the_bootstrap_command_without_a_token_exits_2_and_changes_nothing(
    fake: FakeHapi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import researchflow_cli

    monkeypatch.setenv("FHIR_BASE_URL", BASE)
    monkeypatch.delenv("RECEIVER_TOKEN", raising=False)
    assert researchflow_cli.main(["subscriptions", "bootstrap", "--wait", "0"]) == 2
    err = capsys.readouterr().err
    assert "RECEIVER_TOKEN" in err and "nothing was changed" in err
    assert len(err.strip().splitlines()) == 1
    assert fake.requests == [] and fake.subs == {}


async def test_watchdog_without_a_token_creates_no_subscription(
    fake: FakeHapi, fhir: FhirClient
) -> None:
    actions = await check_once(make_settings(receiver_tokens=()), fhir)
    assert fake.subs == {}
    assert all("RECEIVER_TOKEN is not set" in a for a in actions) and len(actions) == 3
