"""Hooks for an external KV store, in vLLM KV-connector call order.

Per engine step the engine calls, in this order:

1. for each waiting request it admits (FIFO, once per request):
   ``lookup(request) -> int`` -- how many leading prompt tokens the store can
   provide (a multiple of ``block_size``; the engine clamps it so that at
   least the block holding the last prompt token is computed), then, after
   allocating the request's blocks and only if the clamped count is > 0,
   ``load(request, block_ids, kv_cache) -> set[int] | None`` where
   ``block_ids == request.block_ids[:n // block_size]`` (logical blocks
   0, 1, ...). ``load`` fills those blocks (e.g. with ``kv_cache.write_block``)
   and returns the ids that failed (``None``/empty = all loaded). The engine
   then recomputes from the first failed block on (later blocks too).
2. ``on_forward_start(batch)``; then for each layer ``l``:
   ``on_layer_start(l, batch)`` before the layer reads or writes its KV
   (vLLM: ``wait_for_layer_load``) and ``after_layer(l, batch)`` once every
   scheduled token's K/V of layer ``l`` is in the cache (vLLM:
   ``save_kv_layer``); then ``on_forward_end(batch)`` (vLLM: ``wait_for_save``).
3. after the forward, for each request that completed full blocks it computed
   itself: ``save(request, block_ids, kv_cache, start_block)`` with
   ``block_ids == request.block_ids[start_block:start_block + len(block_ids)]``
   and hashes ``request.block_hashes[start_block:...]``. Blocks that were
   loaded successfully are never passed to ``save``.
4. when a request finishes: ``finished(request)``; its blocks are freed right
   after it returns.

Everything is synchronous and single-threaded. ``kv_cache`` is the engine's
:class:`~tinyengine.kv_cache.PagedKVCache` (``kv_cache[layer]`` is the
layer's array in the engine's layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .engine import Request
    from .kv_cache import PagedKVCache


@dataclass
class ScheduledChunk:
    """Tokens ``[start, end)`` of ``request`` computed in this forward. Prefill
    chunks never cross a block boundary; a decode chunk is one token."""

    request: Request
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class ForwardBatch:
    chunks: list[ScheduledChunk]
    kv_cache: PagedKVCache
    step: int = 0

    @property
    def requests(self) -> list[Request]:
        seen: dict[str, Request] = {}
        for c in self.chunks:
            seen.setdefault(c.request.request_id, c.request)
        return list(seen.values())


class KVHooks:
    """Base class with no-op defaults; subclass and override what you need."""

    def lookup(self, request: Request) -> int:
        return 0

    def load(self, request: Request, block_ids: list[int], kv_cache: PagedKVCache) -> set[int] | None:
        return None

    def on_forward_start(self, batch: ForwardBatch) -> None:
        pass

    def on_layer_start(self, layer: int, batch: ForwardBatch) -> None:
        pass

    def after_layer(self, layer: int, batch: ForwardBatch) -> None:
        pass

    def on_forward_end(self, batch: ForwardBatch) -> None:
        pass

    def save(self, request: Request, block_ids: list[int], kv_cache: PagedKVCache, start_block: int) -> None:
        pass

    def finished(self, request: Request) -> None:
        pass


class NoopHooks(KVHooks):
    """The default: no external store."""


@dataclass
class InMemoryKVStore(KVHooks):
    """Reference store: a dict from block hash to that block's KV for all
    layers, ``(num_layers, 2, block_size, kv_heads, head_dim)`` (canonical, so
    engines with different layouts can share one store).

    ``fail_loads`` makes ``load`` report the blocks at those logical indices
    as failed (and scribble garbage into them, to prove the engine recomputes).
    ``events`` records every call as a tuple, for call-order tests.
    """

    blocks: dict[bytes, np.ndarray] = field(default_factory=dict)
    fail_loads: set[int] = field(default_factory=set)
    events: list[tuple] = field(default_factory=list)
    record_layers: bool = False

    def lookup(self, request: Request) -> int:
        n = 0
        for h in request.block_hashes:
            if h not in self.blocks:
                break
            n += 1
        self.events.append(("lookup", request.request_id, n))
        return n * request.block_size

    def load(self, request: Request, block_ids: list[int], kv_cache: PagedKVCache) -> set[int]:
        failed = set()
        for i, bid in enumerate(block_ids):
            if i in self.fail_loads:
                failed.add(bid)
                for layer in range(len(kv_cache)):
                    kv_cache.write_block(layer, bid, np.full(kv_cache.block_shape, 7.0, kv_cache.dtype))
                continue
            data = self.blocks[request.block_hashes[i]]
            for layer in range(len(kv_cache)):
                kv_cache.write_block(layer, bid, data[layer])
        self.events.append(("load", request.request_id, list(block_ids), sorted(failed)))
        return failed

    def on_forward_start(self, batch: ForwardBatch) -> None:
        if self.record_layers:
            self.events.append(("forward_start", batch.step))

    def on_layer_start(self, layer: int, batch: ForwardBatch) -> None:
        if self.record_layers:
            self.events.append(("layer_start", layer))

    def after_layer(self, layer: int, batch: ForwardBatch) -> None:
        if self.record_layers:
            self.events.append(("after_layer", layer))

    def on_forward_end(self, batch: ForwardBatch) -> None:
        if self.record_layers:
            self.events.append(("forward_end", batch.step))

    def save(self, request: Request, block_ids: list[int], kv_cache: PagedKVCache, start_block: int) -> None:
        hashes = request.block_hashes
        for j, bid in enumerate(block_ids):
            h = hashes[start_block + j]
            if h not in self.blocks:
                self.blocks[h] = np.stack([kv_cache.read_block(l, bid) for l in range(len(kv_cache))])
        self.events.append(("save", request.request_id, start_block, list(block_ids)))

    def finished(self, request: Request) -> None:
        self.events.append(("finished", request.request_id))

    def event_names(self, request_id: str | None = None) -> list[str]:
        return [e[0] for e in self.events if request_id is None or (len(e) > 1 and e[1] == request_id)]


