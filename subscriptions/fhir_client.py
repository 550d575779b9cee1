"""The one client for everything that talks to HAPI FHIR (REST API, R4, JSON).

Every caller (poller, batch sync, bootstrap, watchdog, the receiver's delete-version lookup)
goes through `FhirClient`, so retries, headers and error texts are the same everywhere:

- `Accept: application/fhir+json` always, `Content-Type: application/fhir+json` on bodies.
- `Cache-Control: no-cache` on every search and history GET: HAPI reuses the results of an
  identical search for 60 s, so without it a fresh change (or Subscription) can be missed.
- Retries with exponential back-off only when trying again can help: connection errors,
  timeouts, 408, 429 and 5xx, honouring `Retry-After` (capped). Any other 4xx raises
  `FhirFatalError` at once. Both errors carry the status and HAPI's OperationOutcome text.
- `server_date()` is HAPI's clock (the `Date` header of its last answer): watermarks are
  kept in HAPI's time, never this machine's.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property, partial
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
import orjson

from core.errors import EndlessPaging, FhirFatalError, FhirTemporaryError
from core.fhir_values import JsonError, dumps, loads, split_reference

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=10.0)
DEFAULT_LIMITS = httpx.Limits(
    max_connections=20, max_keepalive_connections=10, keepalive_expiry=30.0
)
RETRY_STATUSES = frozenset({408, 429})
# Pages in a row that bring no entry not already seen on the pages before them, after which a
# traversal is given up: a server whose `next` links never end would otherwise be followed
# forever. Real paging never does this (every page but a last empty one holds entries).
MAX_IDLE_PAGES = 20
# Errors after which the request surely never reached HAPI: safe to retry even a POST.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

Params = Mapping[str, str | int] | Sequence[tuple[str, str | int]]
Resource = dict[str, Any]


class LatestVersion(NamedTuple):
    """The newest version HAPI holds of one resource (possibly a deletion)."""

    version_id: str | None
    last_updated: str | None
    deleted: bool


@dataclass(frozen=True)
class HistoryEntry:
    """One entry of a `_history` Bundle: a version of a resource, or its deletion."""

    resource_type: str
    id: str
    version_id: str | None
    last_updated: str | None
    deleted: bool
    resource: Resource | None = field(repr=False)

    @cached_property
    def raw(self) -> bytes | None:
        """The resource as compact JSON bytes (a Bundle is one document: re-serialised)."""
        return None if self.resource is None else dumps(self.resource)


@dataclass(frozen=True)
class HistoryPage:
    """One page of a `_history` answer, with HAPI's clock at the time it answered."""

    entries: list[HistoryEntry]
    server_date: datetime | None
    next_url: str | None


def operation_outcome_text(body: bytes) -> str | None:
    """The issues' diagnostics (or details text, or code) of an OperationOutcome, joined."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("resourceType") != "OperationOutcome":
        return None
    texts: list[str] = []
    for issue in data.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details")
        text = (
            issue.get("diagnostics")
            or (details.get("text") if isinstance(details, dict) else None)
            or issue.get("code")
        )
        if text:
            texts.append(str(text))
    return "; ".join(texts) or None


def _error_text(response: httpx.Response) -> str:
    text = operation_outcome_text(response.content)
    if text:
        return text
    body = response.text.strip()
    if body and len(body) <= 300 and "<" not in body:
        return body
    return response.reason_phrase or "no details"


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def parse_http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _version_from_etag(etag: str | None) -> str | None:
    if not etag:
        return None
    text = etag.strip()
    if text.startswith("W/"):
        text = text[2:]
    return text.strip('"') or None


def history_entry(entry: Mapping[str, Any]) -> HistoryEntry | None:
    """Read one `_history` Bundle entry; None when it names no resource."""
    resource = entry.get("resource")
    if not isinstance(resource, dict):
        resource = None
    request = entry.get("request") or {}
    response = entry.get("response") or {}
    method = request.get("method")
    meta = (resource or {}).get("meta") or {}
    rtype, rid, url_version = split_reference(request.get("url"))
    full_type, full_id, full_version = split_reference(entry.get("fullUrl"))
    resource_type = (resource or {}).get("resourceType") or rtype or full_type
    resource_id = (resource or {}).get("id") or rid or full_id
    if not resource_type or not resource_id:
        return None
    deleted = method == "DELETE" or resource is None
    version_id = (
        meta.get("versionId")
        or _version_from_etag(response.get("etag"))
        or url_version
        or full_version
    )
    last_updated = meta.get("lastUpdated") or response.get("lastModified")
    return HistoryEntry(
        resource_type=str(resource_type),
        id=str(resource_id),
        version_id=None if version_id is None else str(version_id),
        last_updated=None if last_updated is None else str(last_updated),
        deleted=deleted,
        resource=None if deleted else resource,
    )


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


class FhirClient:
    """An async FHIR R4 JSON client for HAPI; use as `async with FhirClient(url) as fhir:`."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
        max_retries: int = 4,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        retry_after_max: float = 60.0,
        client: httpx.AsyncClient | None = None,
        max_idle_pages: int = MAX_IDLE_PAGES,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_idle_pages = max_idle_pages
        self.max_retries = max_retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=timeout, limits=limits, follow_redirects=True
        )
        self._base = urlsplit(self.base_url)
        self._last_date: datetime | None = None

    async def __aenter__(self) -> FhirClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def server_date(self) -> datetime | None:
        """HAPI's clock: the `Date` header of its last answer (UTC), None before any."""
        return self._last_date

    # -- plain REST ------------------------------------------------------------------------

    async def read(self, resource_type: str, resource_id: str) -> Resource:
        """`GET {type}/{id}`; a missing (404) or deleted (410) one raises FhirFatalError."""
        return await self._json("GET", f"{resource_type}/{resource_id}")

    async def create(self, resource: Mapping[str, Any]) -> Resource:
        """`POST {type}`; returns the stored resource (with HAPI's id and meta)."""
        response = await self._request(
            "POST",
            self._url(str(resource["resourceType"])),
            body=resource,
            headers={"Prefer": "return=representation"},
            idempotent=False,
        )
        stored = self._decode(response, allow_empty=True)
        if stored:
            return stored
        # `return=minimal` servers: the Location header names the new id and version.
        _, new_id, version = split_reference(response.headers.get("location"))
        result = dict(resource)
        if new_id:
            result["id"] = new_id
        if version:
            result["meta"] = {**(result.get("meta") or {}), "versionId": version}
        return result

    async def update(self, resource: Mapping[str, Any]) -> Resource:
        """`PUT {type}/{id}` (an update, or a create with a client-chosen id)."""
        path = f"{resource['resourceType']}/{resource['id']}"
        response = await self._request(
            "PUT", self._url(path), body=resource, headers={"Prefer": "return=representation"}
        )
        stored = self._decode(response, allow_empty=True)
        return stored or dict(resource)

    async def delete(self, resource_type: str, resource_id: str) -> bool:
        """`DELETE {type}/{id}`; False when HAPI says it was not there (404/410)."""
        try:
            await self._request("DELETE", self._url(f"{resource_type}/{resource_id}"))
        except FhirFatalError as exc:
            if exc.status_code in (404, 410):
                return False
            raise
        return True

    async def transaction(self, entries: Sequence[Mapping[str, Any]]) -> Resource:
        """`POST [base]` of a transaction Bundle of `entries`; HAPI's transaction-response."""
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}
        response = await self._request("POST", self.base_url, body=bundle, idempotent=False)
        return self._decode(response)

    async def get(self, path_or_url: str, params: Params | None = None) -> Resource:
        """A GET of any path below the base (or an absolute URL), as JSON, uncached."""
        url = path_or_url if "://" in path_or_url else self._url(path_or_url)
        return await self._json("GET", url, params=params, no_cache=True)

    # -- searches and history ----------------------------------------------------------------

    async def search(
        self, resource_type: str, params: Params | None = None
    ) -> AsyncIterator[Resource]:
        """Every matching resource, page after page by `next` links (never trusting `total`).

        Included resources (`search.mode` include) and OperationOutcomes are skipped.
        """
        async for bundle in self._pages(self._url(resource_type), params):
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(resource, dict):
                    continue
                mode = (entry.get("search") or {}).get("mode")
                if (
                    mode in ("include", "outcome")
                    or resource.get("resourceType") == "OperationOutcome"
                ):
                    continue
                yield resource

    async def history(
        self, resource_type: str | None = None, since: str | None = None, count: int = 100
    ) -> AsyncIterator[HistoryPage]:
        """Pages of `[base]/_history` or `[base]/{type}/_history`: newest first, with deletes."""
        path = f"{resource_type}/_history" if resource_type else "_history"
        params: list[tuple[str, str | int]] = [("_count", count)]
        if since:
            params.append(("_since", since))
        async for bundle in self._pages(self._url(path), params):
            entries = [
                parsed
                for entry in bundle.get("entry") or []
                if isinstance(entry, dict) and (parsed := history_entry(entry)) is not None
            ]
            yield HistoryPage(
                entries=entries, server_date=self._last_date, next_url=_next_link(bundle)
            )

    async def latest_version(self, resource_type: str, resource_id: str) -> LatestVersion | None:
        """The newest version of one resource (`{type}/{id}/_history?_count=1`); None if unknown."""
        try:
            bundle = await self._json(
                "GET",
                self._url(f"{resource_type}/{resource_id}/_history"),
                params=[("_count", 1)],
                no_cache=True,
            )
        except FhirFatalError as exc:
            if exc.status_code in (404, 410):
                return None
            raise
        newest: HistoryEntry | None = None
        for entry in bundle.get("entry") or []:
            parsed = history_entry(entry) if isinstance(entry, dict) else None
            if parsed is None:
                continue
            if newest is None or _version_key(parsed) > _version_key(newest):
                newest = parsed
        if newest is None:
            return None
        return LatestVersion(newest.version_id, newest.last_updated, newest.deleted)

    async def _pages(self, url: str, params: Params | None) -> AsyncIterator[dict[str, Any]]:
        """Every page of a searchset or history, by `next` links. Raises EndlessPaging when
        `max_idle_pages` pages in a row bring no entry that the pages just before had not."""
        seen: set[str] = set()
        recent: deque[set[str]] = deque(maxlen=self.max_idle_pages)
        idle = 0
        next_url: str | None = url
        next_params = params
        while next_url is not None:
            bundle = await self._json("GET", next_url, params=next_params, no_cache=True)
            yield bundle
            link = _next_link(bundle)
            next_url = self._rebase(link) if link else None
            next_params = None
            if next_url is None:
                return
            if next_url in seen:  # a server bug must not loop us forever
                logger.warning("HAPI repeated a next link; stopping the traversal there")
                return
            seen.add(next_url)
            keys = {_entry_key(e) for e in bundle.get("entry") or [] if isinstance(e, dict)}
            if any(all(key not in page for page in recent) for key in keys):
                idle = 0
            else:
                idle += 1
                if idle >= self.max_idle_pages:
                    raise EndlessPaging(
                        f"HAPI's paging makes no progress: {idle} pages in a row brought "
                        f"nothing new but named a next page ({_describe_url(url)}); "
                        "the traversal was given up"
                    )
            recent.append(keys)

    def _rebase(self, link: str) -> str:
        """Follow `link` on our base's host: HAPI names itself as it was configured (or as a
        proxy told it), which may be a host we cannot reach."""
        parts = urlsplit(link)
        if not parts.scheme:  # relative link
            return self._url(link.lstrip("/"))
        if (parts.scheme, parts.netloc) == (self._base.scheme, self._base.netloc):
            return link
        path = parts.path
        query = dict(parse_qsl(parts.query))
        if not path.startswith(self._base.path) and "_getpages" in query:
            path = self._base.path  # HAPI's paging links live at the base itself
        return urlunsplit((self._base.scheme, self._base.netloc, path, parts.query, ""))

    # -- transport ---------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    async def _json(
        self, method: str, url: str, *, params: Params | None = None, no_cache: bool = False
    ) -> Resource:
        if "://" not in url:
            url = self._url(url)
        headers = {"Cache-Control": "no-cache"} if no_cache else None
        response = await self._request(method, url, params=params, headers=headers)
        return self._decode(response)

    def _decode(self, response: httpx.Response, *, allow_empty: bool = False) -> Resource:
        if not response.content.strip():
            if allow_empty:
                return {}
            raise FhirFatalError(
                f"HAPI answered {_describe(response.request)} with no body",
                response.status_code,
            )
        try:
            data = loads(response.content)
        except JsonError as exc:
            raise FhirFatalError(
                f"HAPI answered {_describe(response.request)} with something that is not JSON",
                response.status_code,
            ) from exc
        if not isinstance(data, dict):
            raise FhirFatalError(
                f"HAPI answered {_describe(response.request)} with JSON that is not a resource",
                response.status_code,
            )
        return data

    async def _request(
        self,
        method: str,
        url: str,
        *,
        params: Params | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        all_headers = {"Accept": FHIR_JSON}
        content: bytes | None = None
        if body is not None:
            content = dumps(body)
            all_headers["Content-Type"] = f"{FHIR_JSON}; charset=UTF-8"
        all_headers.update(headers or {})
        request = self._client.build_request(
            method, url, params=_query(params), content=content, headers=all_headers
        )
        described = _describe(request)
        attempt = 0
        while True:
            try:
                response = await self._client.send(request)
            except httpx.TransportError as exc:
                # A POST that may have reached HAPI is not repeated: it could create twice.
                if not idempotent and not isinstance(exc, _NOT_SENT):
                    raise FhirTemporaryError(f"HAPI did not answer {described}: {exc!r}") from exc
                if attempt >= self.max_retries:
                    raise FhirTemporaryError(
                        f"HAPI at {self.base_url} cannot be reached ({described}, "
                        f"{attempt + 1} attempts): {exc!r}"
                    ) from exc
                delay = self._backoff(attempt)
                logger.info("HAPI unreachable (%s, %r); retry in %.1f s", described, exc, delay)
            else:
                await response.aread()
                date = parse_http_date(response.headers.get("date"))
                if date is not None:
                    self._last_date = date
                status = response.status_code
                if status < 400:
                    return response
                text = _error_text(response)
                retryable = status in RETRY_STATUSES or status >= 500
                if not retryable:
                    raise FhirFatalError(f"HAPI refused {described} ({status}): {text}", status)
                if attempt >= self.max_retries or (not idempotent and status not in (429, 503)):
                    raise FhirTemporaryError(
                        f"HAPI failed {described} ({status}) after {attempt + 1} attempts: {text}",
                        status,
                    )
                retry_after = parse_retry_after(response.headers.get("retry-after"), date)
                if retry_after is not None:
                    delay = min(retry_after, self.retry_after_max)
                else:
                    delay = self._backoff(attempt)
                logger.info("HAPI answered %s to %s; retry in %.1f s", status, described, delay)
            attempt += 1
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_max, self.backoff_initial * (2.0**attempt))
        return delay * random.uniform(0.75, 1.0)  # jitter: clients that failed together spread out


def _entry_key(entry: Mapping[str, Any]) -> str:
    """What makes a Bundle entry itself: its URL, its resource's version, its request."""
    resource = entry.get("resource")
    meta = resource.get("meta") if isinstance(resource, dict) else None
    version = meta.get("versionId") if isinstance(meta, dict) else None
    request = entry.get("request")
    method_url = (
        (request.get("method"), request.get("url")) if isinstance(request, dict) else (None, None)
    )
    return repr((entry.get("fullUrl"), version, method_url))


def _describe_url(url: str) -> str:
    return urlsplit(url).path


def _describe(request: httpx.Request) -> str:
    # Method and path only: queries may be long, bodies may hold tokens.
    return f"{request.method} {request.url.path}"


def _query(params: Params | None) -> httpx.QueryParams | None:
    if params is None:
        return None
    items = params.items() if isinstance(params, Mapping) else params
    return httpx.QueryParams([(str(k), str(v)) for k, v in items])


def _version_key(entry: HistoryEntry) -> tuple[float, str]:
    try:
        number = -1.0 if entry.version_id is None else float(str(entry.version_id))
    except ValueError:
        number = -1.0
    return number, entry.last_updated or ""


def hapi_lookup(base_url: str) -> Callable[[], FhirClient]:
    """The receiver's way to ask HAPI (`receiver.app.create_app(hapi=...)`): a client that
    retries once, so a delivery waiting for a deletion's version never waits long."""
    return partial(FhirClient, base_url, max_retries=1)
