"""`batch refresh` in HAPI_DATABASE_URL mode: the batch layer synced from HAPI's own tables."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from core.settings import Settings
from serving import batch
from serving.batch_refresh import refresh
from tests.conftest import fresh_database
from tests.test_hapi_db import HAPI_DDL, Hapi


@pytest.fixture
def hapi_url() -> Iterator[str]:
    """HAPI's database: a second fresh database with HAPI's tables."""
    with fresh_database("rf_hapi") as url:
        yield url


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


async def test_refresh_from_hapis_tables(pg_url: str, hapi_url: str) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    with psycopg.connect(hapi_url, autocommit=True) as conn:
        conn.execute(HAPI_DDL.replace("{text_type}", "bytea").encode())
        hapi = Hapi(conn, lob=False)
        for n in range(5):
            body = {
                "resourceType": "Patient",
                "id": f"p{n}",
                "gender": "male" if n % 2 else "female",
            }
            hapi.put("Patient", f"p{n}", 1, start + timedelta(seconds=n), body=body)
        hapi.put(
            "Patient",
            "p1",
            2,
            start + timedelta(seconds=10),
            body={"resourceType": "Patient", "id": "p1", "gender": "other"},
            encoding="JSONC",
        )
        hapi.put("Patient", "p4", 2, start + timedelta(seconds=11), encoding="DEL")
        condition = {
            "resourceType": "Condition",
            "id": "c1",
            "subject": {"reference": "Patient/p0"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        }
        hapi.put("Condition", "c1", 1, start + timedelta(seconds=12), body=condition)

        settings = Settings(
            database_url=pg_url, hapi_database_url=hapi_url, fhir_base_url="http://127.0.0.1:1/fhir"
        )
        batch.init(pg_url)
        first = await refresh(settings)
        assert first.views["patient_demographics"] == 4
        assert rows(
            pg_url, "SELECT id, gender FROM sqlonfhir.patient_demographics ORDER BY id"
        ) == [
            ("p0", "female"),
            ("p1", "other"),
            ("p2", "female"),
            ("p3", "male"),
        ]
        assert rows(
            pg_url, "SELECT version_id, deleted FROM rf_batch.resources WHERE id = 'p4'"
        ) == [("2", True)]
        assert rows(pg_url, "SELECT patient_id, code FROM sqlonfhir.condition_simple") == [
            ("p0", "44054006")
        ]
        assert first.watermark is not None  # HAPI's clock: the newest RES_UPDATED read

        # Incremental: from the watermark (minus the overlap margin, so rows re-read within it
        # are no-ops); only the new version changes anything.
        hapi.put(
            "Patient",
            "p2",
            2,
            start + timedelta(seconds=20),
            body={"resourceType": "Patient", "id": "p2", "gender": "unknown"},
        )
        second = await refresh(settings)
        assert second.changed == 1 and second.since == first.watermark
        assert ("p2", "unknown") in rows(
            pg_url, "SELECT id, gender FROM sqlonfhir.patient_demographics"
        )
        # A full refresh reads every current row and changes nothing more.
        full = await refresh(settings, full=True)
        assert full.changed == 0 and full.marked_deleted == 0
