//! Attend's reads from the NVMe tier: byte ranges of records (one layer's
//! K and/or V), widened to 4 KiB for O_DIRECT, coalesced per segment when
//! the widened ranges touch or overlap, issued together through the tier's
//! I/O engine; or whole records, read and verified by the tier, for blocks
//! that have no summary to verify a part against.
//!
//! A range's device offset is the record's offset plus the record's own
//! payload offset (from its [`Loc`]: 4096 for format v2 records with a
//! page-multiple payload, whose page-multiple layer ranges then need no
//! widening; 128 for v1 records and other payloads).

use std::ops::Range;
use std::sync::Arc;

use crate::tier::nvme::buf::{ALIGN, IoBuf};
use crate::tier::nvme::{Expect, Loc, NvmeError, NvmeTier, SegFile};

/// One read Attend needs.
#[derive(Debug, Clone)]
pub struct Need {
    pub seg: SegFile,
    pub loc: Loc,
    pub what: What,
}

#[derive(Debug, Clone)]
pub enum What {
    /// These payload bytes, unverified (the caller checks them).
    Span(Range<usize>),
    /// The whole record, checked by the tier; the payload comes back.
    Record(Expect),
}

/// Bytes that arrived: `buf[start..start + len]`.
#[derive(Debug, Clone)]
pub struct Got {
    buf: Arc<IoBuf>,
    start: usize,
    len: usize,
}

impl Got {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// A coalesced device read and the needs it serves.
struct Run {
    seg: SegFile,
    start: u64,
    end: u64,
    members: Vec<(usize, u64, usize)>,
}

/// Reads every need; returns one result per need (in order) and the bytes
/// read from the device.
pub async fn fetch(tier: &Arc<NvmeTier>, needs: &[Need]) -> (Vec<Result<Got, NvmeError>>, u64) {
    let mut out: Vec<Option<Result<Got, NvmeError>>> = (0..needs.len()).map(|_| None).collect();
    let mut spans: Vec<(u64, u64, u64, usize, usize)> = Vec::new(); // seg id, aligned start, file start, len, need
    let mut records = Vec::new();
    for (i, n) in needs.iter().enumerate() {
        match &n.what {
            What::Span(r) => {
                let at = n.loc.offset() + (n.loc.payload_offset() + r.start) as u64;
                spans.push((n.seg.id(), at / ALIGN as u64 * ALIGN as u64, at, r.len(), i));
            }
            What::Record(e) => records.push((i, e)),
        }
    }
    spans.sort_unstable_by_key(|&(seg, start, ..)| (seg, start));
    let mut runs: Vec<Run> = Vec::new();
    for &(seg, start, at, len, i) in &spans {
        let end = (at + len as u64).next_multiple_of(ALIGN as u64);
        match runs.last_mut() {
            Some(r) if r.seg.id() == seg && start <= r.end => {
                r.end = r.end.max(end);
                r.members.push((i, at, len));
            }
            _ => runs.push(Run {
                seg: needs[i].seg.clone(),
                start,
                end,
                members: vec![(i, at, len)],
            }),
        }
    }
    let mut bytes = 0u64;
    let span_reads = runs
        .iter()
        .map(|r| tier.read_span(&r.seg, r.start, (r.end - r.start) as usize));
    let record_reads = records
        .iter()
        .map(|&(i, e)| tier.read_owned(&needs[i].seg, needs[i].loc, e));
    let (span_bufs, record_bufs) = futures_util::future::join(
        futures_util::future::join_all(span_reads),
        futures_util::future::join_all(record_reads),
    )
    .await;
    for (run, got) in runs.iter().zip(span_bufs) {
        bytes += run.end - run.start;
        match got {
            Ok(buf) => {
                let buf = Arc::new(buf);
                for &(i, at, len) in &run.members {
                    out[i] = Some(Ok(Got {
                        buf: buf.clone(),
                        start: (at - run.start) as usize,
                        len,
                    }));
                }
            }
            Err(e) => {
                for &(i, ..) in &run.members {
                    out[i] = Some(Err(clone_err(&e)));
                }
            }
        }
    }
    for (&(i, e), got) in records.iter().zip(record_bufs) {
        bytes += needs[i].loc.span(e.len) as u64;
        out[i] = Some(got.map(|rec| {
            let (buf, start) = rec.into_parts();
            Got {
                buf: Arc::new(buf),
                start,
                len: e.len as usize,
            }
        }));
    }
    let out = out
        .into_iter()
        .map(|o| o.expect("every need has a result"))
        .collect();
    (out, bytes)
}

fn clone_err(e: &NvmeError) -> NvmeError {
    match e {
        NvmeError::Corrupt(s) => NvmeError::Corrupt(s.clone()),
        NvmeError::Fenced(n) => NvmeError::Fenced(*n),
        other => NvmeError::Io(std::io::Error::other(other.to_string())),
    }
}
