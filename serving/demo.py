"""`researchflow demo`: the whole flow on one machine, with the stand-in HAPI as the source."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import httpx
import uvicorn

from receiver.errors import ResearchFlowError
from receiver.settings import Settings
from receiver.store import SpeedStore, connect
from subscriptions import synthetic

logger = logging.getLogger(__name__)


class DemoError(ResearchFlowError):
    """The demo cannot run as asked."""


COHORT_QUERY = {"gender": "male", "condition": "http://snomed.info/sct|44054006", "ids": "false"}


def _port_or_free(port: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return port
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def _serve(app: Any, port: int) -> AsyncIterator[None]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise RuntimeError(f"could not serve on 127.0.0.1:{port}")
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        await task


class _Changes:
    """A stream of realistic changes made on the stand-in, which pushes them as HAPI does."""

    def __init__(self, hapi: Any, patients: int, rnd: random.Random) -> None:
        self.hapi = hapi
        self.rnd = rnd
        self.next_patient = patients
        self.next_item = patients * 10 + 10
        self.made = 0

    async def one(self) -> str:
        rnd = self.rnd
        roll = rnd.random()
        self.made += 1
        truth = self.hapi.resources
        patients = [k[1] for k, v in truth.items() if k[0] == "Patient" and not v.deleted]
        conditions = [k[1] for k, v in truth.items() if k[0] == "Condition" and not v.deleted]
        if roll < 0.35 or not patients:
            n = self.next_patient
            self.next_patient += 1
            p = synthetic.patient(n, rnd)
            p["gender"] = "male"
            await self.hapi.update(p)
            await self.hapi.update(self._diabetes(n))
            return f"new male patient pat-{n} with diabetes"
        if roll < 0.70:
            pid = rnd.choice(patients)
            current = dict(truth[("Patient", pid)].resource or {})
            current["gender"] = rnd.choice(["male", "female"])
            await self.hapi.update(current)
            return f"Patient/{pid} gender -> {current['gender']}"
        if roll < 0.85:
            pid = rnd.choice(patients)
            condition = self._diabetes(int(pid.removeprefix("pat-")))
            await self.hapi.update(condition)
            return f"Condition/{condition['id']}: diabetes for Patient/{pid}"
        if roll < 0.95 and conditions:
            cid = rnd.choice(conditions)
            await self.hapi.delete("Condition", cid)
            return f"deleted Condition/{cid}"
        pid = rnd.choice(patients)
        await self.hapi.delete("Patient", pid)
        return f"deleted Patient/{pid}"

    def _diabetes(self, patient_n: int) -> dict[str, Any]:
        condition = synthetic.condition(self.next_item, patient_n, self.rnd)
        self.next_item += 1
        condition["code"]["coding"][0].update(code="44054006", display="Diabetes mellitus type 2")
        condition["code"]["text"] = "Diabetes mellitus type 2"
        return condition


@contextlib.asynccontextmanager
async def _source(
    hapi: str, hapi_base_url: str | None, out: Callable[[str], None]
) -> AsyncIterator[tuple[Any, str]]:
    """The FHIR server the demo writes to: the stand-in, or the real HAPI of hapi-config/."""
    if hapi == "real":
        from serving.demo_hapi import RestHapi, start_local_hapi

        base = hapi_base_url if hapi_base_url else await asyncio.to_thread(start_local_hapi, out)
        out(f"real HAPI FHIR server: {base}")
        source = RestHapi(base)
        try:
            yield source, base
        finally:
            await source.aclose()
        return
    from subscriptions.standin import StandInHapi, serve_standin

    standin = StandInHapi(activation_delay=0.2, retry_initial=0.5, retry_total=10.0)
    async with serve_standin(standin) as base:
        out(f"stand-in HAPI FHIR server: {base}")
        yield standin, base


async def run_demo(
    settings: Settings,
    *,
    patients: int = 300,
    duration: float = 45.0,
    rate: float = 5.0,
    receiver_port: int = 8081,
    serve_port: int = 8082,
    reset: bool = False,
    out: Callable[[str], None] = print,
    hapi: str = "standin",
    hapi_base_url: str | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the last cohort answer.

    `hapi="real"` writes to the real HAPI FHIR server of hapi-config/ (started through
    hapi.sh, or the one at `hapi_base_url`) instead of the stand-in.
    """
    from receiver.app import create_app as create_receiver
    from serving import batch
    from serving.api import create_app as create_api
    from serving.derive import default_deriver
    from serving.status import status_route
    from subscriptions import bootstrap
    from subscriptions.fhir_client import FhirClient
    from subscriptions.poller import poll_once, run_poller

    receiver_port = _port_or_free(receiver_port)
    serve_port = _port_or_free(serve_port)
    receiver_token = (
        settings.receiver_tokens[0] if settings.receiver_tokens else secrets.token_urlsafe(16)
    )
    serving_token = (
        settings.serving_tokens[0] if settings.serving_tokens else secrets.token_urlsafe(16)
    )
    rnd = random.Random(2026)
    real = hapi == "real"
    last: dict[str, Any] = {}
    async with _source(hapi, hapi_base_url, out) as (source, fhir_base):
        settings = replace(
            settings,
            fhir_base_url=fhir_base,
            receiver_url=f"http://127.0.0.1:{receiver_port}/fhir",
            receiver_tokens=(receiver_token,),
            serving_tokens=(serving_token,),
            poll_interval_seconds=min(settings.poll_interval_seconds, 15),
            instance="researchflow-demo",
        )
        started = time.perf_counter()
        if real:
            await source.seed(synthetic.population(patients, seed=7))
        else:
            for resource in synthetic.population(patients, seed=7):
                await source.update(resource)
        out(
            f"seeded {len(source.resources):,} resources ({patients} patients) in "
            f"{time.perf_counter() - started:.1f}s"
        )

        redis_client = connect(settings)
        store = SpeedStore(redis_client)
        if real:
            source.store = store  # its wait_idle waits for HAPI's deliveries to land
        try:
            # The stand-in numbers versions from 1 again: a speed layer or batch layer left by
            # another source would hold "newer" versions of the same ids and win the merge.
            if await store.epoch() is not None or await store.known_types():
                if not reset:
                    raise DemoError(
                        "the speed layer at REDIS_URL already holds data; run the demo on an "
                        "empty Redis database or pass --reset to empty this one"
                    )
                await redis_client.flushdb()
                out("emptied the speed layer's Redis database (--reset)")
            if reset:
                batch.drop(settings.database_url)
            for line in batch.init(settings.database_url):
                out(f"batch init: {line}")
            result = await batch.refresh(settings, full=True, store=store)
            out(f"batch refresh: {dataclasses.asdict(result)}")
            derive = default_deriver()
            receiver_app = create_receiver(settings, derive=derive)
            api_app = create_api(settings, extra_routes=[status_route(settings)])
            async with (
                _serve(receiver_app, receiver_port),
                _serve(api_app, serve_port),
                FhirClient(settings.fhir_base_url) as client,
            ):
                # A real HAPI activates within a minute (it re-reads Subscriptions every 60 s).
                subs = await bootstrap.bootstrap(settings, client, wait=120.0 if real else 15.0)
                out(bootstrap.format_table(subs))
                # One catch-up first: it marks the speed layer complete since the batch
                # watermark, so the very first answer is not a degraded one.
                caught = await poll_once(
                    settings,
                    store,
                    client,
                    derive=derive,
                    batch_watermark=lambda: batch.batch_watermark_async(settings.database_url),
                )
                out(f"poll --once: {caught.read} changes read since the batch watermark")
                stop = asyncio.Event()
                poller = asyncio.create_task(
                    run_poller(
                        settings,
                        store,
                        client,
                        stop,
                        derive,
                        batch_watermark=lambda: batch.batch_watermark_async(settings.database_url),
                    )
                )
                api = f"http://127.0.0.1:{serve_port}"
                out("")
                out(
                    f"query API:   {api}/cohort?gender=male&condition=http://snomed.info/sct|44054006"
                )
                out(f"status page: {api}/status   (user: any, password: the serving token)")
                out(f"serving token: {serving_token}")
                out("")
                changes = _Changes(source, patients, rnd)
                deadline = time.monotonic() + duration
                next_print = 0.0
                async with httpx.AsyncClient(
                    base_url=api, headers={"Authorization": f"Bearer {serving_token}"}
                ) as http:
                    while time.monotonic() < deadline:
                        what = await changes.one()
                        logger.debug("change: %s", what)
                        if time.monotonic() >= next_print:
                            next_print = time.monotonic() + 2.0
                            response = await http.get("/cohort", params=COHORT_QUERY)
                            last = response.json()
                            out(
                                f"male patients with diabetes: total {last.get('total_count')} "
                                f"(batch {last.get('batch_count')}, +{last.get('added_count')} "
                                f"-{last.get('removed_count')} from the speed layer; "
                                f"{changes.made} changes pushed; last: {what})"
                            )
                        await asyncio.sleep(1.0 / rate)
                    await source.wait_idle(timeout=30)
                    response = await http.get("/cohort", params=COHORT_QUERY)
                    last = response.json()
                out(f"final answer: {last}")
                stop.set()
                await asyncio.wait_for(poller, timeout=10)
                # The proof: a full refresh of the same state gives the same answer.
                await batch.refresh(settings, full=True, store=store)
                async with httpx.AsyncClient(
                    base_url=api, headers={"Authorization": f"Bearer {serving_token}"}
                ) as http:
                    check = (await http.get("/cohort", params=COHORT_QUERY)).json()
                same = check.get("total_count") == last.get("total_count")
                out(
                    f"after a full batch refresh: total {check.get('total_count')} "
                    f"(batch {check.get('batch_count')}): "
                    + ("the merged answer was exact" if same else "MISMATCH")
                )
                last = {**last, "verified": same}
                if real:
                    # HAPI would go on delivering to a receiver that is gone.
                    removed = await bootstrap.remove(settings, client)
                    out(f"removed the demo's {removed} Subscriptions from HAPI")
                    out("the HAPI server keeps running: bash hapi-config/hapi.sh stop")
        finally:
            await redis_client.aclose()
    return last


def main_demo(settings: Settings, args: Any) -> int:
    def out(line: str) -> None:
        print(line, flush=True)

    try:
        answer = asyncio.run(
            run_demo(
                settings,
                patients=args.patients,
                duration=args.duration,
                receiver_port=args.receiver_port,
                serve_port=args.serve_port,
                reset=args.reset,
                out=out,
                hapi=getattr(args, "hapi", "standin"),
            )
        )
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    return 0 if answer.get("verified") else 1
