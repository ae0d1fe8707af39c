"""Drives the SGLang HiCache backend from tinyengine the way SGLang does.

- :class:`MHAHostPool` / :class:`MLAHostPool`: numpy stand-ins for SGLang
  v0.5.21's ``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost``: the same
  field names (``page_size``, ``layout``, ``dtype``, ``size``, ``page_num``,
  ``layer_num``, ``head_num``, ``head_dim`` / ``kv_cache_dim``,
  ``start_layer``, ``end_layer``, ``kv_buffer``, ``token_stride_size``,
  ``layout_dim``), ``kv_buffer`` dims per layout, ``get_page_buffer_meta``,
  the flat-page methods and the allocator, as in ``pool_host/{mha,mla}.py``.
  The pool is sized in pages directly (SGLang adds one page to a size given
  in tokens). ``kv_page`` / ``latent_page`` (not SGLang API) stand in for
  SGLang's device<->host transfer kernels.
- :class:`HiCacheHooks`: tinyengine KV hooks doing what SGLang's
  ``HybridCacheController`` does with a storage backend, on real threads:
  at admission the prompt's page hashes go to a **prefetch** thread, which
  asks ``batch_exists``, allocates host pages for the hit and hands them to
  the **prefetch-IO** thread, which calls
  ``batch_get_v1`` (or the legacy ``batch_get``) in batches of at most 128
  pages and stops at the first False; admission waits for it (SGLang's
  ``wait_complete`` prefetch policy), then the engine copies those host
  pages into its device blocks (``load``). Computed blocks are copied into
  host pages (``save``) and a **backup** thread stores them with
  ``batch_set_v1`` (or ``batch_set``). Any exception or wrong return type
  from the backend is recorded in ``errors`` (in SGLang it would kill that
  thread and switch storage off).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import tinyengine as te

from strata.integrations.sglang import HiCacheStorageExtraInfo

STORAGE_BATCH_SIZE = 128


def sglang_page_hashes(tokens, page_size: int = 16) -> list[str]:
    """SGLang's page keys: ``sha256(previous page's raw digest ‖ page
    tokens as uint32 LE)`` in hex, for full pages only (unseeded: no
    ``extra_key``/``cache_salt``)."""
    out, prev = [], b""
    for s in range(0, len(tokens) - page_size + 1, page_size):
        h = hashlib.sha256(prev + np.asarray(tokens[s:s + page_size], dtype="<u4").tobytes())
        prev = h.digest()
        out.append(h.hexdigest())
    return out


class _HostPool:
    """What SGLang's ``HostKVCache`` base adds: the page allocator."""

    def _init_common(self, page_size, pages, layout, dtype, layer_num):
        self.page_size = page_size
        self.layout = layout
        self.dtype = np.dtype(dtype)
        self.layer_num = layer_num
        self.start_layer, self.end_layer = 0, layer_num
        self.page_num = pages
        self.size = pages * page_size
        self.size_per_token = self.get_size_per_token()
        self.kv_buffer = self.init_kv_buffer()
        self.lock = threading.RLock()
        self.clear()

    def clear(self):
        with self.lock:
            self.free_slots = np.arange(self.size, dtype=np.int64)

    def available_size(self):
        return len(self.free_slots)

    def alloc(self, need_size: int):
        assert need_size % self.page_size == 0, "The requested size should be a multiple of the page size."
        with self.lock:
            if need_size > self.available_size():
                return None
            select, self.free_slots = self.free_slots[:need_size], self.free_slots[need_size:]
            return select

    def free(self, indices) -> int:
        with self.lock:
            self.free_slots = np.concatenate([self.free_slots, np.asarray(indices, dtype=np.int64)])
            return len(indices)


class MHAHostPool(_HostPool):
    """``MHAHostPool(layer_num=30, head_num=3, head_dim=64, layout="page_first")``."""

    def __init__(self, layer_num: int, head_num: int, head_dim: int, page_size: int = 16,
                 pages: int = 64, layout: str = "page_first", dtype=np.float16):
        self.head_num, self.head_dim = head_num, head_dim
        self._init_common(page_size, pages, layout, dtype, layer_num)

    def get_size_per_token(self):
        return self.head_dim * self.head_num * self.layer_num * self.dtype.itemsize * 2

    def get_ksize_per_token(self):
        return self.get_size_per_token() // 2

    def init_kv_buffer(self):
        if self.layout == "layer_first":
            dims = (2, self.layer_num, self.size, self.head_num, self.head_dim)
        elif self.layout == "page_first":
            dims = (2, self.size, self.layer_num, self.head_num, self.head_dim)
        elif self.layout == "page_first_direct":
            dims = (2, self.page_num, self.layer_num, self.page_size, self.head_num, self.head_dim)
        elif self.layout == "page_head":
            dims = (2, self.page_num, self.head_num, self.page_size, self.layer_num, self.head_dim)
        else:
            raise ValueError(f"Unsupported layout: {self.layout}")
        self.token_stride_size = self.head_num * self.head_dim * self.dtype.itemsize
        self.layout_dim = self.token_stride_size * self.layer_num
        return np.zeros(dims, dtype=self.dtype)

    @property
    def k_buffer(self):
        return self.kv_buffer[0]

    @property
    def v_buffer(self):
        return self.kv_buffer[1]

    def get_data_page(self, index, flat: bool = True):
        if self.layout == "layer_first":
            page = self.kv_buffer[:, :, index:index + self.page_size]
        elif self.layout == "page_first":
            page = self.kv_buffer[:, index:index + self.page_size]
        else:
            real = index // self.page_size
            page = self.kv_buffer[:, real:real + 1]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self):
        return np.zeros((2, self.layer_num, self.page_size, self.head_num, self.head_dim),
                        dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page) -> None:
        L, ps, H, D = self.layer_num, self.page_size, self.head_num, self.head_dim
        if self.layout == "layer_first":
            self.kv_buffer[:, :, index:index + ps] = data_page.reshape(2, L, ps, H, D)
        elif self.layout == "page_first":
            self.kv_buffer[:, index:index + ps] = data_page.reshape(2, ps, L, H, D)
        elif self.layout == "page_first_direct":
            real = index // ps
            self.kv_buffer[:, real:real + 1] = data_page.reshape(2, 1, L, ps, H, D)
        elif self.layout == "page_head":
            real = index // ps
            self.kv_buffer[:, real:real + 1] = data_page.reshape(2, 1, H, ps, L, D)
        else:
            raise ValueError(f"Unsupported layout: {self.layout}")

    def get_page_buffer_meta(self, indices):
        """(pointers, sizes) for zero-copy I/O: K and V per page
        (page_first*, page_head) or per page per layer (layer_first)."""
        indices = list(np.asarray(indices))
        assert len(indices) % self.page_size == 0
        item = self.dtype.itemsize
        base = self.kv_buffer.ctypes.data
        v_offset = self.layer_num * self.size * self.head_num * self.head_dim * item
        ptrs = []
        if self.layout == "layer_first":
            for i in range(0, len(indices), self.page_size):
                for layer in range(self.layer_num):
                    k = (base + indices[i] * self.head_num * self.head_dim * item
                         + layer * self.size * self.head_num * self.head_dim * item)
                    ptrs += [k, k + v_offset]
            size = item * self.page_size * self.head_num * self.head_dim
        elif self.layout in ("page_first", "page_first_direct", "page_head"):
            for i in range(0, len(indices), self.page_size):
                k = base + indices[i] * self.layer_num * self.head_num * self.head_dim * item
                ptrs += [k, k + v_offset]
            size = self.layer_num * item * self.page_size * self.head_num * self.head_dim
        else:
            raise ValueError(f"Unsupported layout: {self.layout}")
        return ptrs, [size] * len(ptrs)

    def kv_page(self, index: int) -> np.ndarray:
        """The page at host index ``index`` as a writable ``(2, layer,
        page_size, head, dim)`` view (the device<->host kernels' job)."""
        ps = self.page_size
        if self.layout == "layer_first":
            return self.kv_buffer[:, :, index:index + ps]
        if self.layout == "page_first":
            return self.kv_buffer[:, index:index + ps].transpose(0, 2, 1, 3, 4)
        if self.layout == "page_first_direct":
            return self.kv_buffer[:, index // ps]
        return self.kv_buffer[:, index // ps].transpose(0, 3, 2, 1, 4)  # page_head


class MLAHostPool(_HostPool):
    """``MLAHostPool(layer_num, kv_lora_rank, qk_rope_head_dim, layout=...)``:
    one latent row of ``kv_cache_dim`` per token and layer."""

    def __init__(self, layer_num: int, kv_lora_rank: int, qk_rope_head_dim: int, page_size: int = 16,
                 pages: int = 64, layout: str = "page_first", dtype=np.float16):
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim
        self.kv_cache_dim = kv_lora_rank + qk_rope_head_dim
        self._init_common(page_size, pages, layout, dtype, layer_num)

    def get_size_per_token(self):
        return self.kv_cache_dim * self.dtype.itemsize * self.layer_num

    def init_kv_buffer(self):
        if self.layout == "layer_first":
            dims = (self.layer_num, self.size, 1, self.kv_cache_dim)
        elif self.layout == "page_first":
            dims = (self.size, self.layer_num, 1, self.kv_cache_dim)
        elif self.layout == "page_first_direct":
            dims = (self.page_num, self.layer_num, self.page_size, 1, self.kv_cache_dim)
        else:
            raise ValueError(f"Unsupported layout: {self.layout}")
        self.token_stride_size = self.kv_cache_dim * self.dtype.itemsize
        self.layout_dim = self.token_stride_size * self.layer_num
        return np.zeros(dims, dtype=self.dtype)

    def get_data_page(self, index, flat: bool = True):
        if self.layout == "layer_first":
            page = self.kv_buffer[:, index:index + self.page_size]
        elif self.layout == "page_first":
            page = self.kv_buffer[index:index + self.page_size]
        else:
            real = index // self.page_size
            page = self.kv_buffer[real:real + 1]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self):
        return np.zeros((self.layer_num, self.page_size, 1, self.kv_cache_dim), dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index: int, data_page) -> None:
        L, ps, C = self.layer_num, self.page_size, self.kv_cache_dim
        if self.layout == "layer_first":
            self.kv_buffer[:, index:index + ps] = data_page.reshape(L, ps, 1, C)
        elif self.layout == "page_first":
            self.kv_buffer[index:index + ps] = data_page.reshape(ps, L, 1, C)
        elif self.layout == "page_first_direct":
            real = index // ps
            self.kv_buffer[real:real + 1] = data_page.reshape(1, L, ps, 1, C)
        else:
            raise ValueError(f"Unsupported layout: {self.layout}")

    def get_page_buffer_meta(self, indices):
        """One pointer per page (page_first*) or per page per layer (layer_first)."""
        indices = list(np.asarray(indices))
        assert len(indices) % self.page_size == 0
        item = self.dtype.itemsize
        base = self.kv_buffer.ctypes.data
        ptrs = []
        if self.layout == "layer_first":
            for i in range(0, len(indices), self.page_size):
                for layer in range(self.layer_num):
                    ptrs.append(base + (layer * self.size + indices[i]) * self.kv_cache_dim * item)
            size = item * self.page_size * self.kv_cache_dim
        else:
            for i in range(0, len(indices), self.page_size):
                ptrs.append(base + indices[i] * self.layer_num * self.kv_cache_dim * item)
            size = self.layer_num * item * self.page_size * self.kv_cache_dim
        return ptrs, [size] * len(ptrs)

    def latent_page(self, index: int) -> np.ndarray:
        """The page at host index ``index`` as a writable ``(layer,
        page_size, kv_cache_dim)`` view."""
        ps = self.page_size
        if self.layout == "layer_first":
            return self.kv_buffer[:, index:index + ps, 0]
        if self.layout == "page_first":
            return self.kv_buffer[index:index + ps, :, 0].transpose(1, 0, 2)
        return self.kv_buffer[index // ps, :, :, 0]


@dataclass
class _Prefetch:
    request_id: str
    keys: list[str]
    hit: int = 0
    pages: int = 0
    host: np.ndarray | None = None
    abandoned: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Backup:
    request_id: str
    keys: list[str]
    host: np.ndarray
    prefix: list[str]


class HiCacheHooks(te.KVHooks):
    """``Engine(model, ..., hooks=HiCacheHooks(backend, pool))`` with the
    backend already registered on ``pool``. ``interface_v1=False`` uses
    the legacy flat-page methods. Call :meth:`flush` to wait for pending
    backups, :meth:`close` to stop the threads.

    Records: ``exists`` (request id, keys asked, hit), ``prefetched``
    (request id, pages loaded), ``backups`` (request id, first page, one
    bool per key), ``errors``."""

    def __init__(self, backend, pool, *, interface_v1: bool = True, pass_prefix_keys: bool = False,
                 prefetch_timeout_s: float = 60.0):
        self.backend, self.pool = backend, pool
        self.interface_v1 = interface_v1
        self.pass_prefix_keys = pass_prefix_keys
        self.prefetch_timeout_s = prefetch_timeout_s
        self.exists: list[tuple[str, int, int]] = []
        self.prefetched: list[tuple[str, int]] = []
        self.backups: list[tuple[str, int, list[bool]]] = []
        self.errors: list[str] = []
        self._loaded: dict[str, np.ndarray] = {}
        self._prefetch_q: queue.Queue = queue.Queue()
        self._io_q: queue.Queue = queue.Queue()
        self._backup_q: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._loop, args=(name, q, fn), name=name, daemon=True)
                         for name, q, fn in (("prefetch", self._prefetch_q, self._prefetch),
                                             ("prefetch-io", self._io_q, self._prefetch_io),
                                             ("backup", self._backup_q, self._backup))]
        for t in self._threads:
            t.start()

    # ---- threads ----------------------------------------------------------------

    def _loop(self, name, q, fn):
        while True:
            op = q.get()
            try:
                if op is None:
                    return
                fn(op)
            except BaseException as e:  # SGLang's thread would die here
                self.errors.append(f"{name} thread: {e!r}")
                if isinstance(op, _Prefetch):
                    op.done.set()
            finally:
                q.task_done()

    def _extra(self, prefix: list[str]):
        return HiCacheStorageExtraInfo(prefix_keys=list(prefix) if self.pass_prefix_keys else None)

    def _check_bools(self, what: str, res, n: int) -> list[bool]:
        if not isinstance(res, list) or len(res) != n or not all(isinstance(b, bool) for b in res):
            raise TypeError(f"{what} returned {res!r}: expected a list of {n} bools")
        return res

    def _prefetch(self, op: _Prefetch) -> None:
        hit = self.backend.batch_exists(op.keys, self._extra([]))
        if not isinstance(hit, int) or isinstance(hit, bool) or not 0 <= hit <= len(op.keys):
            raise TypeError(f"batch_exists returned {hit!r}: expected an int in [0, {len(op.keys)}]")
        self.exists.append((op.request_id, len(op.keys), hit))
        op.host = self.pool.alloc(hit * self.pool.page_size) if hit else None
        if op.host is None:
            op.done.set()
            return
        op.hit = hit
        self._io_q.put(op)

    def _prefetch_io(self, op: _Prefetch) -> None:
        ps = self.pool.page_size
        loaded = 0
        for b in range(0, op.hit, STORAGE_BATCH_SIZE):
            keys = op.keys[b:min(op.hit, b + STORAGE_BATCH_SIZE)]
            idx = op.host[b * ps:(b + len(keys)) * ps]
            if self.interface_v1:
                res = self._check_bools("batch_get_v1",
                                        self.backend.batch_get_v1(keys, idx, self._extra(op.keys[:b])), len(keys))
            else:
                pages = self.backend.batch_get(keys, [self.pool.get_dummy_flat_data_page() for _ in keys])
                if not isinstance(pages, list) or len(pages) != len(keys):
                    raise TypeError(f"batch_get returned {pages!r}: expected a list of {len(keys)}")
                res = []
                for i, page in enumerate(pages):
                    if page is None:
                        break
                    self.pool.set_from_flat_data_page(int(idx[i * ps]), page)
                    res.append(True)
                res += [False] * (len(keys) - len(res))
            ok = res.index(False) if False in res else len(res)
            loaded += ok
            if ok < len(keys):
                break
        op.pages = loaded
        self.pool.free(op.host[loaded * ps:])
        op.host = op.host[:loaded * ps]
        if op.abandoned:
            self.pool.free(op.host)
        op.done.set()

    def _backup(self, op: _Backup) -> None:
        ps = self.pool.page_size
        try:
            for b in range(0, len(op.keys), STORAGE_BATCH_SIZE):
                keys = op.keys[b:b + STORAGE_BATCH_SIZE]
                idx = op.host[b * ps:(b + len(keys)) * ps]
                if self.interface_v1:
                    res = self._check_bools("batch_set_v1", self.backend.batch_set_v1(
                        keys, idx, self._extra(op.prefix + op.keys[:b])), len(keys))
                else:
                    ok = self.backend.batch_set(keys, [self.pool.get_data_page(int(idx[i * ps])) for i in
                                                       range(len(keys))])
                    if not isinstance(ok, bool):
                        raise TypeError(f"batch_set returned {ok!r}: expected a bool")
                    res = [ok] * len(keys)
                self.backups.append((op.request_id, b, res))
                if not all(res):
                    break
        finally:
            self.pool.free(op.host)

    # ---- engine hooks -----------------------------------------------------------

    def lookup(self, request) -> int:
        ps = self.pool.page_size
        # The page holding the last prompt token is always computed (its
        # logits are needed), so it is not fetched.
        usable = (request.num_prompt_tokens - 1) // ps
        keys = sglang_page_hashes(request.prompt_token_ids, ps)[:usable]
        if not keys:
            return 0
        op = _Prefetch(request.request_id, keys)
        self._prefetch_q.put(op)
        if not op.done.wait(self.prefetch_timeout_s):
            op.abandoned = True
            self.errors.append(f"prefetch of {request.request_id} timed out")
            return 0
        self.prefetched.append((request.request_id, op.pages))
        if op.pages:
            self._loaded[request.request_id] = op.host
        return op.pages * ps

    def load(self, request, block_ids, kv_cache):
        host = self._loaded.pop(request.request_id)
        ps = self.pool.page_size
        for i, bid in enumerate(block_ids):
            page = self.pool.kv_page(int(host[i * ps]))
            for layer in range(len(kv_cache)):
                kv_cache.write_block(layer, bid, page[:, layer])
        self.pool.free(host)
        return set()

    def save(self, request, block_ids, kv_cache, start_block):
        ps = self.pool.page_size
        hashes = sglang_page_hashes(request.all_token_ids, ps)
        keys = hashes[start_block:start_block + len(block_ids)]
        host = self.pool.alloc(len(keys) * ps)
        if host is None:
            self.errors.append(f"host pool full: backup of {request.request_id} skipped")
            return
        for i, bid in enumerate(block_ids):
            page = self.pool.kv_page(int(host[i * ps]))
            for layer in range(len(kv_cache)):
                page[:, layer] = kv_cache.read_block(layer, bid)
        self._backup_q.put(_Backup(request.request_id, keys, host, hashes[:start_block]))

    # ---- control ------------------------------------------------------------------

    def flush(self) -> None:
        """Waits until every queued backup has been handed to the backend."""
        self._backup_q.join()

    def close(self) -> None:
        for q in (self._prefetch_q, self._io_q, self._backup_q):
            q.put(None)
        for t in self._threads:
            t.join(timeout=30)
