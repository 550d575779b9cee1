"""VIEWS_DIR: an operator's ViewDefinitions served exactly, like the shipped ones.

The operator's views (names of patients by forEach, Observation components by forEachOrNull
with exact decimals) are written as `tests.oracle` expression trees: their JSON goes into the
folder, their rows come from the oracle, which shares no code with the engines. Each example
is a night (HAPI's state through a real `batch refresh --full`) and a day of changes delivered
through the write path (updates, deletes, re-creates); `/views/{name}/rows`, paged, must give
exactly the oracle's rows over HAPI's final state, and again after a real incremental
`batch refresh`. Then: `batch init` picks up a changed and an added definition (that view
alone rebuilt, its speed rows re-derived), a bad folder stops a real command with one line
naming the file, and `subscriptions bootstrap` subscribes to the views' types by default.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import researchflow_cli
from core.fhir_values import dumps
from core.store import SpeedStore
from receiver.ingest import ingest
from serving import batch
from serving.api import create_app
from serving.derive import default_deriver
from serving.registry import served_views
from serving.status import status_route
from tests.asgi import running
from tests.conftest import fresh_database, redis_db
from tests.layers import AUTH, Change, Kinds, Layers, layers_of, resource_change
from tests.oracle import Column, Function, Select, Step, View
from tests.oracle import Path as OPath
from tests.test_bootstrap import BASE, FakeHapi
from tests.test_startup import COMMANDS
from tests.test_status import Page

ROOT = Path(__file__).resolve().parents[1]
VIEWS_REDIS_URL = redis_db(12)
PATIENTS = [f"p{i}" for i in range(4)]
OBSERVATIONS = [f"o{i}" for i in range(4)]
VALUES = [Decimal("6.50000000000000001"), Decimal("6.5"), Decimal("7.0"), 7, Decimal("7.45")]


def path(*names: str, of_type: str | None = None) -> OPath:
    steps = [Step(n) for n in names]
    if of_type is not None:
        steps[-1] = Step(names[-1], of_type=of_type)
    return OPath(tuple(steps))


RESOURCE_KEY = Function(OPath(()), "getResourceKey")
# One row per name of a Patient: forEach over Patient.name.
PATIENT_NAMES = View(
    "Patient",
    [
        Select(column=[Column("id", RESOURCE_KEY, "id"), Column("gender", path("gender"), "code")]),
        Select(
            for_each=path("name"),
            column=[
                Column("family", path("family"), "string"),
                Column("given", Function(path("given"), "first"), "string"),
                Column("use", path("use"), "code"),
            ],
        ),
    ],
)
# One row per Observation component (one row of nulls without any): exact decimals.
OBSERVATION_COMPONENTS = View(
    "Observation",
    [
        Select(column=[Column("id", RESOURCE_KEY, "id"), Column("status", path("status"), "code")]),
        Select(
            for_each_or_null=path("component"),
            column=[
                Column("code_text", path("code", "text"), "string"),
                Column("value", path("value", "value", of_type="Quantity"), "decimal"),
            ],
        ),
    ],
)
VIEWS = {"patient_names": PATIENT_NAMES, "observation_components": OBSERVATION_COMPONENTS}


def definition(name: str, view: View) -> dict[str, Any]:
    return {**view.json(), "name": name}


def write_views(folder: Path, views: dict[str, dict[str, Any]]) -> None:
    for old in folder.glob("*.json"):
        old.unlink()
    for name, data in views.items():
        (folder / f"{name}.json").write_text(json.dumps(data, default=str))


# --------------------------------------------------------------------------- harness


def canonical(rows: list[dict[str, Any]]) -> list[str]:
    """Rows as comparable text: numbers as exact decimals (7 and 7.0 differ, as in FHIR)."""

    def exact(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return Decimal(value)
        return value

    return sorted(
        json.dumps({k: exact(v) for k, v in row.items()}, sort_keys=True, default=str)
        for row in rows
    )


async def served_rows(client: httpx.AsyncClient, name: str) -> list[dict[str, Any]]:
    """Every row of the merged view, page by page (3 a page, so keys cross pages)."""
    rows: list[dict[str, Any]] = []
    url: str | None = f"/views/{name}/rows?_count=3"
    while url is not None:
        response = await client.get(url, headers=AUTH)
        assert response.status_code == 200, response.text
        body = json.loads(response.text, parse_float=Decimal)
        rows.extend(body["rows"])
        url = body["next"]
    return rows


@pytest.fixture(scope="module")
def views_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("views")
    write_views(folder, {n: definition(n, v) for n, v in VIEWS.items()})
    return folder


@pytest.fixture(scope="module")
def database(views_folder: Path) -> Iterator[str]:
    with fresh_database("rf_views_dir") as url:
        batch.init(url, served_views(str(views_folder)))
        yield url


# --------------------------------------------------------------------------- resources


@st.composite
def patient(draw: st.DrawFn, rid: str) -> dict[str, Any]:
    data: dict[str, Any] = {"resourceType": "Patient", "id": rid}
    gender = draw(st.sampled_from(["male", "female", None]))
    if gender:
        data["gender"] = gender
    names = []
    for _ in range(draw(st.integers(0, 3))):
        name: dict[str, Any] = {}
        family = draw(st.sampled_from([None, "Müller", "O'Brien", "Ng"]))
        if family:
            name["family"] = family
        given = draw(st.lists(st.sampled_from(["Ana", "Łukasz", "=SUM(A1)"]), max_size=2))
        if given:
            name["given"] = given
        use = draw(st.sampled_from([None, "official", "nickname"]))
        if use:
            name["use"] = use
        names.append(name or {"text": "unnamed"})
    if names:
        data["name"] = names
    return data


@st.composite
def observation(draw: st.DrawFn, rid: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "status": draw(st.sampled_from(["final", "amended"])),
        "code": {"text": "blood pressure"},
    }
    components = []
    for _ in range(draw(st.integers(0, 2))):
        component: dict[str, Any] = {"code": {"text": draw(st.sampled_from(["sys", "dia"]))}}
        if draw(st.booleans()):
            component["valueQuantity"] = {"value": draw(st.sampled_from(VALUES)), "unit": "mm"}
        components.append(component)
    if components:
        data["component"] = components
    return data


VIEW_KINDS: Kinds = {"Patient": (PATIENTS, patient), "Observation": (OBSERVATIONS, observation)}
CHANGES = st.lists(resource_change(5, VIEW_KINDS), min_size=1, max_size=10)


# --------------------------------------------------------------------------- tests


async def check_served(layers: Layers, client: httpx.AsyncClient) -> None:
    truth = layers.truth().values()
    for name, view in VIEWS.items():
        expected = [row for resource in truth for row in view.rows(resource)]
        assert canonical(await served_rows(client, name)) == canonical(expected), name


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(night=st.lists(resource_change(None, VIEW_KINDS), max_size=6), day=CHANGES)
async def test_an_operator_view_is_served_exactly_through_changes_and_refreshes(
    database: str, views_folder: Path, night: list[Change], day: list[Change]
) -> None:
    async with layers_of(database, VIEWS_REDIS_URL, views_folder) as layers:
        await layers.night([data for _, _, data in night if data is not None])
        for resource_type, rid, data in day:
            await layers.change(resource_type, rid, data)
        async with running(create_app(layers.settings)) as client:
            await check_served(layers, client)
            listed = {
                v["name"]: v for v in (await client.get("/views", headers=AUTH)).json()["views"]
            }
            assert set(listed) >= set(VIEWS)
            assert listed["patient_names"]["columns"] == ["id", "gender", "family", "given", "use"]
            await layers.refresh()  # a real incremental refresh moves the day into the batch
            await check_served(layers, client)
            batch_rows = {
                name: len([r for res in layers.truth().values() for r in view.rows(res)])
                for name, view in VIEWS.items()
            }
            listed = {
                v["name"]: v for v in (await client.get("/views", headers=AUTH)).json()["views"]
            }
            for name, rows in batch_rows.items():
                assert listed[name]["batch_rows"] == rows


async def test_views_lists_freshness_per_view(database: str, views_folder: Path) -> None:
    async with layers_of(database, VIEWS_REDIS_URL, views_folder) as layers:
        await layers.night([{"resourceType": "Patient", "id": "p0", "name": [{"family": "A"}]}])
        await layers.change(
            "Observation",
            "o1",
            {
                "resourceType": "Observation",
                "id": "o1",
                "status": "final",
                "code": {"text": "x"},
                "component": [{"code": {"text": "a"}}, {"code": {"text": "b"}}],
            },
        )
        newest = layers.hapi.resources[("Observation", "o1")].resource["meta"]["lastUpdated"]
        app = create_app(layers.settings, extra_routes=[status_route(layers.settings)])
        async with running(app) as client:
            body = (await client.get("/views", headers=AUTH)).json()
            page = Page((await client.get("/status", headers=AUTH)).text)
        listed = {v["name"]: v for v in body["views"]}
        # The status page shows the same per view: batch_as_of, batch rows, speed_as_of,
        # speed resources and the rows each layer holds.
        shown = {row[0]: row for row in page.rows("view-table")}
        assert set(shown) == set(listed)
        for name, view in listed.items():
            assert shown[name][:6] == [
                name,
                view["resource"],
                view["batch_as_of"],
                str(view["batch_rows"]),
                view["speed_as_of"] or "-",
                str(view["speed_resources"]),
            ]
        assert shown["observation_components"][6] == "2"  # one row per component
        assert shown["patient_names"][6] == "0"
        watermark = psycopg.connect(database).execute(batch.WATERMARK_SQL).fetchone()
        assert watermark is not None
        components = listed["observation_components"]
        assert set(components) == {
            "name",
            "resource",
            "columns",
            "batch_as_of",
            "batch_rows",
            "speed_resources",
            "speed_as_of",
        }
        assert components["batch_as_of"] == watermark[0]
        assert components["batch_rows"] == 0 and components["speed_resources"] == 1
        # speed_as_of means what it means for /cohort: complete up to the poller's watermark.
        async with running(app) as client:
            cohort = (await client.get("/cohort", params={"gender": "male"}, headers=AUTH)).json()
        assert components["speed_as_of"] == cohort["speed_as_of"]
        assert {v["speed_as_of"] for v in listed.values()} == {cohort["speed_as_of"]}
        # The status page also shows the newest lastUpdated held for Observation (HAPI's clock).
        assert _ms(shown["observation_components"][7]) == _ms(newest)
        assert shown["patient_names"][7] == "-"
        names = listed["patient_names"]
        assert names["batch_rows"] == 1 and names["speed_resources"] == 0


def _ms(instant: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(instant.replace("Z", "+00:00")).timestamp() * 1000


async def test_batch_init_rebuilds_a_changed_view_alone_and_rederives_its_speed_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "views"
    folder.mkdir()
    write_views(folder, {"patient_names": definition("patient_names", PATIENT_NAMES)})
    redis = aioredis.Redis.from_url(VIEWS_REDIS_URL)
    await redis.flushdb()
    try:
        with fresh_database("rf_views_init") as url:
            monkeypatch.setenv("DATABASE_URL", url)
            monkeypatch.setenv("REDIS_URL", VIEWS_REDIS_URL)
            monkeypatch.setenv("VIEWS_DIR", str(folder))
            assert await _main(["batch", "init"]) == 0
            first = capsys.readouterr().out
            assert "created view sqlonfhir.patient_names" in first
            store = SpeedStore(redis)
            derive = default_deriver(served_views(str(folder)))
            patients = [
                {
                    "resourceType": "Patient",
                    "id": "a",
                    "name": [{"family": "X", "use": "official"}, {"given": ["Y"]}],
                },
                {
                    "resourceType": "Patient",
                    "id": "b",
                    "gender": "male",
                    "meta": {"versionId": "1"},
                },
            ]
            for data in patients:
                await ingest(
                    store, dumps(data), path_type="Patient", path_id=data["id"], derive=derive
                )

            # Changed: the view now keeps official names only; added: one row per patient.
            changed = View(
                "Patient",
                [
                    PATIENT_NAMES.select[0],
                    Select(
                        for_each=Function(path("name"), "where", _use_is_official()),
                        column=[Column("family", path("family"), "string")],
                    ),
                ],
            )
            added = View("Patient", [Select(column=[Column("id", RESOURCE_KEY, "id")])])
            write_views(
                folder,
                {
                    "patient_names": definition("patient_names", changed),
                    "patient_ids": definition("patient_ids", added),
                },
            )
            assert await _main(["batch", "init"]) == 0
            lines = capsys.readouterr().out.splitlines()
            assert "rebuilt view sqlonfhir.patient_names" in lines
            assert "created view sqlonfhir.patient_ids" in lines
            assert "unchanged view sqlonfhir.patient_demographics" in lines
            assert "re-derived 2 speed-layer Patient entries" in lines
            for name, view in (("patient_names", changed), ("patient_ids", added)):
                stored = await store.rows("Patient", name)
                got = [row for raw in stored.values() for row in json.loads(raw)]
                assert canonical(got) == canonical([r for p in patients for r in view.rows(p)]), (
                    name
                )
            with psycopg.connect(url) as conn:
                built = conn.execute("SELECT name FROM rf_batch.views ORDER BY name").fetchall()
            assert [b[0] for b in built] == sorted(
                [*served_views(None), "patient_ids", "patient_names"]
            )
    finally:
        await redis.flushdb()
        await redis.aclose()


def _use_is_official() -> Any:
    from tests.oracle import Compare, Literal

    return Compare("=", path("use"), Literal("official"))


async def _main(argv: list[str]) -> int:
    import asyncio

    return await asyncio.to_thread(researchflow_cli.main, argv)


GOOD = definition("patient_names", PATIENT_NAMES)
BAD_FOLDERS: dict[str, tuple[dict[str, str], str]] = {
    "invalid JSON": ({"broken.json": '{"resourceType": "ViewDefinition",'}, "not valid JSON"),
    "invalid definition": (
        {"empty.json": json.dumps({"name": "empty_view", "resource": "Patient", "select": []})},
        "'select' must be a non-empty array",
    ),
    "bad FHIRPath": (
        {
            "path.json": json.dumps(
                {
                    **GOOD,
                    "name": "bad_path",
                    "select": [{"column": [{"name": "id", "path": "id.("}]}],
                }
            )
        },
        "invalid FHIRPath",
    ),
    "bad name": (
        {"upper.json": json.dumps({**GOOD, "name": "PatientNames"})},
        "does not match [a-z][a-z0-9_]{0,62}",
    ),
    "no name": (
        {"anon.json": json.dumps({k: v for k, v in GOOD.items() if k != "name"})},
        "no 'name'",
    ),
    "duplicate of a shipped view": (
        {"dup.json": json.dumps({**GOOD, "name": "condition_simple"})},
        "'condition_simple' is already the shipped view condition_simple",
    ),
    "duplicate within the folder": (
        {"a.json": json.dumps(GOOD), "b.json": json.dumps(GOOD)},
        "'patient_names' is already the name of",
    ),
    "unknown resource type": (
        {"x.json": json.dumps({**GOOD, "resource": "Patients"})},
        "not a FHIR R4 resource type",
    ),
    "unknown column type": (
        {
            "t.json": json.dumps(
                {
                    **GOOD,
                    "select": [
                        {
                            "column": [
                                {"name": "id", "path": "getResourceKey()", "type": "id"},
                                {"name": "gender", "path": "gender", "type": "foobar"},
                            ]
                        }
                    ],
                }
            )
        },
        "select[0].column[1].type 'foobar' is not a FHIR type",
    ),
    "no resource key": (
        {
            "k.json": json.dumps(
                {
                    **GOOD,
                    "select": [
                        {"forEach": "name", "column": [{"name": "family", "path": "family"}]}
                    ],
                }
            )
        },
        "no column 'id' holding the resource's id",
    ),
}


# Every kind on one command, and one kind on every command of the contract.
CASES = [(kind, "batch init") for kind in sorted(BAD_FOLDERS)] + [
    ("duplicate within the folder", name) for name in sorted(COMMANDS) if name != "batch init"
]


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_a_bad_definition_stops_a_command_with_one_line_naming_the_file(
    tmp_path: Path, kind: str, name: str
) -> None:
    command = COMMANDS[name]
    files, reason = BAD_FOLDERS[kind]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {
        "PATH": "/usr/bin:/bin",
        "VIEWS_DIR": str(tmp_path),
        "REDIS_URL": VIEWS_REDIS_URL,
        # Nothing may be reached: the folder is checked before any dependency.
        "DATABASE_URL": "postgresql://127.0.0.1:1/nothing",
    }
    done = subprocess.run(
        [sys.executable, "-m", "researchflow_cli", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"researchflow {command[0]}: invalid ViewDefinition: {tmp_path}/")
    assert reason in lines[0]
    assert sorted(files)[-1 if "within" in kind else 0] in lines[0]
    assert done.stdout == ""


def test_views_dir_must_be_a_folder(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "researchflow_cli", "speed", "stats"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "VIEWS_DIR": str(tmp_path / "missing")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"researchflow speed: bad setting: VIEWS_DIR must name an existing folder, not '{tmp_path / 'missing'}'"
    ]


def test_bootstrap_subscribes_to_the_served_views_types_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    medications = {
        "resourceType": "ViewDefinition",
        "name": "medication_requests",
        "resource": "MedicationRequest",
        "select": [
            {
                "column": [
                    {"name": "id", "path": "getResourceKey()"},
                    {"name": "status", "path": "status"},
                ]
            }
        ],
    }
    (tmp_path / "medication_requests.json").write_text(json.dumps(medications))
    monkeypatch.setenv("FHIR_BASE_URL", BASE)
    monkeypatch.setenv("RECEIVER_TOKEN", "tok")
    monkeypatch.setenv("VIEWS_DIR", str(tmp_path))
    with respx.mock(assert_all_called=False) as router:
        fake = FakeHapi(router)
        assert researchflow_cli.main(["subscriptions", "bootstrap", "--wait", "5"]) == 0
    criteria = sorted(s["criteria"] for s in fake.subs.values())
    assert criteria == ["Condition?", "MedicationRequest?", "Observation?", "Patient?"]


def test_a_view_name_of_63_characters_becomes_its_table(tmp_path: Path) -> None:
    longest = "v" * 63
    write_views(tmp_path, {longest: definition(longest, PATIENT_NAMES)})
    with fresh_database("rf_views_long") as url:
        lines = batch.init(url, served_views(str(tmp_path)))
        assert f"created view sqlonfhir.{longest}" in lines
        with psycopg.connect(url) as conn:
            indexes = conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'sqlonfhir' AND tablename = %s",
                (longest,),
            ).fetchall()
        # Every index the plan asks for exists under its own name (none cut to a clash).
        plan = batch.plan_view(served_views(str(tmp_path))[longest], longest)
        assert len(indexes) == len(plan.indexes) + len(plan.trigram) >= 2
        assert all(len(i[0]) <= 63 for i in indexes)


async def test_columns_without_a_type_filter_by_their_plain_value(tmp_path: Path) -> None:
    """Columns without `type` (SQL-on-FHIR allows it) are jsonb in the batch layer; a filter
    finds a cell by its scalar's text (?gender=male) or by JSON, in both layers."""
    untyped = {
        "resourceType": "ViewDefinition",
        "name": "untyped_patients",
        "status": "active",
        "resource": "Patient",
        "select": [
            {
                "column": [
                    {"name": "id", "path": "getResourceKey()"},
                    {"name": "gender", "path": "gender"},
                    {"name": "names", "path": "name.family", "collection": True},
                ]
            }
        ],
    }
    write_views(tmp_path, {"untyped_patients": untyped})
    with fresh_database("rf_views_untyped") as url:
        batch.init(url, served_views(str(tmp_path)))
        async with layers_of(url, VIEWS_REDIS_URL, tmp_path) as layers:
            await layers.night(
                [
                    {
                        "resourceType": "Patient",
                        "id": "n1",
                        "gender": "male",
                        "name": [{"family": "A"}],
                    },
                    {"resourceType": "Patient", "id": "n2", "gender": "female"},
                ]
            )
            # A day: n2 becomes male in the speed layer, d1 arrives, n1 is deleted.
            await layers.change(
                "Patient", "n2", {"resourceType": "Patient", "id": "n2", "gender": "male"}
            )
            await layers.change(
                "Patient",
                "d1",
                {
                    "resourceType": "Patient",
                    "id": "d1",
                    "gender": "male",
                    "name": [{"family": "B"}],
                },
            )
            await layers.change("Patient", "n1", None)
            async with running(create_app(layers.settings)) as client:

                async def ids(query: str) -> list[str]:
                    response = await client.get(
                        f"/views/untyped_patients/rows?{query}", headers=AUTH
                    )
                    assert response.status_code == 200, response.text
                    return sorted(row["id"] for row in response.json()["rows"])

                assert await ids("gender=male") == ["d1", "n2"]
                assert await ids("gender=%22male%22") == ["d1", "n2"]
                assert await ids("id=n2") == ["n2"]
                assert await ids("id=n1") == []  # deleted in the speed layer
                assert await ids("names=%5B%22B%22%5D") == ["d1"]
                assert await ids("gender=female") == []


async def test_date_time_columns_filter_by_fhirs_date_rules(tmp_path: Path) -> None:
    """A dateTime column is text in the batch layer, but a filter compares as FHIR does: one
    instant written three ways is one value, a different precision is not equal, and a
    value that is no date is a 400 naming the column; in both layers."""
    timed = {
        "resourceType": "ViewDefinition",
        "name": "timed_observations",
        "status": "active",
        "resource": "Observation",
        "select": [
            {
                "column": [
                    {"name": "id", "path": "getResourceKey()", "type": "id"},
                    {"name": "effective", "path": "effective.ofType(dateTime)", "type": "dateTime"},
                ]
            }
        ],
    }

    def observation(rid: str, effective: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": rid,
            "status": "final",
            "code": {"text": "x"},
            "effectiveDateTime": effective,
        }

    write_views(tmp_path, {"timed_observations": timed})
    with fresh_database("rf_views_timed") as url:
        batch.init(url, served_views(str(tmp_path)))
        async with layers_of(url, VIEWS_REDIS_URL, tmp_path) as layers:
            await layers.night(
                [
                    observation("o1", "2024-01-01T00:00:00.000+00:00"),
                    observation("o2", "2023-12-31T19:00:00-05:00"),
                    observation("o3", "2024-01-01T00:00:01Z"),
                    observation("o4", "2024-01-01"),
                    observation("o7", "2023-12-31T23:00:00-12:00"),  # 2024-01-01T11:00Z
                ]
            )
            # The speed layer: the same instant once more, and o3 moved onto it.
            await layers.change("Observation", "o5", observation("o5", "2024-01-01T01:00:00+01:00"))
            await layers.change("Observation", "o3", observation("o3", "2024-01-01T00:00:00Z"))
            async with running(create_app(layers.settings)) as client:

                async def ids(value: str) -> list[str]:
                    response = await client.get(
                        "/views/timed_observations/rows",
                        params={"effective": value},
                        headers=AUTH,
                    )
                    assert response.status_code == 200, response.text
                    return sorted(row["id"] for row in response.json()["rows"])

                assert await ids("2024-01-01T00:00:00Z") == ["o1", "o2", "o3", "o5"]
                assert await ids("2024-01-01T05:00:00+05:00") == ["o1", "o2", "o3", "o5"]
                assert await ids("2024-01-01") == ["o4"]  # to the day: only o4 is
                assert await ids("2024-01-01T00:00Z") == []  # to the minute: none is
                assert await ids("2024-01-01T00:00:01Z") == []  # o3 moved
                # The extreme offsets: written two days apart, the same instant.
                assert await ids("2024-01-02T01:00:00+14:00") == ["o7"]
                assert await ids("2024-01-02T01:00:00.000+14:00") == ["o7"]
                assert await ids("2024-01-01T") == ["o4"]  # a FHIRPath literal to the day
                response = await client.get(
                    "/views/timed_observations/rows",
                    params={"effective": "notadate"},
                    headers=AUTH,
                )
                assert response.status_code == 400
                assert "'notadate' is not a valid dateTime for column 'effective'" in response.text


async def test_a_service_whose_definitions_the_batch_layer_no_longer_has_says_restart(
    tmp_path: Path,
) -> None:
    """`batch init` rebuilt a view from a changed VIEWS_DIR while a service runs with the
    definitions it read at start-up: a 503 that says what to do, not "not initialised"."""
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    after.mkdir()
    columns = [{"name": "id", "path": "getResourceKey()", "type": "id"}]
    view = {"resourceType": "ViewDefinition", "name": "genders", "status": "active"}
    view["resource"] = "Patient"
    old = {**view, "select": [{"column": [*columns, {"name": "gender", "path": "gender"}]}]}
    new = {**view, "select": [{"column": [*columns, {"name": "sex", "path": "gender"}]}]}
    write_views(before, {"genders": old})
    write_views(after, {"genders": new})
    with fresh_database("rf_views_changed") as url:
        batch.init(url, served_views(str(before)))
        async with layers_of(url, VIEWS_REDIS_URL, before) as layers:
            batch.init(url, served_views(str(after)))  # while the service runs on `before`
            async with running(create_app(layers.settings)) as client:
                response = await client.get("/views/genders/rows", headers=AUTH)
    assert response.status_code == 503, response.text
    text = response.json()["issue"][0]["diagnostics"]
    assert "built from other view definitions" in text and "restart" in text
