//! The zero-copy data plane for clients on the daemon's node.
//!
//! [`SharedArena::attach`] connects to the daemon's `.shm` socket, receives
//! the DRAM arena's memfd (`SCM_RIGHTS`) and maps it. [`LocalClient`] then
//! stores blocks by reserving slots, writing the bytes straight into the
//! arena and committing; and loads blocks by leasing them, asking for their
//! slots, and copying each once into the caller's buffer, where its checksum
//! is verified before the caller sees success. Only slot offsets cross gRPC.
//!
//! The arena's epoch (random per daemon start) is checked on every call: a
//! daemon that restarted is detected and refused rather than misread.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use memmap2::{MmapOptions, MmapRaw};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use strata_proto::{BlockKey, NamespaceId, pb, shm};

use crate::{Client, Error, PutResult, Result, key_bytes, put_result, shm_path_for};

/// The daemon's DRAM arena, mapped into this process.
pub struct SharedArena {
    map: MmapRaw,
    len: u64,
    epoch: u64,
}

impl std::fmt::Debug for SharedArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedArena")
            .field("len", &self.len)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl SharedArena {
    /// Receives and maps the arena from the hand-off socket at `shm_path`.
    pub fn attach(shm_path: &Path) -> Result<SharedArena> {
        let sock = UnixStream::connect(shm_path).map_err(|e| {
            Error::Shm(format!(
                "cannot connect to {}: {e}; is stratad running with its arena socket on?",
                shm_path.display()
            ))
        })?;
        let mut header = [0u8; shm::HEADER_LEN];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &sock,
            &mut [IoSliceMut::new(&mut header)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| Error::Shm(format!("receiving the arena: {e}")))?;
        let mut fd: Option<OwnedFd> = None;
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                for f in fds {
                    fd.get_or_insert(f);
                }
            }
        }
        let h = shm::Header::decode(&header[..got.bytes]).map_err(Error::Shm)?;
        if h.status != shm::STATUS_OK {
            let mut reason = String::new();
            use std::io::Read;
            let mut len = [0u8; 4];
            let mut s = &sock;
            if s.read_exact(&mut len).is_ok() {
                let n = u32::from_le_bytes(len).min(shm::MAX_REASON_LEN) as usize;
                let mut buf = vec![0u8; n];
                if s.read_exact(&mut buf).is_ok() {
                    reason = String::from_utf8_lossy(&buf).into_owned();
                }
            }
            return Err(Error::Shm(format!(
                "the daemon refused the arena: {reason}"
            )));
        }
        let fd = fd.ok_or_else(|| Error::Shm("the daemon sent no descriptor".into()))?;
        let file = std::fs::File::from(fd);
        let actual = file
            .metadata()
            .map_err(|e| Error::Shm(e.to_string()))?
            .len();
        if actual < h.arena_len {
            return Err(Error::Shm(format!(
                "arena descriptor holds {actual} bytes, header says {}",
                h.arena_len
            )));
        }
        let map = MmapOptions::new()
            .len(h.arena_len as usize)
            .map_raw(&file)
            .map_err(|e| Error::Shm(format!("mapping the arena: {e}")))?;
        // Map every page writable now: first-touch faults during loads and
        // stores would cost more than the copies themselves. Best effort
        // (Linux >= 5.14); without it pages fault in on first use.
        // SAFETY: the range is exactly our new mapping.
        let _ = unsafe {
            rustix::mm::madvise(
                map.as_mut_ptr().cast(),
                h.arena_len as usize,
                rustix::mm::Advice::LinuxPopulateWrite,
            )
        };
        Ok(SharedArena {
            map,
            len: h.arena_len,
            epoch: h.epoch,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::Protocol(format!(
                "slot {offset}+{len} lies outside the {}-byte arena",
                self.len
            )));
        }
        Ok(())
    }

    /// Copies `src` into the arena at `offset` (a slot this client reserved).
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<()> {
        self.check(offset, src.len() as u64)?;
        // SAFETY: in bounds; the daemon gave this reserved range to us only.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.map.as_mut_ptr().add(offset as usize),
                src.len(),
            );
        }
        Ok(())
    }

    /// Copies `src` into the arena at `offset` and returns its checksum, in
    /// one pass over the bytes.
    pub fn write_checksummed(&self, offset: u64, src: &[u8]) -> Result<u64> {
        self.check(offset, src.len() as u64)?;
        // SAFETY: in bounds; the daemon gave this reserved range to us only.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(offset as usize), src.len())
        };
        Ok(strata_kernels::checksum::copy_and_checksum(dst, src))
    }

    /// Copies a slot out into `dst` and returns the checksum of the copy, in
    /// one pass.
    pub fn read_checksummed(&self, offset: u64, dst: &mut [u8]) -> Result<u64> {
        self.check(offset, dst.len() as u64)?;
        // SAFETY: in bounds; the slot is leased, so the daemon does not reuse it.
        let src = unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(offset as usize), dst.len())
        };
        Ok(strata_kernels::checksum::copy_and_checksum(dst, src))
    }

    /// Copies a slot out into `dst` (exactly its length).
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.check(offset, dst.len() as u64)?;
        // SAFETY: in bounds; the slot is leased, so the daemon does not reuse it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset as usize),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
        Ok(())
    }
}

/// Bytes written per commit call: the daemon verifies one part while the
/// client copies the next.
const PIPELINE_BYTES: usize = 2 << 20;

/// A client on the daemon's node: gRPC over the Unix socket plus the mapped arena.
#[derive(Debug)]
pub struct LocalClient {
    client: Client,
    arena: SharedArena,
    /// TTL of the leases taken by loads.
    pub lease_ttl_ms: u32,
}

/// A block to store through the arena.
#[derive(Debug, Clone, Copy)]
pub struct LocalPut<'a> {
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub data: &'a [u8],
}

impl LocalClient {
    /// Connects to the gRPC Unix socket `uds` and maps the arena from `<uds>.shm`.
    pub async fn connect(uds: impl AsRef<Path>) -> Result<LocalClient> {
        let uds = uds.as_ref();
        let client = Client::connect(&format!("unix:{}", uds.display())).await?;
        let shm = shm_path_for(uds);
        let arena = tokio::task::spawn_blocking(move || SharedArena::attach(&shm))
            .await
            .map_err(|e| Error::Shm(e.to_string()))??;
        Ok(LocalClient {
            client,
            arena,
            lease_ttl_ms: 30_000,
        })
    }

    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    pub fn arena(&self) -> &SharedArena {
        &self.arena
    }

    fn check_epoch(&self, epoch: u64) -> Result<()> {
        if epoch != self.arena.epoch {
            return Err(Error::Shm(
                "the daemon restarted since this client mapped its arena; reconnect".into(),
            ));
        }
        Ok(())
    }

    /// Stores blocks: reserve slots, copy each block once into the arena,
    /// commit (the daemon verifies each checksum before publishing).
    pub async fn put(
        &mut self,
        ns: NamespaceId,
        blocks: &[LocalPut<'_>],
    ) -> Result<Vec<PutResult>> {
        let r = self
            .client
            .rpc()
            .reserve(pb::ReserveRequest {
                namespace_id: ns.0,
                blocks: blocks
                    .iter()
                    .map(|b| pb::ReserveBlock {
                        key: key_bytes(&b.key),
                        parent: b.parent.as_ref().map(key_bytes).unwrap_or_default(),
                        length: b.data.len() as u64,
                    })
                    .collect(),
                ttl_ms: 0,
            })
            .await?
            .into_inner();
        if r.reservations.len() != blocks.len() {
            return Err(Error::Protocol(
                "reservation count differs from block count".into(),
            ));
        }
        // Write and commit in parts of about PIPELINE_BYTES: the daemon
        // verifies and publishes one part while this thread copies the next.
        let mut pending = Vec::new();
        let mut part = Vec::new();
        let mut part_bytes = 0usize;
        let mut failed = None;
        for (b, res) in blocks.iter().zip(&r.reservations) {
            if failed.is_some() || res.already_present {
                continue;
            }
            let written = self.check_epoch(r.arena_epoch).and_then(|_| {
                let slot = res
                    .slot
                    .as_ref()
                    .ok_or_else(|| Error::Protocol("reservation without a slot".into()))?;
                if slot.length != b.data.len() as u64 {
                    return Err(Error::Protocol(
                        "slot length differs from block length".into(),
                    ));
                }
                self.arena.write_checksummed(slot.offset, b.data)
            });
            match written {
                Ok(checksum) => {
                    part.push(pb::CommitBlock {
                        reservation_id: res.reservation_id,
                        checksum,
                    });
                    part_bytes += b.data.len();
                    if part_bytes >= PIPELINE_BYTES {
                        pending.push(self.spawn_commit(std::mem::take(&mut part)));
                        part_bytes = 0;
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            // Let the parts already sent finish, then hand back every other
            // reservation (aborting a committed one is a no-op).
            let ids = r
                .reservations
                .iter()
                .map(|x| x.reservation_id)
                .filter(|&i| i != 0)
                .collect();
            for p in pending {
                let _ = p.await;
            }
            let _ = self
                .client
                .rpc()
                .abort(pb::AbortRequest {
                    reservation_ids: ids,
                })
                .await;
            return Err(e);
        }
        if !part.is_empty() {
            pending.push(self.spawn_commit(part));
        }
        let mut committed = Vec::new();
        let mut first_err = None;
        for p in pending {
            match p.await {
                Ok(Ok(o)) => committed.extend(o),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(Error::Protocol(format!("commit task: {e}")));
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let mut committed = committed.into_iter();
        r.reservations
            .iter()
            .map(|res| {
                if res.already_present {
                    Ok(PutResult::AlreadyPresent)
                } else {
                    let o = committed
                        .next()
                        .ok_or_else(|| Error::Protocol("missing commit outcome".into()))?;
                    put_result(o.result)
                }
            })
            .collect()
    }

    fn spawn_commit(
        &mut self,
        blocks: Vec<pb::CommitBlock>,
    ) -> tokio::task::JoinHandle<Result<Vec<pb::PutOutcome>>> {
        let mut rpc = self.client.rpc().clone();
        tokio::spawn(async move {
            Ok(rpc
                .commit(pb::CommitRequest { blocks })
                .await?
                .into_inner()
                .outcomes)
        })
    }

    /// Loads the longest present prefix of `keys` into `dst` (one buffer per
    /// key, each at least the block's length): one Lookup takes a lease and
    /// returns the slots, each block is copied once and its checksum verified
    /// on the copy, and the lease is released in the background. Returns the
    /// length of every block loaded; fewer than `keys.len()` means the rest
    /// must be recomputed (absent, or a checksum failed: a doubt is a miss).
    pub async fn load_prefix(
        &mut self,
        ns: NamespaceId,
        keys: &[BlockKey],
        dst: &mut [&mut [u8]],
    ) -> Result<Vec<usize>> {
        assert!(dst.len() >= keys.len(), "one destination buffer per key");
        let r = self
            .client
            .rpc()
            .lookup(pb::LookupRequest {
                namespace_id: ns.0,
                keys: keys.iter().map(key_bytes).collect(),
                lease_ttl_ms: self.lease_ttl_ms,
                want_slots: true,
            })
            .await?
            .into_inner();
        if r.lease_id == 0 {
            return Ok(Vec::new());
        }
        let res = self
            .check_epoch(r.arena_epoch)
            .and_then(|_| self.copy_slots(&r.slots, dst));
        // Off the critical path: a lost release only costs the lease's TTL.
        let mut rpc = self.client.rpc().clone();
        let release = pb::ReleaseRequest {
            lease_id: r.lease_id,
            namespace_id: ns.0,
        };
        tokio::spawn(async move {
            let _ = rpc.release(release).await;
        });
        res
    }

    /// Loads blocks under a lease taken elsewhere (say, by a scheduler
    /// process): asks for their slots, then copies and verifies as
    /// [`load_prefix`](Self::load_prefix) does. The lease stays held.
    pub async fn load_leased(
        &mut self,
        ns: NamespaceId,
        lease: strata_proto::LeaseId,
        keys: &[BlockKey],
        dst: &mut [&mut [u8]],
    ) -> Result<Vec<usize>> {
        let r = self
            .client
            .rpc()
            .get_slots(pb::GetSlotsRequest {
                namespace_id: ns.0,
                lease_id: lease.0,
                keys: keys.iter().map(key_bytes).collect(),
            })
            .await?
            .into_inner();
        self.check_epoch(r.arena_epoch)?;
        self.copy_slots(&r.slots, dst)
    }

    fn copy_slots(&self, slots: &[pb::Slot], dst: &mut [&mut [u8]]) -> Result<Vec<usize>> {
        let mut lens = Vec::with_capacity(slots.len());
        for (slot, out) in slots.iter().zip(dst.iter_mut()) {
            let n = slot.length as usize;
            if out.len() < n {
                return Err(Error::Protocol(format!(
                    "destination buffer of {} bytes for a block of {n}",
                    out.len()
                )));
            }
            if self.arena.read_checksummed(slot.offset, &mut out[..n])? != slot.checksum {
                break; // a miss from here on
            }
            lens.push(n);
        }
        Ok(lens)
    }
}
