"""Redis credentials and TLS: the documented ACL user is enough for every service, and
`rediss://` works (and refuses a server it cannot verify)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from core.settings import Settings
from core.store import SpeedStore, connect, entries_key
from receiver.app import create_app as create_receiver
from serving import batch
from serving.api import create_app as create_api
from serving.batch_refresh import refresh
from serving.derive import default_deriver
from serving.status import status_route
from subscriptions.fhir_client import FhirClient, hapi_lookup
from subscriptions.poller import poll_once
from subscriptions.standin import synthetic
from subscriptions.standin.hapi import StandInHapi
from subscriptions.standin.run import serve_standin
from tests.asgi import running
from tests.procs import RedisProcess, free_port

DOCS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
PASSWORD = "acl-test-password"
HEADERS = {"Authorization": "Bearer t", "Content-Type": "application/fhir+json"}


def documented_acl() -> list[str]:
    """The ACL SETUSER arguments exactly as docs/operations.md gives them."""
    text = DOCS.read_text()
    block = re.search(r"```\n(ACL SETUSER researchflow .*?)```", text, re.S)
    assert block is not None, "docs/operations.md has no ACL SETUSER block"
    words = block.group(1).split()
    return [w.replace("LONG_RANDOM_PASSWORD", PASSWORD) for w in words[2:]]


@pytest.fixture
def acl_redis() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    admin = redis.Redis(port=server.port)
    admin.execute_command("ACL", "SETUSER", *documented_acl())
    admin.close()
    try:
        yield server
    finally:
        server.stop()


async def test_the_documented_acl_user_runs_receiver_poller_and_query_api(
    acl_redis: RedisProcess, pg_url: str
) -> None:
    url = f"redis://researchflow:{PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    hapi = StandInHapi()
    async with serve_standin(hapi) as fhir_base:
        settings = Settings(
            redis_url=url,
            database_url=pg_url,
            fhir_base_url=fhir_base,
            receiver_tokens=("t",),
            serving_tokens=("s",),
        )
        rnd = __import__("random").Random(3)
        for n in range(5):
            await hapi.update(synthetic.patient(n, rnd))
        batch.init(pg_url)
        client = connect(settings)
        store = SpeedStore(client)
        try:
            await refresh(settings, store=store)
            async with FhirClient(fhir_base) as fhir:
                await poll_once(settings, store, fhir, derive=default_deriver())
            receiver = create_receiver(
                settings, derive=default_deriver(), hapi=hapi_lookup(settings.fhir_base_url)
            )
            async with running(receiver) as http:
                body = {
                    "resourceType": "Patient",
                    "id": "acl",
                    "gender": "male",
                    "meta": {"versionId": "1"},
                }
                assert (
                    await http.put("/fhir/Patient/acl", content=json.dumps(body), headers=HEADERS)
                ).status_code == 204
                bad = {**body, "id": "bad", "gender": "robot"}
                assert (
                    await http.put("/fhir/Patient/bad", content=json.dumps(bad), headers=HEADERS)
                ).status_code == 422
                assert (await http.post("/fhir", content=b"", headers=HEADERS)).status_code == 204
                assert (
                    await http.delete("/fhir/Patient/pat-1", headers=HEADERS)
                ).status_code == 204
            api = create_api(settings, extra_routes=[status_route(settings)])
            async with running(api) as http:
                auth = {"Authorization": "Bearer s"}
                cohort = await http.get("/cohort", params={"gender": "male"}, headers=auth)
                assert cohort.status_code == 200 and cohort.json()["degraded"] is False
                assert (await http.get("/status", headers=auth)).status_code == 200
                assert (await http.get("/metrics")).status_code == 200
            await refresh(settings, store=store)  # the trim
            await store.flush_stats()
        finally:
            await client.aclose()
    admin = redis.Redis(port=acl_redis.port)
    try:
        refused = admin.execute_command("ACL", "LOG")
    finally:
        admin.close()
    assert refused == [], f"the documented ACL refused: {refused}"


def test_a_wrong_password_is_a_one_line_exit_1(
    acl_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import researchflow_cli

    monkeypatch.setenv("REDIS_URL", f"redis://researchflow:wrong@127.0.0.1:{acl_redis.port}/0")
    assert researchflow_cli.main(["speed", "get", "Patient/x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "wrong" not in err, "the password stays out of the message"


def make_certs(directory: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=rf-test-ca",
            "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem")  # fmt: skip


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    make_certs(tmp_path)
    port = free_port()
    server = RedisProcess(
        free_port(),
        "--tls-port", str(port),
        "--tls-cert-file", str(tmp_path / "server.pem"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-ca-cert-file", str(tmp_path / "ca.pem"),
        "--tls-auth-clients", "no",
    ).start()  # fmt: skip
    try:
        yield port, tmp_path
    finally:
        server.stop()


async def test_rediss_speed_layer_over_tls(tls_redis: tuple[int, Path]) -> None:
    port, certs = tls_redis
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs / 'ca.pem'}"
    settings = Settings(redis_url=url, receiver_tokens=("t",))

    async def nobody(resource_type: str, resource_id: str) -> None:
        return None

    async with running(
        create_receiver(settings, derive=default_deriver(), latest_version=nobody)
    ) as http:
        body = {"resourceType": "Patient", "id": "tls", "meta": {"versionId": "1"}}
        assert (
            await http.put("/fhir/Patient/tls", content=json.dumps(body), headers=HEADERS)
        ).status_code == 204
    client = connect(settings)
    try:
        entry = await SpeedStore(client).get("Patient", "tls")
        assert entry is not None and entry.version_id == "1"
    finally:
        await client.aclose()
    # A server whose certificate the client cannot verify is refused: 503, nothing written.
    untrusted = Settings(redis_url=f"rediss://127.0.0.1:{port}/0", receiver_tokens=("t",))
    async with running(
        create_receiver(untrusted, derive=default_deriver(), latest_version=nobody)
    ) as http:
        body = {"resourceType": "Patient", "id": "tls2", "meta": {"versionId": "1"}}
        answer = await http.put("/fhir/Patient/tls2", content=json.dumps(body), headers=HEADERS)
        assert answer.status_code == 503
    plain = aioredis.Redis.from_url(url)
    try:
        assert await plain.hexists(entries_key("Patient", "tls2"), "tls2") == 0
    finally:
        await plain.aclose()
