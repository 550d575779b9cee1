"""Serving apps: ports bound first, dependencies checked, servers that stop together.

Everything that can stop a service is checked before anything starts, so an operator gets one
line naming the cause and a non-zero exit within seconds, never a process that runs with
nothing bound or a traceback:

- every listening socket is bound first (`bind`): a taken port is `StartupError` at once, and
  uvicorn then serves on the socket it was handed (it cannot fail to bind later);
- the hard dependencies are reached once (`core.store.check_redis`,
  `serving.batch.check_postgres`) with short timeouts;
- `serve_together` runs several uvicorn servers (and background work) in one process and
  stops all of them as soon as one stops, reporting a server that never started;
- `serve_asgi` serves one app in this event loop for as long as a block runs (tests, the
  stand-in HAPI, the demo), once it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import StartupError

logger = logging.getLogger(__name__)


@dataclass
class Listener:
    """One server to run: its app, the socket bound for it and what it is (for messages)."""

    app: Any
    sock: socket.socket
    name: str

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"


def bind(host: str, port: int, name: str) -> socket.socket:
    """A TCP socket bound to host:port for `name`; StartupError when the port is taken."""
    if not 0 <= port <= 65535:
        raise StartupError(f"{name}: port {port} is not a TCP port (0-65535)")
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"{name}: cannot resolve the host {host!r} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    # The protocol named explicitly: asyncio only sets TCP_NODELAY on sockets whose proto says
    # TCP, and without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restarted service can take its port while old connections linger.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"{name}: port {port} on {host} is already in use (another process listens "
                "there; stop it or choose another port)"
            ) from None
        raise StartupError(f"{name}: cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def close_all(sockets: Sequence[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()


async def serve_together(
    listeners: Sequence[Listener], background: Sequence[Awaitable[Any]] = ()
) -> None:
    """Serve every listener (and run `background` work) until one of them stops.

    A server that stops (a signal, or its lifespan failed) stops the others. Raises
    StartupError when a server never started (its lifespan failed: its log says why) or a
    background task failed.
    """
    import uvicorn

    servers = [
        uvicorn.Server(uvicorn.Config(item.app, log_level="info", access_log=False))
        for item in listeners
    ]
    tasks = [
        asyncio.create_task(server.serve(sockets=[item.sock]), name=item.name)
        for server, item in zip(servers, listeners, strict=True)
    ]
    extra = [asyncio.ensure_future(work) for work in background]
    try:
        done, _ = await asyncio.wait([*tasks, *extra], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for server in servers:
            server.should_exit = True
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for item, server, result in zip(listeners, servers, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise StartupError(f"the {item.name} on {item.address} failed: {result}") from None
        if not server.started:
            raise StartupError(
                f"the {item.name} on {item.address} did not start (the line above says why)"
            )
    for task in extra:
        if task in done and task.exception() is not None:
            raise StartupError(f"a background task stopped: {task.exception()}")


@contextlib.asynccontextmanager
async def serve_asgi(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    path: str = "",
    sock: socket.socket | None = None,
    **uvicorn_options: Any,
) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn in this event loop while the block runs; yields
    `http://host:port{path}` once the server answers (port 0: a free one).

    `sock`: serve on this bound socket instead (`bind`). `uvicorn_options` go to
    `uvicorn.Config` (e.g. `log_config=None, access_log=True`). Without them: warnings only,
    no Date or Server header of uvicorn's own (the stand-in HAPI sets Date from its clock).
    Raises StartupError when the server stops before it starts (its lifespan failed). On
    exit the server is asked to stop, waited for 5 s, then cancelled.
    """
    import uvicorn

    own = sock is None
    bound = bind(host, port, "the server") if sock is None else sock
    options: dict[str, Any] = {
        "log_level": "warning",
        "lifespan": "auto",
        "ws": "none",
        "date_header": False,
        "server_header": False,
        "timeout_graceful_shutdown": 2,
        **uvicorn_options,
    }
    server = uvicorn.Server(uvicorn.Config(app, **options))
    task = asyncio.create_task(server.serve(sockets=[bound]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise StartupError(f"the server on {host}:{port} stopped before it started")
            await asyncio.sleep(0.005)
        yield f"http://{host}:{bound.getsockname()[1]}{path}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=5)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if own:
            bound.close()
