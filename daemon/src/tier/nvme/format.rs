//! The on-disk format of NVMe segments: version 2 is written, versions 1
//! and 2 are read.
//!
//! A segment is one file `seg-<id as 16 hex digits>.strata`. Its first
//! 4096 bytes are the segment header; records follow at 4096-aligned
//! offsets. A record is a 128-byte header, the payload at the record's
//! *payload offset*, and zero padding to the next 4096 boundary, written
//! with one O_DIRECT write.
//!
//! Version 2 (2026-11-29) differs from version 1 only in where the payload
//! starts. Version 1 put it right after the header (byte 128), so every
//! page-multiple range of the payload (one layer's K and V of a block,
//! which Attend reads alone with O_DIRECT) straddled one page more than
//! its size: dense Attend from NVMe read 125% of the KV at 16 KiB layers.
//! Version 2 records say where their payload starts (header bytes 44..48):
//! at byte 4096 (the header alone in the first page, so payload offsets
//! are page offsets) whenever that takes no more pages than byte 128 would,
//! i.e. when the payload is a multiple of 4 KiB or leaves less than 128
//! bytes of its last page free; otherwise at byte 128 as in version 1 (a
//! payload that is not a page multiple has no page-multiple layer ranges
//! to align, and page 0 would cost a whole page: 8 KiB instead of 4 KiB
//! for a 1 KiB block). So no record takes more space than in version 1.
//! A reader takes the payload offset from each record's own header (and
//! carries it in the record's [`super::Loc`]); segments of version 1 stay
//! readable, sealed, until reclaim copies their live records forward as
//! version 2 records.
//!
//! ```text
//! segment header (4096 bytes, little-endian)
//!   0  8  magic "STRSEG01"
//!   8  4  format version (2; 1 is read)
//!  12  4  header length (4096)
//!  16  8  segment id
//!  24  8  created, unix ms
//!  32  ..  zero
//! 4088 8  XXH3-64 of bytes 0..4088
//!
//! record header (128 bytes, little-endian)
//!   0  4  magic 0x5354524B ("KRTS" on disk)
//!   4  2  format version (2; 1 is read)
//!   6  1  kind: 1 block, 2 tombstone
//!   7  1  key length (1..=32)
//!   8  1  parent key length (0 = none)
//!   9  7  zero
//!  16  8  namespace id
//!  24  8  sequence number (global, strictly increasing per daemon data dir)
//!  32  8  segment id (guards against a record image read from elsewhere)
//!  40  4  payload length
//!  44  4  payload offset from the record's start: 4096 or 128 (v2);
//!         zero in v1, whose payload is always at 128
//!  48  8  XXH3-64 of the payload
//!  56 32  key (zero padded)
//!  88 32  parent key (zero padded)
//! 120  8  XXH3-64 of bytes 0..120
//! ```
//!
//! Invariants: a record is accepted only if its magic, version, segment id
//! and header checksum are right and its payload hashes to the recorded
//! checksum; anything else is a torn or foreign write and is skipped. A
//! version this build does not know is refused, never guessed at; a v2
//! header with a payload offset other than 128 or 4096 is corrupt.

use strata_proto::{BlockKey, NamespaceId};

use super::buf::ALIGN;

pub const SEGMENT_MAGIC: [u8; 8] = *b"STRSEG01";
pub const RECORD_MAGIC: u32 = 0x4B52_5453;
/// The version this build writes (segments and records).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this build still reads.
pub const FORMAT_VERSION_MIN: u32 = 1;
pub const SEGMENT_HEADER_LEN: usize = 4096;
pub const RECORD_HEADER_LEN: usize = 128;
/// Payload offset of a version 1 record, and of a version 2 record whose
/// payload is not worth aligning.
pub const PAYLOAD_AFTER_HEADER: u32 = RECORD_HEADER_LEN as u32;
/// Payload offset of a version 2 record with a page-aligned payload.
pub const PAYLOAD_PAGE_ALIGNED: u32 = ALIGN as u32;

const _: () = assert!(SEGMENT_HEADER_LEN == ALIGN);
const _: () = assert!(RECORD_HEADER_LEN + 32 * 2 <= ALIGN);
const _: () = assert!(PAYLOAD_PAGE_ALIGNED as usize >= RECORD_HEADER_LEN);

/// Whether this build reads segments and records of `version`.
pub fn reads_version(version: u32) -> bool {
    (FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version)
}

/// The versions this build reads, for messages ("1 and 2").
pub fn versions_read() -> String {
    let v: Vec<String> = (FORMAT_VERSION_MIN..=FORMAT_VERSION)
        .map(|v| v.to_string())
        .collect();
    v.join(" and ")
}

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
    /// Where the payload starts, from the record's first byte: 128 or 4096
    /// ([`payload_offset_for`]). Chosen by the writer (`append` sets it);
    /// read from the header (version 1: always 128).
    pub payload_offset: u32,
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
        if !reads_version(version) {
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

/// The payload offset this build writes for a payload of `len` bytes:
/// page-aligned (4096) unless that would take one page more than placing
/// it after the header (see the module documentation).
pub fn payload_offset_for(len: usize) -> u32 {
    let after_header = (RECORD_HEADER_LEN + len).next_multiple_of(ALIGN);
    let aligned = ALIGN + len.next_multiple_of(ALIGN);
    if aligned == after_header {
        PAYLOAD_PAGE_ALIGNED
    } else {
        PAYLOAD_AFTER_HEADER
    }
}

/// Bytes a record occupies on disk, its payload at `payload_offset`.
pub fn span_at(payload_offset: u32, len: usize) -> usize {
    (payload_offset as usize + len).next_multiple_of(ALIGN)
}

/// Bytes a record of `payload` bytes written by this build occupies on
/// disk: never more than version 1 took (`(128 + payload)` rounded up to
/// 4 KiB), the same for every payload of whole pages.
pub fn record_span(payload: usize) -> usize {
    span_at(payload_offset_for(payload), payload)
}

impl RecordHeader {
    /// Encodes the header as this build writes it (version 2, with its
    /// `payload_offset`).
    pub fn encode(&self, out: &mut [u8]) {
        self.encode_version(FORMAT_VERSION as u16, out);
    }

    /// Encodes a header of `version`: 2, or 1 for tests that must build
    /// what an earlier release wrote (then `payload_offset` must be 128).
    pub(crate) fn encode_version(&self, version: u16, out: &mut [u8]) {
        let out = &mut out[..RECORD_HEADER_LEN];
        out.fill(0);
        out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&version.to_le_bytes());
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
        if version >= 2 {
            out[44..48].copy_from_slice(&self.payload_offset.to_le_bytes());
        } else {
            assert_eq!(
                self.payload_offset, PAYLOAD_AFTER_HEADER,
                "v1 payloads follow the header"
            );
        }
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
        if !reads_version(version as u32) {
            return Err(NotARecord::UnknownVersion(version));
        }
        let payload_offset = match version {
            1 => PAYLOAD_AFTER_HEADER,
            _ => match u32_at(b, 44) {
                o @ (PAYLOAD_AFTER_HEADER | PAYLOAD_PAGE_ALIGNED) => o,
                _ => return Err(NotARecord::Corrupt("payload offset")),
            },
        };
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
            payload_offset,
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
            payload_offset: PAYLOAD_AFTER_HEADER,
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
        c[4] = 3;
        let sum = strata_proto::checksum(&c[..120]);
        c[120..].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(
            RecordHeader::decode(&c, 7),
            Err(NotARecord::UnknownVersion(3))
        );
    }

    /// Both payload offsets of version 2 round-trip; version 1 headers (as
    /// an earlier release wrote them: zero at 44..48) read with the payload
    /// after the header; any other offset in a sealed v2 header is corrupt.
    #[test]
    fn payload_offsets_by_version() {
        let mut aligned = header();
        aligned.len = 16 << 10;
        aligned.payload_offset = payload_offset_for(aligned.len as usize);
        assert_eq!(aligned.payload_offset, PAYLOAD_PAGE_ALIGNED);
        let mut b = [0u8; RECORD_HEADER_LEN];
        aligned.encode(&mut b);
        assert_eq!(u16_at(&b, 4), 2);
        assert_eq!(RecordHeader::decode(&b, 7), Ok(aligned));
        let mut v1 = [0u8; RECORD_HEADER_LEN];
        header().encode_version(1, &mut v1);
        assert_eq!((u16_at(&v1, 4), u32_at(&v1, 44)), (1, 0));
        assert_eq!(RecordHeader::decode(&v1, 7), Ok(header()));
        let mut c = b;
        c[44..48].copy_from_slice(&1024u32.to_le_bytes());
        let sum = strata_proto::checksum(&c[..120]);
        c[120..].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(
            RecordHeader::decode(&c, 7),
            Err(NotARecord::Corrupt("payload offset"))
        );
    }

    /// Version 2 never takes more disk than version 1: page-multiple
    /// payloads (and those within 128 bytes of one) are aligned at no
    /// cost; the rest stay after the header.
    #[test]
    fn spans_and_payload_offsets() {
        let v1 = |len: usize| (RECORD_HEADER_LEN + len).next_multiple_of(ALIGN);
        for len in [
            0,
            1,
            1024,
            3968,
            3969,
            4095,
            4096,
            4097,
            16 << 10,
            128 << 10,
            100_000,
        ] {
            assert_eq!(record_span(len), v1(len), "{len}");
            let off = payload_offset_for(len);
            assert_eq!(span_at(off, len), v1(len), "{len}");
            let want_aligned = len.is_multiple_of(ALIGN) || len % ALIGN > ALIGN - RECORD_HEADER_LEN;
            assert_eq!(off == PAYLOAD_PAGE_ALIGNED, want_aligned, "{len}");
        }
        assert_eq!(record_span(4096 - 128), 4096);
        assert_eq!(record_span(4096 - 127), 8192);
        assert_eq!(record_span(128 << 10), 132 << 10);
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
        b[8..12].copy_from_slice(&257u32.to_le_bytes()); // refused by version, whatever the checksum
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(BadSegment::UnknownVersion(257))
        );
        // Version 1 (an earlier release's segments) is still read.
        let old = SegmentHeader {
            version: 1,
            id: 9,
            created_unix_ms: 1,
        };
        let mut b1 = vec![0u8; SEGMENT_HEADER_LEN];
        old.encode(&mut b1);
        assert_eq!(SegmentHeader::decode(&b1), Ok(old));
        let mut b3 = vec![0u8; SEGMENT_HEADER_LEN];
        SegmentHeader {
            version: 3,
            id: 9,
            created_unix_ms: 1,
        }
        .encode(&mut b3);
        assert_eq!(
            SegmentHeader::decode(&b3),
            Err(BadSegment::UnknownVersion(3))
        );
        assert_eq!(
            parse_segment_file_name(&segment_file_name(0xab)),
            Some(0xab)
        );
        assert_eq!(parse_segment_file_name("seg-xyz.strata"), None);
    }
}
