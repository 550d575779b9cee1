"""Synthetic but realistic Patients, Conditions and Observations for the demo and benchmarks."""

from __future__ import annotations

import random
from typing import Any

SNOMED = [
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195967001", "Asthma"),
    ("13645005", "Chronic obstructive lung disease"),
    ("49436004", "Atrial fibrillation"),
]
LOINC = [
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4.0, 11.0),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 60.0, 250.0),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 90.0, 190.0),
    ("29463-7", "Body weight", "kg", 40.0, 140.0),
]
_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


def patient(n: int, rnd: random.Random) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"pat-{n}",
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": f"MRN{n:08d}"}],
        "active": True,
        "name": [
            {
                "use": "official",
                "family": rnd.choice(["Smith", "Müller", "Garcia", "Nguyen", "Okafor"]),
                "given": [rnd.choice(["Anna", "Ben", "Chloé", "Dev", "Eva"])],
            }
        ],
        "telecom": [{"system": "phone", "value": f"+41 44 {n % 1000:03d} {n % 97:02d} 00"}],
        "gender": rnd.choice(["male", "female", "other", "unknown"]),
        "birthDate": f"{rnd.randint(1930, 2020)}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}",
        "address": [{"city": "Zürich", "postalCode": f"80{n % 100:02d}", "country": "CH"}],
    }


def condition(n: int, patient_n: int, rnd: random.Random) -> dict[str, Any]:
    code, display = rnd.choice(SNOMED)
    return {
        "resourceType": "Condition",
        "id": f"cond-{n}",
        "clinicalStatus": {"coding": [{"system": _CLINICAL, "code": "active"}]},
        "verificationStatus": {"coding": [{"system": _VERIFICATION, "code": "confirmed"}]},
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                        "code": "problem-list-item",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}],
            "text": display,
        },
        "subject": {"reference": f"Patient/pat-{patient_n}"},
        "onsetDateTime": f"{rnd.randint(1990, 2025)}-0{rnd.randint(1, 9)}-15",
        "recordedDate": "2025-06-01",
    }


def observation(n: int, patient_n: int, rnd: random.Random) -> dict[str, Any]:
    code, display, unit, low, high = rnd.choice(LOINC)
    return {
        "resourceType": "Observation",
        "id": f"obs-{n}",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
        "subject": {"reference": f"Patient/pat-{patient_n}"},
        "effectiveDateTime": f"2025-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}T08:30:00Z",
        "valueQuantity": {
            "value": round(rnd.uniform(low, high), 1),
            "unit": unit,
            "system": "http://unitsofmeasure.org",
            "code": unit,
        },
    }


def population(patients: int, seed: int = 1) -> list[dict[str, Any]]:
    """Patients with about two Conditions and two Observations each."""
    rnd = random.Random(seed)
    out: list[dict[str, Any]] = []
    for n in range(patients):
        out.append(patient(n, rnd))
        for k in range(rnd.randint(0, 4)):
            out.append(condition(n * 10 + k, n, rnd))
        for k in range(rnd.randint(0, 4)):
            out.append(observation(n * 10 + k, n, rnd))
    return out
