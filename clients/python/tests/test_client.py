import grpc
import numpy as np
import pytest

import strata
from strata import Block, Client, PutResult, Tier
from strata.testing import free_port

from conftest import payload, small_layout


def test_register_layout_is_deterministic(daemon):
    with Client(daemon.endpoint) as c:
        l = small_layout("test/register")
        ns = c.register_layout(l)
        assert ns.id == l.namespace_id()
        assert ns.block_bytes == l.block_bytes and ns.token_bytes == l.token_bytes
        assert not ns.existed
        assert c.register_layout(l).existed


@pytest.mark.parametrize("endpoint", ["tcp", "unix"])
def test_put_lookup_get_roundtrip(daemon, endpoint):
    ep = daemon.endpoint if endpoint == "tcp" else daemon.unix_endpoint
    l = small_layout(f"test/roundtrip-{endpoint}")
    with Client(ep) as c:
        ns = c.register_layout(l)
        keys = strata.keys.chain_keys(list(range(64)), 16) if hasattr(strata, "keys") else None
        from strata.keys import chain_keys
        keys = chain_keys(list(range(64)), 16)
        data = [payload(l, i) for i in range(4)]
        blocks = [Block(k, d, keys[i - 1] if i else None) for i, (k, d) in enumerate(zip(keys, data))]
        out = c.put(ns, blocks)
        assert [o.result for o in out] == [PutResult.STORED] * 4
        assert [o.key for o in out] == keys
        # Same bytes again: nothing rewritten.
        assert all(o.result == PutResult.ALREADY_PRESENT for o in c.put(ns, blocks[:2]))
        r = c.lookup(ns, keys + [b"\x01" * 16], lease_ttl_ms=5000)
        assert r.hits == 4 and r.tiers == [Tier.DRAM] * 4 and r.lease is not None
        got = c.get(ns, keys, lease=r.lease)
        assert [g.key for g in got] == keys
        for g, d in zip(got, data):
            assert g.data == d.tobytes() and g.tier == Tier.DRAM
        assert got[1].parent == keys[0] and got[0].parent is None
        assert c.release(r.lease) == 4
        # A partial last block (whole tokens) is fine.
        tail = payload(l, 99, tokens=3)
        assert c.put(ns, [Block(b"tail", tail)])[0].result == PutResult.STORED
        assert c.get(ns, [b"tail"])[0].data == tail.tobytes()


def test_blocks_larger_than_one_message(daemon):
    # 64 layers x 2 x 8 heads x 128 x f16 x 32 tokens = 8 MiB: two messages.
    l = strata.Layout("test/big", "f16", 64, 8, 128, 32)
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(l)
        d = np.random.default_rng(1).integers(0, 256, l.block_bytes, dtype=np.uint8)
        assert c.put(ns, [Block(b"big", d)])[0].result == PutResult.STORED
        assert c.get(ns, [b"big"])[0].data == d.tobytes()


def test_bad_input_is_a_typed_error_naming_the_field(daemon):
    l = small_layout("test/bad")
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(l)
        with pytest.raises(strata.InvalidArgument) as e:
            c.put(ns, [Block(b"k", np.zeros(l.token_bytes + 1, np.uint8))])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "length" in e.value.message and "token" in e.value.message
        with pytest.raises(strata.InvalidArgument) as e:
            c.lookup(ns, [b"x" * 33])
        assert e.value.message.startswith("keys[0]")
        with pytest.raises(strata.InvalidArgument) as e:
            c.register_layout(small_layout("test/bad", num_layers=0))
        assert "layout.num_layers" in e.value.message
        with pytest.raises(strata.NotFound):
            c.get(ns, [b"absent"])
        with pytest.raises(strata.StrataError) as e:
            c.lookup(12345, [b"k"])
        assert "namespace" in e.value.message
        # Different bytes under a present key: refused, the stored block kept.
        c.put(ns, [Block(b"same", payload(l, 1))])
        with pytest.raises(strata.AlreadyExists):
            c.put(ns, [Block(b"same", payload(l, 2))])
        assert c.get(ns, [b"same"])[0].data == payload(l, 1).tobytes()


def test_delete_and_stats(daemon):
    l = small_layout("test/delete")
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(l)
        c.put(ns, [Block(b"a", payload(l, 1)), Block(b"b", payload(l, 2))])
        r = c.delete(ns, [b"a", b"zz"])
        assert r.deleted == 1 and r.absent == [b"zz"]
        assert c.lookup(ns, [b"a"]).hits == 0
        s = c.stats()
        assert s.blocks >= 1 and any(t.tier == Tier.DRAM for t in s.tiers)


def test_daemon_down_is_unavailable():
    with Client(f"http://127.0.0.1:{free_port()}", timeout_s=2) as c:
        with pytest.raises(strata.Unavailable) as e:
            c.stats()
        assert e.value.retryable
