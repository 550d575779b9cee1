"""Serving the stand-in: in this event loop, or from a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from core.serve import serve_asgi
from subscriptions.standin.hapi import StandInHapi

T = TypeVar("T")


@contextlib.asynccontextmanager
async def serve_standin(
    hapi: StandInHapi, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the stand-in on loopback; yields its FHIR base (`http://127.0.0.1:PORT/fhir`).

    On exit the server stops and the stand-in's delivery workers are closed.
    """
    try:
        async with serve_asgi(hapi.app, host=host, port=port, path="/fhir") as base_url:
            hapi.base_url = base_url
            yield base_url
    finally:
        await hapi.aclose()


class ThreadedStandIn:
    """A stand-in served from a background thread's event loop (for benchmarks and the CLI)."""

    def __init__(self, hapi: StandInHapi, base_url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.hapi = hapi
        self.base_url = base_url
        self.loop = loop

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine (e.g. `hapi.create(...)`) in the stand-in's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def serve_standin_in_thread(
    hapi: StandInHapi, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[ThreadedStandIn]:
    """Serve the stand-in from a daemon thread; yields a handle with `base_url` and `call`."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        box["stop"] = stop
        box["loop"] = asyncio.get_running_loop()
        try:
            async with serve_standin(hapi, host=host, port=port) as base_url:
                box["url"] = base_url
                ready.set()
                await stop.wait()
        except BaseException as exc:
            box["error"] = exc
            ready.set()
            raise

    def run() -> None:
        with contextlib.suppress(BaseException):
            asyncio.run(main())

    thread = threading.Thread(target=run, name="standin-hapi", daemon=True)
    thread.start()
    ready.wait(30)
    if "url" not in box:
        raise RuntimeError(f"the stand-in HAPI did not start: {box.get('error')!r}")
    loop: asyncio.AbstractEventLoop = box["loop"]
    try:
        yield ThreadedStandIn(hapi, box["url"], loop)
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(10)
