"""Compressed deliveries through the receiver app: gzip and deflate decoded within the body limit
(a small bomb is a 413 without ever being inflated), other codings a 415 with Accept-Encoding,
a coding that does not match the body a 400 that says so. The encoded bodies come from Python's
gzip/zlib modules, never from the decoder under test."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import auth
from core.errors import InvalidRequest
from core.store import SpeedStore
from receiver.app import create_app
from receiver.body import BodyTooLarge, content_codings, decode_body
from tests.asgi import running
from tests.test_receiver import HEADERS, TOKEN, no_hapi, patient, receiver_settings

LIMIT = 64 * 1024


def zlib_format(data: bytes) -> bytes:
    return zlib.compress(data)  # RFC 1950: what HTTP calls `deflate`


def gzip_bomb(decoded_size: int) -> bytes:
    """gzip of `decoded_size` zero bytes, made in pieces (the bomb never exists decoded here)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    piece = bytes(1024 * 1024)
    parts = [packer.compress(piece) for _ in range(decoded_size // len(piece))]
    return b"".join(parts) + packer.flush()


@pytest.fixture
async def client(redis_client: aioredis.Redis) -> Any:
    app = create_app(receiver_settings(receiver_max_body_bytes=LIMIT), latest_version=no_hapi)
    async with running(app) as c:
        yield c


def issues_text(response: httpx.Response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return " ".join(i["diagnostics"] for i in body["issue"])


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("GZip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib_format),
        ("identity", lambda raw: raw),
        ("gzip, identity", gzip.compress),
        ("deflate, gzip", lambda raw: gzip.compress(zlib_format(raw))),
    ],
)
async def test_encoded_put_is_decoded_and_kept_as_sent_before_encoding(
    client: httpx.AsyncClient, store: SpeedStore, coding: str, encode: Any
) -> None:
    raw = b'{"resourceType":"Patient","id":"p1","meta":{"versionId":"1"},  "gender":"male"}'
    response = await client.put(
        "/fhir/Patient/p1", content=encode(raw), headers={**HEADERS, "Content-Encoding": coding}
    )
    assert response.status_code == 204, response.text
    entry = await store.get("Patient", "p1")
    assert entry is not None and entry.body == raw


async def test_gzip_of_several_members_is_one_body(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    raw = json.dumps(patient(gender="female")).encode()
    body = gzip.compress(raw[:20]) + gzip.compress(raw[20:])  # RFC 1952 §2.2
    response = await client.put(
        "/fhir/Patient/p1", content=body, headers={**HEADERS, "Content-Encoding": "gzip"}
    )
    assert response.status_code == 204
    entry = await store.get("Patient", "p1")
    assert entry is not None and entry.body == raw


async def test_gzip_notification_bundle_and_empty_payload(
    client: httpx.AsyncClient, store: SpeedStore
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {"resource": {"resourceType": "Parameters", "parameter": []}},
            {"resource": patient("p7")},
        ],
    }
    response = await client.post(
        "/fhir",
        content=gzip.compress(json.dumps(bundle).encode()),
        headers={**HEADERS, "Content-Encoding": "gzip"},
    )
    assert response.status_code == 204
    assert await store.get("Patient", "p7") is not None
    # An empty-payload notification that passed a compressing proxy: nothing to decode.
    response = await client.post(
        "/fhir", content=b"", headers={**HEADERS, "Content-Encoding": "gzip"}
    )
    assert response.status_code == 204


async def test_a_small_bomb_is_413_and_never_inflated(
    client: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    bomb = gzip_bomb(60 * 1024 * 1024)  # 60 MiB of zeros in under 64 KiB
    assert len(bomb) < LIMIT  # small enough to pass the limit as sent
    tracemalloc.start()
    try:
        response = await client.put(
            "/fhir/Patient/p1", content=bomb, headers={**HEADERS, "Content-Encoding": "gzip"}
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 413
    assert "decoded body" in issues_text(response)
    assert peak < 16 * LIMIT  # the 60 MiB never existed (peak is bytes allocated meanwhile)
    assert await redis_client.dbsize() == 0
    # A body of exactly the limit once decoded is taken, one byte more is refused.
    for size, status in ((LIMIT, 204), (LIMIT + 1, 413)):
        response = await client.put(
            "/fhir/Patient/p1",
            content=gzip.compress(sized_patient(size)),
            headers={**HEADERS, "Content-Encoding": "gzip"},
        )
        assert response.status_code == status, response.text


def sized_patient(size: int) -> bytes:
    """A valid Patient of exactly `size` bytes of JSON."""
    narrative = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"></div>'}
    base = len(json.dumps(patient(text=narrative)))
    narrative["div"] = narrative["div"].replace("></div>", ">" + "x" * (size - base) + "</div>")
    body = json.dumps(patient(text=narrative)).encode()
    assert len(body) == size
    return body


@pytest.mark.parametrize(
    ("coding", "body", "why"),
    [
        ("gzip", json.dumps(patient()).encode(), "gzip"),  # a gzip header over a plain body
        ("deflate", json.dumps(patient()).encode(), "deflate"),
        ("gzip", gzip.compress(json.dumps(patient()).encode())[:-12], "ends before"),
        ("deflate", zlib_format(json.dumps(patient()).encode()) + b"tail", "follow"),
        ("deflate", gzip.compress(json.dumps(patient()).encode()), "deflate"),
        ("gzip", gzip.compress(json.dumps(patient()).encode()) + b"junk", "gzip"),
    ],
)
async def test_a_coding_that_does_not_match_the_body_is_400(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, coding: str, body: bytes, why: str
) -> None:
    response = await client.put(
        "/fhir/Patient/p1", content=body, headers={**HEADERS, "Content-Encoding": coding}
    )
    assert response.status_code == 400
    text = issues_text(response)
    assert "Content-Encoding" in text and why in text
    assert response.json()["issue"][0]["expression"] == ["Content-Encoding"]
    assert await redis_client.dbsize() == 0


@pytest.mark.parametrize("coding", ["br", "compress", "zstd", "gzip, br", "gzip, gzip, gzip"])
async def test_another_coding_is_415_with_accept_encoding(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, coding: str
) -> None:
    response = await client.put(
        "/fhir/Patient/p1",
        content=gzip.compress(json.dumps(patient()).encode()),
        headers={**HEADERS, "Content-Encoding": coding},
    )
    assert response.status_code == 415
    offered = {c.strip() for c in response.headers["accept-encoding"].split(",")}
    assert offered == {"gzip", "deflate"}
    assert "Content-Encoding" in issues_text(response)
    assert await redis_client.dbsize() == 0


async def test_credentials_come_before_decoding(
    client: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    headers = {**HEADERS, "Authorization": "Bearer wrong", "Content-Encoding": "br"}
    response = await client.put("/fhir/Patient/p1", content=b"x", headers=headers)
    assert response.status_code == 401


async def test_hmac_signs_the_body_as_sent(redis_client: aioredis.Redis, store: SpeedStore) -> None:
    secret = "hmac-secret"
    app = create_app(receiver_settings(receiver_hmac_secret=secret), latest_version=no_hapi)
    raw = json.dumps(patient()).encode()
    sent = gzip.compress(raw)
    headers = {"Content-Type": "application/fhir+json", "Content-Encoding": "gzip"}
    async with running(app) as client:
        decoded_signed = {**headers, auth.SIGNATURE_HEADER: auth.sign(secret, raw)}
        response = await client.put("/fhir/Patient/p1", content=sent, headers=decoded_signed)
        assert response.status_code == 401
        sent_signed = {**headers, auth.SIGNATURE_HEADER: auth.sign(secret, sent)}
        response = await client.put("/fhir/Patient/p1", content=sent, headers=sent_signed)
        assert response.status_code == 204
    entry = await store.get("Patient", "p1")
    assert entry is not None and entry.body == raw


async def test_decoded_body_still_needs_a_json_content_type(client: httpx.AsyncClient) -> None:
    response = await client.put(
        "/fhir/Patient/p1",
        content=gzip.compress(json.dumps(patient()).encode()),
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "text/plain",
            "Content-Encoding": "gzip",
        },
    )
    assert response.status_code == 415
    assert "accept-encoding" not in response.headers


# -- the decoder alone, on arbitrary bodies and codings --------------------------------------

ENCODERS = {"gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib_format}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.binary(max_size=3000) | st.integers(0, 5000).map(bytes),
    codings=st.lists(st.sampled_from(sorted(ENCODERS)), max_size=2),
    limit=st.integers(0, 4000),
)
def test_decoding_undoes_any_encoding_within_the_limit(
    raw: bytes, codings: list[str], limit: int
) -> None:
    stages = [raw]  # the body after each coding was applied, by Python's own modules
    for coding in codings:
        stages.append(ENCODERS[coding](stages[-1]))
    header = ", ".join(codings)
    parsed = content_codings([header] if header else [])
    assert parsed == codings
    # Every decoding step's output is held to the limit (the last stage is the body as sent).
    if any(len(stage) > limit for stage in stages[:-1]):
        with pytest.raises(BodyTooLarge):
            decode_body(stages[-1], parsed, limit)
    else:
        assert decode_body(stages[-1], parsed, limit) == raw


@given(junk=st.binary(min_size=1, max_size=200), coding=st.sampled_from(sorted(ENCODERS)))
def test_bytes_not_in_the_coding_are_invalid_never_another_error(junk: bytes, coding: str) -> None:
    encoded = ENCODERS[coding](b"")
    if junk.startswith(encoded[:2]):
        junk = b"?" + junk  # not a valid header of either format
    with pytest.raises(InvalidRequest):
        decode_body(junk, [coding], 10_000)
