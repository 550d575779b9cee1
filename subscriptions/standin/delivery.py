"""The stand-in HAPI's search matching and rest-hook delivery, built to HAPI 8.x's behaviour.

HAPI facts this follows (see `../shared/hapi-rest-hook.md`): one in-memory queue per
subscription (1000 deep) drained by 2 concurrent deliverers, so notifications for one
resource can arrive out of order; creates and updates arrive as `PUT {endpoint}/{Type}/{id}`
with `If-Match: W/"N"` (none, and no meta.versionId, with strip-version-ids); deletes only
with send-delete-messages; an empty-payload subscription gets `POST {endpoint}` with an empty
form body whose answer is ignored; a failing delivery is retried with exponential back-off
(1 s, x1.1) for ~60 s, then dropped, and the Subscription stays `active`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

import httpx

from core.fhir_values import SEARCH_PREFIXES, dumps, instant_bounds, range_matches

logger = logging.getLogger(__name__)

EXT_SEND_DELETES = "http://hapifhir.io/fhir/StructureDefinition/subscription-send-delete-messages"
EXT_STRIP_VERSIONS = (
    "http://hapifhir.io/fhir/StructureDefinition/subscription-resthook-strip-version-ids"
)
EXT_DELIVER_LATEST = (
    "http://hapifhir.io/fhir/StructureDefinition/subscription-resthook-deliver-latest-version"
)
FHIR_JSON_UTF8 = "application/fhir+json; charset=UTF-8"
USER_AGENT = "HAPI-FHIR/8.x (stand-in; ResearchFlow tests)"

Operation = Literal["create", "update", "delete", "trigger"]
ReadCurrent = Callable[[str, str], "tuple[int, dict[str, Any] | None] | None"]

# Parameters that control a search rather than filter it; HAPI ignores _pretty/_format too.
CONTROL_PARAMS = frozenset(
    {
        "_sort",
        "_count",
        "_summary",
        "_total",
        "_format",
        "_pretty",
        "_elements",
        "_include",
        "_revinclude",
        "_getpages",
        "_getpagesoffset",
        "_bundletype",
        "_offset",
    }
)
# Search parameter names whose element name is not the camelCase of the parameter.
_ELEMENT_OF = {
    "patient": "subject",
    "birthdate": "birthDate",
    "clinical-status": "clinicalStatus",
    "verification-status": "verificationStatus",
    "type": "type",
}


# ---------------------------------------------------------------------------------------------
# Matching (search parameters and Subscription criteria)


def parse_criteria(criteria: str) -> tuple[str, list[tuple[str, str]]]:
    """`Type?a=b&c=d` -> ("Type", [("a", "b"), ("c", "d")])."""
    resource_type, _, query = criteria.partition("?")
    return resource_type.strip(), parse_qsl(query, keep_blank_values=True)


def _date_matches(value_ms: int, spec: str) -> bool:
    """A date search parameter (`ge2024-01-01`) against an instant (epoch ms)."""
    prefix, rest = (spec[:2], spec[2:]) if spec[:2] in SEARCH_PREFIXES else ("eq", spec)
    lower, upper = instant_bounds(rest)
    return range_matches((value_ms, value_ms), (lower, upper - 1), prefix)


def _token_matches(item: Any, system: str | None, code: str) -> bool:
    if isinstance(item, list):
        return any(_token_matches(one, system, code) for one in item)
    if isinstance(item, bool):
        return system is None and str(item).lower() == code.lower()
    if isinstance(item, str | int | float):
        return system is None and str(item) == code
    if not isinstance(item, dict):
        return False
    if "coding" in item:
        return _token_matches(item.get("coding"), system, code)
    if "reference" in item:
        ref = str(item.get("reference") or "")
        return ref == code or ref.endswith("/" + code)
    item_code = item.get("code", item.get("value"))
    if system is not None and (item.get("system") or "") != system:
        return False
    return code == "" or str(item_code) == code


def _element(resource_type: str, name: str) -> str:
    if name == "patient" and resource_type == "Patient":
        return "id"
    mapped = _ELEMENT_OF.get(name)
    if mapped:
        return mapped
    head, *rest = name.split("-")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _param_matches(resource: dict[str, Any], name: str, value: str) -> bool:
    base, _, modifier = name.partition(":")
    alternatives = value.split(",")
    raw_meta = resource.get("meta")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    found: bool
    if base == "_id":
        found = any(resource.get("id") == alt for alt in alternatives)
    elif base == "_lastUpdated":
        last = meta.get("lastUpdated")
        return isinstance(last, str) and _date_matches(instant_bounds(last)[0], value)
    elif base in ("_tag", "_security", "_profile"):
        meta_element = {"_tag": "tag", "_security": "security", "_profile": "profile"}[base]
        found = any(_token(meta.get(meta_element), alt) for alt in alternatives)
    else:
        item: Any = resource.get(_element(str(resource.get("resourceType")), base))
        if modifier == "missing":
            return (item is None or item == [] or item == {}) == (value == "true")
        found = any(_token(item, alt) for alt in alternatives)
    return not found if modifier == "not" else found


def _token(item: Any, spec: str) -> bool:
    if item is None:
        return False
    if "|" in spec:
        system, code = spec.split("|", 1)
        return _token_matches(item, system, code)
    return _token_matches(item, None, spec)


def resource_matches(resource: dict[str, Any], params: Iterable[tuple[str, str]]) -> bool:
    """True when the resource meets every (ANDed) search parameter; commas OR inside one."""
    return all(
        _param_matches(resource, name, value)
        for name, value in params
        if name not in CONTROL_PARAMS and not (name.startswith("_") and name not in _FILTERS)
    )


_FILTERS = frozenset({"_id", "_lastUpdated", "_tag", "_security", "_profile"})


# ---------------------------------------------------------------------------------------------
# Delivery


def _without_version_id(resource: Any) -> Any:
    if not isinstance(resource, dict) or not isinstance(resource.get("meta"), dict):
        return resource
    meta = {k: v for k, v in resource["meta"].items() if k != "versionId"}
    return {**resource, "meta": meta}


@dataclass(frozen=True)
class RestHook:
    """An active rest-hook Subscription as the delivery pipeline sees it (a snapshot)."""

    id: str
    resource_type: str
    params: tuple[tuple[str, str], ...]
    endpoint: str
    payload: str | None
    headers: tuple[tuple[str, str], ...] = ()
    send_delete: bool = False
    strip_version_ids: bool = False
    deliver_latest: bool = False

    def matches(self, resource_type: str, resource: dict[str, Any] | None) -> bool:
        if resource_type != self.resource_type or resource is None:
            return False
        return resource_matches(resource, self.params)


def channel_headers(raw: Sequence[Any]) -> tuple[tuple[str, str], ...]:
    """`"Authorization: Bearer x"` -> ("Authorization", "Bearer x"): split on the first ':'."""
    out: list[tuple[str, str]] = []
    for entry in raw:
        if isinstance(entry, str) and ":" in entry:
            name, _, value = entry.partition(":")
            if name.strip():
                out.append((name.strip(), value.strip()))
    return tuple(out)


@dataclass(frozen=True)
class Notification:
    """One queued delivery: what changed, at which version, for which subscription."""

    hook: RestHook
    operation: Operation
    resource_type: str
    resource_id: str
    version: int
    resource: dict[str, Any] | None


@dataclass(frozen=True)
class DeliveryAttempt:
    """One HTTP request the stand-in made to a subscriber (or tried to)."""

    subscription_id: str
    operation: Operation
    method: str
    url: str
    status: int | None  # None: connection error
    error: str | None
    resource_type: str
    resource_id: str
    version: str | None  # the version sent (None for DELETE / empty payload)
    attempt: int
    at: float  # time.monotonic()
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class _Channel:
    hook: RestHook
    queue: asyncio.Queue[Notification]
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    putters: set[asyncio.Task[None]] = field(default_factory=set)


class Deliverer:
    """Per-subscription queues and delivery workers, with knobs for tests."""

    def __init__(
        self,
        *,
        read_current: ReadCurrent,
        deliverers: int = 2,
        queue_depth: int = 1000,
        retry_initial: float = 1.0,
        retry_factor: float = 1.1,
        retry_total: float = 60.0,
        timeout: float = 10.0,
    ) -> None:
        self._read_current = read_current
        self.deliverers = deliverers
        self.queue_depth = queue_depth
        self.retry_initial = retry_initial
        self.retry_factor = retry_factor
        self.retry_total = retry_total
        self.timeout = timeout
        self.jitter = 0.0
        self.attempts: list[DeliveryAttempt] = []
        self.delivered = 0  # notifications answered 2xx (or sent, for empty payloads)
        self.dropped = 0  # given up after retry_total
        self.lost = 0  # thrown away untried (drop_next / drop_when / subscription gone)
        self.skipped = 0  # deliver-latest-version found the resource deleted
        self._channels: dict[str, _Channel] = {}
        self._client: httpx.AsyncClient | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._outstanding = 0
        self._drop_next = 0
        self._drop_when: Callable[[Notification], bool] | None = None

    # -- knobs --------------------------------------------------------------------------------
    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def drop_next(self, n: int = 1) -> None:
        self._drop_next += n

    def drop_when(self, predicate: Callable[[Notification], bool] | None) -> None:
        self._drop_when = predicate

    # -- registry -----------------------------------------------------------------------------
    def active(self) -> list[RestHook]:
        return [ch.hook for ch in self._channels.values()]

    def register(self, hook: RestHook) -> None:
        channel = self._channels.get(hook.id)
        if channel is not None:
            channel.hook = hook
            return
        channel = _Channel(hook, asyncio.Queue(maxsize=self.queue_depth))
        self._channels[hook.id] = channel
        for n in range(self.deliverers):
            channel.workers.append(
                asyncio.create_task(self._work(channel), name=f"standin-deliver-{hook.id}-{n}")
            )

    async def unregister(self, subscription_id: str) -> None:
        channel = self._channels.pop(subscription_id, None)
        if channel is None:
            return
        tasks = [*channel.workers, *channel.putters]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not channel.queue.empty():
            channel.queue.get_nowait()
            self.lost += 1
            self._outstanding -= 1

    def enqueue(self, hook: RestHook, note: Notification) -> None:
        channel = self._channels.get(hook.id)
        if channel is None:
            return
        self._outstanding += 1
        try:
            channel.queue.put_nowait(note)
        except asyncio.QueueFull:
            # HAPI blocks the submitter when the queue is full; we park the put instead.
            task = asyncio.create_task(self._put(channel, note))
            channel.putters.add(task)
            task.add_done_callback(channel.putters.discard)

    async def _put(self, channel: _Channel, note: Notification) -> None:
        try:
            await channel.queue.put(note)
        except asyncio.CancelledError:
            self.lost += 1
            self._outstanding -= 1
            raise

    async def wait_idle(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while self._outstanding > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._outstanding} notifications still outstanding")
            await asyncio.sleep(0.005)

    async def aclose(self) -> None:
        for subscription_id in list(self._channels):
            await self.unregister(subscription_id)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- work ---------------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # trust_env=False: a proxy from the environment must never see loopback traffic.
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
                trust_env=False,
            )
        return self._client

    async def _work(self, channel: _Channel) -> None:
        while True:
            await self._running.wait()
            note = await channel.queue.get()
            try:
                await self._running.wait()
                await self._deliver(note)
            except asyncio.CancelledError:
                self.lost += 1
                raise
            except Exception:  # a bug here must not kill the worker
                logger.exception("stand-in delivery failed unexpectedly")
            finally:
                self._outstanding -= 1

    def _should_drop(self, note: Notification) -> bool:
        if self._drop_next > 0:
            self._drop_next -= 1
            return True
        return self._drop_when is not None and self._drop_when(note)

    async def _deliver(self, note: Notification) -> None:
        if self._should_drop(note):
            self.lost += 1
            logger.info(
                "stand-in lost %s/%s v%s for Subscription/%s",
                note.resource_type,
                note.resource_id,
                note.version,
                note.hook.id,
            )
            return
        if self.jitter > 0:
            await asyncio.sleep(random.uniform(0, self.jitter))
        request = self._request(note)
        if request is None:
            self.skipped += 1
            return
        method, url, body, headers, version = request
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = self.retry_initial
        attempt = 0
        while True:
            attempt += 1
            status, error = await self._send(method, url, body, headers)
            self.attempts.append(
                DeliveryAttempt(
                    note.hook.id,
                    note.operation,
                    method,
                    url,
                    status,
                    error,
                    note.resource_type,
                    note.resource_id,
                    version,
                    attempt,
                    time.monotonic(),
                    dict(headers),
                )
            )
            # HAPI ignores the answer to an empty-payload notification.
            if error is None and (note.hook.payload is None and method == "POST"):
                self.delivered += 1
                return
            if status is not None and 200 <= status < 300:
                self.delivered += 1
                return
            await asyncio.sleep(delay)
            delay *= self.retry_factor
            if loop.time() - started >= self.retry_total:
                self.dropped += 1
                logger.warning(
                    "stand-in gave up delivering %s %s after %d attempts (last: %s)",
                    method,
                    url,
                    attempt,
                    error or status,
                )
                return

    def _request(
        self, note: Notification
    ) -> tuple[str, str, bytes, list[tuple[str, str]], str | None] | None:
        hook = note.hook
        base = hook.endpoint.rstrip("/")
        headers: list[tuple[str, str]] = [("User-Agent", USER_AGENT)]
        if note.operation == "delete":
            headers.append(("Accept", "application/fhir+json"))
            headers.extend(hook.headers)
            return "DELETE", f"{base}/{note.resource_type}/{note.resource_id}", b"", headers, None
        if hook.payload is None:
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
            headers.extend(hook.headers)
            return "POST", base, b"", headers, None
        resource, version = note.resource, note.version
        if hook.deliver_latest:
            current = self._read_current(note.resource_type, note.resource_id)
            if current is None or current[1] is None:
                return None  # deleted meanwhile: HAPI skips the delivery
            version, resource = current
        headers.append(("Content-Type", FHIR_JSON_UTF8))
        headers.append(("Accept", "application/fhir+json"))
        if hook.strip_version_ids:
            # HAPI 8.8 then sends no If-Match and takes meta.versionId out of the body.
            resource = _without_version_id(resource)
        else:
            headers.append(("If-Match", f'W/"{version}"'))  # HAPI 8.8 sends a weak ETag
        headers.extend(hook.headers)
        url = f"{base}/{note.resource_type}/{note.resource_id}"
        return "PUT", url, dumps(resource), headers, str(version)

    async def _send(
        self, method: str, url: str, body: bytes, headers: list[tuple[str, str]]
    ) -> tuple[int | None, str | None]:
        try:
            response = await self._http().request(method, url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(httpx.HTTPError):
            await response.aread()
        return response.status_code, None
