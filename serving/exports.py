"""CSV exports of view rows that a spreadsheet opens as data, never as formulas."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from core.fhir_values import decimal_text, dumps

CSV_MEDIA_TYPE = "text/csv; charset=utf-8"
# OWASP "CSV Injection": a spreadsheet reads a cell starting with one of these as a formula
# (tab and carriage return too, which some strip before looking).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any, *, raw: bool = False) -> str:
    """One cell's text: null is empty, booleans `true`/`false`, numbers as they are (a number
    is never a formula, even -5), lists and objects as JSON, and text starting like a formula
    behind a `'` (OWASP's rule) unless `raw`."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return "'" + value if not raw and value.startswith(FORMULA_STARTS) else value
    # The exact codec: decimals as PostgreSQL's numeric prints them (both layers alike),
    # integers past 64 bits as they are.
    return dumps(value, plain_decimals=True).decode()


def csv_text(
    columns: Sequence[str], rows: Iterable[Mapping[str, Any]], *, raw: bool = False
) -> str:
    """The rows as CSV (RFC 4180, by Python's csv module) with a header line of `columns`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(c), raw=raw) for c in columns])
    return buffer.getvalue()
