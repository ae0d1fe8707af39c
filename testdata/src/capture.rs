//! Captured Q/K/V of a real model as [`HeadData`], so that the gates (and
//! every feature's tests) run on model data too.
//!
//! Directory layout (written by testbed/capture/capture.py):
//!
//! * `meta.json`: `model`, `layers` (list of layer numbers), `num_q_heads`,
//!   `num_kv_heads`, `head_dim`, `n_tokens` (other keys are ignored);
//! * per captured layer `L`: `q_L.npy` `[n_tokens][num_q_heads][head_dim]`
//!   (post-RoPE queries of every prompt position), `k_L.npy` and `v_L.npy`
//!   `[n_tokens][num_kv_heads][head_dim]` (post-RoPE keys, values);
//!   little-endian f32 (f16 is read too), C order.
//!
//! One [`HeadData`] per (layer, KV head): its keys and values; its GQA
//! group (query heads `g * rep .. (g + 1) * rep`, `rep = num_q_heads /
//! num_kv_heads`, the grouping of Llama-style models); the queries of the
//! last [`RealOptions::decode_fraction`] of the positions as decode queries,
//! each seeing the keys up to its own position (a prompt is causal); the
//! earlier positions' queries as training queries.

use crate::data::HeadData;
use crate::json::{self, Value};
use crate::npy::{self, NpyError};
use std::path::{Path, PathBuf};

/// Limits on what a capture may declare (a corrupt meta.json must not
/// make us allocate without bound).
pub const TOKENS_MAX: usize = 1 << 24;
pub const HEADS_MAX: usize = 1024;
pub const HEAD_DIM_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    /// `meta.json` is malformed; the message starts with the field.
    #[error("{path}: {message}")]
    Meta { path: String, message: String },
    #[error("{path}: {error}")]
    Npy { path: String, error: NpyError },
    #[error("{path}: shape {got:?}, expected {want:?}")]
    Shape {
        path: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("layer {0} is not in meta.json's layers")]
    NoLayer(usize),
    #[error("{path}: a non-finite element at index {index}")]
    NonFinite { path: String, index: usize },
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub model: String,
    pub layers: Vec<usize>,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub n_tokens: usize,
}

impl Meta {
    /// Parses and validates `meta.json`'s text; errors start with the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let v = json::parse(text)?;
        let count = |key: &str, max: usize| -> Result<usize, String> {
            let x = v
                .get(key)
                .ok_or_else(|| format!("{key}: missing"))?
                .as_usize()
                .ok_or_else(|| format!("{key}: not a non-negative integer"))?;
            if x == 0 || x > max {
                return Err(format!("{key}: {x} outside 1..={max}"));
            }
            Ok(x)
        };
        let model = v
            .get("model")
            .and_then(Value::as_str)
            .ok_or("model: missing or not a string")?
            .to_owned();
        let layers = v
            .get("layers")
            .and_then(Value::as_array)
            .ok_or("layers: missing or not a list")?
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.as_usize()
                    .ok_or_else(|| format!("layers[{i}]: not a non-negative integer"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if layers.is_empty() {
            return Err("layers: empty".into());
        }
        let meta = Self {
            model,
            layers,
            num_q_heads: count("num_q_heads", HEADS_MAX)?,
            num_kv_heads: count("num_kv_heads", HEADS_MAX)?,
            head_dim: count("head_dim", HEAD_DIM_MAX)?,
            n_tokens: count("n_tokens", TOKENS_MAX)?,
        };
        if !meta.num_q_heads.is_multiple_of(meta.num_kv_heads) {
            return Err(format!(
                "num_q_heads: {} is not a multiple of num_kv_heads {}",
                meta.num_q_heads, meta.num_kv_heads
            ));
        }
        Ok(meta)
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.num_q_heads / self.num_kv_heads
    }
}

/// How captured positions become decode and training queries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RealOptions {
    /// The last `ceil(decode_fraction * n_tokens)` positions are decode steps.
    pub decode_fraction: f64,
    /// At most this many decode steps (the last ones); 0 = no limit.
    pub max_decode_steps: usize,
}

impl Default for RealOptions {
    fn default() -> Self {
        Self {
            decode_fraction: 0.25,
            max_decode_steps: 0,
        }
    }
}

/// An opened capture directory.
#[derive(Debug, Clone)]
pub struct Capture {
    pub dir: PathBuf,
    pub meta: Meta,
}

impl Capture {
    /// Reads and validates `dir/meta.json`.
    pub fn open(dir: &Path) -> Result<Self, CaptureError> {
        let path = dir.join("meta.json");
        let text = std::fs::read_to_string(&path).map_err(|error| CaptureError::Io {
            path: path.display().to_string(),
            error,
        })?;
        let meta = Meta::parse(&text).map_err(|message| CaptureError::Meta {
            path: path.display().to_string(),
            message,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            meta,
        })
    }

    fn load(&self, name: &str, layer: usize, heads: usize) -> Result<Vec<f32>, CaptureError> {
        let path = self.dir.join(format!("{name}_{layer}.npy"));
        let shown = path.display().to_string();
        let a = npy::read(&path).map_err(|error| CaptureError::Npy {
            path: shown.clone(),
            error,
        })?;
        let want = vec![self.meta.n_tokens, heads, self.meta.head_dim];
        if a.shape != want {
            return Err(CaptureError::Shape {
                path: shown,
                got: a.shape,
                want,
            });
        }
        if let Some(index) = a.data.iter().position(|x| !x.is_finite()) {
            return Err(CaptureError::NonFinite { path: shown, index });
        }
        Ok(a.data)
    }

    /// One [`HeadData`] per KV head of `layer` (see the module documentation).
    pub fn layer(&self, layer: usize, opts: &RealOptions) -> Result<Vec<HeadData>, CaptureError> {
        if !self.meta.layers.contains(&layer) {
            return Err(CaptureError::NoLayer(layer));
        }
        let m = &self.meta;
        let (n, d, nq, nkv, rep) = (
            m.n_tokens,
            m.head_dim,
            m.num_q_heads,
            m.num_kv_heads,
            m.group(),
        );
        let q = self.load("q", layer, nq)?;
        let k = self.load("k", layer, nkv)?;
        let v = self.load("v", layer, nkv)?;
        // Training: the positions before the decode tail; decode: the tail,
        // or its last max_decode_steps positions.
        let tail = ((opts.decode_fraction.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n);
        let split = n - tail;
        let first = match opts.max_decode_steps {
            0 => split,
            cap => n - tail.min(cap),
        };
        let heads = (0..nkv)
            .map(|g| {
                let kv_rows = |src: &[f32]| -> Vec<f32> {
                    (0..n)
                        .flat_map(|t| {
                            src[(t * nkv + g) * d..(t * nkv + g + 1) * d]
                                .iter()
                                .copied()
                        })
                        .collect()
                };
                let group_rows = |range: std::ops::Range<usize>| -> Vec<f32> {
                    range
                        .flat_map(|t| {
                            q[(t * nq + g * rep) * d..(t * nq + (g + 1) * rep) * d]
                                .iter()
                                .copied()
                        })
                        .collect()
                };
                HeadData {
                    d,
                    n,
                    heads: rep,
                    keys: kv_rows(&k),
                    values: kv_rows(&v),
                    train_queries: group_rows(0..split),
                    decode_queries: group_rows(first..n),
                    decode_visible: (first..n).map(|t| t + 1).collect(),
                    scale: 1.0 / (d as f32).sqrt(),
                }
            })
            .collect();
        Ok(heads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_errors_name_the_field() {
        let ok = r#"{"model": "m", "layers": [0, 3], "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64, "n_tokens": 2048, "text_sha256": "x"}"#;
        let m = Meta::parse(ok).unwrap();
        assert_eq!((m.layers.clone(), m.group()), (vec![0, 3], 3));
        let bad = |from: &str, to: &str| Meta::parse(&ok.replace(from, to)).unwrap_err();
        assert!(bad("\"num_q_heads\": 9", "\"num_q_heads\": 8").starts_with("num_q_heads"));
        assert!(bad("[0, 3]", "[0, -3]").starts_with("layers[1]"));
        assert!(bad("[0, 3]", "[]").starts_with("layers"));
        assert!(bad("\"head_dim\": 64", "\"head_dim\": 0").starts_with("head_dim"));
        assert!(bad("\"n_tokens\": 2048", "\"n_tokens\": 1e12").starts_with("n_tokens"));
        assert!(bad("\"model\": \"m\"", "\"model\": 1").starts_with("model"));
        assert!(bad(", \"n_tokens\": 2048", "").starts_with("n_tokens: missing"));
    }
}

#[cfg(test)]
mod dir_tests {
    use super::*;
    use crate::npy::tests::npy_bytes;

    /// Element value that encodes its coordinates, so slicing errors show.
    fn code(kind: f32, t: usize, h: usize, i: usize) -> f32 {
        kind * 1e6 + (t * 1000 + h * 100 + i) as f32
    }

    fn write(dir: &Path, name: &str, kind: f32, n: usize, heads: usize, d: usize) {
        let mut data = Vec::new();
        for t in 0..n {
            for h in 0..heads {
                for i in 0..d {
                    data.extend(code(kind, t, h, i).to_le_bytes());
                }
            }
        }
        let dict =
            format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {heads}, {d}), }}");
        std::fs::write(dir.join(name), npy_bytes(1, &dict, &data)).unwrap();
    }

    #[test]
    fn slices_heads_groups_and_positions() {
        let dir = tempfile::tempdir().unwrap();
        let (n, nq, nkv, d) = (8, 4, 2, 3);
        std::fs::write(
            dir.path().join("meta.json"),
            format!(r#"{{"model": "tiny", "layers": [5], "num_q_heads": {nq}, "num_kv_heads": {nkv}, "head_dim": {d}, "n_tokens": {n}}}"#),
        )
        .unwrap();
        write(dir.path(), "q_5.npy", 1.0, n, nq, d);
        write(dir.path(), "k_5.npy", 2.0, n, nkv, d);
        write(dir.path(), "v_5.npy", 3.0, n, nkv, d);
        let cap = Capture::open(dir.path()).unwrap();
        assert!(matches!(
            cap.layer(4, &RealOptions::default()),
            Err(CaptureError::NoLayer(4))
        ));
        let heads = cap.layer(5, &RealOptions::default()).unwrap();
        assert_eq!(heads.len(), nkv);
        let g1 = &heads[1];
        g1.check().unwrap();
        assert_eq!((g1.n, g1.d, g1.heads), (n, d, 2));
        // Keys and values of KV head 1, every position.
        assert_eq!(
            g1.key(6),
            &[code(2.0, 6, 1, 0), code(2.0, 6, 1, 1), code(2.0, 6, 1, 2)]
        );
        assert_eq!(g1.values[7 * d + 2], code(3.0, 7, 1, 2));
        // Decode: the last ceil(25% of 8) = 2 positions; query heads 2 and 3.
        assert_eq!(g1.decode_visible, vec![7, 8]);
        assert_eq!(g1.decode_query(0, 0)[0], code(1.0, 6, 2, 0));
        assert_eq!(g1.decode_query(1, 1)[2], code(1.0, 7, 3, 2));
        // Training: positions 0..6 of the same heads.
        assert_eq!(g1.train_len(), 6);
        assert_eq!(g1.train_queries[(5 * 2 + 1) * d], code(1.0, 5, 3, 0));
        // A cap on decode steps keeps the last ones and the same training split.
        let capped = cap
            .layer(
                5,
                &RealOptions {
                    decode_fraction: 0.5,
                    max_decode_steps: 1,
                },
            )
            .unwrap();
        assert_eq!(
            (capped[0].decode_visible.clone(), capped[0].train_len()),
            (vec![8], 4)
        );

        // A file of the wrong shape is named in the error.
        write(dir.path(), "v_5.npy", 3.0, n, nkv + 1, d);
        let err = cap
            .layer(5, &RealOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("v_5.npy") && err.contains("expected [8, 2, 3]"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("k_5.npy")).unwrap();
        let err = cap
            .layer(5, &RealOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("k_5.npy"), "{err}");
    }
}
