"""Gate statistics of /work/shared/COMPUTE.md §2 on a capture directory, in numpy.

    python testbed/capture/stats.py DIR [--last 512]

Per (layer, KV head), over the last ``--last`` query positions (causal
softmax, scale 1/sqrt(64) = 1/8, GQA: query head h reads KV head h // 3),
medians taken over those positions and the 3 query heads of the KV head:

- ``top2%``: attention mass of the top 2% (ceil) of the keys each query can
  see (the *skew* gate, >= 0.80);
- ``top2% -sink`` / ``top1% -sink``: the same with token 0 left out of the
  selection (weights still normalised over all keys); COMPUTE.md calibrates
  its generator's temperature on the top 1% of non-sink keys (target 0.8);
- ``sink``: the weight of token 0;
- ``jacc@100``: Jaccard of the top-100 keys (by q.k) of consecutive query
  positions (the *dynamics* gate, 0.1 to 0.8);
- ``ood``: mean Mahalanobis distance of all N queries of the group to the key
  distribution (mean and covariance of the N keys) / that of the keys (the
  *out of distribution* gate, >= 3).

Keys are the captured float32 ones (the cache holds them rounded to float16;
the difference does not show at the printed precision).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Row:
    layer: int
    kv_head: int
    top2: float
    top2_nosink: float
    top1_nosink: float
    sink: float
    jaccard100: float
    ood: float


def _head_stats(q: np.ndarray, k: np.ndarray, last: int, scale: float) -> tuple[np.ndarray, ...]:
    """q: (N, hd) one query head; k: (N, hd) its KV head. Per query position
    of the last ``last``: top-2% mass, top-2%/1% mass without the sink, sink
    weight; and the Jaccard of consecutive top-100 sets."""
    n = k.shape[0]
    pos = np.arange(n - last, n)
    s = (q[pos].astype(np.float64) @ k.T.astype(np.float64)) * scale  # (last, N)
    s[np.arange(n)[None, :] > pos[:, None]] = -np.inf
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    ctx = pos + 1
    rows = np.arange(last)

    def top_mass(weights: np.ndarray, frac: float, ctx_n: np.ndarray) -> np.ndarray:
        cnt = np.maximum(1, np.ceil(frac * ctx_n).astype(np.int64))
        cs = np.cumsum(-np.sort(-weights, axis=1), axis=1)
        return cs[rows, cnt - 1]

    top2 = top_mass(w, 0.02, ctx)
    sink = w[:, 0].copy()
    w[:, 0] = 0.0
    top2_ns = top_mass(w, 0.02, ctx - 1)
    top1_ns = top_mass(w, 0.01, ctx - 1)

    kk = 100
    idx = np.argpartition(-s, kk - 1, axis=1)[:, :kk]  # masked keys are -inf, never chosen while ctx >= 100
    member = np.zeros((last, n), dtype=bool)
    member[rows[:, None], idx] = True
    inter = np.sum(member[:-1] & member[1:], axis=1)
    jacc = inter / (2 * kk - inter)
    return top2, top2_ns, top1_ns, sink, jacc


def _mahalanobis_ratio(qg: np.ndarray, k: np.ndarray) -> float:
    """qg: (M, hd) queries; k: (N, hd) keys. mean d_M(q) / mean d_M(k) under the keys' mean/covariance."""
    k = k.astype(np.float64)
    mu = k.mean(axis=0)
    c = np.cov(k, rowvar=False)
    c += np.eye(c.shape[0]) * (1e-9 * np.trace(c) / c.shape[0])
    ci = np.linalg.inv(c)

    def dist(x: np.ndarray) -> np.ndarray:
        d = x.astype(np.float64) - mu
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, ci, d), 0.0))

    return float(dist(qg).mean() / dist(k).mean())


def compute(out_dir: str | Path, last: int = 512) -> list[Row]:
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "meta.json").read_text())
    nh, kvh, hd, n = meta["num_q_heads"], meta["num_kv_heads"], meta["head_dim"], meta["n_tokens"]
    rep = nh // kvh
    last = min(last, n - 100)  # the top-100 needs 100 visible keys
    if last < 2:
        raise ValueError(f"{n} tokens are too few for these statistics")
    scale = 1.0 / math.sqrt(hd)
    rows: list[Row] = []
    for layer in meta["layers"]:
        q = np.load(out_dir / f"q_{layer}.npy")
        k = np.load(out_dir / f"k_{layer}.npy")
        for g in range(kvh):
            parts = [_head_stats(q[:, g * rep + r], k[:, g], last, scale) for r in range(rep)]
            cat = [np.concatenate([p[i] for p in parts]) for i in range(5)]
            ood = _mahalanobis_ratio(q[:, g * rep : (g + 1) * rep].reshape(-1, hd), k[:, g])
            rows.append(Row(layer, g, *(float(np.median(c)) for c in cat), ood))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [
        "| layer | KV head | top2% | top2% -sink | top1% -sink | sink | jacc@100 | ood |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.layer} | {r.kv_head} | {r.top2:.3f} | {r.top2_nosink:.3f} | {r.top1_nosink:.3f} "
            f"| {r.sink:.3f} | {r.jaccard100:.3f} | {r.ood:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="gate statistics of a capture directory")
    ap.add_argument("dir")
    ap.add_argument("--last", type=int, default=512, help="query positions (the last ones) to use")
    args = ap.parse_args()
    print(format_table(compute(args.dir, args.last)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
