//! The arena hand-off protocol on the daemon's `.shm` Unix socket.
//!
//! gRPC cannot carry file descriptors, so a local client that wants the
//! zero-copy data plane connects to this socket. The daemon checks the
//! client's peer credentials and answers with one fixed header; when the
//! status is [`STATUS_OK`] the arena's memfd rides along as `SCM_RIGHTS`.
//! Otherwise a little-endian `u32` length and a UTF-8 reason follow.
//!
//! ```text
//! offset size field
//!      0    8 magic      "STRSHM01"
//!      8    4 version    u32 LE (= 1)
//!     12    4 status     u32 LE (0 ok, 1 refused)
//!     16    8 arena_len  u64 LE, bytes to map
//!     24    8 epoch      u64 LE, as in ReserveResponse / GetSlotsResponse
//! ```

pub const MAGIC: [u8; 8] = *b"STRSHM01";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;
pub const STATUS_OK: u32 = 0;
pub const STATUS_REFUSED: u32 = 1;
/// Longest refusal reason the daemon sends.
pub const MAX_REASON_LEN: u32 = 4096;

const _: () = assert!(HEADER_LEN == 8 + 4 + 4 + 8 + 8);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub status: u32,
    pub arena_len: u64,
    pub epoch: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.status.to_le_bytes());
        b[16..24].copy_from_slice(&self.arena_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN {
            return Err(format!(
                "short hand-off header: {} of {HEADER_LEN} bytes",
                b.len()
            ));
        }
        if b[0..8] != MAGIC {
            return Err("not a Strata arena socket (bad magic)".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let h = Header {
            version: u32_at(8),
            status: u32_at(12),
            arena_len: u64_at(16),
            epoch: u64_at(24),
        };
        if h.version != VERSION {
            return Err(format!(
                "arena hand-off version {} is not supported by this client (expects {VERSION}); upgrade the client",
                h.version
            ));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let h = Header {
            version: VERSION,
            status: STATUS_OK,
            arena_len: 1 << 30,
            epoch: 77,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut b = h.encode();
        b[8] = 9;
        assert!(Header::decode(&b).unwrap_err().contains("version 9"));
        b[0] = b'X';
        assert!(Header::decode(&b).unwrap_err().contains("magic"));
        assert!(Header::decode(&b[..4]).is_err());
    }
}
