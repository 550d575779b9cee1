"""The served views: the shipped ViewDefinitions and the operator's `VIEWS_DIR`, one registry.

Every part that needs to know which views exist reads `served_views(settings.views_dir)`: the
receiver's and the poller's deriver, `batch init`, the types the poller, the batch sync and
`subscriptions bootstrap` read, the query API's `/views` and the status page. With no
`VIEWS_DIR` it is exactly `serving.viewdef.shipped_views()`.

A file of `VIEWS_DIR` becomes a served view only when it would be served exactly: it is JSON,
a valid SQL-on-FHIR v2 ViewDefinition (`serving.viewdef.load_view`) that both engines compile,
its `name` is a batch table name (`[a-z][a-z0-9_]{0,62}`) no other served view has, its
`resource` is a FHIR resource type that enters the layers, and it has a column `id` holding
the resource's own id (`getResourceKey()` or `id`, outside any forEach, forEachOrNull, repeat
or unionAll): the merge hides a resource's batch rows by it when the speed layer holds a newer
version. Anything else raises InvalidViewDefinition naming the file and the reason.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from core.errors import InvalidViewDefinition
from core.fhir_values import JsonError
from core.fhir_values import loads as exact_loads
from serving.engines.postgres import compile_view as compile_sql
from serving.engines.python import compile_view
from serving.viewdef import Select, ViewDefinition, load_view, shipped_views

# A batch table `sqlonfhir.<name>` needs no quoting (PostgreSQL keeps 63 bytes of a name).
NAME_PATTERN = "[a-z][a-z0-9_]{0,62}"
_NAME_RE = re.compile(NAME_PATTERN)
_KEY_PATHS = ("getResourceKey()", "id")

Fingerprint = tuple[tuple[str, int, int], ...]


def served_views(views_dir: str | None = None) -> dict[str, ViewDefinition]:
    """Every served view by name: the shipped ones, then `views_dir`'s *.json in name order.

    Read once per content of the folder (a file added, removed or changed is read again).
    Raises InvalidViewDefinition("<file>: <reason>") for the first file that cannot be served.
    """
    if views_dir is None:
        return shipped_views()
    return dict(_load(views_dir, _fingerprint(views_dir)))


def _fingerprint(views_dir: str) -> Fingerprint:
    try:
        entries = sorted(os.scandir(views_dir), key=lambda e: e.name)
    except OSError as exc:
        raise InvalidViewDefinition(
            f"{views_dir}: cannot read the folder: {exc.strerror}"
        ) from None
    out: list[tuple[str, int, int]] = []
    for entry in entries:
        if not entry.name.endswith(".json"):
            continue
        try:
            stat = entry.stat()
        except OSError:
            out.append((entry.name, -1, -1))
        else:
            out.append((entry.name, stat.st_mtime_ns, stat.st_size))
    return tuple(out)


@lru_cache(maxsize=8)
def _load(views_dir: str, fingerprint: Fingerprint) -> dict[str, ViewDefinition]:
    views = shipped_views()
    origin = {name: f"the shipped view {name}" for name in views}
    for file_name, _, _ in fingerprint:
        path = Path(views_dir) / file_name
        try:
            name, view = _load_file(path)
        except InvalidViewDefinition as exc:
            raise InvalidViewDefinition(f"{path}: {exc}") from None
        if name in origin:
            raise InvalidViewDefinition(f"{path}: name {name!r} is already {origin[name]}")
        views[name] = view
        origin[name] = f"the name of {path}"
    return views


def _load_file(path: Path) -> tuple[str, ViewDefinition]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidViewDefinition(f"cannot read the file: {exc.strerror}") from None
    try:
        data = exact_loads(raw)
    except JsonError as exc:
        raise InvalidViewDefinition(f"not valid JSON: {exc}") from None
    view = load_view(data)
    name = view.name
    if name is None:
        raise InvalidViewDefinition(f"no 'name': a served view needs one ({NAME_PATTERN})")
    if not _NAME_RE.fullmatch(name):
        raise InvalidViewDefinition(f"name {name!r} does not match {NAME_PATTERN}")
    _check_resource(view.resource)
    if not _has_resource_key(view.select):
        raise InvalidViewDefinition(
            "no column 'id' holding the resource's id (path getResourceKey() or id, outside"
            " forEach, forEachOrNull, repeat and unionAll): the merge of both layers needs it"
        )
    compile_view(view)  # both engines, so `batch init` and the write path cannot refuse it
    compile_sql(view, table="rf_batch.resources")
    return name, view


def _check_resource(resource_type: str) -> None:
    from core.validation import NEVER_STORED, is_resource_type

    if not is_resource_type(resource_type):
        raise InvalidViewDefinition(f"'resource' {resource_type!r} is not a FHIR R4 resource type")
    if resource_type in NEVER_STORED:
        raise InvalidViewDefinition(f"'resource' {resource_type!r} never enters either layer")


def _has_resource_key(selects: tuple[Select, ...]) -> bool:
    for select in selects:
        if select.iterates:
            continue
        for column in select.column:
            if column.name == "id" and column.path.strip() in _KEY_PATHS:
                return not column.collection
        if _has_resource_key(select.select):
            return True
    return False
