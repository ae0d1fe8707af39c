"""Merging partial attention by log-sum-exp (COMPUTE.md §1), in numpy.

The daemon's ``Attend`` answers, per query head, the partial attention
``(o, lse)`` over the tokens it covered; the engine computes the same over
the tokens it holds itself (attention sink, recent window) and merges. For
disjoint token sets ``A`` and ``B``::

    lse = logaddexp(lse_A, lse_B)
    o   = exp(lse_A - lse) * o_A + exp(lse_B - lse) * o_B      # attention over A ∪ B

An empty set has ``lse = -inf`` and ``o = 0``; it contributes nothing, and
two empty sets stay empty (no NaN).

- :func:`merge`: the exact merge of two partials (weights in float64);
- :func:`partial`: the partial ``(o, lse)`` of queries over a token set in
  float64, with GQA (query head ``j`` uses KV head ``j // (heads // kv_heads)``),
  for an engine's own part and for references.
"""

from __future__ import annotations

import numpy as np

__all__ = ["merge", "partial"]


def merge(o_a, lse_a, o_b, lse_b) -> tuple[np.ndarray, np.ndarray]:
    """Merges two partial attentions over disjoint token sets.

    ``o_a``, ``o_b``: ``(..., heads, head_dim)``; ``lse_a``, ``lse_b``:
    ``(..., heads)`` (natural log of the sum of exponentiated scaled
    scores; ``-inf`` for an empty set). Returns ``(o, lse)`` of the same
    shapes, in the inputs' floating type (at least float32); the weights
    are computed in float64.
    """
    o_a, o_b = np.asarray(o_a), np.asarray(o_b)
    lse_a, lse_b = np.asarray(lse_a), np.asarray(lse_b)
    if o_a.shape != o_b.shape:
        raise ValueError(f"merge: o shapes differ: {o_a.shape} vs {o_b.shape}")
    if lse_a.shape != lse_b.shape:
        raise ValueError(f"merge: lse shapes differ: {lse_a.shape} vs {lse_b.shape}")
    if o_a.ndim < 1 or o_a.shape[:-1] != lse_a.shape:
        raise ValueError(f"merge: o {o_a.shape} is not lse {lse_a.shape} x head_dim")
    a, b = lse_a.astype(np.float64), lse_b.astype(np.float64)
    if np.isnan(a).any() or np.isnan(b).any() or (a == np.inf).any() or (b == np.inf).any():
        raise ValueError("merge: lse must be finite or -inf")
    m = np.maximum(a, b)
    empty = m == -np.inf
    m0 = np.where(empty, 0.0, m)
    wa, wb = np.exp(a - m0), np.exp(b - m0)  # exp(-inf) = 0: an empty side weighs nothing
    total = np.where(empty, 1.0, wa + wb)
    lse = np.where(empty, -np.inf, m0 + np.log(total))
    wa, wb = (wa / total)[..., None], (wb / total)[..., None]
    o = wa * o_a.astype(np.float64) + wb * o_b.astype(np.float64)
    o = np.where(empty[..., None], 0.0, o)
    o_type = np.result_type(o_a.dtype, o_b.dtype, np.float32)
    lse_type = np.result_type(lse_a.dtype, lse_b.dtype, np.float32)
    return o.astype(o_type), lse.astype(lse_type)


def partial(q, k, v, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Partial attention of queries over a token set, in float64.

    ``q``: ``(heads, head_dim)``; ``k``, ``v``: ``(tokens, kv_heads,
    head_dim)`` (a block payload's layer, tokens concatenated); ``heads`` a
    multiple of ``kv_heads``. ``scale`` defaults to ``1/sqrt(head_dim)``.
    Returns ``o`` ``(heads, head_dim)`` and ``lse`` ``(heads,)``, float64;
    no tokens gives ``o = 0``, ``lse = -inf``.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    heads, d = q.shape
    if k.ndim != 3 or v.shape != k.shape or k.shape[2] != d:
        raise ValueError(f"partial: k {k.shape} and v {v.shape} must be (tokens, kv_heads, {d})")
    kv = k.shape[1]
    if heads % kv:
        raise ValueError(f"partial: {heads} query heads is not a multiple of {kv} KV heads")
    s = 1.0 / np.sqrt(d) if scale is None else float(scale)
    o = np.zeros((heads, d))
    lse = np.full(heads, -np.inf)
    if k.shape[0] == 0:
        return o, lse
    g = heads // kv
    for j in range(heads):
        h = j // g
        x = (k[:, h, :] @ q[j]) * s
        m = x.max()
        w = np.exp(x - m)
        l = w.sum()
        o[j] = (w @ v[:, h, :]) / l
        lse[j] = m + np.log(l)
    return o, lse
