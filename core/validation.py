"""The one gate into both layers: parse and validate a FHIR R4 resource.

The verdict: a resource is valid when `check_resource`, the full check, finds no issue: the
fhir.resources R4B models for the R4 types they have, R4's JSON schema for those they lack or
reshaped (`core.r4schema`), FHIR's JSON rules (`json_rules_issues`) and the required bindings
our views read (`_binding_issues`). The full check costs ~120 us for a 600-byte resource (the
models' Python validators), so `validate_resource` first runs `passes_fast`: R4's schema
compiled (`core.r4schema.fast_valid`, ~7 us), narrowed to pass nothing the full check refuses,
with the same JSON rules and bindings. When it passes, the resource is valid and the full check
is not run; when it fails, the full check decides and names the issues. So the fast test
changes no verdict and no message, only the cost (benchmarks/README.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from core import r4schema
from core.errors import InvalidRequest, InvalidResource, Issue
from core.fhir_values import JsonError, JsonTooDeep, dumps, loads

# Resource types that never enter either layer: a Subscription carries the receiver's bearer
# token in channel.header (and the deployment's own are no research data). The receiver takes
# a valid one (204, so HAPI does not retry it) and writes nothing; the poller and the batch
# sync never read the type.
NEVER_STORED = frozenset({"Subscription"})
# FHIR R4 id datatype.
ID_PATTERN = re.compile(r"[A-Za-z0-9\-\.]{1,64}")
# JSON nesting allowed in a resource. Real ones stay far below (the official examples: 16
# levels); the models validate recursively (RecursionError at ~250 levels of extensions) and
# orjson writes at most 255, so deeper input must be refused before either sees it.
MAX_DEPTH = 100

# Required bindings of the elements our views read, which fhir.resources does not check
# (it accepts Patient.gender "robot"). Path -> (coding system or None for a plain code, codes).
_GENDER = frozenset({"male", "female", "other", "unknown"})
_CONDITION_CLINICAL = (
    "http://terminology.hl7.org/CodeSystem/condition-clinical",
    frozenset({"active", "recurrence", "relapse", "inactive", "remission", "resolved"}),
)
_CONDITION_VERIFICATION = (
    "http://terminology.hl7.org/CodeSystem/condition-ver-status",
    frozenset(
        {"unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"}
    ),
)
_OBSERVATION_STATUS = frozenset(
    {
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)


@dataclass(frozen=True)
class ValidResource:
    """A resource that passed the gate, with its original bytes."""

    resource_type: str
    resource_id: str
    version_id: str | None
    last_updated: str | None
    body: bytes
    data: dict[str, Any]


@lru_cache(maxsize=256)
def _model(resource_type: str) -> Any:
    try:
        return get_fhir_model_class(resource_type)
    except (ValueError, KeyError, AttributeError):
        return None


def is_resource_type(name: str) -> bool:
    """True for a FHIR R4 resource type name (`core.r4schema.R4_RESOURCE_TYPES`, R4's own list):
    an R4B-only type (Citation, SubscriptionTopic, ...) is none, though the models know it."""
    return name in r4schema.R4_RESOURCE_TYPES


_EXTENSION_KEYS = frozenset({"extension", "modifierExtension"})


def json_rules_issues(data: dict[str, Any]) -> list[Issue]:
    """Issues of FHIR's JSON rules that neither the R4B models nor R4's JSON schema check, so
    both paths of the gate give one answer (FHIR R4 JSON §2.6.2, Extension, ele-1, ext-1):

    - no empty object or array, and no null except where a primitive array's `_name`
      partner holds the element at that index (`"given": [null, "B"]` with `_given`);
    - an extension has a `url` and either one value[x] or extensions, never both;
    - every resource inside (contained, Bundle entries, Parameters) is of an R4 type;
    - no string holds a NUL character (U+0000): valid JSON and matched by R4's string
      pattern, but PostgreSQL's jsonb cannot hold it, so the batch layer could never take
      the resource (every `batch refresh` would fail on it).
    """
    issues: list[Issue] = []
    stack: list[tuple[str, Any, bool]] = [("", data, False)]
    while stack and len(issues) < r4schema.MAX_ISSUES:
        path, node, is_extension = stack.pop()
        if not node:
            issues.append(Issue("invalid", f"{path}: an empty object or array is not FHIR", path))
            continue
        if is_extension:
            issues.extend(_extension_issues(path, node))
        kind = node.get("resourceType")
        if path and isinstance(kind, str) and kind not in r4schema.R4_RESOURCE_TYPES:
            where = f"{path}.resourceType"
            issues.append(Issue("not-supported", f"{where}: unknown resource type {kind!r}", where))
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if "\x00" in key or (isinstance(value, str) and "\x00" in value):
                issues.append(_nul_issue(where))
            if value is None:
                issues.append(Issue("invalid", f"{where}: null is not a FHIR value", where))
            elif isinstance(value, dict):
                stack.append((where, value, False))
            elif isinstance(value, list):
                if not value:
                    issues.append(Issue("invalid", f"{where}: an empty array is not FHIR", where))
                    continue
                other = node.get(key[1:] if key.startswith("_") else "_" + key)
                partner: list[Any] = other if isinstance(other, list) else []
                for n, item in enumerate(value):
                    if item is None:
                        if n >= len(partner) or partner[n] is None:
                            at = f"{where}[{n}]"
                            issues.append(Issue("invalid", f"{at}: null is not a FHIR value", at))
                    elif isinstance(item, dict):
                        stack.append((f"{where}[{n}]", item, key in _EXTENSION_KEYS))
                    elif isinstance(item, str) and "\x00" in item:
                        issues.append(_nul_issue(f"{where}[{n}]"))
    issues.sort(key=lambda issue: issue.expression or "")
    return issues


def _nul_issue(where: str) -> Issue:
    return Issue(
        "invalid",
        f"{where}: a NUL character (\\u0000) is not taken (PostgreSQL's jsonb cannot hold it)",
        where,
    )


def _extension_issues(path: str, node: dict[str, Any]) -> list[Issue]:
    found: list[Issue] = []
    url = node.get("url")
    if not isinstance(url, str) or not url:
        found.append(Issue("required", f"{path}.url: an extension needs its url", f"{path}.url"))
    values = sorted(k for k in node if k.startswith("value"))
    if len(values) > 1:
        found.append(Issue("invalid", f"{path}: an extension has one value[x], not {values}", path))
    if bool(values) == ("extension" in node):
        found.append(
            Issue(
                "invalid",
                f"{path}: an extension has either a value[x] or extensions, not both or"
                " neither (ext-1)",
                path,
            )
        )
    return found


def _deeper_than(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def check_id(resource_id: str) -> None:
    if not ID_PATTERN.fullmatch(resource_id):
        raise InvalidRequest(
            f"invalid id {resource_id[:80]!r}: a FHIR id is 1-64 of A-Z a-z 0-9 - .",
            [Issue("value", "invalid FHIR id (1-64 of A-Z a-z 0-9 - .)", "id")],
        )


def parse_json(body: bytes) -> Any:
    """Parse a request body as JSON with exact numbers (a FHIR decimal is a Decimal, never
    a double), or raise InvalidRequest (400); InvalidResource (422) for well-formed JSON
    nested too deeply for any resource."""
    try:
        return loads(body)
    except JsonTooDeep as exc:
        raise InvalidResource(
            str(exc), [Issue("too-costly", f"JSON nested deeper than {MAX_DEPTH} levels")]
        ) from None
    except JsonError as exc:
        raise InvalidRequest(
            f"the body is not valid JSON: {exc}", [Issue("structure", f"malformed JSON: {exc}")]
        ) from None


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _binding_issues(resource_type: str, data: dict[str, Any]) -> list[Issue]:
    issues: list[Issue] = []

    def check_code(path: str, value: Any, allowed: frozenset[str]) -> None:
        # Only a string can be off the value set; another JSON type is the model's issue (and
        # a dict or list is unhashable: `in` would raise).
        if isinstance(value, str) and value not in allowed:
            issues.append(
                Issue(
                    "code-invalid",
                    f"{value!r} is not in the required value set ({', '.join(sorted(allowed))})",
                    path,
                )
            )

    def check_concept(path: str, concept: Any, binding: tuple[str, frozenset[str]]) -> None:
        if not isinstance(concept, dict):
            return
        system, allowed = binding
        codings = concept.get("coding")
        if not isinstance(codings, list):
            return  # the model reports the wrong type
        for n, coding in enumerate(codings):
            if isinstance(coding, dict) and coding.get("system") == system:
                check_code(f"{path}.coding[{n}].code", coding.get("code"), allowed)

    if resource_type == "Patient":
        check_code("gender", data.get("gender"), _GENDER)
    elif resource_type == "Condition":
        check_concept("clinicalStatus", data.get("clinicalStatus"), _CONDITION_CLINICAL)
        check_concept("verificationStatus", data.get("verificationStatus"), _CONDITION_VERIFICATION)
    elif resource_type == "Observation":
        check_code("status", data.get("status"), _OBSERVATION_STATUS)
    return issues


def check_resource(data: dict[str, Any]) -> list[Issue]:
    """Validation issues of a parsed resource against the R4B models and our bindings, or,
    for the R4 types and shapes those models lack, against R4's own JSON schema."""
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str) or not is_resource_type(resource_type):
        return [Issue("not-supported", f"unknown resource type {resource_type!r}", "resourceType")]
    rules = json_rules_issues(data)
    if resource_type in r4schema.R4_SCHEMA_TYPES:
        return r4schema.issues(data) + rules
    model = _model(resource_type)
    if model is None:
        return [Issue("not-supported", f"unknown resource type {resource_type!r}", "resourceType")]
    issues: list[Issue] = []
    try:
        model.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            issues.append(
                Issue(
                    "invalid" if error["type"] != "missing" else "required",
                    f"{_path(error['loc']) or resource_type}: {error['msg']}",
                    _path(error["loc"]) or None,
                )
            )
    except (ValueError, TypeError, LookupError, AttributeError) as exc:
        # fhir.resources raises plain errors now and then, e.g. KeyError('R4.Type') for a
        # contained resource whose resourceType is "", AttributeError for a url that is a
        # number (fhir_core's Url): invalid input, never a 500.
        issues.append(Issue("invalid", f"{type(exc).__name__}: {str(exc)[:500]}"))
    issues.extend(_binding_issues(resource_type, data))
    seen = {issue.expression for issue in issues}
    issues.extend(issue for issue in rules if issue.expression not in seen)
    return issues


# What `json_rules_issues` looks at, as bytes of the JSON text: a null, an empty object or
# array, an `extension`/`modifierExtension` key, a NUL character (JSON can only write it as
# the escape \u0000), and (counted apart) a nested resourceType.
# Those keys are ASCII letters: spelled otherwise, they hold a \u escape of one (\u0040 to
# \u007F, which `_ESCAPED_ASCII_LETTER` also matches), so a text with none of these bytes
# breaks no rule; a match only means the walk is needed. Each pattern starts with a literal,
# which re finds by a byte search: one alternation of them all, led by a character class,
# costs ~9 us on the ingest benchmark's resources, these ~2.5 us.
_ESCAPED_ASCII_LETTER = re.compile(rb"\\u00[4-7]")
_EMPTY_AFTER_BRACE = re.compile(rb"\{[ \t\r\n]*[}\]]")
_EMPTY_AFTER_BRACKET = re.compile(rb"\[[ \t\r\n]*[}\]]")


def json_rules_may_fail(raw: bytes) -> bool:
    """False when `raw` (a resource's JSON text) cannot break a rule `json_rules_issues`
    checks, told from its bytes alone (~2 us, against ~40 us for the walk)."""
    return (
        raw.count(b'"resourceType"') > 1
        or b"null" in raw
        or b'xtension"' in raw
        or (
            b"\\u00" in raw and (b"\\u0000" in raw or _ESCAPED_ASCII_LETTER.search(raw) is not None)
        )
        or _EMPTY_AFTER_BRACE.search(raw) is not None
        or _EMPTY_AFTER_BRACKET.search(raw) is not None
    )


def passes_fast(resource_type: str, raw: bytes, data: dict[str, Any]) -> bool:
    """True when a resource passes the compiled test (`core.r4schema.fast_valid`), FHIR's JSON
    rules and our bindings: then `check_resource` finds nothing either, and is not run."""
    return (
        r4schema.fast_valid(raw)
        and not _binding_issues(resource_type, data)
        and not (json_rules_may_fail(raw) and json_rules_issues(data))
    )


def validate_resource(
    body: bytes | dict[str, Any],
    *,
    path_type: str | None = None,
    path_id: str | None = None,
) -> ValidResource:
    """Check a resource the way every entry into the speed or batch layer must (the verdict
    rule is the module's docstring).

    Raises InvalidRequest (400) for malformed JSON, an unknown or mismatched resourceType, a
    mismatched or invalid id; InvalidResource (422) with one issue per error otherwise.
    """
    if isinstance(body, dict):
        data: Any = body
    else:
        data = parse_json(body)
    if not isinstance(data, dict):
        raise InvalidRequest(
            "the body must be a JSON object (a FHIR resource)",
            [Issue("structure", "the body is not a JSON object")],
        )
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise InvalidRequest(
            "the resource has no resourceType",
            [Issue("required", "resourceType is missing", "resourceType")],
        )
    if path_type is not None and resource_type != path_type:
        raise InvalidRequest(
            f"resourceType {resource_type!r} does not match the path type {path_type!r}",
            [Issue("invalid", "resourceType does not match the URL", "resourceType")],
        )
    if not is_resource_type(resource_type):
        raise InvalidRequest(
            f"unknown resource type {resource_type[:80]!r}",
            [Issue("not-supported", "unknown resource type", "resourceType")],
        )
    resource_id = data.get("id")
    if not isinstance(resource_id, str):
        # FHIR's update rules: the body of a PUT carries the id of its URL (HAPI always sends
        # one), so a body without it is refused rather than named by the path.
        raise InvalidRequest(
            "the resource has no id (a FHIR update carries the id of its URL)",
            [Issue("required", "id is missing", "id")],
        )
    check_id(resource_id)
    if path_id is not None and resource_id != path_id:
        raise InvalidRequest(
            f"the body id {resource_id!r} does not match the path id {path_id!r}",
            [Issue("invalid", "id does not match the URL", "id")],
        )
    raw: bytes | None = body if isinstance(body, bytes) else None
    if raw is None:
        try:
            raw = dumps(data)
        except TypeError:  # orjson refuses more than 255 levels
            raw = None
    # Each level opens a bracket: with fewer brackets than the limit no walk is needed.
    if raw is None or (
        raw.count(b"{") + raw.count(b"[") >= MAX_DEPTH and _deeper_than(data, MAX_DEPTH)
    ):
        raise InvalidResource(
            f"{resource_type}/{resource_id} nests JSON deeper than {MAX_DEPTH} levels",
            [Issue("too-costly", f"JSON nested deeper than {MAX_DEPTH} levels")],
        )
    issues = [] if passes_fast(resource_type, raw, data) else check_resource(data)
    if issues:
        raise InvalidResource(
            f"{resource_type}/{resource_id} is not a valid FHIR R4 resource", issues
        )
    meta: dict[str, Any] = data["meta"] if isinstance(data.get("meta"), dict) else {}
    version_id = meta.get("versionId") if isinstance(meta.get("versionId"), str) else None
    last_updated = meta.get("lastUpdated") if isinstance(meta.get("lastUpdated"), str) else None
    return ValidResource(resource_type, resource_id, version_id, last_updated, raw, data)
