"""Strata as an L2 tier of LMCache's multiprocess server (LMCache v0.5.5).

Load it with::

    lmcache server ... --l2-adapter '{"type": "plugin",
        "module_path": "strata.integrations.lmcache", "class_name": "StrataL2Adapter",
        "adapter_params": {"endpoint": "unix:/run/strata/stratad.sock"}}'

(the same JSON works for ``lmcache bench l2 --l2-adapter``). LMCache finds
:class:`StrataL2AdapterConfig` by its name and passes
``StrataL2AdapterConfig.from_dict(adapter_params)`` plus the keyword
``l1_memory_desc``. The interface followed method for method is pinned in
``upstream/lmcache.json``; call order and thread rules are in
``upstream/NOTES.md``.

**Contract kept.** Every ``submit_*`` returns a task id at once; the I/O
runs on the adapter's own worker threads (``num_workers``). Each kind of
task (store, lookup-and-lock, load) has its own non-blocking eventfd,
written once per finished task after its result is queryable;
``query_*_result`` hands a task's :class:`Bitmap` out exactly once and
``pop_completed_store_tasks`` hands out and forgets finished stores. Nothing
raises into LMCache's controller threads: with the daemon down a lookup
finds nothing, a load reports every key failed and a store fails (−1);
after a transport failure the adapter answers at once for
``retry_after_s``, then reconnects (and after a daemon restart maps the new
arena). :meth:`StrataL2Adapter.report_status` then shows
``daemon_reachable`` False and the last error, but ``is_healthy`` stays
True as long as the adapter's own threads run. LMCache ANDs every adapter's
``is_healthy`` into its server's ``/status``, and an L2 tier that is down
only costs hits; LMCache's own RESP adapter reports it the same way.

**Keys and namespaces.** LMCache objects are opaque byte buffers, so the
Strata :class:`~strata.types.Layout` only fixes the granularity: one
"token" is ``granule_bytes`` bytes (``dtype`` fp8, one layer, one latent
tensor, one head, ``head_dim`` = granule) and a block holds up to
``max_object_bytes``. An object whose size is not a multiple of the granule
is stored padded with zeros up to the next one (the daemon's DRAM tier
allocates in 4 KiB granules by default, so the default granule wastes no
arena space); a load copies exactly ``get_size()`` bytes and accepts a block only
if its stored length is that size rounded up. The daemon caps a block at
65536 tokens, which is why the granule cannot be one byte, and refuses a
layout whose block is larger than its DRAM tier: the default
``max_object_bytes`` of 64 MiB holds a 256-token chunk of a model with up
to 256 KiB of KV per token (Llama-3-8B has 128 KiB); raise it for larger
chunks.

There is one namespace per ``(model_name, cache_salt)``: the model name
goes into the layout's ``model_id`` (as ``lmcache:<model>``) and the salt
into its ``tenant_salt``, so salted tenants are separated by the daemon
itself. ``kv_rank`` and ``object_group_id`` go into the 32-byte Strata key,
``blake2b-256(kv_rank ‖ object_group_id ‖ chunk_hash)``. They are not
namespace fields because LMCache batches the keys of every rank and group
of a request into one task (group-major, chunk-major, rank-minor), and
``lmcache bench l2`` even gives every key its own ``kv_rank``: a namespace
per rank would cost one daemon call per key. The size is not a namespace
field either, because a lookup does not know the sizes of the objects it
asks about. Two LMCache servers share cached objects only when they use the
same ``granule_bytes`` and ``max_object_bytes`` (both are part of the
namespace id).

**Lookup.** The daemon's Lookup answers how many *leading* keys are present.
With ``lookup="prefix"`` (the default) the adapter makes one Lookup per
``(namespace, object_group_id)`` in the task and reports the keys after
the first miss of that run as misses. That is exact for LMCache's default
trim policy with full attention: within a group the keys are chunk-major
and rank-minor, and nothing after the first missing chunk is served. Some
lookups can come out lower than necessary: sliding-window groups, sparse
trim policies, several L2 adapters merged key by key. ``lookup="exact"``
is for those: after each miss it asks again from the next key, which
costs one daemon round trip per miss.

**Locks.** The hits of a lookup are pinned under one Strata lease (TTL
``lock_ttl_ms``). The adapter counts locks per key; ``submit_unlock`` drops
one per key and releases a lease once none of its keys is locked. A lease
that is never released (LMCache's bench never unlocks; an unlock that
cannot reach the daemon) ends by itself after its TTL. A pin therefore
lasts at most ``lock_ttl_ms``: a load after that may find the object
evicted, and then reports that key failed.

**Loads and stores.** On a Unix-socket endpoint with ``zero_copy`` the
adapter maps the daemon's arena (:class:`~strata.local.LocalClient`). A
store copies each object once into a reserved arena slot and commits it
(the daemon verifies the checksum before the block becomes visible). A
load takes the slots of the present keys under a short lease, copies each
block once into LMCache's buffer and checks the copy against the block's
checksum: a block that changed while being copied counts as failed.
Otherwise the bytes travel over gRPC (TCP, or a Unix socket whose arena
cannot be mapped), and the client verifies them on arrival. Loads always
answer per key: a miss in the middle of a task does not fail the keys
after it.

**Accounting.** The daemon owns capacity and eviction, so the adapter
declares ``max_capacity_bytes = max_capacity_gb`` (default 0: no
LMCache-side global eviction). Sizes are reported through the base class:
``_notify_keys_stored`` when a key is first stored through this adapter
(later stores of the same key report 0), ``_notify_keys_accessed`` on
loaded keys, and ``_notify_keys_deleted`` from :meth:`delete` for every key
that is gone afterwards (deleted now, or already evicted by the daemon).
Keys the daemon evicts by itself stay counted until LMCache deletes them.
``l1_memory_desc`` is accepted and not used: Strata needs no registration
of LMCache's L1 memory.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import grpc
import numpy as np
import xxhash

from ..auth import Credentials, credentials_from
from ..client import Client
from ..errors import ArenaChanged, DeadlineExceeded, StrataError, Unavailable
from ..local import LocalClient
from ..types import Block, Dtype, KvKind, Layout, Namespace, PutResult, Tier, as_bytes_view

__all__ = ["StrataL2Adapter", "StrataL2AdapterConfig", "ObjectKey", "Bitmap", "PyBitmap",
           "LMCACHE_IMPORTED"]

log = logging.getLogger("strata.integrations.lmcache")

# ---- LMCache's types: the real ones when LMCache is installed ---------------

try:
    from lmcache.v1.distributed.api import ObjectKey
    from lmcache.v1.distributed.internal_api import L2StoreResult
    from lmcache.v1.distributed.l2_adapters.base import AdapterUsage, L2AdapterInterface
    from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase
    LMCACHE_IMPORTED = True
except ImportError:
    LMCACHE_IMPORTED = False

    # Stand-ins with the pinned names and signatures (upstream/lmcache.json),
    # so that the adapter can be imported and tested without LMCache.

    @dataclass(frozen=True)
    class ObjectKey:  # type: ignore[no-redef]
        """Stand-in for ``lmcache.v1.distributed.api.ObjectKey``."""

        chunk_hash: bytes
        model_name: str
        kv_rank: int
        object_group_id: int = 0
        cache_salt: str = ""

        def __post_init__(self) -> None:
            if "@" in self.model_name:
                raise ValueError(f"model_name {self.model_name!r} contains '@'")
            if self.object_group_id < 0:
                raise ValueError(f"object_group_id {self.object_group_id} is negative")
            bad = set(self.cache_salt) & set("@/\\\x00")
            if bad:
                raise ValueError(f"cache_salt contains forbidden characters {sorted(bad)}")
            if len(self.cache_salt) > 128:
                raise ValueError(f"cache_salt has {len(self.cache_salt)} characters; the limit is 128")

    class L2StoreResult(int):  # type: ignore[no-redef]
        """Stand-in: ``bytes_transferred`` (>= 0) on success, -1 on failure."""

        def __new__(cls, success: bool, bytes_transferred: int) -> "L2StoreResult":
            if bytes_transferred < 0:
                raise ValueError(f"bytes_transferred must be >= 0, got {bytes_transferred}")
            return super().__new__(cls, bytes_transferred if success else -1)

        def is_successful(self) -> bool:
            return int(self) >= 0

        def bytes_transferred(self) -> int:
            return max(int(self), 0)

    @dataclass(frozen=True)
    class AdapterUsage:  # type: ignore[no-redef]
        """Stand-in for LMCache's usage snapshot."""

        total_bytes_used: int
        total_capacity_bytes: int
        bytes_by_cache_salt: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

        @property
        def usage_fraction(self) -> float:
            if self.total_capacity_bytes <= 0:
                return -1.0
            return self.total_bytes_used / self.total_capacity_bytes

    class L2AdapterConfigBase(ABC):  # type: ignore[no-redef]
        """Stand-in for LMCache's per-adapter config base."""

        @classmethod
        @abstractmethod
        def from_dict(cls, d: dict):
            ...

        @classmethod
        @abstractmethod
        def help(cls) -> str:
            ...

    class L2AdapterInterface(ABC):  # type: ignore[no-redef]
        """Stand-in for LMCache's ``L2AdapterInterface``: the abstract
        methods plus the base class's byte accounting and listeners (no
        event bus)."""

        def __init__(self, max_capacity_bytes: int = 0) -> None:
            self._listeners: list = []
            self._backend_name = ""
            self._shared = False
            self._max_capacity_bytes = max_capacity_bytes
            self._total_bytes_used = 0
            self._bytes_by_cache_salt: dict[str, int] = {}
            self._usage_lock = threading.Lock()

        @abstractmethod
        def get_store_event_fd(self) -> int: ...

        @abstractmethod
        def get_lookup_and_lock_event_fd(self) -> int: ...

        @abstractmethod
        def get_load_event_fd(self) -> int: ...

        @abstractmethod
        def submit_store_task(self, keys, objects): ...

        @abstractmethod
        def pop_completed_store_tasks(self): ...

        @abstractmethod
        def submit_lookup_and_lock_task(self, keys, group_layout_descs): ...

        @abstractmethod
        def query_lookup_and_lock_result(self, task_id): ...

        @abstractmethod
        def submit_unlock(self, keys) -> None: ...

        @abstractmethod
        def submit_load_task(self, keys, objects): ...

        @abstractmethod
        def query_load_result(self, task_id): ...

        def register_listener(self, listener) -> None:
            self._listeners.append(listener)

        def set_backend_identity(self, name: str, shared: bool = False) -> None:
            if not name:
                raise ValueError("backend name must be non-empty")
            self._backend_name, self._shared = name, shared

        def _notify_keys_stored(self, keys, sizes) -> None:
            self._account(keys, sizes, +1)
            for listener in self._listeners:
                listener.on_l2_keys_stored(keys, sizes)

        def _notify_keys_accessed(self, keys) -> None:
            for listener in self._listeners:
                listener.on_l2_keys_accessed(keys)

        def _notify_keys_deleted(self, keys, sizes) -> None:
            self._account(keys, sizes, -1)
            for listener in self._listeners:
                listener.on_l2_keys_deleted(keys)

        def _account(self, keys, sizes, sign: int) -> None:
            with self._usage_lock:
                for key, size in zip(keys, sizes, strict=True):
                    salt = key.cache_salt
                    self._total_bytes_used = max(self._total_bytes_used + sign * size, 0)
                    left = self._bytes_by_cache_salt.get(salt, 0) + sign * size
                    if left > 0:
                        self._bytes_by_cache_salt[salt] = left
                    else:
                        self._bytes_by_cache_salt.pop(salt, None)

        @property
        def supports_global_eviction(self) -> bool:
            return self._max_capacity_bytes > 0

        def delete(self, keys) -> None:
            return None

        def list_l2_keys(self, model_name=None, page_size: int = 500, cursor=None):
            raise NotImplementedError(f"{type(self).__name__} does not implement list_l2_keys")

        def get_usage(self) -> AdapterUsage:
            with self._usage_lock:
                return AdapterUsage(self._total_bytes_used, self._max_capacity_bytes,
                                    MappingProxyType(dict(self._bytes_by_cache_salt)))

        @abstractmethod
        def close(self) -> None: ...

        def report_status(self) -> dict:
            return {"is_healthy": True}


class PyBitmap:
    """Pure-Python stand-in for LMCache's native ``Bitmap`` (same method
    names and semantics; bit 0 is the first key). Used only when
    ``lmcache.lmcache_native`` cannot be imported."""

    __slots__ = ("_size", "_bits")

    def __init__(self, size: int, prefix_bits: int = 0):
        if size < 0:
            raise ValueError(f"bitmap size {size} is negative")
        self._size = size
        self._bits = (1 << min(max(prefix_bits, 0), size)) - 1

    def _check(self, index: int) -> None:
        if not 0 <= index < self._size:
            raise IndexError(f"bit {index} outside a bitmap of {self._size}")

    def set(self, index: int) -> None:
        self._check(index)
        self._bits |= 1 << index

    def batched_set(self, indices: Sequence[int]) -> None:
        for i in indices:
            if 0 <= i < self._size:
                self._bits |= 1 << i

    def set_range(self, start: int, end: int) -> None:
        end = min(end, self._size)
        if start < end:
            self._bits |= ((1 << (end - start)) - 1) << start

    def clear(self, index: int) -> None:
        self._check(index)
        self._bits &= ~(1 << index)

    def test(self, index: int) -> bool:
        self._check(index)
        return bool(self._bits >> index & 1)

    def popcount(self) -> int:
        return bin(self._bits).count("1")

    def count_leading_zeros(self) -> int:
        if self._bits == 0:
            return self._size
        return (self._bits & -self._bits).bit_length() - 1

    def count_leading_ones(self) -> int:
        inv = ~self._bits & ((1 << self._size) - 1)
        if inv == 0:
            return self._size
        return (inv & -inv).bit_length() - 1

    def highest_set_bit(self) -> int:
        return self._bits.bit_length() - 1

    def _with(self, size: int, bits: int) -> "PyBitmap":
        out = PyBitmap(size)
        out._bits = bits & ((1 << size) - 1)
        return out

    def __and__(self, other: "PyBitmap") -> "PyBitmap":
        return self._with(min(self._size, other._size), self._bits & other._bits)

    def __or__(self, other: "PyBitmap") -> "PyBitmap":
        return self._with(min(self._size, other._size), self._bits | other._bits)

    def __invert__(self) -> "PyBitmap":
        return self._with(self._size, ~self._bits)

    def get_indices_list(self) -> list[int]:
        return [i for i in range(self._size) if self._bits >> i & 1]

    def get_indices_set(self) -> set[int]:
        return set(self.get_indices_list())

    def gather(self, items: Sequence[Any]) -> list[Any]:
        return [items[i] for i in self.get_indices_list()]

    def __repr__(self) -> str:
        return "".join("1" if self._bits >> i & 1 else "0" for i in range(self._size))


try:
    from lmcache.lmcache_native import Bitmap
except ImportError:
    Bitmap = PyBitmap  # type: ignore[misc,assignment]


# ---- configuration ------------------------------------------------------------

# The daemon's limits on a layout (strata-proto domain.rs).
_MAX_TOKENS_PER_BLOCK = 1 << 16
_MAX_HEAD_DIM = 8192
_MAX_BLOCK_BYTES = 1 << 30
_MAX_MODEL_ID_BYTES = 256
_MAX_TENANT_SALT_BYTES = 64
_MAX_LEASE_TTL_MS = 300_000  # the daemon's default store.max_lease_ttl_ms
_LOAD_LEASE_MS = 30_000  # a load's own lease, released right after its copies


class StrataL2AdapterConfig(L2AdapterConfigBase):
    """``adapter_params`` of the Strata L2 adapter; see :meth:`help`."""

    FIELDS = {
        "endpoint": "stratad address: 'unix:/path/stratad.sock' (zero-copy), '/path', "
                    "'host:port' or 'http://host:port' (default unix:/run/strata/stratad.sock)",
        "zero_copy": "map the daemon's arena on a Unix socket (default true)",
        "num_workers": "worker threads doing the I/O (default 2)",
        "timeout_s": "deadline of each daemon call in seconds (default 5)",
        "retry_after_s": "after a transport failure, answer miss/failure without trying for this long (default 1)",
        "lookup": "'prefix' (one daemon call per group, keys after the first miss count as misses) "
                  "or 'exact' (one call per miss) (default prefix)",
        "lock_ttl_ms": "lifetime of the lease pinning looked-up keys if never unlocked "
                       f"(default 30000, at most {_MAX_LEASE_TTL_MS})",
        "granule_bytes": "storage granularity; objects are padded to a multiple "
                         f"(power of two, at most {_MAX_HEAD_DIM}; default 4096)",
        "max_object_bytes": "largest object (multiple of granule_bytes, at most 65536 granules, "
                            "1 GiB and the daemon's DRAM tier; default 64 MiB)",
        "max_capacity_gb": "capacity declared to LMCache for its own global eviction "
                           "(default 0: the daemon evicts)",
        "credentials": "for a daemon that authenticates TCP clients (strata.auth.credentials_from): "
                       "an object with token or token_file, tls_ca_file, tls_cert_file, "
                       "tls_key_file, tls_server_name (default none)",
    }

    def __init__(self, endpoint: str = "unix:/run/strata/stratad.sock", zero_copy: bool = True,
                 num_workers: int = 2, timeout_s: float = 5.0, retry_after_s: float = 1.0,
                 lookup: str = "prefix", lock_ttl_ms: int = 30_000, granule_bytes: int = 4096,
                 max_object_bytes: int = 64 << 20, max_capacity_gb: float = 0.0,
                 credentials: dict | None = None):
        self.endpoint = endpoint
        self.credentials = credentials
        self.zero_copy = zero_copy
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.lookup = lookup
        self.lock_ttl_ms = lock_ttl_ms
        self.granule_bytes = granule_bytes
        self.max_object_bytes = max_object_bytes
        self.max_capacity_gb = max_capacity_gb
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"strata adapter_params.{name}: {why}")

        if not isinstance(self.endpoint, str) or not self.endpoint:
            bad("endpoint", f"must be a non-empty string, got {self.endpoint!r}")
        if not isinstance(self.zero_copy, bool):
            bad("zero_copy", f"must be true or false, got {self.zero_copy!r}")
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) \
                or not 1 <= self.num_workers <= 64:
            bad("num_workers", f"must be an integer from 1 to 64, got {self.num_workers!r}")
        for name in ("timeout_s", "retry_after_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive number, got {v!r}")
        if self.lookup not in ("prefix", "exact"):
            bad("lookup", f"must be 'prefix' or 'exact', got {self.lookup!r}")
        if not isinstance(self.lock_ttl_ms, int) or not 1 <= self.lock_ttl_ms <= _MAX_LEASE_TTL_MS:
            bad("lock_ttl_ms", f"must be an integer from 1 to {_MAX_LEASE_TTL_MS}, got {self.lock_ttl_ms!r}")
        g = self.granule_bytes
        if not isinstance(g, int) or g <= 0 or g & (g - 1) or g > _MAX_HEAD_DIM:
            bad("granule_bytes", f"must be a power of two from 1 to {_MAX_HEAD_DIM}, got {g!r}")
        m = self.max_object_bytes
        if not isinstance(m, int) or m <= 0 or m % g:
            bad("max_object_bytes", f"must be a positive multiple of granule_bytes ({g}), got {m!r}")
        if m // g > _MAX_TOKENS_PER_BLOCK or m > _MAX_BLOCK_BYTES:
            bad("max_object_bytes", f"{m} is above min({_MAX_TOKENS_PER_BLOCK} x granule_bytes, 1 GiB)")
        if not isinstance(self.max_capacity_gb, (int, float)) or self.max_capacity_gb < 0:
            bad("max_capacity_gb", f"must be a non-negative number, got {self.max_capacity_gb!r}")
        if self.credentials is not None and not isinstance(self.credentials, dict):
            bad("credentials", f"must be an object, got {self.credentials!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "StrataL2AdapterConfig":
        if not isinstance(d, dict):
            raise ValueError(f"strata adapter_params must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.FIELDS))
        if unknown:
            raise ValueError(f"strata adapter_params: unknown field(s) {unknown}; "
                             f"known: {sorted(cls.FIELDS)}")
        return cls(**d)

    @classmethod
    def help(cls) -> str:
        lines = ["Strata L2 adapter (adapter_params):"]
        lines += [f"- {name}: {text}" for name, text in cls.FIELDS.items()]
        lines.append('Example: {"type": "plugin", "module_path": "strata.integrations.lmcache", '
                     '"class_name": "StrataL2Adapter", "adapter_params": '
                     '{"endpoint": "unix:/run/strata/stratad.sock"}}')
        return "\n".join(lines)


# ---- the connection to the daemon -----------------------------------------------

_TRANSPORT = (Unavailable, DeadlineExceeded)


class _Stats:
    """Counters since start (thread-safe), shown by ``report_status``."""

    NAMES = ("stores", "store_failures", "bytes_stored", "lookups", "lookup_keys", "lookup_hits",
             "loads", "keys_loaded", "load_failures", "bytes_loaded", "checksum_mismatches",
             "size_mismatches", "errors", "down_answers", "reconnects")

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.NAMES, 0)
        self._last_error = ""

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                self._counts[name] += n

    def error(self, message: str) -> None:
        with self._lock:
            self._counts["errors"] += 1
            self._last_error = message

    def snapshot(self) -> dict:
        with self._lock:
            return {**self._counts, "last_error": self._last_error}


class _Session:
    """One connection (gRPC channel, and the mapped arena when zero-copy)
    and the namespaces registered on it. Shared by the worker threads."""

    def __init__(self, local: LocalClient | None, client: Client):
        self.local = local
        self.client = client
        self.dram_bytes = 0  # the daemon's DRAM tier, from Stats when connecting
        self._namespaces: dict[Layout, Namespace] = {}
        self._lock = threading.Lock()

    def namespace(self, layout: Layout) -> Namespace:
        with self._lock:
            ns = self._namespaces.get(layout)
        if ns is None:
            ns = self.client.register_layout(layout)
            if ns.block_bytes != layout.block_bytes:
                raise StrataError(f"daemon expects {ns.block_bytes}-byte blocks for layout "
                                  f"{layout.model_id!r}, the adapter sized them {layout.block_bytes}")
            with self._lock:
                self._namespaces[layout] = ns
        return ns

    def close(self) -> None:
        try:
            (self.local or self.client).close()
        except Exception:  # noqa: BLE001 - closing a broken channel
            pass


class _Connection:
    """The adapter's link to ``stratad``, with :class:`StoreLink`'s
    never-fail rules over any number of namespaces: :meth:`run` returns a
    default instead of raising when the daemon cannot answer, stays "down"
    for ``retry_after_s`` after a transport failure, and reconnects (a
    daemon restart shows up as :class:`ArenaChanged` and is retried once on
    a fresh connection)."""

    def __init__(self, endpoint: str, zero_copy: bool, timeout_s: float, retry_after_s: float,
                 stats: _Stats, credentials: Credentials | None = None):
        if endpoint.startswith("unix:") or "://" in endpoint:
            self.endpoint = endpoint
        elif endpoint.startswith("/"):
            self.endpoint = f"unix:{endpoint}"
        else:
            self.endpoint = f"http://{endpoint}"
        self.zero_copy = zero_copy
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.stats = stats
        self.credentials = credentials
        self._lock = threading.Lock()
        self._session: _Session | None = None
        self._down_until = 0.0
        self._closed = False
        self._last_log: dict[str, float] = {}

    @property
    def is_local(self) -> bool:
        s = self._session
        return s is not None and s.local is not None

    def healthy(self) -> bool:
        return self._session is not None and time.monotonic() >= self._down_until

    def _open(self) -> _Session:
        local, arena_error = None, None
        if self.zero_copy and self.endpoint.startswith("unix:"):
            try:
                local = LocalClient(self.endpoint[len("unix:"):], timeout_s=self.timeout_s)
            except (OSError, StrataError) as e:
                arena_error = e
        session = _Session(local, local.client if local else Client(
            self.endpoint, timeout_s=self.timeout_s, credentials=self.credentials))
        try:
            # One cheap call proves the daemon answers before the session is used.
            tiers = session.client.stats().tiers
            session.dram_bytes = next((t.capacity_bytes for t in tiers if t.tier == Tier.DRAM), 0)
        except BaseException:
            session.close()
            raise
        if arena_error is not None:
            # The socket answers but the arena is not shared with this
            # process (another user, no .shm socket): stream.
            self._log("arena", f"arena of {self.endpoint} not mapped ({arena_error}); streaming over gRPC")
        return session

    def run(self, what: str, fn: Callable[[_Session], Any], default: Any) -> Any:
        """``fn(session)``, or ``default`` when the daemon cannot answer or
        refuses the call (logged and counted, never raised)."""
        for attempt in range(2):
            with self._lock:
                if self._closed or time.monotonic() < self._down_until:
                    self.stats.add(down_answers=1)
                    return default
                session = self._session
                if session is None:
                    try:
                        session = self._session = self._open()
                    except (StrataError, grpc.RpcError, OSError) as e:
                        self._down_locked(what, e)
                        return default
            try:
                return fn(session)
            except ArenaChanged as e:
                self._drop(session)
                self.stats.add(reconnects=1)
                if attempt == 1:
                    self.record(what, e)
                    return default
            except _TRANSPORT as e:
                self._drop(session)
                with self._lock:
                    self._down_locked(what, e)
                return default
            except (StrataError, OSError, ValueError) as e:
                self.record(what, e)
                return default
        return default

    def _drop(self, session: _Session) -> None:
        with self._lock:
            if self._session is session:
                self._session = None
        session.close()

    def _down_locked(self, what: str, e: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_after_s
        self.record(what, e)

    def record(self, what: str, e: BaseException) -> None:
        """Counts and logs (at most every 10 s per kind) a failed call."""
        self.stats.error(f"{what}: {e}")
        self._log(what, f"{what} failed: {e}")

    def _log(self, kind: str, msg: str) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= 10.0:
            self._last_log[kind] = now
            log.warning("strata: %s", msg)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            session, self._session = self._session, None
        if session is not None:
            session.close()


# ---- the adapter ------------------------------------------------------------------

_KINDS = ("store", "lookup", "load")


@dataclass(eq=False)
class _LockRecord:
    """One lease taken by a lookup: the keys it pins and how many of them
    are still locked."""

    lease: Any
    keys: list
    held: int
    expires: float


class StrataL2Adapter(L2AdapterInterface):
    """LMCache L2 adapter backed by ``stratad`` (see the module docstring
    for the contract and the decisions). ``config``: a
    :class:`StrataL2AdapterConfig` or its dict form."""

    def __init__(self, config: "StrataL2AdapterConfig | dict | None" = None, *,
                 l1_memory_desc: Any = None):
        if config is None:
            config = StrataL2AdapterConfig()
        elif isinstance(config, dict):
            config = StrataL2AdapterConfig.from_dict(config)
        elif not isinstance(config, StrataL2AdapterConfig):
            raise TypeError(f"config must be a StrataL2AdapterConfig or dict, got {type(config).__name__}")
        super().__init__(max_capacity_bytes=int(config.max_capacity_gb * (1 << 30)))
        self.config = config
        self.l1_memory_desc = l1_memory_desc
        self._granule = config.granule_bytes
        self._layout_args = dict(dtype=Dtype.FP8_E4M3, kv_kind=KvKind.MLA, num_layers=1, num_kv_heads=1,
                                 head_dim=config.granule_bytes,
                                 tokens_per_block=config.max_object_bytes // config.granule_bytes)
        self._layouts: dict[tuple[str, str], Layout] = {}
        self.stats = _Stats()
        self._conn = _Connection(config.endpoint, config.zero_copy, config.timeout_s,
                                 config.retry_after_s, self.stats,
                                 credentials_from(config.credentials))

        self._lock = threading.Lock()
        self._task_ids = itertools.count(1)
        self._fds = {kind: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for kind in _KINDS}
        self._fds_open = True
        self._done: dict[str, dict] = {kind: {} for kind in _KINDS}
        self._pending = 0
        self._closed = False
        self._key_sizes: dict = {}
        self._locks: dict[Any, deque[_LockRecord]] = {}
        self._lock_order: deque[_LockRecord] = deque()

        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._work, name=f"strata-l2-{i}", daemon=True)
                         for i in range(config.num_workers)]
        for t in self._workers:
            t.start()
        # Connect now so that report_status is true from the start and a
        # configuration the daemon would refuse fails here, loudly; a daemon
        # that is down is no error (the adapter retries by itself).
        dram = self._conn.run("connect", lambda s: s.dram_bytes, 0)
        if dram and config.max_object_bytes > dram:
            self.close()
            raise ValueError(f"strata adapter_params.max_object_bytes: {config.max_object_bytes} is larger "
                             f"than the DRAM tier of stratad at {self._conn.endpoint} ({dram} bytes), "
                             f"which refuses such layouts; lower it or grow the tier")

    # ---- event fds --------------------------------------------------------------

    def get_store_event_fd(self) -> int:
        return self._fds["store"]

    def get_lookup_and_lock_event_fd(self) -> int:
        return self._fds["lookup"]

    def get_load_event_fd(self) -> int:
        return self._fds["load"]

    # ---- submissions ------------------------------------------------------------

    def submit_store_task(self, keys: list, objects: list) -> int:
        keys, objects = list(keys), list(objects)
        return self._submit("store", lambda: self._store(keys, objects),
                            lambda: L2StoreResult(False, 0))

    def pop_completed_store_tasks(self) -> dict:
        with self._lock:
            done, self._done["store"] = self._done["store"], {}
        return done

    def submit_lookup_and_lock_task(self, keys: list, group_layout_descs: dict) -> int:
        keys = list(keys)
        return self._submit("lookup", lambda: self._lookup(keys), lambda: Bitmap(len(keys)))

    def query_lookup_and_lock_result(self, task_id: int):
        with self._lock:
            return self._done["lookup"].pop(task_id, None)

    def submit_unlock(self, keys: list) -> None:
        """Drops one lock per key; leases whose keys are all unlocked are
        released on a worker thread (and expire by themselves if that
        fails)."""
        now = time.monotonic()
        to_release = []
        with self._lock:
            self._prune_locks_locked(now)
            for key in keys:
                records = self._locks.get(key)
                if not records:
                    continue
                rec = records.popleft()
                if not records:
                    del self._locks[key]
                rec.held -= 1
                if rec.held == 0:
                    to_release.append(rec.lease)
            closed = self._closed
        if to_release and not closed:
            self._jobs.put(lambda: self._release(to_release))

    def submit_load_task(self, keys: list, objects: list) -> int:
        keys, objects = list(keys), list(objects)
        return self._submit("load", lambda: self._load(keys, objects), lambda: Bitmap(len(keys)))

    def query_load_result(self, task_id: int):
        with self._lock:
            return self._done["load"].pop(task_id, None)

    def _submit(self, kind: str, work: Callable[[], Any], failed: Callable[[], Any]) -> int:
        with self._lock:
            task_id = next(self._task_ids)
            if self._closed:
                # Never raise into LMCache: the task fails (no fd to signal).
                self._done[kind][task_id] = failed()
                return task_id
            self._pending += 1
        self._jobs.put(lambda: self._finish(kind, task_id, work, failed))
        return task_id

    def _finish(self, kind: str, task_id: int, work, failed) -> None:
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - a bug must not kill the worker or lose the task
            log.exception("strata: %s task %d failed", kind, task_id)
            self.stats.error(f"{kind}: {e!r}")
            result = failed()
        with self._lock:
            self._done[kind][task_id] = result
            self._pending -= 1
            if self._fds_open:
                os.eventfd_write(self._fds[kind], 1)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # noqa: BLE001 - unlock/delete jobs log their own failures
                log.exception("strata: adapter job failed")

    # ---- keys and layouts -------------------------------------------------------

    def _layout(self, key) -> Layout:
        """The namespace's layout of ``(model_name, cache_salt)``."""
        ident = (key.model_name, key.cache_salt)
        layout = self._layouts.get(ident)
        if layout is None:
            model_id = f"lmcache:{key.model_name}"
            if len(model_id.encode()) > _MAX_MODEL_ID_BYTES:
                model_id = "lmcache:blake2b:" + hashlib.blake2b(key.model_name.encode(), digest_size=32).hexdigest()
            salt = key.cache_salt.encode()
            if len(salt) > _MAX_TENANT_SALT_BYTES:
                # A salt never contains NUL, so a hashed one cannot equal a raw one.
                salt = b"\0" + hashlib.blake2b(salt, digest_size=32).digest()
            layout = Layout(model_id=model_id, tenant_salt=salt, **self._layout_args)
            self._layouts[ident] = layout
        return layout

    @staticmethod
    def strata_key(key) -> bytes:
        """The 32-byte Strata key of an ObjectKey within its namespace."""
        h = hashlib.blake2b(digest_size=32)
        h.update(key.kv_rank.to_bytes(16, "little", signed=True))
        h.update(key.object_group_id.to_bytes(8, "little"))
        h.update(bytes(key.chunk_hash))
        return h.digest()

    def _groups(self, keys: list, by_group: bool = False) -> dict[tuple, list[int]]:
        """Indices of ``keys`` per namespace layout (and object group), in order."""
        out: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            ident = (self._layout(key), key.object_group_id) if by_group else (self._layout(key),)
            out.setdefault(ident, []).append(i)
        return out

    def _padded(self, size: int) -> int:
        return -(-size // self._granule) * self._granule

    # ---- store ------------------------------------------------------------------

    def _payload(self, obj, index: int) -> tuple[Any, int]:
        size = obj.get_size()
        if size <= 0 or size > self.config.max_object_bytes:
            raise ValueError(f"object {index} has {size} bytes; the adapter stores 1 to "
                             f"{self.config.max_object_bytes} (adapter_params.max_object_bytes)")
        src = as_bytes_view(obj.byte_array)
        if len(src) < size:
            raise ValueError(f"object {index}: byte_array has {len(src)} bytes, get_size() says {size}")
        src = src[:size]
        padded = self._padded(size)
        if padded == size:
            return src, size
        buf = np.zeros(padded, dtype=np.uint8)
        buf[:size] = np.frombuffer(src, dtype=np.uint8)
        return buf, size

    def _store(self, keys: list, objects: list) -> "L2StoreResult":
        if len(keys) != len(objects):
            raise ValueError(f"store task has {len(keys)} keys and {len(objects)} objects")
        payloads = [self._payload(obj, i) for i, obj in enumerate(objects)]
        ok = True
        written = 0
        stored_keys, stored_sizes = [], []
        for (layout,), idx in self._groups(keys).items():
            blocks = [Block(self.strata_key(keys[i]), payloads[i][0]) for i in idx]

            def put(s: _Session, layout=layout, blocks=blocks):
                ns = s.namespace(layout)
                return (s.local or s.client).put(ns, blocks)

            outcomes = self._conn.run("store", put, None)
            if outcomes is None:
                ok = False
                continue
            for i, o in zip(idx, outcomes):
                size = payloads[i][1]
                if o.result == PutResult.STORED:
                    written += size
                elif o.result != PutResult.ALREADY_PRESENT:
                    ok = False
                    continue
                stored_keys.append(keys[i])
                with self._lock:
                    first = keys[i] not in self._key_sizes
                    if first:
                        self._key_sizes[keys[i]] = size
                stored_sizes.append(size if first else 0)
        self.stats.add(stores=1, bytes_stored=written, store_failures=0 if ok else 1)
        if stored_keys:
            self._notify_keys_stored(stored_keys, stored_sizes)
        return L2StoreResult(ok, written)

    # ---- lookup and lock ----------------------------------------------------------

    def _lookup(self, keys: list):
        bitmap = Bitmap(len(keys))
        exact = self.config.lookup == "exact"
        ttl = self.config.lock_ttl_ms
        hits = 0
        for (layout, _group), idx in self._groups(keys, by_group=True).items():
            kb = [self.strata_key(keys[i]) for i in idx]

            def probe(s: _Session, layout=layout, kb=kb):
                ns = s.namespace(layout)
                found, i = [], 0
                while i < len(kb):
                    r = s.client.lookup(ns, kb[i:], lease_ttl_ms=ttl)
                    if r.hits:
                        found.append((r.lease, range(i, i + r.hits)))
                    if not exact:
                        break
                    i += r.hits + 1
                return found

            now = time.monotonic()
            for lease, js in self._conn.run("lookup", probe, []):
                locked = [keys[idx[j]] for j in js]
                rec = _LockRecord(lease, locked, len(locked), now + ttl / 1000.0)
                with self._lock:
                    self._lock_order.append(rec)
                    for key in locked:
                        self._locks.setdefault(key, deque()).append(rec)
                for j in js:
                    bitmap.set(idx[j])
                hits += len(js)
        with self._lock:
            self._prune_locks_locked(time.monotonic())
        self.stats.add(lookups=1, lookup_keys=len(keys), lookup_hits=hits)
        return bitmap

    def _prune_locks_locked(self, now: float) -> None:
        """Forgets locks whose lease has expired in the daemon."""
        while self._lock_order and self._lock_order[0].expires <= now:
            rec = self._lock_order.popleft()
            for key in rec.keys:
                records = self._locks.get(key)
                if records is not None and rec in records:
                    records.remove(rec)
                    if not records:
                        del self._locks[key]

    def _release(self, leases: list) -> None:
        def release(s: _Session):
            for lease in leases:
                s.client.release(lease)

        self._conn.run("unlock", release, None)

    # ---- load ---------------------------------------------------------------------

    def _load(self, keys: list, objects: list):
        if len(keys) != len(objects):
            raise ValueError(f"load task has {len(keys)} keys and {len(objects)} objects")
        bitmap = Bitmap(len(keys))
        dsts = []
        for i, obj in enumerate(objects):
            size = obj.get_size()
            out = np.frombuffer(obj.byte_array, dtype=np.uint8)
            if out.size < size:
                raise ValueError(f"object {i}: byte_array has {out.size} bytes, get_size() says {size}")
            dsts.append(out[:size])
        loaded: list[int] = []
        for (layout,), idx in self._groups(keys).items():
            kb = [self.strata_key(keys[i]) for i in idx]
            outs = [dsts[i] for i in idx]
            got = self._conn.run("load", lambda s, layout=layout, kb=kb, outs=outs:
                                 self._load_group(s, layout, kb, outs), [])
            loaded.extend(idx[j] for j in got)
        for i in loaded:
            bitmap.set(i)
        self.stats.add(loads=1, keys_loaded=len(loaded), load_failures=len(keys) - len(loaded),
                       bytes_loaded=sum(int(dsts[i].size) for i in loaded))
        if loaded:
            self._notify_keys_accessed([keys[i] for i in sorted(loaded)])
        return bitmap

    def _load_group(self, s: _Session, layout: Layout, kb: list[bytes], outs: list[np.ndarray]) -> list[int]:
        """Copies every present key of one namespace into its buffer; returns
        the indices that arrived intact. A miss ends one Lookup; the next
        starts after it."""
        ns = s.namespace(layout)
        loaded, i = [], 0
        while i < len(kb):
            if s.local is not None:
                slots = s.local.lookup_slots(ns, kb[i:], lease_ttl_ms=_LOAD_LEASE_MS)
                try:
                    for j, (view, want) in enumerate(zip(slots.views, slots.checksums)):
                        if self._copy_verified(view, want, outs[i + j], i + j):
                            loaded.append(i + j)
                finally:
                    s.local.release(slots.lease)
                hits = len(slots.views)
            else:
                r = s.client.lookup(ns, kb[i:], lease_ttl_ms=_LOAD_LEASE_MS)
                hits = r.hits
                if hits:
                    try:
                        blocks = s.client.get(ns, kb[i:i + hits], lease=r.lease)
                    finally:
                        s.client.release(r.lease)
                    for j, b in enumerate(blocks):
                        out = outs[i + j]
                        if self._length_ok(len(b.data), out.size, i + j):
                            np.copyto(out, np.frombuffer(b.data, dtype=np.uint8, count=out.size))
                            loaded.append(i + j)
            i += hits + 1
        return loaded

    def _length_ok(self, stored: int, size: int, index: int) -> bool:
        if stored == self._padded(size):
            return True
        self.stats.add(size_mismatches=1)
        self._conn.record("load", StrataError(
            f"key {index}: stored block has {stored} bytes, the buffer wants {size} "
            f"(padded to {self._padded(size)})"))
        return False

    def _copy_verified(self, view: np.ndarray, want: int, out: np.ndarray, index: int) -> bool:
        """Copies a block out of the arena and checks the copy (plus the
        arena's padding bytes) against the block's checksum."""
        if not self._length_ok(view.size, out.size, index):
            return False
        np.copyto(out, view[:out.size])
        h = xxhash.xxh3_64()
        h.update(out)
        if view.size > out.size:
            h.update(view[out.size:])
        if h.intdigest() == want:
            return True
        self.stats.add(checksum_mismatches=1)
        self._conn.record("load", StrataError(f"key {index}: block changed while copied"))
        return False

    # ---- delete, status, close -------------------------------------------------------

    def delete(self, keys: list) -> None:
        """Deletes ``keys`` in the daemon (on a worker thread; waits up to
        ``2 * timeout_s``). Keys pinned by a lock stay. Every key that is
        gone afterwards and was counted by this adapter is reported through
        ``_notify_keys_deleted``."""
        keys = list(keys)
        if not keys:
            return
        done = threading.Event()

        def work():
            try:
                self._delete(keys)
            finally:
                done.set()

        with self._lock:
            if self._closed:
                return
        self._jobs.put(work)
        if not done.wait(2 * self.config.timeout_s):
            log.warning("strata: delete of %d keys did not finish within %.1f s", len(keys),
                        2 * self.config.timeout_s)

    def _delete(self, keys: list) -> None:
        gone_keys, gone_sizes = [], []
        for (layout,), idx in self._groups(keys).items():
            kb = [self.strata_key(keys[i]) for i in idx]

            def delete(s: _Session, layout=layout, kb=kb):
                return s.client.delete(s.namespace(layout), kb)

            r = self._conn.run("delete", delete, None)
            if r is None:
                continue
            pinned = set(r.pinned)
            with self._lock:
                for i, k in zip(idx, kb):
                    if k not in pinned and keys[i] in self._key_sizes:
                        gone_keys.append(keys[i])
                        gone_sizes.append(self._key_sizes.pop(keys[i]))
        if gone_keys:
            self._notify_keys_deleted(gone_keys, gone_sizes)

    def report_status(self) -> dict:
        with self._lock:
            self._prune_locks_locked(time.monotonic())
            pending = self._pending
            locked = len(self._locks)
            closed = self._closed
        workers_alive = all(t.is_alive() for t in self._workers)
        status = {
            "is_healthy": not closed and workers_alive,
            "type": "strata",
            "endpoint": self._conn.endpoint,
            "daemon_reachable": self._conn.healthy(),
            "zero_copy": self._conn.is_local,
            "lookup": self.config.lookup,
            "pending_tasks": pending,
            "locked_keys": locked,
            "workers_alive": workers_alive,
        }
        status.update(self.stats.snapshot())
        return status

    def close(self) -> None:
        """Finishes the tasks already queued, releases the leases still
        held, stops the workers, closes the connection and the event fds."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            leases = [rec.lease for rec in self._lock_order if rec.held > 0]
            self._lock_order.clear()
            self._locks.clear()
        if leases:
            self._jobs.put(lambda: self._release(leases))
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            t.join(timeout=2 * self.config.timeout_s + 1)
        self._conn.close()
        with self._lock:
            self._fds_open = False
        for fd in self._fds.values():
            os.close(fd)
