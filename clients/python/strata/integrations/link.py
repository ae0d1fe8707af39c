"""One engine process's link to ``stratad``, shared by every adapter.

The rule every adapter relies on: **the daemon never fails an engine
request.** A lookup that cannot reach the daemon counts zero hits; a load
that fails part-way reports how many leading blocks arrived intact (the
engine recomputes the rest); a save that fails is skipped. After a
transport failure the link stays "down" for ``retry_after_s`` and answers
at once (no call waits on a dead socket), then reconnects. A daemon restart
is noticed by the arena epoch and the link remaps and re-registers its
layout before the next call.

Errors that are not transport failures (a layout the daemon refuses, a
block of the wrong size) are programming or configuration errors: they are
logged with the daemon's message and counted, and still never raised into
the engine's step, except from :meth:`StoreLink.connect`, which an adapter
calls at start-up so that a wrong configuration fails loudly there.

Data paths. With a Unix-socket endpoint (``unix:/path``) the link maps the
daemon's arena (:class:`~strata.local.LocalClient`): a load copies each
block once from the arena into the engine's buffers through ``sink`` and
then checks the slot's checksum (a slot recycled during the copy would not
match, so the copy is discarded); a save reserves slots, lets ``fill``
write each block once into the arena, and commits (the daemon verifies).
Over TCP the same calls stream the bytes (``Client.get`` verifies them on
arrival).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import grpc
import numpy as np

from ..auth import Credentials
from ..client import Client
from ..errors import AlreadyExists, ArenaChanged, DeadlineExceeded, StrataError, Unavailable
from ..local import LocalClient
from ..types import Block, Layout, Lease, Namespace, PutResult, checksum

log = logging.getLogger("strata.integrations")

# Called with (index in the request, the block's bytes as a read-only uint8
# array of layout.block_bytes); copies them into the engine.
Sink = Callable[[int, np.ndarray], None]
# Called with (index, a writable uint8 array of layout.block_bytes) to fill.
Fill = Callable[[int, np.ndarray], None]

_TRANSPORT = (Unavailable, DeadlineExceeded, ArenaChanged)


@dataclass
class LinkStats:
    """Counters since start (adapters expose them as their engine's stats)."""

    lookups: int = 0
    lookup_keys: int = 0
    lookup_hits: int = 0
    loads: int = 0
    blocks_loaded: int = 0
    bytes_loaded: int = 0
    load_failures: int = 0
    saves: int = 0
    blocks_saved: int = 0
    bytes_saved: int = 0
    save_skipped: int = 0
    errors: int = 0
    reconnects: int = 0
    down_answers: int = 0
    seconds_loading: float = 0.0
    seconds_saving: float = 0.0
    last_error: str = ""
    #: hits per tier as ``hits_dram``, ``hits_nvme``, ...
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(d.pop("extra"))
        return d


class StoreLink:
    """``StoreLink("unix:/run/strata/stratad.sock", layout)``.

    ``zero_copy`` (default) maps the arena when the endpoint is a Unix
    socket; ``timeout_s`` bounds every call; ``retry_after_s`` is how long a
    transport failure keeps the link answering "miss" without trying.
    Thread-safe.
    """

    def __init__(self, endpoint: str, layout: Layout, *, zero_copy: bool = True,
                 timeout_s: float = 5.0, retry_after_s: float = 1.0, lease_ttl_ms: int = 30_000,
                 save_part_bytes: int = 32 << 20, credentials: Credentials | None = None):
        self.endpoint = endpoint if "://" in endpoint or endpoint.startswith("unix:") else (
            f"unix:{endpoint}" if endpoint.startswith("/") else f"http://{endpoint}")
        self.layout = layout
        self.zero_copy = zero_copy
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.lease_ttl_ms = lease_ttl_ms
        self.save_part_bytes = save_part_bytes
        # A bearer token and TLS for daemons that authenticate TCP clients
        # (strata.auth); nothing is sent on the Unix socket.
        self.credentials = credentials
        self.stats = LinkStats()
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._local: LocalClient | None = None
        self._ns: Namespace | None = None
        self._down_until = 0.0
        self._last_log: dict[str, float] = {}

    # ---- connection ---------------------------------------------------------

    @property
    def namespace_id(self) -> int:
        """The daemon's id of the layout once registered (with
        authentication it folds in the tenant), else the unfolded one."""
        ns = self._ns
        return ns.id if ns is not None else self.layout.namespace_id()

    @property
    def is_local(self) -> bool:
        return self._local is not None

    def connect(self) -> Namespace:
        """Connects and registers the layout now, raising what fails (for
        start-up checks). Later calls reconnect by themselves."""
        with self._lock:
            self._down_until = 0.0
            return self._connect_locked()

    def _connect_locked(self) -> Namespace:
        if self._ns is not None:
            return self._ns
        local = None
        if self.zero_copy and self.endpoint.startswith("unix:"):
            try:
                local = LocalClient(self.endpoint[len("unix:"):], timeout_s=self.timeout_s,
                                    lease_ttl_ms=self.lease_ttl_ms)
            except (OSError, StrataError) as e:
                # The socket may be reachable while the arena is not shared
                # with this process (another user, no .shm socket): stream.
                self._log("arena", f"arena of {self.endpoint} not mapped ({e}); "
                                   "data will go over gRPC if the daemon answers")
        client = local.client if local else Client(self.endpoint, timeout_s=self.timeout_s,
                                                   credentials=self.credentials)
        try:
            ns = client.register_layout(self.layout)
        except BaseException:
            (local or client).close()
            raise
        if ns.id != self.layout.namespace_id() and ns.id != self._tenant_id(client):
            (local or client).close()
            raise StrataError(f"daemon named the layout namespace {ns.id:#x}, this client "
                              f"derives {self.layout.namespace_id():#x}: versions disagree")
        if ns.block_bytes != self.layout.block_bytes:
            (local or client).close()
            raise StrataError(f"daemon expects {ns.block_bytes}-byte blocks for this layout, "
                              f"the engine has {self.layout.block_bytes}")
        self._local, self._client, self._ns = local, client, ns
        return ns

    def _tenant_id(self, client: Client) -> int | None:
        """The layout's id as the tenant this client is (a daemon with
        authentication folds the tenant into the namespace)."""
        try:
            return self.layout.namespace_id(client.stats().tenant or None)
        except StrataError:
            return None

    def _reset_locked(self) -> None:
        closing = self._local or self._client
        self._local = self._client = self._ns = None
        if closing is not None:
            try:
                closing.close()
            except Exception:  # noqa: BLE001 - closing a broken channel
                pass

    def close(self) -> None:
        with self._lock:
            self._reset_locked()
            self._down_until = float("inf")

    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until and self._ns is not None

    def _log(self, kind: str, msg: str, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= 10.0:
            self._last_log[kind] = now
            log.log(level, "strata: %s", msg)

    def _with_client(self, what: str, fn, default):
        """Runs ``fn(client_or_local, ns)``; transport failures mark the
        link down and return ``default``; an arena change reconnects once."""
        for attempt in range(2):
            with self._lock:
                if time.monotonic() < self._down_until:
                    self.stats.down_answers += 1
                    return default
                try:
                    ns = self._connect_locked()
                except (StrataError, grpc.RpcError, OSError) as e:
                    self._mark_down_locked(what, e)
                    return default
                local, client = self._local, self._client
            try:
                return fn(local, client, ns)
            except ArenaChanged as e:
                with self._lock:
                    self._reset_locked()
                    self.stats.reconnects += 1
                if attempt == 1:
                    self._record(what, e)
                    return default
            except _TRANSPORT as e:
                with self._lock:
                    self._reset_locked()
                    self._mark_down_locked(what, e)
                return default
            except Exception as e:  # noqa: BLE001 - the engine's step must never see it
                # Configuration errors (a refused layout, a wrong size) and
                # bugs in a sink or fill land here: logged and counted.
                self._record(what, e)
                return default
        return default

    def _mark_down_locked(self, what: str, e: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_after_s
        self._record(what, e)

    def _record(self, what: str, e: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{what}: {e}"
        self._log(what, f"{what} failed: {e}")

    # ---- calls --------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes], lease_ttl_ms: int = 0) -> tuple[int, Lease | None]:
        """Leading keys present, and a lease pinning them when
        ``lease_ttl_ms`` > 0. ``(0, None)`` when the daemon is unreachable."""
        if not keys:
            return 0, None

        def call(local, client, ns):
            r = client.lookup(ns, keys, lease_ttl_ms=lease_ttl_ms)
            for t in r.tiers:
                name = f"hits_{t.name.lower()}"
                self.stats.extra[name] = self.stats.extra.get(name, 0) + 1
            return r.hits, r.lease

        hits, lease = self._with_client("lookup", call, (0, None))
        self.stats.lookups += 1
        self.stats.lookup_keys += len(keys)
        self.stats.lookup_hits += hits
        return hits, lease

    def release(self, lease: Lease | None) -> None:
        if lease is None:
            return
        self._with_client("release", lambda local, client, ns: client.release(lease), None)

    def load(self, keys: Sequence[bytes], sink: Sink, lease: Lease | None = None) -> int:
        """Copies the longest present prefix of ``keys`` into the engine
        through ``sink`` and returns how many leading blocks arrived intact
        (each verified). ``lease``: one taken by an earlier :meth:`lookup`
        (e.g. in a scheduler process); the link then reads under it and
        leaves it held. Never raises."""
        if not keys:
            return 0
        t0 = time.perf_counter()
        want = len(keys)

        def call(local, client, ns):
            if local is not None:
                own = lease is None
                slots = (local.lookup_slots(ns, keys) if own else local.slots_of(ns, lease, keys))
                try:
                    n = 0
                    for i, (view, want_sum) in enumerate(zip(slots.views, slots.checksums)):
                        sink(i, view)
                        # Checked after the copy: a slot recycled before or
                        # during it no longer matches its checksum.
                        if checksum(view) != want_sum:
                            self.stats.load_failures += 1
                            self._record("load", StrataError(f"block {i} changed while copied"))
                            break
                        n += 1
                    return n
                finally:
                    if own:
                        local.release(slots.lease)
            own_lease = None
            use = lease
            if use is None:
                r = client.lookup(ns, keys, lease_ttl_ms=self.lease_ttl_ms)
                own_lease = use = r.lease
                if r.hits == 0:
                    return 0
                present = keys[:r.hits]
            else:
                present = keys
            try:
                n = 0
                for i, b in enumerate(client.get(ns, present, lease=use)):
                    sink(i, np.frombuffer(b.data, dtype=np.uint8))
                    n += 1
                return n
            finally:
                if own_lease is not None:
                    client.release(own_lease)

        n = self._with_client("load", call, 0)
        self.stats.loads += 1
        self.stats.blocks_loaded += n
        self.stats.bytes_loaded += n * self.layout.block_bytes
        if n < want and lease is not None:
            # Under a lease every key was promised present: a short load
            # is a failure (without one it is a plain partial hit).
            self.stats.load_failures += 1
        self.stats.seconds_loading += time.perf_counter() - t0
        return n

    def save(self, keys: Sequence[bytes], parents: Sequence[bytes | None], fill: Fill) -> int:
        """Stores blocks the engine computed: ``fill(i, out)`` writes block
        ``i`` into ``out`` (the arena slot itself on the zero-copy path).
        Blocks already present are skipped without calling ``fill``.
        Returns how many are now present. Never raises; a full store or an
        unreachable daemon skips the save (counted).

        A reservation is all or nothing and must fit the daemon's DRAM at
        once, so long saves go in parts of at most ``save_part_bytes``."""
        if not keys:
            return 0
        step = max(1, self.save_part_bytes // self.layout.block_bytes)
        if len(keys) > step:
            return sum(self.save(keys[i:i + step], parents[i:i + step],
                                 lambda j, out, i=i: fill(i + j, out))
                       for i in range(0, len(keys), step))
        t0 = time.perf_counter()
        nbytes = self.layout.block_bytes

        def call(local, client, ns):
            if local is not None:
                res = local.reserve(ns, [(k, p, nbytes) for k, p in zip(keys, parents)])
                try:
                    wrote = 0
                    for i, r in enumerate(res):
                        if not r.already_present:
                            fill(i, r.view)
                            wrote += 1
                    outcomes = local.commit(res)
                except AlreadyExists:
                    # Another writer published one of these keys with other
                    # bytes first (engines are not bit-deterministic across
                    # batch shapes): the daemon keeps the first. Count what
                    # is present now; the rest of this save is dropped.
                    local.abort(res)
                    return client.lookup(ns, keys).hits, wrote
                except BaseException:
                    local.abort(res)
                    raise
                return sum(o.result in (PutResult.STORED, PutResult.ALREADY_PRESENT) for o in outcomes), wrote
            # Over gRPC the bytes travel before the daemon can say a block
            # is present: skip the present leading run first (the common
            # case, a save after a partial hit).
            present = client.lookup(ns, keys).hits
            blocks = []
            for i in range(present, len(keys)):
                buf = np.empty(nbytes, dtype=np.uint8)
                fill(i, buf)
                blocks.append(Block(keys[i], buf, parents[i]))
            outcomes = client.put(ns, blocks) if blocks else []
            stored = sum(o.result in (PutResult.STORED, PutResult.ALREADY_PRESENT) for o in outcomes)
            return present + stored, len(blocks)

        stored, wrote = self._with_client("save", call, (0, 0))
        self.stats.saves += 1
        self.stats.blocks_saved += wrote
        self.stats.bytes_saved += wrote * nbytes
        if stored < len(keys):
            self.stats.save_skipped += len(keys) - stored
        self.stats.seconds_saving += time.perf_counter() - t0
        return stored

    def delete(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        return self._with_client("delete", lambda local, client, ns: client.delete(ns, keys).deleted, 0)
