"""Capture real post-RoPE Q, K and V of SmolLM2-135M-Instruct (tinyengine).

    python testbed/capture/capture.py --tokens 2048 --layers 0,8,15,22,29 --out DIR [--stats]

Runs one chat prompt of exactly ``--tokens`` tokens (the multi-topic text of
``prompt.txt``, cut to length, then its closing question) through
:class:`tinyengine.Engine` with the model's capture hook on the chosen layers,
and writes (see README.md):

- ``DIR/meta.json``: model, layers, head counts, head_dim, n_tokens,
  text_sha256 (SHA-256 of ``DIR/prompt.txt``), tinyengine_version;
- ``DIR/q_L.npy`` ``[N][9][64]``, ``DIR/k_L.npy`` and ``DIR/v_L.npy``
  ``[N][3][64]`` per layer ``L``: little-endian float32, C order, ``numpy.save``
  format 1.0;
- ``DIR/prompt.txt`` (the prompt as the tokens spell it) and
  ``DIR/tokens.npy`` (int32 token ids), for the record.

Before writing, it asserts that every position was captured exactly once and
that the captured K and V, rounded to float16, equal byte for byte what the
engine's paged KV cache holds for those positions: the capture is what a KV
store would be handed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import tinyengine as te

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT_FILE = Path(__file__).with_name("prompt.txt")
QUESTION_MARK = "\nQuestion:"
DEFAULT_LAYERS = (0, 8, 15, 22, 29)


def build_prompt(tok: te.Tokenizer, n_tokens: int, text: str | None = None) -> list[int]:
    """Exactly ``n_tokens`` ids: the ChatML prompt (default system message,
    user turn, generation prompt) whose user turn is the body of ``text``
    (default: ``prompt.txt``) cut to fit, then a blank line and its question."""
    if text is None:
        text = PROMPT_FILE.read_text(encoding="utf-8")
    cut = text.index(QUESTION_MARK)
    body, question = text[:cut].rstrip(), text[cut:].strip()
    full = tok.apply_chat_template([{"role": "user", "content": "\x00"}])
    head_s, tail_s = full.split("\x00")
    head = tok.encode(head_s)
    tail = tok.encode("\n\n" + question + tail_s)
    body_ids = tok.encode(body)
    room = n_tokens - len(head) - len(tail)
    if room < 1:
        raise ValueError(f"--tokens {n_tokens} is shorter than the prompt's frame ({len(head) + len(tail)} tokens)")
    if room > len(body_ids):
        raise ValueError(
            f"--tokens {n_tokens} needs {room} body tokens; the text has {len(body_ids)} "
            f"(at most {len(head) + len(tail) + len(body_ids)} tokens)"
        )
    ids = head + body_ids[:room] + tail
    assert len(ids) == n_tokens
    return ids


@dataclass
class Capture:
    token_ids: list[int]
    layers: list[int]
    q: dict[int, np.ndarray]  # layer -> (N, nh, hd) float32
    k: dict[int, np.ndarray]  # layer -> (N, kvh, hd) float32
    v: dict[int, np.ndarray]
    cache_k: dict[int, np.ndarray]  # layer -> (N, kvh, hd) float16, read from the paged cache
    cache_v: dict[int, np.ndarray]
    logits: np.ndarray  # float32 (V,): logits of the last prompt position
    seconds: float  # engine time (prefill)


class _SnapshotAtFinish(te.KVHooks):
    """Copies the K/V of ``layers`` for the whole sequence out of the paged
    cache when the request finishes (before its blocks are freed)."""

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers = list(layers)
        self.k: dict[int, np.ndarray] = {}
        self.v: dict[int, np.ndarray] = {}
        self.kv_cache: te.PagedKVCache | None = None

    def finished(self, request: te.Request) -> None:
        assert self.kv_cache is not None
        n = request.num_computed_tokens
        ids = np.asarray(request.block_ids, dtype=np.int64)
        for layer in self.layers:
            kc = self.kv_cache.key_cache(layer)[ids]
            vc = self.kv_cache.value_cache(layer)[ids]
            self.k[layer] = kc.reshape(-1, *kc.shape[2:])[:n].copy()
            self.v[layer] = vc.reshape(-1, *vc.shape[2:])[:n].copy()


def run_capture(
    model: te.Model,
    token_ids: Sequence[int],
    layers: Sequence[int],
    *,
    layout: str = "flash_attn",
) -> Capture:
    """Prefill ``token_ids`` (one output token, no decode step) with the
    capture hook on ``layers``; returns the captured Q/K/V, the cache's K/V of
    the same positions and the last position's logits."""
    cfg = model.config
    n = len(token_ids)
    nh, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layers = sorted({int(x) for x in layers})
    q = {L: np.zeros((n, nh, hd), np.float32) for L in layers}
    k = {L: np.zeros((n, kvh, hd), np.float32) for L in layers}
    v = {L: np.zeros((n, kvh, hd), np.float32) for L in layers}
    seen = {L: np.zeros(n, np.int32) for L in layers}

    def on_tile(layer: int, tq: np.ndarray, tk: np.ndarray, tv: np.ndarray, pos: np.ndarray) -> None:
        q[layer][pos] = tq
        k[layer][pos] = tk
        v[layer][pos] = tv
        seen[layer][pos] += 1

    snap = _SnapshotAtFinish(layers)
    bs = 16
    eng = te.Engine(model, num_blocks=-(-n // bs), layout=layout, hooks=snap, block_size=bs)
    snap.kv_cache = eng.kv_cache
    req = eng.add_request(token_ids, max_new_tokens=1, ignore_eos=True, record_logits=True)
    t0 = time.perf_counter()
    with model.capturing(on_tile, layers):
        eng.run()
    seconds = time.perf_counter() - t0
    assert req.finished and req.num_computed_locally == n and len(req.logits) == 1

    for L in layers:
        if not np.all(seen[L] == 1):
            bad = np.flatnonzero(seen[L] != 1)
            raise AssertionError(f"layer {L}: positions captured != once, e.g. {bad[:8].tolist()}")
        # What the KV store would hold: the captured K/V rounded to float16, bit for bit.
        for name, got, cached in (("K", k[L], snap.k[L]), ("V", v[L], snap.v[L])):
            if cached.shape != got.shape or cached.dtype != np.float16:
                raise AssertionError(f"layer {L} {name}: cache slice {cached.shape} {cached.dtype}")
            if got.astype(np.float16).tobytes() != cached.tobytes():
                diff = np.flatnonzero(np.any(got.astype(np.float16) != cached, axis=(1, 2)))
                raise AssertionError(f"layer {L} {name}: capture != paged KV cache at positions {diff[:8].tolist()}")
    return Capture(list(token_ids), layers, q, k, v, snap.k, snap.v, req.logits[0], seconds)


def tinyengine_version() -> str:
    try:
        return importlib.metadata.version("tinyengine")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write_capture(out: str | os.PathLike[str], cap: Capture, model: te.Model) -> dict:
    """Write the files described in the module docstring; returns meta."""
    cfg = model.config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = model.tokenizer.decode(cap.token_ids)
    text_bytes = text.encode("utf-8")
    meta = {
        "model": MODEL_NAME,
        "layers": cap.layers,
        "num_q_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "n_tokens": len(cap.token_ids),
        "text_sha256": hashlib.sha256(text_bytes).hexdigest(),
        "tinyengine_version": tinyengine_version(),
    }
    le32 = np.dtype("<f4")
    for L in cap.layers:
        for name, arr in (("q", cap.q[L]), ("k", cap.k[L]), ("v", cap.v[L])):
            a = np.ascontiguousarray(arr, dtype=le32)
            with open(out / f"{name}_{L}.npy", "wb") as f:
                np.lib.format.write_array(f, a, version=(1, 0), allow_pickle=False)
    np.save(out / "tokens.npy", np.asarray(cap.token_ids, dtype="<i4"), allow_pickle=False)
    (out / "prompt.txt").write_bytes(text_bytes)
    # meta.json last: its presence means the directory is complete
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def parse_layers(s: str, num_layers: int) -> list[int]:
    layers = sorted({int(x) for x in s.split(",") if x.strip()})
    if not layers or not all(0 <= x < num_layers for x in layers):
        raise SystemExit(f"--layers must be a non-empty list in 0..{num_layers - 1}, got {s!r}")
    return layers


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length in tokens (exact)")
    ap.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)), help="comma-separated layer indices")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--layout", default="flash_attn", choices=["flash_attn", "flashinfer"])
    ap.add_argument("--stats", action="store_true", help="print the gate statistics (stats.py) afterwards")
    ap.add_argument(
        "--append",
        nargs="*",
        default=[],
        metavar="FILE",
        help="text files inserted, in order, between prompt.txt's body and its question "
        "(for prompts longer than prompt.txt, e.g. /usr/share/common-licenses/*)",
    )
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model = te.load_model()
    layers = parse_layers(args.layers, model.config.num_layers)
    text = None
    if args.append:
        base = PROMPT_FILE.read_text(encoding="utf-8")
        cut = base.index(QUESTION_MARK)
        extra = [Path(f).read_text(encoding="utf-8", errors="replace").strip() for f in args.append]
        text = "\n\n".join([base[:cut].rstrip(), *extra]) + "\n" + base[cut:]
    ids = build_prompt(model.tokenizer, args.tokens, text)
    t1 = time.perf_counter()
    cap = run_capture(model, ids, layers, layout=args.layout)
    t2 = time.perf_counter()
    meta = write_capture(args.out, cap, model)
    t3 = time.perf_counter()
    print(
        f"captured {meta['n_tokens']} tokens, layers {meta['layers']} -> {args.out}\n"
        f"  load+tokenise {t1 - t0:.1f} s, prefill with capture {cap.seconds:.1f} s "
        f"({meta['n_tokens'] / cap.seconds:.0f} tok/s), KV-cache check {t2 - t1 - cap.seconds:.1f} s, "
        f"write {t3 - t2:.1f} s, total {t3 - t0:.1f} s\n"
        f"  K/V == paged KV cache (float16) for every position: ok\n"
        f"  next token: {model.tokenizer.decode([int(np.argmax(cap.logits))])!r}"
    )
    if args.stats:
        sys.path.insert(0, str(Path(__file__).parent))
        import stats

        print()
        print(stats.format_table(stats.compute(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
