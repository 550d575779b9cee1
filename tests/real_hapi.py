"""The real HAPI FHIR server for the `hapi` tests: started once per session through
`hapi-config/hapi.sh` on a free port with a private database, stopped at the end.

It needs Java 17+ and Maven (the machine has both); without them the tests FAIL with a line
saying so, they are never skipped. Deselect them with `-m "not hapi"` on a machine without.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.conftest import TEST_PG_ADMIN_URL
from tests.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
HAPI_SH = ROOT / "hapi-config" / "hapi.sh"
# The first start builds the server from Maven Central (the contract allows 15 minutes).
START_TIMEOUT = 1200
FHIR_JSON = "application/fhir+json"
NO_CACHE = {"Cache-Control": "no-cache"}


@dataclass(frozen=True)
class RealHapi:
    """A running HAPI FHIR 8.8 JPA server of this test session."""

    base_url: str  # http://127.0.0.1:PORT/fhir
    database_url: str  # libpq URL of HAPI's own PostgreSQL database
    port: int
    log: Path  # the server's log file


def _hapi_env(port: int, database_url: str, run_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HAPI_PORT": str(port),
        "HAPI_DATABASE_URL": database_url,
        "HAPI_RUN_DIR": str(run_dir),
    }


@pytest.fixture(scope="session")
def real_hapi() -> Iterator[RealHapi]:
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"the real-HAPI tests need Java 17+ and Maven; not found: {', '.join(missing)} "
            '(deselect them with -m "not hapi")',
            pytrace=False,
        )
    port = free_port()
    name = f"rf_hapi_{uuid.uuid4().hex[:10]}"
    database_url = TEST_PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    run_dir = Path(tempfile.mkdtemp(prefix="rf-hapi-"))
    env = _hapi_env(port, database_url, run_dir)
    try:
        started = subprocess.run(
            ["bash", str(HAPI_SH), "start"],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        if started.returncode != 0:
            last = (started.stderr.strip().splitlines() or ["(no output)"])[-1]
            pytest.fail(f"hapi.sh start failed: {last}", pytrace=False)
        base_url = started.stdout.strip().splitlines()[-1]
        yield RealHapi(base_url, database_url, port, run_dir / f"hapi-{port}.log")
    finally:
        subprocess.run(["bash", str(HAPI_SH), "stop"], env=env, capture_output=True, check=False)
        with psycopg.connect(TEST_PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
        shutil.rmtree(run_dir, ignore_errors=True)


# --- talking to HAPI with plain httpx (the reference path shares no project code) --------


def http(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", timeout=60.0)


async def put(client: httpx.AsyncClient, resource: Mapping[str, Any]) -> dict[str, Any]:
    response = await client.put(
        f"{resource['resourceType']}/{resource['id']}",
        json=dict(resource),
        headers={"Content-Type": FHIR_JSON},
    )
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


async def post(client: httpx.AsyncClient, resource: Mapping[str, Any]) -> dict[str, Any]:
    response = await client.post(
        str(resource["resourceType"]), json=dict(resource), headers={"Content-Type": FHIR_JSON}
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def delete(client: httpx.AsyncClient, resource_type: str, resource_id: str) -> None:
    response = await client.delete(f"{resource_type}/{resource_id}")
    assert response.status_code in (200, 204), response.text


async def transaction(client: httpx.AsyncClient, entries: list[dict[str, Any]]) -> dict[str, Any]:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    response = await client.post("", json=bundle, headers={"Content-Type": FHIR_JSON})
    assert response.status_code == 200, response.text
    return dict(response.json())


def put_entry(resource: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "resource": dict(resource),
        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
    }


def delete_entry(resource_type: str, resource_id: str) -> dict[str, Any]:
    return {"request": {"method": "DELETE", "url": f"{resource_type}/{resource_id}"}}


@dataclass(frozen=True)
class HapiState:
    """HAPI's own answer about one resource: its newest version and whether it is deleted."""

    version: str
    deleted: bool
    resource: dict[str, Any] | None


async def hapi_state(client: httpx.AsyncClient, resource_type: str, rid: str) -> HapiState:
    """From `GET {type}/{id}/_history` (newest first; a deletion is an entry without resource)."""
    response = await client.get(
        f"{resource_type}/{rid}/_history", params={"_count": 1}, headers=NO_CACHE
    )
    assert response.status_code == 200, response.text
    entry = response.json()["entry"][0]
    resource = entry.get("resource")
    if resource is None:
        # HAPI names the deleted version in the entry's fullUrl/request or response.
        url = (entry.get("request") or {}).get("url") or entry.get("fullUrl") or ""
        version = url.rsplit("/_history/", 1)[-1] if "/_history/" in url else ""
        if not version:
            etag = (entry.get("response") or {}).get("etag") or ""
            version = etag.removeprefix("W/").strip('"')
        return HapiState(version, True, None)
    return HapiState(str(resource["meta"]["versionId"]), False, dict(resource))


async def search_all(
    client: httpx.AsyncClient, resource_type: str, params: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Every match of a search, following HAPI's `next` links."""
    out: list[dict[str, Any]] = []
    response = await client.get(resource_type, params={**params, "_count": "200"}, headers=NO_CACHE)
    while True:
        assert response.status_code == 200, response.text
        bundle = response.json()
        out += [e["resource"] for e in bundle.get("entry") or [] if "resource" in e]
        nxt = next(
            (link["url"] for link in bundle.get("link") or [] if link["relation"] == "next"), None
        )
        if nxt is None:
            return out
        response = await client.get(nxt, headers=NO_CACHE)


# --- what HAPI sent the receiver ---------------------------------------------------------


class Recorder:
    """ASGI middleware in front of the receiver: keeps each request HAPI sent, byte for byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests: list[tuple[str, str, bytes, dict[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = bool(message.get("more_body"))
        body = b"".join(chunks)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append((scope["method"], scope["path"], body, headers))
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def put_of_version(self, resource_type: str, rid: str, version: str) -> bytes | None:
        """The body of the PUT that carried that version (HAPI's two delivery threads and
        its retries may send an older version after a newer one), by its If-Match header."""
        path = f"/fhir/{resource_type}/{rid}"
        bodies = [
            b
            for m, p, b, headers in self.requests
            if m == "PUT" and p == path and headers.get("if-match") == f'W/"{version}"'
        ]
        return bodies[-1] if bodies else None


async def eventually(check: Any, seconds: float = 60.0, step: float = 0.25) -> None:
    """Wait until the coroutine function `check()` returns True, else fail."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still not true after {seconds:g} s")
        await asyncio.sleep(step)
