"""Property tests: arbitrary requests at the receiver never 500, and a refusal writes nothing.

Requests go straight to the ASGI app (its lifespan running, a real Redis), so paths, header
bytes and bodies reach it unnormalised, the way uvicorn would hand them over. Each property
runs `@settings(max_examples=...)` cases per run, as stated on it (MAX_* below: 250 random
bytes, 250 random JSON, 400 mutated official examples, 150 topic Bundles, 300 header/content
type combinations, 300 paths/methods, 60 deeply nested extension chains: 1,710 in all). The cases actually tried and the status
codes seen are written to `reports/fuzz-receiver.json` when the module finishes.

Every case checks: no exception escapes the app and no 5xx; a non-2xx answer is an
OperationOutcome (application/fhir+json) whose issues all carry diagnostics; a refused request
leaves the Redis database exactly as it was (DBSIZE and a DUMP of every key; for a 422 the
bounded reject store `rf:{meta}:rejects*` may change, nothing else); an accepted PUT is read
back byte for byte with `SpeedStore.get`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, unquote

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from core import auth
from core.settings import Settings
from core.store import HOURLY_KEY, TYPES_KEY, SpeedStore
from core.validation import NEVER_STORED
from receiver.app import create_app
from serving.derive import default_deriver
from tests.conftest import SHARED, empty_redis, redis_db
from tests.examples import official_examples

# A database of its own: other test runs sharing the Redis flush theirs (9) at any moment, and
# this module compares whole-database snapshots.
FUZZ_REDIS_URL = os.environ.get("FUZZ_RECEIVER_REDIS_URL", redis_db(10))

TOKEN = "fuzz-receiver-token"
HMAC_SECRET = "fuzz-hmac-secret"
MAX_BODY = 64 * 1024
REJECT_KEYS_PREFIX = b"rf:{meta}:rejects"
STATISTICS_KEYS = {HOURLY_KEY.encode(), TYPES_KEY.encode()}
REPORT = Path(__file__).resolve().parents[1] / "reports" / "fuzz-receiver.json"

MAX_BYTES = 250
MAX_JSON = 250
MAX_MUTATED = 400
MAX_BUNDLES = 150
MAX_HEADERS = 300
MAX_PATHS = 300

GOOD_CT = "application/fhir+json; charset=UTF-8"
# The official examples with an id of their own, but the one the receiver refuses.
EXAMPLES: list[tuple[str, bytes, dict[str, Any]]] = [
    (e.name, e.raw, json.loads(e.raw))
    for e in official_examples(SHARED)
    if e.own_id and e.name != "bundle-questionnaire.json"
]

FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- the run's record ---------------------------------------------------------------------


@dataclass
class Tally:
    cases: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)


TALLIES: dict[str, Tally] = collections.defaultdict(Tally)


def write_report(path: Path, module: str, tallies: dict[str, Tally], seconds: float) -> None:
    """Record how many cases each property tried this run, and the statuses they met."""
    path.parent.mkdir(exist_ok=True)
    report = {
        "module": module,
        "seconds": round(seconds, 1),
        "total_cases": sum(t.cases for t in tallies.values()),
        "properties": {
            name: {
                "cases": t.cases,
                "statuses": {str(k): v for k, v in sorted(t.statuses.items())},
            }
            for name, t in sorted(tallies.items())
        },
    }
    path.write_text(json.dumps(report, indent=2) + "\n")


@pytest.fixture(scope="module", autouse=True)
def _write_report() -> Iterator[None]:
    started = time.monotonic()
    yield
    write_report(REPORT, "tests/test_fuzz_receiver.py", TALLIES, time.monotonic() - started)


# -- driving the app as uvicorn would ---------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Fuzzed:
    """The app with its lifespan state, and a raw request function."""

    app: Starlette
    state: dict[str, Any]
    redis: aioredis.Redis
    store: SpeedStore

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        chunked: bool = False,
    ) -> Answer:
        raw_path, _, query = target.encode("ascii").partition(b"?")
        header_bytes = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        if not chunked:
            header_bytes.append((b"content-length", str(len(body)).encode()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            # uvicorn: path = unquote(raw_path.decode("ascii"))
            "path": unquote(raw_path.decode("ascii")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": header_bytes,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8081),
            "state": dict(self.state),
        }
        pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)] if chunked else [body]
        pieces = pieces or [b""]
        messages = [
            {"type": "http.request", "body": p, "more_body": n < len(pieces) - 1}
            for n, p in enumerate(pieces)
        ]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)  # the client stays connected
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await asyncio.wait_for(self.app(scope, receive, send), timeout=30)  # type: ignore[arg-type]
        start = next(m for m in sent if m["type"] == "http.response.start")
        return Answer(
            status=start["status"],
            headers={k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]},
            body=b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"),
        )


@pytest.fixture
async def fuzz_redis() -> AsyncIterator[aioredis.Redis]:
    async with empty_redis(FUZZ_REDIS_URL) as client:
        yield client


@pytest.fixture
async def fuzzed(fuzz_redis: aioredis.Redis) -> AsyncIterator[Fuzzed]:
    settings_ = Settings(
        redis_url=FUZZ_REDIS_URL,
        receiver_tokens=(TOKEN, "second-token"),
        receiver_hmac_secret=HMAC_SECRET,
        receiver_max_body_bytes=MAX_BODY,
    )

    async def no_hapi(resource_type: str, resource_id: str) -> None:
        raise ConnectionError("no HAPI in the fuzz tests")

    app = create_app(settings_, derive=default_deriver(), latest_version=no_hapi)
    async with app.router.lifespan_context(app) as state:
        yield Fuzzed(app, dict(state or {}), fuzz_redis, SpeedStore(fuzz_redis))


# -- the invariants -----------------------------------------------------------------------


Snapshot = tuple[int, dict[bytes, bytes | None]]


async def snapshot(redis: aioredis.Redis) -> Snapshot:
    # The test database holds a few dozen keys at most: KEYS is fine here.
    keys: list[bytes] = sorted(cast(list[bytes], await redis.keys("*")))
    dumps = [await redis.dump(k) for k in keys]
    return int(await redis.dbsize()), dict(zip(keys, dumps, strict=True))


def without_rejects(snap: Snapshot) -> dict[bytes, bytes | None]:
    return {k: v for k, v in snap[1].items() if not k.startswith(REJECT_KEYS_PREFIX)}


def without_statistics(snap: Snapshot) -> Snapshot:
    # The receiver's once-a-second flusher writes the counts of earlier *accepted* writes
    # whenever it wakes, so these two keys may change under any request.
    kept = {k: v for k, v in snap[1].items() if k not in STATISTICS_KEYS}
    return snap[0] - (len(snap[1]) - len(kept)), kept


async def seed(fz: Fuzzed) -> None:
    """An empty database plus a little data, so a refused write would visibly change it."""
    await fz.redis.flushdb()
    await fz.store.mark_epoch()
    body = json.dumps(
        {"resourceType": "Patient", "id": "seed", "meta": {"versionId": "3"}, "gender": "female"}
    ).encode()
    answer = await fz.request("PUT", "/fhir/Patient/seed", good_headers(), body)
    assert answer.status == 204
    await fz.state["store"].flush_stats()


def good_headers(content_type: str | None = GOOD_CT) -> list[tuple[str, str]]:
    headers = [("Authorization", f"Bearer {TOKEN}")]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    return headers


def check_outcome(answer: Answer) -> None:
    assert answer.headers.get("content-type", "").startswith("application/fhir+json"), answer
    outcome = json.loads(answer.body)
    assert outcome["resourceType"] == "OperationOutcome", outcome
    assert isinstance(outcome["issue"], list) and outcome["issue"], outcome
    for issue in outcome["issue"]:
        assert isinstance(issue.get("diagnostics"), str) and issue["diagnostics"].strip(), outcome
        assert issue.get("severity") and issue.get("code"), outcome


async def exchange(
    fz: Fuzzed,
    name: str,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    chunked: bool = False,
) -> Answer:
    """One request with every invariant of the module checked around it."""
    decoded = unquote(target.partition("?")[0])
    parts = decoded.split("/")
    put_target = method == "PUT" and len(parts) == 4 and parts[:2] == ["", "fhir"]
    held_before = await fz.store.get(parts[2], parts[3]) if put_target else None
    before = without_statistics(await snapshot(fz.redis))
    answer = await fz.request(method, target, headers, body, chunked)
    after = without_statistics(await snapshot(fz.redis))
    tally = TALLIES[name]
    tally.cases += 1
    tally.statuses[answer.status] += 1

    assert answer.status < 500, (answer, method, target, body[:300])
    assert answer.status in {200, 204, 400, 401, 404, 405, 413, 415, 422}, (answer, target)
    if answer.status == 200:  # only the unauthenticated GET endpoints answer 200
        assert method in {"GET", "HEAD"} and decoded in {"/health", "/metrics"}, target
        return answer
    if answer.status == 204:
        assert answer.body == b""
        if put_target and parts[2] in NEVER_STORED:
            # Taken (HAPI must not retry it) but never cached: it holds the receiver's token.
            assert await fz.store.get(parts[2], parts[3]) is None
        elif put_target:
            held = await fz.store.get(parts[2], parts[3])
            assert held is not None
            if held_before is None:
                assert held.state == "present" and held.body == body, (held, body[:300])
            else:  # an older or equal version is a no-op that still answers 204
                assert held.body == body or held == held_before, (held, held_before)
        return answer
    check_outcome(answer)
    if answer.status == 422:
        assert without_rejects(before) == without_rejects(after), target
    else:
        changed = sorted(
            k for k in before[1].keys() | after[1].keys() if before[1].get(k) != after[1].get(k)
        )
        assert before == after, (answer.status, target, changed, body[:300])
    if answer.status == 401:
        assert answer.headers.get("www-authenticate") == "Bearer"
    return answer


# -- strategies ---------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["", " ", "\u0000", "\U0001f600", "Patient", "1970-01-01", "male", "x" * 300])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=25,
)
resource_types = st.sampled_from(
    ["Patient", "Observation", "Condition", "Bundle", "Parameters", "OperationOutcome", "Binary"]
) | st.text(max_size=20)


def deep_array(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@st.composite
def mutated_example(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """An official example with a few elements dropped, replaced, retyped or blown up."""
    _name, raw, original = draw(st.sampled_from(EXAMPLES))
    data = copy.deepcopy(original)
    path_type, path_id = original["resourceType"], original["id"]
    deep: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 3))):
        paths = list(walk(data))
        path = draw(st.sampled_from(paths))
        parent, key = locate(data, path)
        if parent is None:
            continue
        current = parent[key]
        op = draw(
            st.sampled_from(
                ["drop", "replace", "retype", "huge", "unicode", "deep", "null", "wrap", "empty"]
            )
        )
        if op == "drop":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(json_values)
        elif op == "retype":
            parent[key] = retype(current)
        elif op == "huge":
            parent[key] = draw(
                st.sampled_from([10**30, -(10**30), 2**63, 2**64 + 1, 1e308, -1e308, 5e-324, 0.1])
            )
        elif op == "unicode":
            parent[key] = draw(st.text(min_size=1, max_size=50))
        elif op == "deep":
            marker = f"__deep_{len(deep)}__"
            deep[marker] = deep_array(draw(st.sampled_from([5, 100, 600, 1100, 3000])))
            parent[key] = marker
        elif op == "null":
            parent[key] = None
        elif op == "wrap":
            parent[key] = [current]
        else:
            parent[key] = type(current)() if isinstance(current, list | dict | str) else ""
    if data == original:
        return path_type, path_id, raw
    text = json.dumps(data, ensure_ascii=draw(st.booleans()))
    for marker, replacement in deep.items():
        text = text.replace(json.dumps(marker), replacement)
    return path_type, path_id, text.encode("utf-8", "surrogatepass")


def walk(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if path:
        yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, (*path, i))


def locate(data: Any, path: tuple[Any, ...]) -> tuple[Any, Any]:
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    return parent, path[-1]


def retype(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        try:
            return float(value) if "." in value else int(value)
        except ValueError:
            return {"value": value}
    if isinstance(value, list):
        return value[0] if value else {}
    if isinstance(value, dict):
        return [value]
    return 0


# -- the properties -----------------------------------------------------------------------


@settings(FUZZ_SETTINGS, max_examples=MAX_BYTES)
@given(body=st.binary(max_size=3000), chunked=st.booleans())
async def test_random_bytes_never_500_and_write_nothing(
    fuzzed: Fuzzed, body: bytes, chunked: bool
) -> None:
    await seed(fuzzed)
    answer = await exchange(
        fuzzed, "random_bytes", "PUT", "/fhir/Patient/p1", good_headers(), body, chunked
    )
    assert answer.status in {400, 422}


@settings(FUZZ_SETTINGS, max_examples=MAX_JSON)
@given(
    value=json_values | st.dictionaries(st.text(max_size=12), json_values, max_size=6),
    resource_type=resource_types,
    with_id=st.sampled_from([None, "p1", "p2", 7, ""]),
)
async def test_random_json_never_500(
    fuzzed: Fuzzed, value: Any, resource_type: str, with_id: Any
) -> None:
    await seed(fuzzed)
    if isinstance(value, dict):
        value = {**value, "resourceType": resource_type}
        if with_id is not None:
            value["id"] = with_id
    body = json.dumps(value).encode()
    await exchange(fuzzed, "random_json", "PUT", "/fhir/Patient/p1", good_headers(), body)


@settings(FUZZ_SETTINGS, max_examples=MAX_MUTATED)
@given(case=mutated_example(), content_type=st.sampled_from([GOOD_CT, "application/json", None]))
async def test_mutated_official_examples_never_500(
    fuzzed: Fuzzed, case: tuple[str, str, bytes], content_type: str | None
) -> None:
    await seed(fuzzed)
    path_type, path_id, body = case
    await exchange(
        fuzzed,
        "mutated_examples",
        "PUT",
        f"/fhir/{path_type}/{path_id}",
        good_headers(content_type),
        body,
    )


def status_parameters() -> dict[str, Any]:
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
        ],
    }


@st.composite
def topic_bundles(draw: st.DrawFn) -> bytes:
    """A topic notification Bundle's bytes: full, mutated, deleted, id-only and junk entries."""
    raw: dict[str, bytes] = {}
    entries: list[Any] = [{"resource": status_parameters()}]
    for n in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["full", "mutated", "delete", "id-only", "junk"]))
        if kind == "full":
            entries.append(
                {
                    "resource": {
                        "resourceType": "Patient",
                        "id": f"b{n}",
                        "meta": {"versionId": str(n + 1)},
                        "gender": draw(st.sampled_from(["male", "female", "robot"])),
                    }
                }
            )
        elif kind == "mutated":
            # The mutated bytes go in as they are (they may not even parse).
            marker = f"__raw_{n}__"
            raw[marker] = draw(mutated_example())[2]
            entries.append({"resource": marker})
        elif kind == "delete":
            url = draw(
                st.sampled_from(["Patient/seed", "Patient/b9", "Nope/x", "Patient/", "Patient/a$b"])
                | st.text(max_size=30)
            )
            entries.append({"request": {"method": "DELETE", "url": url}})
        elif kind == "id-only":
            entries.append({"fullUrl": "http://hapi/fhir/Patient/p9", "request": {"method": "PUT"}})
        else:
            entries.append(draw(json_values))
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "entry": entries}
    mutation = draw(st.sampled_from(["none", "none", "type", "first", "entry", "rt"]))
    if mutation == "type":
        bundle["type"] = draw(json_values)
    elif mutation == "first":
        entries[0] = draw(json_values)
    elif mutation == "entry":
        bundle["entry"] = draw(json_values)
    elif mutation == "rt":
        bundle["resourceType"] = draw(json_values)
    body = json.dumps(bundle).encode()
    for marker, replacement in raw.items():
        body = body.replace(json.dumps(marker).encode(), replacement)
    return body


@settings(FUZZ_SETTINGS, max_examples=MAX_BUNDLES)
@given(body=topic_bundles())
async def test_topic_bundles_never_500_and_refusals_write_nothing(
    fuzzed: Fuzzed, body: bytes
) -> None:
    await seed(fuzzed)
    answer = await exchange(fuzzed, "topic_bundles", "POST", "/fhir", good_headers(), body)
    if answer.status == 204:
        bundle = json.loads(body)
        # Every full resource of an accepted notification is held. Two mutations of one
        # official example share its id (and version): then one of them is, whichever the
        # version guard kept.
        sent: dict[tuple[str, str], list[Any]] = {}
        for entry in bundle["entry"][1:]:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource["resourceType"] not in NEVER_STORED:
                key = (resource["resourceType"], resource.get("id", ""))
                sent.setdefault(key, []).append(resource)
        for (resource_type, resource_id), candidates in sent.items():
            held = await fuzzed.store.get(resource_type, resource_id)
            assert held is not None and held.body is not None
            assert json.loads(held.body) in candidates


def authorization_values() -> st.SearchStrategy[tuple[str | None, bool]]:
    """(Authorization header value or None, whether it must be accepted)."""
    latin1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)
    basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()
    return st.one_of(
        st.sampled_from([(f"Bearer {TOKEN}", True), ("Bearer second-token", True)]),
        st.sampled_from(
            [
                (f"Bearer {TOKEN}", True),
                (f"bearer {TOKEN}", True),
                (f"BEARER   {TOKEN}  ", True),
                ("Bearer second-token", True),
                (None, False),
                ("", False),
                ("Bearer", False),
                ("Bearer ", False),
                (TOKEN, False),
                (f"Bearer {TOKEN}x", False),
                (f"Bearer {TOKEN[:-1]}", False),
                (f"Bearer {TOKEN},second-token", False),
                (f"Bearer {TOKEN} junk", False),
                (f"Basic {basic}", False),
                (f"Token {TOKEN}", False),
                (f"Bearer {'A' * 100_000}", False),
                ("Bearer \u00ff\u00fe", False),
                (f"Bearer\t{TOKEN}", False),
            ]
        ),
        latin1.map(lambda s: (s, False)),
        latin1.map(lambda s: (f"Bearer {s}", s.strip() in {TOKEN, "second-token"})),
    )


content_types = st.one_of(
    st.sampled_from(
        [
            None,
            GOOD_CT,
            "application/fhir+json",
            "application/json",
            "APPLICATION/JSON; charset=utf-8",
            "application/json+fhir",
            "application/fhir+xml",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
            ";",
            "application/json;charset=latin-1",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40),
)


@settings(FUZZ_SETTINGS, max_examples=MAX_HEADERS)
@given(
    authorization=authorization_values(),
    content_type=content_types,
    signature=st.sampled_from(["none", "good", "stale", "wrong", "junk"]),
    if_match=st.sampled_from([None, '"3"', 'W/"3"', "*", "\u00e9"]),
    method=st.sampled_from(["PUT", "PUT", "DELETE", "POST"]),
    valid_body=st.booleans(),
)
async def test_headers_and_content_types(
    fuzzed: Fuzzed,
    authorization: tuple[str | None, bool],
    content_type: str | None,
    signature: str,
    if_match: str | None,
    method: str,
    valid_body: bool,
) -> None:
    await seed(fuzzed)
    value, accepted = authorization
    body = json.dumps(
        {"resourceType": "Patient", "id": "p1", "meta": {"versionId": "1"}, "gender": "male"}
        if valid_body
        else {"resourceType": "Patient", "id": "p1", "gender": "robot"}
    ).encode()
    if method == "POST" and valid_body:
        body = b""
    headers: list[tuple[str, str]] = []
    if value is not None:
        headers.append(("Authorization", value))
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    if if_match is not None:
        headers.append(("If-Match", if_match))
    signed = {
        "good": auth.sign(HMAC_SECRET, body),
        "stale": auth.sign(HMAC_SECRET, body, timestamp=int(time.time()) - 3600),
        "wrong": auth.sign("not-the-secret", body),
        "junk": "t=1e9,v1=zz,,=" + "9" * 5000,
    }.get(signature)
    if signed is not None:
        headers.append((auth.SIGNATURE_HEADER, signed))
    target = "/fhir" if method == "POST" else "/fhir/Patient/p1"
    answer = await exchange(fuzzed, "headers", method, target, headers, body)
    if accepted or signature == "good":
        assert answer.status != 401, answer
    else:
        assert answer.status == 401, answer


path_segments = st.one_of(
    st.sampled_from(
        [
            "Patient",
            "Observation",
            "Spaceship",
            "patient",
            "..",
            ".",
            "%2e%2e",
            "p1",
            "a$b",
            "%2F",
            "a%2Fb",
            "%00",
            "%",
            "%zz",
            "\u00e9",
            "x" * 70,
            "x" * 5000,
            "",
            "seed",
            "%20",
        ]
    ),
    st.text(max_size=20),
    st.text(st.sampled_from("abcAZ09-._~%/:@!$&'()*+,;=?#[] \\"), max_size=20),
)


@settings(FUZZ_SETTINGS, max_examples=MAX_PATHS)
@given(
    segments=st.one_of(
        st.tuples(st.sampled_from(["Patient", "Observation", "Condition"]), path_segments).map(
            list
        ),
        st.tuples(path_segments, path_segments).map(list),
        st.lists(path_segments, min_size=0, max_size=4),
    ),
    prefix=st.sampled_from(["/fhir", "/fhir", "/fhir", "/FHIR", "", "/fhir/"]),
    method=st.sampled_from(
        ["PUT", "PUT", "DELETE", "DELETE", "POST", "GET", "PATCH", "HEAD", "OPTIONS"]
    ),
    authenticated=st.booleans(),
    query=st.sampled_from(["", "?_format=json", "?a=%ff", "?" + "x" * 3000]),
)
async def test_paths_and_methods(
    fuzzed: Fuzzed,
    segments: list[str],
    prefix: str,
    method: str,
    authenticated: bool,
    query: str,
) -> None:
    await seed(fuzzed)
    # Characters outside printable ASCII are percent-encoded, as a client must send them.
    path = prefix + "".join("/" + s for s in segments)
    target = quote(path, safe="/%:@!$&'()*+,;=[]-._~") + query
    if not target.startswith("/"):
        target = "/" + target
    decoded = unquote(target.partition("?")[0]).split("/")
    rtype = decoded[2] if len(decoded) > 2 else "Patient"
    rid = decoded[3] if len(decoded) > 3 else "p1"
    body = json.dumps(
        {"resourceType": rtype, "id": rid, "meta": {"versionId": "9"}, "gender": "other"}
    ).encode()
    headers = good_headers() if authenticated else [("Content-Type", GOOD_CT)]
    await exchange(fuzzed, "paths_methods", method, target, headers, body)


MAX_DEEP = 60


def extension_chain(depth: int) -> dict[str, Any]:
    extension: dict[str, Any] = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(depth):
        extension = {"url": "http://example.org/x", "extension": [extension]}
    return {"resourceType": "Patient", "id": "deep", "extension": [extension]}


@settings(FUZZ_SETTINGS, max_examples=MAX_DEEP)
@given(depth=st.integers(1, 600), in_bundle=st.booleans())
async def test_deeply_nested_valid_looking_resources(
    fuzzed: Fuzzed, depth: int, in_bundle: bool
) -> None:
    """Nested extensions are valid FHIR at any depth; too deep once overflowed the models'
    recursive validation (PUT) and orjson's writer (Bundle entries): 500s."""
    await seed(fuzzed)
    resource = extension_chain(depth)
    if in_bundle:
        body = json.dumps(
            {
                "resourceType": "Bundle",
                "type": "history",
                "entry": [{"resource": status_parameters()}, {"resource": resource}],
            }
        ).encode()
        answer = await exchange(fuzzed, "deep_extensions", "POST", "/fhir", good_headers(), body)
    else:
        body = json.dumps(resource).encode()
        answer = await exchange(
            fuzzed, "deep_extensions", "PUT", "/fhir/Patient/deep", good_headers(), body
        )
    assert answer.status in {204, 400, 422}
    # Containers nested in the resource: root, then a list and a dict per extension.
    levels = 2 * depth + 3
    body_levels = levels + (2 if in_bundle else 0)  # Bundle.entry[] and the entry
    if body_levels > 1024:  # past orjson's parser: malformed JSON
        assert answer.status == 400, answer
    elif levels > 100:  # past the gate's limit
        assert answer.status == 422, answer
    else:
        assert answer.status == 204, answer
