"""SmolLM2-135M (Llama) forward pass in numpy float32 over a paged float16 KV cache.

Numerics and determinism (see README.md, "Bit-identity"):

- weights and activations float32; K/V stored float16 and read back (for
  every context position, including the chunk's own tokens) before attention;
- every forward step computes whole block-aligned *tiles*: the
  ``block_size`` rows of the block that holds the tokens being computed (a
  prefill chunk, or the single decode token), padding rows zero. So every
  matmul and reduction that touches position ``p`` has the same shape, and
  ``p`` sits at the same row (``p % block_size``), whether ``p`` is computed
  in a full prefill, after a loaded prefix, or by a decode step. BLAS picks
  its kernel by shape (OpenBLAS: gemv for one row, "small matrix" kernels
  below ~1e6 multiply-adds), so equal shapes are what make results equal;
- attention for a tile spans whole pages ``0 .. tile // block_size``; slots
  not yet written are zeroed and masked with -inf;
- BLAS is single-threaded (``tinyengine._threads``).

GGUF stores Q/K rows permuted for llama.cpp's interleaved ("GPT-J") RoPE.
The permutation is undone at load, so the model uses HF's rotate-half RoPE
and the K cache holds keys in HF/vLLM head-dim order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .kv_cache import PagedKVCache
from .tokenizer import Tokenizer
from .weights import fetch, load_weights


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int
    bos_token_id: int | None
    eos_token_id: int | None
    tied_embeddings: bool

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tied_embeddings: bool) -> ModelConfig:
        arch = meta["general.architecture"]
        if arch != "llama":
            raise ValueError(f"unsupported architecture {arch!r}")
        n_heads = int(meta["llama.attention.head_count"])
        hidden = int(meta["llama.embedding_length"])
        head_dim = int(meta.get("llama.attention.key_length", hidden // n_heads))
        vocab = meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])
        return cls(
            num_layers=int(meta["llama.block_count"]),
            hidden_size=hidden,
            intermediate_size=int(meta["llama.feed_forward_length"]),
            num_heads=n_heads,
            num_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            vocab_size=int(vocab),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
            max_position=int(meta.get("llama.context_length", 2048)),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            tied_embeddings=tied_embeddings,
        )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's ``permute`` on a Q/K weight
    ``(n_head * head_dim, in)``: back to HF's half-split RoPE row order."""
    out, inp = w.shape
    hd = out // n_head
    return w.reshape(n_head, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


#: ``capture(layer, q, k, v, positions)``: see :attr:`Model.capture`.
CaptureFn = Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


@dataclass
class _Layer:
    attn_norm: np.ndarray  # (H,)
    wqkv: np.ndarray  # (H, (nh + 2 kvh) * hd), C-contiguous
    wo: np.ndarray  # (nh*hd, H)
    ffn_norm: np.ndarray
    wgu: np.ndarray  # (H, 2 * I): gate then up
    wdown: np.ndarray  # (I, H)


class Model:
    """Weights, tokenizer and the per-layer forward used by :class:`~tinyengine.engine.Engine`.

    Capture hook (optional, off by default): when :attr:`capture` is set,
    :meth:`layer_forward` calls ``capture(layer, q, k, v, positions)`` for
    every tile it computes in a layer of :attr:`capture_layers` (``None``:
    every layer), right after RoPE and before the K/V are written to the
    cache. ``q`` is ``(n, num_heads, head_dim)``, ``k`` and ``v`` are
    ``(n, num_kv_heads, head_dim)``, all float32 (post-RoPE Q and K,
    pre-float16 K/V), for the tile's valid rows only (padding rows excluded),
    and ``positions`` is the ``(n,)`` int64 array of their absolute positions.
    The arrays are fresh copies: the callback may keep or modify them. Blocks
    loaded through ``hooks.load`` are not computed, hence not captured. The
    hook only reads; with it set or not, every result is bit-identical.
    Prefer the :meth:`capturing` context manager, which restores the previous
    setting on exit.
    """

    #: optional capture callback (see the class docstring); ``None``: off
    capture: CaptureFn | None = None
    #: layers the callback sees; ``None``: all
    capture_layers: frozenset[int] | None = None

    def __init__(self, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> None:
        tied = "output.weight" not in tensors
        cfg = ModelConfig.from_gguf_metadata(metadata, tied_embeddings=tied)
        self.config = cfg
        self.tokenizer = Tokenizer.from_gguf_metadata(metadata)
        f32 = np.float32
        self.embedding = np.asarray(tensors["token_embd.weight"], dtype=f32)  # (V, H)
        lm = self.embedding if tied else np.asarray(tensors["output.weight"], dtype=f32)
        self.lm_head_t = lm.T  # (H, V) view; BLAS handles the transpose
        self.final_norm = np.array(tensors["output_norm.weight"], dtype=f32)
        self.layers: list[_Layer] = []
        for i in range(cfg.num_layers):
            p = f"blk.{i}."
            wq = unpermute_qk(np.asarray(tensors[p + "attn_q.weight"]), cfg.num_heads)
            wk = unpermute_qk(np.asarray(tensors[p + "attn_k.weight"]), cfg.num_kv_heads)
            wv = np.asarray(tensors[p + "attn_v.weight"])
            self.layers.append(
                _Layer(
                    attn_norm=np.array(tensors[p + "attn_norm.weight"], dtype=f32),
                    wqkv=np.ascontiguousarray(np.concatenate([wq, wk, wv]).T, dtype=f32),
                    wo=np.ascontiguousarray(np.asarray(tensors[p + "attn_output.weight"]).T, dtype=f32),
                    ffn_norm=np.array(tensors[p + "ffn_norm.weight"], dtype=f32),
                    wgu=np.ascontiguousarray(
                        np.concatenate(
                            [np.asarray(tensors[p + "ffn_gate.weight"]), np.asarray(tensors[p + "ffn_up.weight"])]
                        ).T,
                        dtype=f32,
                    ),
                    wdown=np.ascontiguousarray(np.asarray(tensors[p + "ffn_down.weight"]).T, dtype=f32),
                )
            )
        # RoPE tables (HF rotate-half convention), float64 math rounded once to float32.
        hd = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        freqs = np.outer(np.arange(cfg.max_position, dtype=np.float64), inv_freq)
        emb = np.concatenate([freqs, freqs], axis=-1)
        self._cos = np.cos(emb).astype(f32)  # (max_pos, hd)
        self._sin = np.sin(emb).astype(f32)
        self._scale = f32(1.0 / np.sqrt(hd))

    @contextmanager
    def capturing(self, fn: CaptureFn, layers: Iterable[int] | None = None) -> Iterator[Model]:
        """Set :attr:`capture` to ``fn`` for ``layers`` (``None``: all) inside
        a ``with`` block; the previous setting is restored on exit."""
        prev = (self.capture, self.capture_layers)
        sel = None if layers is None else frozenset(int(i) for i in layers)
        if sel is not None and not all(0 <= i < self.config.num_layers for i in sel):
            raise ValueError(f"capture layers {sorted(sel)} outside 0..{self.config.num_layers - 1}")
        self.capture, self.capture_layers = fn, sel
        try:
            yield self
        finally:
            self.capture, self.capture_layers = prev

    # ---- building blocks -------------------------------------------------------------

    def _rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return (x * (np.float32(1.0) / np.sqrt(ms + np.float32(self.config.rms_norm_eps)))) * w

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        # x: (T, heads, hd); cos/sin: (T, 1, hd)
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rot * sin

    def embed_tile(self, token_ids: Sequence[int], start: int, block_size: int) -> np.ndarray:
        """The ``(block_size, H)`` input tile for tokens at positions
        ``start .. start+len(token_ids)`` (all inside one block): their
        embeddings at their offsets in the block, zeros elsewhere."""
        off = start % block_size
        if off + len(token_ids) > block_size:
            raise ValueError("a tile cannot cross a block boundary")
        x = np.zeros((block_size, self.config.hidden_size), dtype=np.float32)
        x[off : off + len(token_ids)] = self.embedding[np.asarray(token_ids, dtype=np.int64)]
        return x

    def layer_forward(
        self,
        layer: int,
        x: np.ndarray,
        start: int,
        end: int,
        kv_cache: PagedKVCache,
        block_table: Sequence[int],
    ) -> np.ndarray:
        """One transformer layer on one block-aligned tile.

        ``x`` is the ``(block_size, H)`` float32 tile of the block holding
        positions ``start .. end-1`` (``end - start <= block_size``, same
        block). Rows outside ``[start, end)`` are padding: computed (their
        results are discarded) but never written to the cache. The K/V of
        ``[start, end)`` is written to ``kv_cache`` (float16), then every row
        attends over whole pages ``0 .. start // block_size`` read back from
        the cache, causally masked by its position. Every matmul thus has the
        same shape whether the tile is a prefill chunk or a single decode
        token, and a position is always at the same row of its tile."""
        cfg = self.config
        L = self.layers[layer]
        nh, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        rep = nh // kvh
        bs = kv_cache.block_size
        T = x.shape[0]
        if T != bs:
            raise ValueError(f"tile must have {bs} rows, got {T}")
        tile = start - start % bs
        lo, hi = start - tile, end - tile
        if not 0 <= lo < hi <= bs:
            raise ValueError(f"bad tile range [{start}, {end})")

        h = self._rmsnorm(x, L.attn_norm)
        qkv = np.matmul(h, L.wqkv)
        q = qkv[:, : nh * hd].reshape(T, nh, hd)
        k = qkv[:, nh * hd : (nh + kvh) * hd].reshape(T, kvh, hd)
        v = qkv[:, (nh + kvh) * hd :].reshape(T, kvh, hd)
        cos = self._cos[tile : tile + T, None, :]
        sin = self._sin[tile : tile + T, None, :]
        q = self._rope(q, cos, sin)
        k = self._rope(k, cos, sin)
        cap = self.capture
        if cap is not None and (self.capture_layers is None or layer in self.capture_layers):
            cap(layer, q[lo:hi].copy(), k[lo:hi].copy(), v[lo:hi].copy(), np.arange(start, end, dtype=np.int64))
        kv_cache.write_tokens(layer, block_table, start, k[lo:hi], v[lo:hi])

        # Attention over pages 0 .. tile // bs, read back from the cache.
        num_pages = tile // bs + 1
        n_ctx = num_pages * bs
        ids = np.asarray(block_table[:num_pages], dtype=np.int64)
        k16 = kv_cache.key_cache(layer)[ids].reshape(n_ctx, kvh, hd)
        v16 = kv_cache.value_cache(layer)[ids].reshape(n_ctx, kvh, hd)
        kt = np.ascontiguousarray(k16.transpose(1, 2, 0), dtype=np.float32)  # (kvh, hd, n_ctx)
        vv = np.ascontiguousarray(v16.transpose(1, 0, 2), dtype=np.float32)  # (kvh, n_ctx, hd)
        if end < n_ctx:  # not yet written (stale) slots: keep them out of every sum
            kt[:, :, end:] = 0.0
            vv[:, end:, :] = 0.0
        # query rows grouped by KV head: row = t * rep + r  (head = g * rep + r)
        qg = np.ascontiguousarray(q.reshape(T, kvh, rep, hd).transpose(1, 0, 2, 3)).reshape(kvh, T * rep, hd)
        s = np.matmul(qg, kt)  # (kvh, T*rep, n_ctx)
        s *= self._scale
        qpos = np.repeat(np.arange(tile, tile + T), rep)
        s[:, np.arange(n_ctx)[None, :] > qpos[:, None]] = -np.inf
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        denom = s.sum(axis=-1, keepdims=True)
        o = np.matmul(s, vv)  # (kvh, T*rep, hd)
        o /= denom
        o = o.reshape(kvh, T, rep, hd).transpose(1, 0, 2, 3).reshape(T, nh * hd)
        x = x + np.matmul(o, L.wo)

        h = self._rmsnorm(x, L.ffn_norm)
        gu = np.matmul(h, L.wgu)
        g = gu[:, : cfg.intermediate_size]
        u = gu[:, cfg.intermediate_size :]
        act = (g / (np.float32(1.0) + np.exp(-g))) * u
        return x + np.matmul(act, L.wdown)

    def logits(self, x_last: np.ndarray) -> np.ndarray:
        """Final norm + LM head for one hidden row ``(H,)`` or ``(1, H)`` -> float32 ``(V,)``."""
        h = self._rmsnorm(np.asarray(x_last, dtype=np.float32).reshape(1, -1), self.final_norm)
        return np.matmul(h, self.lm_head_t)[0]


def load_model(
    cache_dir: str | os.PathLike[str] | None = None, *, gguf_path: str | os.PathLike[str] | None = None
) -> Model:
    """Fetch (if needed) and load SmolLM2-135M-Instruct.

    ``cache_dir`` defaults to ``$STRATA_MODEL_CACHE`` or ``~/.cache/strata-testbed``.
    """
    path = gguf_path if gguf_path is not None else fetch(cache_dir)
    tensors, meta = load_weights(path)
    return Model(tensors, meta)
