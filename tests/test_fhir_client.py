"""The FHIR client against a mocked HAPI (respx): retries, errors, paging, history."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import respx

from core.errors import FhirFatalError, FhirTemporaryError
from subscriptions.fhir_client import FhirClient, history_entry, parse_retry_after

BASE = "http://hapi.test/fhir"


def outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
    }


def bundle(entries: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "self", "url": BASE}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    # `total` deliberately wrong: the client must never trust it.
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 1,
        "link": links,
        "entry": entries,
    }


def patient(pid: str, version: str = "1") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"versionId": version, "lastUpdated": "2026-01-01T00:00:00.000+00:00"},
    }


@pytest.fixture
def hapi() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


@pytest.fixture
async def fhir() -> AsyncIterator[FhirClient]:
    async with FhirClient(BASE, max_retries=3, backoff_initial=0.01, backoff_max=0.05) as client:
        yield client


async def test_retries_503_then_succeeds(hapi: respx.MockRouter, fhir: FhirClient) -> None:
    route = hapi.get("/Patient/1").mock(
        side_effect=[
            httpx.Response(503, json=outcome("busy")),
            httpx.Response(502),
            httpx.Response(200, json=patient("1")),
        ]
    )
    assert (await fhir.read("Patient", "1"))["id"] == "1"
    assert route.call_count == 3


async def test_retry_after_seconds_is_honoured(hapi: respx.MockRouter, fhir: FhirClient) -> None:
    route = hapi.get("/Patient/1").mock(
        side_effect=[
            httpx.Response(429, headers={"Retry-After": "0.3"}),
            httpx.Response(200, json=patient("1")),
        ]
    )
    started = time.monotonic()
    await fhir.read("Patient", "1")
    assert time.monotonic() - started >= 0.3
    assert route.call_count == 2


async def test_retry_after_http_date_is_honoured(hapi: respx.MockRouter, fhir: FhirClient) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    route = hapi.get("/Patient/1").mock(
        side_effect=[
            httpx.Response(
                503,
                headers={
                    "Date": format_datetime(now, usegmt=True),
                    "Retry-After": format_datetime(now + timedelta(seconds=1), usegmt=True),
                },
            ),
            httpx.Response(200, json=patient("1")),
        ]
    )
    started = time.monotonic()
    await fhir.read("Patient", "1")
    # Measured against HAPI's own Date header, not our clock: one full second.
    assert time.monotonic() - started >= 0.9
    assert route.call_count == 2


async def test_retry_after_is_capped(hapi: respx.MockRouter) -> None:
    hapi.get("/Patient/1").mock(
        side_effect=[
            httpx.Response(503, headers={"Retry-After": "3600"}),
            httpx.Response(200, json=patient("1")),
        ]
    )
    async with FhirClient(BASE, retry_after_max=0.05) as client:
        started = time.monotonic()
        await client.read("Patient", "1")
        assert time.monotonic() - started < 2


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("5") == 5
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:10 GMT", now) == 10
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize("status", [400, 404, 410, 422])
async def test_no_retry_on_client_errors(
    hapi: respx.MockRouter, fhir: FhirClient, status: int
) -> None:
    route = hapi.post("/Subscription").mock(
        return_value=httpx.Response(status, json=outcome(f"Invalid criteria {status}"))
    )
    with pytest.raises(FhirFatalError) as info:
        await fhir.create({"resourceType": "Subscription", "status": "requested"})
    assert route.call_count == 1
    assert info.value.status_code == status
    assert f"Invalid criteria {status}" in str(info.value)


async def test_outcome_issues_are_joined(hapi: respx.MockRouter, fhir: FhirClient) -> None:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "invalid", "diagnostics": "first problem"},
            {"severity": "error", "code": "invalid", "details": {"text": "second problem"}},
        ],
    }
    hapi.put("/Patient/1").mock(return_value=httpx.Response(422, json=body))
    with pytest.raises(FhirFatalError, match="first problem; second problem"):
        await fhir.update(patient("1"))


async def test_connection_errors_retried_then_temporary_error(
    hapi: respx.MockRouter, fhir: FhirClient
) -> None:
    route = hapi.get("/Patient/1").mock(side_effect=httpx.ConnectError("connection refused"))
    with pytest.raises(FhirTemporaryError, match="cannot be reached"):
        await fhir.read("Patient", "1")
    assert route.call_count == 4  # the first try and max_retries=3 more


async def test_connection_error_then_success(hapi: respx.MockRouter, fhir: FhirClient) -> None:
    route = hapi.get("/Patient/1").mock(
        side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, json=patient("1"))]
    )
    assert (await fhir.read("Patient", "1"))["id"] == "1"
    assert route.call_count == 2


async def test_5xx_exhausted_carries_outcome_text(hapi: respx.MockRouter, fhir: FhirClient) -> None:
    hapi.get("/Patient/1").mock(return_value=httpx.Response(500, json=outcome("HAPI-0389 boom")))
    with pytest.raises(FhirTemporaryError, match="HAPI-0389 boom") as info:
        await fhir.read("Patient", "1")
    assert info.value.status_code == 500


async def test_post_is_not_repeated_after_a_read_timeout(
    hapi: respx.MockRouter, fhir: FhirClient
) -> None:
    route = hapi.post("/Patient").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(FhirTemporaryError):
        await fhir.create({"resourceType": "Patient"})
    assert route.call_count == 1


async def test_search_follows_next_links_over_three_pages(
    hapi: respx.MockRouter, fhir: FhirClient
) -> None:
    first = hapi.get("/Patient", params={"gender": "male"}).mock(
        return_value=httpx.Response(
            200,
            json=bundle(
                [{"resource": patient("1"), "search": {"mode": "match"}}],
                f"{BASE}?_getpages=abc&_getpagesoffset=1&_count=1",
            ),
        )
    )
    hapi.get("", params={"_getpages": "abc", "_getpagesoffset": "1"}).mock(
        return_value=httpx.Response(
            200,
            json=bundle(
                [
                    {"resource": patient("2"), "search": {"mode": "match"}},
                    {
                        "resource": {"resourceType": "Organization", "id": "o"},
                        "search": {"mode": "include"},
                    },
                ],
                # HAPI names itself by the host it was configured with: followed on ours.
                "http://hapi-internal:8080/fhir?_getpages=abc&_getpagesoffset=2&_count=1",
            ),
        )
    )
    hapi.get("", params={"_getpages": "abc", "_getpagesoffset": "2"}).mock(
        return_value=httpx.Response(200, json=bundle([{"resource": patient("3")}]))
    )
    ids = [r["id"] async for r in fhir.search("Patient", {"gender": "male"})]
    assert ids == ["1", "2", "3"]
    request = first.calls.last.request
    assert request.headers["Cache-Control"] == "no-cache"
    assert request.headers["Accept"] == "application/fhir+json"
    for call in hapi.calls:
        assert call.request.headers["Cache-Control"] == "no-cache"
        assert call.request.url.host == "hapi.test"


async def test_search_stops_on_a_repeated_next_link(
    hapi: respx.MockRouter, fhir: FhirClient
) -> None:
    hapi.get("/Patient").mock(
        return_value=httpx.Response(200, json=bundle([{"resource": patient("1")}], f"{BASE}/loop"))
    )
    hapi.get("/loop").mock(
        return_value=httpx.Response(200, json=bundle([{"resource": patient("2")}], f"{BASE}/loop"))
    )
    ids = [r["id"] async for r in fhir.search("Patient")]
    assert ids == ["1", "2"]


async def test_history_pages_with_deletes(hapi: respx.MockRouter, fhir: FhirClient) -> None:
    date = "Tue, 06 Jan 2026 10:00:00 GMT"
    page1 = {
        "resourceType": "Bundle",
        "type": "history",
        "link": [{"relation": "next", "url": f"{BASE}?_getpages=h&_getpagesoffset=2"}],
        "entry": [
            {
                "fullUrl": f"{BASE}/Patient/1/_history/3",
                "request": {"method": "DELETE", "url": "Patient/1/_history/3"},
                "response": {
                    "status": "204",
                    "etag": 'W/"3"',
                    "lastModified": "2026-01-06T09:59:00.000+00:00",
                },
            },
            {
                "fullUrl": f"{BASE}/Patient/1",
                "resource": patient("1", "2"),
                "request": {"method": "PUT", "url": "Patient/1"},
            },
        ],
    }
    page2 = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {
                "fullUrl": f"{BASE}/Observation/o1",
                "resource": {"resourceType": "Observation", "id": "o1", "meta": {"versionId": "1"}},
                "request": {"method": "POST", "url": "Observation"},
            }
        ],
    }
    first = hapi.get("/_history").mock(
        return_value=httpx.Response(200, json=page1, headers={"Date": date})
    )
    hapi.get("", params={"_getpages": "h"}).mock(
        return_value=httpx.Response(200, json=page2, headers={"Date": date})
    )
    pages = [p async for p in fhir.history(None, since="2026-01-01T00:00:00Z", count=2)]
    assert len(pages) == 2
    deleted, updated = pages[0].entries
    assert (deleted.resource_type, deleted.id, deleted.version_id) == ("Patient", "1", "3")
    assert deleted.deleted and deleted.resource is None and deleted.raw is None
    assert deleted.last_updated == "2026-01-06T09:59:00.000+00:00"
    assert (updated.version_id, updated.deleted) == ("2", False)
    assert updated.raw is not None and b'"Patient"' in updated.raw
    assert pages[1].entries[0].resource_type == "Observation"
    assert pages[0].server_date == datetime(2026, 1, 6, 10, 0, tzinfo=UTC)
    assert fhir.server_date() == datetime(2026, 1, 6, 10, 0, tzinfo=UTC)
    request = first.calls.last.request
    assert request.url.params["_since"] == "2026-01-01T00:00:00Z"
    assert request.url.params["_count"] == "2"
    assert request.headers["Cache-Control"] == "no-cache"


async def test_type_history_path(hapi: respx.MockRouter, fhir: FhirClient) -> None:
    route = hapi.get("/Condition/_history").mock(
        return_value=httpx.Response(200, json={"resourceType": "Bundle", "type": "history"})
    )
    pages = [p async for p in fhir.history("Condition", None, 50)]
    assert pages[0].entries == [] and pages[0].next_url is None
    assert "_since" not in route.calls.last.request.url.params


def test_history_entry_without_resource_is_a_delete() -> None:
    entry = history_entry({"fullUrl": f"{BASE}/Condition/c9/_history/7"})
    assert entry is not None
    assert (entry.resource_type, entry.id, entry.version_id, entry.deleted) == (
        "Condition",
        "c9",
        "7",
        True,
    )
    assert history_entry({"request": {"method": "GET"}}) is None


async def test_latest_version(hapi: respx.MockRouter, fhir: FhirClient) -> None:
    route = hapi.get("/Patient/1/_history").mock(
        return_value=httpx.Response(
            200,
            json={
                "resourceType": "Bundle",
                "type": "history",
                "total": 99,
                "entry": [
                    {
                        "request": {"method": "DELETE", "url": "Patient/1/_history/4"},
                        "response": {"etag": 'W/"4"', "lastModified": "2026-01-02T00:00:00Z"},
                    }
                ],
            },
        )
    )
    hapi.get("/Patient/nope/_history").mock(
        return_value=httpx.Response(
            404, json=outcome("HAPI-2001: Resource Patient/nope is not known")
        )
    )
    assert await fhir.latest_version("Patient", "1") == ("4", "2026-01-02T00:00:00Z", True)
    assert route.calls.last.request.url.params["_count"] == "1"
    assert route.calls.last.request.headers["Cache-Control"] == "no-cache"
    assert await fhir.latest_version("Patient", "nope") is None


async def test_bodies_carry_fhir_content_type(hapi: respx.MockRouter, fhir: FhirClient) -> None:
    route = hapi.post("/Patient").mock(
        return_value=httpx.Response(201, headers={"Location": f"{BASE}/Patient/77/_history/1"})
    )
    created = await fhir.create({"resourceType": "Patient"})
    assert created["id"] == "77" and created["meta"]["versionId"] == "1"
    request = route.calls.last.request
    assert request.headers["Content-Type"].startswith("application/fhir+json")
    assert request.headers["Accept"] == "application/fhir+json"
    assert "Cache-Control" not in request.headers


async def test_delete_reports_missing(hapi: respx.MockRouter, fhir: FhirClient) -> None:
    hapi.delete("/Patient/1").mock(return_value=httpx.Response(204))
    hapi.delete("/Patient/2").mock(return_value=httpx.Response(404, json=outcome("not known")))
    assert await fhir.delete("Patient", "1") is True
    assert await fhir.delete("Patient", "2") is False


async def test_uses_a_given_client_and_leaves_it_open(hapi: respx.MockRouter) -> None:
    hapi.get("/metadata").mock(
        return_value=httpx.Response(200, json={"resourceType": "CapabilityStatement"})
    )
    async with httpx.AsyncClient() as http:
        async with FhirClient(BASE, client=http) as fhir:
            assert (await fhir.get("metadata"))["resourceType"] == "CapabilityStatement"
        assert not http.is_closed
