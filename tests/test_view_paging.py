"""/views/{name}/rows pages by key (the row's resource id and its position within the resource):
each row appears once across pages while the data changes between them (speed-layer writes and
deletes, a real `batch refresh` from the stand-in HAPI that moves rows from the speed layer to
the batch layer), with speed-only and batch rows interleaved. `_count=0` ends paging; a `next`
link never points to the same page.

The reference rows are written out here from each Condition as HAPI holds it, one per coding
(none: one row of nulls), never taken from the serving code under test.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis.strategies as st
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings

from core.settings import Settings
from core.store import SpeedStore
from receiver.ingest import ingest, ingest_deletion
from serving import batch
from serving.api import create_app
from serving.batch_refresh import refresh
from serving.derive import default_deriver
from serving.viewdef import load_view, shipped_views
from subscriptions.standin.hapi import StandInHapi
from subscriptions.standin.run import serve_standin
from tests.asgi import running
from tests.conftest import fresh_database, redis_db
from tests.test_api import api_settings, get, loaded, own_store
from tests.test_cohort import condition, put

__all__ = ["api_settings", "loaded", "own_store"]

PAGING_REDIS_URL = redis_db(13)
AUTH = {"Authorization": "Bearer serve"}
DERIVE = default_deriver()
SYSTEM = "http://snomed.info/sct"

# id, version_id, patient_id, code_system, code, code_display, code_text
Row = tuple[str, str, str | None, str | None, str | None, str | None, str | None]


def reference_rows(resource: dict[str, Any]) -> list[Row]:
    """condition_simple's rows of one Condition, by the ViewDefinition's own description."""
    subject = resource.get("subject", {}).get("reference", "")
    patient = subject.removeprefix("Patient/") if subject.startswith("Patient/") else None
    code = resource.get("code", {})
    head = (resource["id"], resource["meta"]["versionId"], patient)
    codings = code.get("coding") or [{}]
    return [
        (*head, c.get("system"), c.get("code"), c.get("display"), code.get("text")) for c in codings
    ]


def seen_row(row: dict[str, Any]) -> Row:
    return (
        row["id"],
        row["version_id"],
        row["patient_id"],
        row["code_system"],
        row["code"],
        row["code_display"],
        row["code_text"],
    )


def conditions(rid: str, codes: list[str], text: str | None = None) -> dict[str, Any]:
    """A Condition with one coding per code (repeats allowed: identical rows)."""
    code: dict[str, Any] = {}
    if codes:
        code["coding"] = [{"system": SYSTEM, "code": c} for c in codes]
    if text:
        code["text"] = text
    data = {"resourceType": "Condition", "id": rid, "subject": {"reference": f"Patient/p{rid}"}}
    return {**data, "code": code} if code else data


@dataclass
class World:
    """HAPI (the stand-in), the speed layer written as the receiver would, the batch layer
    refreshed from HAPI for real, and one query API app running throughout."""

    hapi: StandInHapi
    store: SpeedStore
    settings: Settings
    client: httpx.AsyncClient
    history: dict[str, set[str | None]] = field(default_factory=dict)  # versions per id
    versions: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    async def write(self, data: dict[str, Any], deliver: bool = True) -> None:
        stored = await self.hapi.update(data)
        self.versions[(stored["id"], stored["meta"]["versionId"])] = stored
        if deliver:  # the notification HAPI pushes, as the receiver writes it
            await ingest(self.store, json.dumps(stored).encode(), derive=DERIVE)
        self.note()

    async def remove(self, rid: str) -> None:
        if ("Condition", rid) not in self.hapi.resources:
            return
        version = await self.hapi.delete("Condition", rid)
        if version is not None:
            await ingest_deletion(
                self.store, "Condition", rid, version_id=str(version), last_updated=self.hapi.now()
            )
        self.note()

    async def refresh(self) -> None:
        await refresh(self.settings, store=self.store)
        self.note()

    def truth(self) -> dict[str, dict[str, Any]]:
        return {
            rid: t.resource
            for (kind, rid), t in self.hapi.resources.items()
            if kind == "Condition" and not t.deleted and t.resource is not None
        }

    def note(self) -> None:
        """Record every Condition's current version (None: absent or deleted)."""
        now = self.truth()
        for rid in {*self.history, *now}:
            held = now.get(rid)
            self.history.setdefault(rid, set()).add(held["meta"]["versionId"] if held else None)

    async def page(self, url: str) -> tuple[list[dict[str, Any]], str | None]:
        response = await self.client.get(url, headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["sources"] == ["batch_layer", "speed_layer"] and not body["degraded"]
        return body["rows"], body["next"]


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database("rf_paging") as url:
        yield url


@contextlib.asynccontextmanager
async def world(database: str) -> AsyncIterator[World]:
    redis_client = aioredis.Redis.from_url(PAGING_REDIS_URL)
    await redis_client.flushdb()
    batch.drop(database)
    batch.init(database)
    hapi = StandInHapi()
    try:
        async with serve_standin(hapi) as fhir_base:
            settings_ = Settings(
                redis_url=PAGING_REDIS_URL,
                database_url=database,
                fhir_base_url=fhir_base,
                serving_tokens=("serve",),
                instance="paging",
            )
            store = SpeedStore(redis_client)
            async with running(create_app(settings_)) as client:
                yield World(hapi, store, settings_, client)
    finally:
        await redis_client.flushdb()
        await redis_client.aclose()


def positions(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for row in rows:
        n = out[-1][1] + 1 if out and out[-1][0] == row["id"] else 1
        out.append((row["id"], n))
    return out


async def test_rows_written_before_the_position_and_a_refresh_between_pages(
    database: str,
) -> None:
    async with world(database) as w:
        for n in (2, 4, 6, 8):
            await w.write(conditions(f"c{n}", ["A", "B"]), deliver=False)
        await w.refresh()  # c2 c4 c6 c8 in the batch layer, two rows each
        await w.store.mark_epoch()
        await w.write(conditions("c5", ["A", "B", "C"]))  # speed only, between batch rows
        await w.write(conditions("c4", ["A", "B", "C"]))  # a newer c4 in the speed layer
        url = "/views/condition_simple/rows?_count=3"
        rows, url2 = await w.page(url)
        assert [(r["id"], r["code"]) for r in rows] == [("c2", "A"), ("c2", "B"), ("c4", "A")]
        assert url2 is not None and url2 != url
        # Rows land before the position: with an offset, c2's second row would come again.
        await w.write(conditions("c1", ["A", "B"]))
        await w.write(conditions("c3", ["A"]))
        rows2, url3 = await w.page(url2)
        assert [(r["id"], r["code"]) for r in rows2] == [("c4", "B"), ("c4", "C"), ("c5", "A")]
        # A refresh moves c4 and c5 (and c1, c3) into the batch layer between pages.
        await w.refresh()
        assert await w.store.get("Condition", "c5") is None  # trimmed: now a batch row
        assert url3 is not None
        rows3, url4 = await w.page(url3)
        assert [(r["id"], r["code"]) for r in rows3] == [("c5", "B"), ("c5", "C"), ("c6", "A")]
        await w.remove("c6")  # the resource the client is inside goes
        rows4, url5 = await w.page(url4 or "")
        assert [(r["id"], r["code"]) for r in rows4] == [("c8", "A"), ("c8", "B")]
        assert url5 is None


@st.composite
def content(draw: st.DrawFn, rid: str) -> dict[str, Any]:
    codes = draw(st.lists(st.sampled_from(["A", "B", "C"]), max_size=3))  # repeats: same rows
    text = draw(st.sampled_from([None, "Diabetes", "=1+1"]))
    return conditions(rid, codes, text)


IDS = [f"c{n:02d}" for n in range(12)]
Change = tuple[str, str, dict[str, Any] | None]  # ("write"|"delete"|"refresh", id, content)


@st.composite
def changes(draw: st.DrawFn, low: int, high: int) -> list[Change]:
    out: list[Change] = []
    for _ in range(draw(st.integers(low, high))):
        kind = draw(st.sampled_from(["write", "write", "write", "delete", "refresh"]))
        rid = draw(st.sampled_from(IDS))
        out.append((kind, rid, draw(content(rid)) if kind == "write" else None))
    return out


async def apply(w: World, change: Change) -> None:
    kind, rid, data = change
    if kind == "write" and data is not None:
        await w.write(data)
    elif kind == "delete":
        await w.remove(rid)
    elif kind == "refresh":
        await w.refresh()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    night=st.lists(st.sampled_from(IDS).flatmap(content), max_size=10),
    morning=changes(0, 8),
    between=st.lists(changes(0, 3), min_size=12, max_size=12),
    count=st.integers(1, 4),
    code=st.sampled_from([None, "A"]),
)
@pytest.mark.timeout(600)
async def test_each_row_once_across_pages_while_data_changes(
    database: str,
    night: list[dict[str, Any]],
    morning: list[Change],
    between: list[list[Change]],
    count: int,
    code: str | None,
) -> None:
    async with world(database) as w:
        for data in night:
            await w.write(data, deliver=False)
        await w.refresh()  # last night's batch
        await w.store.mark_epoch()
        for change in morning:  # today's notifications: speed-only, overriding, tombstones
            await apply(w, change)
        w.history = {rid: set() for rid in IDS}
        w.note()  # what the client may see starts here
        url: str | None = f"/views/condition_simple/rows?_count={count}"
        if code:
            url += f"&code={code}"
        seen: list[dict[str, Any]] = []
        pages = 0
        while url is not None:
            rows, following = await w.page(url)
            assert len(rows) <= count and (rows or following is None)
            assert following != url  # never a link to the same page
            seen.extend(rows)
            pages += 1
            assert pages <= 60, "paging does not end"
            for change in between[pages - 1] if pages <= len(between) else []:
                await apply(w, change)
            url = following

    # Keys only move forward: (id, position) in byte order of ids.
    ids = [r["id"] for r in seen]
    assert ids == sorted(ids, key=lambda i: i.encode())
    by_version: dict[tuple[str, str], collections.Counter[Row]] = {}
    for row in seen:
        by_version.setdefault((row["id"], row["version_id"]), collections.Counter())[
            seen_row(row)
        ] += 1
    truth = w.truth()
    for rid, versions in w.history.items():
        held = [k for k in by_version if k[0] == rid]
        if len(versions) == 1:  # unchanged while paging: exactly its rows, each once
            (version,) = versions
            expected = (
                collections.Counter(
                    r for r in reference_rows(truth[rid]) if code is None or r[4] == code
                )
                if version is not None
                else collections.Counter()
            )
            got = sum((by_version[k] for k in held), collections.Counter())
            assert got == expected, rid
        else:  # changed: only rows of versions it had, none more often than that version has
            for key in held:
                assert key[1] in versions, key
                for row, times in by_version[key].items():
                    assert times <= row_multiplicity(w, key, row), (key, row)


def row_multiplicity(w: World, key: tuple[str, str], row: Row) -> int:
    """How often `row` is a row of the version `key` (as HAPI stored that version)."""
    return reference_rows(w.versions[key]).count(row)


# -- _count, _after and _offset --------------------------------------------------------------


async def test_count_zero_gives_no_rows_and_no_next(
    api_settings: Settings, loaded: SpeedStore
) -> None:
    r = await get(api_settings, "/views/condition_simple/rows?_count=0")
    assert r.status_code == 200 and r.json()["rows"] == [] and r.json()["next"] is None
    assert "link" not in r.headers
    for fmt in ("ndjson", "csv"):
        r = await get(api_settings, f"/views/condition_simple/rows?_count=0&_format={fmt}")
        assert r.status_code == 200 and "link" not in r.headers
    r = await get(api_settings, "/views/condition_simple/rows?_count=0&_format=csv")
    assert r.text.splitlines() == [",".join(loaded_columns())]


def loaded_columns() -> list[str]:
    return list(shipped_views()["condition_simple"].column_names)


async def test_links_follow_to_the_end_in_every_format(
    api_settings: Settings, loaded: SpeedStore
) -> None:
    every = (await get(api_settings, "/views/condition_simple/rows")).json()["rows"]
    assert len(every) == 6
    for fmt in ("json", "ndjson", "csv"):
        url: str | None = f"/views/condition_simple/rows?_count=4&_format={fmt}"
        got: list[str] = []
        while url is not None:
            r = await get(api_settings, url)
            assert r.status_code == 200
            link = r.headers.get("link")
            following = link.split(">", 1)[0].lstrip("<") if link else None
            if fmt == "json":
                got += [row["id"] for row in r.json()["rows"]]
                assert r.json()["next"] == following
            elif fmt == "ndjson":
                got += [json.loads(line)["id"] for line in r.text.splitlines()]
            else:
                got += [line.split(",", 1)[0] for line in r.text.splitlines()[1:]]
            assert following != url and (following is None or "_after=" in following)
            url = following.removeprefix("http://receiver.test") if following else None
        assert got == [row["id"] for row in every], fmt


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "10001", "", "1e3", "\u00b2"])
async def test_malformed_count_is_400_naming_it(
    api_settings: Settings, loaded: SpeedStore, value: str
) -> None:
    r = await get(api_settings, "/views/condition_simple/rows", params={"_count": value})
    assert r.status_code == 400
    assert [i["expression"] for i in r.json()["issue"]] == [["_count"]]


def token(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("_after", "not-a-key"),
        ("_after", token(["c1"])),
        ("_after", token(["c1", -1])),
        ("_after", token(["c1", True])),
        ("_after", token([1, 1])),
        ("_after", token(["c\u0000", 1])),
        ("_after", "é"),
        ("_offset", "3"),
    ],
)
async def test_bad_page_keys_and_offsets_are_400_naming_the_parameter(
    api_settings: Settings, loaded: SpeedStore, name: str, value: str
) -> None:
    r = await get(api_settings, "/views/condition_simple/rows", params={name: value})
    assert r.status_code == 400
    assert [i["expression"] for i in r.json()["issue"]] == [[name]]


async def test_a_key_from_elsewhere_still_pages_forward(
    api_settings: Settings, loaded: SpeedStore
) -> None:
    """A hand-made key is only a place in the order: rows after it, never an error."""
    await put(loaded, condition("c3", "p03", code="999", v=2))  # c3 now in the speed layer
    r = await get(api_settings, "/views/condition_simple/rows", params={"_after": token(["c2", 0])})
    assert [row["id"] for row in r.json()["rows"]] == ["c2", "c3", "c4", "c5"]
    r = await get(api_settings, "/views/condition_simple/rows", params={"_after": token([None, 5])})
    assert [row["id"] for row in r.json()["rows"]] == ["c0", "c1", "c2", "c3", "c4", "c5"]
    r = await get(api_settings, "/views/condition_simple/rows", params={"_after": token(["zz", 1])})
    assert r.json()["rows"] == [] and r.json()["next"] is None


async def test_a_view_without_id_pages_by_the_row_itself(
    api_settings: Settings, loaded: SpeedStore
) -> None:
    """Without an `id` column the key is the row's own text; identical rows are told apart by
    their position, so each of them still comes exactly once."""
    view = load_view(
        {
            "resourceType": "ViewDefinition",
            "name": "genders",
            "resource": "Patient",
            "select": [{"column": [{"name": "gender", "path": "gender", "type": "code"}]}],
        }
    )
    views = {**shipped_views(), "genders": view}
    batch.init(api_settings.database_url, views=views)
    app = create_app(api_settings)
    app.state.views = views
    async with running(app) as client:
        for count in (1, 2, 4, 5):
            url: str | None = f"/views/genders/rows?_count={count}"
            seen: list[str] = []
            while url is not None:
                response = await client.get(url, headers={"Authorization": "Bearer serve-token"})
                assert response.status_code == 200, response.text
                seen += [row["gender"] for row in response.json()["rows"]]
                assert response.json()["next"] != url
                url = response.json()["next"]
            assert collections.Counter(seen) == {"female": 6, "male": 6}, count
