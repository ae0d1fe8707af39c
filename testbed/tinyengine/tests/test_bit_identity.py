"""The crucial property: a prefix's KV copied in from elsewhere gives bit-identical
results to recomputing it (np.array_equal on float32 logits, same greedy tokens)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import long_prompt

import tinyengine as te

LAYOUTS = ["flash_attn", "flashinfer"]
NEW_TOKENS = 3


class CopyFromEngine(te.KVHooks):
    """Offers ``num_tokens`` of prefix that ``src`` computed for ``src_req``,
    copying the blocks byte for byte from the source engine's cache."""

    def __init__(self, src: te.Engine, src_req: te.Request, num_tokens: int) -> None:
        self.src, self.src_req, self.num_tokens = src, src_req, num_tokens
        self.loaded: list[int] = []

    def lookup(self, request):
        assert request.block_hashes[: self.num_tokens // 16] == self.src_req.block_hashes[: self.num_tokens // 16]
        return self.num_tokens

    def load(self, request, block_ids, kv_cache):
        src_ids = self.src_req.block_ids[: len(block_ids)]
        assert not set(src_ids) & set(block_ids), "test wants different block ids on both sides"
        for layer in range(len(kv_cache)):
            for s, d in zip(src_ids, block_ids):
                data = self.src.kv_cache.read_block(layer, s)
                kv_cache.write_block(layer, d, data)
                assert kv_cache.read_block(layer, d).tobytes() == data.tobytes()
        self.loaded = list(block_ids)


def run_one(model, prompt, layout, hooks=None, junk_blocks=0, num_blocks=24, new_tokens=NEW_TOKENS):
    eng = te.Engine(model, num_blocks=num_blocks, layout=layout, hooks=hooks)
    if junk_blocks:
        eng.allocator.allocate(junk_blocks)  # shift the block ids this engine hands out
    req = eng.add_request(prompt, new_tokens, ignore_eos=True, record_logits=True)
    eng.run()
    return eng, req


def assert_identical(a: te.Request, b: te.Request) -> None:
    assert a.output_token_ids == b.output_token_ids
    assert len(a.logits) == len(b.logits) == len(a.output_token_ids)
    for x, y in zip(a.logits, b.logits):
        assert x.dtype == np.float32
        assert np.array_equal(x, y)


def block_bytes(eng: te.Engine, req: te.Request, first: int, last: int) -> list[bytes]:
    return [
        eng.kv_cache.read_block(layer, req.block_ids[i]).tobytes()
        for i in range(first, last)
        for layer in range(len(eng.kv_cache))
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p_blocks,s_len", [(1, 1), (2, 16), (3, 21), (5, 9)])
def test_copied_prefix_is_bit_identical(model, tokenizer, layout, p_blocks, s_len):
    P = 16 * p_blocks
    full = long_prompt(tokenizer, P + s_len, seed=p_blocks)
    # 1. full recompute of P+S
    ref_eng, ref = run_one(model, full, layout)
    assert ref.num_loaded_tokens == 0
    # 2. engine A computes P only
    a_eng, a = run_one(model, full[:P], layout, new_tokens=1)
    # 3. engine B, block ids shifted, loads A's P blocks bytewise and computes S only
    hooks = CopyFromEngine(a_eng, a, P)
    b_eng, b = run_one(model, full, layout, hooks=hooks, junk_blocks=5)
    assert hooks.loaded and b.num_loaded_tokens == P
    assert b.num_computed_locally == s_len + NEW_TOKENS - 1
    assert_identical(ref, b)
    # the KV of every block B computed itself equals the recomputed one, byte for byte
    n_full = (P + s_len + NEW_TOKENS - 1) // 16
    assert len(b.block_ids) >= n_full
    # (blocks were freed at finish, but nothing overwrote them)
    assert block_bytes(b_eng, b, 0, n_full) == block_bytes(ref_eng, ref, 0, n_full)


def test_store_shared_across_layouts(model, tokenizer):
    """Blocks saved by a FlashAttention-layout engine load into a FlashInfer-layout
    engine (through the canonical per-block form) with identical results."""
    full = long_prompt(tokenizer, 64 + 7, seed=11)
    _, ref = run_one(model, full, "flashinfer")
    store = te.InMemoryKVStore()
    run_one(model, full[:64], "flash_attn", hooks=store, new_tokens=1)
    assert len(store.blocks) == 4
    _, b = run_one(model, full, "flashinfer", hooks=store, junk_blocks=3)
    assert b.num_loaded_tokens == 64
    assert_identical(ref, b)


def test_identity_check_has_teeth(model, tokenizer):
    """Flip the lowest mantissa bit of one loaded float16 K value: the logits
    must change, so array_equal above really compares what was loaded."""
    full = long_prompt(tokenizer, 32 + 4, seed=21)
    _, ref = run_one(model, full, "flash_attn", new_tokens=1)
    a_eng, a = run_one(model, full[:32], "flash_attn", new_tokens=1)

    class Tweaked(CopyFromEngine):
        def load(self, request, block_ids, kv_cache):
            super().load(request, block_ids, kv_cache)
            k = kv_cache.key_cache(7)
            k.view(np.uint16)[block_ids[1], 5, 2, 17] ^= 1

    _, b = run_one(model, full, "flash_attn", hooks=Tweaked(a_eng, a, 32), junk_blocks=4, new_tokens=1)
    assert not np.array_equal(ref.logits[0], b.logits[0])
