"""`core.redis_connection.HiredisPackedConnection` sends the bytes redis-py's own asyncio packer
sends and raises the errors it raises, whatever the arguments; `connect` uses it for redis://
and keeps the connection class a rediss:// or unix:// URL names."""

from __future__ import annotations

import enum
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from core.redis_connection import HiredisPackedConnection
from core.settings import Settings
from core.store import SpeedStore, connect
from tests.conftest import TEST_REDIS_URL


class Level(enum.IntEnum):
    LOW = 1


class Name(str):
    pass


_WORDS = st.sampled_from(["EVALSHA", "SET", "CONFIG GET", "GET\t", " GET", "", "x\x1cy", "é"])
_ARGS = st.one_of(
    st.text(),
    st.binary(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(),
    st.booleans(),
    st.none(),
    st.binary().map(bytearray),
    st.binary().map(memoryview),
    st.just(Level.LOW),
    st.text().map(Name),
    st.sampled_from(["\ud800", "a\udfffb"]),
    st.binary(min_size=6001, max_size=7000),  # past redis-py's buffer cutoff: chunked there
)
_FIRST = st.one_of(
    _WORDS, _WORDS.map(str.encode), st.text(max_size=6), st.binary(max_size=6), _ARGS
)


def _packed(connection: aioredis.Connection, args: tuple[Any, ...]) -> tuple[str, Any]:
    """What packing does: ("bytes", the whole command) or ("error", its type and text)."""
    try:
        chunks = connection.pack_command(*args)
    except Exception as exc:
        return "error", (type(exc), str(exc))
    return "bytes", b"".join(bytes(chunk) for chunk in chunks)


@settings(max_examples=800, deadline=None)
@given(first=_FIRST, rest=st.lists(_ARGS, max_size=12))
def test_hiredis_packs_what_redis_py_packs(first: Any, rest: list[Any]) -> None:
    args = (first, *rest)
    assert _packed(HiredisPackedConnection(), args) == _packed(aioredis.Connection(), args)


@settings(max_examples=300, deadline=None)
@given(rest=st.lists(st.one_of(st.text(), st.binary(), st.integers(), st.floats()), max_size=6))
@pytest.mark.parametrize(
    ("encoding", "errors"), [("latin-1", "strict"), ("utf-8", "replace"), ("UTF8", "strict")]
)
def test_another_encoding_packs_as_redis_py_does(
    encoding: str, errors: str, rest: list[Any]
) -> None:
    args = ("SET", *rest)
    ours = HiredisPackedConnection(encoding=encoding, encoding_errors=errors)
    theirs = aioredis.Connection(encoding=encoding, encoding_errors=errors)
    assert _packed(ours, tuple(args)) == _packed(theirs, tuple(args))


def test_an_empty_command_fails_as_in_redis_py() -> None:
    assert _packed(HiredisPackedConnection(), ()) == _packed(aioredis.Connection(), ())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", HiredisPackedConnection),
        ("rediss://127.0.0.1:6379/0", aioredis.SSLConnection),
        ("unix:///tmp/redis.sock", aioredis.UnixDomainSocketConnection),
    ],
)
async def test_connect_packs_in_hiredis_only_over_plain_tcp(url: str, expected: type) -> None:
    client = connect(Settings(redis_url=url))
    try:
        assert isinstance(client, aioredis.Redis)
        assert client.connection_pool.connection_class is expected
    finally:
        await client.aclose()


async def test_a_write_and_its_values_round_trip_through_a_real_redis() -> None:
    """Every argument type the store sends, through the Lua write and plain commands."""
    client = connect(Settings(redis_url=TEST_REDIS_URL))
    try:
        assert client.connection_pool.connection_class is HiredisPackedConnection
        await client.flushdb()
        key = "rf:test:hiredis"
        await client.hset(key, mapping={"s": "é\u2603", "b": b"\x00\xff", "i": -7, "f": 0.1})
        assert await client.hgetall(key) == {
            b"s": "é\u2603".encode(),
            b"b": b"\x00\xff",
            b"i": b"-7",
            b"f": b"0.1",
        }
        store = SpeedStore(client)
        body = b'{"resourceType":"Patient","id":"p1","meta":{"versionId":"2"}}'
        assert await store.upsert(
            "Patient", "p1", body=body, version_id="2", last_updated="2026-11-25T10:00:00Z"
        )
        entry = await store.get("Patient", "p1")
        assert entry is not None and entry.body == body
    finally:
        await client.flushdb()
        await client.aclose()
