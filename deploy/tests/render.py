#!/usr/bin/env python3
"""Renders the Helm chart (deploy/helm/strata) with Helm's own engine and
writes the plain manifests in deploy/k8s from it.

    target/py/bin/python deploy/tests/render.py          # rewrite deploy/k8s
    target/py/bin/python deploy/tests/render.py --check  # exit 1 if stale

Helm comes from PyPI (helm-python-sdk: Helm v4's Go SDK behind a C ABI),
because no helm binary is packaged where our machines can install from.
`Chart.render` is the engine `helm template` runs (client-only, no
cluster). deploy/tests/test_chart.py renders through here too and fails
when deploy/k8s is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "strata"
K8S = REPO / "deploy" / "k8s"

RELEASE = "strata"
NAMESPACE = "strata"
# The plain manifests: the chart's defaults, the Namespace included, and
# both monitors (each in its own file under monitoring/: apply one).
PLAIN_VALUES = {"namespace": {"create": True}, "podMonitor": {"enabled": True}}
# Which rendered template goes to which file, in apply order.
PLAIN_FILES = {
    "strata.yaml": ["namespace.yaml", "configmap.yaml", "service.yaml", "daemonset.yaml"],
    "monitoring/servicemonitor.yaml": ["servicemonitor.yaml"],
    "monitoring/podmonitor.yaml": ["podmonitor.yaml"],
}
HEADER = (
    "# Generated from the Helm chart deploy/helm/strata (release {rel}, namespace {ns},\n"
    "# default values, plus the Namespace and both monitors) by deploy/tests/render.py.\n"
    "# Edit the chart and rerun it; deploy/tests fails when they disagree.\n"
)


def render(values: dict | None = None, *, release: str = RELEASE,
           namespace: str = NAMESPACE) -> dict[str, str]:
    """Template file name (e.g. "daemonset.yaml") -> rendered text; helpers
    and templates that render to nothing are left out."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=release, namespace=namespace, is_install=True)
    prefix = f"{chart_name()}/templates/"
    docs = {}
    for path, text in out.items():
        assert path.startswith(prefix), path
        name = path[len(prefix):]
        if name.endswith(".yaml") and text.strip():
            docs[name] = text
    return docs


def chart_name() -> str:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())["name"]


def objects(rendered: dict[str, str]) -> list[dict]:
    """Every Kubernetes object in a render, parsed."""
    found = []
    for name in sorted(rendered):
        for doc in yaml.safe_load_all(rendered[name]):
            if doc:
                found.append(doc)
    return found


def plain_files() -> dict[str, str]:
    """deploy/k8s file (relative) -> the text it must hold."""
    rendered = render(PLAIN_VALUES)
    unused = set(rendered) - {t for ts in PLAIN_FILES.values() for t in ts}
    if unused:
        raise SystemExit(f"templates not placed in deploy/k8s: {sorted(unused)} (see PLAIN_FILES)")
    files = {}
    for file, templates in PLAIN_FILES.items():
        parts = [HEADER.format(rel=RELEASE, ns=NAMESPACE)]
        for t in templates:
            parts.append(f"---\n# Source: {chart_name()}/templates/{t}\n{rendered[t].strip()}\n")
        files[file] = "".join(parts)
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale files")
    args = ap.parse_args()
    stale = []
    for rel, text in plain_files().items():
        path = K8S / rel
        if path.exists() and path.read_text() == text:
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote deploy/k8s/{rel}")
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run deploy/tests/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
