"""The zero-copy local data plane.

A client on the daemon's node maps the DRAM arena (a memfd handed over the
``<uds>.shm`` socket after a peer-credential check) and moves only slot
offsets over gRPC. A put copies each block once into the arena and commits
(the daemon verifies the checksum before publishing); a load takes a lease
with the slots in the same call, copies each block once into the caller's
buffer and verifies the copy. Views of slots are numpy ``uint8`` arrays, so
an engine can copy straight between its own buffers and the arena.

The arena's epoch (random per daemon start) is checked on every call that
returns offsets: after a daemon restart the old mapping is refused
(:class:`ArenaChanged`) instead of being read.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

import grpc
import numpy as np

from . import _wire
from .client import Client
from .errors import ArenaChanged, FailedPrecondition, StrataError, from_rpc
from .types import Block, Lease, Namespace, PutOutcome, PutResult, Tier, as_bytes_view, checksum
from .v1 import strata_pb2 as pb

MAGIC = b"STRSHM01"
VERSION = 1
HEADER_LEN = 32
STATUS_OK = 0
MAX_REASON_LEN = 4096
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)

# Commit in parts of about this many bytes, so the daemon verifies one part
# while this process copies the next.
PIPELINE_BYTES = 8 << 20


class SharedArena:
    """The daemon's arena, mapped read-write."""

    def __init__(self, shm_path: str):
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(shm_path)
        except OSError as e:
            raise FailedPrecondition(
                f"cannot connect to {shm_path}: {e}; is stratad running with its arena socket on?") from None
        with sock:
            msg, fds, _, _ = socket.recv_fds(sock, HEADER_LEN, 1)
            try:
                if len(msg) < HEADER_LEN:
                    raise FailedPrecondition(f"short hand-off header: {len(msg)} of {HEADER_LEN} bytes")
                if msg[:8] != MAGIC:
                    raise FailedPrecondition(f"{shm_path} is not a Strata arena socket (bad magic)")
                version, status, arena_len, epoch = struct.unpack("<IIQQ", msg[8:32])
                if version != VERSION:
                    raise FailedPrecondition(
                        f"arena hand-off version {version} is not supported by this client "
                        f"(expects {VERSION}); upgrade the client")
                if status != STATUS_OK:
                    raw = _recv_exact(sock, 4)
                    n = min(struct.unpack("<I", raw)[0], MAX_REASON_LEN) if len(raw) == 4 else 0
                    reason = _recv_exact(sock, n).decode("utf-8", "replace")
                    raise FailedPrecondition(f"the daemon refused the arena: {reason}")
                if not fds:
                    raise FailedPrecondition("the daemon sent no descriptor")
                size = os.fstat(fds[0]).st_size
                if size < arena_len:
                    raise FailedPrecondition(f"arena descriptor holds {size} bytes, header says {arena_len}")
                self.map = mmap.mmap(fds[0], arena_len, flags=mmap.MAP_SHARED,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                for fd in fds:
                    os.close(fd)
        # First-touch faults during copies would cost more than the copies.
        try:
            self.map.madvise(MADV_POPULATE_WRITE)
        except (OSError, ValueError):
            pass
        self.len = arena_len
        self.epoch = epoch
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)

    def view(self, offset: int, length: int) -> np.ndarray:
        if offset < 0 or length < 0 or offset + length > self.len:
            raise StrataError(f"slot [{offset}, +{length}) lies outside the arena of {self.len} bytes")
        return self.bytes[offset:offset + length]

    def close(self) -> None:
        self.bytes = None  # drop the export before unmapping
        try:
            self.map.close()
        except BufferError:
            pass  # views still alive; the mapping goes with them


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


@dataclass
class Reservation:
    """A reserved slot: write the block into ``view``, then commit."""

    key: bytes
    id: int
    view: np.ndarray | None  # None when the key was already present
    already_present: bool


@dataclass
class LeasedSlots:
    """Slots of a leased prefix: read-only views valid while the lease holds."""

    lease: Lease | None
    keys: list[bytes]
    views: list[np.ndarray]
    checksums: list[int]
    tiers: list[Tier]


class LocalClient:
    """``LocalClient("/run/strata/stratad.sock")``: gRPC over the Unix socket
    plus the arena mapped from ``<uds>.shm``. Thread-safe for calls; copies
    run in the calling thread."""

    def __init__(self, uds: str, timeout_s: float | None = 30.0, lease_ttl_ms: int = 30_000):
        self.uds = uds
        self.client = Client(f"unix:{uds}", timeout_s=timeout_s)
        try:
            self.arena = SharedArena(uds + ".shm")
        except BaseException:
            self.client.close()
            raise
        self.lease_ttl_ms = lease_ttl_ms

    def close(self) -> None:
        self.client.close()
        self.arena.close()

    def __enter__(self) -> "LocalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_epoch(self, epoch: int) -> None:
        if epoch != self.arena.epoch:
            raise ArenaChanged("the daemon restarted since this client mapped its arena; reconnect")

    def _rpc(self, method, req):
        try:
            return method(req, timeout=self.client.timeout_s)
        except grpc.RpcError as e:
            raise from_rpc(e) from None

    # ---- puts ---------------------------------------------------------------

    def reserve(self, ns: "Namespace | int", blocks: Sequence[tuple[bytes, bytes | None, int]],
                ttl_ms: int = 0) -> list[Reservation]:
        """Reserves arena slots for ``(key, parent, length)`` triples, all or
        nothing. Write each block into its ``view``, then :meth:`commit`."""
        req = pb.ReserveRequest(namespace_id=_wire.ns_id(ns), ttl_ms=ttl_ms, blocks=[
            pb.ReserveBlock(key=bytes(k), parent=bytes(p or b""), length=n) for k, p, n in blocks])
        r = self._rpc(self.client._stub.Reserve, req)
        if len(r.reservations) != len(blocks):
            raise StrataError("reservation count differs from block count")
        self._check_epoch(r.arena_epoch)
        out = []
        for (k, _, n), res in zip(blocks, r.reservations):
            if res.already_present:
                out.append(Reservation(bytes(k), 0, None, True))
                continue
            if res.slot.length != n:
                raise StrataError("slot length differs from block length")
            out.append(Reservation(bytes(k), res.reservation_id, self.arena.view(res.slot.offset, n), False))
        return out

    def commit(self, reservations: Iterable[Reservation]) -> list[PutOutcome]:
        """Commits written reservations; the checksum is taken over the arena
        bytes (what the daemon will verify)."""
        rs = list(reservations)
        blocks = [pb.CommitBlock(reservation_id=r.id, checksum=checksum(r.view))
                  for r in rs if not r.already_present]
        outcomes = iter(self._rpc(self.client._stub.Commit, pb.CommitRequest(blocks=blocks)).outcomes
                        if blocks else [])
        out = []
        for r in rs:
            if r.already_present:
                out.append(PutOutcome(r.key, PutResult.ALREADY_PRESENT, False))
            else:
                o = next(outcomes)
                out.append(PutOutcome(o.key, PutResult(o.result), o.durable))
        return out

    def abort(self, reservations: Iterable[Reservation]) -> int:
        ids = [r.id for r in reservations if r.id]
        if not ids:
            return 0
        return self._rpc(self.client._stub.Abort, pb.AbortRequest(reservation_ids=ids)).aborted

    def put(self, ns: "Namespace | int", blocks: Sequence[Block]) -> list[PutOutcome]:
        """Stores blocks with one copy each into the arena. Commits go out in
        parts of about 8 MiB while the next part is copied."""
        srcs = [as_bytes_view(b.data) for b in blocks]
        res = self.reserve(ns, [(b.key, b.parent, len(s)) for b, s in zip(blocks, srcs)])
        pending, part, part_bytes = [], [], 0
        try:
            for r, src, b in zip(res, srcs, blocks):
                if r.already_present:
                    continue
                r.view[:] = np.frombuffer(src, dtype=np.uint8)
                part.append(pb.CommitBlock(reservation_id=r.id, checksum=checksum(src)))
                part_bytes += len(src)
                if part_bytes >= PIPELINE_BYTES:
                    pending.append(self.client._stub.Commit.future(
                        pb.CommitRequest(blocks=part), timeout=self.client.timeout_s))
                    part, part_bytes = [], 0
            if part:
                pending.append(self.client._stub.Commit.future(
                    pb.CommitRequest(blocks=part), timeout=self.client.timeout_s))
            committed = []
            for f in pending:
                committed.extend(f.result().outcomes)
        except grpc.RpcError as e:
            self.abort(res)
            raise from_rpc(e) from None
        except BaseException:
            self.abort(res)
            raise
        it = iter(committed)
        out = []
        for r in res:
            if r.already_present:
                out.append(PutOutcome(r.key, PutResult.ALREADY_PRESENT, False))
            else:
                o = next(it)
                out.append(PutOutcome(o.key, PutResult(o.result), o.durable))
        return out

    # ---- loads --------------------------------------------------------------

    def lookup_slots(self, ns: "Namespace | int", keys: Sequence[bytes],
                     lease_ttl_ms: int | None = None) -> LeasedSlots:
        """Lookup with a lease and the slots of every hit, in one call.
        Release the lease (:meth:`release`) once the views are copied."""
        nid = _wire.ns_id(ns)
        r = self._rpc(self.client._stub.Lookup, pb.LookupRequest(
            namespace_id=nid, keys=[bytes(k) for k in keys],
            lease_ttl_ms=self.lease_ttl_ms if lease_ttl_ms is None else lease_ttl_ms, want_slots=True))
        if not r.lease_id:
            return LeasedSlots(None, [], [], [], [])
        lease = Lease(r.lease_id, nid, r.lease_expires_unix_ms)
        try:
            self._check_epoch(r.arena_epoch)
            views = [self.arena.view(s.offset, s.length) for s in r.slots]
        except BaseException:
            self.release(lease)
            raise
        return LeasedSlots(lease, [bytes(k) for k in keys[:r.hits]], views,
                           [s.checksum for s in r.slots], [Tier(t) for t in r.tiers])

    def slots_of(self, ns: "Namespace | int", lease: Lease, keys: Sequence[bytes]) -> LeasedSlots:
        """Slots of keys under a lease taken elsewhere (e.g. by a scheduler
        process); the lease stays held."""
        r = self._rpc(self.client._stub.GetSlots, pb.GetSlotsRequest(
            namespace_id=_wire.ns_id(ns), lease_id=lease.id, keys=[bytes(k) for k in keys]))
        self._check_epoch(r.arena_epoch)
        views = [self.arena.view(s.offset, s.length) for s in r.slots]
        return LeasedSlots(lease, [bytes(k) for k in keys], views, [s.checksum for s in r.slots],
                           [Tier.DRAM] * len(views))

    def release(self, lease: Lease | None) -> None:
        if lease is not None:
            self.client.release(lease)

    @staticmethod
    def copy_verified(slots: LeasedSlots, dsts: Sequence) -> int:
        """Copies each slot into its destination buffer (numpy array or any
        writable buffer of at least the block's length) and verifies the
        copy. Returns how many leading blocks arrived intact: after a
        mismatch the rest count as misses (recompute them)."""
        n = 0
        for view, want, dst in zip(slots.views, slots.checksums, dsts):
            out = _byte_array(dst)
            if out.size < view.size:
                raise StrataError(f"destination of {out.size} bytes for a block of {view.size}")
            out = out[:view.size]
            np.copyto(out, view)
            if checksum(out) != want:
                break
            n += 1
        return n

    def load_prefix(self, ns: "Namespace | int", keys: Sequence[bytes], dsts: Sequence) -> int:
        """Loads the longest present prefix of ``keys`` into ``dsts`` (one
        buffer per key): one Lookup with lease and slots, one verified copy
        per block, release. Returns the number of blocks loaded."""
        slots = self.lookup_slots(ns, keys)
        try:
            return self.copy_verified(slots, dsts)
        finally:
            self.release(slots.lease)


def _byte_array(dst) -> np.ndarray:
    if isinstance(dst, np.ndarray):
        if not dst.flags.c_contiguous:
            raise StrataError("destination must be C-contiguous")
        return dst.reshape(-1).view(np.uint8)
    return np.frombuffer(dst, dtype=np.uint8)
