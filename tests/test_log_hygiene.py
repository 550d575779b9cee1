"""No log record carries a resource body, a token or the HMAC secret, at DEBUG on every logger.

One full flow with every logger at DEBUG and a handler on the root logger (plus on any logger
that does not propagate): the receiver under a real uvicorn with its access log on (the CLI
runs it with the access log off; on is the stricter case) taking valid resources, refusing
invalid ones (422, 400, 413, 401 with near-miss tokens), a signed request, a DELETE whose
version it asks the stand-in HAPI for, topic Bundles; the query API with SERVING_TOKEN (and a
near miss), its status page; and the fallback poller reading the stand-in HAPI, where one
resource fails the gate. Every record's message, arguments, attributes and exception text is
searched for the secret strings.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from core import auth
from core.serve import serve_asgi
from core.settings import Settings
from core.store import SpeedStore
from receiver.app import create_app as create_receiver
from serving import batch
from serving.api import create_app as create_api
from serving.derive import default_deriver
from serving.status import status_route
from subscriptions.fhir_client import FhirClient, hapi_lookup
from subscriptions.poller import poll_once
from subscriptions.standin.hapi import StandInHapi
from subscriptions.standin.run import serve_standin
from tests.conftest import empty_redis, redis_db

RECEIVER_TOKEN = "rcv-tok-QX7f3a91c2"
SERVING_TOKEN = "srv-tok-LB2c4d6e8f"
HMAC_SECRET = "hmac-sec-KV99e1d0aa"
SECRET_NAME = "ZZ-SECRET-NAME-42"
SECRET_MRN = "ZZ-SECRET-MRN-0001"
SECRET_NOTE = "ZZ-SECRET-NOTE-77"
SECRETS = (RECEIVER_TOKEN, SERVING_TOKEN, HMAC_SECRET, SECRET_NAME, SECRET_MRN, SECRET_NOTE)

HYGIENE_REDIS_URL = os.environ.get("LOG_HYGIENE_REDIS_URL", redis_db(8))


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def record_text(record: logging.LogRecord) -> str:
    """Everything a formatter or a structured handler could write out of one record."""
    parts = [repr(record.msg), repr(record.args)]
    with contextlib.suppress(Exception):
        parts.append(record.getMessage())
    parts.extend(f"{k}={v!r}" for k, v in vars(record).items() if k not in {"msg", "args"})
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    if record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    return "\n".join(parts)


@pytest.fixture
def every_logger_at_debug() -> Iterator[Capture]:
    capture = Capture()
    root = logging.getLogger()
    saved: dict[logging.Logger, tuple[int, bool]] = {}

    def open_up() -> None:
        for logger in [root, *map(logging.getLogger, list(root.manager.loggerDict))]:
            if logger not in saved:
                saved[logger] = (logger.level, logger.propagate)
            logger.setLevel(logging.DEBUG)
            logger.disabled = False
            if not logger.propagate and capture not in logger.handlers:
                logger.addHandler(capture)

    root.addHandler(capture)
    open_up()
    capture.open_up = open_up  # type: ignore[attr-defined]
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        for logger, (level, propagate) in saved.items():
            logger.setLevel(level)
            logger.propagate = propagate
            if capture in logger.handlers:
                logger.removeHandler(capture)


@contextlib.asynccontextmanager
async def serve_with_access_log(app: Any, capture: Capture) -> AsyncIterator[str]:
    """uvicorn in this loop with its access log on and no logging config of its own."""
    async with serve_asgi(
        app, log_level="debug", access_log=True, log_config=None, lifespan="on"
    ) as url:
        capture.open_up()  # type: ignore[attr-defined]  # uvicorn set its loggers' levels
        yield url


def secret_patient(pid: str, version: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"versionId": str(version), "lastUpdated": f"2026-11-25T10:00:0{version}Z"},
        "identifier": [{"system": "urn:mrn", "value": SECRET_MRN}],
        "name": [{"family": SECRET_NAME}],
        "gender": "female",
        **extra,
    }


def status_parameters() -> dict[str, Any]:
    return {
        "resourceType": "Parameters",
        "parameter": [{"name": "status", "valueCode": "active"}],
    }


async def receiver_flow(base: str, hapi: StandInHapi) -> None:
    good = {"Authorization": f"Bearer {RECEIVER_TOKEN}", "Content-Type": "application/fhir+json"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:

        async def put(path: str, body: bytes, headers: dict[str, str], status: int) -> None:
            response = await client.put(path, content=body, headers=headers)
            assert response.status_code == status, response.text
            assert not any(s in response.text for s in SECRETS), response.text

        valid = json.dumps(secret_patient("p1")).encode()
        await put("/fhir/Patient/p1", valid, good, 204)
        invalid = json.dumps(secret_patient("p2", gender="robot", unknownElement=SECRET_NOTE))
        await put("/fhir/Patient/p2", invalid.encode(), good, 422)
        await put("/fhir/Patient/p3", f'{{"name": "{SECRET_NAME}", '.encode(), good, 400)
        mismatched = json.dumps(secret_patient("p9")).encode()
        await put("/fhir/Patient/p4", mismatched, good, 400)
        big = json.dumps(secret_patient("p5", text={"div": SECRET_NOTE * 300_000}))
        await put("/fhir/Patient/p5", big.encode(), good, 413)
        for wrong in (
            f"Bearer {RECEIVER_TOKEN}x",
            f"Bearer {RECEIVER_TOKEN[:-1]}",
            f"Bearer {SERVING_TOKEN}",
            "Basic " + base64.b64encode(f"u:{RECEIVER_TOKEN}".encode()).decode(),
        ):
            await put("/fhir/Patient/p1", valid, {**good, "Authorization": wrong}, 401)
        signed = json.dumps(secret_patient("p6")).encode()
        sig = {"Content-Type": "application/fhir+json"}
        await put(
            "/fhir/Patient/p6",
            signed,
            {**sig, auth.SIGNATURE_HEADER: auth.sign(HMAC_SECRET, signed)},
            204,
        )
        forged = {**sig, auth.SIGNATURE_HEADER: auth.sign(HMAC_SECRET + "x", signed)}
        await put("/fhir/Patient/p6", signed, forged, 401)

        # A delete the receiver looks up on the stand-in HAPI, and one HAPI does not know.
        await hapi.update(secret_patient("p1"))
        await hapi.delete("Patient", "p1")
        for pid in ("p1", "unknown-to-hapi"):
            response = await client.delete(f"/fhir/Patient/{pid}", headers=good)
            assert response.status_code == 204, response.text

        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "history",
            "entry": [
                {"resource": status_parameters()},
                {"resource": secret_patient("p7", 2)},
                {"fullUrl": "Patient/p8", "request": {"method": "PUT", "url": "Patient/p8"}},
            ],
        }
        response = await client.post("/fhir", content=json.dumps(bundle), headers=good)
        assert response.status_code == 204
        bundle["entry"][1]["resource"] = secret_patient("p7", 3, gender="robot")
        response = await client.post("/fhir", content=json.dumps(bundle), headers=good)
        assert response.status_code == 422
        response = await client.post("/fhir", content=b"", headers=good)
        assert response.status_code == 204
        response = await client.get("/fhir/Patient/p1", headers=good)
        assert response.status_code == 405


async def api_flow(base: str) -> None:
    good = {"Authorization": f"Bearer {SERVING_TOKEN}"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for path, params in (
            ("/cohort", {"gender": "female"}),
            ("/cohort", {"gender": "female", "_count": "1"}),
            ("/cohort", {"birthdate": "bogus"}),
            ("/views", {}),
            ("/views/patient_demographics/rows", {"gender": "female"}),
            ("/views/patient_demographics/rows", {"_format": "csv"}),
        ):
            response = await client.get(path, params=params, headers=good)
            assert response.status_code in (200, 400), response.text
            assert not any(s in response.text for s in (SERVING_TOKEN, RECEIVER_TOKEN))
        for wrong in (f"Bearer {SERVING_TOKEN}x", f"Bearer {RECEIVER_TOKEN}"):
            response = await client.get("/cohort", headers={"Authorization": wrong})
            assert response.status_code == 401
        basic = base64.b64encode(f"me:{SERVING_TOKEN}".encode()).decode()
        response = await client.get("/status", headers={"Authorization": f"Basic {basic}"})
        assert response.status_code == 200
        assert not any(s in response.text for s in SECRETS)
        wrong_basic = base64.b64encode(f"me:{SERVING_TOKEN}x".encode()).decode()
        response = await client.get("/status", headers={"Authorization": f"Basic {wrong_basic}"})
        assert response.status_code == 401


@pytest.fixture
async def hygiene_redis() -> AsyncIterator[aioredis.Redis]:
    async with empty_redis(HYGIENE_REDIS_URL) as client:
        yield client


async def test_no_secret_or_body_in_any_log_record(
    every_logger_at_debug: Capture, hygiene_redis: aioredis.Redis, pg_url: str
) -> None:
    capture = every_logger_at_debug
    batch.init(pg_url)
    hapi = StandInHapi()
    async with serve_standin(hapi) as hapi_base:
        settings = Settings(
            redis_url=HYGIENE_REDIS_URL,
            database_url=pg_url,
            fhir_base_url=hapi_base,
            receiver_tokens=(RECEIVER_TOKEN, "rotated-token"),
            receiver_hmac_secret=HMAC_SECRET,
            serving_tokens=(SERVING_TOKEN,),
            receiver_max_body_bytes=1024 * 1024,
        )
        receiver = create_receiver(
            settings, derive=default_deriver(), hapi=hapi_lookup(settings.fhir_base_url)
        )
        async with serve_with_access_log(receiver, capture) as base:
            await receiver_flow(base, hapi)

        await SpeedStore(hygiene_redis).mark_epoch()  # so the API consults the speed layer
        api = create_api(settings, extra_routes=[status_route(settings)])
        async with serve_with_access_log(api, capture) as base:
            await api_flow(base)

        # The fallback poller: HAPI holds new versions, one of them refused by the gate.
        await hapi.update(secret_patient("p10"))
        await hapi.update(secret_patient("p11", gender="robot"))
        store = SpeedStore(hygiene_redis)
        async with FhirClient(hapi_base, max_retries=1) as client:
            result = await poll_once(settings, store, client, derive=default_deriver())
        assert result.written >= 1 and result.rejected >= 1, result
    assert (await store.get("Patient", "p10")) is not None

    records = capture.records
    # The capture was live: app logs from each part, and uvicorn's access lines.
    names = {r.name for r in records}
    assert "uvicorn.access" in names, sorted(names)
    assert any(r.name.startswith("receiver") for r in records), sorted(names)
    assert any(r.name.startswith("subscriptions.poller") for r in records), sorted(names)
    assert any(r.name == "serving.audit" for r in records), sorted(names)
    access = [r.getMessage() for r in records if r.name == "uvicorn.access"]
    assert any("PUT /fhir/Patient/p1" in line for line in access), access[:5]
    # Access lines carry method, path, query and status: no header at all.
    assert not [a for a in access if "Bearer" in a or "Basic" in a or ",v1=" in a], access

    leaks = [
        (r.name, r.levelname, secret, r.getMessage()[:300])
        for r in records
        for secret in SECRETS
        if secret in record_text(r)
    ]
    assert not leaks, leaks


def test_the_search_sees_arguments_attributes_and_exceptions() -> None:
    """The check above is only as good as `record_text`: it must see every place."""
    logger = logging.getLogger("tests.log_hygiene")
    try:
        raise ValueError(f"boom {SECRET_NOTE}")
    except ValueError as exc:
        with_exc = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "x", (), (type(exc), exc, exc.__traceback__)
        )
    in_args = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "%s", (SECRET_NAME,), None)
    in_extra = logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, "y", (), None, extra={"token": RECEIVER_TOKEN}
    )
    assert SECRET_NOTE in record_text(with_exc)
    assert SECRET_NAME in record_text(in_args)
    assert RECEIVER_TOKEN in record_text(in_extra)
