"""deploy/grafana/strata.json: a well-formed dashboard whose every PromQL
expression (panels and variables) runs without error against the real
Prometheus of conftest.scraped, on series stratad really exports.

No Grafana here (Debian does not package it): Grafana's own variables are
substituted the way Grafana would before sending a query."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO, parse_metrics
from promserver import PromError
from test_prometheus import all_rules

DASHBOARD = REPO / "deploy" / "grafana" / "strata.json"

# Grafana's variables, as it would expand them for a 1 h view.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
                "$job": ".*", "$instance": ".*"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(d: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    out = []
    for p in panels(d):
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"]))
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", v["query"]["query"])
            assert m, v["query"]
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def expand(expr: str) -> str:
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    assert "$" not in expr, f"unexpanded variable in {expr}"
    return expr


def test_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= names
    for p in panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("description"), f"panel {p['title']!r} says nothing about what it shows"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"]
            assert 'job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], \
                f"{p['title']}: a panel must follow the job and daemon selectors"


def test_dashboard_covers_what_operators_watch():
    text = " ".join(e for _, e in queries(dashboard()))
    for family in ["strata_store_lookup_hits_total", "strata_store_lookup_keys_total",
                   "strata_tier_used_bytes", "strata_tier_capacity_bytes", "strata_store_puts_total",
                   "strata_server_requests_total", "strata_server_request_duration_seconds_bucket",
                   "strata_store_checksum_failures_total", "strata_store_evictions_total",
                   "strata_tier_fenced"]:
        assert family in text, f"no panel on {family}"
    assert "histogram_quantile(0.99" in text and "histogram_quantile(0.5" in text


def unknown_series(expr: str, exported: set[str], recorded: set[str]) -> set[str]:
    names = set(re.findall(r"\b(strata[_:][a-zA-Z0-9_:]+)", expr))
    return {n for n in names if n not in exported and n not in recorded}


def test_dashboard_reads_only_series_that_exist(scraped):
    exported = {name for name, _ in parse_metrics(scraped.final["a"])}
    recorded = {r["record"] for r in all_rules() if "record" in r}
    for where, expr in queries(dashboard()):
        assert not unknown_series(expr, exported, recorded), f"{where}: {expr}"
    # The check sees a misspelt family.
    assert unknown_series("rate(strata_store_lookup_hit_total[1m])", exported, recorded)


def test_every_query_runs_against_prometheus(scraped):
    prom = scraped.prom
    empty = []
    for where, expr in queries(dashboard()):
        result = prom.query(expand(expr))  # raises on a query Prometheus refuses
        if not result:
            empty.append(where)
    print(f"{len(queries(dashboard()))} queries ran; empty now (no such event in the test): {empty}")


@pytest.mark.parametrize("title,refs", [
    ("Key hit ratio", "A"), ("Key hit ratio by daemon", "A"), ("Bytes used and capacity", "AB"),
    ("Latency p50 / p99", "AB"), ("Puts by result, reads", "AB"), ("Evictions", "A"),
    # Daemon b's checksum failure; no I/O errors or fencing happened.
    ("Checksum failures, I/O errors, fencing", "A"),
])
def test_key_panels_show_the_traffic(scraped, title, refs):
    prom = scraped.prom
    (p,) = [p for p in panels(dashboard()) if p["title"] == title]
    for t in p["targets"]:
        if t["refId"] not in refs:
            continue
        expr = expand(t["expr"])
        prom.wait_for(f"{title}: {expr}", lambda expr=expr: prom.query(expr))


def test_a_broken_query_is_refused(scraped):
    with pytest.raises(PromError, match="parse error"):
        scraped.prom.query(expand('sum(rate(strata_store_puts_total{job=~"$job"}[$__rate_interval])'))
