"""Fast checks of the Q/K/V capture (128 tokens, 2 layers):

    target/py/bin/python -m pytest -q testbed/capture
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import capture  # noqa: E402
import stats  # noqa: E402

import tinyengine as te  # noqa: E402

N = 128
LAYERS = [0, 29]


@pytest.fixture(scope="module")
def model():
    return te.load_model()


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, model):
    """A capture written through the command line."""
    d = tmp_path_factory.mktemp("cap")
    assert capture.main(["--tokens", str(N), "--layers", ",".join(map(str, LAYERS)), "--out", str(d)]) == 0
    return d


def _read_npy(path: Path) -> tuple[tuple[int, int], dict, np.ndarray]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    return version, {"shape": shape, "fortran": fortran, "dtype": dtype}, np.load(path, allow_pickle=False)


def test_build_prompt_exact_length(model):
    tok = model.tokenizer
    for n in (128, 2048, 4096):
        ids = capture.build_prompt(tok, n)
        assert len(ids) == n
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>system\n")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert "Question: Using only the notes above" in text
    with pytest.raises(ValueError):
        capture.build_prompt(tok, 100_000)
    with pytest.raises(ValueError):
        capture.build_prompt(tok, 16)


def test_files_and_meta(out_dir, model):
    cfg = model.config
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta == {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "layers": LAYERS,
        "num_q_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "n_tokens": N,
        "text_sha256": hashlib.sha256((out_dir / "prompt.txt").read_bytes()).hexdigest(),
        "tinyengine_version": capture.tinyengine_version(),
    }
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    tokens = np.load(out_dir / "tokens.npy")
    assert tokens.dtype == np.dtype("<i4") and tokens.shape == (N,)
    assert model.tokenizer.decode(tokens.tolist()).encode() == (out_dir / "prompt.txt").read_bytes()
    for L in LAYERS:
        for name, heads in (("q", 9), ("k", 3), ("v", 3)):
            version, hdr, a = _read_npy(out_dir / f"{name}_{L}.npy")
            assert version == (1, 0)
            assert hdr == {"shape": (N, heads, 64), "fortran": False, "dtype": np.dtype("<f4")}
            assert a.flags.c_contiguous and np.all(np.isfinite(a))
            assert np.all(np.any(a != 0, axis=(1, 2))), f"{name}_{L}: a position was left zero"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["meta.json", "prompt.txt", "tokens.npy"] + [f"{n}_{L}.npy" for L in LAYERS for n in "qkv"]
    )


def test_capture_matches_kv_cache_and_rope(out_dir, model):
    """The files hold what the paged cache holds (float16-rounded), and Q/K are post-RoPE."""
    ids = np.load(out_dir / "tokens.npy").tolist()
    cap = capture.run_capture(model, ids, LAYERS, layout="flashinfer")  # asserts the cache equality itself
    for L in LAYERS:
        k = np.load(out_dir / f"k_{L}.npy")
        v = np.load(out_dir / f"v_{L}.npy")
        q = np.load(out_dir / f"q_{L}.npy")
        # the other layout computes the same bits
        assert np.array_equal(k, cap.k[L]) and np.array_equal(v, cap.v[L]) and np.array_equal(q, cap.q[L])
        assert k.astype(np.float16).tobytes() == cap.cache_k[L].tobytes()
        assert v.astype(np.float16).tobytes() == cap.cache_v[L].tobytes()
    # Layer 0 recomputed independently in float64 from the embeddings: Q/K are post-RoPE.
    L0 = model.layers[0]
    x = model.embedding[np.asarray(ids)].astype(np.float64)
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + model.config.rms_norm_eps) * L0.attn_norm
    qkv = h @ L0.wqkv.astype(np.float64)
    pos = np.arange(N, dtype=np.float64)
    inv = 1.0 / (model.config.rope_theta ** (np.arange(0, 64, 2) / 64.0))
    ang = np.concatenate([np.outer(pos, inv)] * 2, axis=-1)[:, None, :]

    def rope(t):
        return t * np.cos(ang) + np.concatenate([-t[..., 32:], t[..., :32]], axis=-1) * np.sin(ang)

    q_ref = rope(qkv[:, : 9 * 64].reshape(N, 9, 64))
    k_ref = rope(qkv[:, 9 * 64 : 12 * 64].reshape(N, 3, 64))
    v_ref = qkv[:, 12 * 64 :].reshape(N, 3, 64)
    for name, ref in (("q", q_ref), ("k", k_ref), ("v", v_ref)):
        got = np.load(out_dir / f"{name}_0.npy")
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-5, (name, err)
    pre = qkv[:, 9 * 64 : 12 * 64].reshape(N, 3, 64)
    assert np.abs(np.load(out_dir / "k_0.npy")[1:] - pre[1:]).max() > 0.1 * np.abs(pre).max()


def test_hook_changes_no_bits(model):
    """Logits and every KV byte are identical with the hook on every layer and without it."""
    ids = capture.build_prompt(model.tokenizer, N)[:80]

    def run(with_hook: bool) -> tuple[list[np.ndarray], list[bytes], int]:
        eng = te.Engine(model, num_blocks=8)
        req = eng.add_request(ids, max_new_tokens=4, ignore_eos=True, record_logits=True)
        calls = []
        if with_hook:
            with model.capturing(lambda layer, q, k, v, pos: calls.append((layer, pos.tolist()))):
                eng.run()
        else:
            eng.run()
        assert model.capture is None and model.capture_layers is None
        return req.logits, [c.tobytes() for c in eng.kv_caches], calls

    plain, kv_plain, _ = run(False)
    hooked, kv_hooked, calls = run(True)
    assert len(plain) == len(hooked) == 4
    assert all(a.tobytes() == b.tobytes() for a, b in zip(plain, hooked))
    assert kv_plain == kv_hooked
    # 5 prefill tiles (16 rows each) then 3 decode tiles of one row, on all 30 layers
    per_layer = [p for layer, p in calls if layer == 0]
    assert per_layer == [list(range(s, s + 16)) for s in range(0, 80, 16)] + [[80], [81], [82]]
    assert len(calls) == 30 * 8


def test_capturing_restores_and_validates(model):
    with pytest.raises(ValueError):
        with model.capturing(lambda *a: None, layers=[30]):
            pass
    assert model.capture is None
    with pytest.raises(RuntimeError):
        with model.capturing(lambda *a: None, layers=[0]):
            assert model.capture_layers == frozenset([0])
            raise RuntimeError
    assert model.capture is None and model.capture_layers is None


def test_stats_run(out_dir):
    rows = stats.compute(out_dir)
    assert [(r.layer, r.kv_head) for r in rows] == [(L, g) for L in LAYERS for g in range(3)]
    for r in rows:
        assert 0.0 < r.top1_nosink <= r.top2_nosink <= r.top2 <= 1.0 + 1e-9
        assert 0.0 <= r.sink <= 1.0 and 0.0 <= r.jaccard100 <= 1.0 and r.ood > 0.0
    assert "| layer |" in stats.format_table(rows)
