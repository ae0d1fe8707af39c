"""Retrieval indexes through the Python client against a real daemon:
BuildIndex, Retrieve (index and exact fallback) and Attend "retrieval",
against numpy references on the same (f16-rounded) data."""

import numpy as np
import pytest

import strata
from strata import Block, Client, IndexState, Layout, RetrieveSource

KV, D, TPB, HEADS = 1, 32, 16, 2
BLOCKS = 64
N = BLOCKS * TPB


def layout() -> Layout:
    return Layout(model_id="test/retrieval", dtype="f16", num_layers=1, num_kv_heads=KV,
                  head_dim=D, tokens_per_block=TPB)


def key(b: int) -> bytes:
    return b"R" + b.to_bytes(8, "big")


@pytest.fixture(scope="module")
def stored(daemon):
    rng = np.random.default_rng(11)
    # Keys in a few clusters, so that an index has structure to use.
    centres = rng.standard_normal((16, D))
    k = (centres[rng.integers(0, 16, N)] + 0.5 * rng.standard_normal((N, D))).astype(np.float16)
    v = rng.standard_normal((N, D)).astype(np.float16)
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(layout())
        blocks = []
        for b in range(BLOCKS):
            t = slice(b * TPB, (b + 1) * TPB)
            # (layers, K/V, tokens, kv_heads, head_dim)
            payload = np.stack([k[t], v[t]])[None, :, :, None, :]
            blocks.append(Block(key(b), np.ascontiguousarray(payload), key(b - 1) if b else None))
        c.put(ns, blocks)
    train = (3.0 * centres[rng.integers(0, 16, (512, HEADS))]
             + rng.standard_normal((512, HEADS, D))).astype(np.float32)
    return ns, k.astype(np.float32), v.astype(np.float32), train, centres


def exact_top(k, q, n):
    s = k.astype(np.float64) @ q.astype(np.float64)
    return set(np.argsort(-s, kind="stable")[:n].tolist())


def queries(centres, seed):
    rng = np.random.default_rng(seed)
    return (3.0 * centres[rng.integers(0, 16, HEADS)]
            + rng.standard_normal((HEADS, D))).astype(np.float32)


def test_fallback_then_index(daemon, stored):
    ns, k, v, train, centres = stored
    keys = [key(b) for b in range(BLOCKS)]
    q = queries(centres, 1)
    with Client(daemon.endpoint) as c:
        r = c.retrieve(ns, keys, 0, q, k=50)
        assert r.tokens_present == N and len(r.heads) == HEADS
        for h, hits in enumerate(r.heads):
            assert hits.source == RetrieveSource.EXACT_NO_INDEX
            assert hits.scanned == N
            assert len(hits.positions) == 50
            assert len(set(hits.positions.tolist()) & exact_top(k, q[h], 50)) >= 49
        b = c.build_index(ns, keys, training={0: train}, wait=True)
        assert b.keys_covered == BLOCKS and b.tokens_covered == N
        assert b.ready, b.indexes
        st = b.indexes[0]
        assert (st.layer, st.kv_head, st.state, st.tokens) == (0, 0, IndexState.READY, N)
        assert st.memory_bytes > 0
        stats = c.stats()
        assert stats.retrieval_indexes >= 1 and stats.retrieval_index_bytes >= st.memory_bytes
        recall = []
        for seed in range(2, 10):
            q = queries(centres, seed)
            r = c.retrieve(ns, keys, 0, q)
            for h, hits in enumerate(r.heads):
                assert hits.source == RetrieveSource.INDEX
                assert np.all(np.diff(hits.scores) <= 0)
                recall.append(len(set(hits.positions.tolist()) & exact_top(k, q[h], 100)) / 100)
        assert np.mean(recall) >= 0.9, np.mean(recall)


def test_attend_retrieval_is_exact_over_what_it_covered(daemon, stored):
    ns, k, v, train, centres = stored
    keys = [key(b) for b in range(BLOCKS)]
    with Client(daemon.endpoint) as c:
        assert c.build_index(ns, keys, training={0: train}, wait=True).ready
        q = queries(centres, 20)
        (res,) = c.attend(ns, [(keys, q)], layer=0, mode="retrieval", retrieval_k=64)
        assert res.retrieval_source == [RetrieveSource.INDEX]
        assert len(res.retrieval_scanned) == HEADS
        assert not res.exact
        (covered,) = res.head_covered
        tokens = [t for a, b in covered for t in range(a, b)]
        assert len(tokens) >= 64
        scale = 1 / np.sqrt(D)
        for h in range(HEADS):
            s = scale * (k[tokens].astype(np.float64) @ q[h].astype(np.float64))
            w = np.exp(s - s.max())
            o = (w[:, None] * v[tokens]).sum(0) / w.sum()
            assert np.linalg.norm(res.o[h] - o) / np.linalg.norm(o) < 1e-3
            assert abs(res.lse[h] - (s.max() + np.log(w.sum()))) < 1e-3


def test_async_client(daemon, stored):
    import asyncio

    ns, k, v, train, centres = stored
    keys = [key(b) for b in range(BLOCKS)]

    async def go():
        async with strata.AsyncClient(daemon.endpoint) as c:
            b = await c.build_index(ns, keys, training={0: train}, wait=True)
            assert b.ready
            q = queries(centres, 30)
            r = await c.retrieve(ns, keys, 0, q, k=10)
            assert [h.source for h in r.heads] == [RetrieveSource.INDEX] * HEADS
            assert all(len(h.positions) == 10 for h in r.heads)

    asyncio.run(go())


def test_bad_input_names_the_field(daemon, stored):
    ns = stored[0]
    keys = [key(b) for b in range(4)]
    with Client(daemon.endpoint) as c:
        with pytest.raises(strata.InvalidArgument, match="INVALID_ARGUMENT: k: "):
            c.retrieve(ns, keys, 0, np.zeros((HEADS, D), np.float32), k=2000)
        with pytest.raises(strata.InvalidArgument, match="INVALID_ARGUMENT: queries: "):
            c.retrieve(ns, keys, 0, np.zeros(D + 1, np.float32))
        with pytest.raises(strata.InvalidArgument, match=r"INVALID_ARGUMENT: layers\[0\]: "):
            c.build_index(ns, keys, layers=[5])


def test_kv_heads_selects_what_is_indexed(daemon):
    # Two KV heads, four query heads; only KV head 1 indexed at first.
    lay = Layout(model_id="test/retrieval-kv2", dtype="f32", num_layers=1, num_kv_heads=2,
                 head_dim=D, tokens_per_block=TPB)
    rng = np.random.default_rng(5)
    k = rng.standard_normal((N, 2, D)).astype(np.float32)
    v = rng.standard_normal((N, 2, D)).astype(np.float32)
    keys = [b"Q" + b.to_bytes(8, "big") for b in range(BLOCKS)]
    q = rng.standard_normal((4, D)).astype(np.float32)
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(lay)
        blocks = []
        for b in range(BLOCKS):
            t = slice(b * TPB, (b + 1) * TPB)
            payload = np.stack([k[t], v[t]])[None]  # (layers, K/V, tokens, kv_heads, head_dim)
            blocks.append(Block(keys[b], np.ascontiguousarray(payload), keys[b - 1] if b else None))
        c.put(ns, blocks)
        b = c.build_index(ns, keys, kv_heads=[1], wait=True)
        assert b.ready and [(i.layer, i.kv_head) for i in b.indexes] == [(0, 1)]
        r = c.retrieve(ns, keys, 0, q, k=20)
        assert [h.source for h in r.heads] == [RetrieveSource.EXACT_NO_INDEX] * 2 \
            + [RetrieveSource.INDEX] * 2
        for h in (0, 1):
            assert r.heads[h].scanned == N
            assert len(set(r.heads[h].positions.tolist()) & exact_top(k[:, 0], q[h], 20)) >= 19
        with pytest.raises(strata.InvalidArgument, match=r"INVALID_ARGUMENT: kv_heads\[1\]: "):
            c.build_index(ns, keys, kv_heads=[0, 2])
        # Every head (kv_heads=None): the missing one is built too.
        b = c.build_index(ns, keys, wait=True)
        assert b.ready and [i.kv_head for i in b.indexes] == [0, 1]
        r = c.retrieve(ns, keys, 0, q, k=20)
        assert [h.source for h in r.heads] == [RetrieveSource.INDEX] * 4
