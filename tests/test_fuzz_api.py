"""Property tests: arbitrary query strings at GET /cohort and /views/{name}/rows never 500.

The query API runs in-process (lifespan, real PostgreSQL with the batch layer initialised and
loaded, real Redis with a few speed-layer entries) and is called with raw query strings, as
uvicorn hands them over. Per run: 300 arbitrary /cohort queries, 200 valid ones, 200 valid
ones with exactly one bad parameter, 250 /views/{name}/rows queries (MAX_* below: 950 in
all). The cases tried and the statuses seen are written to `reports/fuzz-api.json` when the
module finishes.

Checked: never a 5xx or an escaped exception; a 400 is an OperationOutcome naming a parameter
the request carried (`issue.expression`); a valid query answers 200 with the contract's fields
(patient_ids sorted, at most `_count` of them, a `next` that answers 200 too); a query with
one malformed parameter answers 400 naming that parameter.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import date
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.settings import Settings
from core.store import SpeedStore
from serving.api import create_app
from tests.conftest import redis_db
from tests.test_cohort import condition, load_batch, observation, patient, put
from tests.test_fuzz_receiver import Answer, Fuzzed, Tally, write_report

TOKEN = "fuzz-serving-token"
API_REDIS_URL = os.environ.get("FUZZ_API_REDIS_URL", redis_db(11))
REPORT = Path(__file__).resolve().parents[1] / "reports" / "fuzz-api.json"

MAX_ARBITRARY = 300
MAX_VALID = 200
MAX_ONE_BAD = 200
MAX_VIEWS = 250

FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CONTRACT_FIELDS = {
    "total_count",
    "next",
    "batch_count",
    "added_count",
    "removed_count",
    "sources",
    "batch_as_of",
    "speed_as_of",
    "degraded",
    "query_timestamp",
}


TALLIES: dict[str, Tally] = collections.defaultdict(Tally)


@pytest.fixture(scope="module", autouse=True)
def _write_report() -> Iterator[None]:
    started = time.monotonic()
    yield
    write_report(REPORT, "tests/test_fuzz_api.py", TALLIES, time.monotonic() - started)


@pytest.fixture
async def api(pg_url: str) -> AsyncIterator[Fuzzed]:
    load_batch(
        pg_url,
        [
            patient("b1", "male", "1970-01-01"),
            patient("b2", "female", "1985-06"),
            patient("b3", None, "2001"),
            condition("c1", "b1", text="Diabetes mellitus"),
            condition("c2", "b2", code="38341003", verification="entered-in-error"),
            observation("o1", "b1", value=7.5),
            observation("o2", "b2", value=5.0, status="cancelled"),
        ],
    )
    client = aioredis.Redis.from_url(API_REDIS_URL)
    await client.flushdb()
    store = SpeedStore(client)
    await store.mark_epoch()
    for resource in (
        patient("s1", "other", "1999-12-31"),
        patient("b1", "male", "1970-01-01", v=2),
        condition("c3", "s1", code="44054006", display="Diabetes"),
        observation("o3", "s1", value=6.6),
    ):
        await put(store, resource)
    settings_ = Settings(redis_url=API_REDIS_URL, database_url=pg_url, serving_tokens=(TOKEN,))
    app = create_app(settings_)
    try:
        async with app.router.lifespan_context(app) as state:
            yield Fuzzed(app, dict(state or {}), client, store)
    finally:
        await client.flushdb()
        await client.aclose()


def encode(pairs: list[tuple[str, str]], safe: str) -> str:
    return "&".join(f"{quote(k, safe=safe)}={quote(v, safe=safe)}" for k, v in pairs)


def check_outcome_names(answer: Answer, names: set[str]) -> list[str]:
    assert answer.headers.get("content-type", "").startswith("application/fhir+json"), answer
    outcome = json.loads(answer.body)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"] and all(i.get("diagnostics") for i in outcome["issue"]), outcome
    named = [e for i in outcome["issue"] for e in i.get("expression", [])]
    # An empty parameter name cannot be named (an OperationOutcome leaves "" out).
    assert set(named) & names or ("" in names and not named), (outcome, names)
    return named


async def ask(
    api: Fuzzed, name: str, path: str, pairs: list[tuple[str, str]], safe: str = ""
) -> Answer:
    query = encode(pairs, safe)
    target = path + ("?" + query if query else "")
    answer = await api.request("GET", target, [("Authorization", f"Bearer {TOKEN}")], b"")
    tally = TALLIES[name]
    tally.cases += 1
    tally.statuses[answer.status] += 1
    assert answer.status in {200, 400, 404}, (answer, target)
    if answer.status == 400:
        check_outcome_names(answer, {k for k, _ in pairs})
    return answer


async def check_cohort_answer(api: Fuzzed, answer: Answer, pairs: list[tuple[str, str]]) -> None:
    assert answer.headers["content-type"].startswith("application/json")
    body = json.loads(answer.body)
    assert CONTRACT_FIELDS <= body.keys(), body
    ids_wanted = dict(pairs).get("ids", "true") != "false"
    if ids_wanted:
        ids = body["patient_ids"]
        assert ids == sorted(ids) and all(isinstance(i, str) for i in ids)
        counts = [int(v) for k, v in pairs if k == "_count"]
        assert len(ids) <= (counts[-1] if counts else 1000)
    else:
        assert "patient_ids" not in body
    assert isinstance(body["degraded"], bool)
    assert body["sources"] in (["batch_layer", "speed_layer"], ["batch_layer"])
    if body["next"]:
        parts = urlsplit(body["next"])
        more = await api.request(
            "GET", f"{parts.path}?{parts.query}", [("Authorization", f"Bearer {TOKEN}")], b""
        )
        assert more.status == 200, more


# -- strategies ---------------------------------------------------------------------------

anything = st.text(max_size=30) | st.sampled_from(
    ["", ",", ",,", "\\,", "$", "|", "a|", "|b", "\x00", "%", "+", " ", "\u00e9", "\U0001f600"]
)
prefixes = st.sampled_from(["", "eq", "ne", "gt", "lt", "ge", "le"])
years = st.integers(1, 9999).map(lambda y: f"{y:04d}")
dates = st.one_of(
    years,
    st.tuples(years, st.integers(1, 12)).map(lambda t: f"{t[0]}-{t[1]:02d}"),
    st.dates().map(lambda d: d.isoformat()),
    # dateTime search values, minutes to milliseconds, with or without a zone
    st.tuples(
        st.dates(min_value=date(2, 1, 1), max_value=date(9998, 12, 31)),
        st.sampled_from(["T00:00", "T23:59:59", "T12:30:15.5"]),
        st.sampled_from(["", "Z", "+02:00", "-05:00"]),
    ).map(lambda t: t[0].isoformat() + t[1] + t[2]),
)
numbers = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str),
    st.sampled_from(["6.5", "-0", "0.0001", "1e3", "1E-2", "123456789012345678901234567890"]),
)
code_text = st.text(
    st.characters(codec="utf-8", exclude_characters=",$|\\\x00"), min_size=1, max_size=12
)
codes = st.one_of(
    st.sampled_from(["44054006", "4548-4", "38341003"]),
    code_text,
).flatmap(
    lambda c: st.sampled_from([c, f"http://snomed.info/sct|{c}", f"http://loinc.org|{c}", f"|{c}"])
)


def alternatives(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(values, min_size=1, max_size=3).map(",".join)


def valid_pair(name: str) -> st.SearchStrategy[tuple[str, str]]:
    value: st.SearchStrategy[str]
    if name == "gender":
        # AdministrativeGender only: any other value is a 400 (tested below).
        value = alternatives(st.sampled_from(["male", "female", "other", "unknown"]))
    elif name == "birthdate":
        value = alternatives(st.tuples(prefixes, dates).map("".join))
    elif name == "condition":
        value = alternatives(codes)
    elif name == "condition-text":
        value = alternatives(st.sampled_from(["diabetes", "DIAB", "mellitus"]) | code_text)
    elif name == "observation":
        comparison = st.one_of(
            st.just(""), st.tuples(prefixes, numbers).map(lambda t: "$" + "".join(t))
        )
        value = alternatives(st.tuples(codes, comparison).map("".join))
    elif name == "ids":
        value = st.sampled_from(["true", "false"])
    elif name == "_count":
        value = st.one_of(st.integers(0, 10000), st.integers(0, 5)).map(str)
    elif name == "_after":
        value = st.sampled_from(["b1", "", "s1", "zzz"]) | code_text
    else:  # ignored control parameters
        value = anything
    return value.map(lambda v: (name, v))


valid_names = st.sampled_from(
    [
        "gender",
        "birthdate",
        "condition",
        "condition-text",
        "observation",
        "ids",
        "_count",
        "_after",
        "_pretty",
        "_format",
        "_sort",
    ]
)
valid_queries = st.lists(valid_names.flatmap(valid_pair), max_size=5)

# (name, value) pairs that must be refused, whatever else the query holds.
bad_pairs = st.one_of(
    st.sampled_from(["foo", "Gender", "gender ", "patient", "code", "-", "\u00e9"]).flatmap(
        lambda n: anything.map(lambda v: (n, v))
    ),
    st.sampled_from(["gender", "birthdate", "condition", "condition-text", "observation"]).map(
        lambda n: (n, "")
    ),
    st.sampled_from(["gender", "condition", "condition-text"]).map(lambda n: (n, "a,,b")),
    st.sampled_from(
        [
            "xx1970",
            "ap1970",
            "1970-13",
            "1970-02-30",
            "19700",
            "gt",
            "1970-1-1",
            "abc",
            # A dateTime search value has minutes at least (FHIR R4 search, "date"): an hour
            # alone, hour 24 or a zone past +14:00 are no value (minutes are: exact2).
            "ge1970-01-01T00",
            "ge1970-01-01T24:00",
            "ge1970-01-01T00:00+15:00",
            "eq-1970",
            "1970,",
            "0000",
            "0000-01-01",
            "le0000-12",
        ]
    ).map(lambda v: ("birthdate", v)),
    st.sampled_from(["mal", "Male", "robot", "male,x", "0"]).map(lambda v: ("gender", v)),
    st.sampled_from(["-1", "10001", "1e3", "1.5", "", " 5", "0x10", "+5", "5 ", "-0"]).map(
        lambda v: ("_count", v)
    ),
    st.sampled_from(["yes", "", "TRUE", "0"]).map(lambda v: ("ids", v)),
    st.sampled_from(["44054006$gt5", "$", "http://x|"]).map(lambda v: ("condition", v)),
    st.sampled_from(
        ["4548-4$zz", "4548-4$gt", "4548-4$gtNaN", "4548-4$Infinity", "x$ap5", "|"]
    ).map(lambda v: ("observation", v)),
)

arbitrary_names = st.one_of(
    valid_names,
    st.sampled_from(["observation-value", "foo", "_", "", "=", "&", "gender[]", "\x00"]),
    st.text(max_size=15),
)
arbitrary_values = st.one_of(
    anything,
    numbers,
    st.tuples(prefixes | st.text(max_size=2), dates | numbers | anything).map("".join),
    st.sampled_from(["-5", "99999999999999999999", "1e999999", "NaN", "\u0663"]),
)


# -- the properties -----------------------------------------------------------------------


@settings(FUZZ_SETTINGS, max_examples=MAX_ARBITRARY)
@given(
    pairs=st.lists(st.tuples(arbitrary_names, arbitrary_values), max_size=6),
    safe=st.sampled_from(["", ",$|:", ",$|:/ "]),
)
async def test_arbitrary_cohort_queries_never_500(
    api: Fuzzed, pairs: list[tuple[str, str]], safe: str
) -> None:
    answer = await ask(api, "cohort_arbitrary", "/cohort", pairs, safe)
    assert answer.status in {200, 400}
    if answer.status == 200:
        await check_cohort_answer(api, answer, pairs)


@settings(FUZZ_SETTINGS, max_examples=MAX_VALID)
@given(pairs=valid_queries, observation_value=st.none() | st.tuples(prefixes, numbers))
async def test_valid_cohort_queries_answer_200(
    api: Fuzzed, pairs: list[tuple[str, str]], observation_value: tuple[str, str] | None
) -> None:
    observations = [v for k, v in pairs if k == "observation"]
    if observation_value is not None and len(observations) == 1 and "$" not in observations[0]:
        pairs = [*pairs, ("observation-value", "".join(observation_value))]
    answer = await ask(api, "cohort_valid", "/cohort", pairs)
    assert answer.status == 200, (answer, pairs)
    await check_cohort_answer(api, answer, pairs)


@settings(FUZZ_SETTINGS, max_examples=MAX_ONE_BAD)
@given(pairs=valid_queries, bad=bad_pairs, position=st.integers(0, 5))
async def test_one_malformed_parameter_is_400_naming_it(
    api: Fuzzed, pairs: list[tuple[str, str]], bad: tuple[str, str], position: int
) -> None:
    pairs = [*pairs[:position], bad, *pairs[position:]]
    answer = await ask(api, "cohort_one_bad", "/cohort", pairs)
    assert answer.status == 400, (answer, pairs)
    outcome = json.loads(answer.body)
    named = [e for i in outcome["issue"] for e in i.get("expression", [])]
    assert bad[0] in named, (named, bad, pairs)


VIEW_COLUMNS = {
    "patient_demographics": ["id", "gender", "birth_date", "deceased", "version_id"],
    "condition_simple": ["id", "patient_id", "code", "code_system"],
    "observation_simple": ["id", "patient_id", "code", "value", "status"],
}
view_names = st.sampled_from(
    [
        *VIEW_COLUMNS,
        *VIEW_COLUMNS,
        *VIEW_COLUMNS,
        *["nope", "", "..", "patient_demographics;drop", "Patient_Demographics"],
    ]
)
view_values = st.one_of(
    anything,
    dates,
    numbers,
    st.sampled_from(["true", "false", "male", "b1", "s1", "1970-01-01", "2024-01-01T00:00:01Z"]),
)


@st.composite
def view_queries(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]]]:
    name = draw(view_names)
    columns = VIEW_COLUMNS.get(name, ["id"])
    column_names = st.sampled_from(columns) | st.sampled_from(["nope", "Gender", "id "])
    control = st.sampled_from(["_format", "_count", "_offset", "_pretty", "_after", "_csv"])
    control_values = st.one_of(
        st.sampled_from(["json", "ndjson", "csv", "xml", "", "raw", "safe"]),
        # page keys: [id, position] in base64url JSON, well-formed or not
        st.sampled_from(["WyJiMSIsMV0", "W251bGwsMF0", "WyJiMSJd", "WyJiMSIsLTFd", "Wy", "!"]),
        st.integers(-5, 20000).map(str),
        st.sampled_from(["1e3", "\u0663", "\u00b2", "9" * 30]),
    )
    pairs = draw(
        st.lists(
            st.one_of(
                st.tuples(column_names, view_values),
                st.tuples(control, control_values),
            ),
            max_size=4,
        )
    )
    return name, pairs


@settings(FUZZ_SETTINGS, max_examples=MAX_VIEWS)
@given(case=view_queries())
async def test_view_rows_never_500(api: Fuzzed, case: tuple[str, list[tuple[str, str]]]) -> None:
    name, pairs = case
    path = f"/views/{quote(name, safe='')}/rows"
    answer = await ask(api, "view_rows", path, pairs)
    if name not in VIEW_COLUMNS:
        assert answer.status == 404, answer
        return
    if answer.status == 200:
        media = answer.headers["content-type"]
        formats = [v for k, v in pairs if k == "_format"]
        fmt = formats[-1] if formats else "json"  # the last one wins (Starlette's get)
        if fmt == "json":
            body = json.loads(answer.body)
            assert {"name", "rows", "next", "sources", "batch_as_of", "speed_as_of"} <= set(body)
        else:
            assert media.startswith({"ndjson": "application/x-ndjson", "csv": "text/csv"}[fmt])
    if any(not k.startswith("_") and k not in VIEW_COLUMNS[name] for k, _ in pairs):
        assert answer.status == 400, (answer, pairs)  # an unknown column


# -- once bugs in serving/, kept as regressions -------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("/cohort", "\u00b2"),  # superscript two: isdigit() but not int()
        ("/cohort", "9" * 5000),  # past int()'s 4300-digit limit
        ("/views/patient_demographics/rows", "\u00b2"),
        ("/views/patient_demographics/rows", "9" * 5000),
    ],
)
async def test_known_count_that_isdigit_but_not_int_is_400(
    api: Fuzzed, path: str, value: str
) -> None:
    answer = await ask(api, "known_bugs", path, [("_count", value)])
    assert answer.status == 400


async def test_known_offset_that_isdigit_but_not_int_is_400(api: Fuzzed) -> None:
    answer = await ask(
        api, "known_bugs", "/views/patient_demographics/rows", [("_offset", "\u00b2")]
    )
    assert answer.status == 400


async def test_known_filter_value_400_names_the_column(api: Fuzzed) -> None:
    target = "/views/patient_demographics/rows?deceased=maybe"
    answer = await api.request("GET", target, [("Authorization", f"Bearer {TOKEN}")], b"")
    assert answer.status == 400
    check_outcome_names(answer, {"deceased"})
