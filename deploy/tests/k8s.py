"""Validation of Kubernetes objects against the API's JSON schemas, offline.

Built-in kinds: the schemas kubernetes-validate ships (generated from each
release's OpenAPI), in their strict form: an unknown field is an error, as
it is for `kubectl apply` (server-side strict field validation).

Prometheus Operator kinds (ServiceMonitor, PodMonitor): the CRDs' own
openAPIV3Schema, vendored in deploy/schemas (no PyPI package ships it; see
deploy/schemas/vendor.py), made strict the same way: an object schema that
lists properties and does not preserve unknown fields gets
additionalProperties: false, which is what the API server's strict field
validation enforces for CRDs.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"

# The chart's kubeVersion floor (Chart.yaml) and the newest schemas shipped.
VERSIONS = ("1.29", kubernetes_validate.latest_version())


class Invalid(Exception):
    pass


def _strict(node):
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if (node.get("type") == "object" and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Validator:
    path = SCHEMAS / f"{kind.lower()}-monitoring-v1.json"
    schema = json.loads(path.read_text())
    schema.pop("x-strata-source", None)
    schema = _strict(schema)
    # CRD metadata is an ObjectMeta; check the parts a chart sets.
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "additionalProperties": False,
    }
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def validate(obj: dict, version: str) -> None:
    """Raises Invalid naming the object, the field path and the reason."""
    obj = copy.deepcopy(obj)
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')} (Kubernetes {version})"
    if obj.get("apiVersion") == "monitoring.coreos.com/v1":
        errors = sorted(crd_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            raise Invalid(f"{where}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
        return
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise Invalid(f"{where}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise Invalid(f"{where}: {e.message}") from None
