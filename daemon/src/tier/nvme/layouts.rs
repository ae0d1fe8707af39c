//! The layouts of the namespaces the tier holds blocks of: a small
//! append-only file beside the segments (`layouts.v1`), so that a restart
//! knows the shape of the blocks it recovers (Attend's summaries are
//! computed from each record during the recovery scan).
//!
//! The tier stores opaque bytes (the layout's canonical encoding) with the
//! namespace id they hash to; the store decodes them. Format, per entry,
//! little-endian:
//!
//! ```text
//! magic "SLY1" | len u32 | bytes[len] | id u64 = XXH3-64(bytes)
//! ```
//!
//! The id doubles as the entry's checksum. Reading follows `sidelog`: a
//! damaged entry (a torn append at the end) is skipped and reading resumes
//! at the next entry that checks; an entry of another format version
//! (`SLY2`, written by another release) stops the reading and makes the
//! file read-only for this process: it is never appended to or rewritten,
//! and new layouts are then not persisted (logged). Entries are appended
//! with `O_APPEND` and `fdatasync`, once per namespace.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::sidelog;

const MAGIC: &[u8; 4] = b"SLY1";
/// Format version of the file (the digit of its magic and of its name).
pub const VERSION: u32 = 1;
/// File name inside the tier's directory.
pub const FILE_NAME: &str = "layouts.v1";
/// Longest entry accepted (a layout encodes in well under 1 KiB).
const MAX_ENTRY: usize = 64 << 10;

/// Entries found at open: (namespace id, canonical bytes).
pub type Found = Vec<(u64, Vec<u8>)>;

#[derive(Debug)]
pub struct LayoutLog {
    path: PathBuf,
    /// Ids already in the file (found at open, or appended since).
    known: Mutex<HashSet<u64>>,
    /// Why the file must not be appended to (it holds an entry of another
    /// format version).
    read_only: Option<String>,
}

impl LayoutLog {
    /// Opens (or starts) the file in `dir`; returns the valid entries and,
    /// when the file holds entries of another format version, a line
    /// naming the file and the version (the file is then read-only).
    pub fn open(dir: &Path) -> io::Result<(LayoutLog, Found, Option<String>)> {
        let path = dir.join(FILE_NAME);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let r = sidelog::read(&data, b"SLY", MAGIC[3], |b| {
            entry(b).map(|(id, bytes, used)| ((id, bytes.to_vec()), used))
        });
        if r.damaged > 0 {
            tracing::warn!(
                path = %path.display(),
                damaged = r.damaged,
                "layouts file holds damaged entries (a torn append?); skipped them"
            );
        }
        let read_only = r.unknown_version.map(|(offset, v)| {
            format!(
                "{}: entry at byte {offset} has format version {v}; this stratad reads version {VERSION}; the file is left untouched",
                path.display()
            )
        });
        let mut found = Vec::new();
        let mut known = HashSet::new();
        for (id, bytes) in r.entries {
            if known.insert(id) {
                found.push((id, bytes));
            }
        }
        Ok((
            LayoutLog {
                path,
                known: Mutex::new(known),
                read_only: read_only.clone(),
            },
            found,
            read_only,
        ))
    }

    /// Appends `bytes` under `id` unless the file holds it already.
    pub fn append(&self, id: u64, bytes: &[u8]) -> io::Result<()> {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.contains(&id) {
            return Ok(());
        }
        if let Some(why) = &self.read_only {
            return Err(io::Error::other(format!("not appending: {why}")));
        }
        let mut rec = Vec::with_capacity(16 + bytes.len());
        rec.extend_from_slice(MAGIC);
        rec.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        rec.extend_from_slice(bytes);
        rec.extend_from_slice(&id.to_le_bytes());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&rec)?;
        f.sync_data()?;
        known.insert(id);
        Ok(())
    }
}

/// Decodes one entry at the start of `b`: (id, bytes, bytes consumed).
fn entry(b: &[u8]) -> Option<(u64, &[u8], usize)> {
    if b.len() < 8 || &b[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(b[4..8].try_into().ok()?) as usize;
    if len > MAX_ENTRY || b.len() < 16 + len {
        return None;
    }
    let bytes = &b[8..8 + len];
    let id = u64::from_le_bytes(b[8 + len..16 + len].try_into().ok()?);
    (xxhash_rust::xxh3::xxh3_64(bytes) == id).then_some((id, bytes, 16 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopen_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (log, found, _) = LayoutLog::open(dir.path()).unwrap();
        assert!(found.is_empty());
        let a = b"layout a".to_vec();
        let b = b"layout bb".to_vec();
        let (ia, ib) = (
            xxhash_rust::xxh3::xxh3_64(&a),
            xxhash_rust::xxh3::xxh3_64(&b),
        );
        log.append(ia, &a).unwrap();
        log.append(ia, &a).unwrap(); // once per id
        log.append(ib, &b).unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 2 * 16 + a.len() + b.len());
        // A torn append: half an entry at the end.
        data.extend_from_within(..10);
        std::fs::write(&path, &data).unwrap();
        let (log, found, ro) = LayoutLog::open(dir.path()).unwrap();
        assert_eq!(found, vec![(ia, a.clone()), (ib, b.clone())]);
        assert!(ro.is_none());
        // An entry appended after the torn one is found on the next open.
        let c = b"layout ccc".to_vec();
        let ic = xxhash_rust::xxh3::xxh3_64(&c);
        log.append(ic, &c).unwrap();
        let (_, found, _) = LayoutLog::open(dir.path()).unwrap();
        assert_eq!(found, vec![(ia, a.clone()), (ib, b.clone()), (ic, c)]);
        // A damaged entry is never handed out.
        let mut data = std::fs::read(&path).unwrap();
        data[10] ^= 1;
        std::fs::write(&path, &data).unwrap();
        let (_, found, _) = LayoutLog::open(dir.path()).unwrap();
        assert!(!found.iter().any(|(id, _)| *id == ia), "{found:?}");
        assert_eq!(found.len(), 2);
    }

    #[test]
    fn an_entry_of_another_version_makes_the_file_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _) = LayoutLog::open(dir.path()).unwrap();
        let a = b"layout a".to_vec();
        let ia = xxhash_rust::xxh3::xxh3_64(&a);
        log.append(ia, &a).unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut data = std::fs::read(&path).unwrap();
        data.extend_from_slice(b"SLY2 something newer");
        std::fs::write(&path, &data).unwrap();
        let (log, found, ro) = LayoutLog::open(dir.path()).unwrap();
        assert_eq!(found, vec![(ia, a)]);
        let why = ro.expect("refused");
        assert!(
            why.contains("layouts.v1") && why.contains("version 2"),
            "{why}"
        );
        let b = b"layout b".to_vec();
        let e = log.append(xxhash_rust::xxh3::xxh3_64(&b), &b).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), data, "the file changed");
    }
}
