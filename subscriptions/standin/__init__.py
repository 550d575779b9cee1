"""A stand-in HAPI FHIR server for the tests, benchmarks and the demo (`hapi.py`), its
subscription delivery (`delivery.py`), its HTTP face (`http.py`), serving it (`run.py`) and the
synthetic resources it is seeded with (`synthetic.py`)."""
