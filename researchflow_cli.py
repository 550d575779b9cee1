"""The `researchflow` command: every entry point of the contract."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from receiver.errors import (
    DependencyUnavailable,
    FhirError,
    InvalidRequest,
    InvalidViewDefinition,
    ResearchFlowError,
)
from receiver.settings import Settings, SettingsError

logger = logging.getLogger("researchflow")


class CommandError(Exception):
    """A one-line reason to exit with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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


# -- speed ---------------------------------------------------------------------------------


async def _speed_get(settings: Settings, ref: str) -> dict[str, Any]:
    from receiver.store import SpeedStore, connect

    resource_type, sep, resource_id = ref.partition("/")
    if not sep or not resource_type or not resource_id:
        raise CommandError(f"expected TYPE/ID, got {ref!r}", 2)
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
        "resource": json.loads(entry.body) if entry.body is not None else None,
    }


async def _speed_stats(settings: Settings) -> dict[str, Any]:
    from receiver.store import SpeedStore, connect

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


def _serve_apps(apps: list[tuple[Any, str, int]]) -> None:
    import uvicorn

    async def serve_all() -> None:
        servers = [
            uvicorn.Server(
                uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)
            )
            for app, host, port in apps
        ]
        await asyncio.gather(*(s.serve() for s in servers))

    asyncio.run(serve_all())


def cmd_receiver(settings: Settings, args: argparse.Namespace) -> int:
    from receiver.app import create_app
    from serving.derive import default_deriver

    _require_tokens(settings.receiver_tokens, "RECEIVER_TOKEN", args.insecure)
    app = create_app(settings, derive=default_deriver(), insecure=args.insecure)
    _serve_apps([(app, args.host, args.port)])
    return 0


def cmd_speed(settings: Settings, args: argparse.Namespace) -> int:
    if args.speed_command == "get":
        result = asyncio.run(_speed_get(settings, args.ref))
    else:
        result = asyncio.run(_speed_stats(settings))
    print(json.dumps(result, indent=None if args.speed_command == "get" else 2))
    return 0


# -- the parser ----------------------------------------------------------------------------


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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--insecure", action="store_true", help="allow running without RECEIVER_TOKEN")
    p.set_defaults(func=cmd_receiver)

    p = sub.add_parser("speed", help="inspect the speed layer (Redis)")
    speed = p.add_subparsers(dest="speed_command", required=True, metavar="SUBCOMMAND")
    g = speed.add_parser("get", help="print one speed-layer entry as JSON")
    g.add_argument("ref", metavar="TYPE/ID")
    speed.add_parser("stats", help="counts per type, oldest/newest, rejects, memory, persistence")
    p.set_defaults(func=cmd_speed)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Commands registered by other modules' `register_cli` functions (kept in one list).
_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        code = int(args.func(settings, args))
    except CommandError as exc:
        _end_progress()
        print(f"researchflow {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except SettingsError as exc:
        print(f"researchflow {args.command}: bad setting: {exc}", file=sys.stderr)
        return 2
    except InvalidViewDefinition as exc:
        print(f"researchflow {args.command}: invalid ViewDefinition: {exc}", file=sys.stderr)
        return 2
    except InvalidRequest as exc:
        print(f"researchflow {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except (DependencyUnavailable, FhirError, ResearchFlowError) as exc:
        _end_progress()
        print(f"researchflow {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Library errors of an unreachable dependency: one line, never a traceback.
        reason = _dependency_reason(exc)
        if reason is None:
            raise
        _end_progress()
        print(f"researchflow {args.command}: {reason}", file=sys.stderr)
        return 1
    return code


def _dependency_reason(exc: Exception) -> str | None:
    import httpx
    import psycopg
    import redis.exceptions

    if isinstance(exc, redis.exceptions.RedisError):
        return f"Redis cannot be reached ({type(exc).__name__}: {exc})"
    if isinstance(exc, psycopg.Error):
        return f"PostgreSQL cannot be reached ({type(exc).__name__}: {str(exc).strip()[:300]})"
    if isinstance(exc, httpx.HTTPError):
        return f"the FHIR server cannot be reached ({type(exc).__name__}: {exc})"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    return None


def run_async(coro: Awaitable[int]) -> int:
    async def wrapper() -> int:
        return await coro

    return asyncio.run(wrapper())


if __name__ == "__main__":
    sys.exit(main())
