"""R4's own definitions for the resource types and shapes the R4B models lack.

The gate (`core.validation`) checks resources against the fhir.resources R4B models, which
are fast and thorough. HAPI here is an R4 server, though, and R4B dropped or reshaped a few R4
types: the MedicinalProduct* and Substance* (nucleic acid, polymer, protein, reference
information, source material, specification) families, EffectEvidenceSynthesis and
RiskEvidenceSynthesis are gone, and Evidence and EvidenceVariable were redefined. A valid R4
resource of those must be taken, so they are checked against the official FHIR R4 JSON schema
(`schemas/fhir.r4.schema.json.gz`, see `scripts/update_r4_schema.sh` for its source) with the
`jsonschema` library. The schema (3.3 MB) is loaded on the first such resource only: the
receiver's usual path never touches it.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from typing import Any

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
