"""deploy/prometheus: the rules pass promtool (check and unit tests), and a
real Prometheus scraping real daemons gets stratad's families, labels and
histograms, evaluates the recording rules to the values the traffic
caused, and fires the checksum alert on a real checksum failure."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import yaml

from conftest import REPO, RULES, metric_types, parse_metrics, value
from promserver import promtool

RULES_TEST = REPO / "deploy" / "prometheus" / "rules_test.yml"


def rules_doc() -> dict:
    return yaml.safe_load(RULES.read_text())


def all_rules() -> list[dict]:
    return [r for g in rules_doc()["groups"] for r in g["rules"]]


# promtool -----------------------------------------------------------------

def test_promtool_check_rules_passes():
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in r.stdout


@pytest.mark.parametrize("breakage", [
    ("rate(strata_store_lookup_keys_total[5m])", "rate(strata_store_lookup_keys_total[5m)"),
    ("record: strata:tier_fullness:ratio", "record: strata tier fullness"),
    ("for: 30m", "for: thirty minutes"),
])
def test_promtool_check_rules_fails_on_a_broken_copy(tmp_path, breakage):
    old, new = breakage
    text = RULES.read_text()
    assert old in text
    broken = tmp_path / "rules.yml"
    broken.write_text(text.replace(old, new, 1))
    r = promtool("check", "rules", str(broken))
    assert r.returncode != 0, f"promtool accepted {new!r}:\n{r.stdout}"


def test_promtool_unit_tests_pass():
    r = promtool("test", "rules", str(RULES_TEST))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path):
    # The same unit tests against rules whose fencing alert looks at the
    # wrong value must fail: the tests exercise the alert logic.
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    text = RULES.read_text()
    assert "expr: strata_tier_fenced == 1" in text
    (tmp_path / "rules.yml").write_text(text.replace("strata_tier_fenced == 1", "strata_tier_fenced == 0"))
    r = promtool("test", "rules", str(tmp_path / "rules_test.yml"))
    assert r.returncode != 0 and "StrataTierFenced" in r.stdout + r.stderr, r.stdout + r.stderr


def test_every_alert_has_a_unit_test():
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    alerts = {r["alert"] for r in all_rules() if "alert" in r}
    assert alerts - tested == set(), "alerts without a promtool unit test"


# A real Prometheus scraping real daemons ------------------------------------

def referenced_series(expr: str) -> set[str]:
    """Metric names (strata_*) an expression reads."""
    return set(re.findall(r"\b(strata_[a-z0-9_]+)", expr))


def test_rules_read_only_series_stratad_exports(scraped):
    exported = {name for name, _ in parse_metrics(scraped.final["a"])}
    for r in all_rules():
        missing = referenced_series(r["expr"]) - exported
        assert not missing, f"{r.get('record') or r.get('alert')} reads {missing}, not in /metrics"


def test_targets_are_up(scraped):
    targets = scraped.prom.api("targets")["activeTargets"]
    assert sorted(t["labels"]["instance"] for t in targets) == sorted(
        [scraped.instance(scraped.a), scraped.instance(scraped.b)])
    for t in targets:
        assert t["health"] == "up", t
        assert t["lastError"] == "", t


def test_every_family_arrives_with_its_type(scraped):
    prom = scraped.prom
    types = metric_types(scraped.final["a"])
    assert len(types) >= 40, f"only {len(types)} families in /metrics"
    names = set(prom.api("label/__name__/values"))
    metadata = prom.api("metadata")
    for family, kind in types.items():
        series = family + ("_bucket" if kind == "histogram" else "")
        assert series in names, f"{series} not in Prometheus"
        assert family in metadata, f"no metadata for {family}"
        assert {m["type"] for m in metadata[family]} == {kind}, (family, metadata[family])
        if family.endswith("_total"):
            assert kind == "counter", family
        if kind == "histogram":
            assert family.endswith("_seconds"), family


def test_labels_come_through(scraped):
    prom, a = scraped.prom, scraped.instance(scraped.a)
    tiers = {r["metric"]["tier"] for r in prom.query(f'strata_tier_capacity_bytes{{instance="{a}"}}')}
    assert {"dram", "nvme"} <= tiers
    methods = {r["metric"]["method"] for r in prom.query(
        f'strata_server_requests_total{{instance="{a}",outcome="ok"}} > 0')}
    assert {"RegisterLayout", "Put", "Lookup", "Get"} <= methods
    want = {"stored": scraped.stored, "already_present": scraped.already_present, "rejected": 0}

    def puts():
        got = {r["metric"]["result"]: float(r["value"][1])
               for r in prom.query(f'strata_store_puts_total{{instance="{a}"}}')}
        return got if got == want else None

    prom.wait_for(f"strata_store_puts_total by result = {want}", puts)
    reasons = {r["metric"]["reason"] for r in prom.query(f'strata_store_lookup_misses_total{{instance="{a}"}}')}
    assert reasons == {"absent", "checksum"}


def test_histogram_buckets_come_through(scraped):
    prom, a = scraped.prom, scraped.instance(scraped.a)
    samples = parse_metrics(scraped.final["a"])
    bounds = sorted({dict(ls)["le"] for (n, ls), _ in samples.items()
                     if n == "strata_server_request_duration_seconds_bucket"}, key=float)
    assert bounds[-1] == "+Inf" and len(bounds) > 10
    count = value(samples, "strata_server_request_duration_seconds_count", method="Put")
    assert count == 2  # two Put calls (the second one all already present)

    def put_buckets():
        got = prom.query(f'strata_server_request_duration_seconds_bucket{{instance="{a}",method="Put"}}')
        by_le = {r["metric"]["le"]: float(r["value"][1]) for r in got}
        return by_le if by_le.get("+Inf") == count else None

    by_le = prom.wait_for("the Put histogram after the traffic", put_buckets)
    assert sorted(by_le, key=float) == bounds
    cumulative = [by_le[le] for le in bounds]
    assert cumulative == sorted(cumulative), "buckets must be cumulative"
    for le in bounds:
        assert by_le[le] == value(samples, "strata_server_request_duration_seconds_bucket",
                                  method="Put", le=le)


def recorded(prom, rule: str, **labels) -> list[dict]:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return prom.query(f"{rule}{{{sel}}}")


def test_hit_ratio_rule_equals_the_hits_caused(scraped):
    prom, a = scraped.prom, scraped.instance(scraped.a)
    samples = parse_metrics(scraped.final["a"])
    # The daemon counted what the traffic did...
    assert value(samples, "strata_store_lookup_keys_total") == scraped.keys_asked
    assert value(samples, "strata_store_lookup_hits_total") == scraped.keys_hit
    assert value(samples, "strata_store_lookup_hits_total", tier="dram") == scraped.keys_hit
    expected = scraped.keys_hit / scraped.keys_asked

    # ...and the recording rule, evaluated by Prometheus, agrees.
    def ratio():
        got = recorded(prom, "strata:lookup_key_hit_ratio:rate5m", instance=a)
        return got if got and math.isclose(float(got[0]["value"][1]), expected, rel_tol=1e-9) else None

    (r,) = prom.wait_for(f"strata:lookup_key_hit_ratio:rate5m = {expected}", ratio)
    assert r["metric"]["job"] == "strata" and "tier" not in r["metric"]
    by_tier = {x["metric"]["tier"]: float(x["value"][1]) for x in recorded(
        prom, "strata:lookup_key_hit_ratio_by_tier:rate5m", instance=a)}
    assert math.isclose(by_tier["dram"], expected, rel_tol=1e-9)
    assert by_tier["nvme"] == 0


def test_fullness_rule_equals_used_over_capacity(scraped):
    prom, a = scraped.prom, scraped.instance(scraped.a)
    samples = parse_metrics(scraped.final["a"])
    used = value(samples, "strata_tier_used_bytes", tier="dram")
    cap = value(samples, "strata_tier_capacity_bytes", tier="dram")
    assert used >= 8 * LAYOUT_BLOCK and cap == 64 << 20

    def fullness():
        got = {r["metric"]["tier"]: float(r["value"][1])
               for r in recorded(prom, "strata:tier_fullness:ratio", instance=a)}
        return got if math.isclose(got.get("dram", -1), used / cap, rel_tol=1e-9) else None

    got = prom.wait_for("strata:tier_fullness:ratio for dram", fullness)
    # Tiers of capacity 0 (gpu, cxl, remote) are left out, not NaN.
    assert set(got) == {"dram", "nvme"}


LAYOUT_BLOCK = 2048


def test_latency_quantile_rules_fall_in_the_right_bucket(scraped):
    prom, a = scraped.prom, scraped.instance(scraped.a)
    samples = parse_metrics(scraped.final["a"])
    for q, rule in [(0.5, "p50"), (0.99, "p99")]:
        for method in ["Put", "Lookup", "Get"]:
            buckets = sorted(((float(dict(ls)["le"]), v) for (n, ls), v in samples.items()
                              if n == "strata_server_request_duration_seconds_bucket"
                              and dict(ls)["method"] == method))
            total = buckets[-1][1]
            # The bucket the q-th request falls in, from the daemon's counts.
            lower = 0.0
            for le, cum in buckets:
                if cum >= q * total:
                    upper = le
                    break
                lower = le

            def quantile(method=method, rule=rule, lower=lower, upper=upper):
                got = recorded(prom, f"strata:request_duration_seconds:{rule}_rate5m",
                               instance=a, method=method)
                return got if got and lower <= float(got[0]["value"][1]) <= upper else None

            prom.wait_for(f"{rule} of {method} in ({lower}, {upper}]", quantile)


def test_alerts_are_loaded_and_evaluate(scraped):
    prom = scraped.prom
    groups = prom.wait_for("rule groups evaluated", lambda: [
        g for g in prom.api("rules")["groups"]
        if all(r.get("lastEvaluation", "").startswith("20") for r in g["rules"])] or None)
    loaded = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    for rule in all_rules():
        name = rule.get("record") or rule.get("alert")
        assert name in loaded, f"{name} not loaded"
        assert loaded[name]["health"] == "ok", loaded[name]
        assert not loaded[name].get("lastError"), loaded[name]
    assert groups
    # Nothing is fenced and nothing is down: those alerts stay inactive,
    # and their expressions evaluate (to nothing).
    for name in ["StrataTierFenced", "StrataDown", "StrataServerErrors", "StrataNvmeIoErrors"]:
        assert loaded[name]["state"] == "inactive", loaded[name]
        assert prom.query(loaded[name]["query"]) == []
    # The fenced gauge is there for every tier of both daemons, at 0.
    fenced = prom.query('strata_tier_fenced{tier="nvme"}')
    assert len(fenced) == 2 and {r["value"][1] for r in fenced} == {"0"}


def test_a_real_checksum_failure_fires_the_alert(scraped):
    prom, b = scraped.prom, scraped.instance(scraped.b)
    samples = parse_metrics(scraped.final["b"])
    assert value(samples, "strata_store_checksum_failures_total", tier="nvme") == 1
    assert value(samples, "strata_store_lookup_misses_total", reason="checksum") == 1

    def firing():
        return [a for a in prom.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "StrataChecksumFailures" and a["state"] == "firing"]

    alerts = prom.wait_for("StrataChecksumFailures firing", firing)
    assert [(x["labels"]["instance"], x["labels"]["tier"], x["labels"]["severity"]) for x in alerts] \
        == [(b, "nvme", "warning")]
    assert "checksum" in alerts[0]["annotations"]["summary"]
    # Daemon a had no failure: no alert for it.
    assert prom.query(f'ALERTS{{alertname="StrataChecksumFailures",instance="{scraped.instance(scraped.a)}"}}') == []
