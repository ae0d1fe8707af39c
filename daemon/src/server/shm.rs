//! Hands the DRAM arena's memfd to authorised local clients
//! (`strata_proto::shm` describes the protocol).
//!
//! A client is identified by the kernel's peer credentials of its Unix
//! socket connection (`SO_PEERCRED`), never by anything it says. Only uids in
//! the allowed list receive the descriptor; everyone else gets a refusal
//! with the reason, and the refusal is counted.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::sync::Arc;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use strata_proto::shm;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::metrics::ServerMetrics;
use crate::store::Store;

/// Who may receive the arena. `None` = any local user.
#[derive(Debug, Clone)]
pub struct ShmPolicy {
    pub allowed_uids: Option<Vec<u32>>,
}

impl ShmPolicy {
    /// The configured list, where an empty list means the daemon's own uid
    /// and root.
    pub fn from_config(allowed: Option<Vec<u32>>) -> Self {
        let allowed_uids = allowed.map(|v| {
            if v.is_empty() {
                vec![rustix::process::getuid().as_raw(), 0]
            } else {
                v
            }
        });
        ShmPolicy { allowed_uids }
    }

    fn allows(&self, uid: u32) -> bool {
        self.allowed_uids.as_ref().is_none_or(|v| v.contains(&uid))
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
    if !policy.allows(cred.uid()) {
        metrics.shm_refused.increment(1);
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "refused the arena to a local client");
        header.status = shm::STATUS_REFUSED;
        let reason = format!(
            "uid {} may not map the arena; add it to server.shm_allowed_uids or use Put/Get over gRPC",
            cred.uid()
        );
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
