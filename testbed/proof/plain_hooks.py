"""The plain-client path: tinyengine's KV hooks implemented straight on
:class:`~strata.integrations.link.StoreLink` (what an engine without a
connector framework would write). Keys are the engine's own chained block
hashes (32-byte SHA-256 digests), parents the previous block's hash; the
payload is Strata's layer-major block ``(layers, 2, 16, heads, dim)``.
"""

from __future__ import annotations

import numpy as np
import tinyengine as te

from strata import Layout
from strata.integrations.link import StoreLink


class StrataHooks(te.KVHooks):
    """``Engine(model, ..., hooks=StrataHooks(link))``. The link's layout
    must describe the engine's cache; :meth:`check` refuses one that does
    not (before anything is loaded into it)."""

    def __init__(self, link: StoreLink):
        self.link = link
        self.lookups: list[tuple[str, int]] = []
        self.loaded: list[tuple[str, int]] = []

    @staticmethod
    def check(layout: Layout, kv_cache) -> None:
        two, block, heads, dim = kv_cache.block_shape
        want = (len(kv_cache), two, block, heads, dim)
        if layout.block_shape() != want or np.dtype(kv_cache.dtype) != np.float16 or layout.dtype.name != "F16":
            raise ValueError(f"layout {layout.block_shape()} {layout.dtype.name} does not describe this "
                             f"engine's cache {want} {np.dtype(kv_cache.dtype)}; refusing to load or save")

    def lookup(self, request) -> int:
        hits, _ = self.link.lookup(request.block_hashes)
        self.lookups.append((request.request_id, hits))
        return hits * request.block_size

    def load(self, request, block_ids, kv_cache):
        self.check(self.link.layout, kv_cache)
        shape = self.link.layout.block_shape()

        def sink(i, view):
            kv = view.view(np.float16).reshape(shape)
            for layer in range(shape[0]):
                kv_cache.write_block(layer, block_ids[i], kv[layer])

        n = self.link.load(request.block_hashes[:len(block_ids)], sink)
        self.loaded.append((request.request_id, n))
        return set(block_ids[n:])

    def save(self, request, block_ids, kv_cache, start_block):
        self.check(self.link.layout, kv_cache)
        shape = self.link.layout.block_shape()
        hashes = request.block_hashes
        keys = hashes[start_block:start_block + len(block_ids)]
        parents = [hashes[start_block + j - 1] if start_block + j else None for j in range(len(keys))]

        def fill(i, out):
            kv = out.view(np.float16).reshape(shape)
            for layer in range(shape[0]):
                kv[layer] = kv_cache.read_block(layer, block_ids[i])

        self.link.save(keys, parents, fill)
