"""Private server processes for fault tests: started on free loopback ports, stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def temporary_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database (its URL) on the server of `admin_url` (a database
    URL of a role that may create databases), dropped afterwards (its sessions ended)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class RedisProcess:
    """A redis-server of the test's own, which the test may kill and restart."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self.extra = extra
        self.dir = Path(tempfile.mkdtemp(prefix="rf-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


async def eventually(
    predicate: Callable[[], bool], seconds: float = 60.0, step: float = 0.01
) -> None:
    """Wait until `predicate()` holds, or fail the test after `seconds`."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition still false after {seconds}s")
        await asyncio.sleep(step)


PG_BIN = (
    Path("/usr/lib/postgresql")
    / (
        sorted(p.name for p in Path("/usr/lib/postgresql").iterdir())[-1]
        if Path("/usr/lib/postgresql").exists()
        else "15"
    )
    / "bin"
)


class PostgresProcess:
    """A PostgreSQL server of the test's own (initdb in a temporary directory), by PID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rf-pg-"))
        self.data = self.dir / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0  # PostgreSQL refuses to run as root
        user = os.environ.get("USER") or "root"
        self.user = user
        self._run(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", user, "--no-sync"],
        )

    def _command(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if self._as_postgres else argv

    def _run(self, argv: list[str]) -> None:
        if self._as_postgres:
            shutil.chown(self.dir, "postgres")
        subprocess.run(
            self._command(argv), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresProcess:
        self.proc = subprocess.Popen(
            self._command(
                [
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.dir}",
                    "-c",
                    "fsync=off",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port, timeout=30)
        return self

    def kill(self) -> None:
        """Immediate shutdown of the server and every backend (SIGQUIT to the postmaster)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGQUIT)
            self.proc.wait(timeout=20)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
