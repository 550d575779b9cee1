"""What the speed layer keeps up to date at write time: the served views' rows."""

from __future__ import annotations

from collections.abc import Mapping

from core.fhir_values import dumps
from core.store import Derived, Deriver
from core.validation import ValidResource
from serving.engines.python import CompiledView, compile_view
from serving.registry import served_views
from serving.viewdef import ViewDefinition


def compiled_views(
    views: Mapping[str, ViewDefinition] | None = None,
) -> dict[str, list[tuple[str, CompiledView]]]:
    """Every view (default: the served views without VIEWS_DIR) compiled once, by type."""
    by_type: dict[str, list[tuple[str, CompiledView]]] = {}
    for name, view in (served_views() if views is None else views).items():
        by_type.setdefault(view.resource, []).append((name, compile_view(view)))
    return by_type


def default_deriver(views: Mapping[str, ViewDefinition] | None = None) -> Deriver:
    """Rows of every view of `views` (serving.registry.served_views) whose resource type matches."""
    by_type = compiled_views(views)

    def derive(resource: ValidResource) -> Derived:
        compiled = by_type.get(resource.resource_type)
        if not compiled:
            return Derived()
        return Derived(
            rows={
                name: dumps(view.rows(resource.data), plain_decimals=True)
                for name, view in compiled
            }
        )

    return derive
