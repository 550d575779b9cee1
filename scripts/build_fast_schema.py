"""Write core/schemas/fhir.r4.fast.json.gz, the gate's compiled fast test's schema.

Run after changing `core.r4schema.build_fast_schema`, the R4 schema or the fhir.resources
version: `.venv/bin/python scripts/build_fast_schema.py`. tests/test_fast_gate.py fails while
the file is not what the function gives.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.r4schema import FAST_SCHEMA, build_fast_schema  # noqa: E402


def main() -> None:
    path = ROOT / "core" / "schemas" / FAST_SCHEMA
    data = orjson.dumps(build_fast_schema(), option=orjson.OPT_SORT_KEYS)
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    print(f"wrote {path.relative_to(ROOT)} ({len(data):,} bytes of JSON)")


if __name__ == "__main__":
    main()
