"""The synchronous client: the whole gRPC API over TCP or a Unix socket.

Thread-safe (one gRPC channel, shared). Every received block is verified
against its checksum before it is returned; every failure is a typed
:class:`~strata.errors.StrataError`.
"""

from __future__ import annotations

from typing import Iterable

import grpc

from . import _wire
from .auth import Credentials, channel
from .errors import StrataError, from_rpc
from .types import (AttendResult, Block, BuildIndexResult, DeleteResult, Layout, Lease,
                    LookupResult, Namespace, PutOutcome, RetrieveResult, StoredBlock)
from .v1 import strata_pb2 as pb
from .v1 import strata_pb2_grpc as pb_grpc

DEFAULT_ENDPOINT = "http://127.0.0.1:7470"


class Client:
    """``Client("unix:/run/strata/stratad.sock")``,
    ``Client("http://127.0.0.1:7470")`` or, for a daemon that authenticates
    TCP clients, ``Client("https://node:7470", credentials=Credentials(...))``
    (:mod:`strata.auth`: a bearer token, TLS, a client certificate).
    ``timeout_s`` bounds every call (None: no deadline)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout_s: float | None = 30.0,
                 credentials: Credentials | None = None):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.credentials = credentials
        self._metadata = credentials.metadata() if credentials else ()
        self._channel = channel(endpoint, credentials)
        self._stub = pb_grpc.StrataStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, timeout=self.timeout_s, metadata=self._metadata, **kw)
        except grpc.RpcError as e:
            raise from_rpc(e) from None

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Blocks until the channel is connected (raises Unavailable)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            from .errors import Unavailable
            raise Unavailable(f"stratad at {self.endpoint} not reachable within {timeout_s} s") from None

    def register_layout(self, layout: Layout) -> Namespace:
        r = self._call(self._stub.RegisterLayout, pb.RegisterLayoutRequest(layout=_wire.layout_pb(layout)))
        return _wire.namespace(layout, r)

    def lookup(self, ns: "Namespace | int", keys: Iterable[bytes], lease_ttl_ms: int = 0) -> LookupResult:
        """Length of the leading run of ``keys`` present; with a TTL the hits
        are pinned under a lease until :meth:`release` or expiry."""
        nid = _wire.ns_id(ns)
        r = self._call(self._stub.Lookup, pb.LookupRequest(
            namespace_id=nid, keys=_wire.keys_list(keys), lease_ttl_ms=lease_ttl_ms))
        return _wire.lookup_result(nid, r)

    def put(self, ns: "Namespace | int", blocks: Iterable[Block]) -> list[PutOutcome]:
        """Stores blocks (checksummed here, verified by the daemon before they
        become visible). Present keys with equal bytes are ALREADY_PRESENT."""
        return _wire.put_outcomes(self._call(self._stub.Put, _wire.put_messages(_wire.ns_id(ns), blocks)))

    def get(self, ns: "Namespace | int", keys: Iterable[bytes], lease: Lease | None = None) -> list[StoredBlock]:
        """The blocks of ``keys``, verified on arrival. A missing key is
        NotFound (take a lease with :meth:`lookup` to be sure they stay)."""
        req = pb.GetRequest(namespace_id=_wire.ns_id(ns), keys=_wire.keys_list(keys),
                            lease_id=lease.id if lease else 0)
        asm = _wire.GetAssembler()
        try:
            for m in self._stub.Get(req, timeout=self.timeout_s, metadata=self._metadata):
                asm.feed(m)
        except grpc.RpcError as e:
            raise from_rpc(e) from None
        return asm.finish()

    def release(self, lease: Lease) -> int:
        r = self._call(self._stub.Release, pb.ReleaseRequest(lease_id=lease.id, namespace_id=lease.namespace))
        return r.released_blocks

    def delete(self, ns: "Namespace | int", keys: Iterable[bytes]) -> DeleteResult:
        r = self._call(self._stub.Delete, pb.DeleteRequest(namespace_id=_wire.ns_id(ns), keys=_wire.keys_list(keys)))
        return _wire.delete_result(r)

    def subscribe(self, namespaces=None, after_seq: int = 0, snapshot: bool = False,
                  max_batch: int = 0):
        """KV events as :class:`~strata.types.EventBatch` es, until the
        daemon stops or ``close()`` is called on the returned iterator. See
        :class:`strata.events.EventFeed` for a feed that resyncs itself."""
        call = self._stub.Subscribe(_wire.subscribe_request(namespaces, after_seq, snapshot, max_batch),
                                    metadata=self._metadata)
        return _Subscription(call)

    def stats(self, per_namespace: bool = False) -> pb.StatsResponse:
        """Occupancy and counters per tier, the caller's tenant and its
        usage and quotas (the protobuf message); ``per_namespace`` adds the
        caller's namespaces."""
        return self._call(self._stub.Stats, pb.StatsRequest(per_namespace=per_namespace))

    def attend(self, ns: "Namespace | int", sequences, layer: int, mode="dense", *,
               scale: float | None = None, budget_tokens: int | None = None,
               budget_bytes: int | None = None, sparf_channels: int | None = None,
               sparf_tokens: int | None = None, retrieval_k: int | None = None,
               retrieval_ef: int | None = None, sparf_by_token: bool = False,
               sparf_mean_correction: bool = False,
               sparf_joint_heads: bool = False,
               io_dtype: str | None = None,
               min_precision: str | None = None) -> list[AttendResult]:
        """Attention near the data: for one ``layer`` and each sequence (an
        :class:`~strata.types.AttendSequence`, or ``(keys, queries[,
        last_block_tokens])`` with queries ``(heads, head_dim)``), the
        daemon's partial ``(o, lse)`` over the present prefix of its chain.
        ``mode``: ``"dense"`` (exact), ``"sparse"`` (``budget_tokens`` or
        ``budget_bytes``, default 5% of the tokens), ``"sparf"``
        (``sparf_channels`` r, ``sparf_tokens`` k; whole blocks by default,
        the top-k single tokens with ``sparf_by_token``;
        ``sparf_mean_correction``: SparQ's mean-value correction, see
        :attr:`~strata.types.AttendResult.mean_corrected`;
        ``sparf_joint_heads``: one choice for the layer across KV heads,
        so that the blocks read are k tokens' worth whatever the number
        of KV heads, at some cost in each head's own mass) or
        ``"retrieval"`` (the chain's retrieval index: ``retrieval_k`` per
        query head, default 100, candidate list ``retrieval_ef``). Merge
        each answer with the engine's own part with
        :meth:`~strata.types.AttendResult.merged` (or
        :func:`strata.merge.merge`); a mean-corrected answer is not a
        partial and is never merged. ``io_dtype``: ``"f16"`` or ``"bf16"``
        sends the queries and gets ``o`` back in that dtype, half the
        bytes each way (``o`` is returned as float32 all the same; ``lse``
        is always float32); None: float32. A sequence may name its chain
        by its tail (:meth:`~strata.types.AttendSequence.tail`).
        ``min_precision``: ``"int8"`` or ``"int4"`` lets the daemon compute
        on its int8 (int4) copies of layers it holds only on NVMe instead
        of reading the device (``compute.quant_bytes``; see
        :attr:`~strata.types.AttendResult.quantized_blocks`); None or
        ``"stored"``: the stored K and V only."""
        seqs = list(sequences)
        req = _wire.attend_request(ns, seqs, layer, mode, scale, budget_tokens, budget_bytes,
                                   sparf_channels, sparf_tokens, retrieval_k, retrieval_ef,
                                   sparf_by_token, sparf_mean_correction, sparf_joint_heads,
                                   io_dtype, min_precision)
        return _wire.attend_results(self._call(self._stub.Attend, req), len(seqs), io_dtype)

    def build_index(self, ns: "Namespace | int", keys: Iterable[bytes], layers=None, *,
                    training=None, wait: bool = False, kv_heads=None) -> BuildIndexResult:
        """Starts (or reports) the retrieval indexes of the present prefix of
        the chain ``keys`` for ``layers`` (None: all). ``training``:
        ``{layer: queries (m, num_q_heads, head_dim)}``, the prefill's
        queries. ``wait``: answer once each index is ready or failed.
        ``kv_heads``: the KV heads to index (None: all); query heads of the
        others are answered by an exact scan (``EXACT_NO_INDEX``)."""
        req = _wire.build_index_request(ns, keys, layers, training, wait, kv_heads)
        return _wire.build_index_result(self._call(self._stub.BuildIndex, req))

    def retrieve(self, ns: "Namespace | int", keys: Iterable[bytes], layer: int, queries, *,
                 k: int | None = None, ef: int | None = None) -> RetrieveResult:
        """Top-``k`` (default 100) token positions per query head by raw
        q.k over the chain's present prefix, from its index when ready, else
        an exact scan (each head's ``source`` says which and why).
        ``queries``: ``(num_q_heads, head_dim)``."""
        req = _wire.retrieve_request(ns, keys, layer, queries, k, ef)
        return _wire.retrieve_result(self._call(self._stub.Retrieve, req))


class _Subscription:
    """Iterator over a Subscribe stream; ``close()`` cancels it."""

    def __init__(self, call):
        self._call = call

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return _wire.event_batch(next(self._call))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc(e) from None

    def close(self) -> None:
        self._call.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Client", "StrataError", "DEFAULT_ENDPOINT"]
