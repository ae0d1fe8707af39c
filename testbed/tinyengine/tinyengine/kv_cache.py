"""Paged KV cache: per-layer numpy arrays in vLLM / FlashInfer layouts, and a block allocator.

Layouts (per layer, one array each; ``block_size`` tokens per block):

- ``KVLayout.FLASH_ATTN`` (vLLM FlashAttention backend):
  ``(2, num_blocks, block_size, num_kv_heads, head_dim)`` -- index 0 of the
  first axis is K, 1 is V.
- ``KVLayout.FLASHINFER`` (vLLM FlashInfer backend / SGLang-style paged):
  ``(num_blocks, 2, block_size, num_kv_heads, head_dim)``.

Either way one block of one layer is, logically, a ``(2, block_size,
num_kv_heads, head_dim)`` array (K then V); :meth:`PagedKVCache.read_block`
and :meth:`PagedKVCache.write_block` move blocks in that canonical form, so a
KV store can be layout-agnostic. In FLASHINFER layout the block is one
contiguous run of bytes; in FLASH_ATTN layout it is two runs (K and V).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from enum import Enum

import numpy as np


class KVLayout(str, Enum):
    FLASH_ATTN = "flash_attn"
    FLASHINFER = "flashinfer"


def kv_cache_shape(
    layout: KVLayout | str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, ...]:
    layout = KVLayout(layout)
    if layout is KVLayout.FLASH_ATTN:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)
    return (num_blocks, 2, block_size, num_kv_heads, head_dim)


class PagedKVCache(Sequence[np.ndarray]):
    """The engine's KV cache: a sequence of per-layer arrays (``cache[layer]``)
    plus layout-aware helpers. Zero-initialised, so unwritten slots are finite."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        layout: KVLayout | str = KVLayout.FLASH_ATTN,
        dtype: np.dtype | type = np.float16,
    ) -> None:
        self.layout = KVLayout(layout)
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = np.dtype(dtype)
        shape = kv_cache_shape(self.layout, num_blocks, block_size, num_kv_heads, head_dim)
        self.layers: list[np.ndarray] = [np.zeros(shape, dtype=self.dtype) for _ in range(num_layers)]
        if self.layout is KVLayout.FLASH_ATTN:
            self._k = [a[0] for a in self.layers]
            self._v = [a[1] for a in self.layers]
        else:
            self._k = [a[:, 0] for a in self.layers]
            self._v = [a[:, 1] for a in self.layers]

    # Sequence protocol: cache[layer] -> that layer's array, in the engine's layout.
    def __getitem__(self, layer):  # type: ignore[override]
        return self.layers[layer]

    def __len__(self) -> int:
        return self.num_layers

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """Canonical shape of one block of one layer: ``(2, block_size, kv_heads, head_dim)``."""
        return (2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of one layer."""
        return int(np.prod(self.block_shape)) * self.dtype.itemsize

    def key_cache(self, layer: int) -> np.ndarray:
        """View ``(num_blocks, block_size, kv_heads, head_dim)`` of layer's K."""
        return self._k[layer]

    def value_cache(self, layer: int) -> np.ndarray:
        return self._v[layer]

    def read_block(self, layer: int, block_id: int) -> np.ndarray:
        """Copy of one block, canonical ``(2, block_size, kv_heads, head_dim)``."""
        if self.layout is KVLayout.FLASHINFER:
            return self.layers[layer][block_id].copy()
        return self.layers[layer][:, block_id].copy()

    def write_block(self, layer: int, block_id: int, data: np.ndarray) -> None:
        """Overwrite one block from a canonical ``(2, block_size, kv_heads, head_dim)`` array."""
        data = np.asarray(data)
        if data.shape != self.block_shape or data.dtype != self.dtype:
            raise ValueError(f"block must be {self.block_shape} {self.dtype}, got {data.shape} {data.dtype}")
        if self.layout is KVLayout.FLASHINFER:
            self.layers[layer][block_id] = data
        else:
            self.layers[layer][:, block_id] = data

    def write_tokens(
        self, layer: int, block_table: Sequence[int], start: int, k: np.ndarray, v: np.ndarray
    ) -> None:
        """Store K/V ``(T, kv_heads, head_dim)`` for positions ``start..start+T`` (cast to the cache dtype)."""
        bs = self.block_size
        pos = np.arange(start, start + k.shape[0])
        blocks = np.asarray(block_table, dtype=np.int64)[pos // bs]
        offs = pos % bs
        self._k[layer][blocks, offs] = k
        self._v[layer][blocks, offs] = v

    def gather(
        self, layer: int, block_table: Sequence[int], num_pages: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """K and V of the first ``num_pages`` blocks of a sequence as float32
        ``(num_pages * block_size, kv_heads, head_dim)``."""
        ids = np.asarray(block_table[:num_pages], dtype=np.int64)
        n = num_pages * self.block_size
        k = self._k[layer][ids].reshape(n, self.num_kv_heads, self.head_dim).astype(np.float32)
        v = self._v[layer][ids].reshape(n, self.num_kv_heads, self.head_dim).astype(np.float32)
        return k, v


class BlockAllocator:
    """Free list of block ids. ``allocate`` hands out the lowest-numbered
    never-used blocks first, then recycled ones in the order they were freed."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"need {n} KV blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, block_ids: Iterable[int]) -> None:
        for b in block_ids:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated")
            self._used.remove(b)
            self._free.append(b)
