"""A private three-node Redis Cluster on loopback for tests: started on free ports, stopped by PID."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.procs import RedisProcess, free_port


class RedisClusterProcesses:
    """Three `redis-server --cluster-enabled yes` primaries (no replicas) joined by redis-cli."""

    def __init__(self, nodes: int = 3) -> None:
        self.ports = [free_port() for _ in range(nodes)]
        # The bus defaults to port + 10000, which overflows for high ephemeral ports.
        self.bus_ports = [free_port() for _ in range(nodes)]
        self.nodes: list[RedisProcess] = []

    @property
    def url(self) -> str:
        """The URL of one node (a cluster client discovers the others from it)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{port}/0" for port in self.ports]

    def start(self, timeout: float = 20.0) -> RedisClusterProcesses:
        try:
            for port, bus_port in zip(self.ports, self.bus_ports, strict=True):
                node = RedisProcess(
                    port,
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",  # in the node's own --dir
                    "--cluster-node-timeout", "5000",
                    "--cluster-port", str(bus_port),
                )  # fmt: skip
                self.nodes.append(node.start())
            self._cli(
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
                port=None,
                timeout=timeout,
            )
            self._wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _cli(self, *args: str, port: int | None, timeout: float = 10.0) -> str:
        command = [shutil.which("redis-cli") or "redis-cli"]
        if port is not None:
            command += ["-h", "127.0.0.1", "-p", str(port)]
        done = subprocess.run([*command, *args], capture_output=True, timeout=timeout, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def _wait_ok(self, timeout: float) -> None:
        """Until every node says cluster_state:ok and knows all slots and nodes."""
        deadline = time.monotonic() + timeout
        pending = list(self.ports)
        while pending:
            info = self._cli("cluster", "info", port=pending[0])
            fields = dict(
                line.split(":", 1) for line in info.splitlines() if ":" in line and line.strip()
            )
            if (
                fields.get("cluster_state", "").strip() == "ok"
                and fields.get("cluster_slots_ok", "").strip() == "16384"
                and fields.get("cluster_known_nodes", "").strip() == str(len(self.ports))
            ):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok after {timeout}s: {info!r}")
            time.sleep(0.05)

    def flush(self) -> None:
        """Empty every node (only these private ones)."""
        for port in self.ports:
            self._cli("flushall", port=port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """A three-node cluster for a module's tests; empty it between tests with `.flush()`."""
    cluster = RedisClusterProcesses().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster_url(redis_cluster: RedisClusterProcesses) -> str:
    """The URL of one node of the module's cluster."""
    return redis_cluster.url
