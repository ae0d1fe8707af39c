"""Proof of the SGLang HiCache backend (strata.integrations.sglang) against
real daemons: driven in SGLang's order (prefetch / prefetch-IO / backup
threads, host pool in SGLang's layouts) by tinyengine running the real
SmolLM2-135M, prefixes served through it give exactly the output of
recomputing them (DRAM and NVMe hits, every host layout, the zero-copy and
the legacy interface); a killed daemon costs recomputation only and answers
typed misses at once; many threads at once stay correct; another model, TP
rank or pool shape never loads; a page not intact never counts as loaded."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest
import tinyengine as te

from strata import Block, Client, Layout, LocalClient, Tier
from strata.integrations.link import StoreLink
from strata.integrations.sglang import HiCacheStorageConfig, StrataHiCacheStorage

from plain_hooks import StrataHooks
from proofkit import MODEL_ID, SYSTEM, assert_identical, smollm_layout
from sglang_driver import HiCacheHooks, MHAHostPool, MLAHostPool, sglang_page_hashes


NEW = 3
MHA_LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head"]
MLA_LAYOUTS = ["layer_first", "page_first", "page_first_direct"]


def make_backend(endpoint, pool, *, model=MODEL_ID, tp_rank=0, tp_size=1, mla=False, **extra):
    """A backend built and registered the way SGLang's dynamic factory does."""
    cfg = HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=pool.layout == "page_first",
        model_name=model, extra_config={"backend_name": "strata", "module_path": "strata.integrations.sglang",
                                        "class_name": "StrataHiCacheStorage", "interface_v1": 1,
                                        "endpoint": endpoint, **extra})
    backend = StrataHiCacheStorage(cfg, {})
    backend.register_mem_pool_host(pool)
    return backend


@pytest.fixture
def stack():
    """``stack(daemon, host_layout, interface_v1=True, **extra)`` -> (backend,
    pool, hooks) for SmolLM2; threads stopped and links closed at teardown."""
    made = []

    def make(d, layout="page_first", *, interface_v1=True, **extra):
        pool = MHAHostPool(30, 3, 64, pages=48, layout=layout)
        backend = make_backend(d.unix_endpoint, pool, **extra)
        hooks = HiCacheHooks(backend, pool, interface_v1=interface_v1, pass_prefix_keys=True)
        made.append((backend, hooks))
        return backend, pool, hooks

    yield make
    for backend, hooks in made:
        hooks.close()
        backend.close()
        assert hooks.errors == []


def run(model, hooks, prompt, tag, engine_layout="flash_attn"):
    eng = te.Engine(model, num_blocks=48, layout=engine_layout, hooks=hooks)
    r = eng.add_request(prompt, max_new_tokens=NEW, record_logits=True, ignore_eos=True, request_id=tag)
    eng.run()
    hooks.flush()
    return r


def pages_saved(hooks, tag):
    return [ok for rid, _, res in hooks.backups if rid == tag for ok in res]


def chat(tok, question, system=SYSTEM):
    return tok.chat([{"role": "system", "content": system}, {"role": "user", "content": question}])


# ---- the real model -----------------------------------------------------------------


def test_multi_turn_and_shared_system_prompt(model, tok, make_daemon, reference, stack):
    d = make_daemon(dram="64MiB")
    turn1 = chat(tok, "What is a key-value cache?")
    # SGLang's page keys are the engine's own chained block hashes.
    assert sglang_page_hashes(turn1) == [h.hex() for h in te.block_hashes(turn1, 16)]
    _, _, h1 = stack(d, "page_first")
    r1 = run(model, h1, turn1, "t1")
    assert r1.num_loaded_tokens == 0 and h1.exists == [("t1", (len(turn1) - 1) // 16, 0)]
    assert pages_saved(h1, "t1") == [True] * ((len(turn1) + NEW - 1) // 16)
    assert_identical(r1, reference(turn1, NEW))

    # Turn two (prompt, answer, new question) on another engine whose host
    # pool is layer_first and device cache FlashInfer: the whole shared
    # prefix comes through batch_exists / batch_get_v1.
    turn2 = turn1 + r1.output_token_ids + tok.encode("<|im_end|>\n<|im_start|>user\nWhy keep it?<|im_end|>\n"
                                                    "<|im_start|>assistant\n")
    _, _, h2 = stack(d, "layer_first")
    r2 = run(model, h2, turn2, "t2", engine_layout="flashinfer")
    assert r2.num_loaded_tokens == 16 * ((len(turn1) + NEW - 1) // 16) > 0
    assert h2.prefetched == [("t2", r2.num_loaded_tokens // 16)]
    assert_identical(r2, reference(turn2, NEW))

    # Another user with the same system prompt, page_head host pool.
    other = chat(tok, "Name a prime number.")
    _, _, h3 = stack(d, "page_head")
    r3 = run(model, h3, other, "u2")
    common = next(i for i, (a, b) in enumerate(zip(turn1, other)) if a != b)
    assert r3.num_loaded_tokens == 16 * (common // 16) > 0
    assert_identical(r3, reference(other, NEW))

    # The pages are Strata's canonical blocks: the plain client loads them.
    plain = StrataHooks(StoreLink(d.unix_endpoint, smollm_layout()))
    eng = te.Engine(model, num_blocks=48, hooks=plain)
    r4 = eng.add_request(turn1, max_new_tokens=NEW, record_logits=True, ignore_eos=True, request_id="plain")
    eng.run()
    assert r4.num_loaded_tokens == 16 * ((len(turn1) - 1) // 16)
    assert_identical(r4, reference(turn1, NEW))


def test_legacy_flat_page_interface(model, tok, make_daemon, reference, stack):
    # interface_v1 off: SGLang moves flat page tensors (get_data_page /
    # set_from_flat_data_page) through batch_set / batch_get.
    d = make_daemon(dram="64MiB")
    p = chat(tok, "What is a key-value cache?")
    _, _, h1 = stack(d, "page_first_direct", interface_v1=False)
    run(model, h1, p, "store")
    assert pages_saved(h1, "store") == [True] * ((len(p) + NEW - 1) // 16)
    _, _, h2 = stack(d, "page_first", interface_v1=False)
    r = run(model, h2, p, "load")
    assert r.num_loaded_tokens == 16 * ((len(p) - 1) // 16)
    assert_identical(r, reference(p, NEW))


def test_nvme_hits_are_bit_identical(model, tok, make_daemon, reference, stack):
    # 4 MiB of DRAM holds about 11 pages of 360 KiB: the prompt's pages are
    # pushed out by 16 others and come back from NVMe.
    d = make_daemon(dram="4MiB", nvme="64MiB")
    p = chat(tok, "What is a key-value cache?")
    _, _, h1 = stack(d, "page_first")
    run(model, h1, p, "store")
    filler = StoreLink(d.unix_endpoint, smollm_layout(model_id="filler"))
    keys = [hashlib.sha256(b"filler %d" % i).digest() for i in range(16)]
    for i in range(0, 16, 4):
        assert filler.save(keys[i:i + 4], [None] * 4, lambda j, out: out.fill(j)) == 4
    with Client(d.endpoint) as c:
        tiers = c.lookup(smollm_layout().namespace_id(), te.block_hashes(p, 16)).tiers
    assert tiers and set(tiers) == {Tier.NVME}, tiers
    _, _, h2 = stack(d, "layer_first")
    r = run(model, h2, p, "nvme")
    assert r.num_loaded_tokens == 16 * ((len(p) - 1) // 16)
    assert_identical(r, reference(p, NEW))


def test_daemon_killed_mid_run_then_restarted(model, tok, make_daemon, reference, stack):
    d = make_daemon(dram="64MiB")
    backend, pool, hooks = stack(d, "page_first", retry_after_s=0.2, timeout_s=2)
    p = chat(tok, "Explain paging in operating systems briefly.")
    run(model, hooks, p, "warm")

    # The daemon dies after the engine's first step: r1 (admitted with its
    # prefix loaded) finishes, r2 (admitted after) finds nothing, recomputes
    # and its backups are answered False; both outputs stay exact.
    eng = te.Engine(model, num_blocks=64, hooks=hooks)
    q = p[:-4] + tok.encode(" Be brief.") + p[-4:]
    r1 = eng.add_request(p, max_new_tokens=NEW, record_logits=True, ignore_eos=True, request_id="r1")
    eng.step()
    d.kill()
    r2 = eng.add_request(q, max_new_tokens=NEW, record_logits=True, ignore_eos=True, request_id="r2")
    eng.run()
    hooks.flush()
    assert r1.num_loaded_tokens > 0
    assert r2.num_external_tokens == 0 and ("r2", (len(q) - 1) // 16, 0) in hooks.exists
    assert pages_saved(hooks, "r2") and not any(pages_saved(hooks, "r2"))
    assert_identical(r1, reference(p, NEW))
    assert_identical(r2, reference(q, NEW))

    # While it is down every call answers a typed miss at once.
    keys = sglang_page_hashes(p)[:3]
    host = pool.alloc(3 * 16)
    t0 = time.monotonic()
    assert backend.batch_exists(keys) == 0
    assert backend.batch_get_v1(keys, host) == [False] * 3
    assert backend.batch_set_v1(keys, host) == [False] * 3
    assert time.monotonic() - t0 < 5
    pool.free(host)
    assert backend.link.stats.errors + backend.link.stats.down_answers >= 1

    # Restarted on the same data directory (write-through): hits resume.
    d.start()
    time.sleep(0.3)  # past the back-off
    r3 = run(model, hooks, p, "after")
    assert r3.num_loaded_tokens == 16 * ((len(p) - 1) // 16)
    assert_identical(r3, reference(p, NEW))


# ---- no model: small pools (4 layers x 2 heads x 8 dims, 16-token pages) ------------------


def small_pool(layout, pages=16, **kw):
    return MHAHostPool(kw.pop("layer_num", 4), kw.pop("head_num", 2), kw.pop("head_dim", 8), pages=pages,
                       layout=layout, **kw)


def canon_pages(n, seed, shape=(4, 2, 16, 2, 8)):
    """``n`` random pages in Strata's block order (layers, 2, tokens, heads, dim)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float16) for _ in range(n)]


def fill(pool, host, pages):
    for i, page in enumerate(pages):
        pool.kv_page(int(host[i * 16])).__setitem__(slice(None), page.transpose(1, 0, 2, 3, 4))


def read(pool, host, n):
    return [pool.kv_page(int(host[i * 16])).transpose(1, 0, 2, 3, 4).copy() for i in range(n)]


def hex_keys(name, n):
    return [hashlib.sha256(f"{name} {i}".encode()).hexdigest() for i in range(n)]


def test_every_host_layout_round_trips_through_canonical_pages(make_daemon):
    d = make_daemon(dram="64MiB")
    for src in MHA_LAYOUTS:
        model = f"rt/{src}"
        pool = small_pool(src)
        backend = make_backend(d.unix_endpoint, pool, model=model)
        keys, data = hex_keys(src, 3), canon_pages(3, seed=len(src))
        host = pool.alloc(48)
        fill(pool, host, data)
        assert backend.batch_set_v1(keys, host) == [True] * 3
        # Stored as Strata's block payload, whatever the host layout.
        plain = StoreLink(d.unix_endpoint, Layout(model, "f16", 4, 2, 8, 16))
        got = {}
        assert plain.load([bytes.fromhex(k) for k in keys], lambda i, v: got.__setitem__(i, v.copy())) == 3
        assert all(got[i].tobytes() == data[i].tobytes() for i in range(3))
        for dst in MHA_LAYOUTS:
            other = small_pool(dst)
            reader = make_backend(d.unix_endpoint, other, model=model)
            other.alloc(32)  # land somewhere else than page 0
            host_d = other.alloc(48)
            assert reader.batch_get_v1(keys, host_d) == [True] * 3
            assert all(np.array_equal(a, b) for a, b in zip(read(other, host_d, 3), data))
            # Legacy: flat pages in the pool's own page order.
            flats = reader.batch_get(keys)
            assert all(f is not None for f in flats)
            other.kv_buffer[...] = 0
            for i, f in enumerate(flats):
                other.set_from_flat_data_page(int(host_d[i * 16]), f)
            assert all(np.array_equal(a, b) for a, b in zip(read(other, host_d, 3), data))
            keys2 = hex_keys(f"{src}->{dst}", 3)
            assert reader.batch_set(keys2, [other.get_data_page(int(host_d[i * 16])) for i in range(3)])
            pool.kv_buffer[...] = 0
            assert backend.batch_get_v1(keys2, host) == [True] * 3
            assert all(np.array_equal(a, b) for a, b in zip(read(pool, host, 3), data))
            reader.close()
        backend.close()


def test_mla_pools_store_one_latent_and_only_rank_zero_writes(make_daemon):
    d = make_daemon(dram="64MiB")
    rng = np.random.default_rng(5)
    latents = [rng.standard_normal((4, 16, 24)).astype(np.float16) for _ in range(2)]
    keys = hex_keys("mla", 2)
    writer_pool = MLAHostPool(4, 16, 8, pages=8, layout="page_first")
    writer = make_backend(d.unix_endpoint, writer_pool, model="mla", tp_rank=0, tp_size=2, mla=True)
    host = writer_pool.alloc(32)
    for i, lat in enumerate(latents):
        writer_pool.latent_page(int(host[i * 16]))[...] = lat
    assert writer.batch_set_v1(keys, host) == [True, True]
    plain = StoreLink(d.unix_endpoint, Layout("mla", "f16", 4, 1, 24, 16, kv_kind=2))
    got = {}
    assert plain.load([bytes.fromhex(k) for k in keys], lambda i, v: got.__setitem__(i, v.copy())) == 2
    assert got[1].tobytes() == latents[1].tobytes()
    for layout in MLA_LAYOUTS:
        pool = MLAHostPool(4, 16, 8, pages=8, layout=layout)
        # KV is replicated across TP ranks: rank 1 reads rank 0's pages...
        rank1 = make_backend(d.unix_endpoint, pool, model="mla", tp_rank=1, tp_size=2, mla=True)
        h = pool.alloc(32)
        assert rank1.batch_get_v1(keys, h) == [True, True]
        assert all(np.array_equal(pool.latent_page(int(h[i * 16])), latents[i]) for i in range(2))
        flat = rank1.get(keys[0])
        pool.kv_buffer[...] = 0
        pool.set_from_flat_data_page(int(h[0]), flat)
        assert np.array_equal(pool.latent_page(int(h[0])), latents[0])
        # ...and never writes: its sets are acknowledged, rank 0 stores.
        fresh = hex_keys(f"mla {layout}", 2)
        assert rank1.batch_set_v1(fresh, h) == [True, True]
        assert rank1.batch_exists(fresh) == 0
        rank1.close()
    writer.close()


def test_pages_not_intact_are_never_reported_loaded(make_daemon):
    d = make_daemon(dram="64MiB")
    pool = small_pool("page_first", pages=32)
    backend = make_backend(d.unix_endpoint, pool, model="intact")
    tcp = make_backend(d.endpoint, small_pool("page_first"), model="intact")
    keys, data = hex_keys("intact", 4), canon_pages(4, seed=9)
    host = pool.alloc(64)
    fill(pool, host, data)
    assert backend.batch_set_v1(keys, host) == [True] * 4
    dst = pool.alloc(64)
    # A missing page ends the prefix: it and everything after are False.
    assert backend.batch_get_v1([keys[0], keys[1], hex_keys("absent", 1)[0], keys[3]], dst) == [
        True, True, False, False]
    # Host indices that are not one consecutive page are never written.
    bad = np.array(dst)
    bad[16 + 3] = bad[16 + 2]
    assert backend.batch_get_v1(keys[:3], bad[:48]) == [True, False, False]
    assert backend.batch_get_v1(keys[:3], dst[:40]) == [True, True, False]
    # A page whose bytes changed in the store fails its checksum.
    ns = Layout("intact", "f16", 4, 2, 8, 16).namespace_id()
    with LocalClient(d.uds) as lc:
        slots = lc.lookup_slots(ns, [bytes.fromhex(keys[1])])
        slots.views[0][100] ^= 0xFF
        lc.release(slots.lease)
    pool.kv_buffer[:, dst[0]:dst[0] + 64] = 0
    assert backend.batch_get_v1(keys[:3], dst[:48]) == [True, False, False]
    assert np.array_equal(read(pool, dst, 1)[0], data[0])
    assert tcp.batch_get_v1(keys[:3], np.arange(48))[1:] == [False, False]
    # A short block (one token) under a key is not a page of this pool.
    short = hex_keys("short", 1)
    with Client(d.endpoint) as c:
        c.put(ns, [Block(bytes.fromhex(short[0]), np.zeros(4 * 2 * 2 * 8, np.float16))])
    assert backend.batch_exists(short) == 1
    assert backend.batch_get_v1(short, dst[:16]) == [False]
    backend.close()
    tcp.close()


def test_other_model_rank_or_shape_never_loads(make_daemon):
    d = make_daemon(dram="64MiB")
    pool = small_pool("page_first")
    owner = make_backend(d.unix_endpoint, pool, model="m", tp_rank=0, tp_size=2)
    keys, data = hex_keys("ns", 3), canon_pages(3, seed=3)
    host = pool.alloc(48)
    fill(pool, host, data)
    assert owner.batch_set_v1(keys, host) == [True] * 3
    strangers = [
        dict(model="other", tp_rank=0, tp_size=2),          # another model
        dict(model="m", tp_rank=1, tp_size=2),              # another TP rank
        dict(model="m", tp_rank=0, tp_size=1),              # another TP size
        dict(model="m", tp_rank=0, tp_size=2, head_num=4, head_dim=4),   # same bytes, other shape
        dict(model="m", tp_rank=0, tp_size=2, layer_num=8, head_num=1),  # same bytes, other shape
    ]
    for s in strangers:
        shape = {k: s.pop(k) for k in ("layer_num", "head_num", "head_dim") if k in s}
        other = small_pool("page_first", **shape)
        b = make_backend(d.unix_endpoint, other, **s)
        h = other.alloc(48)
        assert b.batch_exists(keys) == 0, s
        assert b.batch_get_v1(keys, h) == [False] * 3, s
        assert b.get(keys[0]) is None and b.batch_get(keys) == [None] * 3, s
        assert not other.kv_buffer.any(), s
        b.close()
    assert owner.batch_exists(keys) == 3
    # A pool whose buffer contradicts its own fields, or a layout this
    # backend does not know, is refused at registration.
    liar = small_pool("page_first")
    liar.kv_buffer = np.zeros((2, 256, 4, 2, 4), np.float16)
    with pytest.raises(ValueError, match="kv_buffer has shape"):
        make_backend(d.unix_endpoint, liar, model="m")
    ascend = small_pool("page_first")
    ascend.layout = "page_first_kv_split"
    with pytest.raises(ValueError, match="not supported"):
        make_backend(d.unix_endpoint, ascend, model="m")
    owner.close()


def test_many_threads_at_once(make_daemon):
    # The three SGLang threads times a few engines' worth: exists, zero-copy
    # and legacy gets and sets of shared chains, all on one backend.
    d = make_daemon(dram="64MiB")
    threads, rounds, chains = 16, 40, 6
    pool = small_pool("page_first", pages=threads * 8)
    backend = make_backend(d.unix_endpoint, pool, model="threads")
    keys = {c: hex_keys(f"chain {c}", 4) for c in range(chains)}
    data = {c: canon_pages(4, seed=100 + c) for c in range(chains)}
    regions = [pool.alloc(128) for _ in range(threads)]
    failures: list[str] = []
    gets = [0]

    def work(t: int) -> None:
        rng = np.random.default_rng(t)
        src, dst = regions[t][:64], regions[t][64:]
        try:
            for _ in range(rounds):
                c = int(rng.integers(chains))
                op = rng.integers(4)
                if op == 0:
                    fill(pool, src, data[c])
                    res = backend.batch_set_v1(keys[c], src)
                    if res != [True] * 4:
                        failures.append(f"set {c}: {res}")
                    elif backend.batch_exists(keys[c]) != 4:
                        failures.append(f"set {c}: not visible after it returned")
                elif op == 1:
                    n = backend.batch_exists(keys[c])
                    if type(n) is not int or not 0 <= n <= 4:
                        failures.append(f"exists {c}: {n!r}")
                elif op == 2:
                    res = backend.batch_get_v1(keys[c], dst)
                    n = res.index(False) if False in res else 4
                    if res != [True] * n + [False] * (4 - n):
                        failures.append(f"get {c}: {res}")
                    for i, page in enumerate(read(pool, dst, n)):
                        if not np.array_equal(page, data[c][i]):
                            failures.append(f"get {c}: page {i} differs")
                    gets[0] += n
                else:
                    flats = backend.batch_get(keys[c])
                    for i, f in enumerate(f for f in flats if f is not None):
                        if not np.array_equal(f.reshape(2, 16, 4, 2, 8).transpose(2, 0, 1, 3, 4), data[c][i]):
                            failures.append(f"legacy get {c}: page {i} differs")
        except BaseException as e:  # noqa: BLE001 - the point is that none escape
            failures.append(f"thread {t}: {e!r}")

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join(60)
    assert failures == []
    assert gets[0] > 0
    stored = [c for c in range(chains) if backend.batch_exists(keys[c]) == 4]
    assert stored, "no chain was stored"
    metrics = backend.get_stats()
    assert sum(metrics.backup_pgs) >= 4 * len(stored) and sum(metrics.prefetch_pgs) >= gets[0]
    assert backend.get_stats().backup_pgs == []  # drained by the poll
    # SGLang's cache flush: every page of the namespace goes.
    backend.clear()
    assert all(backend.batch_exists(keys[c]) == 0 for c in range(chains))
    backend.close()
