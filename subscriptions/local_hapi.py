"""The real HAPI FHIR server of `hapi-config/` on this machine, for `researchflow demo --hapi real`.

`start_local_hapi` starts (or finds running) the server through `hapi-config/hapi.sh`;
`RestHapi` writes the demo's changes through the FHIR client with the same small interface
the stand-in offers the demo (`update`, `delete`, `resources`, `wait_idle`), and deletes a
Patient together with what refers to it, since HAPI refuses to delete a referenced resource.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from core.errors import ResearchFlowError
from core.store import SpeedStore
from subscriptions.fhir_client import FhirClient
from subscriptions.standin.hapi import Truth

HAPI_SH = Path(__file__).resolve().parents[1] / "hapi-config" / "hapi.sh"
SEED_BATCH = 250  # entries per transaction Bundle while seeding


class HapiStartError(ResearchFlowError):
    """hapi-config/hapi.sh could not start the server."""


def start_local_hapi(out: Callable[[str], None] = print) -> str:
    """Run `hapi.sh start` (HAPI_PORT, HAPI_DATABASE_URL from the environment); its base URL.

    The script's progress lines (Maven, start-up) go to stderr as they come. Raises
    HapiStartError with the script's last line when it fails.
    """
    if not HAPI_SH.exists():
        raise HapiStartError(f"{HAPI_SH} is missing: run the demo from a checkout of the project")
    out("starting the real HAPI FHIR server (hapi-config/hapi.sh start; a first build: minutes)")
    done = subprocess.run(
        ["bash", str(HAPI_SH), "start"],
        stdout=subprocess.PIPE,
        stderr=None if sys.stderr.isatty() else subprocess.PIPE,
        text=True,
        env=dict(os.environ),
        check=False,
    )
    if done.returncode != 0:
        last = ((done.stderr or "").strip().splitlines() or ["see the output above"])[-1]
        raise HapiStartError(f"the real HAPI FHIR server did not start: {last}")
    return done.stdout.strip().splitlines()[-1]


class RestHapi:
    """The demo's changes, made on a real HAPI FHIR server through its REST API."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.resources: dict[tuple[str, str], Truth] = {}
        # Set by the demo: `wait_idle` then waits until the speed layer holds each change.
        self.store: SpeedStore | None = None
        self._changed: set[tuple[str, str]] = set()
        self._fhir = FhirClient(self.base_url, timeout=httpx.Timeout(120.0))

    async def aclose(self) -> None:
        await self._fhir.aclose()

    async def seed(self, resources: Iterable[Mapping[str, Any]]) -> None:
        """Write many resources in transaction Bundles (a few hundred entries each)."""
        batch: list[dict[str, Any]] = []
        for resource in resources:
            batch.append(self._put_entry(resource))
            if len(batch) >= SEED_BATCH:
                await self._transaction(batch)
                batch = []
        if batch:
            await self._transaction(batch)
        self._changed.clear()  # seeded before the Subscriptions: the batch layer's to hold

    async def update(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        stored = await self._fhir.update(resource)
        self._remember(stored)
        return stored

    async def delete(self, resource_type: str, resource_id: str) -> None:
        """Delete one resource; a Patient goes together with the resources that refer to it."""
        doomed = [(resource_type, resource_id)]
        if resource_type == "Patient":
            subject = f"Patient/{resource_id}"
            doomed += [
                key
                for key, truth in self.resources.items()
                if not truth.deleted
                and truth.resource is not None
                and (truth.resource.get("subject") or {}).get("reference") == subject
            ]
        entries = [{"request": {"method": "DELETE", "url": f"{t}/{i}"}} for t, i in doomed]
        await self._transaction(entries)

    async def wait_idle(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109  (the stand-in's signature)
        """Wait (at most `timeout` seconds) until the speed layer holds every change made
        since the last call, as HAPI delivered it; what HAPI drops, the poller finds later."""
        deadline = asyncio.get_running_loop().time() + timeout
        pending, self._changed = set(self._changed), set()
        while pending and self.store is not None:
            for key in list(pending):
                entry = await self.store.get(*key)
                truth = self.resources[key]
                held = entry.version_id if entry is not None else None
                if held is not None and held.isdigit() and int(held) >= truth.version:
                    pending.discard(key)
            if not pending or asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.1)

    @staticmethod
    def _put_entry(resource: Mapping[str, Any]) -> dict[str, Any]:
        url = f"{resource['resourceType']}/{resource['id']}"
        return {"resource": dict(resource), "request": {"method": "PUT", "url": url}}

    async def _transaction(self, entries: list[dict[str, Any]]) -> None:
        answer = await self._fhir.transaction(entries)
        for sent, got in zip(entries, answer.get("entry") or [], strict=False):
            outcome = got.get("response") or {}
            etag = str(outcome.get("etag") or "").removeprefix("W/").strip('"')
            resource = sent.get("resource")
            if resource is not None:
                location = str(outcome.get("location") or "")
                version = location.rsplit("/_history/", 1)[-1] if "/_history/" in location else etag
                self._remember({**resource, "meta": {"versionId": version}})
            elif etag.isdigit():  # a deletion: HAPI answers with the deletion's version
                resource_type, resource_id = sent["request"]["url"].split("/", 1)
                self.resources[(resource_type, resource_id)] = Truth(int(etag), True, None)
                self._changed.add((resource_type, resource_id))

    def _remember(self, stored: Mapping[str, Any]) -> None:
        version = str((stored.get("meta") or {}).get("versionId") or "1")
        key = (str(stored["resourceType"]), str(stored["id"]))
        self.resources[key] = Truth(int(version) if version.isdigit() else 1, False, dict(stored))
        self._changed.add(key)
