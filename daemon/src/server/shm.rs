//! Hands the DRAM arena's memfd to authorised local clients
//! (`strata_proto::shm` describes the protocol).
//!
//! A client is identified by the kernel's peer credentials of its Unix
//! socket connection (`SO_PEERCRED`), never by anything it says. It receives
//! the descriptor only if both agree: its uid is in the allowed list
//! (`server.shm_allowed_uids`; empty: the daemon's uid and root, or, with
//! authentication on the Unix socket, any uid) and, with authentication on
//! the Unix socket, its uid or gid maps to a tenant with `zero_copy =
//! true`. Everyone else
//! gets a refusal with the reason, and the refusal is counted. The memfd
//! is never linked into a file system: the descriptor passed here is the
//! only way to map it.
//!
//! The arena is one mapping shared by every client that maps it: a tenant
//! that may map it can read any DRAM block by address, bypassing the calls
//! that check namespace ownership (its writes to other blocks are caught by
//! their checksums). So `zero_copy` is for tenants that trust each other;
//! the calls themselves (Reserve, Commit, GetSlots, Lookup with slots) still
//! hand a tenant only the slots of its own namespaces.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::sync::Arc;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use strata_proto::shm;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::auth::Auth;
use crate::metrics::ServerMetrics;
use crate::store::Store;

/// Who may receive the arena.
#[derive(Debug, Clone)]
pub struct ShmPolicy {
    /// `None` = any local user.
    pub allowed_uids: Option<Vec<u32>>,
    pub auth: Arc<Auth>,
}

impl ShmPolicy {
    /// The configured list, where an empty list means the daemon's own uid
    /// and root; or, when the Unix socket authenticates (`auth.uds =
    /// "peercred"`), that the tenants' `zero_copy` flags decide alone.
    pub fn from_config(allowed: Option<Vec<u32>>, auth: Arc<Auth>) -> Self {
        let allowed_uids = match allowed {
            Some(v) if v.is_empty() && auth.local_peers_authenticated() => None,
            Some(v) if v.is_empty() => Some(vec![rustix::process::getuid().as_raw(), 0]),
            other => other,
        };
        ShmPolicy { allowed_uids, auth }
    }

    /// Why a local peer may not map the arena (None: it may).
    pub fn refusal(&self, uid: u32, gid: u32) -> Option<String> {
        if !self.allowed_uids.as_ref().is_none_or(|v| v.contains(&uid)) {
            return Some(format!(
                "uid {uid} may not map the arena; add it to server.shm_allowed_uids or use Put/Get over gRPC"
            ));
        }
        match self.auth.local_tenant(uid, gid) {
            Err(s) => Some(s.message().to_string()),
            Ok(t) => self
                .auth
                .check_zero_copy(&t)
                .err()
                .map(|s| s.message().to_string()),
        }
    }
}

pub async fn serve(
    listener: UnixListener,
    store: Arc<Store>,
    policy: ShmPolicy,
    metrics: Arc<ServerMetrics>,
    stop: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let (store, policy, metrics) = (store.clone(), policy.clone(), metrics.clone());
                tokio::spawn(async move {
                    if let Err(e) = hand_off(stream, &store, &policy, &metrics).await {
                        tracing::debug!(error = %e, "arena hand-off failed");
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accepting on the arena socket");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn hand_off(
    mut stream: UnixStream,
    store: &Store,
    policy: &ShmPolicy,
    metrics: &ServerMetrics,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let dram = store.dram();
    let mut header = shm::Header {
        version: shm::VERSION,
        status: shm::STATUS_OK,
        arena_len: dram.capacity_bytes(),
        epoch: dram.epoch(),
    };
    if let Some(reason) = policy.refusal(cred.uid(), cred.gid()) {
        metrics.shm_refused.increment(1);
        tracing::warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), %reason, "refused the arena to a local client");
        header.status = shm::STATUS_REFUSED;
        let mut msg = header.encode().to_vec();
        msg.extend_from_slice(&(reason.len() as u32).to_le_bytes());
        msg.extend_from_slice(reason.as_bytes());
        return stream.write_all(&msg).await;
    }
    let bytes = header.encode();
    let fd = dram.memfd();
    loop {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [fd];
            control.push(SendAncillaryMessage::ScmRights(&fds));
            rustix::net::sendmsg(
                &stream,
                &[IoSlice::new(&bytes)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) if n == bytes.len() => break,
            // A 32-byte message on a fresh Unix stream is never split; if it
            // were, the client would see a short header and reconnect.
            Ok(n) => {
                return Err(std::io::Error::other(format!(
                    "short hand-off write: {n} bytes"
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    metrics.shm_clients.increment(1);
    tracing::debug!(uid = cred.uid(), pid = ?cred.pid(), "handed the arena to a local client");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Registry;

    fn policy(toml: &str) -> ShmPolicy {
        let r = Config::from_toml(toml).unwrap().resolve().unwrap();
        let names: Vec<String> = r.auth.tenants.iter().map(|t| t.name.clone()).collect();
        let auth = Auth::new(
            &r.auth,
            |n| names.iter().position(|x| x == n).map(|i| i as u32),
            &Registry::new(),
        )
        .unwrap();
        ShmPolicy::from_config(r.shm_allowed_uids, Arc::new(auth))
    }

    #[test]
    fn who_may_map_the_arena() {
        let me = rustix::process::getuid().as_raw();
        let other = me.wrapping_add(1000);
        // No authentication: the daemon's uid and root, or the list.
        let p = policy("");
        assert!(p.refusal(me, 0).is_none() && p.refusal(0, 0).is_none());
        assert!(p.refusal(other, 0).unwrap().contains("shm_allowed_uids"));
        let p = policy(&format!("[server]\nshm_allowed_uids = [\"{other}\"]\n"));
        assert!(p.refusal(other, 0).is_none() && p.refusal(me, 0).is_some());
        // Peer credentials: the tenants decide (a mapped uid with
        // zero_copy), unless a list narrows it further.
        let peer = format!(
            "[auth]\nuds = \"peercred\"\n[[tenants]]\nname = \"a\"\nuids = [{other}]\nzero_copy = true\n\
             [[tenants]]\nname = \"b\"\ngids = [77]\n"
        );
        let p = policy(&peer);
        assert!(p.refusal(other, 5).is_none());
        assert!(p.refusal(me, 5).unwrap().contains("not mapped to a tenant"));
        assert!(
            p.refusal(me.wrapping_add(2000), 77)
                .unwrap()
                .contains("zero_copy = false")
        );
        let p = policy(&format!("[server]\nshm_allowed_uids = [\"{me}\"]\n{peer}"));
        assert!(p.refusal(other, 5).unwrap().contains("shm_allowed_uids"));
    }
}
