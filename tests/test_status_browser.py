"""The status page in a real headless Chromium, served by uvicorn, with Basic auth in the URL.

Chromium is a Debian package (`chromium`) that the check command's setup installs; when it
is missing this test fails (never skips), naming the package to install.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from core.serve import serve_asgi
from core.settings import Settings
from core.store import SpeedStore
from tests.test_status import (
    STATUS_REDIS_URL,
    Page,
    check_page,
    fill,
    isolated_redis,
    status_app,
)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
BROWSER_TIMEOUT = 25.0


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "headless Chromium is not installed: run "
            "`apt-get install -y chromium` (scripts/setup.sh does it)",
            pytrace=False,
        )
    return found


async def run_browser(*args: str) -> bytes:
    """Run Chromium once with its own profile; its stdout (the DOM for --dump-dom)."""
    with tempfile.TemporaryDirectory(prefix="rf-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"HOME": profile, "PATH": "/usr/bin:/bin"},
        )
        try:
            async with asyncio.timeout(BROWSER_TIMEOUT):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"Chromium did not finish within {BROWSER_TIMEOUT} s") from None
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


@pytest.fixture
async def status_store() -> AsyncIterator[SpeedStore]:
    async with isolated_redis() as client:
        yield SpeedStore(client)


@pytest.fixture
def status_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, redis_url=STATUS_REDIS_URL)


@pytest.fixture
async def served(status_settings: Settings) -> AsyncIterator[str]:
    """The status page on uvicorn at a free loopback port; yields host:port."""
    async with serve_asgi(status_app(status_settings), lifespan="on") as url:
        yield url.removeprefix("http://")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


async def test_status_page_in_chromium(
    status_store: SpeedStore, status_settings: Settings, served: str, tmp_path: Path
) -> None:
    store, settings = status_store, status_settings
    await fill(store, settings.database_url, poller_lag=timedelta(seconds=90))
    hourly = await store.hourly_changes(24)
    token = settings.serving_tokens[0]
    url = f"http://operator:{token}@{served}/status"
    shot = tmp_path / "status.png"

    dom, anonymous, _ = await asyncio.gather(
        run_browser("--dump-dom", url),
        run_browser("--dump-dom", f"http://{served}/status"),
        run_browser(f"--screenshot={shot}", "--window-size=1200,900", url),
    )

    # Chromium answered the 401 challenge with the URL's credentials and rendered the page.
    page = Page(dom.decode())
    check_page(page, hourly)
    assert page.text("poller-watermark").startswith("20")
    titles = dom.decode().count("<title>")
    assert titles >= 25  # the document's and one per bar
    assert "<script" not in dom.decode()
    # Without credentials headless Chromium cannot answer the challenge: no page.
    assert b"hourly-chart" not in anonymous
    assert b"batch-watermark" not in anonymous

    data = shot.read_bytes()
    assert png_size(data) == (1200, 900)
    assert len(data) > 20_000, f"a {len(data)}-byte screenshot is too plain to be the page"
