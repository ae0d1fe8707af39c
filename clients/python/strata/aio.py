"""The asyncio client: the same API as :class:`strata.Client`, awaitable.

Create it inside a running event loop (grpc.aio binds the channel to it).
"""

from __future__ import annotations

from typing import Iterable

import grpc
import grpc.aio

from . import _wire
from .auth import Credentials, aio_channel
from .errors import Unavailable, from_rpc
from .types import (AttendResult, Block, BuildIndexResult, DeleteResult, Layout, Lease,
                    LookupResult, Namespace, PutOutcome, RetrieveResult, StoredBlock)
from .v1 import strata_pb2 as pb
from .v1 import strata_pb2_grpc as pb_grpc
from .client import DEFAULT_ENDPOINT


class AsyncClient:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout_s: float | None = 30.0,
                 credentials: Credentials | None = None):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.credentials = credentials
        self._metadata = credentials.metadata() if credentials else ()
        self._channel = aio_channel(endpoint, credentials)
        self._stub = pb_grpc.StrataStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, fn, *args, **kw):
        try:
            return await fn(*args, timeout=self.timeout_s, metadata=self._metadata, **kw)
        except grpc.RpcError as e:
            raise from_rpc(e) from None

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        import asyncio
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout_s)
        except asyncio.TimeoutError:
            raise Unavailable(f"stratad at {self.endpoint} not reachable within {timeout_s} s") from None

    async def register_layout(self, layout: Layout) -> Namespace:
        r = await self._call(self._stub.RegisterLayout, pb.RegisterLayoutRequest(layout=_wire.layout_pb(layout)))
        return _wire.namespace(layout, r)

    async def lookup(self, ns: "Namespace | int", keys: Iterable[bytes], lease_ttl_ms: int = 0) -> LookupResult:
        nid = _wire.ns_id(ns)
        r = await self._call(self._stub.Lookup, pb.LookupRequest(
            namespace_id=nid, keys=_wire.keys_list(keys), lease_ttl_ms=lease_ttl_ms))
        return _wire.lookup_result(nid, r)

    async def put(self, ns: "Namespace | int", blocks: Iterable[Block]) -> list[PutOutcome]:
        msgs = list(_wire.put_messages(_wire.ns_id(ns), blocks))
        return _wire.put_outcomes(await self._call(self._stub.Put, iter(msgs)))

    async def get(self, ns: "Namespace | int", keys: Iterable[bytes], lease: Lease | None = None) -> list[StoredBlock]:
        req = pb.GetRequest(namespace_id=_wire.ns_id(ns), keys=_wire.keys_list(keys),
                            lease_id=lease.id if lease else 0)
        asm = _wire.GetAssembler()
        try:
            async for m in self._stub.Get(req, timeout=self.timeout_s, metadata=self._metadata):
                asm.feed(m)
        except grpc.RpcError as e:
            raise from_rpc(e) from None
        return asm.finish()

    async def release(self, lease: Lease) -> int:
        r = await self._call(self._stub.Release, pb.ReleaseRequest(lease_id=lease.id, namespace_id=lease.namespace))
        return r.released_blocks

    async def delete(self, ns: "Namespace | int", keys: Iterable[bytes]) -> DeleteResult:
        r = await self._call(self._stub.Delete, pb.DeleteRequest(namespace_id=_wire.ns_id(ns), keys=_wire.keys_list(keys)))
        return _wire.delete_result(r)

    async def subscribe(self, namespaces=None, after_seq: int = 0, snapshot: bool = False,
                        max_batch: int = 0):
        """Async iterator of :class:`~strata.types.EventBatch` es."""
        call = self._stub.Subscribe(_wire.subscribe_request(namespaces, after_seq, snapshot, max_batch),
                                    metadata=self._metadata)
        try:
            async for b in call:
                yield _wire.event_batch(b)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise from_rpc(e) from None
        finally:
            call.cancel()

    async def stats(self, per_namespace: bool = False) -> pb.StatsResponse:
        return await self._call(self._stub.Stats, pb.StatsRequest(per_namespace=per_namespace))

    async def attend(self, ns: "Namespace | int", sequences, layer: int, mode="dense", *,
                     scale: float | None = None, budget_tokens: int | None = None,
                     budget_bytes: int | None = None, sparf_channels: int | None = None,
                     sparf_tokens: int | None = None, retrieval_k: int | None = None,
                     retrieval_ef: int | None = None, sparf_by_token: bool = False,
                     sparf_mean_correction: bool = False,
                     sparf_joint_heads: bool = False,
                     io_dtype: str | None = None,
                     min_precision: str | None = None) -> list[AttendResult]:
        """See :meth:`strata.Client.attend`."""
        seqs = list(sequences)
        req = _wire.attend_request(ns, seqs, layer, mode, scale, budget_tokens, budget_bytes,
                                   sparf_channels, sparf_tokens, retrieval_k, retrieval_ef,
                                   sparf_by_token, sparf_mean_correction, sparf_joint_heads,
                                   io_dtype, min_precision)
        return _wire.attend_results(await self._call(self._stub.Attend, req), len(seqs), io_dtype)

    async def build_index(self, ns: "Namespace | int", keys, layers=None, *, training=None,
                          wait: bool = False, kv_heads=None) -> BuildIndexResult:
        """See :meth:`strata.Client.build_index`."""
        req = _wire.build_index_request(ns, keys, layers, training, wait, kv_heads)
        return _wire.build_index_result(await self._call(self._stub.BuildIndex, req))

    async def retrieve(self, ns: "Namespace | int", keys, layer: int, queries, *,
                       k: int | None = None, ef: int | None = None) -> RetrieveResult:
        """See :meth:`strata.Client.retrieve`."""
        req = _wire.retrieve_request(ns, keys, layer, queries, k, ef)
        return _wire.retrieve_result(await self._call(self._stub.Retrieve, req))
