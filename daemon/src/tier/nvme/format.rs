//! The on-disk format of NVMe segments, version 1.
//!
//! A segment is one file `seg-<id as 16 hex digits>.strata`. Its first
//! 4096 bytes are the segment header; records follow at 4096-aligned
//! offsets. A record is a 128-byte header, the payload, and zero padding to
//! the next 4096 boundary, written with one O_DIRECT write.
//!
//! ```text
//! segment header (4096 bytes, little-endian)
//!   0  8  magic "STRSEG01"
//!   8  4  format version (1)
//!  12  4  header length (4096)
//!  16  8  segment id
//!  24  8  created, unix ms
//!  32  ..  zero
//! 4088 8  XXH3-64 of bytes 0..4088
//!
//! record header (128 bytes, little-endian)
//!   0  4  magic 0x5354524B ("KRTS" on disk)
//!   4  2  format version (1)
//!   6  1  kind: 1 block, 2 tombstone
//!   7  1  key length (1..=32)
//!   8  1  parent key length (0 = none)
//!   9  7  zero
//!  16  8  namespace id
//!  24  8  sequence number (global, strictly increasing per daemon data dir)
//!  32  8  segment id (guards against a record image read from elsewhere)
//!  40  4  payload length
//!  44  4  zero
//!  48  8  XXH3-64 of the payload
//!  56 32  key (zero padded)
//!  88 32  parent key (zero padded)
//! 120  8  XXH3-64 of bytes 0..120
//! ```
//!
//! Invariants: a record is accepted only if its magic, version, segment id
//! and header checksum are right and its payload hashes to the recorded
//! checksum; anything else is a torn or foreign write and is skipped. A
//! version this build does not know is refused, never guessed at.

use strata_proto::{BlockKey, NamespaceId};

use super::buf::ALIGN;

pub const SEGMENT_MAGIC: [u8; 8] = *b"STRSEG01";
pub const RECORD_MAGIC: u32 = 0x4B52_5453;
pub const FORMAT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: usize = 4096;
pub const RECORD_HEADER_LEN: usize = 128;

const _: () = assert!(SEGMENT_HEADER_LEN == ALIGN);
const _: () = assert!(RECORD_HEADER_LEN + 32 * 2 <= ALIGN);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Block,
    /// The key was deleted; older records of it are void.
    Tombstone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub namespace: NamespaceId,
    pub seq: u64,
    pub segment: u64,
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub len: u32,
    pub checksum: u64,
}

/// Why bytes at a record position are not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotARecord {
    /// No magic: an unwritten or torn position.
    Empty,
    /// A damaged header (torn write, bit rot).
    Corrupt(&'static str),
    /// A record of another segment (a stale image).
    Foreign,
    /// A valid record of a format this build does not read.
    UnknownVersion(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u32,
    pub id: u64,
    pub created_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadSegment {
    Magic,
    Checksum,
    /// The header is intact but of a version this build does not read.
    UnknownVersion(u32),
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

impl SegmentHeader {
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..SEGMENT_HEADER_LEN];
        out.fill(0);
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.id.to_le_bytes());
        out[24..32].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        let sum = strata_proto::checksum(&out[..SEGMENT_HEADER_LEN - 8]);
        out[SEGMENT_HEADER_LEN - 8..].copy_from_slice(&sum.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, BadSegment> {
        if b.len() < 12 || b[0..8] != SEGMENT_MAGIC {
            return Err(BadSegment::Magic);
        }
        // The version first: another format may put its checksum elsewhere.
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(BadSegment::UnknownVersion(version));
        }
        if b.len() < SEGMENT_HEADER_LEN {
            return Err(BadSegment::Checksum);
        }
        let sum = strata_proto::checksum(&b[..SEGMENT_HEADER_LEN - 8]);
        if sum != u64_at(b, SEGMENT_HEADER_LEN - 8) {
            return Err(BadSegment::Checksum);
        }
        Ok(SegmentHeader {
            version,
            id: u64_at(b, 16),
            created_unix_ms: u64_at(b, 24),
        })
    }
}

/// Bytes a record of `payload` bytes occupies on disk.
pub fn record_span(payload: usize) -> usize {
    (RECORD_HEADER_LEN + payload).next_multiple_of(ALIGN)
}

impl RecordHeader {
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..RECORD_HEADER_LEN];
        out.fill(0);
        out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&(FORMAT_VERSION as u16).to_le_bytes());
        out[6] = match self.kind {
            RecordKind::Block => 1,
            RecordKind::Tombstone => 2,
        };
        out[7] = self.key.len() as u8;
        out[8] = self.parent.map_or(0, |p| p.len() as u8);
        out[16..24].copy_from_slice(&self.namespace.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.seq.to_le_bytes());
        out[32..40].copy_from_slice(&self.segment.to_le_bytes());
        out[40..44].copy_from_slice(&self.len.to_le_bytes());
        out[48..56].copy_from_slice(&self.checksum.to_le_bytes());
        out[56..56 + self.key.len()].copy_from_slice(self.key.as_bytes());
        if let Some(p) = self.parent {
            out[88..88 + p.len()].copy_from_slice(p.as_bytes());
        }
        let sum = strata_proto::checksum(&out[..120]);
        out[120..128].copy_from_slice(&sum.to_le_bytes());
    }

    /// Parses a record header found in segment `segment`. The payload is
    /// checked separately (the caller has it).
    pub fn decode(b: &[u8], segment: u64) -> Result<RecordHeader, NotARecord> {
        if b.len() < RECORD_HEADER_LEN || u32_at(b, 0) != RECORD_MAGIC {
            return Err(NotARecord::Empty);
        }
        if strata_proto::checksum(&b[..120]) != u64_at(b, 120) {
            return Err(NotARecord::Corrupt("header checksum"));
        }
        let version = u16_at(b, 4);
        if version as u32 != FORMAT_VERSION {
            return Err(NotARecord::UnknownVersion(version));
        }
        if u64_at(b, 32) != segment {
            return Err(NotARecord::Foreign);
        }
        let kind = match b[6] {
            1 => RecordKind::Block,
            2 => RecordKind::Tombstone,
            _ => return Err(NotARecord::Corrupt("kind")),
        };
        let key_len = b[7] as usize;
        let parent_len = b[8] as usize;
        let key = BlockKey::new(&b[56..56 + key_len.min(32)])
            .map_err(|_| NotARecord::Corrupt("key length"))?;
        if key_len > 32 || parent_len > 32 {
            return Err(NotARecord::Corrupt("key length"));
        }
        let parent = if parent_len == 0 {
            None
        } else {
            Some(
                BlockKey::new(&b[88..88 + parent_len])
                    .map_err(|_| NotARecord::Corrupt("parent length"))?,
            )
        };
        Ok(RecordHeader {
            kind,
            namespace: NamespaceId(u64_at(b, 16)),
            seq: u64_at(b, 24),
            segment,
            key,
            parent,
            len: u32_at(b, 40),
            checksum: u64_at(b, 48),
        })
    }
}

/// The file name of segment `id`.
pub fn segment_file_name(id: u64) -> String {
    format!("seg-{id:016x}.strata")
}

/// The segment id a file name encodes, if it is a segment file.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?.strip_suffix(".strata")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Block,
            namespace: NamespaceId(0xfeed),
            seq: 42,
            segment: 7,
            key: BlockKey::new(&[1; 32]).unwrap(),
            parent: Some(BlockKey::new(&[2, 3]).unwrap()),
            len: 12345,
            checksum: 0xabcdef,
        }
    }

    #[test]
    fn record_round_trip_and_refusals() {
        let mut b = [0u8; RECORD_HEADER_LEN];
        header().encode(&mut b);
        assert_eq!(RecordHeader::decode(&b, 7), Ok(header()));
        assert_eq!(RecordHeader::decode(&b, 8), Err(NotARecord::Foreign));
        assert_eq!(RecordHeader::decode(&[0u8; 128], 7), Err(NotARecord::Empty));
        // Any flipped bit in the header is caught.
        for i in 4..128 {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(
                RecordHeader::decode(&c, 7).is_err(),
                "flip at {i} went unnoticed"
            );
        }
        // A newer format with a valid checksum is refused by version.
        let mut c = b;
        c[4] = 2;
        let sum = strata_proto::checksum(&c[..120]);
        c[120..].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(
            RecordHeader::decode(&c, 7),
            Err(NotARecord::UnknownVersion(2))
        );
        assert_eq!(record_span(4096 - 128), 4096);
        assert_eq!(record_span(4096 - 127), 8192);
    }

    #[test]
    fn segment_header_round_trip() {
        let h = SegmentHeader {
            version: FORMAT_VERSION,
            id: 9,
            created_unix_ms: 1,
        };
        let mut b = vec![0u8; SEGMENT_HEADER_LEN];
        h.encode(&mut b);
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        b[30] ^= 1; // damaged: checksum now wrong
        assert_eq!(SegmentHeader::decode(&b), Err(BadSegment::Checksum));
        b[9] = 1; // version 257: refused by version, whatever the checksum
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(BadSegment::UnknownVersion(257))
        );
        let mut b2 = vec![0u8; SEGMENT_HEADER_LEN];
        SegmentHeader {
            version: 2,
            id: 9,
            created_unix_ms: 1,
        }
        .encode(&mut b2);
        assert_eq!(
            SegmentHeader::decode(&b2),
            Err(BadSegment::UnknownVersion(2))
        );
        assert_eq!(
            parse_segment_file_name(&segment_file_name(0xab)),
            Some(0xab)
        );
        assert_eq!(parse_segment_file_name("seg-xyz.strata"), None);
    }
}
