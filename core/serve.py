"""Serving apps: ports bound first, dependencies checked, servers that stop together.

Everything that can stop a service is checked before anything starts, so an operator gets one
line naming the cause and a non-zero exit within seconds, never a process that runs with
nothing bound or a traceback:

- every listening socket is bound and listening first (`bind`): a taken port, or one port
  named twice, is `StartupError` at once, and uvicorn then serves on the socket it was
  handed (it cannot fail to bind later);
- the hard dependencies are reached once (`core.store.check_redis`,
  `serving.batch.check_postgres`) with short timeouts;
- `serving` starts several uvicorn servers in one process and waits until every one has
  started before its block runs, so work with effects elsewhere (Subscriptions on HAPI, the
  poller's lease) begins only in a process that serves; it stops all of them as soon as one
  stops, on SIGINT/SIGTERM, or when the block ends, reporting a server that never started.
  `serve_together` is its long-running form (`receiver`, `serve`);
- `serve_asgi` serves one app in this event loop for as long as a block runs (tests, the
  stand-in HAPI, the demo), once it answers.

uvicorn's own signal handlers are left out (`_server`): it would take SIGINT/SIGTERM for
itself and, after its shutdown, raise them again, which ends the process before the clean-up
after the servers (the poller's lease release, the demo's Subscription removal) has run.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import StartupError

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 2048  # uvicorn's default backlog
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
        # Listening now, not when uvicorn starts: on Linux two SO_REUSEADDR sockets may bind
        # the same port as long as neither listens, so `run --receiver-port 8090
        # --serve-port 8090` would otherwise get past here and fail later, mid-start.
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"{name}: port {port} on {host} is already in use (something listens there: "
                "stop it or choose another port)"
            ) from None
        raise StartupError(f"{name}: cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def close_all(sockets: Sequence[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()


def _server(config: Any) -> Any:
    """A uvicorn server that leaves signals to its caller (see the module's docstring)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


async def _serve(server: Any, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit:
        pass  # uvicorn's word for a failed lifespan: `started` stays False and says so


@contextlib.contextmanager
def _on_signals(callback: Any) -> Iterator[None]:
    """Call `callback` on SIGINT/SIGTERM while the block runs (main thread only). A second
    signal finds Python's own handling again: Ctrl-C twice interrupts a stuck shutdown."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def handle() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)
        installed.clear()
        callback()

    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, handle)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def serving(listeners: Sequence[Listener]) -> AsyncIterator[asyncio.Event]:
    """Serve every listener until the block ends; the block runs once all have started.

    Yields an Event that is set when a server stops by itself or on SIGINT/SIGTERM: the
    block should end then. On exit every server is stopped and waited for. Raises
    StartupError when a server did not start (its lifespan failed: its log says why; or a
    signal came first) or failed while serving; the block then never runs.
    """
    import uvicorn

    servers = [
        _server(uvicorn.Config(item.app, log_level="info", access_log=False)) for item in listeners
    ]
    stopped = asyncio.Event()
    signalled: list[bool] = []

    def on_signal() -> None:
        signalled.append(True)
        stopped.set()

    tasks = [
        asyncio.create_task(_serve(server, item.sock), name=item.name)
        for server, item in zip(servers, listeners, strict=True)
    ]
    for task in tasks:
        task.add_done_callback(lambda _: stopped.set())
    started = False
    with _on_signals(on_signal):
        try:
            while not stopped.is_set() and not started:
                await asyncio.wait(tasks, timeout=0.01, return_when=asyncio.FIRST_COMPLETED)
                started = all(server.started for server in servers)
            if started:
                yield stopped
        finally:
            for server in servers:
                server.should_exit = True
            results = await asyncio.gather(*tasks, return_exceptions=True)
    for item, server, result in zip(listeners, servers, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise StartupError(f"the {item.name} on {item.address} failed: {result}") from None
        if not server.started and not signalled:
            raise StartupError(
                f"the {item.name} on {item.address} did not start (the line above says why)"
            )
    if not started:
        raise StartupError("stopped by a signal before every server had started")


async def serve_together(listeners: Sequence[Listener]) -> None:
    """Serve every listener until one of them stops or SIGINT/SIGTERM arrives (see `serving`)."""
    async with serving(listeners) as stopped:
        await stopped.wait()


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
    server = _server(uvicorn.Config(app, **options))
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
