//! The namespace export file (`strata export`, `strata import`): one
//! namespace's layout and blocks, self-describing and checked end to end,
//! for moving a cache between nodes or warming a new one.
//!
//! Format, version 1, little-endian:
//!
//! ```text
//! header
//!    0  8  magic "STRXPORT"
//!    8  4  format version (1)
//!   12  4  layout length L (at most 64 KiB)
//!   16  8  namespace id (= XXH3-64 of the layout's canonical encoding)
//!   24  8  created, unix ms
//!   32  L  the layout's canonical encoding (strata_proto::Layout::canonical_bytes)
//! 32+L  8  XXH3-64 of bytes 0..32+L
//!
//! block entry, once per block
//!    0  1  tag 'B'
//!    1  1  key length k (1..=32)
//!    2  1  parent key length p (0 = none, else 1..=32)
//!    3  1  zero
//!    4  4  payload length n (a whole number of tokens, at most one block)
//!    8  8  payload checksum: XXH3-64 (seed 0), the block checksum of the API
//!   16  k  key
//! 16+k  p  parent key
//!   ..  8  XXH3-64 of the entry's bytes 0..16+k+p
//!   ..  n  payload
//!
//! trailer
//!    0  1  tag 'E'
//!    1  7  zero
//!    8  8  blocks in the file
//!   16  8  payload bytes in the file
//!   24  8  chain: XXH3-64 over every entry's two checksums (entry, then
//!          payload: 16 bytes per block, in file order)
//!   32  8  XXH3-64 of bytes 0..32
//! ```
//!
//! What the reader guarantees: every block it hands out has a key, parent
//! and payload exactly as written (entry checksum, payload checksum); the
//! blocks are exactly the ones written, in order (the trailer's count and
//! chain); nothing follows the trailer. A file cut anywhere, or changed
//! anywhere, is an [`ExportError`] naming the offset and what was wrong.
//! A file of another format version is refused by version, never guessed.

use std::io::{self, Read, Write};

use strata_proto::{BlockKey, Layout, NamespaceId};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

pub const MAGIC: [u8; 8] = *b"STRXPORT";
pub const VERSION: u32 = 1;
/// Longest layout encoding accepted.
const MAX_LAYOUT: usize = 64 << 10;
const TAG_BLOCK: u8 = b'B';
const TAG_END: u8 = b'E';
const HEADER_FIXED: usize = 32;
const ENTRY_FIXED: usize = 16;
const TRAILER: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("not a Strata export file (it starts with {0:?}, not \"STRXPORT\")")]
    NotExport(String),
    #[error(
        "export format version {0}; this strata reads version {VERSION} (written by another release?)"
    )]
    Version(u32),
    #[error("truncated: the file ends at byte {offset}, inside {what}")]
    Truncated { offset: u64, what: String },
    #[error("corrupt at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
}

impl ExportError {
    fn corrupt(offset: u64, what: impl Into<String>) -> ExportError {
        ExportError::Corrupt {
            offset,
            what: what.into(),
        }
    }
}

/// The running hash over the entries' checksums (the trailer's chain).
struct Chain(Xxh3);

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Chain")
    }
}

impl Chain {
    fn new() -> Chain {
        Chain(Xxh3::new())
    }
    fn add(&mut self, entry_sum: u64, checksum: u64) {
        self.0.update(&entry_sum.to_le_bytes());
        self.0.update(&checksum.to_le_bytes());
    }
    fn digest(&self) -> u64 {
        self.0.digest()
    }
}

/// What the header of an export says.
#[derive(Debug, Clone)]
pub struct ExportHeader {
    pub namespace: NamespaceId,
    pub layout: Layout,
    pub created_unix_ms: u64,
}

/// One block of an export file, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportBlock {
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub checksum: u64,
    pub data: Vec<u8>,
}

/// Writes an export file. Nothing is complete until [`finish`](Self::finish)
/// writes the trailer: a file cut short is refused by the reader.
#[derive(Debug)]
pub struct ExportWriter<W: Write> {
    w: W,
    blocks: u64,
    bytes: u64,
    chain: Chain,
}

impl<W: Write> ExportWriter<W> {
    pub fn new(mut w: W, layout: &Layout, created_unix_ms: u64) -> io::Result<Self> {
        let canon = layout.canonical_bytes();
        assert!(
            canon.len() <= MAX_LAYOUT,
            "a layout encodes in well under 64 KiB"
        );
        let mut h = Vec::with_capacity(HEADER_FIXED + canon.len() + 8);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&(canon.len() as u32).to_le_bytes());
        h.extend_from_slice(&layout.namespace_id().0.to_le_bytes());
        h.extend_from_slice(&created_unix_ms.to_le_bytes());
        h.extend_from_slice(&canon);
        let sum = xxh3_64(&h);
        h.extend_from_slice(&sum.to_le_bytes());
        w.write_all(&h)?;
        Ok(ExportWriter {
            w,
            blocks: 0,
            bytes: 0,
            chain: Chain::new(),
        })
    }

    /// Appends one block (its checksum is computed here).
    pub fn block(
        &mut self,
        key: &BlockKey,
        parent: Option<&BlockKey>,
        data: &[u8],
    ) -> io::Result<()> {
        let checksum = strata_proto::checksum(data);
        let mut e = Vec::with_capacity(ENTRY_FIXED + 64 + 8);
        e.push(TAG_BLOCK);
        e.push(key.len() as u8);
        e.push(parent.map_or(0, |p| p.len() as u8));
        e.push(0);
        e.extend_from_slice(&(data.len() as u32).to_le_bytes());
        e.extend_from_slice(&checksum.to_le_bytes());
        e.extend_from_slice(key.as_bytes());
        if let Some(p) = parent {
            e.extend_from_slice(p.as_bytes());
        }
        let entry_sum = xxh3_64(&e);
        e.extend_from_slice(&entry_sum.to_le_bytes());
        self.w.write_all(&e)?;
        self.w.write_all(data)?;
        self.chain.add(entry_sum, checksum);
        self.blocks += 1;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Writes the trailer; returns the writer (flush or sync it).
    pub fn finish(mut self) -> io::Result<W> {
        let mut t = [0u8; TRAILER];
        t[0] = TAG_END;
        t[8..16].copy_from_slice(&self.blocks.to_le_bytes());
        t[16..24].copy_from_slice(&self.bytes.to_le_bytes());
        t[24..32].copy_from_slice(&self.chain.digest().to_le_bytes());
        let sum = xxh3_64(&t[..32]);
        t[32..40].copy_from_slice(&sum.to_le_bytes());
        self.w.write_all(&t)?;
        Ok(self.w)
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }
}

/// Reads an export file, checking everything (see the module docs).
#[derive(Debug)]
pub struct ExportReader<R: Read> {
    r: R,
    header: ExportHeader,
    /// Bytes consumed so far (for error offsets).
    offset: u64,
    blocks: u64,
    bytes: u64,
    chain: Chain,
    /// Largest payload the layout allows.
    max_payload: u64,
    done: bool,
}

/// Reads exactly `buf.len()` bytes or says where the file ended.
fn read_exact_at<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    offset: &mut u64,
    what: &dyn Fn() -> String,
) -> Result<(), ExportError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(ExportError::Truncated {
                    offset: *offset + got as u64,
                    what: what(),
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    *offset += got as u64;
    Ok(())
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl<R: Read> ExportReader<R> {
    /// Reads and checks the header.
    pub fn open(mut r: R) -> Result<ExportReader<R>, ExportError> {
        let mut offset = 0u64;
        let mut fixed = [0u8; HEADER_FIXED];
        let mut got = 0;
        while got < fixed.len() {
            match r.read(&mut fixed[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if got < 8 || fixed[..8] != MAGIC {
            return Err(ExportError::NotExport(
                String::from_utf8_lossy(&fixed[..got.min(8)]).into_owned(),
            ));
        }
        let version = u32_at(&fixed, 8);
        if got >= 12 && version != VERSION {
            return Err(ExportError::Version(version));
        }
        if got < HEADER_FIXED {
            return Err(ExportError::Truncated {
                offset: got as u64,
                what: "the file header".into(),
            });
        }
        offset += HEADER_FIXED as u64;
        let layout_len = u32_at(&fixed, 12) as usize;
        if layout_len > MAX_LAYOUT {
            return Err(ExportError::corrupt(
                12,
                format!("layout length {layout_len} is above {MAX_LAYOUT}"),
            ));
        }
        let mut rest = vec![0u8; layout_len + 8];
        read_exact_at(&mut r, &mut rest, &mut offset, &|| "the file header".into())?;
        let mut whole = fixed.to_vec();
        whole.extend_from_slice(&rest[..layout_len]);
        if xxh3_64(&whole) != u64_at(&rest, layout_len) {
            return Err(ExportError::corrupt(
                (HEADER_FIXED + layout_len) as u64,
                "the file header's checksum does not match",
            ));
        }
        let layout = Layout::from_canonical(&rest[..layout_len])
            .map_err(|e| ExportError::corrupt(HEADER_FIXED as u64, format!("layout: {e}")))?;
        let namespace = NamespaceId(u64_at(&fixed, 16));
        if layout.namespace_id() != namespace {
            return Err(ExportError::corrupt(
                16,
                format!(
                    "the header names namespace {namespace}, its layout is namespace {}",
                    layout.namespace_id()
                ),
            ));
        }
        let max_payload = layout.block_bytes();
        Ok(ExportReader {
            r,
            header: ExportHeader {
                namespace,
                layout,
                created_unix_ms: u64_at(&fixed, 24),
            },
            offset,
            blocks: 0,
            bytes: 0,
            chain: Chain::new(),
            max_payload,
            done: false,
        })
    }

    pub fn header(&self) -> &ExportHeader {
        &self.header
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next block, checked; `None` once the trailer is read and
    /// checked (and the file ends there).
    pub fn next_block(&mut self) -> Result<Option<ExportBlock>, ExportError> {
        if self.done {
            return Ok(None);
        }
        let n = self.blocks;
        let start = self.offset;
        let mut tag = [0u8; 1];
        read_exact_at(&mut self.r, &mut tag, &mut self.offset, &|| {
            format!(
                "the trailer: the file ends after {n} blocks without one (cut short, or the export did not finish)"
            )
        })?;
        match tag[0] {
            TAG_BLOCK => self.entry(start).map(Some),
            TAG_END => {
                self.trailer(start)?;
                self.done = true;
                Ok(None)
            }
            t => Err(ExportError::corrupt(
                start,
                format!("expected block {n} or the trailer, found tag {t:#04x}"),
            )),
        }
    }

    fn entry(&mut self, start: u64) -> Result<ExportBlock, ExportError> {
        let n = self.blocks;
        let what = || format!("block {n}");
        let mut e = vec![0u8; ENTRY_FIXED];
        e[0] = TAG_BLOCK;
        read_exact_at(&mut self.r, &mut e[1..], &mut self.offset, &what)?;
        let (k, p) = (e[1] as usize, e[2] as usize);
        if !(1..=32).contains(&k) || p > 32 || e[3] != 0 {
            return Err(ExportError::corrupt(
                start,
                format!("block {n}: key length {k} or parent length {p} is out of range"),
            ));
        }
        let len = u32_at(&e, 4) as u64;
        let checksum = u64_at(&e, 8);
        let mut kp = vec![0u8; k + p + 8];
        read_exact_at(&mut self.r, &mut kp, &mut self.offset, &what)?;
        e.extend_from_slice(&kp[..k + p]);
        let entry_sum = u64_at(&kp, k + p);
        if xxh3_64(&e) != entry_sum {
            return Err(ExportError::corrupt(
                start,
                format!("block {n}: its header's checksum does not match"),
            ));
        }
        let key = BlockKey::new(&kp[..k])
            .map_err(|e| ExportError::corrupt(start, format!("block {n}: key: {e}")))?;
        let parent = if p == 0 {
            None
        } else {
            Some(
                BlockKey::new(&kp[k..k + p])
                    .map_err(|e| ExportError::corrupt(start, format!("block {n}: parent: {e}")))?,
            )
        };
        if len == 0 || len > self.max_payload {
            return Err(ExportError::corrupt(
                start,
                format!(
                    "block {n} ({key}): payload of {len} bytes; this layout's blocks are 1 to {} bytes",
                    self.max_payload
                ),
            ));
        }
        let at = self.offset;
        let mut data = vec![0u8; len as usize];
        read_exact_at(&mut self.r, &mut data, &mut self.offset, &|| {
            format!("block {n} ({key}): its payload of {len} bytes")
        })?;
        if strata_proto::checksum(&data) != checksum {
            return Err(ExportError::corrupt(
                at,
                format!("block {n} ({key}): payload checksum mismatch"),
            ));
        }
        self.chain.add(entry_sum, checksum);
        self.blocks += 1;
        self.bytes += len;
        Ok(ExportBlock {
            key,
            parent,
            checksum,
            data,
        })
    }

    fn trailer(&mut self, start: u64) -> Result<(), ExportError> {
        let mut t = [0u8; TRAILER];
        t[0] = TAG_END;
        read_exact_at(&mut self.r, &mut t[1..], &mut self.offset, &|| {
            "the trailer".into()
        })?;
        if xxh3_64(&t[..32]) != u64_at(&t, 32) || t[1..8] != [0; 7] {
            return Err(ExportError::corrupt(
                start,
                "the trailer's checksum does not match",
            ));
        }
        let (blocks, bytes) = (u64_at(&t, 8), u64_at(&t, 16));
        if blocks != self.blocks || bytes != self.bytes {
            return Err(ExportError::corrupt(
                start,
                format!(
                    "the trailer counts {blocks} blocks ({bytes} bytes); the file holds {} ({} bytes)",
                    self.blocks, self.bytes
                ),
            ));
        }
        if u64_at(&t, 24) != self.chain.digest() {
            return Err(ExportError::corrupt(
                start,
                "the blocks are not the ones written (the trailer's chain does not match)",
            ));
        }
        let mut extra = [0u8; 1];
        loop {
            match self.r.read(&mut extra) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(ExportError::corrupt(
                        self.offset,
                        "bytes follow the trailer",
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use strata_proto::{Dtype, KvKind};

    fn layout() -> Layout {
        Layout {
            model_id: "export/test".into(),
            dtype: Dtype::F16,
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 8,
            tokens_per_block: 4,
            kv_kind: KvKind::Separate,
            tp_rank: 0,
            tp_size: 1,
            tenant_salt: vec![],
        }
    }

    fn blocks() -> Vec<ExportBlock> {
        (0..5u8)
            .map(|i| {
                let data: Vec<u8> = (0..32 * (1 + (i as usize % 4)))
                    .map(|j| (j as u8).wrapping_mul(7) ^ i)
                    .collect();
                ExportBlock {
                    key: BlockKey::new(&[i, 0xee]).unwrap(),
                    parent: (i > 0).then(|| BlockKey::new(&[i - 1, 0xee]).unwrap()),
                    checksum: strata_proto::checksum(&data),
                    data,
                }
            })
            .collect()
    }

    fn file() -> Vec<u8> {
        let mut w = ExportWriter::new(Vec::new(), &layout(), 1234).unwrap();
        for b in blocks() {
            w.block(&b.key, b.parent.as_ref(), &b.data).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all(f: &[u8]) -> Result<Vec<ExportBlock>, ExportError> {
        let mut r = ExportReader::open(f)?;
        let mut out = vec![];
        while let Some(b) = r.next_block()? {
            out.push(b);
        }
        Ok(out)
    }

    #[test]
    fn round_trip() {
        let f = file();
        let r = ExportReader::open(&f[..]).unwrap();
        assert_eq!(r.header().layout, layout());
        assert_eq!(r.header().namespace, layout().namespace_id());
        assert_eq!(r.header().created_unix_ms, 1234);
        assert_eq!(read_all(&f).unwrap(), blocks());
    }

    #[test]
    fn every_cut_is_refused() {
        let f = file();
        for cut in 0..f.len() {
            let e = read_all(&f[..cut]).expect_err(&format!("cut at {cut} accepted"));
            assert!(
                matches!(e, ExportError::Truncated { .. } | ExportError::NotExport(_)),
                "cut at {cut}: {e}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let f = file();
        for i in 0..f.len() {
            for bit in [0u8, 3, 7] {
                let mut g = f.clone();
                g[i] ^= 1 << bit;
                assert!(read_all(&g).is_err(), "flip of bit {bit} at {i} accepted");
            }
        }
    }

    #[test]
    fn dropped_duplicated_and_extra_bytes_are_refused() {
        let f = file();
        let header_len = {
            let r = ExportReader::open(&f[..]).unwrap();
            r.offset() as usize
        };
        // Drop the first block entry: the count and chain catch it.
        let b0 = blocks().remove(0);
        let entry0 = ENTRY_FIXED + b0.key.len() + 8 + b0.data.len();
        let mut g = f[..header_len].to_vec();
        g.extend_from_slice(&f[header_len + entry0..]);
        let e = read_all(&g).unwrap_err();
        assert!(e.to_string().contains("trailer counts 5 blocks"), "{e}");
        // Duplicate it instead.
        let mut g = f[..header_len + entry0].to_vec();
        g.extend_from_slice(&f[header_len..]);
        assert!(read_all(&g).is_err());
        // Bytes after the trailer.
        let mut g = f.clone();
        g.push(0);
        assert!(
            read_all(&g)
                .unwrap_err()
                .to_string()
                .contains("follow the trailer")
        );
    }

    #[test]
    fn other_files_and_versions_are_refused_by_name() {
        let e = read_all(b"hello world, this is not an export").unwrap_err();
        assert!(matches!(e, ExportError::NotExport(_)), "{e}");
        let mut f = file();
        f[8] = 2;
        let e = read_all(&f).unwrap_err();
        assert!(e.to_string().contains("export format version 2"), "{e}");
    }
}
