"""Shared fixtures: a real Redis and a real PostgreSQL, cleaned after each test."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

# Imported early: pytest rewrites hypothesis's modules as it imports them, and a late import (at
# exit, or the optimiser's in the middle of a test) trips a CPython 3.11.7 AST bug.
import hypothesis.internal.conjecture.optimiser  # noqa: F401
import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from core.store import SpeedStore
from tests.procs import temporary_database

SHARED = Path(os.environ.get("RESEARCHFLOW_SHARED", Path(__file__).resolve().parents[2] / "shared"))
# Tests use their own Redis database number so they never touch a deployment's data.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
TEST_PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://127.0.0.1:5432/postgres")


@pytest.fixture
def shared_dir() -> Path:
    return SHARED


def redis_db(number: int) -> str:
    """The URL of another database of the test Redis (a module that must not share db 9)."""
    return TEST_REDIS_URL.rsplit("/", 1)[0] + f"/{number}"


@contextlib.asynccontextmanager
async def empty_redis(url: str = TEST_REDIS_URL) -> AsyncIterator[aioredis.Redis]:
    """A client of that Redis database, emptied before and after."""
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    async with empty_redis() as client:
        yield client


@pytest.fixture
async def store(redis_client: aioredis.Redis) -> SpeedStore:
    return SpeedStore(redis_client)


@contextlib.contextmanager
def fresh_database(prefix: str = "rf_test") -> Iterator[str]:
    """A new, empty PostgreSQL database (its URL), dropped afterwards."""
    with temporary_database(TEST_PG_ADMIN_URL, prefix) as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    with fresh_database() as url:
        yield url


@pytest.fixture
def settings(pg_url: str) -> Settings:
    return Settings(
        redis_url=TEST_REDIS_URL,
        database_url=pg_url,
        fhir_base_url="http://127.0.0.1:1/fhir",
        receiver_tokens=("test-token",),
        serving_tokens=("serve-token",),
    )


# The real HAPI FHIR server, started once per session for the `hapi` tests (tests/real_hapi.py).
from tests.real_hapi import real_hapi  # noqa: E402, F401
