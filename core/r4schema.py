"""R4's own definitions: the full check of the types the R4B models lack, and the gate's
compiled fast test.

The full check (`core.validation.check_resource`) takes the fhir.resources R4B models for the
R4 types they have. HAPI here is an R4 server, though, and R4B dropped or reshaped a few R4
types: the MedicinalProduct* and Substance* (nucleic acid, polymer, protein, reference
information, source material, specification) families, EffectEvidenceSynthesis and
RiskEvidenceSynthesis are gone, and Evidence and EvidenceVariable were redefined. A valid R4
resource of those must be taken, so they are checked against the official FHIR R4 JSON schema
(`schemas/fhir.r4.schema.json.gz`, see `scripts/update_r4_schema.sh` for its source) with the
`jsonschema` library (`issues`: precise messages). That schema (3.3 MB) is loaded on the first
such resource only: the receiver's usual path never touches it.

The fast test (`fast_valid`) is the same R4 schema compiled by jsonschema-rs (Rust, draft-06),
narrowed so that it passes nothing the full check refuses (`build_fast_schema`, written once to
`schemas/fhir.r4.fast.json.gz` by `scripts/build_fast_schema.py`):

- FHIR R4's value rules the schema's patterns cannot say of a JSON number or a day
  (datatypes.html: 32-bit integers, unsignedInt >= 0, positiveInt >= 1, "Dates SHALL be valid
  dates"), strict base64 (what Python's decoder takes), a complex type is an object;
- for every type the R4B models have, the model's shape (an element it lacks or types
  differently is dropped, so it fails the test) and the rules of its field metadata that the
  schema lacks: at most one element of a choice group (`one_of_many`, the group required where
  the model says so) and a required primitive present as its value or its `_name` extension
  (`element_required`), the models' required elements;
- `url` and `uuid` values (the models parse them as URLs and version-4 UUIDs) always fail it.

It is stricter than the full check where that is cheaper than exact (a url, a string holding a
character R4's ECMAScript pattern excludes such as a no-break space, `fhir_comments`, base64
with line breaks): those resources go to the full check, which decides. tests/test_fast_gate.py
checks "passes the fast test => passes the full check" on the official examples, the benchmark
mix and random mutations of both.
"""

from __future__ import annotations

import gzip
import re
from datetime import date
from functools import lru_cache
from importlib import resources
from typing import Any, get_args

import orjson

from core.errors import Issue

# Every resource type of FHIR R4 (the R4 schema's discriminator; tests/test_r4schema.py checks
# this list against it). R4B-only types (Citation, SubscriptionTopic, ...) are not R4 types.
R4_RESOURCE_TYPES = frozenset(
    {
        "Account", "ActivityDefinition", "AdverseEvent", "AllergyIntolerance", "Appointment",
        "AppointmentResponse", "AuditEvent", "Basic", "Binary", "BiologicallyDerivedProduct",
        "BodyStructure", "Bundle", "CapabilityStatement", "CarePlan", "CareTeam", "CatalogEntry",
        "ChargeItem", "ChargeItemDefinition", "Claim", "ClaimResponse", "ClinicalImpression",
        "CodeSystem", "Communication", "CommunicationRequest", "CompartmentDefinition",
        "Composition", "ConceptMap", "Condition", "Consent", "Contract", "Coverage",
        "CoverageEligibilityRequest", "CoverageEligibilityResponse", "DetectedIssue", "Device",
        "DeviceDefinition", "DeviceMetric", "DeviceRequest", "DeviceUseStatement",
        "DiagnosticReport", "DocumentManifest", "DocumentReference", "EffectEvidenceSynthesis",
        "Encounter", "Endpoint", "EnrollmentRequest", "EnrollmentResponse", "EpisodeOfCare",
        "EventDefinition", "Evidence", "EvidenceVariable", "ExampleScenario",
        "ExplanationOfBenefit", "FamilyMemberHistory", "Flag", "Goal", "GraphDefinition", "Group",
        "GuidanceResponse", "HealthcareService", "ImagingStudy", "Immunization",
        "ImmunizationEvaluation", "ImmunizationRecommendation", "ImplementationGuide",
        "InsurancePlan", "Invoice", "Library", "Linkage", "List", "Location", "Measure",
        "MeasureReport", "Media", "Medication", "MedicationAdministration", "MedicationDispense",
        "MedicationKnowledge", "MedicationRequest", "MedicationStatement", "MedicinalProduct",
        "MedicinalProductAuthorization", "MedicinalProductContraindication",
        "MedicinalProductIndication", "MedicinalProductIngredient", "MedicinalProductInteraction",
        "MedicinalProductManufactured", "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical", "MedicinalProductUndesirableEffect", "MessageDefinition",
        "MessageHeader", "MolecularSequence", "NamingSystem", "NutritionOrder", "Observation",
        "ObservationDefinition", "OperationDefinition", "OperationOutcome", "Organization",
        "OrganizationAffiliation", "Parameters", "Patient", "PaymentNotice",
        "PaymentReconciliation", "Person", "PlanDefinition", "Practitioner", "PractitionerRole",
        "Procedure", "Provenance", "Questionnaire", "QuestionnaireResponse", "RelatedPerson",
        "RequestGroup", "ResearchDefinition", "ResearchElementDefinition", "ResearchStudy",
        "ResearchSubject", "RiskAssessment", "RiskEvidenceSynthesis", "Schedule",
        "SearchParameter", "ServiceRequest", "Slot", "Specimen", "SpecimenDefinition",
        "StructureDefinition", "StructureMap", "Subscription", "Substance", "SubstanceNucleicAcid",
        "SubstancePolymer", "SubstanceProtein", "SubstanceReferenceInformation",
        "SubstanceSourceMaterial", "SubstanceSpecification", "SupplyDelivery", "SupplyRequest",
        "Task", "TerminologyCapabilities", "TestReport", "TestScript", "ValueSet",
        "VerificationResult", "VisionPrescription",
    }
)  # fmt: skip
# R4 resource types fhir.resources' R4B package has no model of (tests/test_r4schema.py
# derives the same list from the schema and the models).
R4_ONLY_TYPES = frozenset(
    {
        "EffectEvidenceSynthesis",
        "MedicinalProduct",
        "MedicinalProductAuthorization",
        "MedicinalProductContraindication",
        "MedicinalProductIndication",
        "MedicinalProductIngredient",
        "MedicinalProductInteraction",
        "MedicinalProductManufactured",
        "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical",
        "MedicinalProductUndesirableEffect",
        "RiskEvidenceSynthesis",
        "SubstanceNucleicAcid",
        "SubstancePolymer",
        "SubstanceProtein",
        "SubstanceReferenceInformation",
        "SubstanceSourceMaterial",
        "SubstanceSpecification",
    }
)
# Types both releases have, with elements R4B renamed or dropped: R4's shape is the truth.
R4_RESHAPED_TYPES = frozenset({"Evidence", "EvidenceVariable"})
R4_SCHEMA_TYPES = R4_ONLY_TYPES | R4_RESHAPED_TYPES

MAX_ISSUES = 50


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The official FHIR R4 JSON schema (draft-06), parsed."""
    raw = resources.files("core.schemas").joinpath("fhir.r4.schema.json.gz").read_bytes()
    data: dict[str, Any] = orjson.loads(gzip.decompress(raw))
    return data


@lru_cache(maxsize=64)
def _validator(resource_type: str) -> Any:
    from jsonschema import Draft6Validator

    whole = schema()
    return Draft6Validator(
        {
            "$schema": whole["$schema"],
            "definitions": whole["definitions"],
            "$ref": f"#/definitions/{resource_type}",
        }
    )


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def issues(data: dict[str, Any]) -> list[Issue]:
    """Validation issues of a resource of an `R4_SCHEMA_TYPES` type against R4's schema:
    one per error, each naming the element path (empty list: valid)."""
    resource_type = data.get("resourceType")
    if resource_type not in R4_SCHEMA_TYPES:
        raise ValueError(f"{resource_type!r} is validated by the R4B models, not here")
    found: list[Issue] = []
    for error in sorted(_validator(resource_type).iter_errors(data), key=lambda e: e.path):
        error = _closest(error)
        path = _path(error.absolute_path)
        where = _element(error, path)
        kind = "required" if error.validator == "required" else "invalid"
        found.append(Issue(kind, f"{where or resource_type}: {error.message[:300]}", where))
        if len(found) >= MAX_ISSUES:
            break
    return found


def _closest(error: Any) -> Any:
    """For a oneOf (a contained resource, ...), the error of the alternative meant: the one
    of the instance's own resourceType, else the best match."""
    from jsonschema.exceptions import best_match

    if not error.context:
        return error
    instance = error.instance
    if isinstance(instance, dict) and isinstance(error.validator_value, list):
        wanted = f"#/definitions/{instance.get('resourceType')}"
        own = [
            e
            for e in error.context
            if e.schema_path
            and isinstance(e.schema_path[0], int)
            and error.validator_value[e.schema_path[0]].get("$ref") == wanted
        ]
        if own:
            return _closest(own[0])
    return best_match(error.context) or error


def _element(error: Any, path: str) -> str | None:
    """The element an error is about: the missing or unexpected property where it names one."""
    prefix = f"{path}." if path else ""
    instance = error.instance
    if error.validator == "required" and isinstance(instance, dict):
        missing = [p for p in error.validator_value if p not in instance]
        if missing:
            return prefix + str(missing[0])
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = error.schema.get("properties") or {}
        extra = sorted(p for p in instance if p not in known)
        if extra:
            return prefix + str(extra[0])
    return path or None


# -- the compiled fast test -------------------------------------------------------------------
# Bounds FHIR R4 gives its integer types (datatypes.html#primitive: 32-bit signed), which the
# schema's patterns cannot say for a JSON number (patterns apply to strings only).
_INT32 = (-(2**31), 2**31 - 1)
_INTEGER_BOUNDS = {"integer": _INT32[0], "unsignedInt": 0, "positiveInt": 1}
# Strict base64 (RFC 4648 §4, no whitespace): what Python's decoder (the models') takes.
_BASE64 = r"^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
# Primitive types the models check by more than the schema says and the fast test does not
# reproduce: an element of one sends the resource to the full check (`{"not": {}}` fails).
_SLOW_PRIMITIVES = ("url", "uuid")
_CALENDAR = "fhir-calendar"


def _calendar_date(value: str) -> bool:
    """A date, dateTime or instant's day exists (FHIR: "Dates SHALL be valid dates"; the
    schema's pattern takes 2023-02-30); partial dates have no day to check."""
    if len(value) < 10:
        return True
    try:
        date(int(value[0:4]), int(value[5:7]), int(value[8:10]))
    except ValueError:
        return False
    return True


def _model_of(annotation: Any) -> tuple[str, Any]:
    """('model', class) or ('primitive', FHIR type name) or ('other', None) of a model field."""
    from fhir_core.types import FhirBase

    stack = [annotation]
    while stack:
        item = stack.pop()
        if item is bool:
            return "primitive", "boolean"
        if isinstance(item, type) and issubclass(item, FhirBase):
            return "model", item.get_model_klass()
        for meta in getattr(item, "__metadata__", ()):
            name = getattr(meta, "__visit_name__", None)
            if name is not None:
                return "primitive", name
        stack.extend(get_args(item))
    return "other", None


def _ref(prop: dict[str, Any]) -> str | None:
    ref = prop.get("$ref") or (prop.get("items") or {}).get("$ref")
    return ref.rsplit("/", 1)[1] if isinstance(ref, str) else None


def _fit_to_models(definitions: dict[str, Any]) -> None:
    """Narrow every definition of a type the R4B models have to what its model takes, in place:
    properties the model lacks or types differently are dropped (additionalProperties is false,
    so they send the resource to the full check), and the rules the schema cannot say are
    added from the models' field metadata (fhir.resources' `one_of_many`, `element_required`):
    at most one element of a choice group (and one where the group is required), and a
    required primitive present as its value or as its `_name` extension."""
    from fhir.resources.R4B import get_fhir_model_class

    seen: dict[str, Any] = {}
    todo: list[tuple[str, Any]] = []
    for name in R4_RESOURCE_TYPES - R4_SCHEMA_TYPES:
        todo.append((name, get_fhir_model_class(name)))
    while todo:
        name, model = todo.pop()
        if name in seen:
            continue
        seen[name] = model
        definition = definitions[name]
        props: dict[str, Any] = definition.get("properties", {})
        fields = {(f.alias or n): f for n, f in model.model_fields.items()}
        groups: dict[str, tuple[list[str], bool]] = {}
        required: list[str] = []
        for key in list(props):
            if key == "resourceType":
                continue
            field = fields.get(key)
            if field is None:
                del props[key]
                continue
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            kind, what = _model_of(field.annotation)
            target = _ref(props[key])
            if kind == "primitive" and target is None and "enum" not in props[key]:
                # An inline primitive (choice elements): the shared definition, with the
                # bounds and checks added to it, when it is the model's type.
                if what not in definitions or props[key].get("type") != schema()["definitions"][
                    what
                ].get("type"):
                    del props[key]
                    continue
                props[key] = {"$ref": f"#/definitions/{what}"}
            elif kind == "primitive" and target is not None and target != what:
                del props[key]
                continue
            if kind == "model" and target is not None and target[0].isupper():
                if target in seen and seen[target] is not what:
                    del props[key]
                    continue
                todo.append((target, what))
            elif kind == "model" and target != "Element" and not key.startswith("_"):
                del props[key]
                continue
            group = extra.get("one_of_many")
            if isinstance(group, str):
                members, _ = groups.setdefault(group, ([], bool(extra.get("one_of_many_required"))))
                members.append(key)
            if extra.get("element_required") and not key.startswith("_"):
                required.append(key)
            elif field.is_required() and key not in definition.get("required", ()):
                definition.setdefault("required", []).append(key)
        rules: list[dict[str, Any]] = []
        dependencies: dict[str, Any] = {}
        for members, needed in groups.values():
            for member in members:
                others = [{"required": [m]} for m in members if m != member]
                if others:
                    dependencies[member] = {"not": {"anyOf": others}}
            if needed:
                rules.append({"anyOf": [{"required": [m]} for m in members]})
        for key in required:
            rules.append(
                {
                    "anyOf": [
                        {"required": [key]},
                        {
                            "required": ["_" + key],
                            "properties": {"_" + key: {"required": ["extension"]}},
                        },
                    ]
                }
            )
        if dependencies:
            definition["dependencies"] = dependencies
        if rules:
            definition["allOf"] = rules


FAST_SCHEMA = "fhir.r4.fast.json.gz"


def build_fast_schema() -> dict[str, Any]:
    """R4's schema narrowed to what the gate's full check takes: its integer bounds, strict
    base64, real calendar days, and for the types the R4B models have, their shapes and rules
    (`_fit_to_models`). Importing every model takes seconds, so `scripts/build_fast_schema.py`
    writes this once to `schemas/fhir.r4.fast.json.gz` (tests/test_fast_gate.py checks the
    file is this function's output)."""
    import copy

    whole = copy.deepcopy(schema())
    definitions: dict[str, Any] = whole["definitions"]
    for name, low in _INTEGER_BOUNDS.items():
        definitions[name] = {"type": "integer", "minimum": low, "maximum": _INT32[1]}
    definitions["base64Binary"] = {"type": "string", "pattern": _BASE64}
    definitions["xhtml"] = {"type": "string"}
    for name in ("date", "dateTime", "instant"):
        definitions[name] = {**definitions[name], "format": _CALENDAR}
    for name in _SLOW_PRIMITIVES:
        definitions[name] = {"not": {}}
    for definition in definitions.values():
        if "properties" in definition:
            # R4's complex types list properties without saying "object": 0 would pass.
            definition["type"] = "object"
    _fit_to_models(definitions)
    return whole


@lru_cache(maxsize=1)
def fast_validator() -> Any:
    """`build_fast_schema`'s schema (from its file) compiled by jsonschema-rs, with the
    calendar check as a format. Its `is_valid` takes plain JSON values (orjson's, not
    Decimals)."""
    import jsonschema_rs

    raw = resources.files("core.schemas").joinpath(FAST_SCHEMA).read_bytes()
    return jsonschema_rs.Draft6Validator(
        orjson.loads(gzip.decompress(raw)),
        formats={_CALENDAR: _calendar_date},
        validate_formats=True,
    )


# U+0085 (NEL) is white space to the models' patterns (Unicode's White_Space, the Rust regex
# of pydantic-core) and none to the schema's (ECMAScript's \s): `"\u0085"` fails the models'
# string pattern and passes R4's. Raw in UTF-8 or escaped, it sends a resource to the full check.
# Two literal patterns, each found by a byte search: one alternation of both costs ~2 us more.
_NEL_RAW = re.compile(rb"\xc2\x85")
_NEL_ESCAPED = re.compile(rb"\\u0085")


def fast_valid(raw: bytes) -> bool:
    """True when a resource's JSON bytes pass `fast_validator`; False when they do not, hold
    numbers beyond a double or a U+0085 (which only the full check judges exactly)."""
    if _NEL_RAW.search(raw) or _NEL_ESCAPED.search(raw):
        return False
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return bool(fast_validator().is_valid(value))
