//! Namespace evictions, recorded beside the segments (`evictions.v1`) so
//! that a restart does not bring evicted blocks back: one entry per
//! `EvictNamespace` call, meaning "every record of namespace `id` with a
//! sequence number below `seq` is void". One small entry instead of a
//! 4 KiB tombstone record per block. The tier stores the pairs; the store
//! applies them at recovery.
//!
//! Format, per entry, little-endian (28 bytes):
//!
//! ```text
//! magic "SEV1" | namespace id u64 | seq u64 | XXH3-64 of bytes 0..20
//! ```
//!
//! Read and appended like `layouts.v1` (see `sidelog`): damaged entries are
//! skipped, an entry of another format version makes the file read-only.
//! The file only grows by 28 bytes per eviction; it is never rewritten.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::sidelog;

const MAGIC: &[u8; 4] = b"SEV1";
/// Format version of the file (the digit of its magic and of its name).
pub const VERSION: u32 = 1;
/// File name inside the tier's directory.
pub const FILE_NAME: &str = "evictions.v1";
const ENTRY: usize = 28;

/// Entries found at open: (namespace id, sequence number mark).
pub type Found = Vec<(u64, u64)>;

#[derive(Debug)]
pub struct EvictionLog {
    path: PathBuf,
    /// Serialises appends.
    lock: Mutex<()>,
    read_only: Option<String>,
}

fn encode(ns: u64, seq: u64) -> [u8; ENTRY] {
    let mut e = [0u8; ENTRY];
    e[..4].copy_from_slice(MAGIC);
    e[4..12].copy_from_slice(&ns.to_le_bytes());
    e[12..20].copy_from_slice(&seq.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&e[..20]);
    e[20..].copy_from_slice(&sum.to_le_bytes());
    e
}

fn decode(b: &[u8]) -> Option<((u64, u64), usize)> {
    if b.len() < ENTRY || &b[..4] != MAGIC {
        return None;
    }
    let u = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    (xxhash_rust::xxh3::xxh3_64(&b[..20]) == u(20)).then(|| ((u(4), u(12)), ENTRY))
}

impl EvictionLog {
    /// Opens (or starts) the file in `dir`; returns the valid entries and,
    /// when the file holds entries of another format version, a line
    /// naming the file and the version (the file is then read-only).
    pub fn open(dir: &Path) -> io::Result<(EvictionLog, Found, Option<String>)> {
        let path = dir.join(FILE_NAME);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let r = sidelog::read(&data, b"SEV", MAGIC[3], decode);
        if r.damaged > 0 {
            tracing::warn!(path = %path.display(), damaged = r.damaged, "evictions file holds damaged entries; skipped them");
        }
        let read_only = r.unknown_version.map(|(offset, v)| {
            format!(
                "{}: entry at byte {offset} has format version {v}; this stratad reads version {VERSION}; the file is left untouched",
                path.display()
            )
        });
        Ok((
            EvictionLog {
                path,
                lock: Mutex::new(()),
                read_only: read_only.clone(),
            },
            r.entries,
            read_only,
        ))
    }

    /// Records that records of namespace `ns` below `seq` are void
    /// (appended and fdatasync'd before it returns).
    pub fn append(&self, ns: u64, seq: u64) -> io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &self.read_only {
            return Err(io::Error::other(format!("not appending: {why}")));
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&encode(ns, seq))?;
        f.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopen_and_damage_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (log, found, ro) = EvictionLog::open(dir.path()).unwrap();
        assert!(found.is_empty() && ro.is_none());
        log.append(7, 100).unwrap();
        log.append(9, 200).unwrap();
        let (_, found, _) = EvictionLog::open(dir.path()).unwrap();
        assert_eq!(found, vec![(7, 100), (9, 200)]);
        let path = dir.path().join(FILE_NAME);
        let mut data = std::fs::read(&path).unwrap();
        data[6] ^= 1; // the first entry's namespace id
        std::fs::write(&path, &data).unwrap();
        let (_, found, _) = EvictionLog::open(dir.path()).unwrap();
        assert_eq!(found, vec![(9, 200)]);
        data.extend_from_slice(b"SEV3 from a newer release");
        std::fs::write(&path, &data).unwrap();
        let (log, found, ro) = EvictionLog::open(dir.path()).unwrap();
        assert_eq!(found, vec![(9, 200)]);
        assert!(ro.unwrap().contains("version 3"));
        assert!(log.append(1, 1).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }
}
