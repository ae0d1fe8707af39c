"""StrataHiCacheStorage against the pinned SGLang v0.5.21 interface
(``strata/integrations/upstream/sglang.json``): every ``HiCacheStorage``
method present with compatible parameters, the class concrete and built
as SGLang builds it, and SGLang's return rules (an ``int`` from
``batch_exists``, one ``bool`` per key from the ``*_v1`` methods, never
``None``, never an exception) held quickly when the daemon is unreachable.
No model, no daemon."""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import strata.integrations.sglang as sg
from strata.integrations.sglang import HiCacheStorageConfig, StrataHiCacheStorage
from strata.testing import free_port

SPEC = json.loads((Path(sg.__file__).parent / "upstream" / "sglang.json").read_text())
UPSTREAM = SPEC["classes"]["HiCacheStorage"]["methods"]
EMPTY = inspect.Parameter.empty


def config(extra: dict, **kw) -> HiCacheStorageConfig:
    base = dict(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
                enable_storage_metrics=True, is_page_first_layout=True, model_name="test/sglang",
                extra_config={"backend_name": "strata", "module_path": "strata.integrations.sglang",
                              "class_name": "StrataHiCacheStorage", "interface_v1": 1, **extra})
    base.update(kw)
    return HiCacheStorageConfig(**base)


class PageFirstPool:
    """The fields of SGLang's MHATokenToKVPoolHost the backend reads
    (page_first: kv_buffer dims (2, size, layer, head, dim))."""

    layout = "page_first"
    page_size, layer_num, head_num, head_dim = 16, 2, 2, 8
    dtype = np.dtype(np.float16)
    size = 64
    kv_buffer = np.zeros((2, 64, 2, 2, 8), np.float16)

    def get_dummy_flat_data_page(self):
        return np.zeros(2 * 2 * 16 * 2 * 8, np.float16)


@pytest.mark.parametrize("method", UPSTREAM, ids=lambda m: m["name"])
def test_method_present_with_compatible_parameters(method):
    ours = getattr(StrataHiCacheStorage, method["name"], None)
    assert callable(ours), f"{method['name']} missing"
    assert not getattr(ours, "__isabstractmethod__", False), f"{method['name']} still abstract"
    params = list(inspect.signature(ours).parameters.values())
    for i, up in enumerate(method["params"]):
        assert i < len(params), f"{method['name']}: no parameter {up['name']!r}"
        p = params[i]
        assert (p.name, p.kind.name) == (up["name"], up["kind"]), f"{method['name']}: {p} vs {up}"
        if "default" in up:
            assert p.default is not EMPTY and repr(p.default) == up["default"], f"{method['name']}: {p}"
    for p in params[len(method["params"]):]:
        assert p.default is not EMPTY or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD), \
            f"{method['name']}: extra required parameter {p}"


def test_concrete_and_built_as_sglang_builds_it():
    assert not inspect.isabstract(StrataHiCacheStorage)
    assert issubclass(StrataHiCacheStorage, sg.HiCacheStorage)
    loader = SPEC["loader"]
    assert loader["constructor"]["params"] == ["storage_config: HiCacheStorageConfig", "kwargs: dict"]
    cfg = config({"endpoint": "127.0.0.1:1"})
    assert set(loader["required_extra_config_keys"]) <= set(cfg.extra_config)
    backend = StrataHiCacheStorage(cfg, {})  # positional, as the dynamic factory calls it
    assert backend.link is None  # nothing connects before the host pool is registered
    with pytest.raises(ValueError, match="zero_copy"):
        StrataHiCacheStorage(config({"zero_copy": "maybe"}), {})


def test_stand_ins_follow_the_pinned_classes():
    """The classes in use (SGLang's own, or the stand-ins when it is not
    installed) carry the pinned fields and methods."""
    for name in ("HiCacheStorageConfig", "HiCacheStorageExtraInfo", "PoolTransferResult"):
        pinned = [(f["name"], f.get("default")) for f in SPEC["classes"][name]["fields"]]
        have = [(f.name, None if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                 else repr(f.default)) for f in dataclasses.fields(getattr(sg, name))]
        if sg.SGLANG_IMPORTED:
            assert {n for n, _ in pinned} <= {n for n, _ in have}, name
        else:
            assert sorted(have) == sorted(pinned), name
            assert [n for n, _ in have if _ is None] == [n for n, d in pinned if d is None], name
    base = sg.HiCacheStorage
    pinned_abstract = {m["name"] for m in UPSTREAM if m["abstract"]}
    assert set(base.__abstractmethods__) == pinned_abstract
    assert {m["name"] for m in UPSTREAM} <= {n for n, v in vars(base).items() if callable(v)}


def test_unreachable_daemon_answers_typed_misses_quickly():
    port = free_port()  # nothing listens there
    backend = StrataHiCacheStorage(config({"endpoint": f"127.0.0.1:{port}", "timeout_s": 2,
                                           "retry_after_s": 0.5}), {})
    keys = [f"{i:064x}" for i in range(1, 4)]
    host = np.arange(48)
    flats = [PageFirstPool().get_dummy_flat_data_page() for _ in keys]

    def check_all() -> None:
        n = backend.batch_exists(keys)
        assert type(n) is int and n == 0
        for fn in (backend.batch_get_v1, backend.batch_set_v1):
            res = fn(keys, host)
            assert type(res) is list and res == [False] * 3 and all(type(b) is bool for b in res)
        assert backend.exists(keys[0]) is False
        assert backend.get(keys[0], flats[0]) is None
        assert backend.batch_get(keys, flats) == [None] * 3
        assert backend.set(keys[0], flats[0]) is False
        assert backend.batch_set(keys, flats) is False
        assert backend.batch_exists_v2(keys).kv_hit_pages == 0
        kv = SimpleNamespace(name="kv", keys=keys, host_indices=host)
        mamba = SimpleNamespace(name="mamba", keys=keys[:1], host_indices=host[:16])
        assert backend.batch_exists_v2(keys, [mamba]).kv_hit_pages == 0
        assert backend.batch_get_v2([kv, mamba]) == {"kv": [False] * 3, "mamba": [False]}
        assert backend.batch_set_v2([kv, mamba]) == {"kv": [False] * 3, "mamba": [False]}
        assert backend.clear() is None
        stats = backend.get_stats()
        for name in ("prefetch_pgs", "backup_pgs", "prefetch_bandwidth", "backup_bandwidth"):
            assert isinstance(getattr(stats, name), list)

    t0 = time.monotonic()
    check_all()  # before registration: no host pool, no link
    backend.register_mem_pool_host(PageFirstPool())  # unreachable is not a configuration error
    assert backend.link is not None
    for _ in range(3):
        check_all()
    assert backend.link.stats.errors >= 1 and backend.link.stats.down_answers >= 1
    # Malformed arguments are misses too, with the promised types.
    assert backend.batch_exists(None) == 0
    assert backend.batch_get_v1(None, None) == [] and backend.batch_set_v1(None, None) == []
    assert backend.batch_get_v1(keys, None) == [False] * 3
    assert backend.batch_set_v1(keys, [1, 2]) == [False] * 3
    assert backend.batch_get(keys, [object()] * 3) == [None] * 3
    assert backend.batch_set(keys, [flats[0]]) is False
    assert time.monotonic() - t0 < 10
    backend.close()


def test_real_sglang_class():
    if not sg.SGLANG_IMPORTED:
        pytest.skip("sglang is not installed here: the real-class check (subclass of SGLang's own "
                    "HiCacheStorage, signatures against it) runs where it is")
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage
    assert issubclass(StrataHiCacheStorage, HiCacheStorage)
    assert not inspect.isabstract(StrataHiCacheStorage)
    # Whatever release is installed: its methods accept what ours accept.
    for name, fn in inspect.getmembers(HiCacheStorage, inspect.isfunction):
        if name.startswith("_"):
            continue
        real = list(inspect.signature(fn).parameters)
        ours = list(inspect.signature(getattr(StrataHiCacheStorage, name)).parameters)
        assert ours[:len(real)] == real, name
