"""Shared fixtures of the engine proofs: the real model, real daemons and
the recompute reference every Strata-served run is compared with.

The proofs run SmolLM2-135M-Instruct in tinyengine (testbed/tinyengine),
whose results are bit-identical whenever the KV bytes are; so "the prefix
served by Strata gives exactly the output of recomputing it" is asserted
with ``np.array_equal`` on every logit vector.
"""

from __future__ import annotations

import pytest
import tinyengine as te

from strata.testing import Daemon

from proofkit import (BLOCK, MODEL_ID, SYSTEM, WRITE_THROUGH, Reference,  # noqa: F401 - re-exported
                      assert_identical, smollm_layout)


@pytest.fixture(scope="session")
def model():
    return te.load_model()


@pytest.fixture(scope="session")
def tok(model):
    return model.tokenizer


@pytest.fixture
def make_daemon(tmp_path):
    """``make_daemon(dram="16MiB", nvme="128MiB")``: a started stratad with
    write-through NVMe in its own data directory; closed at teardown."""
    made = []

    def make(dram: str = "16MiB", nvme: str = "128MiB", config: str = WRITE_THROUGH, **kw):
        d = Daemon(dram=dram, nvme=nvme, data_dir=str(tmp_path / f"d{len(made)}"), config=config, **kw)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.close()


@pytest.fixture(scope="session")
def reference(model):
    return Reference(model)
