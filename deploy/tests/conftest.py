"""Fixtures of the deploy tests: real stratad processes (target/debug, or
$STRATA_BIN) scraped by a real Prometheus loaded with deploy/prometheus/rules.yml.

`scraped` (one per session) starts two daemons and a Prometheus that
scrapes both every second, waits until Prometheus holds a first sample of
every counter at zero, and only then moves them:

- daemon "a" gets puts, lookups and gets through the Python client, with
  hit and miss counts the test knows in advance;
- daemon "b" gets a checksum failure the honest way: a block written
  through to NVMe is pushed out of DRAM, one byte of it is flipped in its
  segment file on disk, and a Get reads it back.

Counters that start at zero in the first scrape make rate() exact in ratios
(no extrapolation towards the window's start), so recorded ratios can be
compared with the counts the test caused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from promserver import Prometheus
from strata import Block, Client, Layout, PutResult, Tier
from strata.keys import chain_keys
from strata.testing import Daemon, stratad_binary

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"

# 2 layers x K,V x 2 heads x 8 dims x f16 = 128 bytes a token; 16 tokens.
LAYOUT = Layout(model_id="deploy/tests", dtype="f16", num_layers=2, num_kv_heads=2,
                head_dim=8, tokens_per_block=16)

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text format -> {(name, labels): value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparsable /metrics line: {line!r}"
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric_types(text: str) -> dict[str, str]:
    """Family name -> type, from the # TYPE lines."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M)}


def value(samples: dict, name: str, **labels) -> float:
    """Sum of a family's samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@dataclass
class Scraped:
    prom: Prometheus
    a: Daemon
    b: Daemon
    # What the traffic on "a" caused, by construction.
    keys_asked: int = 0
    keys_hit: int = 0
    stored: int = 0
    already_present: int = 0
    # /metrics of each daemon once the traffic is over (the ground truth).
    final: dict = field(default_factory=dict)

    def instance(self, d: Daemon) -> str:
        return f"127.0.0.1:{d.metrics_port}"


def payload(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, LAYOUT.block_bytes, dtype=np.uint8)


def traffic_a(s: Scraped) -> None:
    with Client(s.a.endpoint) as c:
        ns = c.register_layout(LAYOUT)
        keys = chain_keys(list(range(8 * 16)), 16)
        blocks = [Block(k, payload(i), keys[i - 1] if i else None) for i, k in enumerate(keys)]
        out = c.put(ns, blocks)
        assert [o.result for o in out] == [PutResult.STORED] * 8
        s.stored += 8
        out = c.put(ns, blocks[:2])
        assert [o.result for o in out] == [PutResult.ALREADY_PRESENT] * 2
        s.already_present += 2
        # 8 of 9 keys hit; the absent one ends the run.
        r = c.lookup(ns, keys + [b"\x01" * 16])
        assert r.hits == 8 and r.tiers == [Tier.DRAM] * 8
        s.keys_asked += 9
        s.keys_hit += 8
        # A chain that was never stored: 4 keys asked, none hit.
        r = c.lookup(ns, [bytes([0xEE, i]) * 8 for i in range(4)])
        assert r.hits == 0
        s.keys_asked += 4
        got = c.get(ns, keys[:4])
        assert [g.data for g in got] == [b.data.tobytes() for b in blocks[:4]]


def corrupt_on_nvme_b(s: Scraped) -> None:
    """One checksum failure on daemon b's NVMe tier, caused by a flipped
    byte on disk (bit rot), seen by a Get that promotes the block."""
    import strata

    with Client(s.b.endpoint) as c:
        ns = c.register_layout(LAYOUT)
        target = payload(1000)
        (out,) = c.put(ns, [Block(b"target", target)])
        assert out.durable, "write_through: the put is on NVMe when acknowledged"
        # Fill DRAM (1 MiB = 256 granules) so that the target's DRAM copy
        # is evicted; its NVMe record stays.
        for i in range(0, 600, 100):
            c.put(ns, [Block(b"fill%05d" % j, payload(j)) for j in range(i, i + 100)])
        r = c.lookup(ns, [b"target"])
        assert r.hits == 1 and r.tiers == [Tier.NVME], r
        flipped = 0
        for seg in sorted((s.b.data_dir / "nvme").glob("seg-*")):
            data = seg.read_bytes()
            at = data.find(target.tobytes())
            if at >= 0:
                with open(seg, "r+b") as f:
                    f.seek(at + 1000)
                    byte = f.read(1)[0]
                    f.seek(at + 1000)
                    f.write(bytes([byte ^ 0xFF]))
                flipped += 1
        assert flipped == 1, f"target record found {flipped} times in the segments"
        with pytest.raises(strata.NotFound, match="checksum"):
            c.get(ns, [b"target"])


@pytest.fixture(scope="session")
def scraped():
    print(f"stratad: {stratad_binary()}")
    a = Daemon(dram="64MiB", nvme="256MiB")
    b = Daemon(dram="1MiB", nvme="64MiB", config="[tiers.nvme]\nwrite_through = true\n")
    prom = None
    try:
        a.start()
        b.start()
        s = Scraped(prom=None, a=a, b=b)
        prom = Prometheus([s.instance(a), s.instance(b)], [RULES]).start()
        s.prom = prom
        # Both targets scraped, counters still at zero.
        prom.wait_for("a first scrape of both daemons at zero", lambda: sorted(
            r["metric"]["instance"] for r in prom.query("strata_store_lookup_keys_total == 0")
        ) == sorted([s.instance(a), s.instance(b)]))
        traffic_a(s)
        corrupt_on_nvme_b(s)
        s.final = {"a": a.metrics(), "b": b.metrics()}
        # Prometheus has scraped both daemons since (a scrape is atomic per
        # target, so every series of a target is then past the traffic).
        prom.wait_for("a scrape after the traffic", lambda: prom.query(
            f'strata_store_lookup_keys_total{{instance="{s.instance(a)}"}} == {s.keys_asked}')
            and prom.query(f'strata_store_checksum_failures_total{{instance="{s.instance(b)}",tier="nvme"}} == 1'))
        yield s
    finally:
        if prom is not None:
            prom.close()
        a.close()
        b.close()
