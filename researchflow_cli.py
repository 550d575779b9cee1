"""The `researchflow` command: every entry point of the contract."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from core.errors import (
    DependencyUnavailable,
    FhirError,
    InvalidRequest,
    InvalidViewDefinition,
    ResearchFlowError,
    postgres_failure,
)
from core.fhir_values import JsonError, dumps, loads
from core.settings import Settings, SettingsError

logger = logging.getLogger("researchflow")


class CommandError(Exception):
    """A one-line reason to exit with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


_LINE_BREAK = re.compile(r"\s*\n\s*")


class OneLineFormatter(logging.Formatter):
    """Every log record on one line: a library's message (psycopg's "...\n\t...") may span
    several, and an operator's tools read a line as a record. A traceback (only logged at
    DEBUG) keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _LINE_BREAK.sub(" ", super().formatMessage(record))


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # One line per HTTP request is noise for an operator; our own modules log what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _progress(label: str) -> Callable[[int], None]:
    """A progress callback: a live counter on a terminal, a log line every 10,000 otherwise."""
    tty = sys.stderr.isatty()
    last = [0]

    def report(done: int) -> None:
        if tty:
            sys.stderr.write(f"\r{label}: {done:,}")
            sys.stderr.flush()
        elif done - last[0] >= 10_000:
            last[0] = done
            logger.info("%s: %d so far", label, done)

    return report


def _end_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\n")


def _views(settings: Settings) -> dict[str, Any]:
    """The served views (shipped and VIEWS_DIR): the one registry every command reads."""
    from serving.registry import served_views

    return served_views(settings.views_dir)


def _served_types(settings: Settings) -> tuple[str, ...]:
    from serving.viewdef import served_types

    return served_types(_views(settings))


def _deriver(settings: Settings) -> Any:
    from serving.derive import default_deriver

    return default_deriver(_views(settings))


# -- speed ---------------------------------------------------------------------------------


async def _speed_get(settings: Settings, ref: str) -> dict[str, Any]:
    from core.store import SpeedStore, connect
    from core.validation import ID_PATTERN, is_resource_type

    resource_type, sep, resource_id = ref.partition("/")
    if not sep or not resource_type or not resource_id:
        raise CommandError(f"expected TYPE/ID, got {ref!r}", 2)
    if not is_resource_type(resource_type):
        raise CommandError(f"{resource_type!r} is not a FHIR resource type", 2)
    if not ID_PATTERN.fullmatch(resource_id):
        raise CommandError(
            f"{resource_id!r} is not a FHIR id (1-64 of A-Z, a-z, 0-9, '-' and '.')", 2
        )
    client = connect(settings)
    try:
        entry = await SpeedStore(client).get(resource_type, resource_id)
    finally:
        await client.aclose()
    if entry is None:
        return {"state": "absent", "version_id": None, "last_updated": None, "resource": None}
    return {
        "state": entry.state,
        "version_id": entry.version_id,
        "last_updated": entry.last_updated,
        # The bytes as received: a decimal prints as it was sent (6.50000000000000001).
        "resource": orjson.Fragment(entry.body) if entry.body is not None else None,
    }


async def _speed_stats(settings: Settings) -> dict[str, Any]:
    from core.store import SpeedStore, connect

    def iso(ms: float | None) -> str | None:
        return datetime.fromtimestamp(ms / 1000.0, UTC).isoformat() if ms else None

    client = connect(settings)
    try:
        store = SpeedStore(client)
        types = await store.known_types()
        per_type: dict[str, Any] = {}
        for resource_type in types:
            oldest, newest = await store.oldest_newest(resource_type)
            per_type[resource_type] = {
                "entries": await store.count(resource_type),
                "oldest": iso(oldest),
                "newest": iso(newest),
            }
        info = await client.info("memory")
        config = await store.server_config()
        return {
            "types": per_type,
            "rejects": await store.reject_count(),
            "missed_notifications": await store.missed_count(),
            "epoch": await store.epoch(),
            "memory_used_bytes": info.get("used_memory"),
            "maxmemory_policy": config.get("maxmemory-policy"),
            "persistence": {
                "appendonly": config.get("appendonly"),
                "appendfsync": config.get("appendfsync"),
                "save": config.get("save"),
            },
        }
    finally:
        await client.aclose()


# -- servers -------------------------------------------------------------------------------


def _require_tokens(tokens: Sequence[str], name: str, insecure: bool) -> None:
    if not tokens and not insecure:
        raise CommandError(f"{name} is not set: refusing to start without it (or pass --insecure)")


def freeze_startup_objects() -> None:
    """Build the gate's compiled test, then move what start-up built (models, compiled views)
    out of the collector's reach.

    A full collection otherwise walks every fhir.resources model class on each run: tens of
    milliseconds of pause in the middle of requests (measured in benchmarks/README.md).
    """
    import gc

    from core.r4schema import fast_validator

    fast_validator()  # the gate's compiled test (~1 s to load): before the first request
    gc.collect()
    gc.freeze()


def _bind(host: str, port: int, name: str) -> Any:
    from core.serve import bind

    return bind(host, port, name)


def _serve_apps(listeners: list[Any]) -> None:
    from core.serve import close_all, serve_together

    freeze_startup_objects()
    try:
        asyncio.run(serve_together(listeners))
    finally:
        close_all([item.sock for item in listeners])


def cmd_receiver(settings: Settings, args: argparse.Namespace) -> int:
    from core.serve import Listener
    from core.store import check_redis
    from receiver.app import create_app
    from subscriptions.fhir_client import hapi_lookup

    _require_tokens(settings.receiver_tokens, "RECEIVER_TOKEN", args.insecure)
    sock = _bind(args.host, args.port, "receiver")
    try:
        asyncio.run(check_redis(settings))
        app = create_app(
            settings,
            derive=_deriver(settings),
            hapi=hapi_lookup(settings.fhir_base_url),
            insecure=args.insecure,
        )
    except BaseException:
        sock.close()
        raise
    _serve_apps([Listener(app, sock, "receiver")])
    return 0


def cmd_speed(settings: Settings, args: argparse.Namespace) -> int:
    if args.speed_command == "get":
        print(dumps(asyncio.run(_speed_get(settings, args.ref))).decode())
    else:
        print(json.dumps(asyncio.run(_speed_stats(settings)), indent=2))
    return 0


# -- subscriptions, poll, views, batch ------------------------------------------------------


def _types(settings: Settings, raw: str | None) -> tuple[str, ...]:
    from core.validation import NEVER_STORED, is_resource_type

    if raw is None:
        return _served_types(settings)
    types = tuple(t.strip() for t in raw.split(",") if t.strip())
    if not types:
        raise CommandError("--types names no resource type (e.g. --types Patient,Condition)", 2)
    unknown = [t for t in types if not is_resource_type(t)]
    if unknown:
        raise CommandError(f"--types: unknown resource type(s): {', '.join(unknown)}", 2)
    never = [t for t in types if t in NEVER_STORED]
    if never:
        raise CommandError(
            f"--types: {', '.join(never)} cannot be subscribed to (a Subscription carries the "
            "receiver's token and never enters the speed layer)",
            2,
        )
    return types


async def _subscriptions(settings: Settings, args: argparse.Namespace) -> int:
    from subscriptions import bootstrap
    from subscriptions.fhir_client import FhirClient

    if args.sub_command == "bootstrap" and not settings.receiver_tokens:
        # Registering without it would strip the header from the live Subscriptions and
        # every delivery after that would be refused (401): change nothing instead.
        raise CommandError(
            "RECEIVER_TOKEN is not set: refusing to register Subscriptions without the token "
            "the receiver requires (nothing was changed)",
            2,
        )

    async with FhirClient(settings.fhir_base_url) as client:
        if args.sub_command == "bootstrap":
            try:
                rows = await bootstrap.bootstrap(
                    settings,
                    client,
                    _types(settings, args.types),
                    args.wait,
                    progress=lambda line: print(line, file=sys.stderr),
                )
            except bootstrap.SubscriptionError as exc:
                if exc.results:
                    print(bootstrap.format_table(exc.results))
                raise CommandError(exc.message) from exc
        elif args.sub_command == "status":
            rows = await bootstrap.status(settings, client)
        else:
            removed = await bootstrap.remove(settings, client)
            print(f"removed {removed} Subscription(s) of instance {settings.instance}")
            return 0
    print(bootstrap.format_table(rows))
    return 0


def cmd_subscriptions(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_subscriptions(settings, args))


def _batch_versions(
    settings: Settings,
) -> Callable[[str, Sequence[str]], Awaitable[dict[str, tuple[float, float]]]]:
    async def read(resource_type: str, ids: Sequence[str]) -> dict[str, tuple[float, float]]:
        import psycopg

        from core.errors import BatchLayerUnavailable
        from serving import batch

        try:
            return await batch.batch_versions_async(settings.database_url, resource_type, ids)
        except psycopg.Error as exc:
            raise BatchLayerUnavailable(f"PostgreSQL failed a look-up: {exc}") from exc

    return read


def _batch_watermark(settings: Settings) -> Callable[[], Awaitable[str | None]]:
    async def read() -> str | None:
        from serving import batch

        return await batch.batch_watermark_async(settings.database_url)

    return read


async def _poll(settings: Settings, args: argparse.Namespace) -> int:
    from core.store import SpeedStore, connect
    from serving.batch import check_postgres
    from subscriptions.fhir_client import FhirClient
    from subscriptions.poller import LEASE_TTL_MS, poll_once, run_poller

    redis_client = connect(settings)
    store = SpeedStore(redis_client, max_age_hours=settings.speed_max_age_hours)
    await redis_client.ping()
    # The batch layer says which changes it holds (not missed) and where a first poll
    # starts: without it a poll would only defer its judgement (pending).
    await check_postgres(settings)
    derive = _deriver(settings)
    try:
        async with FhirClient(settings.fhir_base_url) as client:
            if args.once:
                progress = _progress("poll: resources read")
                result = await poll_once(
                    settings,
                    store,
                    client,
                    since=args.since,
                    derive=derive,
                    progress=progress,
                    batch_watermark=_batch_watermark(settings),
                    batch_versions=_batch_versions(settings),
                    types=_served_types(settings),
                    # A poller that died leaves its lease for at most its TTL: outlive it.
                    lease_wait_seconds=LEASE_TTL_MS / 1000.0 + 1.0,
                )
                _end_progress()
                if result.skipped:
                    raise CommandError(
                        "another poller holds the lease (a running `researchflow run` or "
                        "`poll`: it does this work); nothing was read. Stop it first, or "
                        "let it catch up"
                    )
                print(
                    json.dumps(
                        {
                            "read": result.read,
                            "written": result.written,
                            "deletes": result.deletes,
                            "missed": result.missed,
                            "pending": result.pending,
                            "rejected": result.rejected,
                            "since": result.since,
                            "watermark": result.watermark,
                            "restored": result.restored,
                            "seconds": round(result.seconds, 3),
                        }
                    )
                )
                return 0
            from subscriptions.watchdog import watchdog_running

            stop = asyncio.Event()
            _stop_on_signals(stop)
            async with watchdog_running(settings, client, _served_types(settings)):
                await run_poller(
                    settings,
                    store,
                    client,
                    stop,
                    derive,
                    batch_watermark=_batch_watermark(settings),
                    batch_versions=_batch_versions(settings),
                    types=_served_types(settings),
                )
            return 0
    finally:
        await redis_client.aclose()


def _stop_on_signals(stop: asyncio.Event) -> None:
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


# How far ahead of this machine's clock HAPI's may be before a `--since` is "in the future".
SINCE_SKEW = timedelta(hours=1)


def cmd_poll(settings: Settings, args: argparse.Namespace) -> int:
    if args.since is not None:
        try:
            since = datetime.fromisoformat(args.since)
        except ValueError:
            raise CommandError(
                f"--since must be an ISO-8601 instant, not {args.since!r}", 2
            ) from None
        if since.tzinfo is None:
            # HAPI's clock is compared as an instant: a time without its offset is ambiguous.
            raise CommandError(
                f"--since needs a UTC offset (Z or +01:00): {args.since!r} names no instant", 2
            )
        if since > datetime.now(UTC) + SINCE_SKEW:
            raise CommandError(f"--since {args.since} is in the future: nothing to read yet", 2)
    return asyncio.run(_poll(settings, args))


def _read_resources(path: str) -> list[dict[str, Any]]:
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}", 2) from None
    try:
        data = loads(text)
    except JsonError:
        try:
            data = [loads(line) for line in text.splitlines() if line.strip()]
        except JsonError as exc:
            raise CommandError(f"{path} is neither JSON nor NDJSON: {exc}", 2) from None
    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        data = [
            e["resource"] for e in data.get("entry", []) if isinstance(e, dict) and "resource" in e
        ]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise CommandError(f"{path} must hold a JSON array of resources, a Bundle or NDJSON", 2)
    return data


def cmd_views(settings: Settings, args: argparse.Namespace) -> int:
    from serving.viewdef import load_view

    try:
        raw_view = loads(open(args.view, "rb").read())
    except OSError as exc:
        raise CommandError(f"cannot read {args.view}: {exc.strerror}", 2) from None
    except JsonError as exc:
        raise InvalidViewDefinition(f"{args.view} is not JSON: {exc}") from None
    if not isinstance(raw_view, dict):
        raise InvalidViewDefinition("a ViewDefinition must be a JSON object")
    view = load_view(raw_view, require_status=True)
    resources = _read_resources(args.resources)
    if args.engine == "postgres":
        from serving.engines.postgres import postgres_engine

        rows = postgres_engine(settings.database_url)(raw_view, resources)
    else:
        from serving.engines.python import evaluate

        rows = evaluate(view, resources)
    print(dumps(rows, plain_decimals=True).decode())
    return 0


async def _rederive_speed_rows(settings: Settings, views: list[str]) -> None:
    """A rebuilt view's rows in the speed layer were derived from the old definition, an added
    view's were never derived: the stored rows of every cached resource of its type are."""
    from core.store import SpeedStore, connect
    from core.validation import validate_resource

    derive = _deriver(settings)
    served = _views(settings)
    types = sorted({served[v].resource for v in views if v in served})
    client = connect(settings)
    try:
        store = SpeedStore(client)
        for resource_type in types:
            changed = await store.rederive(
                resource_type, lambda body: derive(validate_resource(body))
            )
            print(f"re-derived {changed} speed-layer {resource_type} entries")
    finally:
        await client.aclose()


def cmd_batch(settings: Settings, args: argparse.Namespace) -> int:
    from serving import batch

    if args.batch_command == "init":
        # Each line as it is done (a view over a large batch layer takes minutes), once.
        lines = batch.init(
            settings.database_url, _views(settings), progress=lambda line: print(line, flush=True)
        )
        # A view added to a batch layer that existed may have speed entries of its type.
        fresh = bool(lines) and lines[0].startswith("created schema ")
        verbs = ("rebuilt view ",) if fresh else ("rebuilt view ", "created view ")
        rebuilt = [line.rsplit(".", 1)[1] for line in lines if line.startswith(verbs)]
        if rebuilt:
            asyncio.run(_rederive_speed_rows(settings, rebuilt))
        return 0

    async def run_refresh() -> int:
        from core.store import SpeedStore, connect
        from serving.batch_refresh import refresh

        redis_client = connect(settings)
        try:
            result = await refresh(
                settings,
                full=args.full,
                store=SpeedStore(redis_client),
                progress=_progress("batch refresh: resources synced"),
            )
        finally:
            await redis_client.aclose()
        _end_progress()
        print(json.dumps(dataclasses.asdict(result), default=str))
        return 0

    return asyncio.run(run_refresh())


# -- serve, run, demo ----------------------------------------------------------------------


def _api_app(settings: Settings, insecure: bool) -> Any:
    from serving.api import create_app
    from serving.status import status_route

    return create_app(settings, insecure=insecure, extra_routes=[status_route(settings)])


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from core.serve import Listener
    from serving.batch import check_postgres

    _require_tokens(settings.serving_tokens, "SERVING_TOKEN", args.insecure)
    sock = _bind(args.host, args.port, "query API")
    try:
        # PostgreSQL is the query API's hard dependency; without Redis it answers degraded.
        asyncio.run(check_postgres(settings))
        app = _api_app(settings, args.insecure)
    except BaseException:
        sock.close()
        raise
    _serve_apps([Listener(app, sock, "query API")])
    return 0


async def _run_all(settings: Settings, args: argparse.Namespace, listeners: list[Any]) -> int:
    from core.serve import serving
    from core.store import SpeedStore, check_redis, connect
    from serving.batch import check_postgres
    from subscriptions.fhir_client import FhirClient
    from subscriptions.poller import run_poller
    from subscriptions.watchdog import watchdog_running

    await check_redis(settings)
    await check_postgres(settings)
    derive = _deriver(settings)
    redis_client = connect(settings)
    store = SpeedStore(redis_client, max_age_hours=settings.speed_max_age_hours)
    stop = asyncio.Event()
    freeze_startup_objects()
    try:
        # The watchdog (Subscriptions on HAPI) and the poller (its lease) start only once
        # both servers serve: a process that cannot serve leaves nothing behind on HAPI.
        async with (
            serving(listeners) as stopped,
            FhirClient(settings.fhir_base_url) as client,
            watchdog_running(settings, client, _served_types(settings)),
        ):
            poller = asyncio.create_task(
                run_poller(
                    settings,
                    store,
                    client,
                    stop,
                    derive,
                    batch_watermark=_batch_watermark(settings),
                    batch_versions=_batch_versions(settings),
                    # missed notifications on the API's /metrics
                    metrics=listeners[1].app.state.metrics,
                    types=_served_types(settings),
                )
            )
            try:
                await stopped.wait()
            finally:
                # The poller first: it releases its lease, so another poller takes over now.
                stop.set()
                try:
                    await asyncio.wait_for(poller, timeout=10)
                except TimeoutError:
                    poller.cancel()
    finally:
        await redis_client.aclose()
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from core.serve import Listener, close_all
    from receiver.app import create_app as create_receiver
    from subscriptions.fhir_client import hapi_lookup

    _require_tokens(settings.receiver_tokens, "RECEIVER_TOKEN", args.insecure)
    _require_tokens(settings.serving_tokens, "SERVING_TOKEN", args.insecure)
    _two_ports(args.receiver_port, args.serve_port)
    # Both ports first: a taken one stops `run` before anything starts.
    receiver_sock = _bind(args.host, args.receiver_port, "receiver")
    sockets = [receiver_sock]
    try:
        sockets.append(_bind(args.host, args.serve_port, "query API"))
        listeners = [
            Listener(
                create_receiver(
                    settings,
                    derive=_deriver(settings),
                    hapi=hapi_lookup(settings.fhir_base_url),
                    insecure=args.insecure,
                ),
                sockets[0],
                "receiver",
            ),
            Listener(_api_app(settings, args.insecure), sockets[1], "query API"),
        ]
        return asyncio.run(_run_all(settings, args, listeners))
    finally:
        close_all(sockets)


def _two_ports(receiver_port: int, serve_port: int) -> None:
    if receiver_port == serve_port != 0:
        raise CommandError(
            f"--receiver-port and --serve-port are both {receiver_port}: the receiver and the "
            "query API need a port each",
            2,
        )


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from researchflow_demo import main_demo

    _two_ports(args.receiver_port, args.serve_port)
    return main_demo(settings, args)


# -- the parser ----------------------------------------------------------------------------


def _seconds(raw: str) -> float:
    """A number of seconds, 0 or more (argparse reports the ValueError as a usage error)."""
    value = float(raw)
    if not 0 <= value < 10**6:
        raise ValueError(raw)
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(raw)
    return value


# argparse names a type by its __name__ in "invalid ... value".
_seconds.__name__ = "seconds"
_port.__name__ = "port"
HOST_HELP = "the address to listen on (default 127.0.0.1; 0.0.0.0: every interface)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="researchflow",
        description="ResearchFlow speed layer: near-real-time FHIR analytics over HAPI FHIR, "
        "Redis (speed layer) and PostgreSQL (batch layer). Settings come from the environment "
        "(REDIS_URL, DATABASE_URL, FHIR_BASE_URL, RECEIVER_URL, RECEIVER_TOKEN, SERVING_TOKEN, "
        "...).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("receiver", help="run the webhook receiver HAPI calls")
    p.add_argument("--host", default="127.0.0.1", help=HOST_HELP)
    p.add_argument("--port", type=_port, default=8081, help="default 8081; 0: any free port")
    p.add_argument("--insecure", action="store_true", help="allow running without RECEIVER_TOKEN")
    p.set_defaults(func=cmd_receiver)

    p = sub.add_parser("serve", help="run the query API and status page")
    p.add_argument("--host", default="127.0.0.1", help=HOST_HELP)
    p.add_argument("--port", type=_port, default=8082, help="default 8082; 0: any free port")
    p.add_argument("--insecure", action="store_true", help="allow running without SERVING_TOKEN")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "run", help="receiver, query API, poller and subscription watchdog in one process"
    )
    p.add_argument("--host", default="127.0.0.1", help=HOST_HELP)
    p.add_argument("--receiver-port", type=_port, default=8081, help="default 8081")
    p.add_argument("--serve-port", type=_port, default=8082, help="default 8082")
    p.add_argument("--insecure", action="store_true", help="allow running without tokens")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "demo",
        help="the whole flow on one machine with a stand-in HAPI and synthetic data: JSON "
        "events on stdout, what happens on stderr; needs Redis and PostgreSQL (REDIS_URL, "
        "DATABASE_URL; the database is created when missing)",
    )
    p.add_argument("--patients", type=int, default=300, help="synthetic patients (default 300)")
    p.add_argument(
        "--duration", type=float, default=45.0, help="seconds of streamed changes (default 45)"
    )
    p.add_argument("--receiver-port", type=_port, default=8081, help="default 8081; 0: any")
    p.add_argument("--serve-port", type=_port, default=8082, help="default 8082; 0: any")
    p.add_argument(
        "--reset",
        action="store_true",
        help="empty the Redis database and drop the batch schema first (they hold a demo's data)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="keep the stand-in HAPI, receiver, query API and poller running afterwards "
        "(Ctrl-C stops them), with what to try next",
    )
    p.add_argument(
        "--hapi",
        choices=["standin", "real"],
        default="standin",
        help="the FHIR server: the stand-in (default) or the real HAPI FHIR server of "
        "hapi-config/, started with hapi.sh (HAPI_PORT, HAPI_DATABASE_URL; needs Java and Maven)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("speed", help="inspect the speed layer (Redis)")
    speed = p.add_subparsers(dest="speed_command", required=True, metavar="SUBCOMMAND")
    g = speed.add_parser("get", help="print one speed-layer entry as JSON")
    g.add_argument("ref", metavar="TYPE/ID")
    speed.add_parser("stats", help="counts per type, oldest/newest, rejects, memory, persistence")
    p.set_defaults(func=cmd_speed)

    p = sub.add_parser("subscriptions", help="manage this deployment's Subscriptions on HAPI")
    subs = p.add_subparsers(dest="sub_command", required=True, metavar="SUBCOMMAND")
    b = subs.add_parser("bootstrap", help="create or update one rest-hook Subscription per type")
    b.add_argument(
        "--types",
        default=None,
        help="comma-separated resource types (default: every type a served view reads)",
    )
    b.add_argument(
        "--wait",
        type=_seconds,
        default=90.0,
        metavar="SECONDS",
        help="how long to wait for HAPI to mark them active (default 90)",
    )
    subs.add_parser("status", help="a table of this deployment's Subscriptions")
    subs.add_parser("remove", help="delete this deployment's Subscriptions, and only those")
    p.set_defaults(func=cmd_subscriptions)

    p = sub.add_parser(
        "poll", help="the fallback fetcher: pull HAPI's changes into the speed layer"
    )
    p.add_argument("--once", action="store_true", help="one full catch-up, then exit")
    p.add_argument("--since", metavar="ISO-8601", help="start here instead of the saved watermark")
    p.set_defaults(func=cmd_poll)

    p = sub.add_parser("batch", help="the batch layer (PostgreSQL tables of view rows)")
    batch_sub = p.add_subparsers(dest="batch_command", required=True, metavar="SUBCOMMAND")
    batch_sub.add_parser("init", help="create the batch schema and one view per ViewDefinition")
    r = batch_sub.add_parser("refresh", help="sync from HAPI, refresh views, trim the speed layer")
    r.add_argument("--full", action="store_true", help="reload every resource, not just changes")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("views", help="SQL-on-FHIR ViewDefinitions")
    views_sub = p.add_subparsers(dest="views_command", required=True, metavar="SUBCOMMAND")
    v = views_sub.add_parser("run", help="evaluate a ViewDefinition over resources in a file")
    v.add_argument("view", metavar="VIEW.json")
    v.add_argument(
        "--resources", required=True, metavar="FILE", help="a JSON array, a Bundle, or NDJSON"
    )
    v.add_argument("--engine", choices=["python", "postgres"], default="python")
    p.set_defaults(func=cmd_views)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        _check_resource_types(settings)
        if settings.views_dir is not None:
            _views(settings)  # every command stops on a VIEWS_DIR file it cannot serve
        code = int(args.func(settings, args))
    except CommandError as exc:
        _end_progress()
        _fail(args.command, f"{exc}")
        return exc.code
    except SettingsError as exc:
        _fail(args.command, f"bad setting: {exc}")
        return 2
    except InvalidViewDefinition as exc:
        _fail(args.command, f"invalid ViewDefinition: {exc}")
        return 2
    except InvalidRequest as exc:
        _fail(args.command, f"{exc.message}")
        return 2
    except (DependencyUnavailable, FhirError, ResearchFlowError) as exc:
        _end_progress()
        _fail(args.command, f"{exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Library errors of an unreachable dependency: one line, never a traceback.
        _end_progress()
        reason = _dependency_reason(exc)
        if reason is None:
            # A bug: still one line for the operator (the traceback is logged at DEBUG).
            logger.debug("unexpected error", exc_info=exc)
            reason = f"unexpected error ({type(exc).__name__}: {str(exc)[:300]})"
        _fail(args.command, f"{reason}")
        return 1
    return code


def _fail(command: str, reason: str) -> None:
    """The one line a failed command prints: its name and the reason, whitespace folded (a
    library's message may span lines)."""
    print(f"researchflow {command}: {' '.join(reason.split())[:1000]}", file=sys.stderr)


def _check_resource_types(settings: Settings) -> None:
    """RECEIVER_RESOURCE_TYPES names resource types (checked only when set: the models are
    a heavy import for commands that never use them)."""
    if not settings.receiver_resource_types:
        return
    from core.validation import is_resource_type

    bad = [t for t in settings.receiver_resource_types if not is_resource_type(t)]
    if bad:
        raise SettingsError(
            f"RECEIVER_RESOURCE_TYPES names unknown resource type(s): {', '.join(bad)[:200]}"
        )


def _dependency_reason(exc: Exception) -> str | None:
    import httpx
    import psycopg
    import redis.exceptions

    if isinstance(exc, redis.exceptions.RedisClusterException):
        if "cluster mode is not enabled" in str(exc).lower():
            return (
                "REDIS_CLUSTER=true, but the Redis at REDIS_URL is not a cluster node (cluster"
                " mode is not enabled there): set REDIS_CLUSTER=false or point at a cluster"
            )
        return f"the Redis Cluster at REDIS_URL cannot be reached ({type(exc).__name__}: {exc})"
    if isinstance(exc, redis.exceptions.RedisError):
        return f"Redis cannot be reached ({type(exc).__name__}: {exc})"
    if isinstance(exc, psycopg.Error):
        return postgres_failure(exc)[:400]
    if isinstance(exc, httpx.HTTPError):
        return f"the FHIR server cannot be reached ({type(exc).__name__}: {exc})"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())
