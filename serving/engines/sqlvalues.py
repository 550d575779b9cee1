"""What PostgreSQL does to JSON values, done in Python for the Python engine.

The PostgreSQL engine works on jsonb, numeric and text; `serving.engines.python` works on the
parsed JSON (dict, list, str, int, Decimal, bool). These are the points where the two could
differ, written once here the way PostgreSQL does them: jsonb equality and ordering of
object keys, the text of a value (`#>> '{}'`), numeric division's scale, the casts of a
typed column. `tests/test_exact_views.py` checks them against PostgreSQL.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from core.errors import InvalidViewDefinition
from core.fhir_values import EXACT, decimal_text

__all__ = [
    "ViewEvaluationError",
    "canonical",
    "cast",
    "distinct",
    "is_number",
    "json_equal",
    "json_type_matches",
    "jsonb_key",
    "jsonb_text",
    "pg_divide",
    "pg_integer",
    "pg_numeric",
    "round_half_away",
    "scale",
    "text_of",
]


class ViewEvaluationError(InvalidViewDefinition):
    """The view cannot be evaluated on a resource (a non-collection column got several
    values, a where clause was not boolean, or a value had the wrong type for an operation)."""


def is_number(value: Any) -> bool:
    return isinstance(value, int | Decimal) and not isinstance(value, bool)


def jsonb_key(key: str) -> tuple[int, bytes]:
    raw = key.encode()
    return len(raw), raw  # jsonb keeps object keys shortest first, then bytewise


def _json_string(text: str) -> str:
    out = ['"']
    for char in text:
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\b":
            out.append("\\b")
        elif char == "\f":
            out.append("\\f")
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif char < " ":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def jsonb_text(value: Any) -> str:
    """A JSON value as PostgreSQL prints jsonb (what `#>> '{}'` gives for an object)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(jsonb_text(v) for v in value) + "]"
    items = sorted(value.items(), key=lambda kv: jsonb_key(kv[0]))
    return "{" + ", ".join(f"{_json_string(k)}: {jsonb_text(v)}" for k, v in items) + "}"


def text_of(value: Any) -> str | None:
    """A JSON value as SQL text (`jsonb #>> '{}'`): strings as they are, numbers as written
    by PostgreSQL, booleans true/false, objects as jsonb prints them."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return jsonb_text(value)


def json_equal(a: Any, b: Any) -> bool:
    """jsonb equality: numbers by value, booleans only with booleans, objects deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if is_number(a) and is_number(b):
        return bool(a == b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is not type(b) and not (is_number(a) and is_number(b)):
        return False
    return bool(a == b)


def canonical(value: Any) -> Any:
    """A hashable form where jsonb-equal values are equal (1 and 1.0 alike, true not 1)."""
    if isinstance(value, bool):
        return ("b", value)
    if is_number(value):
        number = Decimal(value)
        return ("n", number.normalize() if not number.is_zero() else Decimal(0))
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, list):
        return ("l", tuple(canonical(v) for v in value))
    if isinstance(value, dict):
        return ("o", tuple(sorted((k, canonical(v)) for k, v in value.items())))
    return ("z", repr(value))


def distinct(items: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    out = []
    for item in items:
        key = canonical(item)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def json_type_matches(value: Any, wanted: str, type_name: str) -> bool:
    if wanted == "boolean":
        return isinstance(value, bool)
    if wanted == "number":
        return is_number(value)
    if wanted == "string":
        return isinstance(value, str)
    return isinstance(value, dict) and value.get("resourceType") == type_name


def scale(value: Decimal | int) -> int:
    if isinstance(value, int):
        return 0
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def round_half_away(value: Decimal, places: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP, context=EXACT)


def _nbase_weight(value: Decimal) -> tuple[int, int]:
    """(weight, first digit) of a nonzero number in PostgreSQL's base-10000 digits."""
    value = abs(value)
    weight = value.adjusted() // 4
    return weight, int(value.scaleb(-4 * weight, context=EXACT)) % 10000


def pg_numeric(value: Decimal | int) -> Decimal:
    """A number as PostgreSQL's numeric holds it: its scale never below 0 (1E+2 is 100 and
    0E+3 is 0), so arithmetic on it gives PostgreSQL's scale (100 * 1.50 is 150.00)."""
    number = Decimal(value)
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    return number.quantize(Decimal(1), context=EXACT) if exponent > 0 else number


def pg_divide(a: Decimal | int, b: Decimal | int) -> Decimal:
    """a / b as PostgreSQL's numeric division gives it (numeric.c, select_div_scale: at least
    16 significant digits, at least both inputs' scales, rounded half away from zero)."""
    da, db = Decimal(a), Decimal(b)
    # A zero dividend has weight 0 and first digit 0 there (so 0 / 3 has 20 places, not 16).
    w1, f1 = _nbase_weight(da) if not da.is_zero() else (0, 0)
    w2, f2 = _nbase_weight(db)
    qweight = w1 - w2 - (1 if f1 <= f2 else 0)
    rscale = max(16 - qweight * 4, scale(da), scale(db), 0)
    rscale = min(rscale, 1000)
    # Exact integer arithmetic: quotient * 10^rscale, rounded half away from zero.
    sa, ia = _as_integer(da)
    sb, ib = _as_integer(db)
    shift = rscale + sb - sa
    numerator, denominator = ia, ib
    if shift >= 0:
        numerator *= 10**shift
    else:
        denominator *= 10 ** (-shift)
    negative = (numerator < 0) != (denominator < 0)
    q, r = divmod(abs(numerator), abs(denominator))
    if 2 * r >= abs(denominator):
        q += 1
    return Decimal(-q if negative else q).scaleb(-rscale, context=EXACT)


def _as_integer(value: Decimal) -> tuple[int, int]:
    """(scale, integer) with value = integer / 10^scale."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    number = int("".join(map(str, digits)) or "0")
    if sign:
        number = -number
    if exponent >= 0:
        return 0, number * 10**exponent
    return -exponent, number


def pg_integer(value: Decimal | int, bits: int, what: str) -> int:
    number = int(round_half_away(Decimal(value), 0))
    if not -(2 ** (bits - 1)) <= number < 2 ** (bits - 1):
        raise ViewEvaluationError(f"{what}: {number} is out of range for a {bits}-bit integer")
    return number


_BIGINT_RE = re.compile(r"\s*[+-]?[0-9]+\s*")


def cast(value: Any, target: str, column: str) -> Any:
    """A column's value cast to its SQL type as PostgreSQL casts jsonb/text (errors alike)."""
    if value is None or target == "jsonb":
        return value
    if target == "text":
        return text_of(value)
    what = f"column {column!r}"
    if target == "boolean":
        if isinstance(value, bool):
            return value
        raise ViewEvaluationError(f"{what} is boolean but got {jsonb_text(value)[:60]}")
    if target == "bigint":
        text = text_of(value) or ""
        if not _BIGINT_RE.fullmatch(text):
            raise ViewEvaluationError(f"{what}: {text[:60]!r} is not an integer")
        return pg_integer(int(text), 64, what)
    if not is_number(value):
        raise ViewEvaluationError(f"{what} is {target} but got {jsonb_text(value)[:60]}")
    if target == "integer":
        return pg_integer(value, 32, what)
    return Decimal(value)  # numeric
