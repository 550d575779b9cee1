"""What the speed layer keeps up to date at write time: shipped views' rows, index entries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from core.fhir_values import dumps
from core.store import Derived, Deriver
from core.validation import ValidResource
from serving.cohort import counts
from serving.engines.python import CompiledView, compile_view
from serving.viewdef import ViewDefinition, shipped_views


def index_entries(resource_type: str, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """Index entry names for the columns cohort queries filter on.

    Patient: `gender:<g>`, `birthyear:<yyyy>` (a birthdate range fans out over the years it
    covers; the exact bounds are checked on the rows). Condition/Observation: `subject:<id>`
    and, only for rows that count, `code:<code>` and `code:<system>|<code>`.
    """
    names: dict[str, None] = {}
    for row in rows:
        if resource_type == "Patient":
            if row.get("gender"):
                names[f"gender:{row['gender']}"] = None
            birth = row.get("birth_date")
            if isinstance(birth, str) and len(birth) >= 4:
                names[f"birthyear:{birth[:4]}"] = None
            continue
        if row.get("patient_id"):
            names[f"subject:{row['patient_id']}"] = None
        if not counts(resource_type, row):
            continue
        code = row.get("code")
        if code:
            names[f"code:{code}"] = None
            names[f"code:{row.get('code_system') or ''}|{code}"] = None
    return tuple(names)


def compiled_views(
    views: Mapping[str, ViewDefinition] | None = None,
) -> dict[str, list[tuple[str, CompiledView]]]:
    """Every view compiled once, grouped by resource type."""
    by_type: dict[str, list[tuple[str, CompiledView]]] = {}
    for name, view in (views or shipped_views()).items():
        by_type.setdefault(view.resource, []).append((name, compile_view(view)))
    return by_type


def default_deriver(views: Mapping[str, ViewDefinition] | None = None) -> Deriver:
    """Rows of every shipped ViewDefinition whose resource type matches, plus index entries."""
    by_type = compiled_views(views)

    def derive(resource: ValidResource) -> Derived:
        compiled = by_type.get(resource.resource_type)
        if not compiled:
            return Derived()
        rows: dict[str, bytes] = {}
        all_rows: list[dict[str, Any]] = []
        for name, view in compiled:
            view_rows = view.rows(resource.data)
            rows[name] = dumps(view_rows)
            all_rows.extend(view_rows)
        return Derived(rows=rows, index=index_entries(resource.resource_type, all_rows))

    return derive
