"""Attend on real Q/K/V: SmolLM2-135M's own keys, values and queries
(captured from tinyengine, 1,024 tokens, layers 8 and 22) stored in a real
daemon as f16 blocks, and its answers checked against float64 attention:

* DENSE over a causal prefix equals exact attention (relative L2 error of
  the output ≤ 5e-4, the compute spec's exactness target);
* SPARSE at a 20% token budget, ranked by the per-block min/max key
  abstracts the daemon keeps, captures at least 0.85x the attention mass of
  the block oracle (the same number of 16-token blocks, chosen knowing the
  exact weights: by their mass summed over the query heads), and more than
  the StreamingLLM-style choice of the same number of tokens (sink plus the
  most recent ones), which needs no abstracts at all;
* SPARF at the same budget, scoring every token from the daemon's 8-bit
  key sketches (r = d/8 channels) and attending whole blocks per KV head,
  reads K and V of only the blocks it attends and captures at least 0.85x
  the block oracle of its KV head (0.92x measured on both layers).

What was measured on this data (README, "Attend on real data"): at 5% and
10% budgets fixed 16-token abstracts fall well short on layer 8, whose
heads attend to scattered content tokens (10%: 0.55 of the mass against
0.71 for the block oracle and 0.95 for the token oracle); at 5% they do
no better than sink + recent. Those budgets are not asserted: they are the
case for smaller, adaptive leaves (compute spec §3).

    target/py/bin/python -m pytest -q testbed/capture/test_attend_real.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import capture  # noqa: E402

import strata  # noqa: E402
from strata import Block, Client, Layout  # noqa: E402
from strata.testing import Daemon  # noqa: E402

N = 1024
LAYERS = [8, 22]
TPB = 16
KV, HEADS, D = 3, 9, 64
# Decode-like query positions: the last 128 tokens, every 8th.
POSITIONS = list(range(N - 128, N, 8))
BUDGET = 0.20


@pytest.fixture(scope="module")
def cap(tmp_path_factory):
    d = tmp_path_factory.mktemp("cap-attend")
    assert capture.main(["--tokens", str(N), "--layers", ",".join(map(str, LAYERS)), "--out", str(d)]) == 0
    out = {}
    for L in LAYERS:
        out[L] = (np.load(d / f"q_{L}.npy"), np.load(d / f"k_{L}.npy").astype(np.float16),
                  np.load(d / f"v_{L}.npy").astype(np.float16))
    return out


@pytest.fixture(scope="module")
def stored(cap):
    """A daemon holding the capture as one chain of f16 blocks (both layers)."""
    # Key sketches on, for SPARF (DENSE and SPARSE do not use them).
    yield from _stored(cap, "[compute]\nkey_sketch = true\n")


@pytest.fixture(scope="module")
def stored_leaves(cap):
    """The same chain in a daemon keeping 8-token leaves (two per block),
    ranking leaves (compute.leaf_level = "leaf")."""
    yield from _stored(cap, '[compute]\nleaf_tokens = 8\nleaf_level = "leaf"\n')


@pytest.fixture(scope="module")
def stored_cold(cap):
    """The chain in a daemon that keeps int8 copies for Attend
    (compute.quant_bytes), restarted so that every block is on NVMe only;
    no key sketches, so SPARF scores from K (here: the copies' K)."""
    yield from _stored(cap, '[tiers.nvme]\nwrite_through = true\n'
                            '[compute]\nquant_bytes = "16MiB"\nhotness = false\n', cold=True)


def _stored(cap, config, cold=False):
    d = Daemon(dram="256MiB", config=config).start()
    try:
        with Client(d.endpoint) as c:
            ns = c.register_layout(Layout(model_id="SmolLM2-135M-Instruct/capture", dtype="f16",
                                          num_layers=len(LAYERS), num_kv_heads=KV, head_dim=D,
                                          tokens_per_block=TPB))
            keys, blocks = [], []
            for b in range(N // TPB):
                t = slice(b * TPB, (b + 1) * TPB)
                payload = np.stack([np.stack([cap[L][1][t], cap[L][2][t]]) for L in LAYERS])
                key = b"cap" + b.to_bytes(4, "big")
                blocks.append(Block(key, np.ascontiguousarray(payload), keys[-1] if keys else None))
                keys.append(key)
            c.put(ns, blocks)
            if not cold:
                yield c, ns, keys
                return
        d.stop()  # drains DRAM down to NVMe
        d.start()
        with Client(d.endpoint) as c:
            yield c, ns, keys
    finally:
        d.stop()


def exact(q, k, v, upto):
    """float64 attention of q (HEADS, D) over tokens [0, upto): o, weights."""
    kk = k[:upto].astype(np.float64)   # (t, KV, D)
    vv = v[:upto].astype(np.float64)
    g = HEADS // KV
    o = np.empty((HEADS, D))
    w = np.empty((HEADS, upto))
    for h in range(HEADS):
        s = kk[:, h // g] @ q[h].astype(np.float64) / np.sqrt(D)
        p = np.exp(s - s.max())
        p /= p.sum()
        w[h] = p
        o[h] = p @ vv[:, h // g]
    return o, w


def request(keys, q, upto):
    nb = -(-upto // TPB)
    last = upto - (nb - 1) * TPB
    return (keys[:nb], q, last)


def tokens_of(ranges):
    return np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros(0, int)


@pytest.mark.parametrize("li", range(len(LAYERS)))
def test_dense_attend_on_real_data_is_exact(cap, stored, li):
    c, ns, keys = stored
    q_all, k, v = cap[LAYERS[li]]
    worst = 0.0
    for p in POSITIONS:
        upto = p + 1
        [r] = c.attend(ns, [request(keys, q_all[p], upto)], li)
        assert r.exact and r.tokens_present == upto and r.tokens_attended == upto
        o_ref, _ = exact(q_all[p], k, v, upto)
        err = np.linalg.norm(r.o.astype(np.float64) - o_ref) / np.linalg.norm(o_ref)
        worst = max(worst, err)
    print(f"layer {LAYERS[li]}: dense relerr max {worst:.2e}")
    assert worst <= 5e-4


@pytest.mark.parametrize("li", range(len(LAYERS)))
def test_sparse_attend_on_real_data_keeps_the_mass(cap, stored, li):
    c, ns, keys = stored
    q_all, k, v = cap[LAYERS[li]]
    ours, oracle, blocks, stream = [], [], [], []
    for p in POSITIONS:
        upto = p + 1
        budget = int(np.ceil(BUDGET * upto))
        [r] = c.attend(ns, [request(keys, q_all[p], upto)], li, "sparse", budget_tokens=budget)
        assert not r.exact and r.sink_included and r.recent_included
        sel = tokens_of(r.covered)
        assert sel.max() < upto and len(sel) >= budget
        _, w = exact(q_all[p], k, v, upto)
        n = len(sel)
        recent = np.concatenate([[0], np.arange(upto - (n - 1), upto)])
        nb = -(-upto // TPB)
        block_mass = sum(np.bincount(np.arange(upto) // TPB, weights=w[h], minlength=nb)
                         for h in range(HEADS))
        best = np.sort(np.argsort(-block_mass, kind="stable")[: -(-n // TPB)])
        best = np.concatenate([np.arange(b * TPB, min((b + 1) * TPB, upto)) for b in best])
        for h in range(HEADS):
            ours.append(w[h, sel].sum())
            oracle.append(np.sort(w[h])[::-1][:n].sum())
            blocks.append(w[h, best].sum())
            stream.append(w[h, recent].sum())
    ours, oracle, blocks, stream = map(np.mean, (ours, oracle, blocks, stream))
    print(f"layer {LAYERS[li]}: sparse {BUDGET:.0%}: mass {ours:.3f}, block oracle {blocks:.3f} "
          f"({ours / blocks:.2f}x), token oracle {oracle:.3f}, sink+recent {stream:.3f}")
    assert ours >= 0.85 * blocks
    assert ours > stream


@pytest.mark.parametrize("li", range(len(LAYERS)))
def test_sparf_from_key_sketches_on_real_data(cap, stored, li):
    """SPARF (r = d/8 channels) scoring every token from the daemon's
    8-bit key sketches and attending whole blocks, at the same 20% budget:
    it reads K and V of only the blocks it attends (the sketch rows come
    from DRAM as abstract bytes), and its mass is measured against the
    block oracle and sink + recent, per KV head's own choice."""
    c, ns, keys = stored
    q_all, k, v = cap[LAYERS[li]]
    g = HEADS // KV
    ours, blocks, stream = [], [], []
    for p in POSITIONS:
        upto = p + 1
        budget = int(np.ceil(BUDGET * upto))
        [r] = c.attend(ns, [request(keys, q_all[p], upto)], li, "sparf", sparf_tokens=budget)
        assert not r.exact and len(r.head_covered) == KV
        assert r.abstract_bytes > 0, "scored from the sketches"
        _, w = exact(q_all[p], k, v, upto)
        nb = -(-upto // TPB)
        chosen_blocks = set()
        for h in range(KV):
            sel = tokens_of(r.head_covered[h])
            assert sel.max() < upto and len(sel) >= min(budget, upto)
            # Whole blocks (the last one cut at upto).
            assert all(b * TPB in sel or b * TPB >= upto for b in set(sel // TPB))
            chosen_blocks |= set((sel // TPB).tolist())
            n = len(sel)
            mass = sum(np.bincount(np.arange(upto) // TPB, weights=w[j], minlength=nb)
                       for j in range(h * g, (h + 1) * g))
            best = np.sort(np.argsort(-mass, kind="stable")[: -(-n // TPB)])
            best = np.concatenate([np.arange(b * TPB, min((b + 1) * TPB, upto)) for b in best])
            recent = np.concatenate([[0], np.arange(upto - (n - 1), upto)])
            for j in range(h * g, (h + 1) * g):
                ours.append(w[j, sel].sum())
                blocks.append(w[j, best].sum())
                stream.append(w[j, recent].sum())
        # Only the chosen blocks' K and V were read and verified: one
        # layer's K + V of the stored block (all TPB tokens, KV heads x D
        # f16 each, also for the last block cut at upto).
        row = KV * D * 2
        assert r.read_bytes(strata.Tier.DRAM) == len(chosen_blocks) * TPB * 2 * row
    ours, blocks, stream = map(np.mean, (ours, blocks, stream))
    print(f"layer {LAYERS[li]}: sparf {BUDGET:.0%} from sketches: mass {ours:.3f}, "
          f"block oracle {blocks:.3f} ({ours / blocks:.2f}x), sink+recent {stream:.3f}")
    # Measured (2026-11-29): 0.819 / 0.886 (0.92x) on layer 8, 0.864 /
    # 0.942 (0.92x) on layer 22; sink + recent 0.390 / 0.859.
    assert ours >= 0.85 * blocks
    assert ours >= stream - 0.01


def _sparse_mass(stored, cap, li, budget):
    c, ns, keys = stored
    q_all, k, v = cap[LAYERS[li]]
    mass = []
    for p in POSITIONS:
        upto = p + 1
        [r] = c.attend(ns, [request(keys, q_all[p], upto)], li, "sparse",
                       budget_tokens=int(np.ceil(budget * upto)))
        sel = tokens_of(r.covered)
        _, w = exact(q_all[p], k, v, upto)
        mass += [w[h, sel].sum() for h in range(HEADS)]
    return float(np.mean(mass))


@pytest.mark.parametrize("li", range(len(LAYERS)))
def test_leaves_keep_more_mass_on_real_data(cap, stored, stored_leaves, li):
    """8-token leaves (compute.leaf_tokens = 8) against one box per 16-token
    block, same token budgets: never less mass, and on layer 8, whose heads
    attend to scattered content tokens, much more (measured 2026-11-29:
    5% 0.212 -> 0.336, 10% 0.552 -> 0.690 (the block oracle: 0.71), 20%
    0.787 -> 0.867; layer 22: 0.785 -> 0.786, 0.850 -> 0.860, 0.897 ->
    0.917)."""
    for budget in (0.05, 0.10, 0.20):
        fixed = _sparse_mass(stored, cap, li, budget)
        leaves = _sparse_mass(stored_leaves, cap, li, budget)
        print(f"layer {LAYERS[li]}: sparse {budget:.0%}: 16-token blocks {fixed:.3f}, 8-token leaves {leaves:.3f}")
        assert leaves >= fixed - 0.005
        if LAYERS[li] == 8 and budget <= 0.10:
            assert leaves >= 1.15 * fixed


@pytest.mark.parametrize("li", range(len(LAYERS)))
def test_int8_copies_on_real_data(cap, stored_cold, li):
    """min_precision="int8" on real K and V held only on NVMe: once a call
    has made the layer's int8 copies, DENSE from them reads no device byte
    and stays within 3% of exact attention, and SPARF scoring every token
    from the copies' K (no key sketches here) chooses tokens holding the
    mass the stored K gives, within 0.005 (compute spec §3: an int8 payload
    costs at most 0.005 of the mass)."""
    c, ns, keys = stored_cold
    q_all, k, v = cap[LAYERS[li]]
    [first] = c.attend(ns, [request(keys, q_all[N - 1], N)], li, min_precision="int8")
    assert first.read_bytes(strata.Tier.NVME) > 0 and first.quantized_blocks == 0
    g = HEADS // KV
    errs, m_stored, m_int8 = [], [], []
    for p in POSITIONS:
        upto = p + 1
        req = request(keys, q_all[p], upto)
        [d8] = c.attend(ns, [req], li, min_precision="int8")
        assert d8.read_bytes(strata.Tier.NVME) == 0 and not d8.exact
        assert d8.quantized_blocks == -(-upto // TPB) and d8.tokens_attended == upto
        o_ref, w = exact(q_all[p], k, v, upto)
        errs.append(np.linalg.norm(d8.o.astype(np.float64) - o_ref) / np.linalg.norm(o_ref))
        budget = int(np.ceil(BUDGET * upto))
        [s0] = c.attend(ns, [req], li, "sparf", sparf_tokens=budget)
        [s8] = c.attend(ns, [req], li, "sparf", sparf_tokens=budget, min_precision="int8")
        assert s0.quantized_blocks == 0 and s8.read_bytes(strata.Tier.NVME) == 0
        for h in range(KV):
            a, b = tokens_of(s0.head_covered[h]), tokens_of(s8.head_covered[h])
            for j in range(h * g, (h + 1) * g):
                m_stored.append(w[j, a].sum())
                m_int8.append(w[j, b].sum())
    m_stored, m_int8 = float(np.mean(m_stored)), float(np.mean(m_int8))
    print(f"layer {LAYERS[li]}: int8 copies: dense relerr max {max(errs):.2e} mean {np.mean(errs):.2e}; "
          f"sparf {BUDGET:.0%} mass stored K {m_stored:.4f}, copies' K {m_int8:.4f}")
    # Measured (2026-11-29): dense relerr max 7.6e-3 / 1.9e-2 (layer 8 /
    # 22), mass 0.8192 -> 0.8193 / 0.8629 -> 0.8637.
    assert max(errs) <= 0.03
    assert abs(m_int8 - m_stored) <= 0.005
