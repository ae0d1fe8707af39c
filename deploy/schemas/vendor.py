#!/usr/bin/env python3
"""Extracts the v1 OpenAPI schema of a CustomResourceDefinition into the JSON
file the manifest tests validate against (deploy/tests/k8s.py).

    deploy/schemas/vendor.py monitoring.coreos.com_servicemonitors.yaml ...

Descriptions are dropped (they are documentation, not constraints); every
type, enum, pattern, required list and x-kubernetes-* marker is kept. The
output names the CRD's group, kind and operator version it came from.
"""

import json
import sys
from pathlib import Path

import yaml


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(paths: list[str]) -> None:
    here = Path(__file__).resolve().parent
    for p in paths:
        crd = yaml.safe_load(Path(p).read_text())
        spec = crd["spec"]
        kind = spec["names"]["kind"]
        (version,) = [v for v in spec["versions"] if v["name"] == "v1"]
        out = {
            "x-strata-source": {
                "crd": crd["metadata"]["name"],
                "operator-version": crd["metadata"]["annotations"]["operator.prometheus.io/version"],
                "license": "Apache-2.0 (prometheus-operator)",
            },
            **strip(version["schema"]["openAPIV3Schema"]),
        }
        dest = here / f"{kind.lower()}-{spec['group'].split('.')[0]}-v1.json"
        dest.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print(f"{p} -> {dest.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
