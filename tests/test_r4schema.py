"""R4 resource types and shapes the R4B models lack are checked against R4's own JSON schema:
valid ones are taken by the receiver, the poller and the batch sync alike; invalid ones get a
422 naming the element path."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis
from fhir.resources.R4B import get_fhir_model_class

from core import r4schema
from core.errors import InvalidRequest, InvalidResource
from core.settings import Settings
from core.store import SpeedStore
from core.validation import is_resource_type, validate_resource
from receiver.app import create_app
from tests.asgi import running
from tests.conftest import TEST_REDIS_URL

TOKEN = "r4-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}

# Valid R4 resources, written from the R4 specification's element tables (4.0.1).
VALID: list[dict[str, Any]] = [
    {
        "resourceType": "MedicinalProduct",
        "id": "mp1",
        "meta": {"versionId": "1", "lastUpdated": "2026-11-25T10:00:00Z"},
        "domain": {"system": "http://hl7.org/fhir/medicinal-product-domain", "code": "Human"},
        "name": [
            {
                "productName": "Equilidem 2.5 mg film-coated tablets",
                "namePart": [{"part": "Equilidem", "type": {"code": "INV"}}],
                "countryLanguage": [
                    {
                        "country": {"coding": [{"code": "EU"}]},
                        "language": {"coding": [{"code": "EN"}]},
                    }
                ],
            }
        ],
    },
    {
        "resourceType": "MedicinalProductIngredient",
        "id": "mpi1",
        "role": {
            "coding": [
                {"system": "http://ema.europa.eu/example/ingredientRole", "code": "ActiveBase"}
            ]
        },
        "specifiedSubstance": [
            {"code": {"text": "apixaban"}, "group": {"text": "2"}, "confidentiality": {"text": "x"}}
        ],
    },
    {
        "resourceType": "SubstanceProtein",
        "id": "sp1",
        "numberOfSubunits": 2,
        "subunit": [{"subunit": 1, "sequence": "MKT", "length": 3}],
    },
    {
        "resourceType": "Evidence",
        "id": "ev1",
        "status": "active",
        "name": "AspirinEvidence",
        "exposureBackground": {"reference": "EvidenceVariable/background"},
        "exposureVariant": [{"reference": "EvidenceVariable/variant"}],
        "outcome": [{"reference": "EvidenceVariable/outcome"}],
    },
    {
        "resourceType": "EvidenceVariable",
        "id": "evv1",
        "status": "draft",
        "type": "dichotomous",
        "characteristic": [{"definitionCodeableConcept": {"text": "stroke"}, "exclude": False}],
    },
]

INVALID: list[tuple[dict[str, Any], str]] = [
    ({"resourceType": "MedicinalProduct", "id": "bad1", "name": [{"productName": 7}]},
     "name[0].productName"),
    ({"resourceType": "MedicinalProduct", "id": "bad2", "name": "Equilidem"}, "name"),
    ({"resourceType": "Evidence", "id": "bad3", "status": "active"}, "exposureBackground"),
    ({"resourceType": "Evidence", "id": "bad4", "status": "active", "statistic": [],
      "exposureBackground": {"reference": "Group/g"}}, "statistic"),  # R4B's element, not R4's
    ({"resourceType": "SubstanceProtein", "id": "bad5", "numberOfSubunits": "two"},
     "numberOfSubunits"),
    ({"resourceType": "EvidenceVariable", "id": "bad6", "status": "draft",
      "characteristic": [{"definitionCodeableConcept": {"text": "x"}}],
      "contained": [{"resourceType": "Patient", "id": "p", "gender": "robot"}]},
     "contained[0].gender"),
]  # fmt: skip


def test_the_r4_only_types_are_exactly_those_the_r4b_models_lack() -> None:
    r4_types = set(r4schema.schema()["discriminator"]["mapping"])
    lacking = set()
    for name in r4_types:
        try:
            get_fhir_model_class(name)
        except (KeyError, ValueError, AttributeError):
            lacking.add(name)
    assert lacking == r4schema.R4_ONLY_TYPES
    assert r4_types == r4schema.R4_RESOURCE_TYPES
    assert r4schema.R4_RESHAPED_TYPES <= r4_types
    assert all(is_resource_type(t) for t in r4schema.R4_SCHEMA_TYPES)


@pytest.mark.parametrize("resource", VALID, ids=[r["resourceType"] for r in VALID])
def test_valid_r4_resources_pass_the_gate(resource: dict[str, Any]) -> None:
    assert validate_resource(resource).resource_type == resource["resourceType"]


@pytest.mark.parametrize(("resource", "path"), INVALID, ids=[r["id"] for r, _ in INVALID])
def test_invalid_r4_resources_are_refused_naming_the_path(
    resource: dict[str, Any], path: str
) -> None:
    with pytest.raises(InvalidResource) as info:
        validate_resource(resource)
    assert path in [i.expression for i in info.value.issues], info.value.issues


async def test_the_receiver_takes_them_and_refuses_invalid_ones_with_422(
    redis_client: aioredis.Redis,
) -> None:
    async def no_hapi(resource_type: str, resource_id: str) -> None:
        return None

    app = create_app(
        Settings(redis_url=TEST_REDIS_URL, receiver_tokens=(TOKEN,)), latest_version=no_hapi
    )
    store = SpeedStore(redis_client)
    async with running(app) as client:
        for resource in VALID:
            raw = json.dumps(resource).encode()
            url = f"/fhir/{resource['resourceType']}/{resource['id']}"
            response = await client.put(url, content=raw, headers=HEADERS)
            assert response.status_code == 204, response.text
            entry = await store.get(resource["resourceType"], resource["id"])
            assert entry is not None and entry.body == raw
        resource, path = INVALID[0]
        response = await client.put(
            f"/fhir/MedicinalProduct/{resource['id']}", json=resource, headers=HEADERS
        )
        assert response.status_code == 422
        assert path in [e for i in response.json()["issue"] for e in i.get("expression", [])]
        assert await store.get("MedicinalProduct", resource["id"]) is None


async def test_the_poller_takes_them_too(redis_client: aioredis.Redis) -> None:
    from subscriptions.poller import poll_once
    from subscriptions.standin.hapi import StandInHapi
    from subscriptions.standin.run import serve_standin

    hapi = StandInHapi()
    try:
        async with serve_standin(hapi) as base:
            for resource in VALID:
                await hapi.update({k: v for k, v in resource.items() if k != "meta"})
            from subscriptions.fhir_client import FhirClient

            settings = Settings(redis_url=TEST_REDIS_URL, missed_grace_seconds=0)
            async with FhirClient(base) as client:
                result = await poll_once(settings, SpeedStore(redis_client), client)
            assert result.rejected == 0 and result.written == len(VALID)
    finally:
        await hapi.aclose()


def test_the_schema_is_loaded_only_for_those_types() -> None:
    """The receiver's usual path never reads the 3.3 MB schema."""
    import subprocess
    import sys

    code = (
        "from core.validation import validate_resource; from core import r4schema;"
        "validate_resource({'resourceType': 'Patient', 'id': 'p', 'gender': 'male'});"
        "assert r4schema.schema.cache_info().currsize == 0; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


# Types the R4B models know that R4 does not have (R4B's own additions).
R4B_ONLY = ["Citation", "SubscriptionTopic", "NutritionProduct", "MedicinalProductDefinition",
            "Ingredient", "SubscriptionStatus"]  # fmt: skip


@pytest.mark.parametrize("name", R4B_ONLY)
def test_r4b_only_types_are_no_r4_types(name: str) -> None:
    get_fhir_model_class(name)  # the models know it: the gate must not ask them
    assert name not in r4schema.schema()["discriminator"]["mapping"]
    assert not is_resource_type(name)
    with pytest.raises(InvalidRequest, match="unknown resource type"):
        validate_resource({"resourceType": name, "id": "x1", "status": "draft"})
    contained = {"resourceType": "Patient", "id": "p1", "contained": [{"resourceType": name}]}
    with pytest.raises(InvalidResource) as info:
        validate_resource(contained)
    assert "contained[0].resourceType" in [i.expression for i in info.value.issues]


# FHIR JSON rules neither the R4B models nor R4's JSON schema express: (element, path).
JSON_RULES = [
    ({"extension": [{"valueString": "no url"}]}, "extension[0].url"),
    ({"extension": [{"url": "u", "valueString": "a", "valueBoolean": True}]}, "extension[0]"),
    ({"extension": [{"url": "u"}]}, "extension[0]"),
    ({"extension": [{"url": "u", "valueString": "a", "extension": [{"url": "v",
      "valueString": "b"}]}]}, "extension[0]"),
    ({"extension": []}, "extension"),
    ({"extension": [{}]}, "extension[0]"),
    ({"language": None}, "language"),
    ({"identifier": [{"value": "x"}, None]}, "identifier[1]"),
    ({"_language": {"extension": [{"valueCode": "x"}]}}, "_language.extension[0].url"),
]  # fmt: skip


@pytest.mark.parametrize("gate", ["Patient", "MedicinalProduct"])
@pytest.mark.parametrize(("elements", "path"), JSON_RULES, ids=[p for _, p in JSON_RULES])
def test_both_paths_of_the_gate_apply_fhirs_json_rules(
    gate: str, elements: dict[str, Any], path: str
) -> None:
    """Patient goes through the R4B models, MedicinalProduct through R4's JSON schema: one
    defect, one answer."""
    resource = {"resourceType": gate, "id": "j1", **elements}
    with pytest.raises(InvalidResource) as info:
        validate_resource(resource)
    assert path in [i.expression for i in info.value.issues], info.value.issues


def test_a_null_beside_its_extension_is_fhir() -> None:
    ext = {"extension": [{"url": "http://example.org/x", "valueCode": "masked"}]}
    required = {"Patient": {}, "MedicinalProduct": {"name": [{"productName": "n"}]}}
    for gate, elements in required.items():
        resource = {"resourceType": gate, "id": "j2", "language": "en", "_language": ext}
        validate_resource({**resource, **elements})
    patient = {"resourceType": "Patient", "id": "j3",
               "name": [{"given": ["A", None, "C"], "_given": [None, ext, None]}]}  # fmt: skip
    validate_resource(patient)
    with pytest.raises(InvalidResource) as info:
        validate_resource({**patient, "name": [{"given": ["A", None]}]})
    assert "name[0].given[1]" in [i.expression for i in info.value.issues]
