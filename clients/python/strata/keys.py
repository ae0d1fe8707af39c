"""Chained block keys from token ids, the same function as the Rust
client's ``strata_client::keys`` (definition there; a shared test vector pins
both):

    key[0] = XXH3-128(seed, le32(t[0]) ‖ … ‖ le32(t[T-1]))
    key[i] = XXH3-128(seed, key[i-1] ‖ le32(t[iT]) ‖ … ‖ le32(t[iT+T-1]))

A key is the 16-byte big-endian encoding of the hash; only full blocks are
keyed. Engines with their own chained hashes (vLLM, SGLang) use those
instead; this is for clients without one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xxhash


def block_key(seed: int, parent: bytes | None, tokens: Sequence[int]) -> bytes:
    data = (parent or b"") + np.asarray(tokens, dtype="<u4").tobytes()
    return xxhash.xxh3_128_digest(data, seed=seed)


def chain_keys(tokens: Sequence[int], tokens_per_block: int, seed: int = 0) -> list[bytes]:
    if tokens_per_block < 1:
        raise ValueError("tokens_per_block must be at least 1")
    out: list[bytes] = []
    for start in range(0, len(tokens) - tokens_per_block + 1, tokens_per_block):
        out.append(block_key(seed, out[-1] if out else None, tokens[start:start + tokens_per_block]))
    return out
