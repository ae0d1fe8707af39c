"""The client's domain types: plain dataclasses, no protobuf.

The block payload convention shared by every Strata client: a block of ``n``
tokens is the array ``(num_layers, kv_tensors, n, num_kv_heads, head_dim)``
of ``dtype`` in C order (layer-major, then K before V, then token), where
``kv_tensors`` is 2 for separate K and V and 1 for MLA's latent. A block's
length is therefore ``n * token_bytes`` with ``1 <= n <= tokens_per_block``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

import numpy as np
import xxhash


class Dtype(enum.IntEnum):
    F32 = 1
    F16 = 2
    BF16 = 3
    FP8_E4M3 = 4

    @property
    def itemsize(self) -> int:
        return {Dtype.F32: 4, Dtype.F16: 2, Dtype.BF16: 2, Dtype.FP8_E4M3: 1}[self]

    @classmethod
    def parse(cls, name: "str | Dtype") -> "Dtype":
        if isinstance(name, Dtype):
            return name
        aliases = {
            "f32": cls.F32, "float32": cls.F32,
            "f16": cls.F16, "float16": cls.F16, "half": cls.F16,
            "bf16": cls.BF16, "bfloat16": cls.BF16,
            "fp8": cls.FP8_E4M3, "fp8_e4m3": cls.FP8_E4M3, "float8_e4m3fn": cls.FP8_E4M3,
        }
        key = str(name).lower().removeprefix("torch.")
        if key not in aliases:
            raise ValueError(f"dtype {name!r}: expected one of f32, f16, bf16, fp8_e4m3")
        return aliases[key]


class KvKind(enum.IntEnum):
    SEPARATE = 1
    MLA = 2

    @property
    def tensors(self) -> int:
        return 2 if self is KvKind.SEPARATE else 1


class Tier(enum.IntEnum):
    UNSPECIFIED = 0
    GPU = 1
    DRAM = 2
    CXL = 3
    NVME = 4
    REMOTE = 5

    @property
    def medium(self) -> str:
        """The tier as KV-event consumers name it (vLLM's ``medium``)."""
        return {Tier.GPU: "GPU", Tier.DRAM: "CPU", Tier.CXL: "CXL", Tier.NVME: "STORAGE",
                Tier.REMOTE: "REMOTE"}.get(self, "UNKNOWN")


@dataclass(frozen=True)
class Layout:
    """The shape of one engine's KV cache; it names a namespace."""

    model_id: str
    dtype: Dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_block: int
    kv_kind: KvKind = KvKind.SEPARATE
    tp_rank: int = 0
    tp_size: int = 1
    tenant_salt: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", Dtype.parse(self.dtype))
        object.__setattr__(self, "kv_kind", KvKind(self.kv_kind))

    @property
    def token_bytes(self) -> int:
        return (self.num_layers * self.kv_kind.tensors * self.num_kv_heads
                * self.head_dim * self.dtype.itemsize)

    @property
    def block_bytes(self) -> int:
        return self.token_bytes * self.tokens_per_block

    def block_shape(self, tokens: int | None = None) -> tuple[int, int, int, int, int]:
        """Shape of a block's payload of ``tokens`` tokens (default: full)."""
        n = self.tokens_per_block if tokens is None else tokens
        return (self.num_layers, self.kv_kind.tensors, n, self.num_kv_heads, self.head_dim)

    def namespace_id(self, tenant: str | None = None) -> int:
        """The namespace id the daemon derives from this layout (same
        canonical encoding as ``strata_proto::Layout::namespace_id``).
        ``tenant``: the tenant that registers it, when the daemon
        authenticates clients: the daemon puts the tenant's name and a NUL
        before the salt (``Layout::for_tenant``; "default" is not folded)."""
        salt = bytes(self.tenant_salt)
        if tenant is not None and tenant != "default":
            salt = tenant.encode() + b"\0" + salt
        model = self.model_id.encode()
        buf = bytearray(b"strata.layout.v1\0")
        buf += struct.pack("<I", len(model)) + model
        buf += bytes([int(self.dtype), int(self.kv_kind)])
        buf += struct.pack("<6I", self.num_layers, self.num_kv_heads, self.head_dim,
                           self.tokens_per_block, self.tp_rank, self.tp_size)
        buf += struct.pack("<I", len(salt)) + salt
        return xxhash.xxh3_64_intdigest(bytes(buf))


@dataclass(frozen=True)
class Namespace:
    """A registered layout."""

    id: int
    layout: Layout
    block_bytes: int
    token_bytes: int
    existed: bool = False


@dataclass(frozen=True)
class Block:
    """A block to store: its key, payload (any buffer) and parent key."""

    key: bytes
    data: "bytes | bytearray | memoryview | np.ndarray"
    parent: bytes | None = None


class PutResult(enum.IntEnum):
    UNSPECIFIED = 0
    STORED = 1
    ALREADY_PRESENT = 2


@dataclass(frozen=True)
class PutOutcome:
    key: bytes
    result: PutResult
    durable: bool


@dataclass(frozen=True)
class Lease:
    id: int
    namespace: int
    expires_unix_ms: int


@dataclass(frozen=True)
class LookupResult:
    hits: int
    tiers: list[Tier]
    lease: Lease | None = None


@dataclass(frozen=True)
class StoredBlock:
    """A block read back; its bytes verified against its checksum."""

    key: bytes
    data: bytes
    checksum: int
    tier: Tier
    parent: bytes | None


@dataclass(frozen=True)
class DeleteResult:
    deleted: int
    absent: list[bytes] = field(default_factory=list)
    pinned: list[bytes] = field(default_factory=list)


def checksum(data) -> int:
    """XXH3-64 (seed 0) of a buffer: the checksum every block carries."""
    if isinstance(data, bytes):
        return xxhash.xxh3_64_intdigest(data)
    return xxhash.xxh3_64_intdigest(as_bytes_view(data))


def as_bytes_view(data) -> memoryview:
    """A flat byte view of any C-contiguous buffer (bytes, numpy, memoryview)."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ValueError("block data must be C-contiguous")
        return memoryview(data.reshape(-1).view(np.uint8))
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise ValueError("block data must be C-contiguous")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


# ---- Attend (attention near the data) ---------------------------------------

class AttendMode(enum.IntEnum):
    """How the daemon chooses the tokens it attends."""

    #: Every token of the present prefix: exact, mergeable to full attention.
    DENSE = 1
    #: Blocks best-first by the upper bound of q.k from their abstracts,
    #: within a budget; first (sink) and last (recent) blocks always in.
    SPARSE = 2
    #: SparF: the top-r channels of |q| score every token; whole blocks
    #: best-first (or the top-k single tokens) are attended exactly (per KV
    #: head); optionally with SparQ's mean-value correction (not mergeable).
    SPARF = 3
    #: RetrievalAttention: per KV head, the union of its query heads' top-k
    #: from the chain's retrieval index (an exact scan while none is ready),
    #: attended exactly; merge with the engine's static window.
    RETRIEVAL = 4

    @classmethod
    def parse(cls, mode: "str | AttendMode") -> "AttendMode":
        if isinstance(mode, AttendMode):
            return mode
        try:
            return cls[str(mode).upper()]
        except KeyError:
            raise ValueError(f"attend mode {mode!r}: expected dense, sparse, sparf or retrieval") from None


@dataclass(frozen=True)
class AttendSequence:
    """One sequence of an Attend call: the block keys of the prefix the
    daemon should cover (chain order) and the queries, ``(heads, head_dim)``
    float32 with ``heads`` a multiple of the layout's KV heads.
    ``last_block_tokens`` cuts the last key's block (None: all it holds).

    Instead of every key, :meth:`tail` names the chain by its last key and
    its length in blocks; the daemon follows the parent links back to the
    root (32 bytes on the wire instead of 2,048 keys at 32K tokens). Such a
    chain always starts at its root; when a block of it is gone the daemon
    answers with no prefix (``keys_present`` 0): send the keys then."""

    keys: list | None
    queries: "np.ndarray"
    last_block_tokens: int | None = None
    chain_tail: bytes | None = None
    chain_blocks: int = 0

    @classmethod
    def tail(cls, tail: bytes, blocks: int, queries, last_block_tokens: int | None = None):
        """The chain of ``blocks`` blocks that ends at key ``tail``."""
        return cls(None, queries, last_block_tokens, bytes(tail), int(blocks))


@dataclass(frozen=True)
class TierRead:
    """What one tier gave an Attend: blocks and bytes read."""

    tier: Tier
    blocks: int
    bytes: int


@dataclass(frozen=True)
class AttendResult:
    """The daemon's partial attention for one sequence.

    ``o`` is ``(heads, head_dim)`` float32 and ``lse`` ``(heads,)`` float32
    (``-inf`` for an empty set); merge them with the engine's own part with
    :func:`strata.merge.merge` (or :meth:`merged`). ``keys_present`` leading
    keys were present and covered (a missing block is never skipped);
    ``covered`` are the token ranges ``[start, end)`` attended (union over
    heads; ``head_covered`` per KV head for SPARF).

    ``mean_corrected``: SPARF with ``sparf_mean_correction``, when the
    correction was applied. ``o`` is then ``alpha * o_chosen + (1 - alpha)
    * mean(V)`` per query head (``alpha`` the chosen set's estimated
    softmax mass, ``mean(V)`` over every present token) and ``lse`` the
    chosen set's minus ``ln(alpha)``: an estimate of attention over the
    whole present prefix, not a partial over ``covered``; :meth:`merged`
    refuses it (``mergeable`` is False)."""

    o: "np.ndarray"
    lse: "np.ndarray"
    keys_present: int
    tokens_present: int
    covered: list
    head_covered: list
    reads: dict
    exact: bool
    sink_included: bool
    recent_included: bool
    tokens_attended: int
    abstract_bytes: int
    #: RETRIEVAL: per KV head, where its tokens came from (RetrieveSource),
    #: and keys scanned per query head.
    retrieval_source: list = field(default_factory=list)
    retrieval_scanned: list = field(default_factory=list)
    mean_corrected: bool = False
    #: With ``min_precision="int8"``/``"int4"``: blocks computed on from the
    #: daemon's int8/int4 copies instead of their stored K and V, and the
    #: copies' bytes read. When nonzero, ``exact`` is False; the answer is
    #: still a partial over ``covered`` (mergeable), with their rounding.
    quantized_blocks: int = 0
    quantized_bytes: int = 0

    @property
    def mergeable(self) -> bool:
        """Whether ``(o, lse)`` is an exact partial over ``covered`` that
        may be merged with a part over a disjoint set."""
        return not self.mean_corrected

    def read_bytes(self, tier: Tier) -> int:
        r = self.reads.get(Tier(tier))
        return r.bytes if r else 0

    def read_blocks(self, tier: Tier) -> int:
        r = self.reads.get(Tier(tier))
        return r.blocks if r else 0

    def merged(self, o, lse) -> "tuple[np.ndarray, np.ndarray]":
        """This answer merged with a partial over a disjoint token set.
        Raises ValueError for a mean-corrected answer (not a partial)."""
        if not self.mergeable:
            raise ValueError("merge: the answer is mean-corrected (SPARF sparf_mean_correction): "
                             "an estimate of attention over the whole prefix, not a partial over "
                             "its covered tokens; it cannot be merged")
        from .merge import merge
        return merge(self.o, self.lse, o, lse)


# ---- retrieval indexes (BuildIndex, Retrieve) ---------------------------------

class IndexState(enum.IntEnum):
    """State of one (layer, KV head) retrieval index."""

    BUILDING = 1
    READY = 2
    FAILED = 3


class RetrieveSource(enum.IntEnum):
    """Where a query head's top-k came from."""

    #: The chain's index.
    INDEX = 1
    #: Exact scan: no index covers the chain and layer, or its index does
    #: not hold this query head's KV head.
    EXACT_NO_INDEX = 2
    #: Exact scan: the index is still building (or failed).
    EXACT_BUILDING = 3
    #: Exact scan: a covered block changed or is gone; the index was dropped.
    EXACT_STALE = 4


@dataclass(frozen=True)
class IndexStatus:
    layer: int
    kv_head: int
    state: IndexState
    progress: float
    tokens: int
    inserted_tokens: int
    memory_bytes: int
    default_ef: int
    error: str


@dataclass(frozen=True)
class BuildIndexResult:
    """Leading keys of the chain indexed, their tokens, and each index."""

    keys_covered: int
    tokens_covered: int
    indexes: list

    @property
    def ready(self) -> bool:
        return all(i.state == IndexState.READY for i in self.indexes)


@dataclass(frozen=True)
class HeadHits:
    """One query head's top-k: token positions from the chain's first token
    (best first, int64) and their raw q.k (float32)."""

    positions: "np.ndarray"
    scores: "np.ndarray"
    scanned: int
    source: RetrieveSource


@dataclass(frozen=True)
class RetrieveResult:
    heads: list
    keys_present: int
    tokens_present: int
    inserted_tokens: int


# ---- KV events (Subscribe) --------------------------------------------------

@dataclass(frozen=True)
class BlockStored:
    """A block gained a copy in ``medium``."""

    seq: int
    namespace: int
    key: bytes
    parent: bytes | None
    token_count: int
    medium: Tier


@dataclass(frozen=True)
class BlockRemoved:
    """A block lost its copy in ``medium`` (it may be held in another)."""

    seq: int
    namespace: int
    key: bytes
    medium: Tier


@dataclass(frozen=True)
class AllBlocksCleared:
    """Every copy in ``medium`` is gone (a fenced NVMe tier)."""

    seq: int
    medium: Tier


KvEvent = "BlockStored | BlockRemoved | AllBlocksCleared"


@dataclass(frozen=True)
class EventBatch:
    events: list
    ts_unix_ms: int
    epoch: int
    snapshot: bool = False
    snapshot_seq: int = 0
    snapshot_done: bool = False
    missed: int = 0
    last_seq: int = 0
