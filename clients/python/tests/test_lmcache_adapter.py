"""The LMCache L2 adapter against a real stratad.

Without LMCache installed the adapter runs on its stand-ins (ObjectKey,
Bitmap, the base class); with LMCache importable the last tests also check
it against the real classes and load it through LMCache's plugin factory.
"""

import inspect
import json
import os
import select
import time
from pathlib import Path

import numpy as np
import pytest

import strata.integrations.lmcache as lm
from strata.integrations.lmcache import (Bitmap, ObjectKey, PyBitmap, StrataL2Adapter,
                                         StrataL2AdapterConfig)
from strata.testing import Daemon

# Read from the checkout (installed wheels do not carry the upstream records).
RECORDED = json.loads((Path(__file__).resolve().parents[1] / "strata" / "integrations" / "upstream"
                       / "lmcache.json").read_text())
WRITE_THROUGH = "[tiers.nvme]\nwrite_through = true\n"
WAIT_S = 10.0


class Obj:
    """A MemoryObj-like buffer: ``get_size()`` logical bytes, possibly
    inside a larger (alignment-padded) physical buffer."""

    def __init__(self, size: int, physical: int | None = None, seed: int | None = None):
        self.raw = np.full(physical or size, 0xEE, dtype=np.uint8)
        if seed is not None:
            self.raw[:size] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
        self.size = size

    def get_size(self) -> int:
        return self.size

    def get_physical_size(self) -> int:
        return self.raw.size

    @property
    def byte_array(self) -> memoryview:
        return memoryview(self.raw[:self.size])


def keys_for(n, model="m", rank=0, group=0, salt="", base=0):
    return [ObjectKey((base + i).to_bytes(16, "big"), model, rank, group, salt) for i in range(n)]


def wait_fd(fd: int, timeout: float = WAIT_S) -> int:
    """Waits for the eventfd and returns (and clears) its counter."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    assert p.poll(timeout * 1000), f"eventfd {fd} not signalled within {timeout} s"
    return os.eventfd_read(fd)


def store(a, keys, objs):
    tid = a.submit_store_task(keys, objs)
    done = {}
    while tid not in done:
        wait_fd(a.get_store_event_fd())
        done.update(a.pop_completed_store_tasks())
    return done[tid]


def lookup(a, keys):
    tid = a.submit_lookup_and_lock_task(keys, {0: None})
    while True:
        wait_fd(a.get_lookup_and_lock_event_fd())
        r = a.query_lookup_and_lock_result(tid)
        if r is not None:
            return r


def load(a, keys, objs):
    tid = a.submit_load_task(keys, objs)
    while True:
        wait_fd(a.get_load_event_fd())
        r = a.query_load_result(tid)
        if r is not None:
            return r


def bits(bm, n) -> str:
    return "".join("1" if bm.test(i) else "0" for i in range(n))


@pytest.fixture
def adapters():
    made = []

    def make(endpoint, **params):
        params.setdefault("max_object_bytes", 8 << 20)
        a = StrataL2Adapter(StrataL2AdapterConfig(endpoint=endpoint, **params), l1_memory_desc=None)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


SIZES = [4096, 256 << 10, (1 << 20) + 17, 1, 5000, 2 << 20]


@pytest.mark.parametrize("path", ["zero-copy", "grpc-uds", "tcp"])
def test_round_trip_of_varied_sizes_is_byte_exact(daemon, adapters, path):
    endpoint = daemon.endpoint if path == "tcp" else daemon.unix_endpoint
    a = adapters(endpoint, zero_copy=(path == "zero-copy"))
    assert a.report_status()["zero_copy"] == (path == "zero-copy")
    keys = keys_for(len(SIZES), model=f"rt-{path}")
    objs = [Obj(s, seed=i) for i, s in enumerate(SIZES)]
    r = store(a, keys, objs)
    assert r.is_successful() and r.bytes_transferred() == sum(SIZES)
    assert bits(lookup(a, keys), len(keys)) == "1" * len(keys)
    # Load buffers are alignment-padded: bytes past get_size() stay untouched.
    outs = [Obj(s, physical=s + 64) for s in SIZES]
    assert bits(load(a, keys, outs), len(keys)) == "1" * len(keys)
    for o, want in zip(outs, objs):
        assert np.array_equal(o.raw[:o.size], want.raw[:want.size])
        assert (o.raw[o.size:] == 0xEE).all()
    # Storing the same keys again writes nothing.
    assert store(a, keys, objs).bytes_transferred() == 0
    st = a.report_status()
    assert st["is_healthy"] and st["daemon_reachable"] and st["errors"] == 0
    assert st["keys_loaded"] == len(keys) and st["bytes_loaded"] == sum(SIZES)


def test_eventfds_are_distinct_nonblocking_and_results_come_once(daemon, adapters):
    a = adapters(daemon.unix_endpoint)
    fds = [a.get_store_event_fd(), a.get_lookup_and_lock_event_fd(), a.get_load_event_fd()]
    assert len(set(fds)) == 3
    other = adapters(daemon.unix_endpoint)
    assert not set(fds) & {other.get_store_event_fd(), other.get_lookup_and_lock_event_fd(),
                           other.get_load_event_fd()}
    for fd in fds:
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)
    keys = keys_for(8, model="fd")
    objs = [Obj(8192, seed=i) for i in range(8)]
    ids = [a.submit_store_task(keys[i:i + 2], objs[i:i + 2]) for i in range(0, 8, 2)]
    assert len(set(ids)) == 4
    results = {}
    signals = 0
    while len(results) < 4:
        signals += wait_fd(a.get_store_event_fd())
        popped = a.pop_completed_store_tasks()
        # A signal means at least one result is already there to take.
        assert popped or signals <= len(results)
        results.update(popped)
    assert signals == 4 and set(results) == set(ids) and all(r.is_successful() for r in results.values())
    assert a.pop_completed_store_tasks() == {}
    tid = a.submit_load_task(keys, [Obj(8192) for _ in keys])
    assert wait_fd(a.get_load_event_fd()) == 1
    assert a.query_load_result(tid).popcount() == 8
    assert a.query_load_result(tid) is None
    tid = a.submit_lookup_and_lock_task(keys, {})
    assert wait_fd(a.get_lookup_and_lock_event_fd()) == 1
    assert a.query_lookup_and_lock_result(tid).popcount() == 8
    assert a.query_lookup_and_lock_result(tid) is None


def test_prefix_and_exact_lookups_and_per_key_loads(daemon, adapters):
    prefix = adapters(daemon.unix_endpoint)
    exact = adapters(daemon.unix_endpoint, lookup="exact")
    keys = keys_for(5, model="gaps")
    objs = [Obj(4096, seed=i) for i in range(5)]
    assert store(prefix, [keys[i] for i in (0, 1, 3)], [objs[i] for i in (0, 1, 3)]).is_successful()
    assert bits(lookup(prefix, keys), 5) == "11000"
    assert bits(lookup(exact, keys), 5) == "11010"
    # Groups are looked up separately: a miss in group 0 hides nothing in group 1.
    g1 = keys_for(2, model="gaps", group=1)
    assert store(prefix, g1, objs[:2]).is_successful()
    assert bits(lookup(prefix, keys + g1), 7) == "1100011"
    # Loads answer per key, whatever the lookup mode.
    outs = [Obj(4096) for _ in keys]
    assert bits(load(prefix, keys, outs), 5) == "11010"
    assert np.array_equal(outs[3].raw, objs[3].raw)
    assert (outs[2].raw == 0xEE).all()
    # A buffer of another size is refused, not filled with the wrong bytes.
    assert bits(load(prefix, keys[:1], [Obj(8192)]), 1) == "0"
    assert prefix.report_status()["size_mismatches"] == 1


def test_lock_pins_until_unlock(daemon, adapters):
    a = adapters(daemon.unix_endpoint, num_workers=1)
    keys = keys_for(3, model="pin")
    assert store(a, keys, [Obj(4096, seed=i) for i in range(3)]).is_successful()
    assert lookup(a, keys[:2]).popcount() == 2
    assert lookup(a, keys[:1]).popcount() == 1  # key 0 locked twice
    assert a.report_status()["locked_keys"] == 2
    used = a.get_usage().total_bytes_used
    a.delete(keys)  # key 2 goes; keys 0 and 1 are pinned
    assert bits(lookup(a, keys), 3) == "110"
    assert a.get_usage().total_bytes_used == used - 4096
    # Key 0 is now locked three times, key 1 twice (the last lookup locked too).
    a.submit_unlock(keys)
    a.submit_unlock(keys[:2])
    assert a.report_status()["locked_keys"] == 1
    a.submit_unlock(keys[:1])
    assert a.report_status()["locked_keys"] == 0
    a.delete(keys)
    assert bits(lookup(a, keys), 3) == "000"
    assert a.get_usage().total_bytes_used == 0


def test_locks_end_with_their_lease(daemon, adapters):
    a = adapters(daemon.unix_endpoint, lock_ttl_ms=300)
    keys = keys_for(2, model="ttl")
    assert store(a, keys, [Obj(4096), Obj(4096)]).is_successful()
    assert lookup(a, keys).popcount() == 2
    assert a.report_status()["locked_keys"] == 2
    time.sleep(0.4)
    assert a.report_status()["locked_keys"] == 0
    a.delete(keys)  # no longer pinned
    assert lookup(a, keys).popcount() == 0
    a.submit_unlock(keys)  # late unlocks of forgotten locks are ignored


def test_daemon_down_fails_softly_and_restart_resumes(tmp_path, adapters):
    d = Daemon(dram="32MiB", nvme="64MiB", data_dir=str(tmp_path), config=WRITE_THROUGH).start()
    try:
        a = adapters(d.unix_endpoint, retry_after_s=0.2, timeout_s=2.0)
        keys = keys_for(4, model="restart")
        objs = [Obj(64 << 10, seed=i) for i in range(4)]
        assert store(a, keys[:2], objs[:2]).is_successful()
        d.kill()
        t0 = time.monotonic()
        assert lookup(a, keys).popcount() == 0
        assert load(a, keys[:2], [Obj(64 << 10) for _ in range(2)]).popcount() == 0
        r = store(a, keys[2:], objs[2:])
        assert not r.is_successful() and int(r) == -1
        a.submit_unlock(keys)
        a.delete(keys)
        st = a.report_status()
        assert not st["daemon_reachable"] and st["errors"] >= 1 and st["store_failures"] == 1
        assert st["is_healthy"]  # the adapter itself works: LMCache must not look dead
        assert time.monotonic() - t0 < 8
        d.start()
        time.sleep(0.3)
        # The blocks written through to NVMe survived; the new arena is mapped.
        outs = [Obj(64 << 10) for _ in range(2)]
        assert bits(load(a, keys[:2], outs), 2) == "11"
        assert all(np.array_equal(o.raw, w.raw) for o, w in zip(outs, objs))
        assert store(a, keys[2:], objs[2:]).is_successful()
        assert bits(lookup(a, keys), 4) == "1111"
        assert a.report_status()["daemon_reachable"]
    finally:
        d.close()


def test_other_models_ranks_groups_and_salts_are_invisible(daemon, adapters):
    a = adapters(daemon.unix_endpoint)
    mine = keys_for(2, model="iso", rank=0)
    assert store(a, mine, [Obj(4096, seed=i) for i in range(2)]).is_successful()
    for other in (keys_for(2, model="iso2"), keys_for(2, model="iso", rank=1),
                  keys_for(2, model="iso", group=1), keys_for(2, model="iso", salt="tenant-b")):
        assert lookup(a, other).popcount() == 0
        assert load(a, other, [Obj(4096) for _ in other]).popcount() == 0
    assert lookup(a, mine).popcount() == 2


def test_accounting_and_listeners(daemon, adapters):
    a = adapters(daemon.unix_endpoint, max_capacity_gb=1)
    assert a.supports_global_eviction

    class Listener:
        def __init__(self):
            self.events = []

        def on_l2_keys_stored(self, keys, sizes):
            self.events.append(("stored", len(keys), sum(sizes)))

        def on_l2_keys_accessed(self, keys):
            self.events.append(("accessed", len(keys)))

        def on_l2_keys_deleted(self, keys):
            self.events.append(("deleted", len(keys)))

    listener = Listener()
    a.register_listener(listener)
    a.set_backend_identity("plugin")
    keys = keys_for(2, model="acct", salt="s1") + keys_for(1, model="acct", base=9)
    objs = [Obj(4096), Obj(10000), Obj(8192)]
    store(a, keys, objs)
    store(a, keys, objs)
    u = a.get_usage()
    assert u.total_bytes_used == 22288 and dict(u.bytes_by_cache_salt) == {"s1": 14096, "": 8192}
    load(a, keys, [Obj(o.size) for o in objs])
    a.delete(keys)
    assert a.get_usage().total_bytes_used == 0
    assert listener.events == [("stored", 3, 22288), ("stored", 3, 0), ("accessed", 3), ("deleted", 3)]


def test_config_is_validated_with_named_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        StrataL2AdapterConfig.from_dict({"endpoint": "unix:/x", "bogus": 1})
    with pytest.raises(ValueError, match="granule_bytes"):
        StrataL2AdapterConfig.from_dict({"granule_bytes": 3000})
    with pytest.raises(ValueError, match="max_object_bytes"):
        StrataL2AdapterConfig.from_dict({"granule_bytes": 1024, "max_object_bytes": 1 << 28})
    with pytest.raises(ValueError, match="lookup"):
        StrataL2AdapterConfig.from_dict({"lookup": "fuzzy"})
    with pytest.raises(ValueError, match="lock_ttl_ms"):
        StrataL2AdapterConfig.from_dict({"lock_ttl_ms": 10**6})
    cfg = StrataL2AdapterConfig.from_dict({"endpoint": "/run/x.sock", "num_workers": 3})
    assert cfg.num_workers == 3 and cfg.granule_bytes == 4096
    assert "endpoint" in StrataL2AdapterConfig.help() and "lookup" in StrataL2AdapterConfig.help()


def test_a_layout_the_daemon_would_refuse_fails_at_construction(daemon):
    with pytest.raises(ValueError, match="max_object_bytes: 134217728 is larger than the DRAM tier"):
        StrataL2Adapter({"endpoint": daemon.unix_endpoint, "max_object_bytes": 128 << 20})


def test_objects_the_adapter_cannot_store_fail_the_task(daemon, adapters):
    a = adapters(daemon.unix_endpoint, max_object_bytes=1 << 20)
    keys = keys_for(2, model="big")
    r = store(a, keys, [Obj(4096), Obj((1 << 20) + 1)])
    assert not r.is_successful()
    assert "max_object_bytes" in a.report_status()["last_error"]


def test_close_releases_everything_and_never_raises(tmp_path, adapters):
    d = Daemon(dram="16MiB", nvme="0", data_dir=str(tmp_path)).start()
    try:
        a = StrataL2Adapter({"endpoint": d.unix_endpoint, "max_object_bytes": 1 << 20},
                            l1_memory_desc=object())
        keys = keys_for(2, model="close")
        assert store(a, keys, [Obj(4096), Obj(4096)]).is_successful()
        assert lookup(a, keys).popcount() == 2
        fds = [a.get_store_event_fd(), a.get_lookup_and_lock_event_fd(), a.get_load_event_fd()]
        a.close()
        a.close()
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
        assert not any(t.is_alive() for t in a._workers)
        assert not a.report_status()["is_healthy"]
        # After close: no exception, the task simply failed.
        tid = a.submit_load_task(keys, [Obj(4096), Obj(4096)])
        assert a.query_load_result(tid).popcount() == 0
        # The lock's lease was released: the keys can be deleted at once.
        b = StrataL2Adapter({"endpoint": d.unix_endpoint, "max_object_bytes": 1 << 20})
        try:
            b.delete(keys)
            assert lookup(b, keys).popcount() == 0
        finally:
            b.close()
    finally:
        d.close()


def test_python_bitmap_semantics():
    b = PyBitmap(10, 3)
    assert repr(b) == "1110000000" and b.count_leading_ones() == 3 and b.popcount() == 3
    b.set(5)
    b.set_range(7, 20)
    assert repr(b) == "1110010111" and b.highest_set_bit() == 9
    b.clear(0)
    assert b.count_leading_zeros() == 1 and not b.test(0)
    assert (~b).get_indices_list() == [0, 3, 4, 6]
    other = PyBitmap(8)
    other.batched_set([1, 3, 100])
    assert repr(b & other) == "01000000" and repr(b | other) == "01110101"
    assert b.gather(list("abcdefghij")) == list("bcfhij") and b.get_indices_set() == {1, 2, 5, 7, 8, 9}
    assert PyBitmap(4).count_leading_zeros() == 4 and PyBitmap(4, 9).count_leading_ones() == 4
    with pytest.raises(IndexError):
        b.set(10)


# ---- conformance with the pinned upstream (upstream/lmcache.json) -------------

def _recorded(cls_name):
    return {m["name"]: m for m in RECORDED["classes"][cls_name]["methods"]}


def _params(fn):
    return [(p.name, p.kind.name) for p in inspect.signature(fn).parameters.values()]


def _recorded_params(m):
    return [(p["name"], p["kind"]) for p in m["params"]]


def test_adapter_conforms_to_the_recorded_interface():
    assert RECORDED["tag"] == "v0.5.5"
    methods = _recorded("L2AdapterInterface")
    assert not inspect.isabstract(StrataL2Adapter)
    overridden = {"delete", "report_status", "close"}
    for name, m in methods.items():
        if name == "__init__":
            continue
        assert hasattr(StrataL2Adapter, name), f"missing {name}"
        if m["abstract"] or name in overridden:
            ours = getattr(StrataL2Adapter, name)
            assert StrataL2Adapter.__dict__.get(name) is not None, f"{name} not implemented"
            assert _params(ours) == _recorded_params(m), name
    # The plugin factory calls cls(config, l1_memory_desc=...).
    sig = inspect.signature(StrataL2Adapter.__init__)
    assert "l1_memory_desc" in sig.parameters
    assert list(sig.parameters)[:2] == ["self", "config"]
    # And finds the config class by the "<class_name>Config" convention.
    assert lm.StrataL2AdapterConfig.__name__ == StrataL2Adapter.__name__ + "Config"
    for name in _recorded("L2AdapterConfigBase"):
        assert isinstance(inspect.getattr_static(StrataL2AdapterConfig, name), classmethod), name
    # The Bitmap stand-in has every native method.
    for name in _recorded("Bitmap"):
        assert callable(getattr(PyBitmap, name)), f"PyBitmap lacks {name}"


def test_stand_ins_match_the_recorded_types():
    if lm.LMCACHE_IMPORTED:
        pytest.skip("LMCache is installed: the real classes are in use (see the next test)")
    for name, m in _recorded("L2AdapterInterface").items():
        fn = inspect.getattr_static(lm.L2AdapterInterface, name)
        if isinstance(fn, property):
            fn = fn.fget
        assert _params(fn) == _recorded_params(m), name
    fields = [f["name"] for f in RECORDED["classes"]["ObjectKey"]["fields"]]
    assert list(lm.ObjectKey.__dataclass_fields__) == fields
    with pytest.raises(ValueError):
        ObjectKey(b"x", "a@b", 0)
    with pytest.raises(ValueError):
        ObjectKey(b"x", "m", 0, cache_salt="a/b")
    for name in ("is_successful", "bytes_transferred"):
        assert name in _recorded("L2StoreResult") and hasattr(lm.L2StoreResult, name)
    assert int(lm.L2StoreResult(False, 5)) == -1 and lm.L2StoreResult(True, 5).bytes_transferred() == 5
    assert [f["name"] for f in RECORDED["classes"]["AdapterUsage"]["fields"]] == \
        list(lm.AdapterUsage.__dataclass_fields__)


def test_against_the_real_lmcache(daemon):
    try:
        from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface
        from lmcache.v1.distributed.l2_adapters.config import parse_args_to_l2_adapters_config
        from lmcache.v1.distributed.l2_adapters import create_l2_adapter
    except ImportError as e:
        pytest.skip(f"LMCache is not importable here ({e}); bench/lmcache/run builds a venv with it")
    import argparse

    assert lm.LMCACHE_IMPORTED and issubclass(StrataL2Adapter, L2AdapterInterface)
    for name, fn in inspect.getmembers(L2AdapterInterface, inspect.isfunction):
        if getattr(fn, "__isabstractmethod__", False):
            assert _params(getattr(StrataL2Adapter, name)) == _params(fn), name
    # Native Bitmap and the stand-in agree.
    from lmcache.lmcache_native import Bitmap as Native
    assert Bitmap is Native
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(1, 70))
        nat, py = Native(n, int(rng.integers(0, n + 1))), PyBitmap(n)
        for i in range(n):
            if nat.test(i):
                py.set(i)
        idx = [int(i) for i in rng.integers(0, n, 5)]
        for bm in (nat, py):
            bm.batched_set(idx)
            bm.clear(idx[0])
        assert repr(nat) == repr(py)
        for name in ("popcount", "count_leading_ones", "count_leading_zeros", "highest_set_bit",
                     "get_indices_list"):
            assert getattr(nat, name)() == getattr(py, name)(), name
        assert repr(~nat) == repr(~py)
    # Loaded the way the server and `lmcache bench l2` load it.
    spec = json.dumps({"type": "plugin", "module_path": "strata.integrations.lmcache",
                       "class_name": "StrataL2Adapter",
                       "adapter_params": {"endpoint": daemon.unix_endpoint,
                                          "max_object_bytes": 8 << 20}})
    cfg = parse_args_to_l2_adapters_config(argparse.Namespace(l2_adapter=[spec])).adapters[0]
    from lmcache.v1.distributed.internal_api import L1MemoryDesc
    a = create_l2_adapter(cfg, l1_memory_desc=L1MemoryDesc(ptr=0, size=0, align_bytes=1))
    try:
        assert isinstance(a, StrataL2Adapter)
        keys = keys_for(3, model="real")
        objs = [Obj(4096 * (i + 1), seed=i) for i in range(3)]
        assert store(a, keys, objs).is_successful()
        outs = [Obj(o.size) for o in objs]
        assert load(a, keys, outs).popcount() == 3
        assert all(np.array_equal(o.raw, w.raw) for o, w in zip(outs, objs))
    finally:
        a.close()
