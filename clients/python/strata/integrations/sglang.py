"""SGLang HiCache storage backend: Strata as SGLang's L3 KV tier.

Pinned to SGLang v0.5.21 (``upstream/sglang.json``, ``upstream/NOTES.md``).
Load it with::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "strata",
        "module_path": "strata.integrations.sglang", "class_name": "StrataHiCacheStorage",
        "interface_v1": 1, "endpoint": "unix:/run/strata/stratad.sock"}'

Extra-config keys read here (the rest belong to SGLang):

- ``endpoint``: ``unix:/path`` (zero-copy through the mapped arena),
  ``http://host:port`` or ``host:port``; else ``$STRATA_ENDPOINT``, else
  :data:`strata.client.DEFAULT_ENDPOINT`;
- ``zero_copy`` (default true): map the arena when the endpoint is a Unix socket;
- ``timeout_s`` (default 5): bound on every daemon call;
- ``retry_after_s`` (default 1): how long an unreachable daemon is answered
  with misses before the next try;
- ``model_id``: overrides ``storage_config.model_name`` in the namespace;
- ``token`` or ``token_file``, ``tls_ca_file``, ``tls_cert_file``,
  ``tls_key_file``, ``tls_server_name``: credentials for a daemon that
  authenticates TCP clients (:func:`strata.auth.credentials_from`).

**Contract with the engine.** SGLang calls the data methods from three
daemon threads (prefetch, prefetch-IO, backup) that die on any exception or
on a ``None`` where a list or int is expected, silently switching storage
off for the life of the process. So every data method here catches every
exception, logs it (rate-limited) and answers a miss: ``batch_exists`` an
``int``, the ``*_v1`` methods a ``list`` of one ``bool`` per key, never
``None``. A daemon that is down is a miss (the link backs off and
reconnects by itself). Only configuration errors raise, and only at
start-up (the constructor and
:meth:`StrataHiCacheStorage.register_mem_pool_host`), where SGLang reports
them. Every method is thread-safe.

**Namespace, not key suffix.** SGLang's keys are bare page hashes (64 hex
characters, ``sha256(previous raw digest ‖ page tokens as uint32 LE)``); a
file-style backend appends ``_{model}_{tp_rank}_{tp_size}``. Strata keys are
at most 32 bytes, so a 64-hex key becomes its 32 raw bytes (any other key:
its SHA-256 digest) and the model/TP suffix lives in the Strata
:class:`~strata.types.Layout` instead: model id (plus ``#pp{r}/{n}`` and
``#cp{r}/{n}`` under pipeline or context parallelism, which split the same
shape across ranks), dtype, layers, heads, head dim, page size, TP rank and
size. A key stored under another model, rank or shape is therefore never
even visible. With ``is_mla_model`` (SGLang's "KV replicated on every TP
rank") the namespace is TP 0 of 1: every rank reads the same pages and only
``tp_rank`` 0 writes (other ranks' sets answer True without writing, as the
pages are rank 0's to store). Attention-DP replicas (``dp_rank``) hold the
same KV per TP rank and share pages; heterogeneous-TP head splitting
(``tp_lcm_size``, ``should_split_heads``) is not used, so engines with
different TP sizes do not share pages.

**Payload.** A page is stored as Strata's block ``(layers, 2, page_size,
heads, head_dim)`` (MLA: ``(layers, 1, page_size, 1, kv_cache_dim)``, one
latent tensor, ``KvKind.MLA``), whatever the host pool's layout, so engines
with different ``--hicache-mem-layout`` and Strata's other clients share
pages. Supported host layouts: MHA ``layer_first``, ``page_first``,
``page_first_direct``, ``page_head``; MLA ``layer_first``, ``page_first``,
``page_first_direct``. Others (``page_first_kv_split``) are refused at
registration. The zero-copy methods copy each page once between the host
pool and the daemon's arena (or the gRPC stream), converting the layout in
that copy; a load is verified against the block's checksum after the copy
and a page that did not arrive intact answers False (the engine then stops
the prefetch there).

**Legacy methods** (``get``/``set``/``batch_get``/``batch_set``, used when
``interface_v1`` is off) take flat page tensors in the host pool's own page
order: exactly what ``host_pool.get_data_page(index, flat=True)`` returns and
``set_from_flat_data_page`` expects (``(2, layer, page_size, head, dim)`` for
``layer_first``, ``(2, page_size, layer, head, dim)`` for ``page_first``,
and so on).

**Hybrid models** (v2 methods, sidecar Mamba/SWA/indexer pools): not
served. ``batch_exists_v2`` reports no hit when a request needs sidecar
pools, and ``batch_get_v2``/``batch_set_v2`` serve only the ``kv`` pool.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np

from ..auth import credentials_from
from ..client import DEFAULT_ENDPOINT, Client
from ..errors import DeadlineExceeded, Unavailable
from ..types import BlockStored, Dtype, KvKind, Layout
from .link import StoreLink

log = logging.getLogger("strata.integrations.sglang")

try:
    from sglang.srt.mem_cache.hicache_storage import (HiCacheStorage, HiCacheStorageConfig,
                                                      HiCacheStorageExtraInfo)
    SGLANG_IMPORTED = True
except ImportError:
    SGLANG_IMPORTED = False
    from abc import ABC, abstractmethod

    @dataclass
    class HiCacheStorageConfig:
        """Stand-in for SGLang's config (same fields, order and defaults)."""

        tp_rank: int
        tp_size: int
        pp_rank: int
        pp_size: int
        attn_cp_rank: int
        attn_cp_size: int
        is_mla_model: bool
        enable_storage_metrics: bool
        is_page_first_layout: bool
        model_name: Optional[str]
        tp_lcm_size: Optional[int] = None
        should_split_heads: bool = False
        dp_rank: int = 0
        extra_config: Optional[dict] = None

    @dataclass
    class HiCacheStorageExtraInfo:
        """Stand-in for SGLang's per-call extra info."""

        prefix_keys: Optional[List[str]] = None
        extra_info: Optional[dict] = None

    class HiCacheStorage(ABC):
        """Stand-in for SGLang's abstract storage backend: the pinned
        method list and abstract methods (unimplemented v1/v2 methods raise
        here where SGLang's return None or raise)."""

        def register_mem_pool_host(self, mem_pool_host) -> None:
            self.mem_pool_host = mem_pool_host

        def register_mem_host_pool_v2(self, host_pool, host_pool_name) -> None:
            if not hasattr(self, "registered_pools"):
                self.registered_pools = {}
            self.registered_pools[host_pool_name] = host_pool

        def batch_exists_v2(self, keys, pool_transfers=None, extra_info=None):
            raise NotImplementedError()

        def batch_get_v2(self, transfers, extra_info=None):
            raise NotImplementedError()

        def batch_set_v2(self, transfers, extra_info=None):
            raise NotImplementedError()

        def batch_get_v1(self, keys, host_indices, extra_info=None):
            raise NotImplementedError()

        def batch_set_v1(self, keys, host_indices, extra_info=None):
            raise NotImplementedError()

        @abstractmethod
        def get(self, key, target_location=None, target_sizes=None):
            pass

        @abstractmethod
        def batch_get(self, keys, target_locations=None, target_sizes=None):
            pass

        @abstractmethod
        def set(self, key, value=None, target_location=None, target_sizes=None):
            pass

        @abstractmethod
        def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
            pass

        @abstractmethod
        def exists(self, key) -> bool:
            pass

        def batch_exists(self, keys, extra_info=None) -> int:
            for i in range(len(keys)):
                if not self.exists(keys[i]):
                    return i
            return len(keys)

        def clear(self) -> None:
            pass

        def get_stats(self):
            return None

try:  # hybrid pools came after the v1 interface: an older SGLang may lack it
    from sglang.srt.mem_cache.hicache_storage import PoolTransferResult
except ImportError:
    @dataclass
    class PoolTransferResult:
        """Stand-in for SGLang's hybrid-pool existence result."""

        kv_hit_pages: int
        extra_pool_hit_pages: dict
        restorable_prefix_pages: Optional[List[int]] = None

        @classmethod
        def empty(cls) -> "PoolTransferResult":
            return cls(0, {})

try:  # where SGLang keeps it moved between releases
    from sglang.srt.metrics.collector import StorageMetrics
except ImportError:
    try:
        from sglang.srt.observability.metrics_collector import StorageMetrics
    except ImportError:
        @dataclass
        class StorageMetrics:
            """Stand-in for SGLang's per-poll storage samples."""

            prefetch_pgs: List[int] = field(default_factory=list)
            backup_pgs: List[int] = field(default_factory=list)
            prefetch_bandwidth: List[float] = field(default_factory=list)
            backup_bandwidth: List[float] = field(default_factory=list)


# Host pool page layouts, one letter per kv_buffer dimension: K = K/V plane,
# L = layer, S = token (pool-wide), P = page, T = token within the page,
# H = head, D = head dim (MLA: H = 1, D = kv_cache_dim). From SGLang's
# pool_host/mha.py and mla.py init_kv_buffer.
_MHA_LAYOUTS = {"layer_first": "KLSHD", "page_first": "KSLHD", "page_first_direct": "KPLTHD",
                "page_head": "KPHTLD"}
_MLA_LAYOUTS = {"layer_first": "LSHD", "page_first": "SLHD", "page_first_direct": "PLTHD"}
# Strata's block payload: (layers, kv tensors, tokens, heads, head dim).
_CANON = "LKTHD"
_AXIS_NAMES = {"K": "K/V planes (2)", "L": "layer_num", "T": "page_size", "H": "head_num",
               "D": "head_dim"}


def _numpy_view(t) -> np.ndarray:
    """A numpy view sharing ``t``'s memory (a numpy array or a CPU torch
    tensor, any dtype including bfloat16 and fp8), typed as unsigned
    integers of the same width: only bytes are moved here."""
    if isinstance(t, np.ndarray):
        a = t
    elif hasattr(t, "element_size") and hasattr(t, "numpy"):
        import torch
        same_width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        a = t.detach().view(same_width).numpy()
    else:
        raise TypeError(f"expected a numpy array or a CPU torch tensor, got {type(t).__name__}")
    return a.view(np.dtype(f"u{a.itemsize}"))


def _dtype_name(dtype) -> str:
    text = str(dtype)
    return text if text.startswith("torch.") else np.dtype(dtype).name


class _Geometry:
    """How one registered host pool's pages map onto Strata blocks.

    ``page(start)`` is a writable view of the page whose first token is host
    index ``start``, with axes in the pool's order (MLA gets a leading K/V
    axis of 1); ``to_host``/``to_canon`` permute between that order and
    Strata's ``(layers, kv, tokens, heads, dim)``."""

    def __init__(self, pool):
        layout = str(pool.layout)
        self.mla = getattr(pool, "kv_cache_dim", None) is not None
        table = _MLA_LAYOUTS if self.mla else _MHA_LAYOUTS
        if layout not in table:
            kind = "MLA" if self.mla else "MHA"
            raise ValueError(f"host pool layout {layout!r} is not supported for {kind} pools; "
                             f"expected one of {sorted(table)}")
        self.layout = layout
        self.pattern = table[layout]
        self.page_size = int(pool.page_size)
        self.layers = int(pool.layer_num)
        self.heads, self.dim = ((1, int(pool.kv_cache_dim)) if self.mla
                                else (int(pool.head_num), int(pool.head_dim)))
        self.dtype = Dtype.parse(_dtype_name(pool.dtype))
        self.buf = _numpy_view(pool.kv_buffer)
        if self.buf.itemsize != self.dtype.itemsize:
            raise ValueError(f"host pool dtype {pool.dtype} has {self.dtype.itemsize}-byte elements but "
                             f"its kv_buffer has {self.buf.itemsize}-byte ones")
        want = {"K": 2, "L": self.layers, "T": self.page_size, "H": self.heads, "D": self.dim}
        shape = self.buf.shape
        names = dict(_AXIS_NAMES, H="1", D="kv_cache_dim") if self.mla else _AXIS_NAMES
        named = [("capacity" if c in "SP" else names[c]) for c in self.pattern]
        if len(shape) != len(self.pattern) or any(c in want and shape[i] != want[c]
                                                  for i, c in enumerate(self.pattern)):
            raise ValueError(f"host pool kv_buffer has shape {tuple(shape)}; a {layout!r} pool with "
                             f"layer_num={self.layers}, heads={self.heads}, head_dim={self.dim}, "
                             f"page_size={self.page_size} has dims ({', '.join(named)})")
        self.paged = "P" in self.pattern
        axis = self.pattern.index("P" if self.paged else "S")
        self.capacity = shape[axis] * (self.page_size if self.paged else 1)
        if self.capacity % self.page_size:
            raise ValueError(f"host pool holds {self.capacity} tokens, not a multiple of "
                             f"page_size {self.page_size}")
        self._axis = axis
        view = ("" if "K" in self.pattern else "K") + self.pattern.replace("P", "").replace("S", "T")
        self.to_host = [_CANON.index(c) for c in view]
        self.to_canon = [view.index(c) for c in _CANON]
        self.block_shape = (self.layers, 1 if self.mla else 2, self.page_size, self.heads, self.dim)
        self.page_shape = tuple(self.block_shape[i] for i in self.to_host)
        self.page_elems = int(np.prod(self.block_shape))
        self.page_bytes = self.page_elems * self.buf.itemsize

    def strata_layout(self, model_id: str, tp_rank: int, tp_size: int) -> Layout:
        return Layout(model_id=model_id, dtype=self.dtype, num_layers=self.layers,
                      num_kv_heads=self.heads, head_dim=self.dim, tokens_per_block=self.page_size,
                      kv_kind=KvKind.MLA if self.mla else KvKind.SEPARATE, tp_rank=tp_rank,
                      tp_size=tp_size)

    def page_starts(self, host_indices, n: int) -> list:
        """First host index of each of ``n`` pages (``host_indices[i*page_size:
        (i+1)*page_size]`` for key ``i``), or None for a page whose indices
        are missing, not consecutive, outside the pool or (paged layouts) not
        page-aligned: such a page is never read or written."""
        ps = self.page_size
        idx = np.asarray(host_indices, dtype=np.int64).reshape(-1)
        m = min(n, idx.size // ps)
        pages = idx[:m * ps].reshape(m, ps)
        starts = pages[:, 0]
        ok = ((pages == starts[:, None] + np.arange(ps)).all(axis=1)
              & (starts >= 0) & (starts + ps <= self.capacity))
        if self.paged:
            ok &= starts % ps == 0
        return [int(s) if good else None for s, good in zip(starts, ok)] + [None] * (n - m)

    def page(self, start: int) -> np.ndarray:
        sel: list = [slice(None)] * self.buf.ndim
        sel[self._axis] = start // self.page_size if self.paged else slice(start, start + self.page_size)
        v = self.buf[tuple(sel)]
        return v[None] if self.mla else v

    def flat(self, t) -> np.ndarray:
        """A legacy flat page tensor as a writable view in page order."""
        a = _numpy_view(t)
        if a.itemsize != self.buf.itemsize or a.size != self.page_elems:
            raise ValueError(f"flat page of {a.size} x {a.itemsize}-byte elements; this pool's pages "
                             f"have {self.page_elems} x {self.buf.itemsize}")
        if not a.flags.c_contiguous:
            raise ValueError("flat page tensor is not contiguous")
        return a.reshape(self.page_shape)

    def to_block(self, page: np.ndarray, out: np.ndarray) -> None:
        """Host page (pool order) -> Strata block bytes ``out``."""
        np.copyto(out.view(self.buf.dtype).reshape(self.block_shape), page.transpose(self.to_canon))

    def from_block(self, block: np.ndarray, page: np.ndarray) -> None:
        """Strata block bytes -> host page (pool order)."""
        np.copyto(page, block.view(self.buf.dtype).reshape(self.block_shape).transpose(self.to_host))


def _key(k) -> bytes:
    """A 64-hex SGLang page hash as its 32 raw bytes; any other key as the
    SHA-256 digest of its text (Strata keys are at most 32 bytes)."""
    if isinstance(k, str) and len(k) == 64:
        try:
            return bytes.fromhex(k)
        except ValueError:
            pass
    return hashlib.sha256(k if isinstance(k, bytes) else str(k).encode()).digest()


def _count(keys) -> int:
    try:
        return len(keys)
    except TypeError:
        return 0


def _flag(extra: dict, name: str, default: bool) -> bool:
    v = extra.get(name, default)
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return bool(v)
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"extra_config {name!r}: {v!r} is not a boolean")


def _seconds(extra: dict, name: str, default: float) -> float:
    v = extra.get(name, default)
    try:
        s = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"extra_config {name!r}: {v!r} is not a number of seconds") from None
    if s <= 0:
        raise ValueError(f"extra_config {name!r}: must be positive, got {v!r}")
    return s


class _Samples:
    """Per-call page counts and bandwidths for ``get_stats`` (bounded, so
    an engine that never polls does not grow them)."""

    def __init__(self, keep: int = 4096):
        self._lock = threading.Lock()
        self.prefetch_pgs = deque(maxlen=keep)
        self.prefetch_bw = deque(maxlen=keep)
        self.backup_pgs = deque(maxlen=keep)
        self.backup_bw = deque(maxlen=keep)

    def add(self, backup: bool, pages: int, nbytes: int, seconds: float) -> None:
        with self._lock:
            (self.backup_pgs if backup else self.prefetch_pgs).append(pages)
            if pages and seconds > 0:
                (self.backup_bw if backup else self.prefetch_bw).append(nbytes / seconds / 1e9)

    def drain(self) -> StorageMetrics:
        m = StorageMetrics()
        with self._lock:
            m.prefetch_pgs.extend(self.prefetch_pgs)
            m.backup_pgs.extend(self.backup_pgs)
            m.prefetch_bandwidth.extend(self.prefetch_bw)
            m.backup_bandwidth.extend(self.backup_bw)
            for d in (self.prefetch_pgs, self.prefetch_bw, self.backup_pgs, self.backup_bw):
                d.clear()
        return m


class StrataHiCacheStorage(HiCacheStorage):
    """SGLang's ``HiCacheStorage`` over a Strata daemon (see the module
    docstring for configuration and contract).

    Built by SGLang as ``StrataHiCacheStorage(storage_config, kwargs)``;
    serves misses until :meth:`register_mem_pool_host` has given it the host
    pool. ``link`` (the :class:`~strata.integrations.link.StoreLink`, with its
    counters in ``link.stats``) exists from then on."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        self.storage_config = storage_config
        self.endpoint = str(extra.get("endpoint") or os.environ.get("STRATA_ENDPOINT") or DEFAULT_ENDPOINT)
        self.zero_copy = _flag(extra, "zero_copy", True)
        self.timeout_s = _seconds(extra, "timeout_s", 5.0)
        self.retry_after_s = _seconds(extra, "retry_after_s", 1.0)
        # token / token_file / tls_*_file / tls_server_name (strata.auth).
        self.credentials = credentials_from(extra)
        self.model_id = extra.get("model_id") or getattr(storage_config, "model_name", None)
        # (geometry, link, writes?) replaced as one, so a call never mixes
        # one registration's pool with another's link.
        self._state: tuple[_Geometry, StoreLink, bool] | None = None
        self._samples = _Samples()
        self._last_log: dict[str, float] = {}

    # ---- set-up --------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Reads the pool's shape and layout, derives the Strata namespace
        and connects. Raises ValueError (or the daemon's StrataError) for a
        configuration that cannot work; a daemon that is merely unreachable
        is logged and served as misses until it is back."""
        super().register_mem_pool_host(mem_pool_host)
        cfg = self.storage_config
        geom = _Geometry(mem_pool_host)
        if not self.model_id:
            raise ValueError("storage_config.model_name is empty and extra_config has no 'model_id': "
                             "the Strata namespace needs a model id")
        model_id = str(self.model_id)
        pp_rank, pp_size = int(getattr(cfg, "pp_rank", 0)), int(getattr(cfg, "pp_size", 1))
        cp_rank, cp_size = int(getattr(cfg, "attn_cp_rank", 0)), int(getattr(cfg, "attn_cp_size", 1))
        if pp_size > 1:
            model_id += f"#pp{pp_rank}/{pp_size}"
        if cp_size > 1:
            model_id += f"#cp{cp_rank}/{cp_size}"
        tp_rank, tp_size = int(cfg.tp_rank), int(cfg.tp_size)
        replicated = bool(cfg.is_mla_model)
        layout = geom.strata_layout(model_id, 0 if replicated else tp_rank, 1 if replicated else tp_size)
        link = StoreLink(self.endpoint, layout, zero_copy=self.zero_copy, timeout_s=self.timeout_s,
                         retry_after_s=self.retry_after_s, credentials=self.credentials)
        try:
            link.connect()
        except (Unavailable, DeadlineExceeded) as e:
            log.warning("strata: daemon at %s not reachable at start-up (%s); serving misses until it is",
                        link.endpoint, e)
        old, writer = self.link, not (replicated and tp_rank != 0)
        self._state = (geom, link, writer)
        if old is not None:
            old.close()
        log.info("strata: SGLang HiCache backend on %s, namespace %#x (%s, %s pool, %d-byte pages%s)",
                 link.endpoint, layout.namespace_id(), model_id, geom.layout, geom.page_bytes,
                 "" if writer else ", read-only rank")

    @property
    def link(self) -> StoreLink | None:
        return self._state[1] if self._state else None

    def close(self) -> None:
        if self.link is not None:
            self.link.close()

    # ---- helpers -------------------------------------------------------------

    def _log(self, what: str, msg: str, exc: BaseException | None = None) -> None:
        now = time.monotonic()
        if now - self._last_log.get(what, -1e9) >= 10.0:
            self._last_log[what] = now
            log.warning("strata: %s: %s", what, msg, exc_info=exc)

    def _ready(self, what: str):
        """(geometry, link, writes?) or None before registration (logged)."""
        state = self._state
        if state is None:
            self._log(what, "called before register_mem_pool_host; answering miss")
        return state

    # ---- zero-copy interface (interface_v1) --------------------------------------

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """Number of leading keys stored (0 when the daemon is unreachable)."""
        try:
            ready = self._ready("batch_exists")
            if ready is None or not _count(keys):
                return 0
            hits, _ = ready[1].lookup([_key(k) for k in keys])
            return int(hits)
        except Exception as e:  # noqa: BLE001 - the engine's thread must not die
            self._log("batch_exists", f"failed: {e!r}", e)
            return 0

    def batch_get_v1(self, keys: List[str], host_indices, extra_info: Optional[HiCacheStorageExtraInfo] = None
                     ) -> List[bool]:
        """Loads ``keys[i]`` into host pages ``host_indices[i*page_size:
        (i+1)*page_size]``. True for each leading page that arrived intact
        (verified); False from the first page that is missing, failed its
        check or has unusable host indices on (prefix semantics)."""
        n = _count(keys)
        try:
            ready = self._ready("batch_get_v1")
            if ready is None or n == 0:
                return [False] * n
            geom, link, _ = ready
            starts = geom.page_starts(host_indices, n)
            usable = next((i for i, s in enumerate(starts) if s is None), n)
            first_bad = [usable]

            def sink(i: int, block: np.ndarray) -> None:
                if block.size != geom.page_bytes:  # a short block under this key
                    first_bad[0] = min(first_bad[0], i)
                if i < first_bad[0]:
                    geom.from_block(block, geom.page(starts[i]))

            t0 = time.perf_counter()
            got = min(link.load([_key(k) for k in keys[:usable]], sink), first_bad[0])
            self._samples.add(False, got, got * geom.page_bytes, time.perf_counter() - t0)
            return [i < got for i in range(n)]
        except Exception as e:  # noqa: BLE001
            self._log("batch_get_v1", f"failed: {e!r}", e)
            return [False] * n

    def batch_set_v1(self, keys: List[str], host_indices, extra_info: Optional[HiCacheStorageExtraInfo] = None
                     ) -> List[bool]:
        """Stores host pages ``host_indices[i*page_size:(i+1)*page_size]``
        under ``keys[i]``. True for each page now stored (already present
        counts); False for pages not stored (daemon down, store full, bad
        host indices)."""
        n = _count(keys)
        try:
            ready = self._ready("batch_set_v1")
            if ready is None or n == 0:
                return [False] * n
            geom, link, writer = ready
            if not writer:
                return [True] * n
            starts = geom.page_starts(host_indices, n)
            t0 = time.perf_counter()
            ok = self._save(link, [_key(k) for k in keys], [geom.page(s) if s is not None else None
                                                           for s in starts], geom, extra_info)
            self._samples.add(True, sum(ok), sum(ok) * geom.page_bytes, time.perf_counter() - t0)
            return ok
        except Exception as e:  # noqa: BLE001
            self._log("batch_set_v1", f"failed: {e!r}", e)
            return [False] * n

    def _save(self, link: StoreLink, skeys: list, pages: list, geom: _Geometry,
              extra_info) -> List[bool]:
        """Saves the pages that are not None (chained to the previous key,
        the first to the last prefix key when SGLang passes them) and
        answers per key."""
        prefix = getattr(extra_info, "prefix_keys", None)
        first_parent = _key(prefix[-1]) if prefix else None
        idx = [i for i, p in enumerate(pages) if p is not None]
        parents = [skeys[i - 1] if i else first_parent for i in idx]
        stored = link.save([skeys[i] for i in idx], parents,
                           lambda j, out: geom.to_block(pages[idx[j]], out))
        if stored == len(idx):
            done = set(idx)
        else:
            # The link counts, it does not say which: a store full mid-batch
            # or a key held with other bytes (AlreadyExists, which fails the
            # whole call after publishing the pages before it) leave some
            # stored. Ask per key; a daemon that is down answers at once.
            done = {i for i in idx if link.lookup([skeys[i]])[0] == 1}
        return [i in done for i in range(len(pages))]

    # ---- legacy interface (flat page tensors) ---------------------------------------

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        """Loads one page into the flat page tensor ``target_location`` (a
        new one from the host pool when None) and returns it, or None."""
        got = self.batch_get([key], None if target_location is None else [target_location])
        return got[0] if got else None

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> list:
        """Loads pages into flat page tensors (``target_locations``, else new
        ones from ``host_pool.get_dummy_flat_data_page()``); returns the
        filled tensor per key, None from the first page not loaded on."""
        n = _count(keys)
        try:
            ready = self._ready("batch_get")
            if ready is None or n == 0:
                return [None] * n
            geom, link, _ = ready
            targets = (list(target_locations) if target_locations is not None
                       else [self.mem_pool_host.get_dummy_flat_data_page() for _ in range(n)])
            flats = []
            for t in targets[:n]:
                try:
                    flats.append(geom.flat(t))
                except (TypeError, ValueError, RuntimeError) as e:
                    self._log("batch_get", f"unusable target page: {e}")
                    break
            t0 = time.perf_counter()
            got = link.load([_key(k) for k in keys[:len(flats)]],
                            lambda i, block: geom.from_block(block, flats[i]))
            self._samples.add(False, got, got * geom.page_bytes, time.perf_counter() - t0)
            return [targets[i] if i < got else None for i in range(n)]
        except Exception as e:  # noqa: BLE001
            self._log("batch_get", f"failed: {e!r}", e)
            return [None] * n

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        """Stores one flat page tensor ``value`` under ``key``."""
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        """Stores flat page tensors; True only if every one is stored."""
        n = _count(keys)
        try:
            ready = self._ready("batch_set")
            if ready is None or n == 0:
                return False
            geom, link, writer = ready
            if not writer:
                return True
            if values is None or len(values) != n:
                raise ValueError(f"{n} keys but {_count(values)} values")
            t0 = time.perf_counter()
            ok = self._save(link, [_key(k) for k in keys], [geom.flat(v) for v in values], geom, None)
            self._samples.add(True, sum(ok), sum(ok) * geom.page_bytes, time.perf_counter() - t0)
            return all(ok)
        except Exception as e:  # noqa: BLE001
            self._log("batch_set", f"failed: {e!r}", e)
            return False

    # ---- hybrid pools (v2) ------------------------------------------------------

    def batch_exists_v2(self, keys: List[str], pool_transfers: Optional[list] = None,
                        extra_info: Optional[HiCacheStorageExtraInfo] = None) -> PoolTransferResult:
        """Leading KV pages stored; no hit at all when the request also needs
        sidecar pools (not stored by this backend)."""
        if pool_transfers:
            self._log("batch_exists_v2", "sidecar pools (Mamba/SWA/indexer) are not stored; no hit")
            return PoolTransferResult(0, {})
        return PoolTransferResult(self.batch_exists(keys, extra_info), {})

    def batch_get_v2(self, transfers: list, extra_info: Optional[HiCacheStorageExtraInfo] = None
                     ) -> dict:
        """The ``kv`` transfer as :meth:`batch_get_v1`; others all False."""
        return self._v2("batch_get_v2", self.batch_get_v1, transfers, extra_info)

    def batch_set_v2(self, transfers: list, extra_info: Optional[HiCacheStorageExtraInfo] = None
                     ) -> dict:
        """The ``kv`` transfer as :meth:`batch_set_v1`; others all False."""
        return self._v2("batch_set_v2", self.batch_set_v1, transfers, extra_info)

    def _v2(self, what: str, v1, transfers, extra_info) -> dict:
        out: dict = {}
        try:
            for t in transfers or []:
                keys = list(t.keys or [])
                out[t.name] = (v1(keys, t.host_indices, extra_info) if str(t.name) == "kv"
                               else [False] * len(keys))
        except Exception as e:  # noqa: BLE001
            self._log(what, f"failed: {e!r}", e)
        return out

    # ---- maintenance ------------------------------------------------------------

    def clear(self) -> None:
        """Drops every page of this backend's namespace from the daemon (all
        engines sharing the model, shape and rank see it go: what SGLang's
        cache flush asks for, e.g. after a weight update). Pages pinned by
        a reader at that moment stay. Never raises."""
        try:
            link = self.link
            if link is None:
                return
            ns = link.namespace_id
            keys: set[bytes] = set()
            with Client(link.endpoint, timeout_s=self.timeout_s, credentials=self.credentials) as c:
                sub = c.subscribe([ns], snapshot=True)
                try:
                    for batch in sub:
                        keys.update(e.key for e in batch.events
                                    if isinstance(e, BlockStored) and e.namespace == ns)
                        if batch.snapshot_done:
                            break
                finally:
                    sub.close()
            ordered = sorted(keys)
            deleted = sum(link.delete(ordered[i:i + 1024]) for i in range(0, len(ordered), 1024))
            log.info("strata: cleared %d of %d pages of namespace %#x", deleted, len(ordered), ns)
        except Exception as e:  # noqa: BLE001
            self._log("clear", f"failed: {e!r}", e)

    def get_stats(self):
        """SGLang's ``StorageMetrics``: pages and GB/s of each get/set call
        since the last poll."""
        return self._samples.drain()
