"""StoreLink: the adapters' shared link to the daemon, against a real stratad."""

import time

import numpy as np
import pytest

from strata.integrations.link import StoreLink
from strata.keys import chain_keys
from strata.testing import Daemon

from conftest import payload, small_layout

WRITE_THROUGH = "[tiers.nvme]\nwrite_through = true\n"


def blocks(layout, n, seed=0):
    return [payload(layout, seed * 1000 + i) for i in range(n)]


@pytest.mark.parametrize("zero_copy", [True, False])
@pytest.mark.parametrize("tcp", [False, True])
def test_save_then_load_verified(daemon, zero_copy, tcp):
    layout = small_layout(f"link/{zero_copy}/{tcp}")
    link = StoreLink(daemon.endpoint if tcp else daemon.unix_endpoint, layout, zero_copy=zero_copy)
    link.connect()
    assert link.is_local == (zero_copy and not tcp)
    keys = chain_keys(range(16 * 6), 16, seed=7)
    data = blocks(layout, 6)
    filled = []

    def fill(i, out):
        filled.append(i)
        out[:] = data[i]

    assert link.save(keys[:4], [None] + keys[:3], fill) == 4
    assert filled == [0, 1, 2, 3]
    # Present blocks are not filled again.
    filled.clear()
    assert link.save(keys[:5], [None] + keys[:4], fill) == 5
    assert filled == [4]
    assert link.lookup(keys)[0] == 5
    got = {}
    assert link.load(keys, lambda i, v: got.__setitem__(i, v.copy())) == 5
    assert sorted(got) == list(range(5))
    for i in range(5):
        assert np.array_equal(got[i], data[i])
    # Under a lease taken by a lookup (the scheduler's), the rest is held.
    hits, lease = link.lookup(keys, lease_ttl_ms=5000)
    assert hits == 5 and lease is not None
    got.clear()
    assert link.load(keys[:hits], lambda i, v: got.__setitem__(i, v.copy()), lease=lease) == 5
    link.release(lease)
    assert link.stats.blocks_loaded == 10
    link.close()


def test_daemon_down_is_a_miss_and_restart_resumes(tmp_path):
    layout = small_layout("link/restart")
    d = Daemon(dram="16MiB", nvme="64MiB", data_dir=str(tmp_path), config=WRITE_THROUGH).start()
    try:
        link = StoreLink(d.unix_endpoint, layout, retry_after_s=0.2, timeout_s=2.0)
        keys = chain_keys(range(16 * 3), 16, seed=1)
        data = blocks(layout, 3, seed=3)
        assert link.save(keys, [None] + keys[:2], lambda i, out: out.__setitem__(slice(None), data[i])) == 3
        d.kill()
        t0 = time.monotonic()
        assert link.lookup(keys) == (0, None)
        assert link.load(keys, lambda i, v: pytest.fail("nothing to load")) == 0
        assert link.save(keys, [None] * 3, lambda i, out: None) == 0
        assert time.monotonic() - t0 < 5
        assert link.stats.errors >= 1 and not link.healthy()
        d.start()
        time.sleep(0.3)
        assert link.lookup(keys)[0] == 3
        got = {}
        assert link.load(keys, lambda i, v: got.__setitem__(i, v.copy())) == 3
        assert all(np.array_equal(got[i], data[i]) for i in range(3))
        assert link.stats.reconnects + link.stats.errors >= 1
    finally:
        d.close()


def test_wrong_block_size_refused_at_connect(daemon):
    layout = small_layout("link/size")
    link = StoreLink(daemon.unix_endpoint, layout)
    link.connect()
    other = StoreLink(daemon.unix_endpoint, small_layout("link/size", head_dim=16))
    other.connect()
    assert other.namespace_id != link.namespace_id
    keys = chain_keys(range(16), 16, seed=2)
    data = payload(layout, 1)
    assert link.save(keys, [None], lambda i, out: out.__setitem__(slice(None), data)) == 1
    # A key stored under another layout is not visible here.
    assert other.lookup(keys)[0] == 0
    assert other.load(keys, lambda i, v: pytest.fail("must not load")) == 0


def test_long_saves_go_in_parts_and_hits_count_per_tier(daemon):
    layout = small_layout("link/parts")
    link = StoreLink(daemon.unix_endpoint, layout, save_part_bytes=2 * layout.block_bytes)
    keys = chain_keys(range(16 * 5), 16, seed=9)
    data = blocks(layout, 5, seed=4)
    seen = []

    def fill(i, out):
        seen.append(i)
        out[:] = data[i]

    assert link.save(keys, [None] + keys[:4], fill) == 5
    assert seen == [0, 1, 2, 3, 4] and link.stats.saves == 3
    assert link.lookup(keys)[0] == 5
    assert link.stats.extra["hits_dram"] == 5
    got = {}
    assert link.load(keys, lambda i, v: got.__setitem__(i, v.copy())) == 5
    assert all(np.array_equal(got[i], data[i]) for i in range(5))
