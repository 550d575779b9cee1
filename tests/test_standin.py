"""The stand-in HAPI behaves like HAPI FHIR 8.x as `../shared/hapi-rest-hook.md` describes.

Every delivery test runs against a real HTTP receiver served by uvicorn on loopback.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.serve import serve_asgi
from subscriptions.standin.delivery import (
    EXT_DELIVER_LATEST,
    EXT_SEND_DELETES,
    EXT_STRIP_VERSIONS,
)
from subscriptions.standin.hapi import UNREACHABLE_HOST, StandInHapi
from subscriptions.standin.http import StandInError
from subscriptions.standin.run import serve_standin, serve_standin_in_thread

NO_CACHE = {"Cache-Control": "no-cache"}


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A subscriber endpoint that records every request and can be told to fail or stall."""

    base: str = ""
    requests: list[Received] = field(default_factory=list)
    fail_status: int | None = None  # answer every request with this status
    fail_first: int = 0  # answer the next N requests with 500 (after recording them)
    stall_first: int = 0  # stall the next N requests for `stall` seconds
    stall: float = 0.0

    @property
    def endpoint(self) -> str:
        return self.base + "/fhir"

    def app(self) -> Starlette:
        async def handle(request: Request) -> Response:
            self.requests.append(
                Received(
                    request.method,
                    request.url.path,
                    {k.lower(): v for k, v in request.headers.items()},
                    await request.body(),
                    time.monotonic(),
                )
            )
            if self.stall_first > 0:
                self.stall_first -= 1
                await asyncio.sleep(self.stall)
            if self.fail_first > 0:
                self.fail_first -= 1
                return Response(status_code=500)
            if self.fail_status is not None:
                return Response(status_code=self.fail_status)
            return Response(status_code=204)

        methods = ["GET", "PUT", "POST", "DELETE"]
        return Starlette(routes=[Route("/{path:path}", handle, methods=methods)])

    def versions(self, path: str) -> list[str]:
        """The versions (If-Match) of the PUTs that reached `path`, in arrival order."""
        return [
            r.headers["if-match"].removeprefix("W/").strip('"')
            for r in self.requests
            if r.method == "PUT" and r.path == path
        ]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    async with serve_asgi(rec.app()) as base:
        rec.base = base
        yield rec


@pytest.fixture
async def hapi() -> AsyncIterator[StandInHapi]:
    return_value = StandInHapi(
        activation_delay=0.01, retry_initial=0.02, retry_factor=1.5, retry_total=0.3
    )
    async with serve_standin(return_value):
        yield return_value


@pytest.fixture
async def client(hapi: StandInHapi) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=hapi.base_url, trust_env=False, timeout=10) as c:
        yield c


def subscription(
    endpoint: str,
    criteria: str = "Patient?",
    *,
    payload: str | None = "application/fhir+json",
    extensions: tuple[str, ...] = (),
    headers: tuple[str, ...] = (),
    status: str | None = "requested",
) -> dict[str, Any]:
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint}
    if payload is not None:
        channel["payload"] = payload
    if headers:
        channel["header"] = list(headers)
    if extensions:
        channel["extension"] = [{"url": url, "valueBoolean": True} for url in extensions]
    sub: dict[str, Any] = {
        "resourceType": "Subscription",
        "criteria": criteria,
        "reason": "test",
        "channel": channel,
        "meta": {"tag": [{"system": "urn:test", "code": "rf"}]},
    }
    if status is not None:
        sub["status"] = status
    return sub


async def subscribe(client: httpx.AsyncClient, hapi: StandInHapi, sub: dict[str, Any]) -> str:
    response = await client.post("/Subscription", json=sub)
    assert response.status_code == 201, response.text
    await hapi.wait_idle()
    return str(response.json()["id"])


# -- subscriptions ------------------------------------------------------------------------------


async def test_requested_subscription_becomes_active_in_a_new_version(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    created = await client.post("/Subscription", json=subscription(receiver.endpoint))
    assert created.status_code == 201
    body = created.json()
    assert body["status"] == "requested" and body["meta"]["versionId"] == "1"
    await hapi.wait_idle()
    current = (await client.get(f"/Subscription/{body['id']}")).json()
    assert current["status"] == "active" and current["meta"]["versionId"] == "2"


async def test_activation_can_end_in_error(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    hapi.fail_activation("endpoint refused the handshake")
    sid = await subscribe(client, hapi, subscription(receiver.endpoint))
    failed = (await client.get(f"/Subscription/{sid}")).json()
    assert failed["status"] == "error" and failed["error"] == "endpoint refused the handshake"
    hapi.fail_activation(None)
    # Like HAPI 8.8 (tests/test_hapi_facts.py): activation never contacts the endpoint.
    sid = await subscribe(client, hapi, subscription(f"http://{UNREACHABLE_HOST}:9/fhir"))
    unreachable = (await client.get(f"/Subscription/{sid}")).json()
    assert unreachable["status"] == "active" and "error" not in unreachable


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"status": None}, "Subscription.status must be populated"),
        ({"status": "off"}, "Subscription.status"),
        ({"criteria": "Patient"}, "{Resource Type}?[params]"),
        ({"criteria": "Nonsense?x=1"}, "invalid/unsupported resource type"),
        ({"payload": "text/csv"}, "Subscription.channel.payload"),
        ({"endpoint": None}, "channel.endpoint"),
    ],
)
async def test_invalid_subscription_is_refused_with_422_and_not_saved(
    hapi: StandInHapi, client: httpx.AsyncClient, change: dict[str, Any], text: str
) -> None:
    sub = subscription("http://127.0.0.1:9/fhir")
    for key, value in change.items():
        target = sub["channel"] if key in ("payload", "endpoint") else sub
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    response = await client.post("/Subscription", json=sub)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert text in outcome["issue"][0]["diagnostics"]
    assert not hapi.resources


async def test_subscriptions_searchable_by_tag_and_status(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    sid = await subscribe(client, hapi, subscription(receiver.endpoint))
    other = subscription(receiver.endpoint)
    other["meta"] = {"tag": [{"system": "urn:test", "code": "someone-else"}]}
    await subscribe(client, hapi, other)
    found = await client.get(
        "/Subscription", params={"_tag": "urn:test|rf", "status": "active"}, headers=NO_CACHE
    )
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [sid]


# -- what arrives -------------------------------------------------------------------------------


async def test_create_and_update_arrive_as_put_with_if_match_and_fhir_json(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    await subscribe(client, hapi, subscription(receiver.endpoint))
    created = (await client.post("/Patient", json={"resourceType": "Patient"})).json()
    await hapi.wait_idle()
    pid = created["id"]
    updated = await client.put(
        f"/Patient/{pid}", json={"resourceType": "Patient", "id": pid, "gender": "female"}
    )
    assert updated.status_code == 200
    await hapi.wait_idle()
    assert [r.method for r in receiver.requests] == ["PUT", "PUT"]  # creates too: never POST
    for n, request in enumerate(receiver.requests, start=1):
        assert request.path == f"/fhir/Patient/{pid}"
        assert request.headers["content-type"] == "application/fhir+json; charset=UTF-8"
        assert request.headers["if-match"] == f'W/"{n}"'  # HAPI 8.8 sends a weak ETag
        assert httpx.Response(200, content=request.body).json()["meta"]["versionId"] == str(n)
    assert hapi.delivered == 2 and hapi.attempts[0].ok


async def test_delete_is_delivered_only_with_the_extension(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    await subscribe(
        client, hapi, subscription(receiver.endpoint + "/a", extensions=(EXT_SEND_DELETES,))
    )
    await subscribe(client, hapi, subscription(receiver.endpoint + "/b"))
    await hapi.create({"resourceType": "Patient", "id": "p-del"})
    assert (await client.delete("/Patient/p-del")).status_code == 200
    await hapi.wait_idle()
    deletes = [r for r in receiver.requests if r.method == "DELETE"]
    assert [r.path for r in deletes] == ["/fhir/a/Patient/p-del"]
    assert deletes[0].body == b"" and "if-match" not in deletes[0].headers
    assert sorted(r.path for r in receiver.requests if r.method == "PUT") == [
        "/fhir/a/Patient/p-del",
        "/fhir/b/Patient/p-del",
    ]


async def test_no_payload_posts_an_empty_form_and_ignores_the_status(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    await subscribe(client, hapi, subscription(receiver.endpoint, payload=None))
    receiver.fail_status = 500
    await hapi.create({"resourceType": "Patient", "id": "p-np"})
    await hapi.wait_idle()
    assert len(receiver.requests) == 1  # no retry: HAPI ignores the answer
    request = receiver.requests[0]
    assert (request.method, request.path, request.body) == ("POST", "/fhir", b"")
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"


async def test_channel_headers_are_split_on_the_first_colon_and_trimmed(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    sub = subscription(
        receiver.endpoint,
        headers=("Authorization: Bearer xyz", "  X-Odd :  a:b:c  "),
        extensions=(EXT_STRIP_VERSIONS,),
    )
    await subscribe(client, hapi, sub)
    await hapi.create({"resourceType": "Patient", "id": "p-h"})
    await hapi.wait_idle()
    headers = receiver.requests[0].headers
    assert headers["authorization"] == "Bearer xyz"
    assert headers["x-odd"] == "a:b:c"
    assert "if-match" not in headers  # strip-version-ids


async def test_criteria_filter_sends_nothing_when_a_resource_stops_matching(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    await subscribe(
        client,
        hapi,
        subscription(receiver.endpoint, "Condition?code=http://snomed.info/sct|44054006"),
    )
    diabetes = {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}
    other = {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}
    condition = {"resourceType": "Condition", "id": "c-1", "subject": {"reference": "Patient/x"}}
    await hapi.create({**condition, "code": diabetes})
    await hapi.update({**condition, "code": other})
    await hapi.create({**condition, "id": "c-2", "code": other})
    await hapi.wait_idle()
    assert [(r.path, r.headers["if-match"]) for r in receiver.requests] == [
        ("/fhir/Condition/c-1", 'W/"1"')
    ]


async def test_two_deliverers_race_and_every_version_arrives(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    await subscribe(client, hapi, subscription(receiver.endpoint))
    hapi.delivery_jitter = 0.02
    out_of_order = False
    for round_ in range(5):
        rid = f"p-race-{round_}"
        for n in range(12):
            await hapi.update({"resourceType": "Patient", "id": rid, "birthDate": f"20{n:02d}"})
        await hapi.wait_idle()
        arrived = receiver.versions(f"/fhir/Patient/{rid}")
        assert sorted(arrived, key=int) == [str(n) for n in range(1, 13)]
        out_of_order = out_of_order or arrived != sorted(arrived, key=int)
        if out_of_order:
            break
    assert out_of_order, "two jittered deliverers never reordered anything"


async def test_failed_deliveries_are_retried_with_backoff_then_dropped(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    sid = await subscribe(client, hapi, subscription(receiver.endpoint))
    receiver.fail_status = 503
    start = time.monotonic()
    await hapi.create({"resourceType": "Patient", "id": "p-fail"})
    await hapi.wait_idle()
    assert time.monotonic() - start >= 0.3  # retry_total
    times = [r.at for r in receiver.requests]
    assert len(times) >= 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[-1] > gaps[0] * 1.5  # exponential back-off (x1.5 here)
    assert hapi.dropped == 1 and hapi.delivered == 0
    assert all(a.status == 503 for a in hapi.attempts)
    status = (await client.get(f"/Subscription/{sid}")).json()["status"]
    assert status == "active"  # a failing endpoint never changes the Subscription
    receiver.fail_status = None
    await hapi.update({"resourceType": "Patient", "id": "p-fail", "gender": "male"})
    await hapi.wait_idle()
    assert receiver.versions("/fhir/Patient/p-fail")[-1] == "2"  # later ones still flow


async def test_connection_errors_are_retried_and_dropped(hapi: StandInHapi) -> None:
    await hapi.create(subscription("http://127.0.0.1:9/fhir", status="active"))
    await hapi.create({"resourceType": "Patient", "id": "p-conn"})
    await hapi.wait_idle()
    assert hapi.dropped == 1
    assert len(hapi.attempts) >= 2 and all(a.status is None and a.error for a in hapi.attempts)


async def test_retries_produce_duplicates(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    await subscribe(client, hapi, subscription(receiver.endpoint))
    receiver.fail_first = 1  # the receiver stored it, then answered 500
    await hapi.create({"resourceType": "Patient", "id": "p-dup"})
    await hapi.wait_idle()
    assert receiver.versions("/fhir/Patient/p-dup") == ["1", "1"]
    # A slow 2xx: HAPI's client times out, retries, and the receiver sees it twice.
    hapi.delivery.timeout = 0.1
    hapi.delivery._client = None  # pick up the new timeout
    receiver.stall_first, receiver.stall = 1, 0.3
    await hapi.update({"resourceType": "Patient", "id": "p-dup", "gender": "other"})
    await hapi.wait_idle()
    await asyncio.sleep(0.3)  # let the stalled request finish
    assert receiver.versions("/fhir/Patient/p-dup") == ["1", "1", "2", "2"]
    assert hapi.delivered == 2 and hapi.dropped == 0


async def test_deliver_latest_version_rereads_and_skips_deleted(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    await subscribe(client, hapi, subscription(receiver.endpoint, extensions=(EXT_DELIVER_LATEST,)))
    hapi.pause_delivery()
    await hapi.create({"resourceType": "Patient", "id": "p-l"})
    await hapi.update({"resourceType": "Patient", "id": "p-l", "gender": "male"})
    await hapi.create({"resourceType": "Patient", "id": "p-gone"})
    await hapi.delete("Patient", "p-gone")
    hapi.resume_delivery()
    await hapi.wait_idle()
    assert receiver.versions("/fhir/Patient/p-l") == ["2", "2"]
    assert receiver.versions("/fhir/Patient/p-gone") == []


async def test_lost_notifications(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    await subscribe(client, hapi, subscription(receiver.endpoint))
    hapi.drop_next(1)
    hapi.drop_when(lambda note: note.resource_id == "p-never")
    for rid in ("p-a", "p-b", "p-never"):
        await hapi.create({"resourceType": "Patient", "id": rid})
    await hapi.wait_idle()
    assert {r.path for r in receiver.requests} == {"/fhir/Patient/p-b"}
    assert hapi.lost == 2


async def test_trigger_subscription_redelivers_as_put(
    hapi: StandInHapi, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    for rid, gender in (("p-t1", "male"), ("p-t2", "female"), ("p-t3", "male")):
        await hapi.create({"resourceType": "Patient", "id": rid, "gender": gender})
    sid = await subscribe(client, hapi, subscription(receiver.endpoint))
    assert receiver.requests == []
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "resourceId", "valueUri": "Patient/p-t2"},
            {"name": "searchUrl", "valueString": "Patient?gender=male"},
        ],
    }
    response = await client.post(f"/Subscription/{sid}/$trigger-subscription", json=params)
    assert response.status_code == 200 and response.json()["resourceType"] == "Parameters"
    await hapi.wait_idle()
    assert sorted((r.method, r.path) for r in receiver.requests) == [
        ("PUT", "/fhir/Patient/p-t1"),
        ("PUT", "/fhir/Patient/p-t2"),
        ("PUT", "/fhir/Patient/p-t3"),
    ]


# -- reading back -------------------------------------------------------------------------------


async def test_search_cache_returns_stale_results_unless_no_cache(
    hapi: StandInHapi, client: httpx.AsyncClient
) -> None:
    await hapi.create({"resourceType": "Patient", "id": "p-s1"})
    url = "/Patient?_lastUpdated=gt2000-01-01&_sort=_lastUpdated&_count=50"
    first = (await client.get(url)).json()
    await hapi.create({"resourceType": "Patient", "id": "p-s2"})
    stale = (await client.get(url)).json()
    fresh = (await client.get(url, headers=NO_CACHE)).json()
    assert [e["resource"]["id"] for e in first["entry"]] == ["p-s1"]
    assert [e["resource"]["id"] for e in stale["entry"]] == ["p-s1"]
    assert [e["resource"]["id"] for e in fresh["entry"]] == ["p-s1", "p-s2"]
    hapi.search_cache_seconds = 0.05
    await hapi.create({"resourceType": "Patient", "id": "p-s3"})
    await asyncio.sleep(0.06)
    expired = (await client.get(url)).json()
    assert len(expired["entry"]) == 3


async def test_search_filters_and_paging(hapi: StandInHapi, client: httpx.AsyncClient) -> None:
    for n in range(5):
        await hapi.create({"resourceType": "Patient", "id": f"p-{n}", "gender": "male"})
    await hapi.create({"resourceType": "Patient", "id": "p-f", "gender": "female"})
    page = (await client.get("/Patient?gender=male&_count=2&_sort=-_lastUpdated")).json()
    seen: list[str] = []
    while True:
        seen += [e["resource"]["id"] for e in page.get("entry", [])]
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            break
        page = (await client.get(nxt[0])).json()
    assert seen == ["p-4", "p-3", "p-2", "p-1", "p-0"]
    by_id = (await client.get("/Patient?_id=p-1,p-f", headers=NO_CACHE)).json()
    assert sorted(e["resource"]["id"] for e in by_id["entry"]) == ["p-1", "p-f"]
    last = hapi.resources[("Patient", "p-3")].resource
    assert last is not None
    bad = await client.get(f"/Patient?_lastUpdated=gt{last['meta']['lastUpdated']}")
    assert bad.status_code == 400  # an unencoded '+' is a space: not an instant
    since = {"_lastUpdated": f"gt{last['meta']['lastUpdated']}"}
    newer = (await client.get("/Patient", params=since)).json()
    assert sorted(e["resource"]["id"] for e in newer["entry"]) == ["p-4", "p-f"]


async def test_history_is_newest_first_with_deletes_and_paging(
    hapi: StandInHapi, client: httpx.AsyncClient
) -> None:
    await hapi.create({"resourceType": "Patient", "id": "p-h1"})
    await hapi.update({"resourceType": "Patient", "id": "p-h1", "gender": "male"})
    await hapi.create({"resourceType": "Observation", "id": "o-h", "status": "final"})
    # Stamps have millisecond resolution and _since is inclusive: keep `since` off them.
    await asyncio.sleep(0.003)
    since = hapi.now()
    await asyncio.sleep(0.003)
    await hapi.create({"resourceType": "Patient", "id": "p-h2"})
    await hapi.delete("Patient", "p-h1")

    response = await client.get("/_history?_count=2")
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert "date" in response.headers
    entries: list[dict[str, Any]] = []
    page = response.json()
    while True:
        assert page["type"] == "history" and "total" not in page
        entries += page.get("entry", [])
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            break
        page = (await client.get(nxt[0])).json()
    summary = [(e["request"]["method"], e["fullUrl"].split("/fhir/")[1]) for e in entries]
    assert summary == [
        ("DELETE", "Patient/p-h1"),
        ("POST", "Patient/p-h2"),
        ("POST", "Observation/o-h"),
        ("PUT", "Patient/p-h1"),
        ("POST", "Patient/p-h1"),
    ]
    deletion = entries[0]
    assert "resource" not in deletion
    assert deletion["response"]["etag"] == 'W/"3"' and deletion["response"]["lastModified"]
    stamps = [e["response"]["lastModified"] for e in entries]
    assert stamps == sorted(stamps, reverse=True) and len(set(stamps)) == len(stamps)

    typed = (await client.get("/Patient/_history", params={"_since": since})).json()
    assert [e["fullUrl"].split("/fhir/")[1] for e in typed["entry"]] == [
        "Patient/p-h1",
        "Patient/p-h2",
    ]
    instance = (await client.get("/Patient/p-h1/_history")).json()
    assert [e["response"]["etag"] for e in instance["entry"]] == ['W/"3"', 'W/"2"', 'W/"1"']


async def test_read_vread_and_error_statuses(hapi: StandInHapi, client: httpx.AsyncClient) -> None:
    await hapi.create({"resourceType": "Patient", "id": "p-r"})
    await hapi.update({"resourceType": "Patient", "id": "p-r", "gender": "male"})
    old = await client.get("/Patient/p-r/_history/1")
    assert old.status_code == 200 and "gender" not in old.json()
    assert old.headers["etag"] == 'W/"1"'
    await hapi.delete("Patient", "p-r")
    assert (await client.get("/Patient/p-r")).status_code == 410
    assert (await client.get("/Patient/nope")).status_code == 404
    assert (await client.get("/Nonsense/x")).status_code == 404
    patch = await client.patch("/Patient/p-r", json={})
    assert patch.status_code == 400 and patch.json()["resourceType"] == "OperationOutcome"
    assert "date" in patch.headers
    assert (
        await client.put("/Patient/123", json={"resourceType": "Patient", "id": "123"})
    ).status_code == 400
    assert (
        await client.put("/Patient/a", json={"resourceType": "Patient", "id": "b"})
    ).status_code == 400
    assert (await client.post("/Patient", content=b"{not json")).status_code == 400
    stale = await client.put(
        "/Patient/p-r", json={"resourceType": "Patient", "id": "p-r"}, headers={"If-Match": 'W/"1"'}
    )
    assert stale.status_code == 412
    revived = await client.put("/Patient/p-r", json={"resourceType": "Patient", "id": "p-r"})
    assert revived.status_code == 201 and revived.json()["meta"]["versionId"] == "4"
    with pytest.raises(StandInError) as gone:
        await hapi.read("Patient", "missing")
    assert gone.value.status_code == 404


async def test_versions_clock_and_truth_view(hapi: StandInHapi) -> None:
    first = await hapi.create({"resourceType": "Patient", "gender": "male"})
    assert first["id"].isdigit() and first["meta"]["versionId"] == "1"
    same = await hapi.update({**first, "meta": {}})
    assert same["meta"]["versionId"] == "1"  # a no-op update makes no version
    stamps = []
    for n in range(20):
        stored = await hapi.update(
            {"resourceType": "Patient", "id": "p-v", "birthDate": f"19{n:02d}"}
        )
        stamps.append(stored["meta"]["lastUpdated"])
    assert stamps == sorted(stamps) and len(set(stamps)) == 20
    assert stamps[0].endswith("+00:00") and len(stamps[0].split(".")[1]) == 9  # ms + offset
    await hapi.delete({"resourceType": "Patient", "id": "p-v"})
    truth = hapi.resources
    assert truth[("Patient", "p-v")] == (21, True, None)
    version, deleted, resource = truth[("Patient", first["id"])]
    assert (version, deleted, resource and resource["gender"]) == (1, False, "male")


def test_threaded_variant_serves_and_runs_coroutines() -> None:
    hapi = StandInHapi()
    with serve_standin_in_thread(hapi) as handle:
        handle.call(hapi.create({"resourceType": "Patient", "id": "p-th"}))
        with httpx.Client(trust_env=False) as sync_client:
            response = sync_client.get(f"{handle.base_url}/Patient/p-th")
        assert response.status_code == 200
        assert response.json()["meta"]["versionId"] == "1"
    assert handle.base_url.startswith("http://127.0.0.1:")
