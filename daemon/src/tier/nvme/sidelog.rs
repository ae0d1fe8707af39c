//! Reading the small append-only files kept beside the segments
//! (`layouts.v1`, `evictions.v1`): a sequence of entries, each starting
//! with a 4-byte magic of three letters and a format version digit
//! (`SLY1`, `SEV1`) and carrying its own checksum.
//!
//! Rules, shared by both files:
//! * an entry that does not check (a torn append, bit rot) is skipped, and
//!   reading resumes at the next magic whose entry checks: entries appended
//!   after a torn one are never lost;
//! * an entry whose magic names another version was written by another
//!   release: reading stops there (its length is unknown), the file is
//!   marked read-only (never appended to, never rewritten) and the caller
//!   logs it with the file and the version.

use std::path::Path;

/// What a read of a side file found.
#[derive(Debug)]
pub struct Read<T> {
    pub entries: Vec<T>,
    /// Damaged spans skipped.
    pub damaged: usize,
    /// An entry of another format version: (offset, version character).
    pub unknown_version: Option<(usize, char)>,
}

/// Reads entries of `data`: `prefix` is the magic's three letters,
/// `version` the digit this build writes; `parse` decodes one entry at the
/// start of its argument (magic included) and returns it with its length,
/// or `None` if it does not check.
pub fn read<T>(
    data: &[u8],
    prefix: &[u8; 3],
    version: u8,
    parse: impl Fn(&[u8]) -> Option<(T, usize)>,
) -> Read<T> {
    let mut out = Read {
        entries: Vec::new(),
        damaged: 0,
        unknown_version: None,
    };
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        if rest.len() >= 4 && rest[..3] == prefix[..] && rest[3] != version {
            out.unknown_version = Some((pos, rest[3] as char));
            break;
        }
        if let Some((e, used)) = parse(rest) {
            out.entries.push(e);
            pos += used;
            continue;
        }
        // Damaged: resume at the next magic of our version.
        out.damaged += 1;
        let magic = [prefix[0], prefix[1], prefix[2], version];
        match data[pos + 1..].windows(4).position(|w| w == magic) {
            Some(i) => pos += 1 + i,
            None => break,
        }
    }
    out
}

/// Files named `<stem>.v<N>` in `dir` whose version `N` is not `version`
/// (a newer or older release's side files): their paths and versions.
pub fn other_versions(dir: &Path, stem: &str, version: u32) -> Vec<(std::path::PathBuf, String)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let prefix = format!("{stem}.v");
    let mut out: Vec<_> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let v = name.strip_prefix(&prefix)?;
            (v != version.to_string()).then(|| (e.path(), v.to_string()))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> Option<(u8, usize)> {
        // Test entries: "ABC1" + one byte + that byte again as a checksum.
        (b.len() >= 6 && &b[..4] == b"ABC1" && b[4] == b[5]).then(|| (b[4], 6))
    }

    #[test]
    fn resyncs_after_damage_and_stops_at_another_version() {
        let mut d = b"ABC1xxABC1yz".to_vec(); // second entry damaged
        d.extend_from_slice(b"ABC1zz");
        let r = read(&d, b"ABC", b'1', parse);
        assert_eq!(r.entries, vec![b'x', b'z']);
        assert_eq!(r.damaged, 1);
        assert_eq!(r.unknown_version, None);
        // A torn tail followed by a full entry appended later.
        let d = b"ABC1xxABC1qABC1ww".to_vec();
        let r = read(&d, b"ABC", b'1', parse);
        assert_eq!(r.entries, vec![b'x', b'w']);
        // Another version: reading stops there.
        let d = b"ABC1xxABC2??????ABC1zz".to_vec();
        let r = read(&d, b"ABC", b'1', parse);
        assert_eq!(r.entries, vec![b'x']);
        assert_eq!(r.unknown_version, Some((6, '2')));
    }
}
