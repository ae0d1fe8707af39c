//! A minimal reader of NumPy `.npy` files: format versions 1.0, 2.0 and
//! 3.0, little-endian `float32` (`<f4`) or `float16` (`<f2`), C order; and
//! a writer of version 1.0 files of `<f4` or `<i4` (to hand generated data
//! to other tools, e.g. the benchmark's Python baselines).
//!
//! The format (numpy.lib.format): the magic `\x93NUMPY`, major and minor
//! version bytes, the header length (u16 LE in 1.0, u32 LE in 2.0 and
//! 3.0), then the header: a Python dict literal such as
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`, padded
//! with spaces and a newline; then the data, exactly
//! `product(shape) * itemsize` bytes. Anything else is refused with an
//! error naming what was wrong; nothing here panics on a bad file.

use half::f16;
use std::path::Path;

/// Headers longer than this are refused (numpy writes a few hundred bytes).
pub const HEADER_MAX: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("not a .npy file (bad magic)")]
    Magic,
    #[error("unsupported .npy format version {0}.{1}")]
    Version(u8, u8),
    #[error("header: {0}")]
    Header(String),
    #[error("dtype {0:?} is not supported (little-endian f32 '<f4' or f16 '<f2' only)")]
    Dtype(String),
    #[error("Fortran-order arrays are not supported")]
    FortranOrder,
    #[error("data is {got} bytes but shape {shape:?} of {itemsize}-byte elements needs {want}")]
    Size {
        shape: Vec<usize>,
        itemsize: usize,
        want: u128,
        got: usize,
    },
}

/// Element type stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        }
    }
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Offset of the first data byte.
    pub data_offset: usize,
}

/// An array read into f32 (f16 widened exactly), C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub data: Vec<f32>,
}

/// Reads the `.npy` file at `path`.
pub fn read(path: &Path) -> Result<Array, NpyError> {
    let bytes = std::fs::read(path).map_err(|error| NpyError::Io {
        path: path.display().to_string(),
        error,
    })?;
    parse(&bytes)
}

/// Parses a whole `.npy` file held in memory.
pub fn parse(bytes: &[u8]) -> Result<Array, NpyError> {
    let h = parse_header(bytes)?;
    let data = &bytes[h.data_offset..];
    let itemsize = h.dtype.size();
    let want = h
        .shape
        .iter()
        .try_fold(itemsize as u128, |acc, &s| acc.checked_mul(s as u128))
        .unwrap_or(u128::MAX);
    if want != data.len() as u128 {
        return Err(NpyError::Size {
            shape: h.shape,
            itemsize,
            want,
            got: data.len(),
        });
    }
    let data = match h.dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    };
    Ok(Array {
        shape: h.shape,
        dtype: h.dtype,
        data,
    })
}

/// Writes `data` (C order, `shape`) as a version 1.0 `.npy` file of
/// little-endian `float32`.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    write_raw(path, "<f4", 4, shape, &bytes)
}

/// Writes `data` (C order, `shape`) as a version 1.0 `.npy` file of
/// little-endian `int32`.
pub fn write_i32(path: &Path, shape: &[usize], data: &[i32]) -> Result<(), NpyError> {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    write_raw(path, "<i4", 4, shape, &bytes)
}

fn write_raw(
    path: &Path,
    descr: &str,
    itemsize: usize,
    shape: &[usize],
    data: &[u8],
) -> Result<(), NpyError> {
    let want = shape
        .iter()
        .fold(itemsize as u128, |acc, &s| acc * s as u128);
    if want != data.len() as u128 {
        return Err(NpyError::Size {
            shape: shape.to_vec(),
            itemsize,
            want,
            got: data.len(),
        });
    }
    let dims: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
    // A one-element tuple needs its trailing comma.
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}").into_bytes();
    // Magic (6) + version (2) + length (2) + header + '\n': a multiple of 64.
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(b' ');
    }
    header.push(b'\n');
    if header.len() > usize::from(u16::MAX) {
        return Err(NpyError::Header(format!(
            "{} bytes, too long for version 1.0",
            header.len()
        )));
    }
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header);
    out.extend_from_slice(data);
    std::fs::write(path, out).map_err(|error| NpyError::Io {
        path: path.display().to_string(),
        error,
    })
}

/// Parses the magic, version and header dict.
pub fn parse_header(bytes: &[u8]) -> Result<Header, NpyError> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(NpyError::Magic);
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len, start) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(NpyError::Header("truncated length".into()));
            }
            let l = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (l as usize, 12)
        }
        _ => return Err(NpyError::Version(major, minor)),
    };
    if len > HEADER_MAX {
        return Err(NpyError::Header(format!(
            "{len} bytes, more than {HEADER_MAX}"
        )));
    }
    let end = start + len;
    if bytes.len() < end {
        return Err(NpyError::Header(format!(
            "declares {len} bytes, the file has {}",
            bytes.len() - start
        )));
    }
    let text = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| NpyError::Header("not UTF-8".into()))?;
    if major == 1 && !text.is_ascii() {
        return Err(NpyError::Header("version 1 header is not ASCII".into()));
    }
    let dict = parse_dict(text).map_err(NpyError::Header)?;
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    for (key, value) in dict {
        match (key.as_str(), value) {
            ("descr", PyValue::Str(s)) => descr = Some(s),
            ("fortran_order", PyValue::Bool(b)) => fortran = Some(b),
            ("shape", PyValue::Tuple(t)) => shape = Some(t),
            (k @ ("descr" | "fortran_order" | "shape"), _) => {
                return Err(NpyError::Header(format!("key {k:?} has the wrong type")));
            }
            (k, _) => return Err(NpyError::Header(format!("unexpected key {k:?}"))),
        }
    }
    let descr = descr.ok_or_else(|| NpyError::Header("no 'descr'".into()))?;
    let fortran = fortran.ok_or_else(|| NpyError::Header("no 'fortran_order'".into()))?;
    let shape = shape.ok_or_else(|| NpyError::Header("no 'shape'".into()))?;
    let dtype = match descr.as_str() {
        "<f4" => Dtype::F32,
        "<f2" => Dtype::F16,
        _ => return Err(NpyError::Dtype(descr)),
    };
    if fortran {
        return Err(NpyError::FortranOrder);
    }
    Ok(Header {
        dtype,
        shape,
        data_offset: end,
    })
}

enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// Parses the dict literal numpy writes: string keys; values a quoted
/// string, `True`/`False`, or a tuple of non-negative integers.
fn parse_dict(text: &str) -> Result<Vec<(String, PyValue)>, String> {
    let mut p = Cursor {
        s: text.as_bytes(),
        i: 0,
    };
    p.ws();
    p.expect(b'{')?;
    let mut out = Vec::new();
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        let value = match p.peek() {
            Some(b'\'' | b'"') => PyValue::Str(p.string()?),
            Some(b'(') => PyValue::Tuple(p.tuple()?),
            Some(b'T' | b'F') => PyValue::Bool(p.boolean()?),
            other => {
                return Err(format!(
                    "unexpected {:?} at byte {}",
                    other.map(char::from),
                    p.i
                ));
            }
        };
        out.push((key, value));
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}')?;
            break;
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing bytes at {}", p.i));
    }
    Ok(out)
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\t' | b'\r')) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", char::from(c), self.i))
        }
    }
    fn string(&mut self) -> Result<String, String> {
        let q = self
            .peek()
            .filter(|c| *c == b'\'' || *c == b'"')
            .ok_or("expected a quoted string")?;
        self.i += 1;
        let start = self.i;
        while let Some(c) = self.peek() {
            if c == q {
                let s = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                return Ok(s);
            }
            if c == b'\\' {
                return Err("escapes in header strings are not supported".into());
            }
            self.i += 1;
        }
        Err("unterminated string".into())
    }
    fn boolean(&mut self) -> Result<bool, String> {
        for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Ok(v);
            }
        }
        Err(format!("expected True or False at byte {}", self.i))
    }
    fn tuple(&mut self) -> Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            let start = self.i;
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.i += 1;
            }
            // numpy 1.x wrote longs as `3L` on Python 2.
            let digits = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
            let _ = self.eat(b'L');
            let v: usize = digits
                .parse()
                .map_err(|_| format!("bad dimension at byte {start}"))?;
            dims.push(v);
            self.ws();
            if !self.eat(b',') {
                self.ws();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A .npy file built byte by byte per the format spec (not by a writer
    /// of ours): magic, version, little-endian header length, the dict
    /// padded with spaces to a multiple of 64 bytes ending in '\n', data.
    pub(crate) fn npy_bytes(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
        let prefix = if version == 1 { 10 } else { 12 };
        let mut header = dict.as_bytes().to_vec();
        while !(prefix + header.len() + 1).is_multiple_of(64) {
            header.push(b' ');
        }
        header.push(b'\n');
        let mut out = b"\x93NUMPY".to_vec();
        out.extend([version, 0]);
        if version == 1 {
            out.extend((header.len() as u16).to_le_bytes());
        } else {
            out.extend((header.len() as u32).to_le_bytes());
        }
        out.extend(header);
        out.extend(data);
        out
    }

    fn f32_bytes(xs: &[f32]) -> Vec<u8> {
        xs.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_f32_v1_and_v2() {
        let xs = [1.0f32, -2.5, 3.25, 0.0, f32::MIN_POSITIVE, 1e30];
        for v in [1, 2, 3] {
            let file = npy_bytes(
                v,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
                &f32_bytes(&xs),
            );
            assert_eq!(file.len() % 64, (xs.len() * 4) % 64, "header padded to 64");
            let a = parse(&file).unwrap();
            assert_eq!(a.shape, vec![2, 3]);
            assert_eq!(a.dtype, Dtype::F32);
            assert_eq!(a.data, xs);
        }
        // 1-d and 0-d shapes, no trailing comma, double quotes.
        let a = parse(&npy_bytes(
            1,
            r#"{"descr": "<f4", "fortran_order": False, "shape": (2,)}"#,
            &f32_bytes(&[7.0, 8.0]),
        ))
        .unwrap();
        assert_eq!((a.shape, a.data), (vec![2], vec![7.0, 8.0]));
        let a = parse(&npy_bytes(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (), }",
            &f32_bytes(&[9.0]),
        ))
        .unwrap();
        assert_eq!((a.shape, a.data), (vec![], vec![9.0]));
    }

    #[test]
    fn reads_f16() {
        let halves = [
            f16::from_f32(1.5),
            f16::from_f32(-0.25),
            f16::from_f32(65504.0),
        ];
        let data: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        let a = parse(&npy_bytes(
            1,
            "{'descr': '<f2', 'fortran_order': False, 'shape': (1, 3), }",
            &data,
        ))
        .unwrap();
        assert_eq!(a.dtype, Dtype::F16);
        assert_eq!(a.data, vec![1.5, -0.25, 65504.0]);
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let d = f32_bytes(&[1.0, 2.0]);
        let err = |file: Vec<u8>| parse(&file).unwrap_err().to_string();
        assert!(err(b"NUMPY\x01\x00".to_vec()).contains("magic"));
        let mut v9 = npy_bytes(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
            &d,
        );
        v9[6] = 9;
        assert!(err(v9).contains("version 9"));
        assert!(
            err(npy_bytes(
                1,
                "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }",
                &d
            ))
            .contains(">f4")
        );
        assert!(
            err(npy_bytes(
                1,
                "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }",
                &[0; 8]
            ))
            .contains("<f8")
        );
        assert!(
            err(npy_bytes(
                1,
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }",
                &d
            ))
            .contains("Fortran")
        );
        assert!(
            err(npy_bytes(
                1,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
                &d
            ))
            .contains("needs 12")
        );
        assert!(
            err(npy_bytes(1, "{'descr': '<f4', 'shape': (2,), }", &d)).contains("fortran_order")
        );
        assert!(
            err(npy_bytes(
                1,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
                &d
            ))
            .contains("header")
        );
        // Truncated header and an absurd shape.
        let mut short = npy_bytes(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
            &d,
        );
        short.truncate(40);
        assert!(err(short).contains("declares"));
        let huge = npy_bytes(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }",
            &d,
        );
        assert!(err(huge).contains("needs"));
        let overflow = npy_bytes(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
            &d,
        );
        assert!(err(overflow).contains("bad dimension"));
        let many = "(4294967296, 4294967296, 4294967296, 4294967296, 4294967296)";
        let many = npy_bytes(
            1,
            &format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {many}, }}"),
            &d,
        );
        assert!(err(many).contains("needs"));
    }

    #[test]
    fn writes_what_it_and_numpy_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.npy");
        let xs: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_f32(&path, &[2, 3, 4], &xs).unwrap();
        let a = read(&path).unwrap();
        assert_eq!(
            (a.shape, a.dtype, a.data),
            (vec![2, 3, 4], Dtype::F32, xs.clone())
        );
        let bytes = std::fs::read(&path).unwrap();
        // The layout numpy writes: header padded to 64 bytes, '\n' last.
        let h = parse_header(&bytes).unwrap();
        assert_eq!(h.data_offset % 64, 0);
        assert_eq!(bytes[h.data_offset - 1], b'\n');
        assert_eq!(
            bytes,
            npy_bytes(
                1,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }",
                &f32_bytes(&xs)
            )
        );
        write_f32(&path, &[3], &xs[..3]).unwrap();
        assert_eq!(read(&path).unwrap().shape, vec![3]);
        let ids = [7i32, -1, 1 << 20];
        write_i32(&path, &[3], &ids).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let data: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            bytes,
            npy_bytes(
                1,
                "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }",
                &data
            )
        );
        // The reader reads floats only, and says so.
        assert!(matches!(parse(&bytes), Err(NpyError::Dtype(d)) if d == "<i4"));
        assert!(write_f32(&path, &[2, 2], &xs[..3]).is_err());
    }

    #[test]
    fn reads_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        std::fs::write(
            &path,
            npy_bytes(
                1,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
                &f32_bytes(&[4.0]),
            ),
        )
        .unwrap();
        assert_eq!(read(&path).unwrap().data, vec![4.0]);
        let missing = read(&dir.path().join("none.npy")).unwrap_err().to_string();
        assert!(missing.contains("none.npy"), "{missing}");
    }
}
