"""Attend through the Python client against a real daemon, and the numpy
merge against a float64 reference."""

import numpy as np
import pytest

import strata
from strata import AsyncClient, AttendSequence, Block, Client, Layout, Tier
from strata.merge import merge, partial
from strata.testing import Daemon

LAYERS, KV, D, TPB = 2, 2, 32, 16
HEADS = 4  # two query heads per KV head (GQA)


def layout(model: str = "test/attend") -> Layout:
    return Layout(model_id=model, dtype="f16", num_layers=LAYERS, num_kv_heads=KV, head_dim=D,
                  tokens_per_block=TPB)


def kv_data(n: int, seed: int):
    """K and V as stored (f16), (layers, tokens, kv_heads, head_dim)."""
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((LAYERS, n, KV, D)) * 0.5).astype(np.float16)
    v = rng.standard_normal((LAYERS, n, KV, D)).astype(np.float16)
    return k, v


def block(k, v, b: int, tokens: int = TPB) -> np.ndarray:
    """Block b's payload, (layers, 2, tokens, kv_heads, head_dim) f16."""
    t = slice(b * TPB, b * TPB + tokens)
    return np.ascontiguousarray(np.stack([k[:, t], v[:, t]], axis=1))


def key(seq: int, b: int) -> bytes:
    return bytes([seq]) + b.to_bytes(8, "big")


def put_chain(c: Client, ns, k, v, seq: int, blocks) -> list[bytes]:
    out = []
    for b in blocks:
        out.append(Block(key(seq, b), block(k, v, b), key(seq, b - 1) if b else None))
    c.put(ns, out)
    return [x.key for x in out]


def relerr(o, ref) -> float:
    return float(np.linalg.norm(np.asarray(o, np.float64) - ref) / np.linalg.norm(ref))


# ---- merge, against float64 --------------------------------------------------

def test_merge_of_disjoint_parts_is_attention_over_the_union():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((HEADS, D))
    k = rng.standard_normal((300, KV, D))
    v = rng.standard_normal((300, KV, D))
    o_all, lse_all = partial(q, k, v)
    cut = rng.permutation(300)
    parts = [cut[:17], cut[17:200], cut[200:]]
    o, lse = partial(q, k[parts[0]], v[parts[0]])
    for p in parts[1:]:
        o_p, lse_p = partial(q, k[p], v[p])
        o, lse = merge(o, lse, o_p, lse_p)
    assert o.dtype == np.float64
    np.testing.assert_allclose(o, o_all, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, lse_all, rtol=1e-12)
    # float32 inputs stay float32; batch dimensions broadcast.
    o32, lse32 = merge(np.stack([o_all] * 3).astype(np.float32), np.stack([lse_all] * 3).astype(np.float32),
                       np.zeros((3, HEADS, D), np.float32), np.full((3, HEADS), -np.inf, np.float32))
    assert o32.dtype == np.float32 and o32.shape == (3, HEADS, D)
    np.testing.assert_allclose(o32[1], o_all, rtol=1e-6)


def test_merge_handles_empty_sets_and_huge_scores():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 8))
    k = rng.standard_normal((5, 1, 8))
    v = rng.standard_normal((5, 1, 8))
    o, lse = partial(q, k, v)
    o_e, lse_e = partial(q, k[:0], v[:0])
    assert (lse_e == -np.inf).all() and (o_e == 0).all()
    for a, b in [((o, lse), (o_e, lse_e)), ((o_e, lse_e), (o, lse))]:
        m_o, m_lse = merge(*a, *b)
        np.testing.assert_array_equal(m_o, o)
        np.testing.assert_array_equal(m_lse, lse)
    m_o, m_lse = merge(o_e, lse_e, o_e, lse_e)
    assert (m_lse == -np.inf).all() and (m_o == 0).all() and not np.isnan(m_o).any()
    # Scores of magnitude 1e4: no overflow, the dominant side wins.
    m_o, m_lse = merge(o, lse + 1e4, np.ones_like(o), lse)
    np.testing.assert_allclose(m_o, o)
    np.testing.assert_allclose(m_lse, lse + 1e4)
    with pytest.raises(ValueError):
        merge(o, lse, o[:1], lse)
    with pytest.raises(ValueError):
        merge(o, lse, o, np.full_like(lse, np.nan))


# ---- against the daemon ------------------------------------------------------

def test_dense_attend_merged_with_the_client_part(daemon):
    n = 1024
    k, v = kv_data(n, 2)
    blocks = n // TPB
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(layout())
        keys = put_chain(c, ns, k, v, 1, range(blocks - 2))  # the engine keeps the last two
        q = np.random.default_rng(3).standard_normal((HEADS, D)).astype(np.float32)
        for layer in range(LAYERS):
            [r] = c.attend(ns, [AttendSequence(keys, q)], layer)
            assert r.o.shape == (HEADS, D) and r.o.dtype == np.float32
            assert r.keys_present == blocks - 2 and r.exact
            assert r.covered == [(0, (blocks - 2) * TPB)]
            assert r.read_blocks(Tier.DRAM) == blocks - 2
            assert r.read_bytes(Tier.DRAM) == (blocks - 2) * 2 * TPB * KV * D * 2
            mine = slice((blocks - 2) * TPB, n)
            o_c, lse_c = partial(q, k[layer, mine], v[layer, mine])
            o, lse = merge(r.o, r.lse, o_c, lse_c)
            o_ref, lse_ref = partial(q, k[layer], v[layer])
            assert relerr(o, o_ref) <= 5e-4, relerr(o, o_ref)
            np.testing.assert_allclose(lse, lse_ref, rtol=1e-5)
            o2, _ = r.merged(o_c, lse_c)
            np.testing.assert_allclose(o2, o, rtol=1e-6)


def test_sparse_and_sparf_with_every_token_are_dense(daemon):
    n = 512
    k, v = kv_data(n, 4)
    with Client(daemon.unix_endpoint) as c:
        ns = c.register_layout(layout("test/attend-modes"))
        keys = put_chain(c, ns, k, v, 2, range(n // TPB))
        q = np.random.default_rng(5).standard_normal((HEADS, D)).astype(np.float32)
        [dense] = c.attend(ns, [(keys, q)], 1)
        [sp] = c.attend(ns, [(keys, q)], 1, "sparse", budget_tokens=n)
        [sf] = c.attend(ns, [(keys, q)], 1, "sparf", sparf_channels=D, sparf_tokens=n)
        for r in (sp, sf):
            np.testing.assert_array_equal(r.o, dense.o)
            np.testing.assert_array_equal(r.lse, dense.lse)
        [sp] = c.attend(ns, [(keys, q)], 1, strata.AttendMode.SPARSE)
        assert not sp.exact and sp.sink_included and sp.recent_included
        assert sp.tokens_attended >= int(np.ceil(0.05 * n)) and sp.abstract_bytes > 0
        [sf] = c.attend(ns, [(keys, q)], 1, "sparf")
        assert len(sf.head_covered) == KV and sf.tokens_attended == n // 16
        # The daemon's partial is a true partial: its lse never exceeds the dense one.
        assert (sp.lse <= dense.lse + 1e-5).all() and (sf.lse <= dense.lse + 1e-5).all()


def test_a_missing_block_ends_the_prefix_and_bad_input_names_the_field(daemon):
    n = 256
    k, v = kv_data(n, 6)
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(layout("test/attend-bad"))
        keys = put_chain(c, ns, k, v, 3, range(n // TPB))
        c.delete(ns, [keys[5]])
        q = np.ones((HEADS, D), np.float32)
        [r] = c.attend(ns, [(keys, q)], 0)
        assert r.keys_present == 5 and r.tokens_present == 5 * TPB and r.covered == [(0, 5 * TPB)]
        o_ref, _ = partial(q, k[0, :5 * TPB], v[0, :5 * TPB])
        assert relerr(r.o, o_ref) <= 5e-4
        with pytest.raises(strata.InvalidArgument) as e:
            c.attend(ns, [(keys, np.ones((3, D), np.float32))], 0)
        assert e.value.message.startswith("sequences[0].queries: 3 heads is not a multiple")
        with pytest.raises(strata.InvalidArgument) as e:
            c.attend(ns, [(keys, q)], LAYERS)
        assert e.value.message.startswith(f"layer: {LAYERS} is out of range")
        with pytest.raises(strata.InvalidArgument) as e:
            c.attend(ns, [([], q)], 0)
        assert e.value.message.startswith("sequences[0].keys")
        with pytest.raises(ValueError):
            c.attend(ns, [(keys, q)], 0, "fast")


async def test_async_attend(daemon):
    n = 128
    k, v = kv_data(n, 7)
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(layout("test/attend-aio"))
        keys = put_chain(c, ns, k, v, 4, range(n // TPB))
    q = np.random.default_rng(8).standard_normal((HEADS, D)).astype(np.float32)
    async with AsyncClient(daemon.unix_endpoint) as c:
        rs = await c.attend(ns, [(keys, q), (keys[:2], q[:KV])], 1)
    assert [r.keys_present for r in rs] == [n // TPB, 2]
    o_ref, _ = partial(q, k[1], v[1])
    assert relerr(rs[0].o, o_ref) <= 5e-4
    assert rs[1].o.shape == (KV, D)


def test_sparf_by_token_and_mean_correction(daemon):
    """``sparf_by_token`` and ``sparf_mean_correction`` reach the daemon: a
    corrected answer (key sketches on: the V sums live beside them) is
    flagged, is ``alpha o + (1 - alpha) mean(V)`` of the uncorrected one and
    is never merged; without sketches the flag answers uncorrected; with
    another mode it is refused, naming the field."""
    n = 1024
    k, v = kv_data(n, 9)
    q = np.random.default_rng(10).standard_normal((HEADS, D)).astype(np.float32)
    sketched = Daemon(dram="64MiB", nvme="256MiB", config="[compute]\nkey_sketch = true\n").start()
    try:
        with Client(sketched.endpoint) as c:
            ns = c.register_layout(layout("test/attend-mean"))
            keys = put_chain(c, ns, k, v, 5, range(n // TPB))
            [plain] = c.attend(ns, [(keys, q)], 1, "sparf")
            [corr] = c.attend(ns, [(keys, q)], 1, "sparf", sparf_mean_correction=True)
            [tok] = c.attend(ns, [(keys, q)], 1, "sparf", sparf_by_token=True)
    finally:
        sketched.close()
    assert plain.mergeable and not plain.mean_corrected
    assert corr.mean_corrected and not corr.mergeable and not corr.exact
    assert corr.head_covered == plain.head_covered
    alpha = np.exp(plain.lse.astype(np.float64) - corr.lse)
    assert ((alpha > 0) & (alpha < 1)).all(), alpha
    mean = v[1].astype(np.float64).mean(axis=0)  # (kv_heads, head_dim)
    g = HEADS // KV
    want = alpha[:, None] * plain.o + (1 - alpha[:, None]) * np.repeat(mean, g, axis=0)
    np.testing.assert_allclose(corr.o, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mean-corrected"):
        corr.merged(np.zeros_like(corr.o), np.full_like(corr.lse, -np.inf))
    # Single tokens: not whole blocks.
    assert tok.tokens_attended == n // 16 and not tok.mean_corrected
    assert any(s % TPB or e % TPB for h in tok.head_covered for s, e in h)
    assert all(s % TPB == 0 and e % TPB == 0 for h in plain.head_covered for s, e in h)
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(layout("test/attend-mean-plain"))
        keys = put_chain(c, ns, k, v, 6, range(n // TPB))
        [plain] = c.attend(ns, [(keys, q)], 1, "sparf")
        [asked] = c.attend(ns, [(keys, q)], 1, "sparf", sparf_mean_correction=True)
        assert not asked.mean_corrected and asked.mergeable
        np.testing.assert_array_equal(asked.o, plain.o)
        asked.merged(np.zeros_like(asked.o), np.full_like(asked.lse, -np.inf))
        with pytest.raises(strata.InvalidArgument) as e:
            c.attend(ns, [(keys, q)], 1, "dense", sparf_mean_correction=True)
        assert e.value.message.startswith("sparf_mean_correction: only SPARF")


def test_sparf_joint_heads(daemon):
    """``sparf_joint_heads`` reaches the daemon: one token set for the
    layer, the same for every KV head, whole blocks, k tokens in all (fewer
    blocks than the per-head choice's union); with another mode it is
    refused, naming the field."""
    n = 1024
    k, v = kv_data(n, 11)
    q = np.random.default_rng(12).standard_normal((HEADS, D)).astype(np.float32)
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(layout("test/attend-joint"))
        keys = put_chain(c, ns, k, v, 7, range(n // TPB))
        [own] = c.attend(ns, [(keys, q)], 1, "sparf")
        [joint] = c.attend(ns, [(keys, q)], 1, "sparf", sparf_joint_heads=True)
        assert joint.mergeable and not joint.exact
        assert all(h == joint.head_covered[0] for h in joint.head_covered)
        assert sum(e - s for s, e in joint.head_covered[0]) == n // 16
        assert all(s % TPB == 0 and e % TPB == 0 for s, e in joint.head_covered[0])
        union = {t // TPB for h in own.head_covered for s, e in h for t in range(s, e)}
        assert (n // 16) // TPB <= len(union)
        with pytest.raises(strata.InvalidArgument) as e:
            c.attend(ns, [(keys, q)], 1, "sparse", sparf_joint_heads=True)
        assert e.value.message.startswith("sparf_joint_heads: only SPARF")


def test_attend_by_tail_and_packed_io(daemon):
    """A chain named by its tail answers as its keys; f16/bf16 queries and
    outputs on the wire give the float32 answer to the same (rounded)
    queries, rounded once."""
    from strata import _wire
    from strata.v1 import strata_pb2 as pb
    n = 512
    k, v = kv_data(n, 11)
    with Client(daemon.endpoint) as c:
        ns = c.register_layout(layout("test/attend-tail"))
        keys = put_chain(c, ns, k, v, 4, range(n // TPB))
        q = np.random.default_rng(12).standard_normal((HEADS, D)).astype(np.float32)
        for mode in ("dense", "sparf"):
            [by_keys] = c.attend(ns, [AttendSequence(keys, q)], 1, mode)
            [by_tail] = c.attend(ns, [AttendSequence.tail(keys[-1], len(keys), q)], 1, mode)
            np.testing.assert_array_equal(by_tail.o, by_keys.o)
            np.testing.assert_array_equal(by_tail.lse, by_keys.lse)
            assert by_tail.keys_present == len(keys) and by_tail.covered == by_keys.covered
        [none] = c.attend(ns, [AttendSequence.tail(b"\x09" * 9, 3, q)], 0)
        assert none.keys_present == 0 and np.isneginf(none.lse).all()
        with pytest.raises(strata.InvalidArgument) as e:
            c.attend(ns, [AttendSequence.tail(keys[-1], len(keys) + 1, q)], 0)
        assert e.value.message.startswith("sequences[0].chain_blocks: is ")
        for io, np_io in (("f16", pb.DTYPE_F16), ("bf16", pb.DTYPE_BF16)):
            qr = _wire.unpack(_wire.pack(q, np_io), np_io).reshape(HEADS, D)
            [plain] = c.attend(ns, [(keys, qr)], 0)
            [packed] = c.attend(ns, [(keys, q)], 0, io_dtype=io)
            assert packed.o.dtype == np.float32 and packed.o.shape == (HEADS, D)
            np.testing.assert_array_equal(packed.lse, plain.lse)
            rounded = _wire.unpack(_wire.pack(plain.o, np_io), np_io).reshape(HEADS, D)
            np.testing.assert_array_equal(packed.o, rounded)
            req = _wire.attend_request(ns, [(keys, q)], 0, "dense", None, None, None, None, None,
                                       io=io)
            assert len(req.sequences[0].queries_packed) == 2 * HEADS * D
            assert len(req.sequences[0].queries) == 0
        with pytest.raises(ValueError):
            c.attend(ns, [(keys, q)], 0, io_dtype="fp8")


def test_min_precision_lets_the_daemon_use_its_int8_copies():
    """With ``compute.quant_bytes``, ``min_precision="int8"`` lets the
    daemon compute on int8 copies of layers it holds only on NVMe: after a
    restart the first such call reads the device (exact) and keeps copies,
    the second reads no device byte, says so and stays close; the answer
    still merges. An unknown name and RETRIEVAL are refused."""
    n = 256
    k, v = kv_data(n, 31)
    q = np.random.default_rng(32).standard_normal((HEADS, D)).astype(np.float32)
    cfg = '[compute]\nquant_bytes = "8MiB"\nhotness = false\n'
    with Daemon(config=cfg) as d:
        with Client(d.endpoint) as c:
            ns = c.register_layout(layout("test/attend-quant"))
            keys = put_chain(c, ns, k, v, 9, range(n // TPB))
        d.stop()  # drains DRAM down to NVMe
        d.start()
        with Client(d.endpoint) as c:
            [exact] = c.attend(ns, [(keys, q)], 1, "dense")
            [first] = c.attend(ns, [(keys, q)], 1, "dense", min_precision="int8")
            [second] = c.attend(ns, [(keys, q)], 1, "dense", min_precision="int8")
            assert exact.exact and exact.read_bytes(Tier.NVME) > 0
            assert first.exact and first.quantized_blocks == 0
            np.testing.assert_array_equal(first.o, exact.o)
            assert second.quantized_blocks == n // TPB and second.quantized_bytes > 0
            assert not second.exact and second.read_bytes(Tier.NVME) == 0
            assert second.mergeable
            assert relerr(second.o, exact.o) < 1e-2
            assert relerr(second.o, exact.o) > 0
            with pytest.raises(ValueError, match="min_precision 'int2'"):
                c.attend(ns, [(keys, q)], 1, "dense", min_precision="int2")
            with pytest.raises(strata.InvalidArgument) as e:
                c.attend(ns, [(keys, q)], 1, "retrieval", min_precision="int8")
            assert e.value.message.startswith("min_precision: RETRIEVAL")
