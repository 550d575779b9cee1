"""The status page against real Redis and PostgreSQL: values shown, escaping, auth, failures."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette

from core.errors import InvalidResource, Issue
from core.metrics import Metrics
from core.settings import Settings
from core.store import HOURLY_KEY, SpeedStore
from receiver.ingest import ingest
from serving.api import create_app
from serving.batch import SCHEMA_SQL
from serving.status import (
    StatusData,
    SubscriptionCache,
    SubscriptionsStatus,
    format_age,
    gather_status,
    read_batch_watermark,
    render_status,
    status_route,
    update_gauges,
)
from subscriptions.bootstrap import desired_subscription
from subscriptions.fhir_client import FhirClient
from tests.asgi import running
from tests.conftest import empty_redis, redis_db

BATCH_WATERMARK = "2026-11-24T02:00:00.000+00:00"
# Its own Redis database (db 9 is flushed by other modules' tests, 10 and 11 are taken), so
# these page checks hold while other test runs share the server.
STATUS_REDIS_URL = redis_db(12)


def isolated_redis() -> contextlib.AbstractAsyncContextManager[aioredis.Redis]:
    """A client of the status tests' own Redis database, empty before and after."""
    return empty_redis(STATUS_REDIS_URL)


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    async with isolated_redis() as client:
        yield client


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, redis_url=STATUS_REDIS_URL)


# -- helpers shared with the browser test -------------------------------------------------


class Page(HTMLParser):
    """The parts of the page a test reads: text by element id, chart bars, table rows."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.bars: list[dict[str, str]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._open: list[tuple[str, str | None]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "rect" and "bar" in values.get("class", "").split():
            self.bars.append(values)
        if tag == "table":
            self._table = values.get("id", "")
            self.tables[self._table] = []
        if tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        if tag in ("td", "th") and self._table is not None:
            self._cell = []
        if tag not in ("meta", "br", "line", "link"):
            self._open.append((tag, values.get("id")))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table is not None and self._cell is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        if tag == "table":
            self._table = None
        while self._open:
            opened, _ = self._open.pop()
            if opened == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open:
            if element_id:
                self.by_id[element_id] = self.by_id.get(element_id, "") + data
        if self._cell is not None:
            self._cell.append(data)

    def text(self, element_id: str) -> str:
        return " ".join(self.by_id.get(element_id, "").split())

    def rows(self, table_id: str) -> list[list[str]]:
        return self.tables.get(table_id, [])[1:]  # without the header row


def basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def status_app(settings: Settings, *, insecure: bool = False) -> Starlette:
    """The query API with the status page, as `researchflow serve` builds it."""
    return create_app(settings, insecure=insecure, extra_routes=[status_route(settings)])


def patient(resource_id: str, version: str, last_updated: str, **extra: Any) -> bytes:
    body = {
        "resourceType": "Patient",
        "id": resource_id,
        "meta": {"versionId": version, "lastUpdated": last_updated},
        "gender": "female",
        **extra,
    }
    return json.dumps(body).encode()


def condition(resource_id: str, patient_id: str) -> bytes:
    body = {
        "resourceType": "Condition",
        "id": resource_id,
        "meta": {"versionId": "1", "lastUpdated": "2026-11-25T10:00:00Z"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
    }
    return json.dumps(body).encode()


async def fill(store: SpeedStore, database_url: str, *, poller_lag: timedelta) -> None:
    """Three Patients, two Conditions, a real reject, a hostile reject, missed counts,
    an older hour's changes, the poller watermark and a batch watermark row."""
    await store.mark_epoch()
    for n in range(3):
        await ingest(store, patient(f"p{n}", "1", "2026-11-25T09:00:00Z"))
    for n in range(2):
        await ingest(store, condition(f"c{n}", "p0"))
    with pytest.raises(InvalidResource):
        # The body holds a name; a reject must never show it.
        await ingest(
            store,
            patient("bad1", "2", "2026-11-25T09:00:00Z", gender=17, name=[{"family": "Secretson"}]),
        )
    await store.record_reject(
        "Observation",
        "evil",
        "1",
        [Issue(code="invalid", diagnostics="<script>alert('x')</script>", expression="a<b")],
    )
    await store.count_missed(4)
    await store.flush_stats()  # the store batches its statistics (at most one flush a second)
    labels = [label for label, _ in await store.hourly_changes(24)]
    await store.client.hset(HOURLY_KEY, labels[20], 9)
    watermark = datetime.now(UTC) - poller_lag
    await store.set_poller_watermark(watermark.isoformat(timespec="milliseconds"))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL)
        conn.execute(
            "INSERT INTO rf_batch.watermark (id, watermark, refreshed_at, resources)"
            " VALUES (1, %s, now(), 1234)",
            (BATCH_WATERMARK,),
        )


def expected_hours(hourly: list[tuple[str, int]]) -> dict[str, str]:
    return {label: str(count) for label, count in hourly}


def check_page(page: Page, hourly: list[tuple[str, int]]) -> None:
    """What a filled speed layer (see `fill`) must show; used by the browser test too."""
    assert len(page.bars) == 24
    assert {b["data-hour"]: b["data-count"] for b in page.bars} == expected_hours(hourly)
    counts = [int(b["data-count"]) for b in page.bars]
    assert counts[20] == 9 and counts[23] == 5  # the older hour; 3 Patients + 2 Conditions now
    assert page.text("changes-total") == "14"
    assert dict((r[0], r[1]) for r in page.rows("types")) == {"Condition": "2", "Patient": "3"}
    assert page.text("missed") == "4"
    assert page.text("reject-total") == "2"
    assert page.text("batch-watermark") == BATCH_WATERMARK
    assert page.text("batch-resources") == "1234"
    assert page.text("batch-age").endswith("h") or "d" in page.text("batch-age")
    assert page.text("poller-lag") == "1 min"
    rejects = page.rows("rejects")
    assert [r[:2] for r in rejects] == [["Observation", "evil"], ["Patient", "bad1"]]
    assert "<script>alert('x')</script>" in rejects[0][2]  # shown as text, not markup
    assert "gender" in rejects[1][2]


# -- the page ---------------------------------------------------------------------------------


async def test_page_shows_every_section(store: SpeedStore, settings: Settings) -> None:
    await fill(store, settings.database_url, poller_lag=timedelta(seconds=90))
    hourly = await store.hourly_changes(24)
    async with running(status_app(settings)) as client:
        response = await client.get("/status", headers={"Authorization": "Bearer serve-token"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    assert "script-src" not in response.headers["content-security-policy"]
    page = Page(response.text)
    check_page(page, hourly)
    assert "complete" in response.text  # epoch marker present
    # HAPI is not reachable in these tests (FHIR_BASE_URL is port 1): shown, not a 500.
    assert "HAPI unreachable:" in page.text("subscriptions")


async def test_page_escapes_everything_and_shows_no_resource_content(
    store: SpeedStore, settings: Settings
) -> None:
    await fill(store, settings.database_url, poller_lag=timedelta(seconds=90))
    async with running(status_app(settings)) as client:
        response = await client.get("/status", headers={"Authorization": "Bearer serve-token"})
    text = response.text
    assert "<script" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "a&lt;b" in text
    assert "Secretson" not in text
    assert "44054006" not in text


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 401),
        ({"Authorization": "Bearer serve-token"}, 200),
        ({"Authorization": "Bearer second"}, 200),
        ({"Authorization": "Bearer wrong"}, 401),
        (basic("anyone", "serve-token"), 200),
        (basic("", "second"), 200),
        (basic("anyone", "wrong"), 401),
        (basic("serve-token", ""), 401),  # the token is the password, not the user name
        ({"Authorization": "Basic !!!not-base64"}, 401),
        ({"Authorization": "Digest serve-token"}, 401),
    ],
)
async def test_auth(
    store: SpeedStore, settings: Settings, headers: dict[str, str], expected: int
) -> None:
    settings = Settings(**{**settings.__dict__, "serving_tokens": ("serve-token", "second")})
    async with running(status_app(settings)) as client:
        response = await client.get("/status", headers=headers)
    assert response.status_code == expected
    if expected == 401:
        assert response.headers["www-authenticate"].startswith('Basic realm="ResearchFlow"')
        assert "serve-token" not in response.text


async def test_insecure_needs_no_credentials(store: SpeedStore, settings: Settings) -> None:
    async with running(status_app(settings, insecure=True)) as client:
        response = await client.get("/status")
    assert response.status_code == 200
    assert "ResearchFlow status" in response.text


async def test_empty_deployment(store: SpeedStore, settings: Settings) -> None:
    async with running(status_app(settings)) as client:
        response = await client.get("/status", headers={"Authorization": "Bearer serve-token"})
    page = Page(response.text)
    assert response.status_code == 200
    assert [b["data-count"] for b in page.bars] == ["0"] * 24
    assert page.text("batch-watermark") == "never refreshed"
    assert page.text("poller-watermark") == "never polled"
    assert page.text("poller-lag") == "unknown"
    assert "no epoch marker" in response.text
    assert "No rejects." in response.text


# -- failing dependencies --------------------------------------------------------------------


async def test_postgres_and_hapi_down_still_render(store: SpeedStore, settings: Settings) -> None:
    await fill(store, settings.database_url, poller_lag=timedelta(minutes=5))
    down = Settings(**{**settings.__dict__, "database_url": "postgresql://127.0.0.1:1/none"})
    async with running(status_app(down)) as client:
        response = await client.get("/status", headers={"Authorization": "Bearer serve-token"})
    assert response.status_code == 200
    page = Page(response.text)
    assert "PostgreSQL unreachable: " in page.text("batch")
    assert "HAPI unreachable:" in page.text("subscriptions")
    assert page.text("missed") == "4"  # the speed-layer sections are unaffected
    assert page.text("poller-lag") == "5 min"


async def test_redis_down_still_renders(settings: Settings) -> None:
    down = Settings(**{**settings.__dict__, "redis_url": "redis://127.0.0.1:1/0"})
    async with running(status_app(down)) as client:
        response = await client.get("/status", headers={"Authorization": "Bearer serve-token"})
    assert response.status_code == 200
    assert "Redis unreachable:" in Page(response.text).text("speed")
    assert Page(response.text).text("batch-watermark") == "never refreshed"


# -- Subscriptions ---------------------------------------------------------------------------


class FakeHapi:
    """HAPI's Subscription search, counting requests."""

    def __init__(self, settings: Settings, *, fail: bool = False) -> None:
        self.settings = settings
        self.fail = fail
        self.requests = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.fail:
            return httpx.Response(
                404,
                json={
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "not-found", "diagnostics": "<gone>"}],
                },
            )
        subs = []
        for n, (kind, state) in enumerate([("Patient", "active"), ("Condition", "error")]):
            sub = desired_subscription(self.settings, kind)
            sub.update(id=str(n + 1), status=state)
            if state == "error":
                sub["error"] = "Failed <to> deliver"
            subs.append(sub)
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": s} for s in subs],
        }
        return httpx.Response(200, json=bundle)


async def test_subscriptions_listed_and_cached(store: SpeedStore, settings: Settings) -> None:
    hapi = FakeHapi(settings)
    cache = SubscriptionCache()
    transport = httpx.MockTransport(hapi.handle)
    async with FhirClient(
        "http://hapi.test/fhir", client=httpx.AsyncClient(transport=transport)
    ) as fhir:
        first = await gather_status(settings, store, settings.database_url, fhir, cache=cache)
        second = await gather_status(settings, store, settings.database_url, fhir, cache=cache)
        # Without a client, the cache's last answer is still shown.
        third = await gather_status(settings, store, settings.database_url, None, cache=cache)
    await fhir.aclose()
    assert hapi.requests == 1
    assert first.subscriptions == second.subscriptions == third.subscriptions
    assert [(s.id, s.status) for s in first.subscriptions.rows] == [
        ("2", "error"),
        ("1", "active"),
    ]
    page = Page(render_status(first))
    rows = page.rows("subscription-table")
    assert [r[:3] for r in rows] == [["2", "Condition?", "error"], ["1", "Patient?", "active"]]
    assert rows[0][4] == "Failed <to> deliver"
    assert "Failed &lt;to&gt; deliver" in render_status(first)


async def test_hapi_error_text_shown(store: SpeedStore, settings: Settings) -> None:
    hapi = FakeHapi(settings, fail=True)
    transport = httpx.MockTransport(hapi.handle)
    async with httpx.AsyncClient(transport=transport) as http:
        fhir = FhirClient("http://hapi.test/fhir", client=http, max_retries=0)
        data = await gather_status(settings, store, settings.database_url, fhir)
    assert data.subscriptions.error is not None
    assert data.subscriptions.error.startswith("HAPI unreachable:")
    assert "&lt;gone&gt;" in render_status(data)


async def test_no_client_not_checked(store: SpeedStore, settings: Settings) -> None:
    data = await gather_status(settings, store, settings.database_url, None)
    assert data.subscriptions == SubscriptionsStatus(checked=False)
    assert "Not checked." in render_status(data)


# -- the batch watermark and gauges ------------------------------------------------------------


async def test_batch_watermark_with_pool_and_age(store: SpeedStore, settings: Settings) -> None:
    from psycopg_pool import AsyncConnectionPool

    await fill(store, settings.database_url, poller_lag=timedelta(seconds=5))
    now = datetime(2026, 11, 24, 5, 30, tzinfo=UTC)
    async with AsyncConnectionPool(settings.database_url, min_size=1, open=False) as pool:
        batch = await read_batch_watermark(pool, now)
    assert batch.watermark == BATCH_WATERMARK
    assert batch.resources == 1234
    assert batch.age_seconds == pytest.approx(3.5 * 3600)
    assert batch.refreshed_at is not None and batch.refreshed_at.tzinfo is not None


async def test_batch_schema_without_row(settings: Settings) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL)
    batch = await read_batch_watermark(settings.database_url)
    assert batch.watermark is None and batch.error is None


async def test_update_gauges(store: SpeedStore, settings: Settings) -> None:
    await fill(store, settings.database_url, poller_lag=timedelta(seconds=300))
    metrics = Metrics.create()
    await update_gauges(metrics, store, settings.database_url)
    value = metrics.registry.get_sample_value
    assert value("researchflow_speed_layer_entries", {"resource_type": "Patient"}) == 3
    assert value("researchflow_speed_layer_entries", {"resource_type": "Condition"}) == 2
    assert value("researchflow_poller_lag_seconds") == pytest.approx(300, abs=5)
    expected_age = (
        datetime.now(UTC).timestamp() - datetime.fromisoformat(BATCH_WATERMARK).timestamp()
    )
    assert value("researchflow_batch_watermark_age_seconds") == pytest.approx(expected_age, abs=5)


async def test_update_gauges_tolerates_dependencies_down() -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0")
    try:
        metrics = Metrics.create()
        await update_gauges(metrics, SpeedStore(client), "postgresql://127.0.0.1:1/none")
    finally:
        await client.aclose()
    assert metrics.registry.get_sample_value("researchflow_poller_lag_seconds") == 0


# -- pure rendering --------------------------------------------------------------------------


def test_render_is_self_contained() -> None:
    data = StatusData(
        generated_at=datetime(2026, 11, 25, 14, 0, tzinfo=UTC),
        hourly=tuple((f"2026-11-25T{h:02d}", h) for h in range(24)),
    )
    text = render_status(data)
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text
    assert "<script" not in text
    page = Page(text)
    assert [int(b["data-count"]) for b in page.bars] == list(range(24))
    heights = [float(b["height"]) for b in page.bars]
    assert heights[0] == 0 and heights == sorted(heights) and heights[-1] == max(heights)
    assert page.by_id  # the parser saw the ids


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "unknown"),
        (5, "5 s"),
        (125, "2 min"),
        (3 * 3600 + 300, "3 h 5 min"),
        (2 * 86400 + 4 * 3600, "2 d 4 h"),
    ],
)
def test_format_age(seconds: float | None, text: str) -> None:
    assert format_age(seconds) == text


async def test_speed_layer_disabled(settings: Settings) -> None:
    off = Settings(**{**settings.__dict__, "use_speed_layer": False})
    async with running(status_app(off)) as client:
        response = await client.get("/status", headers={"Authorization": "Bearer serve-token"})
    assert response.status_code == 200
    assert "Disabled (USE_SPEED_LAYER=false)" in Page(response.text).text("speed")
    metrics = Metrics.create()
    await update_gauges(metrics, None, off.database_url)  # logs, never raises
    assert metrics.registry.get_sample_value("researchflow_poller_lag_seconds") == 0
