"""The exact JSON codec: a body's decimals leave as they came; view rows write PostgreSQL's form.

The reference is the text itself (a decimal is written byte for byte as it was read) and, for
the plain form, PostgreSQL's own numeric output, asked of a real server.
"""

from __future__ import annotations

import calendar
import copy
import datetime
import json
import re
from decimal import Decimal

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.fhir_values import JsonDecimal, dumps, loads, parse_instant

# JSON's number grammar (RFC 8259 section 6) for numbers with a fraction or an exponent.
_FRACTION_OR_EXPONENT = st.from_regex(
    r"\A-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,3})?\Z"
).filter(lambda text: bool(re.search(r"[.eE]", text)))


@settings(max_examples=300, deadline=None)
@given(st.lists(_FRACTION_OR_EXPONENT, min_size=1, max_size=5))
def test_a_body_is_written_with_each_decimal_as_it_was_read(numbers: list[str]) -> None:
    body = '{"resourceType":"Observation","valueQuantity":{"value":' + numbers[0] + "}"
    body += ',"component":[' + ",".join('{"v":' + n + "}" for n in numbers) + "]}"
    assert dumps(loads(body)).decode() == body
    # The numbers themselves are exact: equal to Decimal read from the text.
    read = loads(body)
    assert read["valueQuantity"]["value"] == Decimal(numbers[0])
    assert isinstance(read["valueQuantity"]["value"], JsonDecimal)


def test_a_copied_body_keeps_its_decimals_text() -> None:
    read = loads(b'{"a":-1.000000000000000000E+245,"b":[1.50,0.0,-0.0]}')
    assert dumps(copy.deepcopy(read)) == dumps(read)
    assert dumps(read) == b'{"a":-1.000000000000000000E+245,"b":[1.50,0.0,-0.0]}'


def test_arithmetic_gives_plain_decimals_written_in_plain_notation() -> None:
    read = loads(b"[1.0E+2]")
    total = read[0] + 1
    assert type(total) is Decimal
    assert dumps([total]) == b"[101]"


def _postgres_numeric(pg_url: str, text: str) -> str:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT (%s::text::jsonb)::text", (text,)).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize(
    "text",
    ["1.0E+2", "-1.000000000000000000E+245", "6.50000000000000001", "1e-22", "0.0", "7.0"],
)
def test_rows_write_decimals_as_postgresql_prints_them(pg_url: str, text: str) -> None:
    value = loads(text)
    assert dumps(value, plain_decimals=True).decode() == _postgres_numeric(pg_url, text)
    # The body form stays the sent text; JSON readers see the same number either way.
    assert dumps(value).decode() == text
    assert json.loads(dumps(value, plain_decimals=True), parse_float=Decimal) == Decimal(text)


# -- instants -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    moment=st.datetimes(
        min_value=datetime.datetime(1900, 1, 1), max_value=datetime.datetime(2200, 12, 31)
    ),
    fraction=st.text("0123456789", min_size=0, max_size=9),
    offset_minutes=st.integers(-14 * 60, 14 * 60),
    zulu=st.booleans(),
)
def test_parse_instant_keeps_the_offset_with_any_fraction(
    moment: datetime.datetime, fraction: str, offset_minutes: int, zulu: bool
) -> None:
    """Epoch ms of a FHIR instant, computed here by calendar.timegm from its parts (not by
    datetime's ISO parser): the offset counts whatever the fraction's length (a fraction's
    digits beyond microseconds are dropped, as fromisoformat's precision allows)."""
    if zulu:
        offset_minutes = 0
        zone = "Z"
    else:
        sign = "-" if offset_minutes < 0 else "+"
        zone = f"{sign}{abs(offset_minutes) // 60:02d}:{abs(offset_minutes) % 60:02d}"
    text = moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + zone
    whole = calendar.timegm(moment.replace(microsecond=0).timetuple()) - offset_minutes * 60
    micros = int(fraction[:6].ljust(6, "0")) if fraction else 0
    assert parse_instant(text) == pytest.approx(whole * 1000 + micros / 1000, abs=1e-3)
