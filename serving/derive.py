"""What the speed layer keeps up to date at write time: each shipped view's rows."""

from __future__ import annotations

from receiver.ingest import Deriver
from receiver.store import Derived
from receiver.validation import ValidResource


def default_deriver() -> Deriver:
    """Rows of every shipped ViewDefinition whose resource type matches."""

    def derive(resource: ValidResource) -> Derived:
        return Derived()

    return derive
