//! [`HeadData`]: one KV head's keys, values and queries, synthetic or captured.
//!
//! Invariants (checked by [`HeadData::check`]): `keys` and `values` are
//! `[n][d]`; `train_queries` is `[train][heads][d]` and `decode_queries`
//! `[steps][heads][d]` (the query heads of one GQA group, consecutive);
//! `decode_visible[step]` in `1..=n` is how many leading keys that step may
//! attend to (`n` for synthetic data, `position + 1` for captured prompts,
//! whose attention is causal). Every element is finite.

/// One KV head and the queries of its GQA group.
#[derive(Debug, Clone)]
pub struct HeadData {
    /// Head dimension.
    pub d: usize,
    /// Tokens (rows of `keys` and `values`).
    pub n: usize,
    /// Query heads sharing this KV head.
    pub heads: usize,
    /// `[n][d]`, position order; token 0 is the sink.
    pub keys: Vec<f32>,
    /// `[n][d]`.
    pub values: Vec<f32>,
    /// `[train][heads][d]`: prefill queries, for indexes that learn from
    /// queries (COMPUTE.md §5).
    pub train_queries: Vec<f32>,
    /// `[steps][heads][d]`: the decode queries, in order.
    pub decode_queries: Vec<f32>,
    /// `[steps]`: keys `0..decode_visible[step]` are visible to that step.
    pub decode_visible: Vec<usize>,
    /// Softmax scale applied to `q.k` (`1/sqrt(d)`).
    pub scale: f32,
}

impl HeadData {
    /// Decode steps.
    pub fn steps(&self) -> usize {
        self.decode_visible.len()
    }

    /// Training (prefill) queries per head.
    pub fn train_len(&self) -> usize {
        self.train_queries.len() / (self.heads * self.d)
    }

    /// Key row `t`.
    pub fn key(&self, t: usize) -> &[f32] {
        &self.keys[t * self.d..(t + 1) * self.d]
    }

    /// The query of head `h` at decode step `step`.
    pub fn decode_query(&self, step: usize, h: usize) -> &[f32] {
        let i = (step * self.heads + h) * self.d;
        &self.decode_queries[i..i + self.d]
    }

    /// The queries of every head at decode step `step` (`[heads][d]`).
    pub fn decode_group(&self, step: usize) -> &[f32] {
        let i = step * self.heads * self.d;
        &self.decode_queries[i..i + self.heads * self.d]
    }

    /// Keys visible to decode step `step` (`[visible][d]`).
    pub fn visible_keys(&self, step: usize) -> &[f32] {
        &self.keys[..self.decode_visible[step] * self.d]
    }

    /// Values visible to decode step `step`.
    pub fn visible_values(&self, step: usize) -> &[f32] {
        &self.values[..self.decode_visible[step] * self.d]
    }

    /// Checks the shape invariants of the module documentation.
    pub fn check(&self) -> Result<(), String> {
        let (n, d, h) = (self.n, self.d, self.heads);
        if n == 0 || d == 0 || h == 0 {
            return Err(format!("empty shape: n {n}, d {d}, heads {h}"));
        }
        if self.keys.len() != n * d || self.values.len() != n * d {
            return Err("keys/values are not [n][d]".into());
        }
        if !self.train_queries.len().is_multiple_of(h * d) {
            return Err("train_queries is not [m][heads][d]".into());
        }
        if self.decode_queries.len() != self.steps() * h * d {
            return Err("decode_queries is not [steps][heads][d]".into());
        }
        if let Some(v) = self.decode_visible.iter().find(|&&v| v == 0 || v > n) {
            return Err(format!("decode_visible {v} outside 1..={n}"));
        }
        let finite = |xs: &[f32]| xs.iter().all(|x| x.is_finite());
        if !(finite(&self.keys)
            && finite(&self.values)
            && finite(&self.train_queries)
            && finite(&self.decode_queries))
        {
            return Err("a non-finite element".into());
        }
        Ok(())
    }
}
