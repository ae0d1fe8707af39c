"""Constants and helpers of the engine proofs (the fixtures are in
conftest.py). A module of its own so that test files import it by a
unique name: ``conftest`` is ambiguous when pytest also collects
clients/python/tests in the same run."""

from __future__ import annotations

import numpy as np
import tinyengine as te

from strata import Layout

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BLOCK = 16

# Blocks are 30 layers x K,V x 16 tokens x 3 heads x 64 x f16 = 360 KiB.
# Write-through so that a daemon killed mid-run keeps what it acknowledged.
WRITE_THROUGH = "[tiers.nvme]\nwrite_through = true\n"

SYSTEM = ("You are Strata's test assistant. Answer in one short sentence, plainly, "
          "without lists or code. Be factual and polite.")


def smollm_layout(**kw) -> Layout:
    base = dict(model_id=MODEL_ID, dtype="f16", num_layers=30, num_kv_heads=3, head_dim=64,
                tokens_per_block=BLOCK)
    base.update(kw)
    return Layout(**base)


class Reference:
    """Recomputes a prompt with no KV store (cached per prompt), the
    baseline every Strata-served run must match bit for bit."""

    def __init__(self, model):
        self.model = model
        self._cache: dict = {}

    def __call__(self, prompt_ids, max_new_tokens: int, layout: str = "flash_attn"):
        k = (tuple(prompt_ids), max_new_tokens)
        if k not in self._cache:
            eng = te.Engine(self.model, num_blocks=4 + (len(prompt_ids) + max_new_tokens) // BLOCK,
                            layout=layout)
            r = eng.add_request(list(prompt_ids), max_new_tokens=max_new_tokens, record_logits=True,
                                ignore_eos=True)
            eng.run()
            self._cache[k] = (list(r.output_token_ids), [l.copy() for l in r.logits])
        return self._cache[k]


def assert_identical(req, ref) -> None:
    """Same tokens, and every logit vector equal bit for bit."""
    tokens, logits = ref
    assert list(req.output_token_ids) == tokens
    assert len(req.logits) == len(logits)
    for i, (a, b) in enumerate(zip(req.logits, logits)):
        assert a.dtype == b.dtype and np.array_equal(a, b), f"logits of output token {i} differ"
