"""`researchflow demo`: the whole flow on one machine, with the stand-in HAPI as the source.

Standard output carries JSON only, one object a line, each with an `event`: `ready` (the
URLs and the serving token), `answer` (a live cohort answer while changes stream in),
`verified` (the last answer and whether a full refresh gave the same). What a person reads
goes to standard error. With `--serve` the services keep running after that, with a "what
next" text, until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import httpx

from core.errors import BatchLayerUnavailable, ResearchFlowError
from core.serve import bind, close_all, serve_asgi
from core.settings import Settings, instance_from_url
from core.store import SpeedStore, connect
from serving.batch_refresh import refresh
from subscriptions.standin import synthetic

logger = logging.getLogger(__name__)


class DemoError(ResearchFlowError):
    """The demo cannot run as asked."""


COHORT_QUERY = {"gender": "male", "condition": "http://snomed.info/sct|44054006", "ids": "false"}
Emit = Callable[[dict[str, Any]], None]
Say = Callable[[str], None]


def ensure_database(database_url: str) -> bool:
    """Create the PostgreSQL database DATABASE_URL names when it does not exist (the demo
    works alone); True when it was created. Raises BatchLayerUnavailable with one line when
    PostgreSQL cannot be reached or refuses to create it."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        psycopg.connect(database_url, connect_timeout=5).close()
        return False
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise BatchLayerUnavailable(f"PostgreSQL cannot be reached: {exc}") from None
    info = conninfo_to_dict(database_url)
    name = str(info.get("dbname") or "")
    try:
        admin_url = make_conninfo("", **{**info, "dbname": "postgres"})
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise BatchLayerUnavailable(
            f"the database {name!r} of DATABASE_URL does not exist and could not be created "
            f"({' '.join(str(exc).split())}); create it, or point DATABASE_URL at one"
        ) from None
    return True


def bind_ports(receiver_port: int, serve_port: int) -> tuple[socket.socket, socket.socket]:
    """Both listening sockets, before anything starts (0: any free port)."""
    receiver = bind("127.0.0.1", receiver_port, "demo receiver (--receiver-port; 0: any)")
    try:
        api = bind("127.0.0.1", serve_port, "demo query API (--serve-port; 0: any)")
    except BaseException:
        close_all([receiver])
        raise
    return receiver, api


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
    hapi: str, hapi_base_url: str | None, standin: Any, say: Say
) -> AsyncIterator[tuple[Any, str]]:
    """The FHIR server the demo writes to: the stand-in, or the real HAPI of hapi-config/."""
    if hapi == "real":
        from subscriptions.local_hapi import RestHapi, start_local_hapi

        base = hapi_base_url if hapi_base_url else await asyncio.to_thread(start_local_hapi, say)
        say(f"real HAPI FHIR server: {base}")
        source = RestHapi(base)
        try:
            yield source, base
        finally:
            await source.aclose()
        return
    from subscriptions.standin.hapi import StandInHapi
    from subscriptions.standin.run import serve_standin

    if standin is None:
        standin = StandInHapi(activation_delay=0.2, retry_initial=0.5, retry_total=10.0)
    async with serve_standin(standin) as base:
        say(f"stand-in HAPI FHIR server: {base}")
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
    serve: bool = False,
    emit: Emit | None = None,
    say: Say | None = None,
    stop: asyncio.Event | None = None,
    hapi: str = "standin",
    hapi_base_url: str | None = None,
    standin: Any = None,
) -> dict[str, Any]:
    """Run the demo; returns the last cohort answer (with `verified`).

    `emit` gets the JSON events, `say` the lines for a person. With `serve`, keep everything
    running after the verification until `stop` is set (or the process is interrupted).
    `hapi="real"` writes to the real HAPI FHIR server of hapi-config/ (started through
    hapi.sh, or the one at `hapi_base_url`) instead of the stand-in; `standin`: the stand-in
    to use (a test reads its final state afterwards), by default a new one.
    """
    from serving import batch

    emit = emit or (lambda _event: None)
    say = say or (lambda _line: None)
    receiver_sock, api_sock = bind_ports(receiver_port, serve_port)
    try:
        if await asyncio.to_thread(ensure_database, settings.database_url):
            say("created the PostgreSQL database DATABASE_URL names")
        redis_client = connect(settings)
        store = SpeedStore(redis_client)
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
                say("emptied the speed layer's Redis database (--reset)")
            if reset:
                await asyncio.to_thread(batch.drop, settings.database_url)
            return await _demo(
                settings,
                store,
                receiver_sock,
                api_sock,
                patients=patients,
                duration=duration,
                rate=rate,
                serve=serve,
                emit=emit,
                say=say,
                stop=stop,
                hapi=hapi,
                hapi_base_url=hapi_base_url,
                standin=standin,
            )
        finally:
            await redis_client.aclose()
    finally:
        receiver_sock.close()
        api_sock.close()


async def _demo(
    settings: Settings,
    store: SpeedStore,
    receiver_sock: socket.socket,
    api_sock: socket.socket,
    *,
    patients: int,
    duration: float,
    rate: float,
    serve: bool,
    emit: Emit,
    say: Say,
    stop: asyncio.Event | None,
    hapi: str,
    hapi_base_url: str | None,
    standin: Any,
) -> dict[str, Any]:
    from receiver.app import create_app as create_receiver
    from serving import batch
    from serving.api import create_app as create_api
    from serving.derive import default_deriver
    from serving.registry import served_views
    from serving.status import status_route
    from serving.viewdef import served_types
    from subscriptions import bootstrap
    from subscriptions.fhir_client import FhirClient, hapi_lookup
    from subscriptions.poller import poll_once, run_poller

    receiver_port = receiver_sock.getsockname()[1]
    serve_port = api_sock.getsockname()[1]
    receiver_token = (
        settings.receiver_tokens[0] if settings.receiver_tokens else secrets.token_urlsafe(16)
    )
    serving_token = (
        settings.serving_tokens[0] if settings.serving_tokens else secrets.token_urlsafe(16)
    )
    rnd = random.Random(2026)
    real = hapi == "real"
    last: dict[str, Any] = {}
    views = served_views(settings.views_dir)
    types = served_types(views)
    async with _source(hapi, hapi_base_url, standin, say) as (source, fhir_base):
        settings = replace(
            settings,
            fhir_base_url=fhir_base,
            receiver_url=f"http://127.0.0.1:{receiver_port}/fhir",
            receiver_tokens=(receiver_token,),
            serving_tokens=(serving_token,),
            poll_interval_seconds=min(settings.poll_interval_seconds, 15),
            # Its own tag (RESEARCHFLOW_INSTANCE is left alone: it may name a real
            # deployment on the same HAPI, whose Subscriptions the demo must not touch).
            instance=demo_instance(receiver_port),
        )
        started = time.perf_counter()
        if real:
            source.store = store  # its wait_idle waits for HAPI's deliveries to land
            await source.seed(synthetic.population(patients, seed=7))
        else:
            for resource in synthetic.population(patients, seed=7):
                await source.update(resource)
        say(
            f"seeded {len(source.resources):,} resources ({patients} patients) in "
            f"{time.perf_counter() - started:.1f}s"
        )
        for line in await asyncio.to_thread(batch.init, settings.database_url, views):
            say(f"batch init: {line}")
        result = await refresh(settings, full=True, store=store)
        say(
            f"batch refresh: {result.changed:,} resources, views "
            + ", ".join(f"{name} {rows:,} rows" for name, rows in sorted(result.views.items()))
        )
        derive = default_deriver(views)
        receiver_app = create_receiver(
            settings, derive=derive, hapi=hapi_lookup(settings.fhir_base_url)
        )
        api_app = create_api(settings, extra_routes=[status_route(settings)])

        def watermark() -> Any:
            return batch.batch_watermark_async(settings.database_url)

        def versions(resource_type: str, ids: Any) -> Any:
            return batch.batch_versions_async(settings.database_url, resource_type, ids)

        async with (
            serve_asgi(receiver_app, sock=receiver_sock, access_log=False),
            serve_asgi(api_app, sock=api_sock, access_log=False),
            FhirClient(settings.fhir_base_url) as client,
            # HAPI would go on delivering to a receiver that is gone: on a real HAPI the
            # demo's Subscriptions leave with it, however it ends (Ctrl-C included).
            _subscriptions_removed(settings, client, say) if real else contextlib.nullcontext(),
        ):
            # A real HAPI activates within a minute (it re-reads Subscriptions every 60 s).
            subs = await bootstrap.bootstrap(settings, client, types, wait=120.0 if real else 15.0)
            say(f"{len(subs)} Subscriptions active: " + ", ".join(s.criteria for s in subs))
            # One catch-up first: it marks the speed layer complete since the batch
            # watermark, so the very first answer is not a degraded one.
            caught = await poll_once(
                settings,
                store,
                client,
                derive=derive,
                batch_watermark=watermark,
                batch_versions=versions,
                types=types,
            )
            say(f"poll --once: {caught.read} changes read since the batch watermark")
            stop_poller = asyncio.Event()
            poller = asyncio.create_task(
                run_poller(
                    settings,
                    store,
                    client,
                    stop_poller,
                    derive,
                    batch_watermark=watermark,
                    batch_versions=versions,
                    types=types,
                )
            )
            api = f"http://127.0.0.1:{serve_port}"
            query_url = f"{api}/cohort?gender=male&condition=http://snomed.info/sct|44054006"
            emit(
                {
                    "event": "ready",
                    "fhir_base_url": fhir_base,
                    "receiver_url": settings.receiver_url,
                    "query_url": query_url,
                    "status_url": f"{api}/status",
                    "serving_token": serving_token,
                }
            )
            say(f"query API:   {query_url}")
            say(f"status page: {api}/status   (user: any, password: the serving token)")
            changes = _Changes(source, patients, rnd)
            deadline = time.monotonic() + duration
            next_print = 0.0
            auth = {"Authorization": f"Bearer {serving_token}"}
            async with httpx.AsyncClient(base_url=api, headers=auth) as http:
                while time.monotonic() < deadline:
                    what = await changes.one()
                    if time.monotonic() >= next_print:
                        next_print = time.monotonic() + 2.0
                        last = (await http.get("/cohort", params=COHORT_QUERY)).json()
                        emit({"event": "answer", "changes": changes.made, **last})
                        say(
                            f"male patients with diabetes: total {last.get('total_count')} "
                            f"(batch {last.get('batch_count')}, +{last.get('added_count')} "
                            f"-{last.get('removed_count')} from the speed layer; "
                            f"{changes.made} changes pushed; last: {what})"
                        )
                    await asyncio.sleep(1.0 / rate)
                await source.wait_idle(timeout=30)
                last = (await http.get("/cohort", params=COHORT_QUERY)).json()
                stop_poller.set()
                await asyncio.wait_for(poller, timeout=10)
                # The proof: a full refresh of the same state gives the same answer.
                await refresh(settings, full=True, store=store)
                check = (await http.get("/cohort", params=COHORT_QUERY)).json()
            # The reference is the batch layer alone after the full refresh.
            same = check.get("batch_count") == last.get("total_count")
            last = {**last, "verified": same, "after_full_refresh": check.get("total_count")}
            emit({"event": "verified", "changes": changes.made, **last})
            say(
                f"after a full batch refresh: total {check.get('total_count')} "
                f"(batch {check.get('batch_count')}): "
                + ("the merged answer was exact" if same else "MISMATCH")
            )
            if serve:
                await _keep_serving(
                    settings, store, client, derive, types, fhir_base, api, serving_token, say, stop
                )
    if real:
        say("the HAPI server keeps running: bash hapi-config/hapi.sh stop")
    return last


def demo_instance(receiver_port: int) -> str:
    """The tag of one demo's Subscriptions: per demo (two demos on one HAPI never touch each
    other's), and never a deployment's own (`instance_from_url` of its RECEIVER_URL)."""
    return "demo-" + instance_from_url(f"http://127.0.0.1:{receiver_port}/fhir")


@contextlib.asynccontextmanager
async def _subscriptions_removed(settings: Settings, client: Any, say: Say) -> AsyncIterator[None]:
    """Remove this demo's Subscriptions from HAPI when the block ends, however it ends; when
    HAPI cannot be asked, say how to remove them later."""
    from subscriptions import bootstrap

    try:
        yield
    finally:
        try:
            removed = await bootstrap.remove(settings, client)
        except Exception as exc:  # the demo's own failure (if any) is the one to report
            say(
                f"could not remove the demo's Subscriptions from HAPI ({exc}); remove them "
                f"with: RESEARCHFLOW_INSTANCE={settings.instance} "
                f"FHIR_BASE_URL={settings.fhir_base_url} researchflow subscriptions remove"
            )
        else:
            say(f"removed the demo's {removed} Subscriptions from HAPI")


async def _keep_serving(
    settings: Settings,
    store: SpeedStore,
    client: Any,
    derive: Any,
    types: tuple[str, ...],
    fhir_base: str,
    api: str,
    serving_token: str,
    say: Say,
    stop: asyncio.Event | None,
) -> None:
    """`--serve`: the services go on (the poller too) until Ctrl-C, with what to try next."""
    from serving import batch
    from subscriptions.poller import run_poller

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    poller = asyncio.create_task(
        run_poller(
            settings,
            store,
            client,
            stop,
            derive,
            batch_watermark=lambda: batch.batch_watermark_async(settings.database_url),
            types=types,
        )
    )
    token = f"Authorization: Bearer {serving_token}"
    for line in WHAT_NEXT.format(api=api, fhir=fhir_base, token=token).strip().splitlines():
        say(line)
    await stop.wait()
    await asyncio.wait_for(poller, timeout=10)
    say("stopped")


WHAT_NEXT = """
The demo keeps serving (Ctrl-C stops it). What next:
  ask the merged answer:   curl -H '{token}' '{api}/cohort?gender=female&birthdate=ge1980'
  read a view's rows:      curl -H '{token}' '{api}/views/patient_demographics/rows?_count=5'
  open the status page:    {api}/status  (any user name, the serving token as password)
  change a patient on the stand-in HAPI, and ask again (HAPI pushes it to the receiver):
    curl -X PUT -H 'Content-Type: application/fhir+json' '{fhir}/Patient/pat-0' \\
      -d '{{"resourceType":"Patient","id":"pat-0","gender":"female","birthDate":"1990"}}'
  the same against your own HAPI: see README.md ("Commands") and docs/operations.md
"""


def main_demo(settings: Settings, args: Any) -> int:
    def emit(event: dict[str, Any]) -> None:
        print(json.dumps(event, default=str), flush=True)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # The demo's own queries would each write an audit line: noise here.
    logging.getLogger("serving.audit").setLevel(logging.WARNING)

    async def interruptible(demo: Any) -> dict[str, Any]:
        # SIGTERM ends the demo as Ctrl-C does (asyncio.run's own SIGINT handling): its
        # task is cancelled, so the clean-up (servers, the demo's Subscriptions) runs.
        task = asyncio.current_task()
        assert task is not None
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        result: dict[str, Any] = await demo
        return result

    try:
        answer = asyncio.run(
            interruptible(
                run_demo(
                    settings,
                    patients=args.patients,
                    duration=args.duration,
                    receiver_port=args.receiver_port,
                    serve_port=args.serve_port,
                    reset=args.reset,
                    serve=args.serve,
                    emit=emit,
                    say=say,
                    hapi=getattr(args, "hapi", "standin"),
                )
            )
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("demo interrupted")
        return 130
    return 0 if answer.get("verified") else 1
