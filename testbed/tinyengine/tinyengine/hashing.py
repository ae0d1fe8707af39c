"""Chained block hashes (vLLM-style prefix hashes), deterministic across processes.

Only full blocks are hashed. For blocks of ``B`` tokens ``t``::

    hash[0] = SHA-256(                le32(t[0])  || ... || le32(t[B-1]))
    hash[i] = SHA-256(hash[i-1] ||    le32(t[iB]) || ... || le32(t[iB+B-1]))

where ``le32`` is the 4-byte little-endian unsigned encoding of a token id and
``hash[i-1]`` is the parent's 32-byte digest. No Python ``hash()``, no pickle,
no per-process seed: the same tokens give the same 32-byte hashes everywhere.
(The structure is that of Strata's chained keys -- ``clients/rust/src/keys.rs``
-- with SHA-256 instead of XXH3-128; a 32-byte digest is itself a valid Strata
key. Adapters may map these hashes to Strata keys however they like.)
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """SHA-256 of ``parent || le32(token_ids...)`` (``parent`` None for the first block)."""
    h = hashlib.sha256()
    if parent is not None:
        h.update(parent)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def block_hashes(
    token_ids: Sequence[int], block_size: int = 16, parent: bytes | None = None
) -> list[bytes]:
    """Hashes of every full block of ``token_ids`` (a trailing partial block has none)."""
    out: list[bytes] = []
    for i in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out
