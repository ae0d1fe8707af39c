"""Engine core: requests, block tables, a step loop (chunked prefill, then decode), KV-store hooks.

Scheduling (deterministic, single process, no preemption):

- ``add_request`` queues a request (FIFO). A waiting request is admitted when
  the free blocks cover its whole lifetime (prompt + max_new_tokens - 1
  tokens, minus what running requests still have reserved); the head of the
  queue blocks the rest. Admission: ``hooks.lookup`` -> allocate the prompt's
  blocks -> ``hooks.load`` (see :mod:`tinyengine.hooks`).
- Each step schedules, for every running request in admission order, either
  its one decode token or as many prefill chunks as the step's token budget
  (``max_tokens_per_step``) allows. A prefill chunk is the rest of one block:
  ``[s, min(next block boundary, prompt_len))``; prefill always starts on a
  block boundary, so chunk boundaries are the same whatever prefix was loaded.
- Requests are never mixed inside a matmul: each chunk is computed on its
  own, so results do not depend on what else is running. Layers are the outer
  loop (hooks see one ``on_layer_start``/``after_layer`` per layer per step).
- Sampling is greedy (``argmax``, first index on ties) on float32 logits.
- There is no local prefix cache: KV is either computed or loaded via hooks.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from ._threads import check_single_threaded
from .hashing import hash_block
from .hooks import ForwardBatch, KVHooks, NoopHooks, ScheduledChunk
from .kv_cache import BlockAllocator, KVLayout, PagedKVCache
from .model import Model


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    record_logits: bool = False
    block_size: int = 16
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    #: physical block ids, logical order (block i holds positions 16i..16i+15)
    block_ids: list[int] = field(default_factory=list)
    #: tokens whose K/V is in the cache
    num_computed_tokens: int = 0
    #: prefix tokens granted by ``hooks.lookup`` (after clamping)
    num_external_tokens: int = 0
    #: prefix tokens actually loaded (``num_external_tokens`` minus failures)
    num_loaded_tokens: int = 0
    #: tokens computed by this engine (prefill + decode)
    num_computed_locally: int = 0
    #: full blocks either loaded or passed to ``hooks.save``
    num_saved_blocks: int = 0
    finish_reason: str | None = None
    #: float32 logits that produced each output token (if ``record_logits``)
    logits: list[np.ndarray] = field(default_factory=list)
    _hashes: list[bytes] = field(default_factory=list, repr=False)
    _reserved_blocks: int = field(default=0, repr=False)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def block_hashes(self) -> list[bytes]:
        """Chained SHA-256 hashes of every full block of ``all_token_ids``
        (see :mod:`tinyengine.hashing`); grows as output tokens are generated."""
        toks = None
        bs = self.block_size
        while (len(self._hashes) + 1) * bs <= self.num_tokens:
            if toks is None:
                toks = self.all_token_ids
            i = len(self._hashes)
            self._hashes.append(hash_block(self._hashes[-1] if i else None, toks[i * bs : (i + 1) * bs]))
        return list(self._hashes)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Engine:
    def __init__(
        self,
        model: Model,
        num_blocks: int,
        *,
        layout: KVLayout | str = KVLayout.FLASH_ATTN,
        block_size: int = 16,
        hooks: KVHooks | None = None,
        max_tokens_per_step: int = 512,
        kv_dtype: np.dtype | type = np.float16,
    ) -> None:
        if not check_single_threaded():
            raise RuntimeError("BLAS is multi-threaded; tinyengine needs one thread for bit-reproducibility")
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.hooks: KVHooks = hooks if hooks is not None else NoopHooks()
        self.max_tokens_per_step = max(block_size, max_tokens_per_step)
        self.kv_cache = PagedKVCache(
            cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, layout, kv_dtype
        )
        self.allocator = BlockAllocator(num_blocks)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.step_count = 0
        self._ids = itertools.count()
        self._reserved = 0  # blocks promised to running requests but not yet allocated

    @property
    def layout(self) -> KVLayout:
        return self.kv_cache.layout

    @property
    def kv_caches(self) -> list[np.ndarray]:
        """Per-layer cache arrays, in the engine's layout."""
        return self.kv_cache.layers

    # ---- requests ------------------------------------------------------------------

    def _lifetime_blocks(self, prompt_len: int, max_new: int) -> int:
        # the last generated token is never fed back, so its K/V is never stored
        return _cdiv(prompt_len + max_new - 1, self.block_size)

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        max_new_tokens: int = 16,
        *,
        request_id: str | None = None,
        stop_token_ids: Iterable[int] | None = None,
        ignore_eos: bool = False,
        record_logits: bool = False,
    ) -> Request:
        """Queue a greedy-decoding request. Stops at ``max_new_tokens`` or at a
        stop token (default: the model's EOS, unless ``ignore_eos``)."""
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("empty prompt")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if len(prompt) + max_new_tokens > self.model.config.max_position:
            raise ValueError("prompt + max_new_tokens exceeds the model's context length")
        if self._lifetime_blocks(len(prompt), max_new_tokens) > self.allocator.num_blocks:
            raise ValueError("request needs more KV blocks than the engine has")
        if stop_token_ids is None:
            eos = self.model.config.eos_token_id
            stop = frozenset() if ignore_eos or eos is None else frozenset([eos])
        else:
            stop = frozenset(int(t) for t in stop_token_ids)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"duplicate request id {rid!r}")
        req = Request(rid, prompt, max_new_tokens, stop, record_logits, self.block_size)
        self.requests[rid] = req
        self.waiting.append(req)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ----------------------------------------------------------------

    def _admit(self) -> None:
        bs = self.block_size
        while self.waiting:
            req = self.waiting[0]
            need = self._lifetime_blocks(req.num_prompt_tokens, req.max_new_tokens)
            if need > self.allocator.num_free - self._reserved:
                break
            self.waiting.popleft()
            n_ext = int(self.hooks.lookup(req))
            if n_ext < 0 or n_ext % bs:
                raise ValueError(f"hooks.lookup returned {n_ext}: must be a non-negative multiple of {bs}")
            # the block holding the last prompt token is always computed (its logits are needed)
            n_ext = min(n_ext, (req.num_prompt_tokens - 1) // bs * bs)
            req.block_ids = self.allocator.allocate(_cdiv(req.num_prompt_tokens, bs))
            req._reserved_blocks = need - len(req.block_ids)
            self._reserved += req._reserved_blocks
            req.num_external_tokens = n_ext
            loaded = n_ext
            if n_ext:
                load_ids = req.block_ids[: n_ext // bs]
                failed = self.hooks.load(req, list(load_ids), self.kv_cache) or set()
                if failed:
                    unknown = set(failed) - set(load_ids)
                    if unknown:
                        raise ValueError(f"hooks.load reported blocks it was not asked to load: {sorted(unknown)}")
                    loaded = min(load_ids.index(b) for b in failed) * bs
            req.num_loaded_tokens = loaded
            req.num_computed_tokens = loaded
            req.num_saved_blocks = loaded // bs
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def _schedule(self) -> list[ScheduledChunk]:
        bs = self.block_size
        budget = self.max_tokens_per_step
        chunks: list[ScheduledChunk] = []
        # decode tokens first (one each), then prefill chunks
        for req in self.running:
            if req.output_token_ids:
                pos = req.num_computed_tokens
                if pos // bs >= len(req.block_ids):
                    req.block_ids.extend(self.allocator.allocate(1))
                    req._reserved_blocks -= 1
                    self._reserved -= 1
                chunks.append(ScheduledChunk(req, pos, pos + 1))
                budget -= 1
        for req in self.running:
            if req.output_token_ids:
                continue
            start = req.num_computed_tokens
            while start < req.num_prompt_tokens:
                end = min((start // bs + 1) * bs, req.num_prompt_tokens)
                if end - start > budget and chunks:
                    break
                chunks.append(ScheduledChunk(req, start, end))
                budget -= end - start
                start = end
            if budget <= 0:
                break
        return chunks

    # ---- execution -----------------------------------------------------------------

    def step(self) -> list[Request]:
        """Admit, schedule, run one forward, sample, save, finish. Returns the
        requests that finished in this step."""
        self._admit()
        chunks = self._schedule()
        if not chunks:
            if self.waiting and not self.running:
                raise RuntimeError("waiting request cannot be admitted")
            return []
        self.step_count += 1
        batch = ForwardBatch(chunks, self.kv_cache, self.step_count)
        model = self.model
        hooks = self.hooks
        hooks.on_forward_start(batch)
        bs = self.block_size
        xs = [model.embed_tile(c.request.all_token_ids[c.start : c.end], c.start, bs) for c in chunks]
        for layer in range(model.config.num_layers):
            hooks.on_layer_start(layer, batch)
            for i, c in enumerate(chunks):
                xs[i] = model.layer_forward(layer, xs[i], c.start, c.end, self.kv_cache, c.request.block_ids)
            hooks.after_layer(layer, batch)
        # logits for chunks ending at the sequence's last token
        logits = {}
        for i, c in enumerate(chunks):
            c.request.num_computed_tokens = c.end
            c.request.num_computed_locally += c.num_tokens
            if c.end == c.request.num_tokens:
                logits[c.request.request_id] = model.logits(xs[i][(c.end - 1) % bs])
        hooks.on_forward_end(batch)

        finished: list[Request] = []
        for req in batch.requests:
            lg = logits.get(req.request_id)
            if lg is not None:
                tok = int(np.argmax(lg))
                if req.record_logits:
                    req.logits.append(lg)
                req.output_token_ids.append(tok)
            full = req.num_computed_tokens // self.block_size
            if full > req.num_saved_blocks:
                start = req.num_saved_blocks
                hooks.save(req, req.block_ids[start:full], self.kv_cache, start)
                req.num_saved_blocks = full
            if lg is not None:
                if tok in req.stop_token_ids:
                    req.finish_reason = "stop"
                elif len(req.output_token_ids) >= req.max_new_tokens:
                    req.finish_reason = "length"
                if req.finish_reason is not None:
                    self._finish(req)
                    finished.append(req)
        return finished

    def _finish(self, req: Request) -> None:
        self.hooks.finished(req)
        req.status = RequestStatus.FINISHED
        self.running.remove(req)
        self.allocator.free(req.block_ids)
        self._reserved -= req._reserved_blocks
        req._reserved_blocks = 0

    def run(self) -> list[Request]:
        """Step until every queued request has finished; returns them in finishing order."""
        done: list[Request] = []
        while self.has_unfinished():
            done.extend(self.step())
        return done

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16, **kwargs
    ) -> list[Request]:
        """Convenience: queue ``prompts``, run to completion, return the requests in prompt order."""
        reqs = [self.add_request(p, max_new_tokens, **kwargs) for p in prompts]
        self.run()
        return reqs
