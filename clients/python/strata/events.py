"""A KV event feed that stays consistent on its own.

:meth:`Client.subscribe` is the raw stream. :class:`EventFeed` wraps it the
way a router needs: it starts from a snapshot, and whenever its view may be
stale (the daemon says events were missed, the daemon restarted, the
connection broke) it yields :class:`Reset` and a fresh snapshot before live
events continue. A consumer that clears its state on ``Reset`` and applies
every event after it always converges on the daemon's state.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator

from .client import Client
from .errors import StrataError
from .types import AllBlocksCleared, BlockRemoved, BlockStored


@dataclass(frozen=True)
class Reset:
    """Forget everything known from this feed; a snapshot follows."""

    reason: str
    epoch: int = 0


class EventFeed:
    def __init__(self, endpoint: str, namespaces=None, retry_s: float = 0.5, max_batch: int = 0,
                 credentials=None):
        self.endpoint = endpoint
        self.credentials = credentials
        self.namespaces = list(namespaces or [])
        self.retry_s = retry_s
        self.max_batch = max_batch
        self._closed = threading.Event()
        self._sub = None
        self._client: Client | None = None

    def close(self) -> None:
        self._closed.set()
        if self._sub is not None:
            self._sub.close()

    def __iter__(self) -> Iterator["Reset | BlockStored | BlockRemoved | AllBlocksCleared"]:
        reason = "start"
        while not self._closed.is_set():
            try:
                if self._client is None:
                    self._client = Client(self.endpoint, timeout_s=None,
                                          credentials=self.credentials)
                self._sub = self._client.subscribe(self.namespaces, snapshot=True,
                                                   max_batch=self.max_batch)
                hello = next(self._sub)
                yield Reset(reason, hello.epoch)
                for b in self._sub:
                    if b.missed:
                        reason = f"missed {b.missed} events"
                        break
                    yield from b.events
                else:
                    reason = "stream ended (daemon stopped)"
                self._sub.close()
            except (StrataError, StopIteration) as e:
                reason = f"disconnected: {e}"
                if self._client is not None:
                    self._client.close()
                    self._client = None
                if self._closed.wait(self.retry_s):
                    return


class BlockView:
    """What a feed says the daemon holds: ``(namespace, key) -> set of
    tiers``. Apply every item of an :class:`EventFeed` to keep it current."""

    def __init__(self) -> None:
        self.blocks: dict[tuple[int, bytes], set] = {}
        self.resets = 0

    def apply(self, item) -> None:
        if isinstance(item, Reset):
            self.blocks.clear()
            self.resets += 1
        elif isinstance(item, BlockStored):
            self.blocks.setdefault((item.namespace, item.key), set()).add(item.medium)
        elif isinstance(item, BlockRemoved):
            tiers = self.blocks.get((item.namespace, item.key))
            if tiers is not None:
                tiers.discard(item.medium)
                if not tiers:
                    del self.blocks[(item.namespace, item.key)]
        elif isinstance(item, AllBlocksCleared):
            for k in list(self.blocks):
                self.blocks[k].discard(item.medium)
                if not self.blocks[k]:
                    del self.blocks[k]

    def has(self, namespace: int, key: bytes) -> bool:
        return (namespace, key) in self.blocks


def vllm_event(item, int_hashes: bool = True) -> dict | None:
    """One Strata event in the shape of vLLM's KV events
    (``vllm/distributed/kv_events.py``), which Dynamo's KV router and
    llm-d's prefix scorer consume: a map tagged ``"type"``, block hashes as
    ints (the low 64 bits of the key read big-endian, vLLM's default) or
    as the key bytes, ``medium`` = the tier (``CPU`` for DRAM, ``STORAGE``
    for NVMe). Strata does not keep token ids, so ``token_ids`` is empty and
    ``block_size`` is the block's token count. :class:`Reset` has no
    counterpart and gives None: a router clears its view from this source.
    Encode with msgpack to publish on a vLLM-style ZMQ topic."""

    def h(key: bytes | None):
        if key is None:
            return None
        return int.from_bytes(key[-8:], "big") if int_hashes else bytes(key)

    if isinstance(item, BlockStored):
        return {"type": "BlockStored", "block_hashes": [h(item.key)], "parent_block_hash": h(item.parent),
                "token_ids": [], "block_size": item.token_count, "lora_id": None,
                "medium": item.medium.medium, "lora_name": None}
    if isinstance(item, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": [h(item.key)], "medium": item.medium.medium}
    if isinstance(item, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    return None


def vllm_batch(batch, data_parallel_rank: int | None = None, int_hashes: bool = True) -> list:
    """An :class:`~strata.types.EventBatch` as vLLM's ``KVEventBatch``
    array ``[ts_seconds, [events...], data_parallel_rank]``."""
    return [batch.ts_unix_ms / 1000.0,
            [e for e in (vllm_event(x, int_hashes) for x in batch.events) if e is not None],
            data_parallel_rank]
