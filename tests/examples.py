"""The official FHIR R4 examples as HAPI would push them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple


class Example(NamedTuple):
    name: str
    resource_type: str
    resource_id: str
    raw: bytes
    own_id: bool  # False: the example has no id; `resource_id` is made from its file name


def official_examples(shared_dir: Path) -> list[Example]:
    """Every example of `fhir-r4-examples/` with its PUT path. An example without an id (the
    Parameters one) gets one: HAPI always sends the id, and FHIR's update rules require the
    body to carry the id of its URL."""
    out: list[Example] = []
    for path in sorted((shared_dir / "fhir-r4-examples").glob("*.json")):
        raw = path.read_bytes()
        data = json.loads(raw)
        rid = data.get("id")
        own_id = isinstance(rid, str)
        if not isinstance(rid, str):
            rid = path.stem.replace("_", "-")[:64]
            raw = json.dumps({"resourceType": data["resourceType"], "id": rid, **data}).encode()
        out.append(Example(path.name, data["resourceType"], rid, raw, own_id))
    return out
