//! The synthetic KV head of COMPUTE.md §2.
//!
//! A token's *latent* (48 dims) is its topic vector plus noise and, in the
//! last [`Config::features`] dims, feature values that are heavy-tailed
//! (Student-t, ν = 3) in the needle regime. Topic segments have geometric
//! lengths (mean 48); there are `n / 128` topic vectors. One random linear
//! map `W` (`d x latent`) takes latents to head space:
//!
//! ```text
//! key_t   = C W x_t + b_k + U n_t + noise        (token 0 also + alpha * b_q/|b_q|)
//! query   = tau * (P_U W x_q + b_q)              (P_U: projection orthogonal to U)
//! value_t = W_v x_t + noise                      (token 0's value scaled down)
//! ```
//!
//! * `C` are the keys' per-channel outlier scales `exp(N(0,1))`. They shape
//!   key geometry and weight the score by `c_i`; applying them to queries
//!   too would weight it by `c_i^2`, whose few largest channels (effective
//!   rank about 2 of 128) would leave topics indistinguishable;
//! * `b_k` is a large shared key bias (2x the RMS semantic key norm);
//! * `U n_t` is the 32-dim nuisance subspace (needle regime): a RoPE-like
//!   sinusoid of the position (16 frequencies from 1 to 1/10000 per
//!   token), so that nearby positions have nearby keys whatever their
//!   content. Keys vary strongly there (2x the semantic norm), queries not
//!   at all;
//! * `b_q` is a different large bias (2x the RMS semantic query norm),
//!   orthogonal to the span of `C W` and to `U`: queries are out of
//!   distribution for keys, yet the bias adds no query-independent
//!   preference among keys (which would freeze the top-k); only the sink,
//!   which carries a component along it, profits;
//! * `tau` (the temperature) is calibrated by bisection on sample queries
//!   so that the median mass of the top 1% of non-sink keys (softmax over
//!   the non-sink keys) is [`Config::top1_mass`]; then `alpha` is solved so
//!   that the sink's median weight is [`Config::sink_mass`].
//!
//! Queries follow a state (a topic; in the needle regime also a feature
//! and a sign: "tokens extreme in that feature") that a decode step keeps
//! with probability [`Config::persistence`]; a new state takes the topic of
//! a random context token. Each query adds fresh latent noise; each head of
//! a GQA group adds its own fixed latent offset ([`Config::gqa_spread`],
//! none for head 0). Prefill (training) queries take the topic of their own
//! position and one feature per segment. The per-query attention varies a
//! lot (heavy tails, outlier channels), so medians over a few dozen
//! queries are noisy: hence 128 calibration queries and 256 decode steps.
//!
//! Determinism: one xoshiro256** stream per purpose under the seed, and
//! only IEEE basic operations plus [`detmath`](crate::detmath), so a seed
//! gives the same bits on every platform.

use crate::data::HeadData;
use crate::detmath;
use crate::linalg::{self, extend_basis, project_out};
use crate::rng::Rng;

/// Which kind of head to imitate (COMPUTE.md §2: both are used in every test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regime {
    /// Relevant tokens lie in contiguous topic runs; no needles, no nuisance.
    Semantic,
    /// Heavy-tailed features make a few scattered tokens extreme, queries
    /// look for them, and a nuisance subspace hides relevance from key
    /// geometry.
    Needle,
}

impl Regime {
    pub fn name(self) -> &'static str {
        match self {
            Regime::Semantic => "semantic",
            Regime::Needle => "needle",
        }
    }
}

impl std::str::FromStr for Regime {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "semantic" => Ok(Regime::Semantic),
            "needle" => Ok(Regime::Needle),
            _ => Err(format!("unknown regime {s:?} (semantic | needle)")),
        }
    }
}

/// Every knob of the generator. [`Config::new`] gives the defaults of a
/// regime; tests change single fields to break one property on purpose.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub regime: Regime,
    pub seed: u64,
    /// Tokens of context (keys, values); at least 256.
    pub n: usize,
    /// Head dimension (128).
    pub d: usize,
    /// Latent dimension (48), of which the last `features` are feature dims.
    pub latent: usize,
    /// Feature dims (8): heavy-tailed per token when `heavy_tails`.
    pub features: usize,
    /// Mean topic-segment length in tokens (48; lengths are geometric).
    pub segment_mean: f64,
    /// Tokens per topic vector (128): `max(2, n / tokens_per_topic)` topics.
    pub tokens_per_topic: usize,
    /// Std of a token's latent around its topic (topics have unit std per
    /// dim): 0.5.
    pub token_noise: f64,
    /// Feature values are Student-t ν = 3 (scaled to unit variance) when
    /// true, standard normal otherwise.
    pub heavy_tails: bool,
    /// Std of the feature values (1).
    pub feature_scale: f64,
    /// `|b_k|` / RMS norm of the centred semantic key part `C W x` (2).
    pub key_bias_ratio: f64,
    /// RMS norm of the key noise / that of the semantic key part (0.25:
    /// "small", and it sets the OOD ratio near 6; 0.1 gives 15, 0.4 gives 4;
    /// real SmolLM2-135M heads measure 1.2 to 7.9).
    pub key_noise_ratio: f64,
    /// Dimension of the nuisance subspace (32 in the needle regime; 0 =
    /// off). Even; `latent + nuisance_dims < d` leaves room for `b_q`.
    pub nuisance_dims: usize,
    /// Norm of the nuisance component / RMS semantic key norm (2).
    pub nuisance_ratio: f64,
    /// `|b_q|` / RMS norm of the semantic query part (2).
    pub query_bias_ratio: f64,
    /// Weight of the state's topic vector in a query's latent (semantic 1,
    /// needle 0.1: needle queries are about features, not topics).
    pub query_topic_weight: f64,
    /// Weight of the state's feature (a signed unit latent dim) in a query
    /// (semantic 0, needle 2).
    pub query_feature_weight: f64,
    /// Std of the fresh per-query latent noise, all latent dims (semantic
    /// 0.5, needle 0.15): with the persistence, it sets the dynamics.
    pub query_noise: f64,
    /// Probability that a decode step keeps the previous step's state (0.7).
    pub persistence: f64,
    /// Decode queries to produce (256: medians over fewer are noisy).
    pub decode_steps: usize,
    /// Prefill (training) queries: one per position `0..train_queries`
    /// (at most `n`).
    pub train_queries: usize,
    /// Query heads per KV head (GQA group size).
    pub query_heads: usize,
    /// Std of each head's fixed latent offset from the shared query (0.3;
    /// head 0 has none): heads of a group agree on the topic, not on every key.
    pub gqa_spread: f64,
    /// Target median mass of the top 1% of non-sink keys (0.8).
    pub top1_mass: f64,
    /// Queries sampled for the temperature calibration (128).
    pub calibration_queries: usize,
    /// Target median softmax weight of the sink, token 0 (0.25; real
    /// SmolLM2-135M heads of layers 15 to 29 measure 0.07 to 0.48).
    pub sink_mass: f64,
    /// RMS norm of the value noise / that of the semantic value part (0.3).
    pub value_noise_ratio: f64,
    /// The sink's value is scaled by this (0.1: real sinks carry small values).
    pub sink_value_scale: f64,
}

impl Config {
    /// The defaults of `regime` for `n` tokens.
    pub fn new(regime: Regime, n: usize, seed: u64) -> Self {
        let semantic = regime == Regime::Semantic;
        Self {
            regime,
            seed,
            n,
            d: 128,
            latent: 48,
            features: 8,
            segment_mean: 48.0,
            tokens_per_topic: 128,
            token_noise: 0.5,
            heavy_tails: !semantic,
            feature_scale: 1.0,
            key_bias_ratio: 2.0,
            key_noise_ratio: 0.25,
            nuisance_dims: if semantic { 0 } else { 32 },
            nuisance_ratio: 2.0,
            query_bias_ratio: 2.0,
            query_topic_weight: if semantic { 1.0 } else { 0.1 },
            query_feature_weight: if semantic { 0.0 } else { 2.0 },
            query_noise: if semantic { 0.5 } else { 0.15 },
            persistence: 0.7,
            decode_steps: 256,
            train_queries: n,
            query_heads: 1,
            gqa_spread: 0.3,
            top1_mass: 0.8,
            calibration_queries: 128,
            sink_mass: 0.25,
            value_noise_ratio: 0.3,
            sink_value_scale: 0.1,
        }
    }

    /// Checks the ranges the generator relies on.
    pub fn validate(&self) -> Result<(), String> {
        let c = self;
        let mut bad = Vec::new();
        if c.n < 256 || c.n > (1 << 24) {
            bad.push(format!("n {} outside 256..=2^24", c.n));
        }
        if c.d < 8 || c.d > 1024 {
            bad.push(format!("d {} outside 8..=1024", c.d));
        }
        if c.features == 0 || c.features >= c.latent || c.latent > c.d {
            bad.push(format!(
                "need 0 < features ({}) < latent ({}) <= d ({})",
                c.features, c.latent, c.d
            ));
        }
        if c.nuisance_dims % 2 == 1 || c.latent + c.nuisance_dims >= c.d {
            bad.push(format!(
                "nuisance_dims {} must be even and leave room beside latent {} in d {} for the query bias",
                c.nuisance_dims, c.latent, c.d
            ));
        }
        if c.segment_mean < 1.0 || c.tokens_per_topic == 0 {
            bad.push("segment_mean >= 1 and tokens_per_topic > 0".into());
        }
        if !(0.0..=1.0).contains(&c.persistence) {
            bad.push(format!("persistence {} outside [0, 1]", c.persistence));
        }
        if !(c.top1_mass > 0.011 && c.top1_mass < 1.0) {
            bad.push(format!("top1_mass {} outside (0.011, 1)", c.top1_mass));
        }
        if !(c.sink_mass > 0.0 && c.sink_mass < 1.0) {
            bad.push(format!("sink_mass {} outside (0, 1)", c.sink_mass));
        }
        if c.query_heads == 0 || c.query_heads > 64 {
            bad.push(format!("query_heads {} outside 1..=64", c.query_heads));
        }
        if c.calibration_queries == 0 || c.decode_steps == 0 || c.train_queries > c.n {
            bad.push("calibration_queries, decode_steps > 0 and train_queries <= n".into());
        }
        let nonneg = [
            c.token_noise,
            c.feature_scale,
            c.key_bias_ratio,
            c.key_noise_ratio,
            c.nuisance_ratio,
            c.query_bias_ratio,
            c.query_topic_weight,
            c.query_feature_weight,
            c.query_noise,
            c.gqa_spread,
            c.value_noise_ratio,
            c.sink_value_scale,
        ];
        if nonneg.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
            bad.push("scales and ratios must be finite and >= 0".into());
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }
}

/// What a query looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryState {
    pub topic: u32,
    /// Latent feature index in `0..features` (unused in the semantic regime).
    pub feature: u32,
    /// +1 or -1: which tail of the feature the query looks for.
    pub positive: bool,
}

/// Generated data plus what the generator knows about it.
#[derive(Debug, Clone)]
pub struct Synthetic {
    pub config: Config,
    pub data: HeadData,
    /// Calibrated temperature `tau` (queries are multiplied by it).
    pub temperature: f64,
    /// Component of the sink key along the unit query bias.
    pub sink_boost: f64,
    /// Topic of each token.
    pub token_topic: Vec<u32>,
    /// State of each decode step.
    pub decode_state: Vec<QueryState>,
    /// Orthonormal basis (`d`-vectors) of the nuisance subspace; empty when off.
    pub nuisance_basis: Vec<Vec<f64>>,
}

/// Seeded generator of one synthetic KV head (see the module documentation).
#[derive(Debug, Clone)]
pub struct Generator {
    config: Config,
}

// Stream tags: one independent stream per purpose.
const STREAM_STRUCTURE: u64 = 1;
const STREAM_TOKENS: u64 = 2;
const STREAM_CALIBRATION: u64 = 3;
const STREAM_DECODE: u64 = 4;
const STREAM_TRAIN: u64 = 5;

/// The fixed structure every query and key is made from.
struct Model {
    d: usize,
    latent: usize,
    features: usize,
    heads: usize,
    /// `W`, `d x latent`: the map of query latents.
    w: Vec<f64>,
    /// Topic vectors, zero in the feature dims.
    topics: Vec<Vec<f64>>,
    /// Orthonormal basis of the nuisance subspace.
    nuisance: Vec<Vec<f64>>,
    query_topic_weight: f64,
    query_feature_weight: f64,
    query_noise: f64,
    /// `[heads][latent]`: each head's fixed latent offset (zero for head 0).
    head_offset: Vec<Vec<f64>>,
}

impl Model {
    /// The semantic part `P_U W x` of each head's query for `state`
    /// (`out`: `[heads][d]`), before bias and temperature.
    fn query(&self, state: QueryState, rng: &mut Rng, out: &mut [f64]) {
        let (l, f) = (self.latent, self.features);
        let mut x: Vec<f64> = self.topics[state.topic as usize]
            .iter()
            .map(|t| self.query_topic_weight * t)
            .collect();
        let fi = l - f + state.feature as usize;
        x[fi] += if state.positive {
            self.query_feature_weight
        } else {
            -self.query_feature_weight
        };
        for xi in x.iter_mut() {
            *xi += self.query_noise * rng.normal();
        }
        let mut xh = vec![0.0; l];
        for h in 0..self.heads {
            for ((dst, src), off) in xh.iter_mut().zip(&x).zip(&self.head_offset[h]) {
                *dst = src + off;
            }
            let q = &mut out[h * self.d..(h + 1) * self.d];
            linalg::matvec(&self.w, self.d, l, &xh, q);
            project_out(q, &self.nuisance);
        }
    }
}

impl Generator {
    pub fn new(config: Config) -> Result<Self, String> {
        config.validate()?;
        Ok(Self { config })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Generates the head. Deterministic in the configuration.
    pub fn generate(&self) -> Synthetic {
        let c = &self.config;
        let (n, d, l, nf) = (c.n, c.d, c.latent, c.features);
        let lt = l - nf; // topic dims
        let heads = c.query_heads;

        // --- Structure: maps, topics, subspaces, bias directions.
        let mut rs = Rng::stream(c.seed, STREAM_STRUCTURE);
        let inv_sqrt_l = 1.0 / (l as f64).sqrt();
        let w: Vec<f64> = (0..d * l).map(|_| rs.normal() * inv_sqrt_l).collect();
        let chan: Vec<f64> = (0..d).map(|_| detmath::exp(rs.normal())).collect();
        let a: Vec<f64> = (0..d * l).map(|i| chan[i / l] * w[i]).collect();
        let w_v: Vec<f64> = (0..d * l).map(|_| rs.normal() * inv_sqrt_l).collect();
        let n_topics = (n / c.tokens_per_topic).max(2);
        let topics: Vec<Vec<f64>> = (0..n_topics)
            .map(|_| {
                let mut t = rs.normals(lt);
                t.resize(l, 0.0);
                t
            })
            .collect();
        let key_bias_dir = unit(rs.normals(d));
        // Nuisance: a random subspace (generic with respect to span(C W)).
        let mut nuisance = Vec::new();
        while nuisance.len() < c.nuisance_dims {
            extend_basis(&mut nuisance, rs.normals(d));
        }
        let pairs = c.nuisance_dims / 2;
        let freqs: Vec<f64> = (0..pairs)
            .map(|i| detmath::exp(-(i as f64 / pairs as f64) * detmath::ln(10_000.0)))
            .collect();
        let phases: Vec<f64> = (0..pairs)
            .map(|_| rs.uniform() * 2.0 * std::f64::consts::PI)
            .collect();
        // Query bias: orthogonal to span(C W) and to U.
        let mut span = nuisance.clone();
        for j in 0..l {
            extend_basis(&mut span, (0..d).map(|i| a[i * l + j]).collect());
        }
        let mut bq_dir = rs.normals(d);
        project_out(&mut bq_dir, &span);
        let bq_dir = unit(bq_dir);
        let head_offset: Vec<Vec<f64>> = (0..heads)
            .map(|h| {
                let o = rs.normals(l);
                let s = if h == 0 { 0.0 } else { c.gqa_spread };
                o.iter().map(|x| x * s).collect()
            })
            .collect();

        let model = Model {
            d,
            latent: l,
            features: nf,
            heads,
            w,
            topics,
            nuisance,
            query_topic_weight: c.query_topic_weight,
            query_feature_weight: c.query_feature_weight,
            query_noise: c.query_noise,
            head_offset,
        };

        // --- Tokens: segments, latents, semantic keys and values.
        let mut rt = Rng::stream(c.seed, STREAM_TOKENS);
        let mut token_topic = Vec::with_capacity(n);
        let mut segment_start = Vec::new();
        while token_topic.len() < n {
            let len = rt.geometric(c.segment_mean).min(n - token_topic.len());
            let topic = rt.below(n_topics as u64) as u32;
            segment_start.push(token_topic.len());
            token_topic.extend(std::iter::repeat_n(topic, len));
        }
        let mut sem = vec![0.0f64; n * d];
        let mut val = vec![0.0f64; n * d];
        let mut x = vec![0.0; l];
        for t in 0..n {
            let topic = &model.topics[token_topic[t] as usize];
            for j in 0..lt {
                x[j] = topic[j] + c.token_noise * rt.normal();
            }
            for xj in x[lt..].iter_mut() {
                let f = if c.heavy_tails {
                    rt.student_t3() / 3f64.sqrt()
                } else {
                    rt.normal()
                };
                *xj = c.feature_scale * f;
            }
            linalg::matvec(&a, d, l, &x, &mut sem[t * d..(t + 1) * d]);
            linalg::matvec(&w_v, d, l, &x, &mut val[t * d..(t + 1) * d]);
        }
        let r_sem = rms_centred(&sem, d);
        let r_val = rms_centred(&val, d);
        let key_noise = c.key_noise_ratio * r_sem / (d as f64).sqrt();
        let value_noise = c.value_noise_ratio * r_val / (d as f64).sqrt();
        let amp = if pairs > 0 {
            c.nuisance_ratio * r_sem / (pairs as f64).sqrt()
        } else {
            0.0
        };
        // Keys in f64 until the sink is placed.
        let mut keys = vec![0.0f64; n * d];
        for t in 0..n {
            let k = &mut keys[t * d..(t + 1) * d];
            for i in 0..d {
                k[i] = sem[t * d + i]
                    + c.key_bias_ratio * r_sem * key_bias_dir[i]
                    + key_noise * rt.normal();
            }
            for p in 0..pairs {
                let (s, co) = detmath::sin_cos(freqs[p] * t as f64 + phases[p]);
                let (u0, u1) = (&model.nuisance[2 * p], &model.nuisance[2 * p + 1]);
                for i in 0..d {
                    k[i] += amp * (co * u0[i] + s * u1[i]);
                }
            }
            for i in 0..d {
                val[t * d + i] += value_noise * rt.normal();
            }
        }
        drop(sem);
        for vi in val[..d].iter_mut() {
            *vi *= c.sink_value_scale;
        }

        // --- Calibration: query bias norm, temperature, sink.
        let scale = 1.0 / (d as f64).sqrt();
        let mut rc = Rng::stream(c.seed, STREAM_CALIBRATION);
        let m = c.calibration_queries;
        let mut cal = vec![0.0f64; m * heads * d];
        for i in 0..m {
            let state = random_state(&mut rc, &token_topic, nf);
            model.query(state, &mut rc, &mut cal[i * heads * d..(i + 1) * heads * d]);
        }
        let r_q = (cal.chunks_exact(d).map(|q| linalg::dot(q, q)).sum::<f64>()
            / (m * heads) as f64)
            .sqrt();
        let bq: Vec<f64> = bq_dir
            .iter()
            .map(|x| x * c.query_bias_ratio * r_q)
            .collect();
        let bq_norm = linalg::norm(&bq);
        for q in cal.chunks_exact_mut(d) {
            q.iter_mut().zip(&bq).for_each(|(x, b)| *x += b);
        }
        // Raw logits (temperature 1) of each calibration query: sink apart,
        // the others sorted descending.
        let mut sink_logit = Vec::with_capacity(m * heads);
        let mut sorted: Vec<Vec<f64>> = Vec::with_capacity(m * heads);
        for q in cal.chunks_exact(d) {
            sink_logit.push(scale * linalg::dot(q, &keys[..d]));
            let mut lg: Vec<f64> = keys[d..]
                .chunks_exact(d)
                .map(|k| scale * linalg::dot(q, k))
                .collect();
            lg.sort_by(|a, b| b.total_cmp(a));
            sorted.push(lg);
        }
        let top = (0.01 * (n - 1) as f64).ceil() as usize;
        let temperature = calibrate_temperature(&sorted, top, c.top1_mass);
        // Sink: query i gives the sink the weight
        // sigmoid(tau l0_i - lse_rest_i + boost * g_i), g_i = scale tau q_i.b_q/|b_q|
        // (> 0: the bias dominates q_i's component along itself), which
        // reaches sink_mass at boost_i; every weight grows with the boost, so
        // the median weight reaches it at the median of the boost_i.
        let logit_target = detmath::ln(c.sink_mass / (1.0 - c.sink_mass));
        let boosts: Vec<f64> = sorted
            .iter()
            .zip(&sink_logit)
            .zip(cal.chunks_exact(d))
            .filter_map(|((lg, l0), q)| {
                let g = scale * temperature * linalg::dot(q, &bq_dir);
                let need = logit_target - (temperature * l0 - lse_sorted(lg, temperature));
                (g > 0.0).then(|| need / g)
            })
            .collect();
        // Without a query bias there is nothing for the sink to ride on.
        let sink_boost = if bq_norm > 0.0 && !boosts.is_empty() {
            linalg::median(&boosts).max(0.0)
        } else {
            0.0
        };
        for (k, b) in keys[..d].iter_mut().zip(&bq_dir) {
            *k += sink_boost * b;
        }

        // --- Queries.
        let finish = |raw: &[f64], out: &mut Vec<f32>| {
            for q in raw.chunks_exact(d) {
                out.extend(
                    q.iter()
                        .zip(&bq)
                        .map(|(x, b)| (temperature * (x + b)) as f32),
                );
            }
        };
        let mut rd = Rng::stream(c.seed, STREAM_DECODE);
        let mut decode_state = Vec::with_capacity(c.decode_steps);
        let mut decode_queries = Vec::with_capacity(c.decode_steps * heads * d);
        let mut raw = vec![0.0f64; heads * d];
        let mut state = random_state(&mut rd, &token_topic, nf);
        for step in 0..c.decode_steps {
            if step > 0 && !rd.chance(c.persistence) {
                state = random_state(&mut rd, &token_topic, nf);
            }
            decode_state.push(state);
            model.query(state, &mut rd, &mut raw);
            finish(&raw, &mut decode_queries);
        }
        let mut rp = Rng::stream(c.seed, STREAM_TRAIN);
        let mut train_queries = Vec::with_capacity(c.train_queries * heads * d);
        let mut seg = 0;
        let mut state = QueryState {
            topic: 0,
            feature: 0,
            positive: true,
        };
        for (t, &topic) in token_topic.iter().enumerate().take(c.train_queries) {
            if seg < segment_start.len() && segment_start[seg] == t {
                seg += 1;
                state.feature = rp.below(nf as u64) as u32;
                state.positive = rp.chance(0.5);
            }
            state.topic = topic;
            model.query(state, &mut rp, &mut raw);
            finish(&raw, &mut train_queries);
        }

        let data = HeadData {
            d,
            n,
            heads,
            keys: keys.iter().map(|&x| x as f32).collect(),
            values: val.iter().map(|&x| x as f32).collect(),
            train_queries,
            decode_queries,
            decode_visible: vec![n; c.decode_steps],
            scale: scale as f32,
        };
        debug_assert_eq!(data.check(), Ok(()));
        Synthetic {
            config: c.clone(),
            data,
            temperature,
            sink_boost,
            token_topic,
            decode_state,
            nuisance_basis: model.nuisance,
        }
    }
}

fn unit(mut v: Vec<f64>) -> Vec<f64> {
    let n = linalg::norm(&v);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// RMS norm of the rows of `m` (`[rows][d]`) around their mean.
fn rms_centred(m: &[f64], d: usize) -> f64 {
    let rows = m.len() / d;
    let mut mean = vec![0.0; d];
    for r in m.chunks_exact(d) {
        mean.iter_mut().zip(r).for_each(|(a, x)| *a += x);
    }
    mean.iter_mut().for_each(|a| *a /= rows as f64);
    let ss: f64 = m
        .chunks_exact(d)
        .map(|r| {
            r.iter()
                .zip(&mean)
                .map(|(x, mu)| (x - mu) * (x - mu))
                .sum::<f64>()
        })
        .sum();
    (ss / rows as f64).sqrt()
}

/// A fresh query state: the topic of a random non-sink token, a random
/// feature and tail.
fn random_state(rng: &mut Rng, token_topic: &[u32], features: usize) -> QueryState {
    let t = 1 + rng.below(token_topic.len() as u64 - 1) as usize;
    QueryState {
        topic: token_topic[t],
        feature: rng.below(features as u64) as u32,
        positive: rng.chance(0.5),
    }
}

/// Terms further than this below the maximum logit are dropped from sums
/// of exponentials (each is below e^-40 of the largest; n of them change
/// the sum by less than n * 4e-18).
const LOGIT_CUTOFF: f64 = 40.0;

/// `(top-m mass, ln sum)` relative to the maximum, of the logits `lg`
/// (sorted descending) at temperature `tau`.
fn top_mass_sorted(lg: &[f64], top: usize, tau: f64) -> f64 {
    let mut head = 0.0;
    let mut sum = 0.0;
    for (i, &x) in lg.iter().enumerate() {
        let z = tau * (x - lg[0]);
        if z < -LOGIT_CUTOFF {
            break;
        }
        let e = detmath::exp(z);
        sum += e;
        if i < top {
            head += e;
        }
    }
    head / sum
}

fn lse_sorted(lg: &[f64], tau: f64) -> f64 {
    let mut sum = 0.0;
    for &x in lg {
        let z = tau * (x - lg[0]);
        if z < -LOGIT_CUTOFF {
            break;
        }
        sum += detmath::exp(z);
    }
    tau * lg[0] + detmath::ln(sum)
}

/// The temperature at which the median over queries of the top-`top` mass
/// is `target`, by bisection on `ln tau` (the mass grows with `tau`).
fn calibrate_temperature(sorted: &[Vec<f64>], top: usize, target: f64) -> f64 {
    let median_mass = |tau: f64| {
        let masses: Vec<f64> = sorted
            .iter()
            .map(|lg| top_mass_sorted(lg, top, tau))
            .collect();
        linalg::median(&masses)
    };
    let (mut lo, mut hi) = (0.0f64, 0.0f64); // ln tau
    while median_mass(detmath::exp(lo)) > target && lo > -60.0 {
        lo -= 2.0;
    }
    while median_mass(detmath::exp(hi)) < target && hi < 60.0 {
        hi += 2.0;
    }
    // The bracket spans 2 in ln tau: 30 halvings leave 2e-9.
    for _ in 0..30 {
        let mid = 0.5 * (lo + hi);
        if median_mass(detmath::exp(mid)) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    detmath::exp(0.5 * (lo + hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_field() {
        let mut c = Config::new(Regime::Needle, 100, 1);
        assert!(c.validate().unwrap_err().contains("n 100"));
        c.n = 1024;
        c.nuisance_dims = 90;
        assert!(c.validate().unwrap_err().contains("nuisance_dims"));
        assert!(Config::new(Regime::Semantic, 4096, 1).validate().is_ok());
    }
}
