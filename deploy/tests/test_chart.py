"""deploy/helm/strata and deploy/k8s: the chart lints and renders with Helm's
own engine, every object validates against the Kubernetes (and Prometheus
Operator CRD) schemas, the DaemonSet is what the issue asks for, its
memory matches the configured tiers, and the ConfigMap holds a config the
real stratad accepts and runs on."""

from __future__ import annotations

import copy
import math
import re
import subprocess
import tomllib

import pytest
import yaml

import k8s
import render
from conftest import REPO
from strata import Client
from strata.testing import Daemon, stratad_binary

MiB = 1 << 20

# Value sets the chart must render correctly; the plain manifests' set too.
SCENARIOS = {
    "defaults": {},
    "plain": render.PLAIN_VALUES,
    # SparF's key sketches: the abstract region (and the pod's memory) grows.
    "sketch": {"config": {"compute": {"key_sketch": True}}},
    # 8-token leaves: the abstracts are an eighth of the tiers.
    "leaves": {"config": {"compute": {"leaf_tokens": 8, "leaf_level": "adaptive"}}},
    "dram-only": {
        "tiers": {"dram": "4GiB", "nvme": "0"},
        "config": {"compute": {"abstracts": False}, "server": {"shm_allowed_uids": ["1000", "0"]}},
        "host": {"prepare": {"enabled": False}},
        "resources": {"cpu": {"request": "500m", "limit": "4"}},
        "serviceMonitor": {"enabled": False},
    },
    "big-node": {
        "tiers": {"dram": "256GiB", "nvme": "3500GB"},
        "config": {"compute": {"abstracts_bytes": "64GiB"}, "store": {"max_blocks": 67108864},
                   "tiers": {"nvme": {"write_through": True, "high_watermark": 0.85}},
                   "server": {"drain_timeout_ms": 60000}},
        # Helm merges maps with the defaults; null removes a default key.
        "nodeSelector": {"nvidia.com/gpu.present": None, "node.kubernetes.io/instance-type": "p5.48xlarge"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "inference",
                         "effect": "NoSchedule"}],
        "priorityClassName": "system-node-critical",
        "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
        "serviceMonitor": {"enabled": False},
    },
    # TCP on the pod network with mutual TLS, engines' uids mapped to
    # tenants with quotas; certificates from a Secret.
    "auth": {
        "authSecret": "strata-auth",
        "config": {
            "server": {"listen": "0.0.0.0:7470"},
            "auth": {"tcp": "mtls", "uds": "peercred", "tls_cert": "/etc/strata/auth/tls.crt",
                     "tls_key": "/etc/strata/auth/tls.key", "tls_client_ca": "/etc/strata/auth/ca.crt"},
            "tenants": [{"name": "team-a", "uids": [1000], "tls_names": ["team-a.engines"],
                         "zero_copy": True, "dram_bytes": "8GiB", "nvme_bytes": "100GiB"},
                        {"name": "ops", "tls_names": ["ops.strata"], "admin": True}],
        },
    },
}


@pytest.fixture(scope="module")
def renders():
    return {name: render.render(values) for name, values in SCENARIOS.items()}


def only(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def stratad_toml(objs: list[dict]) -> str:
    return only(objs, "ConfigMap")["data"]["stratad.toml"]


def size(s) -> int:
    """A stratad size in bytes (the daemon's ByteSize rules, written again
    here so the chart's template arithmetic is checked by other code)."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"([0-9_]+) *([A-Za-z]*)", s.strip())
    assert m, s
    units = {"": 1, "B": 1, "KiB": 1 << 10, "K": 1 << 10, "k": 1 << 10, "MiB": 1 << 20, "M": 1 << 20,
             "GiB": 1 << 30, "G": 1 << 30, "TiB": 1 << 40, "T": 1 << 40, "KB": 10**3, "kB": 10**3,
             "MB": 10**6, "GB": 10**9, "TB": 10**12}
    return int(m.group(1).replace("_", "")) * units[m.group(2)]


def abstracts_bytes(cfg: dict) -> int:
    if not cfg["compute"]["abstracts"]:
        return 0
    dram, nvme = size(cfg["tiers"]["dram"]["bytes"]), size(cfg["tiers"]["nvme"]["bytes"])
    # The daemon's attend::default_region_bytes: 1/leaf_tokens of the tiers
    # (a whole block counts as 16 tokens), and with key sketches five
    # sixteenths more (sketch codes and V sums beside the abstracts).
    per = cfg["compute"].get("leaf_tokens") or 16
    sketch = (dram + nvme) // 16 * 5 if cfg["compute"].get("key_sketch") else 0
    return size(cfg["compute"]["abstracts_bytes"]) or max((dram + nvme) // per + sketch, MiB)


def sketch_runs_bytes(cfg: dict) -> int:
    # The daemon's config.rs: with key sketches and runs, sketch_runs_bytes
    # or an eighth of the DRAM tier.
    c = cfg["compute"]
    if not (c.get("key_sketch") and c.get("sketch_runs", True)):
        return 0
    return size(c.get("sketch_runs_bytes", "0")) or max(size(cfg["tiers"]["dram"]["bytes"]) // 8, MiB)


def expected_memory_mib(cfg: dict, overhead: str) -> int:
    dram, nvme = size(cfg["tiers"]["dram"]["bytes"]), size(cfg["tiers"]["nvme"]["bytes"])
    total = (dram + abstracts_bytes(cfg) + sketch_runs_bytes(cfg)
             + size(cfg["compute"].get("quant_bytes", "0"))
             + cfg["store"]["max_blocks"] * 128
             + cfg["store"]["event_buffer"] * 96
             + (cfg["tiers"]["nvme"]["io_buffers"] * size(cfg["tiers"]["nvme"]["io_buffer_bytes"]) if nvme else 0)
             + size(cfg["server"]["max_inflight_put_bytes"])
             + size(overhead))
    return math.ceil(total / MiB)


def chart_values() -> dict:
    return yaml.safe_load((render.CHART / "values.yaml").read_text())


# Helm ------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_is_clean(scenario):
    import helm_python as helm

    report = helm.lint(str(render.CHART), SCENARIOS[scenario] or None, strict=True,
                       namespace="strata", kube_version="v1.29.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_a_bad_size_fails_the_render_naming_it():
    # config: is free-form (stratad checks it); the memory computation
    # parses the sizes it reads and names one it cannot.
    import helm_python as helm

    with pytest.raises(helm.HelmError, match=r'"1 gig" is not a stratad size'):
        render.render({"config": {"server": {"max_inflight_put_bytes": "1 gig"}}})


@pytest.mark.parametrize("values,error", [
    ({"tier": {"dram": "1GiB"}}, "additional properties 'tier' not allowed"),
    ({"tiers": {"nvme": "1 TB of flash"}}, "/tiers/nvme"),
    ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser"),
    ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
    ({"host": {"socketDir": "run/strata"}}, "/host/socketDir"),
    ({"authSecret": "Not_A_Name"}, "/authSecret"),
])
def test_values_schema_refuses_mistakes(values, error):
    # values.schema.json, enforced by Helm itself on every render.
    import helm_python as helm

    with pytest.raises(helm.HelmError) as e:
        render.render(values)
    assert error in str(e.value), e.value


def test_plain_manifests_match_the_chart():
    want = render.plain_files()
    on_disk = {p.relative_to(render.K8S).as_posix() for p in render.K8S.rglob("*") if p.is_file()}
    assert on_disk == set(want), "deploy/k8s holds files the chart does not render"
    for rel, text in want.items():
        assert (render.K8S / rel).read_text() == text, \
            f"deploy/k8s/{rel} is stale: run target/py/bin/python deploy/tests/render.py"


# Schemas ---------------------------------------------------------------------

@pytest.mark.parametrize("version", k8s.VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_object_validates(renders, scenario, version):
    objs = render.objects(renders[scenario])
    kinds = sorted(o["kind"] for o in objs)
    assert {"ConfigMap", "DaemonSet", "Service"} <= set(kinds), kinds
    for o in objs:
        k8s.validate(o, version)


def test_the_monitors_are_validated_too(renders):
    kinds = {o["kind"] for o in render.objects(renders["plain"])}
    assert {"ServiceMonitor", "PodMonitor", "Namespace"} <= kinds


def _containers(o):
    return o["spec"]["template"]["spec"]["containers"]


BREAKAGES = [
    # (kind, what, mutation): each must be refused.
    ("DaemonSet", "a port as a string",
     lambda o: _containers(o)[0]["ports"][0].__setitem__("containerPort", "metrics")),
    ("DaemonSet", "an unknown field in a probe",
     lambda o: _containers(o)[0]["readinessProbe"]["httpGet"].__setitem__("paht", "/readyz")),
    ("DaemonSet", "a container without a name",
     lambda o: _containers(o)[0].pop("name")),
    ("DaemonSet", "maxUnavailable as a list",
     lambda o: o["spec"]["updateStrategy"]["rollingUpdate"].__setitem__("maxUnavailable", [1])),
    ("DaemonSet", "hostPath without a path",
     lambda o: o["spec"]["template"]["spec"]["volumes"][1]["hostPath"].pop("path")),
    ("Service", "a port number as a string",
     lambda o: o["spec"]["ports"][0].__setitem__("port", "7471")),
    ("ConfigMap", "data that is not a string",
     lambda o: o["data"].__setitem__("stratad.toml", {"data_dir": "/x"})),
    ("ServiceMonitor", "interval as a number",
     lambda o: o["spec"]["endpoints"][0].__setitem__("interval", 15)),
    ("ServiceMonitor", "an unknown field in a relabeling",
     lambda o: o["spec"]["endpoints"][0]["relabelings"][0].__setitem__("sourceLabel", ["x"])),
    ("ServiceMonitor", "a bad duration",
     lambda o: o["spec"]["endpoints"][0].__setitem__("scrapeTimeout", "ten seconds")),
    ("PodMonitor", "endpoints under the ServiceMonitor's name",
     lambda o: o["spec"].__setitem__("endpoints", o["spec"].pop("podMetricsEndpoints"))),
    ("PodMonitor", "a scheme out of its enum",
     lambda o: o["spec"]["podMetricsEndpoints"][0].__setitem__("scheme", "gopher")),
]


@pytest.mark.parametrize("kind,what,mutate", BREAKAGES, ids=[f"{k}: {w}" for k, w, _ in BREAKAGES])
def test_a_broken_manifest_fails_validation(renders, kind, what, mutate):
    good = only(render.objects(renders["plain"]), kind)
    k8s.validate(good, k8s.VERSIONS[0])
    bad = copy.deepcopy(good)
    mutate(bad)
    with pytest.raises(k8s.Invalid) as e:
        k8s.validate(bad, k8s.VERSIONS[0])
    print(f"{what}: {e.value}")


# The DaemonSet ---------------------------------------------------------------

def test_daemonset_shape(renders):
    objs = render.objects(renders["defaults"])
    values = chart_values()
    cfg = tomllib.loads(stratad_toml(objs))
    ds = only(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}

    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    # The NVMe data directory and the socket directory are the node's.
    assert vols["data"]["hostPath"] == {"path": "/var/lib/strata", "type": "DirectoryOrCreate"}
    assert vols["sockets"]["hostPath"] == {"path": "/run/strata", "type": "DirectoryOrCreate"}
    assert mounts["data"] == cfg["data_dir"] == "/var/lib/strata"
    assert mounts["sockets"] == "/run/strata" and cfg["server"]["uds"] == "/run/strata/stratad.sock"
    assert "dir" not in cfg["tiers"]["nvme"], "segments go to <data_dir>/nvme, on the hostPath"
    # /dev/shm is a sized, memory-backed emptyDir.
    assert vols["dev-shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Mi"}
    assert mounts["dev-shm"] == "/dev/shm"
    # The config is the ConfigMap, at the path the container is told.
    assert vols["config"]["configMap"]["name"] == only(objs, "ConfigMap")["metadata"]["name"]
    assert c["args"] == ["--config", f"{mounts['config']}/stratad.toml"]
    # Probes on the metrics port, which is where the config serves HTTP.
    (port,) = c["ports"]
    assert port["name"] == "metrics"
    assert cfg["server"]["metrics_listen"] == f"0.0.0.0:{port['containerPort']}"
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # GPU nodes.
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # Not root; the uid the image declares.
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    dockerfile_user = re.findall(r"^USER (\d+)", (REPO / "deploy" / "Dockerfile").read_text(), re.M)
    assert dockerfile_user == [str(sc["runAsUser"])]
    # The init container hands the host directories to that uid.
    (init,) = pod["initContainers"]
    assert f"chown -R {sc['runAsUser']}:{sc['runAsGroup']} /var/lib/strata" in init["command"][-1]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    # The drain fits in the grace period (daemon/config/default.toml says
    # how long it may take).
    assert pod["terminationGracePeriodSeconds"] * 1000 > 2 * cfg["server"]["drain_timeout_ms"] \
        + cfg["tiers"]["nvme"]["drain_write_down_timeout_ms"]
    assert pod["terminationGracePeriodSeconds"] == 2 * 10 + 60 + 15
    assert c["image"] == f"{values['image']['repository']}:{yaml.safe_load((render.CHART / 'Chart.yaml').read_text())['appVersion']}"


def test_the_auth_secret_is_mounted_where_the_config_points(renders):
    objs = render.objects(renders["auth"])
    pod = only(objs, "DaemonSet")["spec"]["template"]["spec"]
    mount = [m for m in _containers(only(objs, "DaemonSet"))[0]["volumeMounts"] if m["name"] == "auth"]
    assert mount == [{"name": "auth", "mountPath": "/etc/strata/auth", "readOnly": True}]
    vol = [v for v in pod["volumes"] if v["name"] == "auth"]
    assert vol[0]["secret"]["secretName"] == "strata-auth"
    cfg = tomllib.loads(stratad_toml(objs))
    for k in ("tls_cert", "tls_key", "tls_client_ca"):
        assert cfg["auth"][k].startswith(mount[0]["mountPath"] + "/")
    assert cfg["tenants"][0]["dram_bytes"] == "8GiB"
    # Without a Secret, no volume.
    objs = render.objects(renders["defaults"])
    assert not [v for v in only(objs, "DaemonSet")["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth"]


def test_scenario_knobs_reach_the_pod(renders):
    objs = render.objects(renders["big-node"])
    pod = only(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["priorityClassName"] == "system-node-critical"
    # 2 x 60 s of drain + 60 s of write-down (the default) + 15 s.
    assert pod["terminationGracePeriodSeconds"] == 195
    pm = only(objs, "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus"
    assert not [o for o in objs if o["kind"] == "ServiceMonitor"]
    objs = render.objects(renders["dram-only"])
    pod = only(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    # No NVMe tier: no write-down in the drain.
    assert pod["terminationGracePeriodSeconds"] == 2 * 10 + 15
    assert pod["containers"][0]["resources"]["limits"]["cpu"] == "4"
    assert not [o for o in objs if o["kind"] in ("ServiceMonitor", "PodMonitor")]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_memory_follows_the_configured_tiers(renders, scenario):
    objs = render.objects(renders[scenario])
    cfg = tomllib.loads(stratad_toml(objs))
    res = _containers(only(objs, "DaemonSet"))[0]["resources"]
    overhead = chart_values()["resources"]["memoryOverhead"]
    want = f"{expected_memory_mib(cfg, overhead)}Mi"
    assert res["requests"]["memory"] == res["limits"]["memory"] == want
    # At least the DRAM tier plus the abstract region.
    assert size(cfg["tiers"]["dram"]["bytes"]) + abstracts_bytes(cfg) < int(want[:-2]) * MiB


def test_memory_override_and_a_bigger_tier():
    base = render.objects(render.render({}))
    bigger = render.objects(render.render({"tiers": {"dram": "32GiB"}}))
    mem = lambda objs: int(_containers(only(objs, "DaemonSet"))[0]["resources"]["limits"]["memory"][:-2])
    # 16 GiB more DRAM: 16 GiB more memory, plus a sixteenth of it for abstracts.
    assert mem(bigger) - mem(base) == 16 * 1024 + 1024
    fixed = render.objects(render.render({"resources": {"memory": "100Gi"}}))
    res = _containers(only(fixed, "DaemonSet"))[0]["resources"]
    assert res["requests"]["memory"] == res["limits"]["memory"] == "100Gi"


def test_monitors_select_the_daemon(renders):
    objs = render.objects(renders["plain"])
    ds, svc = only(objs, "DaemonSet"), only(objs, "Service")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    sm, pm = only(objs, "ServiceMonitor"), only(objs, "PodMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == _containers(ds)[0]["ports"][0]["name"]
    for m in (sm, pm):
        assert m["spec"]["namespaceSelector"]["matchNames"] == [ds["metadata"]["namespace"]]


def test_a_config_change_rolls_the_pods():
    a = only(render.objects(render.render({})), "DaemonSet")
    b = only(render.objects(render.render({"config": {"log": {"level": "debug"}}})), "DaemonSet")
    key = "checksum/config"
    assert a["spec"]["template"]["metadata"]["annotations"][key] != \
        b["spec"]["template"]["metadata"]["annotations"][key]


# The config stratad gets -------------------------------------------------------

def test_values_repeat_the_daemon_defaults():
    # The memory computation reads these from values.yaml; they must be the
    # daemon's own defaults (daemon/config/default.toml).
    default = tomllib.loads((REPO / "daemon" / "config" / "default.toml").read_text())

    def walk(v, d, path):
        for k, x in v.items():
            assert k in d, f"config.{path}{k} is not a stratad config field"
            if isinstance(x, dict):
                walk(x, d[k], f"{path}{k}.")
            elif k != "listen":  # the chart keeps TCP inside the pod on purpose
                same = size(x) == size(d[k]) if k.endswith("bytes") else x == d[k]
                assert same, f"config.{path}{k}: values.yaml {x!r}, stratad {d[k]!r}"

    walk(chart_values()["config"], default, "")


def test_config_is_written_as_toml_that_reads_back_the_same():
    # The chart's TOML writer (templates/_helpers.tpl) on every shape a
    # config field can take, under a key stratad would refuse (not run).
    odd = {
        "text": 'quotes " and \\ backslash, tab\t, newline\n, é, <html>',
        "whole": 16777216, "fraction": 0.05, "negative": -3, "yes": True, "no": False,
        "list": ["a", "b"], "numbers": [1, 2.5], "empty": [],
        "tenants": [{"name": "a", "quota": {"dram": "1GiB"}, "uids": [1000]}],
        "nested": {"deeper": {"k": "v"}, "dotted.key": {"a b": 1}},
    }
    objs = render.objects(render.render({"config": {"zz_test": odd}}))
    assert tomllib.loads(stratad_toml(objs))["zz_test"] == odd


def check_config(toml: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "stratad.toml"
    path.write_text(toml)
    return subprocess.run([str(stratad_binary()), "--config", str(path), "--check-config"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_stratad_accepts_the_rendered_config(renders, scenario, tmp_path):
    r = check_config(stratad_toml(render.objects(renders[scenario])), tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "config ok", r.stderr


@pytest.mark.parametrize("values,error", [
    ({"config": {"store": {"max_blockz": 10}}}, "max_blockz"),
    ({"config": {"tiers": {"nvme": {"engine": "spdk"}}}}, "tiers.nvme.engine"),
    ({"config": {"tiers": {"dram": {"high_watermark": 0.5, "low_watermark": 0.9}}}}, "watermark"),
    # TCP on the pod network without authentication.
    ({"config": {"server": {"listen": "0.0.0.0:7470"}}}, "auth.tcp"),
    ({"config": {"auth": {"tcp": "mtls"}}}, "auth.tls_client_ca"),
])
def test_stratad_refuses_a_bad_rendered_config(tmp_path, values, error):
    r = check_config(stratad_toml(render.objects(render.render(values))), tmp_path)
    assert r.returncode != 0 and error in r.stderr, r.stderr


def test_stratad_runs_on_the_rendered_config(renders, tmp_path):
    # The defaults' ConfigMap as it is, with the node paths and sizes
    # moved to this machine by flags (which override the file).
    objs = render.objects(renders["defaults"])
    toml = stratad_toml(objs)
    cfg = tomllib.loads(toml)
    with Daemon(dram="64MiB", nvme="256MiB", data_dir=str(tmp_path / "data"), config=toml) as d:
        status, body = d.readyz()
        assert status == 200, body
        with Client(d.unix_endpoint) as c:
            assert c.stats() is not None
        metrics = d.metrics()
    # The daemon's own sizes are the ones the memory computation assumed.
    cfg["tiers"]["dram"]["bytes"], cfg["tiers"]["nvme"]["bytes"] = "64MiB", "256MiB"
    got = {m.group(1): int(float(m.group(2))) for m in re.finditer(
        r'^(strata_attend_abstract_capacity_bytes|strata_tier_capacity_bytes\{tier="(?:dram|nvme)"\}) (\S+)$',
        metrics, re.M)}
    assert got == {
        "strata_attend_abstract_capacity_bytes": abstracts_bytes(cfg),
        'strata_tier_capacity_bytes{tier="dram"}': 64 * MiB,
        'strata_tier_capacity_bytes{tier="nvme"}': 256 * MiB,
    }
