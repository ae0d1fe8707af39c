"""vLLM KV connector: Strata as vLLM's external KV cache tier.

Follows ``KVConnectorBase_V1`` and ``SupportsHMA`` of **vLLM v0.31.0**
method for method (the recorded list is ``upstream/vllm.json``; call order,
layouts and traps are in ``upstream/NOTES.md``). Load it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "StrataConnector",
        "kv_connector_module_path": "strata.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"endpoint": "unix:/run/strata/stratad.sock"}}'

``kv_load_failure_policy`` must be ``"recompute"``: vLLM's default
(``"fail"``) fails every request whose loaded blocks are reported bad, and a
cache must never do that.

When ``vllm`` is importable the connector subclasses vLLM's own base
classes; otherwise it subclasses local stand-ins with the same names and
signatures (:data:`VLLM_IMPORTED` says which), so the module imports, runs
and is tested without vLLM (vLLM pulls gigabytes of CUDA torch).

Contract and decisions
======================

**Keys.** A block's key is vLLM's own chained hash of it,
``request.block_hashes[i]`` (the hash of the block's tokens, its parent's
hash and its extra keys: LoRA, multimodal inputs, ``cache_salt``). A hash of
1 to 32 bytes (``sha256``, ``sha256_cbor``: 32; the xxhash variants: 16) is
used as the Strata key unchanged; an int or a longer byte string is mapped to
``sha256(domain ‖ type ‖ bytes)`` (:func:`block_key`), deterministically in
every process. The parent of block ``i`` is the key of block ``i - 1``.
vLLM's sha256 hashes are stable across processes with no setup; with the
xxhash variants every vLLM process must share ``PYTHONHASHSEED`` or no key
ever matches (nothing reports it).

**Namespace.** The Strata :class:`~strata.types.Layout` is (model id, KV
dtype, layers, KV heads, head dim, block size, TP rank, TP size): another
model, dtype or TP shard never sees these blocks. The model id is
``extra_config["model_id"]`` or ``vllm_config.model_config.model``; the
shape comes from the (single) KV cache group's spec, then the model config;
every field can be forced in ``kv_connector_extra_config``.

**Loads are synchronous.** The scheduler's
:meth:`~StrataConnector.get_num_new_matched_tokens` looks the request's
block keys up (one RPC per TP rank) with a lease that pins the hits, and
answers ``(hit_tokens, False)``: whole blocks beyond the local prefix hit,
never the block holding the last token, only blocks present now. Asked
again for the same request it answers from the lease it holds (or replaces
it: no lease leaks). The workers then copy every block into the paged cache
in :meth:`~StrataConnector.start_load_kv`, before the forward, straight from
the daemon's mapped arena, each block verified against its checksum, and
release the lease. Why not asynchronous: a local load is a memcpy at memory
bandwidth plus one RPC (two 360 KiB blocks in about half a millisecond here),
far cheaper than the
extra scheduler step and the ``WAITING_FOR_REMOTE_KVS`` round trip an
asynchronous load costs, and it needs no thread. A block that does not
arrive intact is reported by
:meth:`~StrataConnector.get_block_ids_with_load_errors` in the same step,
with every later block of that load: vLLM recomputes from there.

**Saves are synchronous, in** :meth:`~StrataConnector.wait_for_save`. A
Strata block holds all layers of its tokens, so it can only be committed
after the last layer ran; ``save_kv_layer`` and ``wait_for_layer_load`` do
nothing, so full CUDA graphs (which skip them) are safe
(``requires_piecewise_for_cudagraph`` stays False). The scheduler emits a
store job for every block that becomes full in a step, prefill or decode,
that this engine computed; blocks already computed when the request was
scheduled (local prefix hits, blocks loaded from Strata) were stored when
first computed. A request whose load failed in a step stores nothing in that
step (its KV there was computed over a bad prefix); vLLM rewinds it and the
recomputed blocks are stored in later steps. Consequences: nothing is in
flight when a request finishes, so ``request_finished`` returns
``(False, None)`` (vLLM frees the blocks at once), ``get_finished`` reports
nothing, ``handle_preemptions`` has nothing to flush, and
``requires_kv_delivery`` is False (a dropped save is a future miss, and
vLLM must not recompute a preempted request for it).

**The daemon never fails a request** (:class:`~strata.integrations.link.StoreLink`):
unreachable, a lookup counts 0 hits; a load reports its blocks as failed
(vLLM recomputes them); a save is skipped. The link backs off and
reconnects by itself, also after a daemon restart. Only a wrong
configuration fails, loudly and at start-up: a layout the daemon refuses,
or a KV cache whose shape or dtype disagrees with the layout
(:meth:`~StrataConnector.register_kv_caches`).

**KV cache layouts** (per layer, :class:`LayerKV`): FlashAttention
``(2, num_blocks, block_size, heads, head_dim)``, FlashInfer
``(num_blocks, 2, block_size, heads, head_dim)`` (NHD or HND strides), and
v0.31's standardized 4-D view ``[num_blocks, heads, block_size, C]`` (or
``[num_blocks, block_size, heads, C]``) with K and V concatenated in
``C = 2 * head_dim`` (MLA: ``heads = 1``, ``C`` = the latent, stored as
one tensor). Blocks are indexed logically, so any stride order works and
no tensor is assumed contiguous; ``get_required_kvcache_layout`` therefore
asks for nothing. The Strata payload of a block is always
``(layers, 2, block_size, heads, head_dim)`` (K then V; MLA: the latent
alone, ``(layers, 1, block_size, 1, C)``), so engines with different layouts
share blocks. Arrays may be numpy arrays or torch tensors
(torch is imported only when the cache is one): host memory is read and
written in place, CUDA tensors through one gather/scatter per layer and
job and one host copy.

**Roles.** ``kv_role`` ``kv_both`` loads and saves; ``kv_consumer`` only
loads, ``kv_producer`` only saves.

**Tensor parallelism.** Each rank stores its own shard in its own namespace.
The scheduler looks up every rank's namespace, counts the shortest hit and
keeps one lease per rank; each worker loads under its rank's lease and
releases it. Pipeline parallelism is refused (stages would share a
namespace).

**Hybrid models.** ``SupportsHMA`` keeps vLLM's hybrid KV cache manager on;
the connector handles one KV cache group and refuses a configuration with
several, saying to start vLLM with ``--disable-hybrid-kv-cache-manager``.

**KV events.** With ``kv_events`` (default: vLLM's
``kv_events_config.enable_kv_cache_events``) the scheduler subscribes to the
daemon's event stream for its namespace and :meth:`~StrataConnector.take_events`
turns it into vLLM's ``BlockStored`` / ``BlockRemoved``
(:func:`strata.events.vllm_event`: ``medium`` ``CPU`` for Strata's DRAM,
``STORAGE`` for NVMe), token ids included for blocks this engine stored.
Hashes are the Strata keys, converted like vLLM's own
(``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``, default on: the low 64 bits,
big-endian), so they equal vLLM's GPU-tier hashes whenever the key is the
vLLM hash itself. When the daemon restarts or the feed falls behind, the
blocks reported so far are withdrawn with ``BlockRemoved`` and a snapshot
follows. Without vLLM the events are plain dicts of the same shape (with
``"type"`` naming the class, as vLLM's msgpack encoding tags them).

``kv_connector_extra_config`` keys: ``endpoint`` (default
``unix:/run/strata/stratad.sock``), ``model_id``, ``dtype``, ``num_layers``,
``num_kv_heads``, ``head_dim``, ``block_size``, ``tp_rank``, ``tp_size``,
``kv_cache_layout`` (``flash_attn`` / ``flashinfer``: only to disambiguate a
5-D cache of exactly 2 blocks), ``timeout_s`` (worker calls, 5),
``lookup_timeout_s`` (scheduler calls, 1), ``retry_after_s`` (1),
``lease_ttl_ms`` (30000), ``save_chunk_bytes`` (64 MiB: the most one save
call reserves), ``zero_copy`` (True), ``kv_events``; for a daemon that
authenticates TCP clients (``strata.auth``): ``token`` or ``token_file``,
``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``, ``tls_server_name``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ..auth import credentials_from
from ..errors import DeadlineExceeded, Unavailable
from ..events import EventFeed, Reset, vllm_event
from ..types import AllBlocksCleared as StrataAllBlocksCleared
from ..types import BlockRemoved as StrataBlockRemoved
from ..types import BlockStored as StrataBlockStored
from ..types import Dtype, KvKind, Layout, Lease, Tier
from .link import StoreLink

log = logging.getLogger("strata.integrations.vllm")

UPSTREAM = "vllm==0.31.0"

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore[import-not-found]
        KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole, KVConnectorTransferResults,
        SupportsHMA)
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # type: ignore[import-not-found]
        KVConnectorStats)
    VLLM_IMPORTED = True
except ImportError:
    VLLM_IMPORTED = False

    class KVConnectorRole(enum.Enum):
        """Stand-in for vLLM's ``KVConnectorRole``."""

        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata(ABC):  # noqa: B024 - abstract by convention, as upstream
        """Stand-in: scheduler-to-worker metadata of one step."""

    @dataclass
    class KVConnectorTransferResults:
        """Stand-in: what ``get_transfer_results`` returns."""

        finished_sending: set = field(default_factory=set)
        finished_recving: set = field(default_factory=set)
        failed_recving: set = field(default_factory=set)

    @dataclass
    class KVConnectorStats:
        """Stand-in for vLLM's connector stats (a dict payload)."""

        data: dict = field(default_factory=dict)

        def to_dict(self) -> dict[str, Any]:
            return self.data

        def reset(self) -> None:
            raise NotImplementedError

        def aggregate(self, other: "KVConnectorStats") -> "KVConnectorStats":
            raise NotImplementedError

        def reduce(self) -> dict[str, int | float]:
            raise NotImplementedError

        def is_empty(self) -> bool:
            raise NotImplementedError

    class SupportsHMA(ABC):
        """Stand-in: marks a connector that supports the hybrid KV cache manager."""

        @abstractmethod
        def request_finished_all_groups(self, request: "Request", block_ids: tuple[list[int], ...]
                                        ) -> tuple[bool, dict[str, Any] | None]:
            raise NotImplementedError

    class KVConnectorBase_V1(ABC):  # noqa: N801 - upstream's name
        """Stand-in for vLLM v0.31.0's ``KVConnectorBase_V1``: the same
        methods, signatures and defaults (``upstream/vllm.json``), no vLLM."""

        @property
        def supports_divergent_local_hybrid_hits(self) -> bool:
            return False

        @property
        def requires_kv_delivery(self) -> bool:
            return self._kv_transfer_config.is_kv_producer

        def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                     kv_cache_config: "KVCacheConfig") -> None:
            self._connector_metadata: KVConnectorMetadata | None = None
            self._vllm_config = vllm_config
            if vllm_config.kv_transfer_config is None:
                raise ValueError("kv_transfer_config must be set for KVConnectorBase_V1")
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._kv_cache_config = kv_cache_config
            self._role = role

        @property
        def role(self) -> KVConnectorRole:
            return self._role

        def get_mem_pool_context(self) -> "AbstractContextManager | None":
            return None

        def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self) -> None:
            self._connector_metadata = None

        def _get_connector_metadata(self) -> KVConnectorMetadata:
            assert self._connector_metadata is not None
            return self._connector_metadata

        def has_connector_metadata(self) -> bool:
            return self._connector_metadata is not None

        def register_kv_caches(self, kv_caches: "dict[str, torch.Tensor]") -> None:
            return None

        def set_host_xfer_buffer_ops(self, copy_operation: "CopyBlocksOp") -> None:
            return None

        def finish_forward(self) -> None:
            return None

        def reset_capture_state(self) -> None:
            return None

        def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
            return None

        @abstractmethod
        def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
            raise NotImplementedError

        @abstractmethod
        def wait_for_layer_load(self, layer_name: str) -> None:
            raise NotImplementedError

        @abstractmethod
        def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor",
                          attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
            raise NotImplementedError

        @abstractmethod
        def wait_for_save(self) -> None:
            raise NotImplementedError

        def get_finished(self, finished_req_ids: set[str]
                         ) -> tuple[set[str] | None, set[str] | None]:
            return None, None

        def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
            sending, recving = self.get_finished(finished_req_ids)
            return KVConnectorTransferResults(sending or set(), recving or set())

        def get_block_ids_with_load_errors(self) -> set[int]:
            return set()

        def shutdown(self) -> None:
            return None

        def get_kv_connector_stats(self) -> "KVConnectorStats | None":
            return None

        def get_kv_connector_kv_cache_events(self) -> "KVConnectorKVEvents | None":
            return None

        def get_handshake_metadata(self) -> "KVConnectorHandshakeMetadata | None":
            return None

        def build_connector_worker_meta(self) -> "KVConnectorWorkerMetadata | None":
            return None

        def bind_kv_cache_manager(self, kv_cache_manager: "KVCacheManager") -> None:
            self._kv_cache_manager = kv_cache_manager
            self.bind_gpu_block_pool(kv_cache_manager.block_pool)

        def bind_gpu_block_pool(self, gpu_block_pool: "BlockPool") -> None:
            return None

        @abstractmethod
        def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int
                                       ) -> tuple[int | None, bool]:
            raise NotImplementedError

        @abstractmethod
        def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                     num_external_tokens: int) -> None:
            raise NotImplementedError

        @abstractmethod
        def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
            raise NotImplementedError

        def on_new_request(self, request: "Request") -> None:
            return None

        def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
            return None

        def request_finished(self, request: "Request", block_ids: list[int]
                             ) -> tuple[bool, dict[str, Any] | None]:
            return False, None

        def register_finished_partial_tail(self, request: "Request",
                                           block_ids: tuple[list[int], ...],
                                           partial_tail_offloads: list[tuple[int, int, int]]
                                           ) -> bool:
            return False

        def take_events(self) -> Iterable["KVCacheEvent"]:
            return ()

        def has_pending_block_frees(self) -> bool:
            return False

        def has_pending_push_work(self) -> bool:
            return False

        @classmethod
        def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> str | None:
            if cls is KVConnectorBase_V1:
                raise TypeError("get_required_kvcache_layout should not be called "
                                "on the abstract base class")
            return None

        @classmethod
        def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
            return False

        def get_finished_count(self) -> int | None:
            return None

        @classmethod
        def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                     ) -> "KVConnectorStats | None":
            return None

        def set_xfer_handshake_metadata(self, metadata: "dict[int, KVConnectorHandshakeMetadata]"
                                        ) -> None:
            return None

        def set_xfer_handshake_metadata_pp_aware(
                self, metadata: "dict[tuple[int, int], KVConnectorHandshakeMetadata]") -> None:
            if any(pp_rank != 0 for pp_rank, _ in metadata):
                raise ValueError(f"{type(self).__name__} received pp_rank > 0 handshake metadata "
                                 "but does not support PP-disaggregated KV transfer.")
            self.set_xfer_handshake_metadata({tp: m for (_, tp), m in metadata.items()})

        @classmethod
        def build_prom_metrics(cls, vllm_config: "VllmConfig",
                               metric_types: "dict[type['PromMetric'], type['PromMetricT']]",
                               labelnames: list[str],
                               per_engine_labelvalues: dict[int, list[object]]
                               ) -> "KVConnectorPromMetrics | None":
            return None

        def reset_cache(self) -> bool | None:
            return None

try:
    from vllm.distributed.kv_events import (  # type: ignore[import-not-found]
        BlockRemoved as _VllmBlockRemoved, BlockStored as _VllmBlockStored)
except ImportError:
    _VllmBlockRemoved = _VllmBlockStored = None


DEFAULT_ENDPOINT = "unix:/run/strata/stratad.sock"

# Every key kv_connector_extra_config may hold (others are warned about).
EXTRA_CONFIG_KEYS = frozenset({
    "endpoint", "model_id", "dtype", "num_layers", "num_kv_heads", "head_dim", "block_size",
    "tp_rank", "tp_size", "kv_cache_layout", "timeout_s", "lookup_timeout_s", "retry_after_s",
    "lease_ttl_ms", "save_chunk_bytes", "zero_copy", "kv_events",
    # Credentials (strata.auth.credentials_from), passed through.
    "token", "token_file", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name"})

# ---- keys -------------------------------------------------------------------

_KEY_DOMAIN = b"strata.vllm.block-hash.v1\0"


def block_key(block_hash: "bytes | int") -> bytes:
    """The Strata key of one vLLM block hash: the hash itself when it is 1
    to 32 bytes, else ``sha256(domain ‖ b"b"|b"i" ‖ bytes)`` (an int as its
    minimal signed big-endian bytes)."""
    if isinstance(block_hash, (bytes, bytearray, memoryview)):
        b = bytes(block_hash)
        if 1 <= len(b) <= 32:
            return b
        return hashlib.sha256(_KEY_DOMAIN + b"b" + b).digest()
    if isinstance(block_hash, int):
        raw = block_hash.to_bytes(block_hash.bit_length() // 8 + 1, "big", signed=True)
        return hashlib.sha256(_KEY_DOMAIN + b"i" + raw).digest()
    raise TypeError(f"block hash of type {type(block_hash).__name__}: expected bytes or int")


# ---- KV cache layouts ---------------------------------------------------------

LAYER_LAYOUTS = ("flash_attn", "flashinfer", "bhnc", "bnhc")

# Same-width integer types: bytes move between caches and blocks untouched
# (no float conversion, bfloat16 and fp8 included).
_RAW = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def cache_dtype_name(cache) -> str:
    """``"float16"``, ``"bfloat16"``, ... of a numpy array or torch tensor."""
    return str(cache.dtype).removeprefix("torch.")


def _mismatch(name: str, shape: tuple, dims: tuple[str, ...], got: tuple, want: tuple) -> ValueError:
    diffs = "; ".join(f"{d} is {g}, the Strata layout says {w}"
                      for d, g, w in zip(dims, got, want) if w is not None and g != w)
    return ValueError(f"KV cache {name!r} of shape {shape} disagrees with the Strata layout: {diffs}")


def detect_layer_layout(name: str, shape: tuple, layout: Layout, hint: str | None = None) -> str:
    """Which of :data:`LAYER_LAYOUTS` a layer's cache of ``shape`` is, checked
    against ``layout``; a ``ValueError`` names every dimension that disagrees.

    5-D: ``flash_attn`` ``(2, N, B, H, D)`` or ``flashinfer`` ``(N, 2, B, H, D)``
    (``hint`` decides when N is 2). 4-D (vLLM 0.31 standardized, K and V
    concatenated in ``C = 2 * D``, MLA ``C = D``): ``bhnc`` ``[N, H, B, C]``,
    or ``bnhc`` ``[N, B, H, C]``; ``bhnc`` when H equals B.
    """
    shape = tuple(int(s) for s in shape)
    t, b, h, d = layout.kv_kind.tensors, layout.tokens_per_block, layout.num_kv_heads, layout.head_dim
    if len(shape) == 5:
        if t != 2:
            raise ValueError(f"KV cache {name!r} of shape {shape}: a 5-D cache holds separate K and V, "
                             f"but the Strata layout is {layout.kv_kind.name}")
        if hint not in (None, "flash_attn", "flashinfer"):
            raise ValueError(f"kv_cache_layout {hint!r}: expected 'flash_attn' or 'flashinfer'")
        kind = hint
        if kind is None:
            if shape[0] == 2 and shape[1] != 2:
                kind = "flash_attn"
            elif shape[1] == 2 and shape[0] != 2:
                kind = "flashinfer"
            elif shape[0] == 2:
                raise ValueError(f"KV cache {name!r} of shape {shape} may be FlashAttention or FlashInfer "
                                 "(2 blocks); set kv_connector_extra_config.kv_cache_layout")
            else:
                raise ValueError(f"KV cache {name!r} of shape {shape} is neither FlashAttention "
                                 "(2, num_blocks, block_size, heads, head_dim) nor FlashInfer "
                                 "(num_blocks, 2, block_size, heads, head_dim)")
        if kind == "flash_attn":
            dims = ("K/V", "num_blocks", "block_size", "num_kv_heads", "head_dim")
            want = (2, None, b, h, d)
        else:
            dims = ("num_blocks", "K/V", "block_size", "num_kv_heads", "head_dim")
            want = (None, 2, b, h, d)
        if any(w is not None and g != w for g, w in zip(shape, want)):
            raise _mismatch(name, shape, dims, shape, want)
        return kind
    if len(shape) == 4:
        c = t * d
        if shape[1:] == (h, b, c):
            return "bhnc"
        if shape[1:] == (b, h, c):
            return "bnhc"
        dims = ("num_blocks", "num_kv_heads", "block_size",
                f"C (K+V = {t} x head_dim)" if t == 2 else "C (latent = head_dim)")
        raise _mismatch(name, shape, dims, shape, (None, h, b, c))
    raise ValueError(f"KV cache {name!r} of shape {shape}: expected a 5-D FlashAttention/FlashInfer "
                     "cache or vLLM 0.31's 4-D [num_blocks, heads, block_size, C] view")


def _split_last(x, t: int, d: int):
    """View of ``x`` with its last axis (``t * d`` long) split into
    ``(t, d)``: always possible without a copy, made explicit so that a
    write through it can never land in a temporary."""
    if _is_torch(x):
        st = x.stride()
        return x.as_strided((*x.shape[:-1], t, d), (*st[:-1], st[-1] * d, st[-1]), x.storage_offset())
    st = x.strides
    return np.lib.stride_tricks.as_strided(x, (*x.shape[:-1], t, d), (*st[:-1], st[-1] * d, st[-1]),
                                           writeable=True)


class LayerKV:
    """One layer's paged KV cache, seen block by block.

    ``blocks`` is a view (no copy) ``(num_blocks, kv_tensors, block_size,
    heads, head_dim)`` of the cache as same-width integers, whatever the
    layout and strides: ``blocks[b]`` is block ``b`` in Strata's per-layer
    order (K then V). Host arrays (numpy, or a CPU torch tensor, viewed
    through numpy) are read and written in place; a CUDA tensor is moved with
    :meth:`gather` / :meth:`scatter`, one index op and one host copy each.
    """

    def __init__(self, name: str, cache, layout: Layout, hint: str | None = None):
        self.name = name
        self.kind = detect_layer_layout(name, tuple(cache.shape), layout, hint)
        dtype = cache_dtype_name(cache)
        if dtype != "uint8":  # vLLM's fp8 caches are uint8 tensors: checked by width below
            try:
                same = Dtype.parse(dtype) == layout.dtype
            except ValueError:
                same = False
            if not same:
                raise ValueError(f"KV cache {name!r} is {dtype}, the Strata layout says "
                                 f"{layout.dtype.name.lower()}")
        itemsize = layout.dtype.itemsize
        self.on_device = False
        if _is_torch(cache):
            import torch

            raw_t = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
            if cache.element_size() != itemsize:
                raise ValueError(f"KV cache {name!r}: {cache.element_size()}-byte elements, the Strata "
                                 f"layout's dtype has {itemsize}")
            if cache.device.type == "cpu":
                raw = cache.view(raw_t).numpy()
            else:
                raw = cache.view(raw_t)
                self.on_device = True
        else:
            cache = np.asarray(cache)
            if cache.dtype.itemsize != itemsize:
                raise ValueError(f"KV cache {name!r}: {cache.dtype.itemsize}-byte elements, the Strata "
                                 f"layout's dtype has {itemsize}")
            raw = cache.view(_RAW[itemsize])
        t, d = layout.kv_kind.tensors, layout.head_dim
        perm = {"flash_attn": (1, 0, 2, 3, 4), "flashinfer": (0, 1, 2, 3, 4),
                "bhnc": (0, 3, 2, 1, 4), "bnhc": (0, 3, 1, 2, 4)}[self.kind]
        if self.kind in ("bhnc", "bnhc"):
            raw = _split_last(raw, t, d)
        self.blocks = raw.permute(*perm) if self.on_device else raw.transpose(perm)
        self.num_blocks = int(self.blocks.shape[0])
        self.block_shape = tuple(int(s) for s in self.blocks.shape[1:])

    def gather(self, block_ids: list[int]) -> np.ndarray:
        """Copy of ``block_ids`` on the host, ``(k, kv_tensors, block_size,
        heads, head_dim)`` of same-width integers."""
        if not self.on_device:
            return self.blocks[np.asarray(block_ids, dtype=np.int64)]
        import torch

        idx = torch.as_tensor(block_ids, dtype=torch.long, device=self.blocks.device)
        return self.blocks[idx].cpu().numpy()

    def scatter(self, block_ids: list[int], data: np.ndarray) -> None:
        """Writes ``data`` ``(k, kv_tensors, block_size, heads, head_dim)``
        into ``block_ids``."""
        data = np.asarray(data)
        if not self.on_device:
            self.blocks[np.asarray(block_ids, dtype=np.int64)] = data.view(self.blocks.dtype)
            return
        import torch

        idx = torch.as_tensor(block_ids, dtype=torch.long, device=self.blocks.device)
        src = torch.from_numpy(np.ascontiguousarray(data).view(_RAW[data.dtype.itemsize]))
        self.blocks[idx] = src.to(self.blocks.device)


# ---- configuration -------------------------------------------------------------

def _extra_config(vllm_config) -> dict:
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    return dict(getattr(ktc, "kv_connector_extra_config", None) or {})


def _call(obj, method: str, *args):
    fn = getattr(obj, method, None)
    return fn(*args) if callable(fn) else None


def _kv_dtype_name(dtype, cache_dtype: str | None) -> str | None:
    """A Strata dtype name for a torch/numpy dtype or name; vLLM keeps fp8
    caches as uint8 and names the format in ``cache_dtype``."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name == "uint8":
        if cache_dtype in ("fp8", "fp8_e4m3"):
            return "fp8_e4m3"
        raise ValueError(f"KV cache dtype uint8 with cache_dtype {cache_dtype!r}: Strata stores "
                         "f32, f16, bf16 and fp8_e4m3 only")
    return name


def derive_layout(vllm_config, kv_cache_config, *, tp_rank: int = 0) -> Layout:
    """The Strata layout of this engine's (rank's) KV cache, from
    ``kv_connector_extra_config`` first, then the KV cache group's spec,
    then the model and cache configs. Refuses what the connector cannot
    serve (several KV cache groups, pipeline parallelism, K and V of
    different widths), naming it."""
    extra = _extra_config(vllm_config)
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if len(groups) > 1:
        raise ValueError(f"StrataConnector handles one KV cache group; this model has {len(groups)} "
                         "(hybrid attention). Start vLLM with --disable-hybrid-kv-cache-manager")
    spec = groups[0].kv_cache_spec if groups else None
    mc = getattr(vllm_config, "model_config", None)
    pc = getattr(vllm_config, "parallel_config", None)
    cc = getattr(vllm_config, "cache_config", None)
    if int(getattr(pc, "pipeline_parallel_size", 1) or 1) > 1:
        raise ValueError("StrataConnector does not support pipeline parallelism: the stages would "
                         "share a namespace")
    hv = getattr(spec, "head_size_v", None)
    if hv is not None and hv != getattr(spec, "head_size", hv):
        raise ValueError(f"K head size {spec.head_size} and V head size {hv} differ: Strata blocks "
                         "hold K and V of equal width")
    cache_dtype = getattr(cc, "cache_dtype", None)

    def pick(key: str, *candidates):
        if key in extra:
            return extra[key]
        for c in candidates:
            if c is not None:
                return c
        raise ValueError(f"cannot derive the KV cache's {key} from the vLLM config; set "
                         f"kv_connector_extra_config.{key}")

    mla = bool(getattr(spec, "use_mla", False)) or type(spec).__name__.startswith("MLA")
    model_dtype = None if cache_dtype not in (None, "auto") else getattr(mc, "dtype", None)
    return Layout(
        model_id=str(pick("model_id", getattr(mc, "model", None))),
        dtype=pick("dtype", _kv_dtype_name(getattr(spec, "dtype", None), cache_dtype),
                   None if cache_dtype in (None, "auto") else _kv_dtype_name(cache_dtype, cache_dtype),
                   _kv_dtype_name(model_dtype, cache_dtype)),
        num_layers=int(pick("num_layers", len(groups[0].layer_names) if groups else None,
                            _call(mc, "get_num_layers", pc))),
        num_kv_heads=int(pick("num_kv_heads", 1 if mla else getattr(spec, "num_kv_heads", None),
                              _call(mc, "get_num_kv_heads", pc))),
        head_dim=int(pick("head_dim", getattr(spec, "head_size", None), _call(mc, "get_head_size"))),
        tokens_per_block=int(pick("block_size", getattr(spec, "block_size", None),
                                  getattr(cc, "block_size", None))),
        kv_kind=KvKind.MLA if mla else KvKind.SEPARATE,
        tp_rank=tp_rank,
        tp_size=int(pick("tp_size", getattr(pc, "tensor_parallel_size", None), 1)),
    )


def _worker_tp_rank(extra: dict) -> int:
    if "tp_rank" in extra:
        return int(extra["tp_rank"])
    if VLLM_IMPORTED:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank  # type: ignore

        return int(get_tensor_model_parallel_rank())
    return 0


def _connect_at_start(link: StoreLink) -> None:
    """Registers the layout now so that a refused one fails start-up; an
    unreachable daemon only warns (the link connects when it comes up)."""
    try:
        link.connect()
    except (Unavailable, DeadlineExceeded) as e:
        log.warning("strata: %s not reachable at start (%s); serving misses until it is",
                    link.endpoint, e)


# ---- metadata and stats ----------------------------------------------------------

@dataclass
class LoadJob:
    """Load ``keys`` into ``block_ids`` (same order; ``keys`` may be shorter:
    the blocks without a key are reported failed) under ``leases[tp_rank]``."""

    req_id: str
    block_ids: list[int]
    keys: list[bytes]
    leases: tuple[Lease | None, ...]


@dataclass
class StoreJob:
    """Store the blocks ``block_ids`` under ``keys`` (parents: the chain)."""

    req_id: str
    block_ids: list[int]
    keys: list[bytes]
    parents: list[bytes | None]


@dataclass
class StrataConnectorMetadata(KVConnectorMetadata):
    """One step's jobs, built by the scheduler, run by every worker: loads
    in ``start_load_kv``, stores in ``wait_for_save``."""

    loads: list[LoadJob] = field(default_factory=list)
    stores: list[StoreJob] = field(default_factory=list)


@dataclass
class StrataConnectorStats(KVConnectorStats):
    """Counters of one interval (``data``: name -> number); workers' stats
    add up."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "StrataConnectorStats":
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


# ---- KV events ---------------------------------------------------------------------

def _int_hashes() -> bool:
    """vLLM's ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` (default on)."""
    return os.environ.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1").lower() not in ("0", "false", "no")


def _vllm_object(event: dict):
    """vLLM's event class for a :func:`~strata.events.vllm_event` dict, or
    the dict itself when vLLM is not importable."""
    cls = {"BlockStored": _VllmBlockStored, "BlockRemoved": _VllmBlockRemoved}[event["type"]]
    return event if cls is None else cls(**{k: v for k, v in event.items() if k != "type"})


class _EventPump:
    """Follows the daemon's KV events for one namespace on a thread and
    turns them into vLLM events on :meth:`take` (through
    :func:`strata.events.vllm_event`, adding the token ids of blocks this
    engine stored). Keeps what it reported (key -> tiers) so that a resync
    (daemon restart, feed behind, this queue full) and a cleared tier
    withdraw exactly that with ``BlockRemoved``; vLLM's ``AllBlocksCleared``
    is never sent, since in the engine's stream it would also wipe a router's
    view of the GPU tier."""

    def __init__(self, endpoint: str, namespace_id: int,
                 tokens: "OrderedDict[bytes, tuple[int, ...]]", max_pending: int = 1 << 16,
                 credentials=None):
        self.tokens = tokens
        self._credentials = credentials
        self.max_pending = max_pending
        self._endpoint, self._ns = endpoint, namespace_id
        self._lock = threading.Lock()
        self._pending: deque = deque()
        self._reported: dict[bytes, set[Tier]] = {}
        self._closed = threading.Event()
        self._feed: EventFeed | None = None
        self._thread = threading.Thread(target=self._run, name="strata-kv-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            feed = EventFeed(self._endpoint, [self._ns], credentials=self._credentials)
            with self._lock:
                self._feed = feed
            for item in feed:
                with self._lock:
                    if len(self._pending) >= self.max_pending:
                        # Nobody is draining: drop and resync from a snapshot.
                        self._pending.clear()
                        feed.close()
                        break
                    self._pending.append(item)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._feed is not None:
                self._feed.close()

    def take(self) -> list:
        with self._lock:
            items = list(self._pending)
            self._pending.clear()
        out: list = []
        for item in items:
            out.extend(_vllm_object(e) for e in self._convert(item))
        return out

    def _withdraw(self, tier: Tier | None) -> list[dict]:
        out = []
        for key in list(self._reported):
            tiers = self._reported[key]
            for t in sorted(tiers if tier is None else tiers & {tier}):
                tiers.discard(t)
                out.append(vllm_event(StrataBlockRemoved(0, self._ns, key, t), _int_hashes()))
            if not tiers:
                del self._reported[key]
        return out

    def _convert(self, item) -> list[dict]:
        if isinstance(item, Reset):
            return self._withdraw(None)
        if isinstance(item, StrataAllBlocksCleared):
            return self._withdraw(Tier(item.medium))
        event = vllm_event(item, _int_hashes())
        if isinstance(item, StrataBlockStored):
            self._reported.setdefault(item.key, set()).add(Tier(item.medium))
            event["token_ids"] = list(self.tokens.get(item.key, ()))
        elif isinstance(item, StrataBlockRemoved):
            tiers = self._reported.get(item.key)
            if tiers is not None:
                tiers.discard(Tier(item.medium))
                if not tiers:
                    del self._reported[item.key]
        return [event] if event is not None else []


# ---- the connector -------------------------------------------------------------------

# Token ids remembered for the BlockStored events of blocks this engine stored.
_MAX_TOKEN_MEMO = 1 << 16


@dataclass
class _Lookup:
    """A scheduler lookup held for a waiting request."""

    start: int          # first block beyond the local prefix hit
    asked: int          # keys looked up
    keys: list[bytes]   # keys of the hit blocks (leased)
    leases: tuple[Lease | None, ...]
    at: float           # time.monotonic() of the lookup


@dataclass
class _Tracked:
    """A running request's blocks, for its store jobs."""

    request: Any
    block_ids: list[int]
    next_save: int      # first block not yet offered for storage


class StrataConnector(KVConnectorBase_V1, SupportsHMA):
    """Strata as vLLM's KV connector (see the module docstring for the
    contract and every decision). Built by vLLM twice, as
    ``StrataConnector(vllm_config, role, kv_cache_config)``: the scheduler
    instance looks up, tracks requests and emits jobs; each worker instance
    moves the bytes. They share nothing but the daemon."""

    def __init__(self, vllm_config, role, kv_cache_config):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = _extra_config(vllm_config)
        unknown = sorted(set(extra) - EXTRA_CONFIG_KEYS)
        if unknown:
            log.warning("strata: unknown kv_connector_extra_config keys %s (known: %s)",
                        unknown, sorted(EXTRA_CONFIG_KEYS))
        self._extra = extra
        self._endpoint = str(extra.get("endpoint", DEFAULT_ENDPOINT))
        self._credentials = credentials_from(extra)
        self._retry_after_s = float(extra.get("retry_after_s", 1.0))
        self._lease_ttl_ms = int(extra.get("lease_ttl_ms", 30_000))
        self._save_chunk_bytes = int(extra.get("save_chunk_bytes", 64 << 20))
        self._counters: dict[str, float] = {}
        self._last_stats: dict[str, float] = {}
        self._is_scheduler = role == KVConnectorRole.SCHEDULER
        if self._is_scheduler:
            self._layout = derive_layout(vllm_config, kv_cache_config)
            timeout = float(extra.get("lookup_timeout_s", 1.0))
            # One link per TP rank (lookups only: no arena mapping).
            self._links = [StoreLink(self._endpoint, dataclasses.replace(self._layout, tp_rank=r),
                                     zero_copy=False, timeout_s=timeout,
                                     retry_after_s=self._retry_after_s, lease_ttl_ms=self._lease_ttl_ms,
                                     credentials=self._credentials)
                           for r in range(self._layout.tp_size)]
            for link in self._links:
                _connect_at_start(link)
            self._lookups: dict[str, _Lookup] = {}
            self._requests: dict[str, Any] = {}
            self._tracked: dict[str, _Tracked] = {}
            self._pending_loads: list[LoadJob] = []
            kv_role = getattr(self._kv_transfer_config, "kv_role", None) or "kv_both"
            self._loads = kv_role in ("kv_consumer", "kv_both")
            self._saves = kv_role in ("kv_producer", "kv_both")
            enabled = extra.get("kv_events", getattr(getattr(vllm_config, "kv_events_config", None),
                                                     "enable_kv_cache_events", False))
            self._tokens: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()
            self._events = (_EventPump(self._links[0].endpoint, self._links[0].namespace_id,
                                       self._tokens, credentials=self._credentials)
                            if enabled else None)
        else:
            self._tp_rank = _worker_tp_rank(extra)
            self._layout = derive_layout(vllm_config, kv_cache_config, tp_rank=self._tp_rank)
            self._links = []
            self._layers: list[LayerKV] = []
            self._load_errors: set[int] = set()
            self._failed_reqs: set[str] = set()

    # ---- shared ------------------------------------------------------------------

    @property
    def requires_kv_delivery(self) -> bool:
        """False: a best-effort cache (a dropped save is a later miss)."""
        return False

    @property
    def layout(self) -> Layout:
        """This instance's Strata layout (a worker's carries its TP rank;
        the scheduler looks up this layout under every rank)."""
        return self._layout

    def _count(self, name: str, n: float = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    def get_kv_connector_stats(self) -> StrataConnectorStats | None:
        """Counters since the last call (connector and link: lookups, hits,
        blocks loaded and saved, failures, errors, seconds), or None."""
        now = dict(self._counters)
        for link in self._links:
            for k, v in link.stats.as_dict().items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    now[f"link_{k}"] = now.get(f"link_{k}", 0) + v
        delta = {k: v - self._last_stats.get(k, 0) for k, v in now.items()}
        self._last_stats = now
        delta = {k: v for k, v in delta.items() if v}
        return StrataConnectorStats(data=delta) if delta else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> StrataConnectorStats:
        return StrataConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        """Releases the lookup leases still held, stops the event feed and
        closes the links."""
        if self._is_scheduler:
            for lk in self._lookups.values():
                self._release(lk.leases)
            self._lookups.clear()
            if self._events is not None:
                self._events.close()
        for link in self._links:
            link.close()

    # ---- scheduler side ------------------------------------------------------------

    def _release(self, leases: tuple[Lease | None, ...]) -> None:
        for link, lease in zip(self._links, leases):
            link.release(lease)

    def _drop_lookup(self, req_id: str) -> None:
        lk = self._lookups.pop(req_id, None)
        if lk is not None:
            self._release(lk.leases)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """``(tokens loadable now beyond num_computed_tokens, False)``:
        whole blocks present in every TP rank's namespace, never the block
        holding the request's last token, pinned by a lease held for the
        request until it is allocated (or finishes). Asked again, answers
        from that lease while it is fresh, else replaces it. 0 when the
        daemon is unreachable."""
        bs = self._layout.tokens_per_block
        rid = request.request_id
        hashes = request.block_hashes
        if not self._loads or getattr(request, "skip_reading_prefix_cache", False) or not hashes:
            self._drop_lookup(rid)
            return 0, False
        if len(hashes) > request.num_tokens // bs:
            self._count("hash_block_size_mismatch")
            log.error("strata: request %s has %d block hashes for %d tokens: vLLM's hash block size "
                      "is not the KV block size %d; no loads", rid, len(hashes), request.num_tokens, bs)
            return 0, False
        start = num_computed_tokens // bs
        end = min(len(hashes), (request.num_tokens - 1) // bs)
        if end <= start:
            self._drop_lookup(rid)
            return 0, False
        prev = self._lookups.get(rid)
        if (prev is not None and prev.start == start and prev.asked == end - start
                and time.monotonic() - prev.at < self._lease_ttl_ms / 2000):
            return len(prev.keys) * bs, False
        self._drop_lookup(rid)
        keys = [block_key(h) for h in hashes[start:end]]
        hits, leases = len(keys), []
        for link in self._links:
            n, lease = link.lookup(keys[:hits], lease_ttl_ms=self._lease_ttl_ms) if hits else (0, None)
            hits = min(hits, n)
            leases.append(lease)
        self._count("lookups")
        self._count("lookup_blocks", len(keys))
        if hits == 0:
            self._release(tuple(leases))
            return 0, False
        self._count("lookup_hit_blocks", hits)
        self._lookups[rid] = _Lookup(start, end - start, keys[:hits], tuple(leases), time.monotonic())
        return hits * bs, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        """Queues the load of ``num_external_tokens`` into the blocks just
        allocated after the local prefix hit; with 0, releases the lookup's
        lease. Remembers the request (its hashes feed the store jobs)."""
        rid = request.request_id
        self._requests[rid] = request
        if num_external_tokens == 0:
            self._drop_lookup(rid)
            return
        bs = self._layout.tokens_per_block
        n = num_external_tokens // bs
        lk = self._lookups.pop(rid, None)
        if lk is None:
            # Not ours to grant: the workers report these blocks failed.
            log.error("strata: request %s allocated %d external tokens without a lookup", rid,
                      num_external_tokens)
            start, keys, leases = request.num_computed_tokens // bs, [], (None,) * len(self._links)
        else:
            start, keys, leases = lk.start, lk.keys[:n], lk.leases
        ids = list(blocks.get_block_ids()[0][start:start + n])
        self._pending_loads.append(LoadJob(rid, ids, keys, leases))
        self._count("load_jobs")
        self._count("load_blocks", n)

    def build_connector_meta(self, scheduler_output) -> StrataConnectorMetadata:
        """This step's loads (queued by ``update_state_after_alloc``) and a
        store job per request for the full blocks its scheduled tokens
        complete (prefill and decode; speculative tokens excluded). Follows
        new, running and resumed requests' block lists; drops finished and
        preempted ones. Reads ``scheduler_output`` only; resets the step's
        state."""
        so = scheduler_output
        meta = StrataConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        for rid in list(so.finished_req_ids or ()) + list(so.preempted_req_ids or ()):
            self._tracked.pop(rid, None)
        bs = self._layout.tokens_per_block
        spec = so.scheduled_spec_decode_tokens or {}
        for new in so.scheduled_new_reqs:
            req = self._requests.get(new.req_id)
            if req is None:
                continue
            tr = self._tracked[new.req_id] = _Tracked(req, list(new.block_ids[0]),
                                                      new.num_computed_tokens // bs)
            end = new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0)
            self._store_job(meta, new.req_id, tr, end - len(spec.get(new.req_id, ())))
        cached = so.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or set()
        for i, rid in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            computed = cached.num_computed_tokens[i]
            tr = self._tracked.get(rid)
            if rid in resumed:  # its block list is replaced
                req = self._requests.get(rid)
                if req is None:
                    continue
                tr = self._tracked[rid] = _Tracked(req, list(new_ids[0]) if new_ids else [],
                                                   computed // bs)
            elif tr is None:  # never seen whole: its block list is unknown
                continue
            elif new_ids:
                tr.block_ids.extend(new_ids[0])
            # The scheduler went back (a failed load): store from there again.
            tr.next_save = min(tr.next_save, computed // bs)
            end = computed + so.num_scheduled_tokens.get(rid, 0)
            self._store_job(meta, rid, tr, end - len(spec.get(rid, ())))
        return meta

    def _store_job(self, meta: StrataConnectorMetadata, rid: str, tr: _Tracked, end_tokens: int) -> None:
        hashes = tr.request.block_hashes
        bs = self._layout.tokens_per_block
        full = min(end_tokens // bs, len(hashes), len(tr.block_ids))
        if full <= tr.next_save or not self._saves:
            return
        first = tr.next_save
        keys = [block_key(h) for h in hashes[first:full]]
        parents = [block_key(hashes[first - 1]) if first else None] + keys[:-1]
        meta.stores.append(StoreJob(rid, tr.block_ids[first:full], keys, parents))
        self._count("store_jobs")
        self._count("store_blocks", full - first)
        if self._events is not None:
            toks = tr.request.all_token_ids
            for j, k in zip(range(first, full), keys):
                self._tokens[k] = tuple(toks[j * bs:(j + 1) * bs])
                self._tokens.move_to_end(k)
            while len(self._tokens) > _MAX_TOKEN_MEMO:
                self._tokens.popitem(last=False)
        tr.next_save = full

    def update_connector_output(self, connector_output) -> None:
        """Rewinds the stores of requests whose loaded blocks the workers
        reported bad: vLLM recomputes them, and they are stored again."""
        bad = set(getattr(connector_output, "invalid_block_ids", None) or ())
        if not bad:
            return
        for tr in self._tracked.values():
            for j, b in enumerate(tr.block_ids[:tr.next_save]):
                if b in bad:
                    tr.next_save = j
                    break

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """``(False, None)``: saves are synchronous, nothing is in flight,
        the blocks may be freed now. Releases a lookup lease never used."""
        rid = request.request_id
        self._drop_lookup(rid)
        self._tracked.pop(rid, None)
        self._requests.pop(rid, None)
        return False, None

    def request_finished_all_groups(self, request, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        """``request_finished`` for the hybrid KV cache manager (one group)."""
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    def take_events(self) -> Iterable[Any]:
        """vLLM ``BlockStored`` / ``BlockRemoved`` events since the last call
        (dicts of the same shape without vLLM); none unless enabled."""
        return self._events.take() if self._events is not None else []

    # ---- worker side -------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Checks every layer's cache against the layout (shape, layout
        kind, dtype; a ``ValueError`` names what disagrees), orders the layers
        (the KV cache group's order, else by layer index), and connects (a
        layout the daemon refuses raises; an unreachable daemon only warns)."""
        if not kv_caches:
            raise ValueError("register_kv_caches got no KV caches")
        names = self._layer_order(kv_caches)
        layout = self._layout
        if len(names) != layout.num_layers:
            raise ValueError(f"{len(names)} KV cache layers registered, the Strata layout says "
                             f"{layout.num_layers}")
        hint = self._extra.get("kv_cache_layout")
        self._layers = [LayerKV(n, kv_caches[n], layout, hint) for n in names]
        kinds = {lv.kind for lv in self._layers}
        sizes = {lv.num_blocks for lv in self._layers}
        if len(kinds) > 1 or len(sizes) > 1:
            raise ValueError(f"KV cache layers differ: layouts {sorted(kinds)}, block counts {sorted(sizes)}")
        self._on_device = self._layers[0].on_device
        self._links = [StoreLink(self._endpoint, layout, zero_copy=bool(self._extra.get("zero_copy", True)),
                                 timeout_s=float(self._extra.get("timeout_s", 5.0)),
                                 retry_after_s=self._retry_after_s, lease_ttl_ms=self._lease_ttl_ms,
                                 save_part_bytes=self._save_chunk_bytes,
                                 credentials=self._credentials)]
        _connect_at_start(self._links[0])
        log.info("strata: %d layers, %s layout, %d blocks, namespace %#x at %s", len(names),
                 self._layers[0].kind, self._layers[0].num_blocks, layout.namespace_id(), self._endpoint)

    def _layer_order(self, kv_caches: dict[str, Any]) -> list[str]:
        groups = getattr(self._kv_cache_config, "kv_cache_groups", None) or []
        if groups and set(groups[0].layer_names) == set(kv_caches):
            return list(groups[0].layer_names)
        return sorted(kv_caches, key=lambda n: [int(x) for x in re.findall(r"\d+", n)])

    def bind_connector_metadata(self, connector_metadata) -> None:
        """Binds the step's jobs and starts the step's error report afresh."""
        super().bind_connector_metadata(connector_metadata)
        self._load_errors = set()
        self._failed_reqs = set()

    def _payload(self, buf: np.ndarray) -> np.ndarray:
        lay = self._layout
        return buf.view(_RAW[lay.dtype.itemsize]).reshape(lay.num_layers, *self._layers[0].block_shape)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        """Runs every load job of the step, synchronously, before the
        forward: each block copied from the store into every layer and
        verified; the job's lease released. Blocks from the first one that
        did not arrive are reported by ``get_block_ids_with_load_errors``."""
        meta = self._connector_metadata
        if not isinstance(meta, StrataConnectorMetadata) or not meta.loads:
            return
        if not self._layers:
            raise RuntimeError("StrataConnector.start_load_kv before register_kv_caches")
        for job in meta.loads:
            lease = job.leases[self._tp_rank] if self._tp_rank < len(job.leases) else None
            n = self._load(job, lease) if job.keys else 0
            self._links[0].release(lease)
            self._count("loaded_blocks", n)
            if n < len(job.block_ids):
                self._load_errors.update(job.block_ids[n:])
                self._failed_reqs.add(job.req_id)
                self._count("load_error_blocks", len(job.block_ids) - n)

    def _load(self, job: LoadJob, lease: Lease | None) -> int:
        """Loads ``job``; returns how many leading blocks arrived intact.
        Host caches are written in place by the sink (a block that then fails
        its check is reported and recomputed); device caches get only the
        verified blocks, one scatter per layer."""
        link, ids = self._links[0], job.block_ids
        if not self._on_device:
            layers = self._layers

            def sink(i: int, view: np.ndarray) -> None:
                b = ids[i]
                for lv, data in zip(layers, self._payload(view)):
                    lv.blocks[b] = data
            return link.load(job.keys, sink, lease=lease)
        staged = np.empty((len(job.keys), self._layout.num_layers, *self._layers[0].block_shape),
                          _RAW[self._layout.dtype.itemsize])

        def stage(i: int, view: np.ndarray) -> None:
            staged[i] = self._payload(view)
        n = link.load(job.keys, stage, lease=lease)
        if n:
            for l, lv in enumerate(self._layers):
                lv.scatter(ids[:n], staged[:n, l])
        return n

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: loads complete in ``start_load_kv``."""

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        """Nothing per layer: a Strata block holds every layer, so blocks
        are stored in ``wait_for_save``."""

    def wait_for_save(self) -> None:
        """Runs the step's store jobs, synchronously: each block written
        once, straight into its arena slot (blocks already stored are
        skipped unread), at most ``save_chunk_bytes`` per call (the daemon
        reserves a call's space all or nothing, so one call larger than its
        DRAM would always fail; the link is given the same part size, and the
        parts here also bound the host staging of device caches). Skips the jobs of requests whose load failed
        in this step. An unreachable daemon skips the save (counted)."""
        meta = self._connector_metadata
        if not isinstance(meta, StrataConnectorMetadata) or not meta.stores:
            return
        link = self._links[0]
        chunk = max(1, self._save_chunk_bytes // self._layout.block_bytes)
        for job in meta.stores:
            if job.req_id in self._failed_reqs:
                self._count("store_jobs_skipped_after_load_error")
                continue
            for i in range(0, len(job.keys), chunk):
                part = slice(i, i + chunk)
                stored = link.save(job.keys[part], job.parents[part], self._fill(job.block_ids[part]))
                self._count("stored_blocks", stored)

    def _fill(self, block_ids: list[int]):
        if not self._on_device:
            layers = self._layers

            def fill(i: int, out: np.ndarray) -> None:
                payload = self._payload(out)
                b = block_ids[i]
                for lv, dst in zip(layers, payload):
                    dst[...] = lv.blocks[b]
            return fill
        staged = np.empty((len(block_ids), self._layout.num_layers, *self._layers[0].block_shape),
                          _RAW[self._layout.dtype.itemsize])
        for l, lv in enumerate(self._layers):
            staged[:, l] = lv.gather(block_ids)

        def fill_staged(i: int, out: np.ndarray) -> None:
            self._payload(out)[...] = staged[i]
        return fill_staged

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Block ids of this step's loads that did not arrive intact: for
        each load job, every block from the first one missing on."""
        return set(self._load_errors)
