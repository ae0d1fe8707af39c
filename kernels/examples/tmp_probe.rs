use half::f16;
use std::time::Instant;
use strata_kernels::attention::{AttnScratch, AttnState, Tokens};
fn main() {
    let nb = 2048usize; // 16 MiB of 8 KiB blocks (L3) or set big
    let big: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(nb);
    let d = 128; let g = 4; let tpb = 16;
    let mut data = vec![0u8; big * 8192];
    for (i, b) in data.iter_mut().enumerate() { *b = (i * 7 % 251) as u8 & 0x3f; }
    let q: Vec<f32> = (0..g * d).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut scratch = AttnScratch::new(g, d);
    for round in 0..3 {
        let t = Instant::now();
        let mut s = 0u64;
        for b in 0..big { let blk = &data[b * 8192..(b + 1) * 8192]; s ^= xxhash_rust::xxh3::xxh3_64(&blk[..4096]) ^ xxhash_rust::xxh3::xxh3_64(&blk[4096..]); }
        let th = t.elapsed();
        let t = Instant::now();
        let mut st = AttnState::new(g, d);
        for b in 0..big {
            let blk = &data[b * 8192..(b + 1) * 8192];
            let k: &[f16] = unsafe { std::slice::from_raw_parts(blk.as_ptr() as *const f16, tpb * d) };
            let v: &[f16] = unsafe { std::slice::from_raw_parts(blk[4096..].as_ptr() as *const f16, tpb * d) };
            st.feed_head(&q, 0.088, k, v, 1, 0, Tokens::All, &mut scratch);
        }
        let ta = t.elapsed();
        let t = Instant::now();
        for b in 0..big {
            let blk = &data[b * 8192..(b + 1) * 8192];
            s ^= xxhash_rust::xxh3::xxh3_64(&blk[..4096]) ^ xxhash_rust::xxh3::xxh3_64(&blk[4096..]);
            let k: &[f16] = unsafe { std::slice::from_raw_parts(blk.as_ptr() as *const f16, tpb * d) };
            let v: &[f16] = unsafe { std::slice::from_raw_parts(blk[4096..].as_ptr() as *const f16, tpb * d) };
            st.feed_head(&q, 0.088, k, v, 1, 0, Tokens::All, &mut scratch);
        }
        let tb = t.elapsed();
        let gb = |t: std::time::Duration| (big * 8192) as f64 / t.as_secs_f64() / 1e9;
        println!("round {round} blocks {big}: hash {:.1} GB/s, attend {:.1} GB/s, both {:.1} GB/s (s {s})", gb(th), gb(ta), gb(tb));
    }
}
