"""StrataConnector against vLLM v0.31.0's connector interface, and its
parts that need neither a model nor a daemon.

- Conformance: every method recorded in ``upstream/vllm.json`` for the
  classes the connector implements is there, of the same kind, with
  compatible parameters (same positional names and kinds, recorded defaults
  kept, anything added optional). The recorded-list check always runs; the
  check against the real vLLM classes runs when ``vllm`` is importable and
  skips (saying so) otherwise. The stand-in base classes used without vLLM
  must match the recording exactly.
- Layouts: detection, gather and scatter on small numpy caches in every
  layout, the 4-D standardized one with non-contiguous strides included.
- Scheduler and worker logic over an in-memory link: lookups and leases,
  store jobs, load errors, TP, events, daemon down.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import strata.integrations.vllm as sv
from strata import Layout, Lease, Tier
from strata.events import Reset
from strata.integrations.link import LinkStats
from strata.types import AllBlocksCleared, BlockRemoved, BlockStored

RECORD = json.loads((Path(sv.__file__).parent / "upstream" / "vllm.json").read_text())
CLASSES = RECORD["classes"]
# Recorded class -> the class of ours that implements it.
IMPLEMENTED = {"KVConnectorBase_V1": sv.StrataConnector, "SupportsHMA": sv.StrataConnector,
               "KVConnectorStats": sv.StrataConnectorStats}
BS = 4


# ---- conformance ------------------------------------------------------------------------

def member(cls, name: str):
    """(kind, function) of ``cls.name`` as defined along its MRO."""
    for k in cls.__mro__:
        if name in k.__dict__:
            raw = k.__dict__[name]
            break
    else:
        return None, None
    if isinstance(raw, property):
        return "property", raw.fget
    if isinstance(raw, classmethod):
        return "classmethod", raw.__func__
    if isinstance(raw, staticmethod):
        return "staticmethod", raw.__func__
    return ("method", raw) if callable(raw) else ("attribute", raw)


def params_of(fn) -> list[dict]:
    """A function's parameters in the recording's form."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        d = {"name": p.name, "kind": p.kind.name}
        if p.default is not inspect.Parameter.empty:
            d["default"] = repr(p.default)
        out.append(d)
    return out


def incompatibilities(recorded: list[dict], impl: list[dict]) -> list[str]:
    """What keeps ``impl`` from being called as ``recorded`` is: positional
    parameters by position and name, keyword-only by name, ``**kwargs`` /
    ``*args`` kept, recorded defaults kept, added parameters optional."""
    pos = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")
    problems = []
    rec_pos = [p for p in recorded if p["kind"] in pos]
    imp_pos = [p for p in impl if p["kind"] in pos]
    imp_kinds = {p["kind"] for p in impl}
    for i, rp in enumerate(rec_pos):
        if i >= len(imp_pos):
            if "VAR_POSITIONAL" not in imp_kinds:
                problems.append(f"positional parameter {rp['name']!r} missing")
            continue
        ip = imp_pos[i]
        if ip["name"] != rp["name"] or ip["kind"] != rp["kind"]:
            problems.append(f"parameter {i} is {ip['name']!r} ({ip['kind']}), recorded "
                            f"{rp['name']!r} ({rp['kind']})")
        if "default" in rp and ("default" not in ip or
                                ast.literal_eval(ip["default"]) != ast.literal_eval(rp["default"])):
            problems.append(f"parameter {rp['name']!r} lost its default {rp['default']}")
    for ip in imp_pos[len(rec_pos):]:
        if "default" not in ip:
            problems.append(f"added parameter {ip['name']!r} has no default")
    rec_kw = {p["name"] for p in recorded if p["kind"] == "KEYWORD_ONLY"}
    for name in rec_kw - {p["name"] for p in impl if p["kind"] == "KEYWORD_ONLY"}:
        if "VAR_KEYWORD" not in imp_kinds:
            problems.append(f"keyword parameter {name!r} missing")
    for ip in impl:
        if ip["kind"] == "KEYWORD_ONLY" and ip["name"] not in rec_kw and "default" not in ip:
            problems.append(f"added keyword parameter {ip['name']!r} has no default")
    for var in ("VAR_POSITIONAL", "VAR_KEYWORD"):
        if any(p["kind"] == var for p in recorded) and var not in imp_kinds:
            problems.append(f"{var} dropped")
    return problems


def check_against(recorded_methods: list[dict], cls) -> list[str]:
    problems = []
    for m in recorded_methods:
        kind, fn = member(cls, m["name"])
        if kind is None:
            problems.append(f"{cls.__name__}.{m['name']}: missing")
            continue
        want = "property" if m["kind"] == "cached_property" else m["kind"]
        if kind != want:
            problems.append(f"{cls.__name__}.{m['name']}: a {kind}, recorded a {want}")
            continue
        problems += [f"{cls.__name__}.{m['name']}: {p}" for p in incompatibilities(m["params"], params_of(fn))]
    return problems


@pytest.mark.parametrize("recorded", sorted(IMPLEMENTED))
def test_recorded_interface_is_implemented(recorded):
    cls = IMPLEMENTED[recorded]
    assert check_against(CLASSES[recorded]["methods"], cls) == []
    # Nothing left abstract: vLLM can build it.
    assert not inspect.isabstract(cls)


def test_recording_is_the_pinned_release():
    assert (RECORD["tag"], RECORD["commit"]) == ("v0.31.0", "db9527a46873454610df6dbedf79a36d6bf1a7f6")
    assert sv.UPSTREAM == "vllm==0.31.0"


def test_base_classes_in_use_match_the_recording():
    """The bases StrataConnector really has (vLLM's or the stand-ins) offer
    every recorded member; the stand-ins match the recording exactly."""
    bases = {"KVConnectorBase_V1": sv.KVConnectorBase_V1, "SupportsHMA": sv.SupportsHMA,
             "KVConnectorStats": sv.KVConnectorStats}
    assert issubclass(sv.StrataConnector, (sv.KVConnectorBase_V1, sv.SupportsHMA))
    assert issubclass(sv.StrataConnectorMetadata, sv.KVConnectorMetadata)
    assert issubclass(sv.StrataConnectorStats, sv.KVConnectorStats)
    roles = {a["name"]: int(a["value"]) for a in CLASSES["KVConnectorRole"]["class_attributes"]}
    assert {r.name: r.value for r in sv.KVConnectorRole} == roles
    for name, cls in bases.items():
        recorded = CLASSES[name]["methods"]
        assert check_against(recorded, cls) == [], name
        if sv.VLLM_IMPORTED:
            continue
        mine = {n for n, v in vars(cls).items()
                if (not n.startswith("__") or n == "__init__") and member(cls, n)[0] != "attribute"}
        if dataclasses.is_dataclass(cls):  # __init__ is generated from the recorded fields
            mine.discard("__init__")
            assert [f.name for f in dataclasses.fields(cls)] == [f["name"] for f in CLASSES[name]["fields"]]
        assert mine == {m["name"] for m in recorded}, name
        for m in recorded:
            kind, fn = member(cls, m["name"])
            got = params_of(fn)
            want = [{k: p[k] for k in ("name", "kind", "default") if k in p} for p in m["params"]]
            assert got == want, f"{name}.{m['name']}"
            assert getattr(fn, "__isabstractmethod__", False) == m["abstract"], f"{name}.{m['name']}"


def test_against_the_real_vllm_classes():
    if not sv.VLLM_IMPORTED:
        pytest.skip("vllm is not importable: StrataConnector was checked against the recorded list "
                    "(upstream/vllm.json, vLLM v0.31.0) and the stand-in base classes only")
    from vllm.distributed.kv_transfer.kv_connector.v1 import base  # type: ignore[import-not-found]

    for real in (base.KVConnectorBase_V1, base.SupportsHMA):
        assert issubclass(sv.StrataConnector, real)
        methods = []
        for name in dir(real):
            kind, fn = member(real, name)
            if kind in ("method", "classmethod", "property") and (not name.startswith("__") or name == "__init__"):
                methods.append({"name": name, "kind": kind, "params": params_of(fn)})
        assert check_against(methods, sv.StrataConnector) == []


def test_construction_and_class_answers():
    sched = connector(sv.KVConnectorRole.SCHEDULER)
    worker = connector(sv.KVConnectorRole.WORKER)
    assert sched.role == sv.KVConnectorRole.SCHEDULER and worker.role == sv.KVConnectorRole.WORKER
    assert sched.requires_kv_delivery is False and worker.requires_kv_delivery is False
    assert sv.StrataConnector.get_required_kvcache_layout(None) is None
    assert sv.StrataConnector.requires_piecewise_for_cudagraph({}) is False
    stats = sv.StrataConnector.build_kv_connector_stats({"lookups": 2})
    assert stats.aggregate(sv.StrataConnectorStats({"lookups": 1, "loaded_blocks": 3})).reduce() == {
        "lookups": 3, "loaded_blocks": 3}
    assert not stats.is_empty()
    stats.reset()
    assert stats.is_empty()
    assert sched.request_finished_all_groups(SimpleNamespace(request_id="x"), ([1, 2],)) == (False, None)
    with pytest.raises(ValueError, match="one KV cache group; this model has 2"):
        sv.StrataConnector(vllm_config(), sv.KVConnectorRole.WORKER,
                           SimpleNamespace(kv_cache_groups=[kv_group(), kv_group()]))
    cfg = vllm_config()
    cfg.parallel_config.pipeline_parallel_size = 2
    with pytest.raises(ValueError, match="pipeline parallelism"):
        sv.StrataConnector(cfg, sv.KVConnectorRole.SCHEDULER, kv_cache_config())
    sched.shutdown()
    worker.shutdown()


# ---- small configs and an in-memory link ------------------------------------------------

L, H, D = 2, 3, 8
DEAD = "unix:/nonexistent/strata-test.sock"


def kv_group(layers=L, heads=H, head_dim=D, dtype="float16"):
    return SimpleNamespace(layer_names=[f"model.layers.{i}.self_attn.attn" for i in range(layers)],
                           kv_cache_spec=SimpleNamespace(block_size=BS, num_kv_heads=heads,
                                                         head_size=head_dim, dtype=dtype))


def kv_cache_config(**kw):
    return SimpleNamespace(num_blocks=8, kv_cache_groups=[kv_group(**kw)])


def vllm_config(tp_size=1, **extra):
    return SimpleNamespace(
        model_config=SimpleNamespace(model="test/model", dtype="float16"),
        cache_config=SimpleNamespace(block_size=BS, cache_dtype="auto"),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp_size, pipeline_parallel_size=1),
        kv_events_config=SimpleNamespace(enable_kv_cache_events=False),
        kv_transfer_config=SimpleNamespace(
            kv_role="kv_both",
            kv_connector_extra_config={"endpoint": DEAD, "retry_after_s": 0.05, **extra}))


def connector(role, tp_size=1, **extra):
    return sv.StrataConnector(vllm_config(tp_size, **extra), role, kv_cache_config())


class MemLink:
    """StoreLink's interface over a dict; counts outstanding leases."""

    def __init__(self, layout: Layout, fail_at: int | None = None):
        self.layout = layout
        self.blocks: dict[bytes, np.ndarray] = {}
        self.parents: dict[bytes, bytes | None] = {}
        self.leases: set[int] = set()
        self.lookups = 0
        self.saves: list[int] = []
        self.fail_at = fail_at
        self.stats = LinkStats()
        self._next = 1

    def lookup(self, keys, lease_ttl_ms=0):
        self.lookups += 1
        n = 0
        while n < len(keys) and keys[n] in self.blocks:
            n += 1
        if not n or not lease_ttl_ms:
            return n, None
        self._next += 1
        self.leases.add(self._next)
        return n, Lease(self._next, self.layout.namespace_id(), 0)

    def release(self, lease):
        if lease is not None:
            self.leases.discard(lease.id)

    def load(self, keys, sink, lease=None):
        n = 0
        for i, k in enumerate(keys):
            if k not in self.blocks or i == self.fail_at:
                break
            view = self.blocks[k].view()
            view.flags.writeable = False
            sink(i, view)
            n += 1
        return n

    def save(self, keys, parents, fill):
        self.saves.append(len(keys))
        for i, (k, p) in enumerate(zip(keys, parents)):
            if k not in self.blocks:
                out = np.zeros(self.layout.block_bytes, np.uint8)
                fill(i, out)
                self.blocks[k] = out
                self.parents[k] = p
        return len(keys)

    def close(self):
        pass


def req(rid, tokens, hashes=None):
    n = len(tokens)
    hs = hashes if hashes is not None else [bytes([i + 1]) * 32 for i in range(n // BS)]
    return SimpleNamespace(request_id=rid, num_tokens=n, all_token_ids=list(tokens), block_hashes=hs,
                           num_computed_tokens=0, skip_reading_prefix_cache=False)


# ---- layouts ------------------------------------------------------------------------------

LAYOUT = Layout("test/model", "f16", L, H, D, BS)
MLA = Layout("test/mla", "f16", L, 1, D, BS, kv_kind=2)
NB = 6


def make_cache(kind: str, ref: np.ndarray) -> tuple[np.ndarray, callable]:
    """A cache of kind ``kind`` holding ``ref`` (canonical ``(nb, t, bs, h,
    d)``), and a function reading any such cache back to canonical with
    plain numpy (independent of the connector's views)."""
    nb, t, bs, h, d = ref.shape
    if kind == "flash_attn":
        return ref.transpose(1, 0, 2, 3, 4).copy(), lambda c: c.transpose(1, 0, 2, 3, 4)
    if kind == "flashinfer":
        return ref.copy(), lambda c: c
    if kind == "flashinfer_hnd":  # physical (nb, 2, h, bs, d), logical NHD view
        phys = ref.transpose(0, 1, 3, 2, 4).copy()
        return phys.transpose(0, 1, 3, 2, 4), lambda c: c
    if kind == "bhnc":  # [nb, h, bs, t*d], K and V concatenated in the last dim
        return (ref.transpose(0, 3, 2, 1, 4).reshape(nb, h, bs, t * d).copy(),
                lambda c: c.reshape(nb, h, bs, t, d).transpose(0, 3, 2, 1, 4))
    if kind == "bhnc_nhd_strides":  # logical [nb, h, bs, C] over physical [nb, bs, h, C]
        phys = ref.transpose(0, 2, 3, 1, 4).reshape(nb, bs, h, t * d).copy()
        return phys.transpose(0, 2, 1, 3), lambda c: c.transpose(0, 2, 1, 3).reshape(
            nb, bs, h, t, d).transpose(0, 3, 1, 2, 4)
    if kind == "bnhc":
        return (ref.transpose(0, 2, 3, 1, 4).reshape(nb, bs, h, t * d).copy(),
                lambda c: c.reshape(nb, bs, h, t, d).transpose(0, 3, 1, 2, 4))
    if kind == "bhnc_every_other_block":  # blocks strided in a larger buffer
        big = np.zeros((2 * nb, h, bs, t * d), ref.dtype)
        big[::2] = ref.transpose(0, 3, 2, 1, 4).reshape(nb, h, bs, t * d)
        return big[::2], lambda c: c.reshape(nb, h, bs, t, d).transpose(0, 3, 2, 1, 4)
    raise AssertionError(kind)


CASES = [("flash_attn", LAYOUT, "flash_attn"), ("flashinfer", LAYOUT, "flashinfer"),
         ("flashinfer_hnd", LAYOUT, "flashinfer"), ("bhnc", LAYOUT, "bhnc"),
         ("bhnc_nhd_strides", LAYOUT, "bhnc"), ("bnhc", LAYOUT, "bnhc"),
         ("bhnc_every_other_block", LAYOUT, "bhnc"), ("bhnc", MLA, "bhnc")]


@pytest.mark.parametrize("kind,layout,detected", CASES, ids=[f"{c[0]}-{c[1].kv_kind.name}" for c in CASES])
def test_layer_view_gather_scatter(kind, layout, detected):
    rng = np.random.default_rng(1)
    t = layout.kv_kind.tensors
    ref = rng.standard_normal((NB, t, BS, layout.num_kv_heads, D)).astype(np.float16)
    cache, canonical = make_cache(kind, ref)
    if kind.endswith("strides") or kind.endswith("hnd") or kind.endswith("block"):
        assert not cache.flags.c_contiguous
    lv = sv.LayerKV("layer0", cache, layout)
    assert lv.kind == detected and lv.num_blocks == NB and not lv.on_device
    assert lv.block_shape == (t, BS, layout.num_kv_heads, D)
    got = lv.gather([4, 1])
    assert got.dtype == np.int16 and np.array_equal(got.view(np.float16), ref[[4, 1]])
    assert np.array_equal(lv.blocks[3].view(np.float16), ref[3])
    new = rng.standard_normal((2, t, BS, layout.num_kv_heads, D)).astype(np.float16)
    lv.scatter([2, 5], new)
    want = ref.copy()
    want[[2, 5]] = new
    assert np.array_equal(canonical(cache), want), "scatter must write the cache in place"
    lv.blocks[0] = new[0].view(np.int16)
    assert np.array_equal(canonical(cache)[0], new[0])


def test_standardized_view_with_heads_equal_to_block_size_is_bhnc():
    layout = Layout("m", "f16", L, BS, D, BS)
    ref = np.arange(NB * 2 * BS * BS * D, dtype=np.float16).reshape(NB, 2, BS, BS, D)
    cache, canonical = make_cache("bhnc", ref)
    lv = sv.LayerKV("l", cache, layout)
    assert lv.kind == "bhnc" and np.array_equal(lv.gather([2]).view(np.float16), ref[[2]])


@pytest.mark.parametrize("shape,match", [
    ((2, NB, BS, 4, D), "num_kv_heads is 4, the Strata layout says 3"),
    ((NB, 2, BS, H, 16), "head_dim is 16, the Strata layout says 8"),
    ((2, NB, 8, H, D), "block_size is 8, the Strata layout says 4"),
    ((NB, H, BS, D), r"C \(K\+V = 2 x head_dim\) is 8, the Strata layout says 16"),
    ((NB, 5, BS, 2 * D), "num_kv_heads is 5, the Strata layout says 3"),
    ((NB, 3, 3, BS, D), "neither FlashAttention"),
    ((2, 2, BS, H, D), "set kv_connector_extra_config.kv_cache_layout"),
    ((NB, BS, H * D), "expected a 5-D"),
])
def test_layout_mismatch_is_named(shape, match):
    with pytest.raises(ValueError, match=match):
        sv.LayerKV("model.layers.0.self_attn.attn", np.zeros(shape, np.float16), LAYOUT)


def test_ambiguous_five_d_cache_follows_the_hint_and_dtype_is_checked():
    ref = np.random.default_rng(2).standard_normal((2, 2, BS, H, D)).astype(np.float16)
    cache, canonical = make_cache("flash_attn", ref)
    lv = sv.LayerKV("l", cache, LAYOUT, hint="flash_attn")
    assert lv.kind == "flash_attn" and np.array_equal(lv.gather([1]).view(np.float16), ref[[1]])
    assert sv.LayerKV("l", ref.copy(), LAYOUT, hint="flashinfer").kind == "flashinfer"
    with pytest.raises(ValueError, match="is float32, the Strata layout says f16"):
        sv.LayerKV("l", np.zeros((2, NB, BS, H, D), np.float32), LAYOUT)
    with pytest.raises(ValueError, match="1-byte elements"):
        sv.LayerKV("l", np.zeros((2, NB, BS, H, D), np.uint8), LAYOUT)


# ---- keys -----------------------------------------------------------------------------------

def test_block_keys():
    h = bytes(range(32))
    assert sv.block_key(h) == h and sv.block_key(b"\x01" * 16) == b"\x01" * 16
    long = sv.block_key(b"\x02" * 40)
    assert len(long) == 32 and long == sv.block_key(b"\x02" * 40) != b"\x02" * 32
    assert len(sv.block_key(12345)) == 32 and sv.block_key(-1) != sv.block_key(255)
    assert sv.block_key(12345) != sv.block_key((12345).to_bytes(3, "big", signed=True) * 11)
    with pytest.raises(TypeError, match="expected bytes or int"):
        sv.block_key(1.5)


# ---- scheduler --------------------------------------------------------------------------------

def test_lookup_counts_whole_blocks_beyond_the_local_hit_and_keeps_one_lease():
    s = connector(sv.KVConnectorRole.SCHEDULER)
    link = s._links[0] = MemLink(s.layout)
    r = req("r", range(4 * BS + 1))  # 4 full blocks and one token
    for h in r.block_hashes[:3]:
        link.blocks[h] = np.zeros(1, np.uint8)
    assert s.get_num_new_matched_tokens(r, 0) == (3 * BS, False)
    # Asked again: the same answer from the lease it holds, no new lease.
    assert s.get_num_new_matched_tokens(r, 0) == (3 * BS, False)
    assert link.lookups == 1 and len(link.leases) == 1
    # A local hit of one block: only what lies beyond it, a fresh lease.
    assert s.get_num_new_matched_tokens(r, BS) == (2 * BS, False)
    assert link.lookups == 2 and len(link.leases) == 1
    # Never the block holding the last token.
    full = req("f", range(3 * BS), r.block_hashes[:3])
    assert s.get_num_new_matched_tokens(full, 0) == (2 * BS, False)
    assert s.get_num_new_matched_tokens(req("z", range(BS)), 0) == (0, False)
    # Allocated with no external tokens: the lease goes.
    s.update_state_after_alloc(full, SimpleNamespace(get_block_ids=lambda: ([7, 8, 9],)), 0)
    assert len(link.leases) == 1
    # Allocated with them: a load job with the blocks after the local hit.
    s.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda: ([10, 11, 12, 13, 14],)), 2 * BS)
    meta = s.build_connector_meta(sched_out([new_data("r", [10, 11, 12, 13, 14], 3 * BS)], {"r": 2}))
    (job,) = meta.loads
    assert job.block_ids == [11, 12] and job.keys == r.block_hashes[1:3] and job.leases[0] is not None
    # The scheduler hands the lease to the workers; a finished request with
    # an unused lookup gives its lease back.
    link.leases.discard(job.leases[0].id)
    assert s.get_num_new_matched_tokens(full, 0) == (2 * BS, False) and len(link.leases) == 1
    assert s.request_finished(full, [7, 8, 9]) == (False, None)
    assert link.leases == set()
    s.shutdown()


def test_tp_lookup_counts_the_shortest_hit_and_leases_every_rank():
    s = connector(sv.KVConnectorRole.SCHEDULER, tp_size=2)
    assert [ln.layout.tp_rank for ln in s._links] == [0, 1]
    l0, l1 = s._links = [MemLink(s._links[0].layout), MemLink(s._links[1].layout)]
    r = req("r", range(5 * BS))
    for h in r.block_hashes[:4]:
        l0.blocks[h] = np.zeros(1, np.uint8)
    for h in r.block_hashes[:2]:
        l1.blocks[h] = np.zeros(1, np.uint8)
    assert s.get_num_new_matched_tokens(r, 0) == (2 * BS, False)
    s.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda: ([1, 2, 3, 4, 5],)), 2 * BS)
    (job,) = s.build_connector_meta(sched_out([new_data("r", [1, 2, 3, 4, 5], 2 * BS)], {"r": 3 * BS})).loads
    assert [ls.id for ls in job.leases] == [next(iter(l0.leases)), next(iter(l1.leases))]
    s.shutdown()


@pytest.mark.parametrize("kv_role,loads,saves", [("kv_both", True, True), ("kv_consumer", True, False),
                                                  ("kv_producer", False, True)])
def test_kv_role_decides_loads_and_saves(kv_role, loads, saves):
    cfg = vllm_config()
    cfg.kv_transfer_config.kv_role = kv_role
    s = sv.StrataConnector(cfg, sv.KVConnectorRole.SCHEDULER, kv_cache_config())
    link = s._links[0] = MemLink(s.layout)
    r = req("r", range(3 * BS + 1))
    link.blocks[r.block_hashes[0]] = np.zeros(1, np.uint8)
    assert s.get_num_new_matched_tokens(r, 0) == ((BS if loads else 0), False)
    s.update_state_after_alloc(r, SimpleNamespace(get_block_ids=lambda: ([1, 2, 3, 4],)), 0)
    meta = s.build_connector_meta(sched_out([new_data("r", [1, 2, 3, 4], 0)], {"r": 3 * BS + 1}))
    assert [j.block_ids for j in meta.stores] == ([[1, 2, 3]] if saves else [])
    s.shutdown()


def test_daemon_down_lookup_is_a_fast_miss():
    s = connector(sv.KVConnectorRole.SCHEDULER)
    r = req("r", range(3 * BS + 1))
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    stats = s.get_kv_connector_stats().data
    assert stats["lookups"] == 2 and stats["link_errors"] + stats["link_down_answers"] >= 2
    s.shutdown()


def new_data(rid, block_ids, computed):
    return SimpleNamespace(req_id=rid, prompt_token_ids=[], block_ids=(list(block_ids),),
                           num_computed_tokens=computed)


def sched_out(new, scheduled, cached=None, finished=(), preempted=(), spec=None):
    return SimpleNamespace(
        scheduled_new_reqs=new,
        scheduled_cached_reqs=cached or SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[],
                                                        resumed_req_ids=set()),
        num_scheduled_tokens=scheduled, scheduled_spec_decode_tokens=spec or {},
        finished_req_ids=set(finished), preempted_req_ids=set(preempted))


def cached_data(*rows, resumed=()):
    return SimpleNamespace(req_ids=[r[0] for r in rows], new_block_ids=[r[1] for r in rows],
                           num_computed_tokens=[r[2] for r in rows], resumed_req_ids=set(resumed))


def test_store_jobs_follow_prefill_decode_resume_and_failed_loads():
    s = connector(sv.KVConnectorRole.SCHEDULER)
    tokens = list(range(100, 100 + 2 * BS + 2))
    r = req("r", tokens)
    blocks = lambda ids: SimpleNamespace(get_block_ids=lambda: (list(ids),))  # noqa: E731
    s.update_state_after_alloc(r, blocks([5, 6, 7]), 0)
    # Prefill of 10 tokens: blocks 0 and 1 are full.
    m = s.build_connector_meta(sched_out([new_data("r", [5, 6, 7], 0)], {"r": 2 * BS + 2}))
    (job,) = m.stores
    h = r.block_hashes
    assert (job.block_ids, job.keys, job.parents) == ([5, 6], h[:2], [None, h[0]])
    # Decode until block 2 fills (hashes grow as tokens arrive); a new block
    # appended on the way; speculative tokens never count.
    for pos in range(2 * BS + 2, 3 * BS):
        tokens.append(pos)
        r.num_tokens, r.all_token_ids = len(tokens), list(tokens)
        r.block_hashes = [bytes([i + 1]) * 32 for i in range(len(tokens) // BS)]
        m = s.build_connector_meta(sched_out([], {"r": 3}, cached_data(("r", ([8],) if pos == 3 * BS - 1 else None,
                                                                       pos)), spec={"r": [1, 2]}))
        if pos < 3 * BS - 1:
            assert m.stores == []
    (job,) = m.stores
    assert (job.block_ids, job.keys, job.parents) == ([7], [r.block_hashes[2]], [r.block_hashes[1]])
    # Preempted: forgotten; resumed with a new block list from the computed
    # prefix (here one block loaded): stores from there.
    s.build_connector_meta(sched_out([], {}, preempted={"r"}))
    m = s.build_connector_meta(sched_out([], {"r": 2 * BS}, cached_data(("r", ([20, 21, 22, 23],), BS),
                                                                        resumed={"r"})))
    (job,) = m.stores
    assert job.block_ids == [21, 22] and job.keys == r.block_hashes[1:3]
    # A failed load reported by the workers rewinds the stores to it.
    s.update_connector_output(SimpleNamespace(invalid_block_ids={21}))
    m = s.build_connector_meta(sched_out([], {"r": 2 * BS}, cached_data(("r", None, BS))))
    assert [j.block_ids for j in m.stores] == [[21, 22]]
    # Finished: no more jobs.
    m = s.build_connector_meta(sched_out([], {"r": 1}, cached_data(("r", None, 3 * BS)), finished={"r"}))
    assert m.stores == []
    s.shutdown()


# ---- worker -------------------------------------------------------------------------------------

def caches(kind: str, layout=LAYOUT, seed=0):
    rng = np.random.default_rng(seed)
    refs = [rng.standard_normal((NB, layout.kv_kind.tensors, BS, layout.num_kv_heads, D)).astype(np.float16)
            for _ in range(layout.num_layers)]
    made = [make_cache(kind, ref) for ref in refs]
    return {f"model.layers.{i}.self_attn.attn": c for i, (c, _) in enumerate(made)}, refs, made[0][1]


def worker_with(kind, seed=0, **extra):
    w = connector(sv.KVConnectorRole.WORKER, **extra)
    kv, refs, canonical = caches(kind, seed=seed)
    w.register_kv_caches(kv)
    return w, kv, refs, canonical


def test_worker_saves_in_one_layout_and_loads_into_another():
    src, _, refs, _ = worker_with("flash_attn", seed=3, save_chunk_bytes=1)
    link = src._links[0] = MemLink(src.layout)
    keys = [bytes([9, i]) * 16 for i in range(3)]
    meta = sv.StrataConnectorMetadata(stores=[sv.StoreJob("a", [4, 0, 2], keys, [None] + keys[:2])])
    src.bind_connector_metadata(meta)
    src.start_load_kv(None)
    for i in range(L):
        src.save_kv_layer(f"model.layers.{i}.self_attn.attn", None, None)
    src.wait_for_save()
    assert link.saves == [1, 1, 1], "save_chunk_bytes of one block: one call per block"
    assert link.parents == dict(zip(keys, [None] + keys[:2]))
    payload = link.blocks[keys[1]].view(np.float16).reshape(L, 2, BS, H, D)
    assert all(np.array_equal(payload[l], refs[l][0]) for l in range(L))

    dst, kv, dst_refs, canonical = worker_with("bhnc_nhd_strides", seed=4)
    dst._links[0] = link
    lease = Lease(7, dst.layout.namespace_id(), 0)
    dst.bind_connector_metadata(sv.StrataConnectorMetadata(loads=[sv.LoadJob("b", [1, 5, 3], keys, (lease,))]))
    dst.start_load_kv(None)
    for i in range(L):
        dst.wait_for_layer_load(f"model.layers.{i}.self_attn.attn")
    assert dst.get_block_ids_with_load_errors() == set()
    for l, cache in enumerate(kv.values()):
        got = canonical(cache)
        assert np.array_equal(got[[1, 5, 3]], refs[l][[4, 0, 2]])
        assert np.array_equal(got[[0, 2, 4]], dst_refs[l][[0, 2, 4]]), "other blocks untouched"
    assert dst.get_kv_connector_stats().data["loaded_blocks"] == 3
    src.shutdown()
    dst.shutdown()


def test_load_errors_report_the_tail_and_skip_that_requests_saves():
    w, kv, refs, _ = worker_with("flashinfer")
    link = w._links[0] = MemLink(w.layout, fail_at=1)
    keys = [bytes([7, i]) * 16 for i in range(3)]
    for k in keys:
        link.blocks[k] = np.zeros(w.layout.block_bytes, np.uint8)
    meta = sv.StrataConnectorMetadata(
        loads=[sv.LoadJob("bad", [3, 4, 5], keys, (None,)), sv.LoadJob("short", [0, 1], keys[:1], (None,))],
        stores=[sv.StoreJob("bad", [0], [b"k" * 32], [None]), sv.StoreJob("ok", [2], [b"o" * 32], [None])])
    w.bind_connector_metadata(meta)
    w.start_load_kv(None)
    w.wait_for_save()
    assert w.get_block_ids_with_load_errors() == {4, 5, 1}
    assert w.get_finished({"bad"}) == (None, None)
    assert b"k" * 32 not in link.blocks and b"o" * 32 in link.blocks
    # The next step starts with a clean report.
    w.clear_connector_metadata()
    w.bind_connector_metadata(sv.StrataConnectorMetadata())
    assert w.get_block_ids_with_load_errors() == set()
    w.shutdown()


def test_register_refuses_caches_that_disagree():
    w = connector(sv.KVConnectorRole.WORKER)
    kv, _, _ = caches("flashinfer")
    with pytest.raises(ValueError, match="3 KV cache layers registered, the Strata layout says 2"):
        w.register_kv_caches({**kv, "model.layers.2.self_attn.attn": next(iter(kv.values()))})
    mixed = dict(kv)
    mixed["model.layers.1.self_attn.attn"] = make_cache("flash_attn", np.zeros((NB, 2, BS, H, D), np.float16))[0]
    with pytest.raises(ValueError, match="KV cache layers differ"):
        w.register_kv_caches(mixed)
    with pytest.raises(ValueError, match="no KV caches"):
        w.register_kv_caches({})
    w.shutdown()


# ---- events -----------------------------------------------------------------------------------------

def test_events_in_vllms_shape_with_withdrawal_on_resync(caplog):
    caplog.set_level(logging.ERROR)
    pump = sv._EventPump(DEAD, 1, {b"a" * 32: (1, 2, 3, 4)})
    try:
        a, b = b"a" * 32, b"b" * 32
        as_int = lambda k: int.from_bytes(k[-8:], "big")  # noqa: E731
        out = pump._convert(BlockStored(1, 1, a, None, BS, Tier.DRAM))
        assert out == [{"type": "BlockStored", "block_hashes": [as_int(a)], "parent_block_hash": None,
                        "token_ids": [1, 2, 3, 4], "block_size": BS, "lora_id": None, "medium": "CPU",
                        "lora_name": None}]
        out = pump._convert(BlockStored(2, 1, b, a, BS, Tier.NVME))
        assert out[0]["parent_block_hash"] == as_int(a) and out[0]["medium"] == "STORAGE"
        assert out[0]["token_ids"] == []
        pump._convert(BlockStored(3, 1, a, None, BS, Tier.NVME))
        assert pump._convert(BlockRemoved(4, 1, a, Tier.DRAM)) == [
            {"type": "BlockRemoved", "block_hashes": [as_int(a)], "medium": "CPU"}]
        # A fenced NVMe tier withdraws exactly what was reported there.
        out = pump._convert(AllBlocksCleared(5, Tier.NVME))
        assert sorted((e["medium"], e["block_hashes"][0]) for e in out) == sorted(
            [("STORAGE", as_int(a)), ("STORAGE", as_int(b))])
        pump._convert(BlockStored(6, 1, b, a, BS, Tier.DRAM))
        assert pump._convert(Reset("daemon restarted")) == [
            {"type": "BlockRemoved", "block_hashes": [as_int(b)], "medium": "CPU"}]
        assert pump._convert(Reset("again")) == []
    finally:
        pump.close()
