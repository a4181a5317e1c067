"""Validates an exported IPS Bundle with the R4B models of fhir.resources (a third-party FHIR
library): the Bundle, and every resource in it by its own model. Checks the vital-sign
Observations carry the vital-signs category, UCUM units and an Encounter reference."""

import json
import sys

from fhir.resources.R4B.bundle import Bundle

VITAL_SIGNS = {"9279-1", "59408-5", "2708-6", "8480-6", "8867-4", "8310-5"}

with open(sys.argv[1], encoding="utf-8") as f:
    raw = json.load(f)
bundle = Bundle.model_validate(raw)
assert bundle.type == "document", bundle.type
observations = 0
for entry in bundle.entry:
    resource = entry.resource
    if resource.get_resource_type() != "Observation" or resource.encounter is None:
        continue  # results from a GP record carry no encounter
    observations += 1
    codes = {c.code for c in resource.code.coding if c.system == "http://loinc.org"}
    assert resource.encounter.reference, resource.id
    assert resource.subject is not None and resource.effectiveDateTime is not None, resource.id
    if codes & VITAL_SIGNS:
        categories = {c.code for cat in resource.category for c in cat.coding}
        assert "vital-signs" in categories, (resource.id, categories)
        q = resource.valueQuantity
        assert q is None or q.system == "http://unitsofmeasure.org", resource.id
composition = bundle.entry[0].resource
sections = {s.code.coding[0].code for s in composition.section}
assert "8716-3" in sections, sections
print(f"bundle valid; entries: {len(bundle.entry)}; vital-sign observations: {observations}")
