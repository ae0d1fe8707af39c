"""Conversion between the client's types and the generated protobuf, shared
by the sync and the asyncio clients. The only module besides the clients
that imports the stubs."""

from __future__ import annotations

from typing import Iterable, Iterator

from .errors import DataLoss, InvalidArgument
import numpy as np

from .types import (AllBlocksCleared, AttendMode, AttendResult, AttendSequence, Block, BlockRemoved,
                    BlockStored, DeleteResult, EventBatch, Layout, Lease, LookupResult, Namespace,
                    PutOutcome, PutResult, StoredBlock, Tier, TierRead, as_bytes_view, checksum,
                    BuildIndexResult, HeadHits, IndexState, IndexStatus, RetrieveResult,
                    RetrieveSource)
from .v1 import strata_pb2 as pb

# One gRPC message carries at most this much block data (the daemon's
# default message limit is larger; 4 MiB keeps every message well inside it).
CHUNK_BYTES = 4 << 20

# Channel options: messages up to 64 MiB, HTTP/2 windows sized for blocks.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.http2.lookahead_bytes", 16 << 20),
]


def channel_options(endpoint: str) -> list:
    """Options for a channel to ``endpoint``. On a Unix socket gRPC would
    send the socket path as ``:authority``, which HTTP/2 servers (hyper)
    refuse as malformed; name the local host instead."""
    if endpoint.startswith("unix:"):
        return CHANNEL_OPTIONS + [("grpc.default_authority", "localhost")]
    return CHANNEL_OPTIONS


def target(endpoint: str) -> str:
    """gRPC target for ``http://host:port``, ``https://host:port`` (TLS:
    see :mod:`strata.auth`), ``host:port`` or ``unix:/path``."""
    if endpoint.startswith("unix:"):
        return endpoint
    for prefix in ("http://", "grpc://", "https://"):
        if endpoint.startswith(prefix):
            return endpoint[len(prefix):].rstrip("/")
    return endpoint


def layout_pb(layout: Layout) -> pb.Layout:
    return pb.Layout(model_id=layout.model_id, dtype=int(layout.dtype),
                     num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                     head_dim=layout.head_dim, tokens_per_block=layout.tokens_per_block,
                     kv_kind=int(layout.kv_kind), tp_rank=layout.tp_rank, tp_size=layout.tp_size,
                     tenant_salt=bytes(layout.tenant_salt))


def namespace(layout: Layout, r: pb.RegisterLayoutResponse) -> Namespace:
    return Namespace(id=r.namespace_id, layout=layout, block_bytes=r.block_bytes,
                     token_bytes=r.token_bytes, existed=r.existed)


def ns_id(ns: "Namespace | int") -> int:
    return ns.id if isinstance(ns, Namespace) else int(ns)


def keys_list(keys: Iterable[bytes]) -> list[bytes]:
    out = [bytes(k) for k in keys]
    return out


def lookup_result(ns: int, r: pb.LookupResponse) -> LookupResult:
    lease = Lease(r.lease_id, ns, r.lease_expires_unix_ms) if r.lease_id else None
    return LookupResult(hits=r.hits, tiers=[Tier(t) for t in r.tiers], lease=lease)


def put_messages(ns: int, blocks: Iterable[Block]) -> Iterator[pb.PutRequest]:
    """The Put stream: per block a header message carrying the first chunk,
    then the rest of its bytes in further messages."""
    for b in blocks:
        view = as_bytes_view(b.data)
        header = pb.PutHeader(namespace_id=ns, key=bytes(b.key), parent=bytes(b.parent or b""),
                              length=len(view), checksum=checksum(view))
        first = view[:CHUNK_BYTES]
        yield pb.PutRequest(header=header, data=bytes(first))
        for off in range(CHUNK_BYTES, len(view), CHUNK_BYTES):
            yield pb.PutRequest(data=bytes(view[off:off + CHUNK_BYTES]))


def put_outcomes(r) -> list[PutOutcome]:
    return [PutOutcome(o.key, PutResult(o.result), o.durable) for o in r.outcomes]


class GetAssembler:
    """Reassembles the Get stream into verified blocks."""

    def __init__(self) -> None:
        self.blocks: list[StoredBlock] = []
        self._header: pb.BlockHeader | None = None
        self._parts: list[bytes] = []
        self._have = 0

    def feed(self, m: pb.GetResponse) -> None:
        if m.HasField("header"):
            if self._header is not None:
                raise DataLoss(f"block {self._header.key.hex()}: stream ended after "
                               f"{self._have} of {self._header.length} bytes")
            self._header, self._parts, self._have = m.header, [], 0
        if self._header is None:
            raise DataLoss("Get stream: data before any block header")
        if m.data:
            self._parts.append(m.data)
            self._have += len(m.data)
        if self._have > self._header.length:
            raise DataLoss(f"block {self._header.key.hex()}: more bytes than its length")
        if self._have == self._header.length:
            h = self._header
            data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            if checksum(data) != h.checksum:
                raise DataLoss(f"block {h.key.hex()}: checksum mismatch on arrival")
            self.blocks.append(StoredBlock(key=h.key, data=data, checksum=h.checksum,
                                           tier=Tier(h.tier), parent=h.parent or None))
            self._header = None

    def finish(self) -> list[StoredBlock]:
        if self._header is not None:
            raise DataLoss(f"block {self._header.key.hex()}: stream ended after "
                           f"{self._have} of {self._header.length} bytes")
        return self.blocks


def delete_result(r: pb.DeleteResponse) -> DeleteResult:
    return DeleteResult(deleted=r.deleted, absent=list(r.absent), pinned=list(r.pinned))


def subscribe_request(namespaces, after_seq: int, snapshot: bool, max_batch: int) -> pb.SubscribeRequest:
    return pb.SubscribeRequest(namespace_ids=[ns_id(n) for n in (namespaces or [])],
                               after_seq=after_seq, snapshot=snapshot, max_batch=max_batch)


def event_batch(b: pb.KvEventBatch) -> EventBatch:
    out = []
    for e in b.events:
        kind = e.WhichOneof("kind")
        if kind == "stored":
            s = e.stored
            out.append(BlockStored(e.seq, s.namespace_id, s.key, s.parent or None, s.token_count,
                                   Tier(s.medium)))
        elif kind == "removed":
            r = e.removed
            out.append(BlockRemoved(e.seq, r.namespace_id, r.key, Tier(r.medium)))
        elif kind == "cleared":
            out.append(AllBlocksCleared(e.seq, Tier(e.cleared.medium)))
        # An event kind this client does not know is skipped (the wire
        # format only ever adds kinds).
    return EventBatch(events=out, ts_unix_ms=b.ts_unix_ms, epoch=b.epoch, snapshot=b.snapshot,
                      snapshot_seq=b.snapshot_seq, snapshot_done=b.snapshot_done, missed=b.missed,
                      last_seq=b.last_seq)


_IO_DTYPES = {None: pb.DTYPE_UNSPECIFIED, "f32": pb.DTYPE_F32, "float32": pb.DTYPE_F32,
              "f16": pb.DTYPE_F16, "float16": pb.DTYPE_F16, "bf16": pb.DTYPE_BF16,
              "bfloat16": pb.DTYPE_BF16}


_PRECISIONS = {None: pb.PRECISION_UNSPECIFIED, "stored": pb.PRECISION_STORED,
               "int8": pb.PRECISION_INT8, "int4": pb.PRECISION_INT4}


def precision(name) -> int:
    """Attend's ``min_precision``: None/"stored", "int8", "int4"."""
    try:
        return _PRECISIONS[name]
    except KeyError:
        raise ValueError(f"min_precision {name!r}: one of None, 'stored', 'int8', 'int4'") from None


def io_dtype(name) -> int:
    """The Attend wire dtype of queries and outputs: None/"f32", "f16",
    "bf16"."""
    try:
        return _IO_DTYPES[name]
    except KeyError:
        raise ValueError(f"io_dtype {name!r}: one of None, 'f32', 'f16', 'bf16'") from None


def pack(x, io: int) -> bytes:
    """float values as little-endian f16 or bf16 (round to nearest even)."""
    if io == pb.DTYPE_F16:
        return np.ascontiguousarray(x, dtype="<f2").tobytes()
    u = np.ascontiguousarray(x, dtype="<f4").reshape(-1).view("<u4").astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()


def unpack(b: bytes, io: int) -> "np.ndarray":
    """Little-endian f16 or bf16 values as float32."""
    if io == pb.DTYPE_F16:
        return np.frombuffer(b, dtype="<f2").astype(np.float32)
    return (np.frombuffer(b, dtype="<u2").astype("<u4") << 16).view("<f4").astype(np.float32)


def attend_request(ns, sequences, layer: int, mode, scale, budget_tokens, budget_bytes,
                   sparf_channels, sparf_tokens, retrieval_k=None,
                   retrieval_ef=None, sparf_by_token: bool = False,
                   sparf_mean_correction: bool = False,
                   sparf_joint_heads: bool = False, io=None,
                   min_precision=None) -> pb.AttendRequest:
    """The Attend request. ``sequences``: :class:`AttendSequence` s or
    ``(keys, queries[, last_block_tokens])`` tuples. ``io``: the wire
    dtype of queries and outputs (see :func:`io_dtype`)."""
    io = io_dtype(io)
    seqs = []
    for s in sequences:
        if not isinstance(s, AttendSequence):
            s = AttendSequence(*s)
        chain = {"keys": keys_list(s.keys)} if s.keys is not None else {
            "chain_tail": bytes(s.chain_tail or b""), "chain_blocks": int(s.chain_blocks)}
        if io in (pb.DTYPE_F16, pb.DTYPE_BF16):
            q = {"queries_packed": pack(s.queries, io)}
        else:
            q = {"queries": np.ascontiguousarray(s.queries, dtype=np.float32).reshape(-1).tolist()}
        seqs.append(pb.AttendSequence(last_block_tokens=s.last_block_tokens or 0, **chain, **q))
    return pb.AttendRequest(
        namespace_id=ns_id(ns), layer=int(layer), mode=int(AttendMode.parse(mode)),
        scale=float(scale or 0.0), sequences=seqs, budget_tokens=int(budget_tokens or 0),
        budget_bytes=int(budget_bytes or 0), sparf_channels=int(sparf_channels or 0),
        sparf_tokens=int(sparf_tokens or 0), retrieval_k=int(retrieval_k or 0),
        retrieval_ef=int(retrieval_ef or 0), sparf_by_token=bool(sparf_by_token),
        sparf_mean_correction=bool(sparf_mean_correction),
        sparf_joint_heads=bool(sparf_joint_heads), io_dtype=io,
        min_precision=precision(min_precision))


def _ranges(rs) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in rs]


def attend_results(r: pb.AttendResponse, asked: int, io=None) -> list[AttendResult]:
    if len(r.results) != asked:
        raise DataLoss(f"Attend: {len(r.results)} results for {asked} sequences")
    io = io_dtype(io)
    out = []
    for x in r.results:
        heads = len(x.lse)
        if io in (pb.DTYPE_F16, pb.DTYPE_BF16):
            if len(x.o) or len(x.o_packed) % 2:
                raise DataLoss(f"Attend: {len(x.o_packed)} packed output bytes for a 2-byte dtype")
            o = unpack(x.o_packed, io)
        else:
            o = np.asarray(x.o, dtype=np.float32)
        if heads == 0 or len(o) % heads:
            raise DataLoss(f"Attend: {len(o)} outputs for {heads} heads")
        out.append(AttendResult(
            o=o.reshape(heads, len(o) // heads),
            lse=np.asarray(x.lse, dtype=np.float32),
            keys_present=x.keys_present, tokens_present=x.tokens_present,
            covered=_ranges(x.covered),
            head_covered=[_ranges(h.ranges) for h in x.head_covered],
            reads={Tier(t.tier): TierRead(Tier(t.tier), t.blocks, t.bytes) for t in x.reads},
            exact=x.exact, mean_corrected=x.mean_corrected,
            sink_included=x.sink_included, recent_included=x.recent_included,
            tokens_attended=x.tokens_attended, abstract_bytes=x.abstract_bytes,
            retrieval_source=[RetrieveSource(v) for v in x.retrieval_source],
            retrieval_scanned=list(x.retrieval_scanned),
            quantized_blocks=x.quantized_blocks, quantized_bytes=x.quantized_bytes))
    return out


# ---- retrieval indexes --------------------------------------------------------

def build_index_request(ns, keys, layers, training, wait: bool,
                        kv_heads=None) -> pb.BuildIndexRequest:
    """``training``: ``{layer: queries}`` with queries ``(m, num_q_heads,
    head_dim)`` float32. ``kv_heads``: the KV heads to index (None or
    empty: all)."""
    tq = []
    for layer, q in (training or {}).items():
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 3:
            raise InvalidArgument(f"training[{layer}]: queries must be (m, num_q_heads, head_dim)")
        tq.append(pb.LayerQueries(layer=int(layer), num_q_heads=q.shape[1],
                                  queries=q.reshape(-1).tolist()))
    return pb.BuildIndexRequest(namespace_id=ns_id(ns), keys=keys_list(keys),
                                layers=[int(x) for x in (layers or [])], training_queries=tq,
                                wait=bool(wait), kv_heads=[int(x) for x in (kv_heads or [])])


def build_index_result(r: pb.BuildIndexResponse) -> BuildIndexResult:
    return BuildIndexResult(
        keys_covered=r.keys_covered, tokens_covered=r.tokens_covered,
        indexes=[IndexStatus(layer=i.layer, kv_head=i.kv_head, state=IndexState(i.state),
                             progress=i.progress, tokens=i.tokens,
                             inserted_tokens=i.inserted_tokens, memory_bytes=i.memory_bytes,
                             default_ef=i.default_ef, error=i.error) for i in r.indexes])


def retrieve_request(ns, keys, layer: int, queries, k, ef) -> pb.RetrieveRequest:
    q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1)
    return pb.RetrieveRequest(namespace_id=ns_id(ns), keys=keys_list(keys), layer=int(layer),
                              queries=q.tolist(), k=int(k or 0), ef=int(ef or 0))


def retrieve_result(r: pb.RetrieveResponse) -> RetrieveResult:
    heads = []
    for h in r.heads:
        if len(h.positions) != len(h.scores):
            raise DataLoss(f"Retrieve: {len(h.positions)} positions with {len(h.scores)} scores")
        heads.append(HeadHits(positions=np.asarray(h.positions, dtype=np.int64),
                              scores=np.asarray(h.scores, dtype=np.float32),
                              scanned=h.scanned, source=RetrieveSource(h.source)))
    return RetrieveResult(heads=heads, keys_present=r.keys_present,
                          tokens_present=r.tokens_present, inserted_tokens=r.inserted_tokens)
