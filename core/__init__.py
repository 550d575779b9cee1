"""What every part shares: settings, errors, auth, metrics, FHIR value rules, the speed layer
store, the validation gate, serving an app."""
