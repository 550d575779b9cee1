"""The two SQL-on-FHIR engines over the one ViewDefinition model: Python (`python.py`) and
PostgreSQL (`postgres.py`), and the official suite's runner (`conformance.py`)."""
