"""Drives :class:`strata.integrations.vllm.StrataConnector` from a tinyengine
``Engine`` in vLLM v0.31.0's call order, as vLLM would.

Two connector instances, as in vLLM's two processes: a ``SCHEDULER`` one
and a ``WORKER`` one, each built from its own copy of the configuration;
they share nothing but the daemon. The vLLM objects the connector reads
(``VllmConfig``, ``KVCacheConfig``, ``Request``, ``KVCacheBlocks``,
``SchedulerOutput`` with ``NewRequestData`` / ``CachedRequestData``,
``ForwardContext``, ``KVConnectorOutput``) are minimal stand-ins with the
pinned field names (``clients/python/strata/integrations/upstream/NOTES.md``).

tinyengine's hooks map to the connector as follows:

- ``lookup`` → ``get_num_new_matched_tokens(request, 0)``, asked twice (vLLM
  may re-ask; the answer must not change and no lease may leak).
- ``load`` (blocks just allocated, the engine wants failures back now) → a
  scheduler step of its own: ``update_state_after_alloc``,
  ``build_connector_meta`` (the request as ``NewRequestData`` with
  ``has_sync_kv_loads``), then on the worker ``handle_preemptions``,
  ``bind_connector_metadata``, ``start_load_kv``, ``wait_for_save``,
  ``get_finished``, ``get_block_ids_with_load_errors``,
  ``clear_connector_metadata``, then ``update_connector_output`` on the
  scheduler. The failed ids go back to the engine only from
  ``get_block_ids_with_load_errors``.
- ``on_forward_start`` → the forward step's scheduler half: requests seen
  for the first time get ``update_state_after_alloc(..., 0)`` and come as
  ``NewRequestData``, the others as ``CachedRequestData`` (blocks appended
  since, tokens computed before the step); ``build_connector_meta``; then
  ``handle_preemptions``, ``bind_connector_metadata``, ``start_load_kv``.
- ``on_layer_start`` / ``after_layer`` → ``wait_for_layer_load`` /
  ``save_kv_layer`` (with the layer's cache and attention metadata).
- ``on_forward_end`` → ``wait_for_save``, ``get_finished``,
  ``get_block_ids_with_load_errors``, stats, ``clear_connector_metadata``,
  ``update_connector_output``, ``take_events``.
- ``save`` → checks that the engine's own list of blocks to save is exactly
  the store jobs the connector ran this step (the connector decides; the
  engine only confirms the bookkeeping).
- ``finished`` → ``request_finished_all_groups`` (the connector is
  ``SupportsHMA``), which must answer ``(False, None)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import tinyengine as te

from strata.integrations.vllm import (KVConnectorRole, StrataConnector, StrataConnectorMetadata,
                                      StrataConnectorStats)

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def layer_name(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.attn"


# ---- stand-ins for the vLLM objects the connector reads (pinned field names) -----------

@dataclass
class KVTransferConfig:
    kv_connector: str | None = "StrataConnector"
    engine_id: str | None = None
    kv_role: str | None = "kv_both"
    kv_connector_extra_config: dict = field(default_factory=dict)
    kv_connector_module_path: str | None = "strata.integrations.vllm"
    kv_load_failure_policy: str = "recompute"

    @property
    def is_kv_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_kv_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    def get_from_extra_config(self, key: str, default: Any) -> Any:
        return self.kv_connector_extra_config.get(key, default)


@dataclass
class ModelConfig:
    model: str
    dtype: str = "float16"


@dataclass
class CacheConfig:
    block_size: int = 16
    cache_dtype: str = "auto"


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1


@dataclass
class KVEventsConfig:
    enable_kv_cache_events: bool = False


@dataclass
class VllmConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    parallel_config: ParallelConfig
    kv_transfer_config: KVTransferConfig
    kv_events_config: KVEventsConfig


@dataclass
class FullAttentionSpec:
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: str


@dataclass
class KVCacheGroupSpec:
    layer_names: list[str]
    kv_cache_spec: FullAttentionSpec


@dataclass
class KVCacheConfig:
    num_blocks: int
    kv_cache_tensors: list = field(default_factory=list)
    kv_cache_groups: list[KVCacheGroupSpec] = field(default_factory=list)


@dataclass
class KVCacheBlocks:
    blocks: tuple[list[int], ...]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return tuple(list(b) for b in self.blocks)


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int] | None
    mm_features: list
    sampling_params: Any
    pooling_params: Any
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int
    lora_request: Any
    prompt_embeds: Any = None
    prompt_is_token_ids: list[bool] | None = None
    prefill_token_ids: list[int] | None = None
    replay_start: int = 0


@dataclass
class CachedRequestData:
    req_ids: list[str] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)
    new_token_ids: list[list[int]] = field(default_factory=list)
    all_token_ids: dict[str, list[int]] = field(default_factory=dict)
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    num_output_tokens: list[int] = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    scheduled_spec_decode_tokens: dict[str, list[int]]
    scheduled_encoder_inputs: dict[str, list[int]]
    num_common_prefix_blocks: list[int]
    finished_req_ids: set[str]
    free_encoder_mm_hashes: list[str]
    preempted_req_ids: set[str] | None = None
    kv_connector_metadata: Any = None
    has_sync_kv_loads: bool = False


@dataclass
class KVConnectorOutput:
    finished_sending: set[str] | None = None
    finished_recving: set[str] | None = None
    kv_connector_stats: Any = None
    kv_cache_events: Any = None
    kv_connector_worker_meta: Any = None
    invalid_block_ids: set[int] = field(default_factory=set)
    failed_recving: set[str] = field(default_factory=set)
    expected_finished_count: int = 0


@dataclass
class AttentionLayer:
    """What ``forward_context.no_compile_layers[name]`` is to a connector."""

    kv_cache: Any


@dataclass
class AttentionMetadata:
    slot_mapping: np.ndarray
    num_actual_tokens: int


@dataclass
class ForwardContext:
    no_compile_layers: dict[str, Any]
    attn_metadata: dict[str, Any]
    slot_mapping: dict[str, Any]


class Request:
    """vLLM's ``Request`` as connectors read it, over a tinyengine request
    (one object per request, as vLLM passes the same one each time)."""

    def __init__(self, req: te.Request):
        self._r = req
        self.request_id = req.request_id
        self.kv_transfer_params = None
        self.cache_salt = None
        self.lora_request = None
        self.mm_features: list = []
        self.skip_reading_prefix_cache = False

    prompt_token_ids = property(lambda self: self._r.prompt_token_ids)
    num_prompt_tokens = property(lambda self: self._r.num_prompt_tokens)
    all_token_ids = property(lambda self: self._r.all_token_ids)
    num_tokens = property(lambda self: self._r.num_tokens)
    num_computed_tokens = property(lambda self: self._r.num_computed_tokens)
    block_hashes = property(lambda self: self._r.block_hashes)


def make_configs(model_id: str, extra: dict, events: bool, num_layers: int, num_kv_heads: int,
                 head_dim: int, num_blocks: int, dtype: str = "float16"
                 ) -> tuple[VllmConfig, KVCacheConfig]:
    vc = VllmConfig(ModelConfig(model_id, dtype), CacheConfig(16), ParallelConfig(),
                    KVTransferConfig(kv_connector_extra_config=dict(extra)), KVEventsConfig(events))
    kc = KVCacheConfig(num_blocks, kv_cache_groups=[KVCacheGroupSpec(
        [layer_name(l) for l in range(num_layers)], FullAttentionSpec(16, num_kv_heads, head_dim, dtype))])
    return vc, kc


# ---- the driver ---------------------------------------------------------------------------

class VllmDriver(te.KVHooks):
    """tinyengine hooks that run a scheduler-role and a worker-role
    :class:`StrataConnector` in vLLM's order (see the module docstring).

    ``stats`` adds up both connectors' ``get_kv_connector_stats``;
    ``events`` collects ``take_events``; ``before_load(request)`` runs
    between the lookup and the load (a test may kill the daemon there)."""

    def __init__(self, endpoint: str, *, model_id: str = MODEL_ID, events: bool = False,
                 num_blocks: int = 64, num_layers: int = 30, num_kv_heads: int = 3, head_dim: int = 64,
                 extra: dict | None = None):
        extra = {"endpoint": endpoint, "retry_after_s": 0.2, **(extra or {})}
        shape = dict(model_id=model_id, extra=extra, events=events, num_layers=num_layers,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=num_blocks)
        vc, kc = make_configs(**shape)
        self.scheduler = StrataConnector(vc, KVConnectorRole.SCHEDULER, kc)
        self.worker = StrataConnector(copy.deepcopy(vc), KVConnectorRole.WORKER, copy.deepcopy(kc))
        self.num_layers = num_layers
        self.stats = StrataConnectorStats()
        self.events: list = []
        self.before_load: Callable[[te.Request], None] | None = None
        self.store_jobs: list[tuple[str, list[int]]] = []
        self._requests: dict[str, Request] = {}
        self._announced: dict[str, int] = {}
        self._finished: set[str] = set()
        self._step_stores: list[tuple[str, tuple[int, ...]]] = []
        self._forward: ForwardContext | None = None
        self._so: SchedulerOutput | None = None
        self.engine: te.Engine | None = None

    def attach(self, engine: te.Engine) -> te.Engine:
        """``register_kv_caches`` with the engine's per-layer arrays."""
        self.engine = engine
        self.worker.register_kv_caches({layer_name(l): engine.kv_caches[l] for l in range(self.num_layers)})
        return engine

    def close(self) -> None:
        """Shuts both connectors down; every store job was confirmed by the
        engine's own ``save``."""
        assert not self._step_stores, f"store jobs the engine did not save: {self._step_stores}"
        self.scheduler.shutdown()
        self.worker.shutdown()

    def _req(self, req: te.Request) -> Request:
        r = self._requests.get(req.request_id)
        if r is None:
            r = self._requests[req.request_id] = Request(req)
        return r

    def _output(self, new, cached, scheduled: dict[str, int], sync_loads: bool) -> SchedulerOutput:
        finished, self._finished = self._finished, set()
        return SchedulerOutput(
            scheduled_new_reqs=new, scheduled_cached_reqs=cached, num_scheduled_tokens=scheduled,
            total_num_scheduled_tokens=sum(scheduled.values()), scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={}, num_common_prefix_blocks=[0], finished_req_ids=finished,
            free_encoder_mm_hashes=[], preempted_req_ids=set(), has_sync_kv_loads=sync_loads)

    def _new_data(self, req: te.Request, computed: int) -> NewRequestData:
        self._announced[req.request_id] = len(req.block_ids)
        return NewRequestData(req.request_id, list(req.prompt_token_ids), [], None, None,
                              (list(req.block_ids),), computed, None)

    def _collect(self, connector: StrataConnector) -> None:
        s = connector.get_kv_connector_stats()
        if s is not None:
            self.stats.aggregate(s)

    def _worker_begin(self, so: SchedulerOutput, meta: StrataConnectorMetadata,
                      fc: ForwardContext | None) -> None:
        so.kv_connector_metadata = meta
        self.worker.handle_preemptions(meta)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(fc)

    def _worker_end(self, so: SchedulerOutput) -> set[int]:
        self.worker.wait_for_save()
        sending, recving = self.worker.get_finished(so.finished_req_ids)
        assert not sending and not recving, "synchronous connector reported async transfers"
        failed = self.worker.get_block_ids_with_load_errors()
        self._collect(self.worker)
        self.worker.clear_connector_metadata()
        self.scheduler.update_connector_output(KVConnectorOutput(invalid_block_ids=set(failed)))
        self._collect(self.scheduler)
        self.events.extend(self.scheduler.take_events())
        return failed

    # ---- hooks ----------------------------------------------------------------------

    def lookup(self, request: te.Request) -> int:
        r = self._req(request)
        n, is_async = self.scheduler.get_num_new_matched_tokens(r, 0)
        again = self.scheduler.get_num_new_matched_tokens(r, 0)
        assert again == (n, is_async), f"re-asked lookup changed: {(n, is_async)} then {again}"
        assert n is not None and not is_async, "StrataConnector loads synchronously"
        return n

    def load(self, request: te.Request, block_ids: list[int], kv_cache) -> set[int]:
        if self.before_load is not None:
            self.before_load(request)
        r = self._req(request)
        n_ext = len(block_ids) * request.block_size
        self.scheduler.update_state_after_alloc(r, KVCacheBlocks((list(request.block_ids),)), n_ext)
        so = self._output([self._new_data(request, n_ext)], CachedRequestData(),
                          {request.request_id: 0}, sync_loads=True)
        meta = self.scheduler.build_connector_meta(so)
        assert not meta.stores, "a load-only step stores nothing"
        self._worker_begin(so, meta, self._forward_context([]))
        return set(self._worker_end(so))

    def on_forward_start(self, batch: te.ForwardBatch) -> None:
        assert not self._step_stores, f"store jobs the engine did not save: {self._step_stores}"
        spans: dict[str, list[int]] = {}
        for c in batch.chunks:
            s = spans.setdefault(c.request.request_id, [c.start, c.end])
            s[0], s[1] = min(s[0], c.start), max(s[1], c.end)
        new, cached = [], CachedRequestData()
        for req in batch.requests:
            rid = req.request_id
            start = spans[rid][0]
            if rid not in self._announced:
                self.scheduler.update_state_after_alloc(self._req(req), KVCacheBlocks((list(req.block_ids),)), 0)
                new.append(self._new_data(req, start))
                continue
            added = list(req.block_ids[self._announced[rid]:])
            self._announced[rid] = len(req.block_ids)
            cached.req_ids.append(rid)
            cached.new_block_ids.append((added,) if added else None)
            cached.num_computed_tokens.append(start)
            cached.new_token_ids.append(list(req.output_token_ids[-1:]))
            cached.num_output_tokens.append(len(req.output_token_ids))
        so = self._output(new, cached, {rid: e - s for rid, (s, e) in spans.items()}, sync_loads=False)
        meta = self.scheduler.build_connector_meta(so)
        self._step_stores = [(j.req_id, tuple(j.block_ids)) for j in meta.stores]
        self.store_jobs.extend((j.req_id, list(j.block_ids)) for j in meta.stores)
        self._so = so
        self._forward = self._forward_context(batch.chunks)
        self._worker_begin(so, meta, self._forward)

    def _forward_context(self, chunks) -> ForwardContext:
        bs = 16
        slots = np.array([c.request.block_ids[p // bs] * bs + p % bs
                          for c in chunks for p in range(c.start, c.end)], dtype=np.int64)
        md = AttentionMetadata(slots, len(slots))
        names = [layer_name(l) for l in range(self.num_layers)]
        caches = self.engine.kv_caches if self.engine is not None else [None] * self.num_layers
        return ForwardContext({n: AttentionLayer(caches[l]) for l, n in enumerate(names)},
                              {n: md for n in names}, {n: slots for n in names})

    def on_layer_start(self, layer: int, batch: te.ForwardBatch) -> None:
        if self.worker.has_connector_metadata():
            self.worker.wait_for_layer_load(layer_name(layer))

    def after_layer(self, layer: int, batch: te.ForwardBatch) -> None:
        if self.worker.has_connector_metadata():
            name = layer_name(layer)
            self.worker.save_kv_layer(name, batch.kv_cache[layer], self._forward.attn_metadata[name])

    def on_forward_end(self, batch: te.ForwardBatch) -> None:
        failed = self._worker_end(self._so)
        assert not failed, "no loads run in a forward step"

    def save(self, request: te.Request, block_ids: list[int], kv_cache, start_block: int) -> None:
        job = (request.request_id, tuple(block_ids))
        assert job in self._step_stores, (f"engine saves {job}, the connector's store jobs this step "
                                          f"were {self._step_stores}")
        self._step_stores.remove(job)

    def finished(self, request: te.Request) -> None:
        r = self._req(request)
        done = self.scheduler.request_finished_all_groups(r, (list(request.block_ids),))
        assert done == (False, None), f"request_finished_all_groups answered {done}"
        self._finished.add(request.request_id)
        del self._requests[request.request_id]
        del self._announced[request.request_id]


def vllm_engine(model, endpoint: str, *, layout: str = "flash_attn", num_blocks: int = 48,
                **driver_kw) -> tuple[te.Engine, VllmDriver]:
    """A tinyengine ``Engine`` whose KV store is ``StrataConnector`` at
    ``endpoint``, and its driver (``driver.close()`` when done)."""
    driver = VllmDriver(endpoint, num_blocks=num_blocks, **driver_kw)
    eng = te.Engine(model, num_blocks=num_blocks, layout=layout, hooks=driver)
    driver.attach(eng)
    return eng, driver
