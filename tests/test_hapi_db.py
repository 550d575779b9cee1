"""Reading changes from HAPI's own tables, created here with HAPI's PostgreSQL names and types."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest

from core.fhir_values import format_instant as instant
from core.settings import Settings
from core.store import SpeedStore
from subscriptions.hapi_db import DbChange, changes_since, connect, decode_text
from subscriptions.poller import poll_once

# The columns the poller reads, as HAPI's Hibernate creates them on PostgreSQL.
HAPI_DDL = """
CREATE TABLE hfj_resource (
    res_id int8 NOT NULL PRIMARY KEY,
    partition_id int4,
    partition_date date,
    res_deleted_at timestamp(6),
    res_version varchar(7),
    res_published timestamp(6) NOT NULL,
    res_updated timestamp(6) NOT NULL,
    fhir_id varchar(64),
    res_type varchar(40) NOT NULL,
    res_ver int8 NOT NULL
);
CREATE INDEX idx_res_type_upd ON hfj_resource (res_type, res_updated);
CREATE TABLE hfj_res_ver (
    pid int8 NOT NULL PRIMARY KEY,
    partition_id int4,
    res_deleted_at timestamp(6),
    res_published timestamp(6) NOT NULL,
    res_updated timestamp(6) NOT NULL,
    res_encoding varchar(5) NOT NULL,
    res_text {text_type},
    res_text_vc text,
    res_id int8 NOT NULL,
    res_type varchar(40) NOT NULL,
    res_ver int8 NOT NULL
);
"""

T0 = datetime(2026, 11, 25, 10, 0, 0)


class Hapi:
    """Writes rows the way HAPI does: one HFJ_RESOURCE row, one HFJ_RES_VER row per version."""

    def __init__(self, conn: psycopg.Connection[Any], lob: bool) -> None:
        self.conn = conn
        self.lob = lob
        self.pids: dict[tuple[str, str], int] = {}
        self.next_pid = 1000

    def put(
        self,
        resource_type: str,
        resource_id: str,
        version: int,
        updated: datetime,
        *,
        body: dict[str, Any] | None = None,
        encoding: str = "JSON",
    ) -> None:
        key = (resource_type, resource_id)
        if key not in self.pids:
            self.next_pid += 1
            self.pids[key] = self.next_pid
            self.conn.execute(
                "INSERT INTO hfj_resource (res_id, res_type, fhir_id, res_ver, res_published,"
                " res_updated) VALUES (%s, %s, %s, %s, %s, %s)",
                (self.pids[key], resource_type, resource_id, version, updated, updated),
            )
        pid = self.pids[key]
        deleted_at = updated if encoding == "DEL" else None
        self.conn.execute(
            "UPDATE hfj_resource SET res_ver = %s, res_updated = %s, res_deleted_at = %s"
            " WHERE res_id = %s",
            (version, updated, deleted_at, pid),
        )
        text_vc: str | None = None
        blob: bytes | None = None
        if body is not None:
            # HAPI's stored text has no meta.versionId/lastUpdated.
            raw = orjson.dumps(body)
            if encoding == "JSONC":
                blob = gzip.compress(raw)
            elif self.lob:
                blob = raw
            else:
                text_vc = raw.decode()
        blob_sql = "lo_from_bytea(0, %s)" if self.lob and blob is not None else "%s"
        self.conn.execute(
            "INSERT INTO hfj_res_ver (pid, res_id, res_type, res_ver, res_published, res_updated,"
            f" res_deleted_at, res_encoding, res_text_vc, res_text) VALUES (%s, %s, %s, %s, %s,"
            f" %s, %s, %s, %s, {blob_sql})",
            (
                pid * 100 + version,
                pid,
                resource_type,
                version,
                updated,
                updated,
                deleted_at,
                encoding,
                text_vc,
                blob,
            ),
        )


@pytest.fixture(params=["bytea", "oid"])
def hapi(pg_url: str, request: pytest.FixtureRequest) -> Any:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(HAPI_DDL.replace("{text_type}", request.param).encode())
        yield Hapi(conn, lob=request.param == "oid")


def patient(pid: str, family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": "female", "name": [{"family": family}]}


async def read_all(
    url: str, since: datetime | None, page_size: int = 1000, types: list[str] | None = None
) -> list[list[DbChange]]:
    conn = await connect(url)
    try:
        return [page async for page in changes_since(conn, since, types=types, page_size=page_size)]
    finally:
        await conn.close()


async def test_json_jsonc_and_deleted_rows(hapi: Hapi, pg_url: str) -> None:
    hapi.put("Patient", "a", 1, T0, body=patient("a", "One"))
    hapi.put("Patient", "a", 2, T0 + timedelta(seconds=1), body=patient("a", "Two"))
    hapi.put(
        "Patient", "b", 1, T0 + timedelta(seconds=2), body=patient("b", "Zip"), encoding="JSONC"
    )
    hapi.put("Patient", "c", 1, T0 + timedelta(seconds=3), body=patient("c", "Gone"))
    hapi.put("Patient", "c", 2, T0 + timedelta(seconds=4), encoding="DEL")

    pages = await read_all(pg_url, None)
    changes = [c for page in pages for c in page]
    assert [(c.resource_id, c.version_id, c.deleted) for c in changes] == [
        ("a", "2", False),
        ("b", "1", False),
        ("c", "2", True),
    ]
    a, b, c = changes
    assert a.resource is not None and a.resource["name"] == [{"family": "Two"}]
    assert a.resource["meta"] == {"versionId": "2", "lastUpdated": "2026-11-25T10:00:01.000+00:00"}
    assert b.resource is not None and b.resource["name"] == [{"family": "Zip"}]
    assert b.resource["meta"]["versionId"] == "1"
    assert c.resource is None and c.last_updated == "2026-11-25T10:00:04.000+00:00"


async def test_keyset_paging_with_equal_timestamps(hapi: Hapi, pg_url: str) -> None:
    # Many rows share a timestamp: a page boundary must neither skip nor repeat one.
    for n in range(25):
        hapi.put("Patient", f"p{n}", 1, T0 + timedelta(seconds=n // 10), body=patient(f"p{n}", "X"))
    pages = await read_all(pg_url, None, page_size=7)
    assert [len(p) for p in pages] == [7, 7, 7, 4]
    ids = [c.resource_id for p in pages for c in p]
    assert sorted(ids) == sorted(f"p{n}" for n in range(25))
    assert len(set(ids)) == 25


async def test_since_and_type_filters(hapi: Hapi, pg_url: str) -> None:
    hapi.put("Patient", "old", 1, T0, body=patient("old", "Old"))
    hapi.put("Patient", "new", 1, T0 + timedelta(minutes=5), body=patient("new", "New"))
    condition = {
        "resourceType": "Condition",
        "id": "cond",
        "subject": {"reference": "Patient/new"},
        "code": {"text": "x"},
    }
    hapi.put("Condition", "cond", 1, T0 + timedelta(minutes=6), body=condition)
    since = (T0 + timedelta(minutes=1)).replace(tzinfo=UTC)
    changes = [c for p in await read_all(pg_url, since) for c in p]
    assert [c.resource_id for c in changes] == ["new", "cond"]
    only = [c for p in await read_all(pg_url, since, types=["Condition"]) for c in p]
    assert [c.resource_id for c in only] == ["cond"]
    # A timestamp exactly at `since` is not after it.
    exact = T0.replace(tzinfo=UTC) + timedelta(minutes=6)
    assert await read_all(pg_url, exact) == []


def test_decode_text_and_instant() -> None:
    raw = b'{"resourceType":"Patient","id":"x"}'
    assert decode_text("JSONC", None, gzip.compress(raw))["id"] == "x"
    assert decode_text("JSON", None, raw)["id"] == "x"
    assert decode_text("JSON", raw.decode(), None)["id"] == "x"
    with pytest.raises(ValueError):
        decode_text("JSON", None, None)
    assert instant(datetime(2026, 1, 2, 3, 4, 5, 678900)) == "2026-01-02T03:04:05.678Z"


async def test_poll_once_from_hapi_database(hapi: Hapi, pg_url: str, store: SpeedStore) -> None:
    await store.mark_epoch()
    hapi.put("Patient", "a", 1, T0, body=patient("a", "One"))
    hapi.put("Patient", "a", 2, T0 + timedelta(seconds=1), body=patient("a", "Two"))
    hapi.put("Patient", "z", 1, T0 + timedelta(seconds=2), body=patient("z", "Z"), encoding="JSONC")
    hapi.put("Patient", "c", 1, T0 + timedelta(seconds=3), body=patient("c", "Gone"))
    hapi.put("Patient", "c", 2, T0 + timedelta(seconds=4), encoding="DEL")
    bad = patient("bad", "Bad")
    bad["gender"] = "robot"
    hapi.put("Patient", "bad", 1, T0 + timedelta(seconds=5), body=bad)
    settings = Settings(hapi_database_url=pg_url, poll_overlap_seconds=60)

    result = await poll_once(settings, store, None)

    assert (result.read, result.written, result.deletes, result.rejected) == (4, 3, 1, 1)
    assert result.missed == 3
    a = await store.get("Patient", "a")
    assert a is not None and a.version_id == "2" and a.body is not None
    assert orjson.loads(a.body)["meta"]["lastUpdated"] == "2026-11-25T10:00:01.000+00:00"
    z = await store.get("Patient", "z")
    assert z is not None and z.state == "present"
    c = await store.get("Patient", "c")
    assert c is not None and c.state == "deleted" and c.version_id == "2"
    # The watermark is the newest RES_UPDATED read minus the overlap.
    assert result.watermark == "2026-11-25T09:59:05.000Z"
    again = await poll_once(settings, store, None)
    assert again.since == result.watermark and again.read == 4 and again.written == 0
    assert await store.reject_count() == 1
    hapi.put("Patient", "a", 3, T0 + timedelta(seconds=9), body=patient("a", "Three"))
    third = await poll_once(settings, store, None)
    assert third.written == third.missed == 1
    assert third.watermark == "2026-11-25T09:59:09.000Z"


def test_table_mode_is_said_once_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """HAPI_DATABASE_URL is hapi.sh's variable too: whoever exported it for `hapi.sh start`
    learns from the log that ResearchFlow now reads HAPI's tables."""
    import logging

    from subscriptions import changes

    monkeypatch.setattr(changes, "_said_table_mode", [])
    settings = Settings(hapi_database_url="postgresql://127.0.0.1:5432/hapi")
    with caplog.at_level(logging.INFO, logger="subscriptions.changes"):
        for _ in range(3):
            assert isinstance(changes.reader_for(settings, None), changes.DatabaseChanges)
    said = [r for r in caplog.records if "HAPI_DATABASE_URL" in r.getMessage()]
    assert len(said) == 1 and "not its REST API" in said[0].getMessage()
