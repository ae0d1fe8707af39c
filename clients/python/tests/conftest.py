import numpy as np
import pytest

from strata import Layout
from strata.testing import Daemon


@pytest.fixture(scope="module")
def daemon():
    d = Daemon(dram="64MiB", nvme="256MiB").start()
    yield d
    d.close()


def small_layout(model: str = "test/tiny", **kw) -> Layout:
    # 2 layers x K,V x 2 heads x 8 dims x f16 = 128 bytes per token, 16 tokens.
    base = dict(model_id=model, dtype="f16", num_layers=2, num_kv_heads=2, head_dim=8,
                tokens_per_block=16)
    base.update(kw)
    return Layout(**base)


def payload(layout: Layout, seed: int, tokens: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = layout.token_bytes * (tokens or layout.tokens_per_block)
    return rng.integers(0, 256, n, dtype=np.uint8)
