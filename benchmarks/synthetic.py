"""Synthetic batch-layer data built inside PostgreSQL (generate_series), for the benchmarks.

`load(conn, patients, conditions, observations)` inserts Patients `p<i>`, Conditions `c<i>`
and Observations `o<i>` straight into rf_batch.resources, at version `version` (a stand-in
HAPI's first version of the same id, 1, is then an update). Values are drawn with
PostgreSQL's `random()` after `setseed`, so a run is repeatable:

- Patients: a gender of four; birth dates 1930-2015, 2 % of them a year only and 2 % a
  month only (FHIR partial dates, which birthdate search reads as ranges).
- Conditions: a subject among the patients, one SNOMED-style code of 500, and a text built
  like real problem-list entries from a qualifier, a body site and a disorder (30 x 40 x 40
  = 48,000 phrases, some with a laterality or an "unspecified" suffix: the spread of
  words that a trigram index meets in practice, not five fixed strings); the display
  repeats the disorder.
- Observations: HbA1c-like values 4.0-11.0 %, LOINC 4548-4.
"""

from __future__ import annotations

from typing import Any

import psycopg

QUALIFIERS = [
    "Acute", "Chronic", "Recurrent", "Mild", "Moderate", "Severe", "Primary", "Secondary",
    "Congenital", "Acquired", "Benign", "Malignant", "Persistent", "Intermittent", "Early",
    "Late onset", "Post-operative", "Traumatic", "Idiopathic", "Allergic", "Infectious",
    "Degenerative", "Obstructive", "Inflammatory", "Hereditary", "Drug-induced", "Subacute",
    "Episodic", "Bilateral", "Localized",
]  # fmt: skip
SITES = [
    "heart", "lung", "kidney", "liver", "pancreas", "thyroid", "skin", "knee", "hip", "shoulder",
    "spine", "brain", "eye", "ear", "colon", "stomach", "bladder", "prostate", "breast", "ovary",
    "uterus", "bone marrow", "lymph node", "artery", "vein", "coronary artery", "mitral valve",
    "aortic valve", "esophagus", "gallbladder", "retina", "cornea", "sinus", "tonsil", "larynx",
    "trachea", "bronchus", "pleura", "peritoneum", "ankle",
]  # fmt: skip
DISORDERS = [
    "failure", "insufficiency", "stenosis", "infection", "inflammation", "neoplasm", "cyst",
    "ulcer", "hemorrhage", "fibrosis", "hypertrophy", "dysfunction", "obstruction", "lesion",
    "calculus", "abscess", "fracture", "dislocation", "sprain", "carcinoma", "adenoma",
    "polyp", "atrophy", "edema", "embolism", "thrombosis", "aneurysm", "degeneration",
    "dysplasia", "hyperplasia", "prolapse", "rupture", "torsion", "necrosis", "sclerosis",
    "fibrillation", "arrhythmia", "pain", "disorder", "disease",
]  # fmt: skip
SUFFIXES = ["", "", "", "", ", left", ", right", ", unspecified", " (disorder)", " NOS"]


def _array(values: list[str]) -> str:
    return "ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


LOAD_SQL = """
INSERT INTO rf_batch.resources
    (resource_type, id, version_id, version_number, last_updated, last_updated_ms, deleted,
     resource)
SELECT 'Patient', 'p' || i, %(v)s::text, %(vn)s, %(lu)s::text, %(lum)s, false,
    jsonb_build_object('resourceType', 'Patient', 'id', 'p' || i,
        'meta', jsonb_build_object('versionId', %(v)s::text, 'lastUpdated', %(lu)s::text),
        'gender', (ARRAY['male', 'female', 'other', 'unknown'])[1 + floor(random() * 4)::int],
        'birthDate', CASE WHEN r < 0.02 THEN to_char(d, 'YYYY')
                          WHEN r < 0.04 THEN to_char(d, 'YYYY-MM')
                          ELSE to_char(d, 'YYYY-MM-DD') END)
FROM (SELECT i, random() AS r,
             date '1930-01-01' + (random() * 31000)::int AS d
      FROM generate_series(0, %(patients)s - 1) AS i) AS p;
INSERT INTO rf_batch.resources
    (resource_type, id, version_id, version_number, last_updated, last_updated_ms, deleted,
     resource)
SELECT 'Condition', 'c' || i, %(v)s::text, %(vn)s, %(lu)s::text, %(lum)s, false,
    jsonb_build_object('resourceType', 'Condition', 'id', 'c' || i,
        'meta', jsonb_build_object('versionId', %(v)s::text, 'lastUpdated', %(lu)s::text),
        'subject', jsonb_build_object('reference', 'Patient/p' || s),
        'code', jsonb_build_object(
            'coding', jsonb_build_array(jsonb_build_object(
                'system', 'http://snomed.info/sct', 'code', (100000 + code)::text,
                'display', initcap(dis))),
            'text', q || ' ' || site || ' ' || dis || suffix))
FROM (SELECT i, floor(random() * %(patients)s)::int AS s, floor(random() * 500)::int AS code,
             (QUALIFIERS)[1 + floor(random() * QN)::int] AS q,
             (SITES)[1 + floor(random() * SN)::int] AS site,
             (DISORDERS)[1 + floor(random() * DN)::int] AS dis,
             (SUFFIXES)[1 + floor(random() * XN)::int] AS suffix
      FROM generate_series(0, %(conditions)s - 1) AS i) AS c;
INSERT INTO rf_batch.resources
    (resource_type, id, version_id, version_number, last_updated, last_updated_ms, deleted,
     resource)
SELECT 'Observation', 'o' || i, %(v)s::text, %(vn)s, %(lu)s::text, %(lum)s, false,
    jsonb_build_object('resourceType', 'Observation', 'id', 'o' || i,
        'meta', jsonb_build_object('versionId', %(v)s::text, 'lastUpdated', %(lu)s::text),
        'status', 'final',
        'subject', jsonb_build_object('reference', 'Patient/p' || floor(random() * %(patients)s)::int),
        'code', jsonb_build_object('coding', jsonb_build_array(jsonb_build_object(
            'system', 'http://loinc.org', 'code', '4548-4'))),
        'valueQuantity', jsonb_build_object('value', round((4 + random() * 7)::numeric, 1),
                                            'unit', '%%'))
FROM generate_series(0, %(observations)s - 1) AS i;
"""

LOAD_SQL = (
    LOAD_SQL.replace("(QUALIFIERS)", f"({_array(QUALIFIERS)})")
    .replace("(SITES)", f"({_array(SITES)})")
    .replace("(DISORDERS)", f"({_array(DISORDERS)})")
    .replace("(SUFFIXES)", f"({_array(SUFFIXES)})")
    .replace("QN", str(len(QUALIFIERS)))
    .replace("SN", str(len(SITES)))
    .replace("DN", str(len(DISORDERS)))
    .replace("XN", str(len(SUFFIXES)))
)


def load(
    conn: psycopg.Connection[Any],
    patients: int,
    conditions: int,
    observations: int,
    *,
    version: int = 1,
    last_updated: str = "2024-01-01T00:00:01Z",
    seed: float = 0.42,
) -> None:
    """Insert the synthetic resources (see the module's docstring) in the caller's transaction."""
    from core.fhir_values import parse_instant

    conn.execute("SELECT setseed(%s)", (seed,))
    params = {
        "v": str(version),
        "vn": float(version),
        "lu": last_updated,
        "lum": parse_instant(last_updated),
        "patients": patients,
        "conditions": conditions,
        "observations": observations,
    }
    with conn.cursor() as cur:
        for statement in LOAD_SQL.split(";\n"):
            if statement.strip():
                cur.execute(statement.encode(), params)
    conn.execute("ANALYZE rf_batch.resources")
