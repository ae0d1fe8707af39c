import numpy as np
import pytest

import strata
from strata import Block, LocalClient, PutResult, Tier
from strata.keys import chain_keys
from strata.testing import Daemon

from conftest import payload, small_layout


def test_zero_copy_put_and_load(daemon):
    l = small_layout("test/local")
    with LocalClient(daemon.uds) as lc:
        ns = lc.client.register_layout(l)
        keys = chain_keys(list(range(80)), 16)
        data = [payload(l, 100 + i) for i in range(5)]
        out = lc.put(ns, [Block(k, d, keys[i - 1] if i else None) for i, (k, d) in enumerate(zip(keys, data))])
        assert [o.result for o in out] == [PutResult.STORED] * 5
        assert lc.put(ns, [Block(keys[0], data[0])])[0].result == PutResult.ALREADY_PRESENT
        # The stream path sees the same bytes.
        assert lc.client.get(ns, keys[:1])[0].data == data[0].tobytes()
        # One copy out, verified, into engine-shaped buffers.
        dst = np.zeros((6, *l.block_shape()), np.float16)
        n = lc.load_prefix(ns, keys + [b"\x09" * 16], list(dst))
        assert n == 5
        for i in range(5):
            assert dst[i].tobytes() == data[i].tobytes()
        assert not dst[5].any()
        assert lc.client.stats().leases == 0  # released


def test_reserve_write_commit_views(daemon):
    l = small_layout("test/local-reserve")
    with LocalClient(daemon.uds) as lc:
        ns = lc.client.register_layout(l)
        res = lc.reserve(ns, [(b"r1", None, l.block_bytes), (b"r2", b"r1", l.token_bytes * 2)])
        assert all(r.view.flags.writeable for r in res)
        res[0].view[:] = payload(l, 7)
        res[1].view[:] = payload(l, 8, tokens=2)
        out = lc.commit(res)
        assert [o.result for o in out] == [PutResult.STORED] * 2
        slots = lc.lookup_slots(ns, [b"r1", b"r2"])
        try:
            assert [v.size for v in slots.views] == [l.block_bytes, 2 * l.token_bytes]
            assert slots.views[0].tobytes() == payload(l, 7).tobytes()
            assert slots.tiers == [Tier.DRAM, Tier.DRAM]
        finally:
            lc.release(slots.lease)
        # Aborted reservations leave nothing behind.
        res = lc.reserve(ns, [(b"r3", None, l.block_bytes)])
        assert lc.abort(res) == 1
        assert lc.client.lookup(ns, [b"r3"]).hits == 0


def test_nvme_hits_are_promoted_for_zero_copy_loads():
    # DRAM 8 MiB, blocks of 64 KiB, write-through (every put lands on NVMe
    # before it is acknowledged): the first blocks end up on NVMe only.
    l = strata.Layout("test/nvme", "f16", 8, 4, 64, 16)
    cfg = "[tiers.nvme]\nwrite_through = true\n"
    with Daemon(dram="8MiB", nvme="256MiB", config=cfg) as d, LocalClient(d.uds) as lc:
        ns = lc.client.register_layout(l)
        keys = chain_keys(list(range(16 * 300)), 16)
        data = [payload(l, 1000 + i) for i in range(len(keys))]
        for i in range(0, len(keys), 20):
            out = lc.put(ns, [Block(k, x) for k, x in zip(keys[i:i + 20], data[i:i + 20])])
            assert all(o.durable for o in out)
        r = lc.client.lookup(ns, keys[:10])
        assert r.hits == 10 and r.tiers == [Tier.NVME] * 10, r
        dst = np.zeros((10, l.block_bytes), np.uint8)
        assert lc.load_prefix(ns, keys[:10], list(dst)) == 10
        for i in range(10):
            assert dst[i].tobytes() == data[i].tobytes()


def test_restarted_daemon_refuses_the_old_mapping(tmp_path):
    l = small_layout("test/epoch")
    d = Daemon(data_dir=str(tmp_path)).start()
    try:
        lc = LocalClient(d.uds)
        ns = lc.client.register_layout(l)
        lc.put(ns, [Block(b"k", payload(l, 1))])
        d.stop()
        d.start()
        lc.client.register_layout(l)
        with pytest.raises(strata.ArenaChanged):
            lc.reserve(ns, [(b"k2", None, l.block_bytes)])
        lc.close()
        with LocalClient(d.uds) as again:
            assert again.put(ns, [Block(b"k2", payload(l, 2))])[0].result == PutResult.STORED
    finally:
        d.close()


def test_refused_uid_gets_a_clear_error(tmp_path):
    """A uid outside server.shm_allowed_uids gets the daemon's reason as a
    FailedPrecondition, and the stream path keeps working."""
    import os

    cfg = '[server]\nshm_allowed_uids = ["4242"]\n'
    assert os.getuid() != 4242
    with Daemon(data_dir=str(tmp_path), config=cfg) as d:
        with pytest.raises(strata.FailedPrecondition) as e:
            LocalClient(d.uds)
        assert f"uid {os.getuid()} may not map the arena" in e.value.message
        with strata.Client(d.unix_endpoint) as c:
            assert c.register_layout(small_layout("test/refused")).id
