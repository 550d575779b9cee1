"""The stand-in's FHIR REST face: routes that parse a request, call the stand-in, answer.

Errors the stand-in raises (`StandInError`) become HAPI's OperationOutcome with their status;
every answer carries HAPI's clock in `Date`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import FhirFatalError
from core.fhir_values import JsonError, dumps, loads

if TYPE_CHECKING:
    from subscriptions.standin.hapi import StandInHapi, VersionRecord

FHIR_JSON = "application/fhir+json;charset=utf-8"


class StandInError(FhirFatalError):
    """What the stand-in answers with an OperationOutcome (status_code is the HTTP status)."""

    def __init__(self, status_code: int, message: str, code: str = "processing") -> None:
        super().__init__(message, status_code)
        self.code = code

    def outcome(self) -> dict[str, Any]:
        return {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": self.code, "diagnostics": self.message}],
        }


_ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_Handler = Callable[[Request], Awaitable[Response]]


class _Http:
    """The FHIR REST routes: parse, call the stand-in, build the response."""

    def __init__(self, hapi: StandInHapi) -> None:
        self.hapi = hapi

    def routes(self) -> list[Route]:
        def route(
            path: str, endpoint: Callable[[Request], Awaitable[Response]], *methods: str
        ) -> Route:
            return Route(path, self._wrap(endpoint), methods=list(methods))

        return [
            route("/fhir/metadata", self.metadata, "GET"),
            route("/fhir/_history", self.history, "GET"),
            route("/fhir", self.pages, "GET"),
            route("/fhir/{type}/_history", self.history, "GET"),
            route("/fhir/{type}/{id}/_history/{vid}", self.vread, "GET"),
            route("/fhir/{type}/{id}/_history", self.history, "GET"),
            route("/fhir/{type}/{id}/{operation}", self.operation, "POST"),
            route("/fhir/{type}/{id}", self.read, "GET"),
            route("/fhir/{type}/{id}", self.update, "PUT"),
            route("/fhir/{type}/{id}", self.delete, "DELETE"),
            route("/fhir/{type}", self.search, "GET"),
            route("/fhir/{type}", self.create, "POST"),
            route("/{path:path}", self.unknown, *_ALL_METHODS),
        ]

    def _wrap(
        self, endpoint: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            try:
                response = await endpoint(request)
            except StandInError as exc:
                response = self._json(exc.outcome(), exc.status_code or 500)
            response.headers["Date"] = _http_date(int((time.time() + self.hapi.clock_skew) * 1000))
            return response

        return handle

    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return Response(dumps(data), status, headers=headers, media_type=FHIR_JSON)

    @staticmethod
    def _base(request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}/fhir"

    def _resource_response(self, request: Request, record: VersionRecord, status: int) -> Response:
        base = self._base(request)
        location = f"{base}/{record.resource_type}/{record.resource_id}/_history/{record.version}"
        headers = {
            "ETag": f'W/"{record.version}"',
            "Last-Modified": _http_date(record.last_updated_ms),
            "Content-Location": location,
        }
        if status == 201:
            headers["Location"] = location
        return self._json(record.resource, status, headers)

    @staticmethod
    async def _body(request: Request) -> Any:
        try:
            return loads(await request.body())
        except JsonError as exc:
            raise StandInError(
                400, f"Failed to parse request body as JSON resource: {exc}"
            ) from exc

    async def unknown(self, request: Request) -> Response:
        raise StandInError(
            400,
            "Invalid request: The FHIR endpoint on this server does not know how to handle "
            f"{request.method} operation[{request.url.path.removeprefix('/fhir/')}]",
            "not-supported",
        )

    async def metadata(self, request: Request) -> Response:
        return self._json(
            {
                "resourceType": "CapabilityStatement",
                "status": "active",
                "date": self.hapi.now(),
                "kind": "instance",
                "software": {"name": "HAPI FHIR Server (ResearchFlow stand-in)", "version": "8.x"},
                "fhirVersion": "4.0.1",
                "format": ["application/fhir+json"],
            }
        )

    async def read(self, request: Request) -> Response:
        p = request.path_params
        return self._resource_response(request, self.hapi._read(p["type"], p["id"]), 200)

    async def vread(self, request: Request) -> Response:
        p = request.path_params
        return self._resource_response(request, self.hapi._read(p["type"], p["id"], p["vid"]), 200)

    async def create(self, request: Request) -> Response:
        record = await self.hapi._create(await self._body(request), request.path_params["type"])
        return self._resource_response(request, record, 201)

    async def update(self, request: Request) -> Response:
        p = request.path_params
        record, created = await self.hapi._update(
            await self._body(request), p["type"], p["id"], request.headers.get("if-match")
        )
        return self._resource_response(request, record, 201 if created else 200)

    async def delete(self, request: Request) -> Response:
        p = request.path_params
        record = await self.hapi._delete(p["type"], p["id"])
        if record is None:
            message = f"Resource {p['type']}/{p['id']} was already deleted; nothing to do"
        else:
            message = (
                f"Successfully deleted 1 resource(s). "
                f"{p['type']}/{p['id']}/_history/{record.version}"
            )
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": message}],
        }
        headers = {"ETag": f'W/"{record.version}"'} if record is not None else None
        return self._json(outcome, 200, headers)

    async def search(self, request: Request) -> Response:
        query = list(request.query_params.multi_items())
        no_cache = "no-cache" in request.headers.get("cache-control", "").lower()
        token, _ = self.hapi.search(request.path_params["type"], query, no_cache=no_cache)
        count = self.hapi._page_size(dict(query))
        if dict(query).get("_summary") == "count":
            bundle = self.hapi._bundle(token, 0, 0, self._base(request), str(request.url))
            bundle.pop("entry", None)
            return self._json(bundle)
        return self._json(self.hapi._bundle(token, 0, count, self._base(request), str(request.url)))

    async def history(self, request: Request) -> Response:
        params = dict(request.query_params)
        p = request.path_params
        offset = params.get("_offset", "0")
        if not offset.isdigit():
            raise StandInError(400, f"Invalid _offset value: {offset[:40]}")
        token = self.hapi.history(p.get("type"), p.get("id"), params.get("_since"))
        count = self.hapi._page_size(params)
        bundle = self.hapi._bundle(token, int(offset), count, self._base(request), str(request.url))
        total = len(self.hapi._pages.pop(token).items)
        # HAPI 8.8 pages `_history` by `_offset` on the same URL, running it again for each
        # page (no snapshot): a change made meanwhile shifts later pages, so an entry can come
        # twice (newest first), never not at all.
        links = [link for link in bundle["link"] if link["relation"] == "self"]
        if count > 0 and int(offset) + count < total:
            query = [(k, v) for k, v in request.query_params.multi_items() if k != "_offset"]
            query.append(("_offset", str(int(offset) + count)))
            links.append(
                {
                    "relation": "next",
                    "url": str(request.url.replace(query=urlencode(query))),
                }
            )
        bundle["link"] = links
        return self._json(bundle)

    async def pages(self, request: Request) -> Response:
        params = dict(request.query_params)
        token = params.get("_getpages")
        if not token:
            raise StandInError(400, "This server does not accept searches at the base URL")
        offset = params.get("_getpagesoffset", "0")
        if not offset.isdigit():
            raise StandInError(400, f"Invalid _getpagesoffset: {offset[:40]}")
        count = self.hapi._page_size(params)
        return self._json(
            self.hapi._bundle(token, int(offset), count, self._base(request), str(request.url))
        )

    async def operation(self, request: Request) -> Response:
        p = request.path_params
        if p["type"] != "Subscription" or p["operation"] != "$trigger-subscription":
            raise StandInError(400, f"Unknown operation {p['operation'][:80]}", "not-supported")
        body = await self._body(request)
        resource_ids: list[str] = []
        search_urls: list[str] = []
        for param in (body or {}).get("parameter") or []:
            kind, value = next(
                ((k, v) for k, v in param.items() if k.startswith("value")), ("", None)
            )
            if param.get("name") == "resourceId" and kind != "valueUri":
                # HAPI 8.8's operation declares resourceId a uri (docs/hapi.md).
                found = kind.removeprefix("value") + "Type"
                raise StandInError(
                    400,
                    f"HAPI-0362: Request has parameter resourceId of type {found} but method "
                    "expects type UriType",
                )
            if param.get("name") == "resourceId" and isinstance(value, str):
                resource_ids.append(value)
            elif param.get("name") == "searchUrl" and isinstance(value, str):
                search_urls.append(value)
        if not resource_ids and not search_urls:
            raise StandInError(400, "No resourceId or searchUrl parameters were provided")
        sent = await self.hapi.trigger(p["id"], resource_ids, search_urls)
        job = uuid.uuid4()
        return self._json(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {
                        "name": "information",
                        "valueString": f"Subscription triggering job submitted as JOB ID: {job}"
                        f" ({sent} resource(s) queued)",
                    }
                ],
            }
        )


def build_app(hapi: StandInHapi) -> Starlette:
    """The stand-in's ASGI app (its `app`)."""
    return Starlette(routes=_Http(hapi).routes())


def _http_date(ms: int) -> str:
    return formatdate(ms / 1000, usegmt=True)
