import threading
import time

import pytest

import strata
from strata import Block, Client, Tier
from strata.events import BlockView, EventFeed, Reset
from strata.keys import chain_keys
from strata.testing import Daemon
from strata.types import BlockRemoved, BlockStored

from conftest import payload, small_layout


def until(pred, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_raw_subscription_orders_events_with_parents(daemon):
    l = small_layout("test/events")
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(l)
        sub = c.subscribe([ns])
        try:
            hello = next(sub)
            assert hello.epoch and not hello.events
            keys = chain_keys(list(range(48)), 16)
            c.put(ns, [Block(k, payload(l, i), keys[i - 1] if i else None) for i, k in enumerate(keys)])
            c.delete(ns, keys[2:])
            got = []
            while len(got) < 4:
                got.extend(next(sub).events)
            assert [type(e) for e in got] == [BlockStored] * 3 + [BlockRemoved]
            assert [e.key for e in got[:3]] == keys
            assert [e.parent for e in got[:3]] == [None, keys[0], keys[1]]
            assert all(e.token_count == 16 and e.medium == Tier.DRAM for e in got[:3])
            assert got[3].key == keys[2] and got[3].medium == Tier.DRAM
            assert [e.seq for e in got] == sorted(e.seq for e in got)
        finally:
            sub.close()
        with pytest.raises(strata.InvalidArgument) as e:
            next(c.subscribe(max_batch=1 << 20))
        assert e.value.message.startswith("max_batch")


def test_feed_resyncs_across_a_daemon_restart(tmp_path):
    """A router's view built from the feed matches the daemon through
    puts, deletes and a restart (NVMe blocks come back; the feed resets and
    takes a snapshot)."""
    l = small_layout("test/feed")
    d = Daemon(data_dir=str(tmp_path), config="[tiers.nvme]\nwrite_through = true\n").start()
    view = BlockView()
    feed = EventFeed(d.endpoint, retry_s=0.1)
    t = threading.Thread(target=lambda: [view.apply(i) for i in feed], daemon=True)
    t.start()
    try:
        with Client(d.endpoint) as c:
            ns = c.register_layout(l)
            keys = chain_keys(list(range(160)), 16)
            c.put(ns, [Block(k, payload(l, i)) for i, k in enumerate(keys)])
            # Write-through: each block is in DRAM and on NVMe.
            assert until(lambda: all(view.blocks.get((ns.id, k)) == {Tier.DRAM, Tier.NVME} for k in keys))
            c.delete(ns, keys[:3])
            assert until(lambda: not any(view.has(ns.id, k) for k in keys[:3]))
        resets = view.resets
        d.stop()
        d.start()
        # After the restart the daemon holds the NVMe copies only; the feed
        # reconnects, resets, and its view follows.
        assert until(lambda: view.resets > resets, 30)
        assert until(lambda: all(view.blocks.get((ns.id, k)) == {Tier.NVME} for k in keys[3:]), 30)
        assert not any(view.has(ns.id, k) for k in keys[:3])
    finally:
        feed.close()
        d.close()
        t.join(10)


def test_vllm_shape_of_events(daemon):
    from strata.events import vllm_batch, vllm_event
    l = small_layout("test/events-vllm")
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(l)
        sub = c.subscribe([ns])
        try:
            next(sub)
            keys = chain_keys(list(range(32)), 16, seed=5)
            c.put(ns, [Block(k, payload(l, i), keys[i - 1] if i else None) for i, k in enumerate(keys)])
            c.delete(ns, keys[1:])
            got = []
            while len(got) < 3:
                b = next(sub)
                got.extend(b.events)
            shaped = vllm_batch(b)
            assert isinstance(shaped[0], float) and shaped[2] is None
        finally:
            sub.close()
    e0, e1, e2 = (vllm_event(e) for e in got)
    assert e0["type"] == "BlockStored" and e0["medium"] == "CPU" and e0["parent_block_hash"] is None
    assert e0["block_hashes"] == [int.from_bytes(keys[0][-8:], "big")] and e0["block_size"] == 16
    assert e1["parent_block_hash"] == e0["block_hashes"][0]
    assert e2 == {"type": "BlockRemoved", "block_hashes": e1["block_hashes"], "medium": "CPU"}
    assert vllm_event(Reset("x")) is None
    assert vllm_event(got[0], int_hashes=False)["block_hashes"] == [keys[0]]
