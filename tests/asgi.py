"""Drive a Starlette app in-process with its lifespan running (httpx.ASGITransport skips it)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette


@contextlib.asynccontextmanager
async def running(app: Starlette, **client_kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client bound to `app`, with the app's lifespan entered around it."""
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state or {})
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://receiver.test", **client_kwargs
        ) as client:
            yield client
