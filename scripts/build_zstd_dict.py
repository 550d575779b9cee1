"""Rebuild core/fhir-r4.zstd-dict, the zstd dictionary of the speed layer's record codec.

Trained (zstandard.train_dictionary, 16 KiB, level 3) on every JSON object, at every depth, of
the official FHIR R4 examples (HL7's examples, Apache-2.0; `shared/fhir-r4-examples/` beside the
repository by default), each in the renderings a sender uses: compact (orjson, as HAPI sends),
`json.dumps`' ", " / ": " with \\u escapes, and the same without escapes. Never trained on the
benchmark generator: a synthetic mix is far more repetitive than real traffic and would flatter
the ratio (notes in benchmarks/README.md). Deterministic: the same examples give the same bytes.

Run: `.venv/bin/python scripts/build_zstd_dict.py [--examples DIR]`
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import orjson
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.codec import DICTIONARY_PATH  # noqa: E402

DICTIONARY_SIZE = 16 * 1024


def objects(value: Any) -> list[dict[str, Any]]:
    """Every JSON object of `value`, at every depth."""
    out: list[dict[str, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            out.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def samples(examples: Path) -> list[bytes]:
    out: list[bytes] = []
    for path in sorted(examples.glob("*.json")):
        for obj in objects(json.loads(path.read_text())):
            out.append(orjson.dumps(obj))
            out.append(json.dumps(obj).encode())
            out.append(json.dumps(obj, ensure_ascii=False).encode())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, default=ROOT.parent / "shared/fhir-r4-examples")
    args = parser.parse_args()
    found = samples(args.examples)
    if not found:
        sys.exit(f"build_zstd_dict: no *.json examples in {args.examples}")
    trained = zstandard.train_dictionary(DICTIONARY_SIZE, found, level=3).as_bytes()
    DICTIONARY_PATH.write_bytes(trained)
    print(
        f"wrote {DICTIONARY_PATH.relative_to(ROOT)} ({len(trained):,} B, sha256 "
        f"{hashlib.sha256(trained).hexdigest()}) from {len(found):,} samples"
    )


if __name__ == "__main__":
    main()
