//! The `strata-testdata` binary end to end: synthetic gates, a capture
//! directory in the real layout (written here byte by byte), and the exit
//! codes (0 whatever the gates say; non-zero only on usage or I/O errors).

use std::path::Path;
use std::process::Command;
use strata_testdata::{Config, Generator, Regime};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata-testdata"))
}

/// A version 1.0 `.npy` of little-endian f32, built per the format spec.
fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    let dims: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    )
    .into_bytes();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header);
    out.extend(data.iter().flat_map(|x| x.to_le_bytes()));
    std::fs::write(path, out).expect("write .npy");
}

#[test]
fn synthetic_gates_print_a_table() {
    let out = bin()
        .args([
            "gates",
            "--synthetic",
            "--n",
            "1024",
            "--steps",
            "16",
            "--regime",
            "needle",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("| synthetic needle |"), "{text}");
    assert!(text.contains("skew (top-2% mass) (≥ 0.8)"), "{text}");
    assert_eq!(text.matches("| synthetic").count(), 1);
}

#[test]
fn real_layout_gives_one_row_per_layer_and_kv_head() {
    // Two KV heads (two synthetic heads, d = 64) with GQA groups of 2.
    let (n, d, group, kv) = (512, 64, 2, 2);
    let heads: Vec<_> = (0..kv)
        .map(|g| {
            let mut c = Config::new(Regime::Semantic, n, 10 + g as u64);
            c.d = d;
            c.query_heads = group;
            c.decode_steps = 1;
            Generator::new(c).unwrap().generate().data
        })
        .collect();
    let mut q = vec![0.0f32; n * kv * group * d];
    let mut k = vec![0.0f32; n * kv * d];
    let mut v = vec![0.0f32; n * kv * d];
    for t in 0..n {
        for (g, h) in heads.iter().enumerate() {
            let dst = (t * kv + g) * d;
            k[dst..dst + d].copy_from_slice(h.key(t));
            v[dst..dst + d].copy_from_slice(&h.values[t * d..(t + 1) * d]);
            let src = t * group * d;
            let dst = (t * kv * group + g * group) * d;
            q[dst..dst + group * d].copy_from_slice(&h.train_queries[src..src + group * d]);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for layer in [3, 7] {
        write_npy(
            &dir.path().join(format!("q_{layer}.npy")),
            &[n, kv * group, d],
            &q,
        );
        write_npy(&dir.path().join(format!("k_{layer}.npy")), &[n, kv, d], &k);
        write_npy(&dir.path().join(format!("v_{layer}.npy")), &[n, kv, d], &v);
    }
    std::fs::write(
        dir.path().join("meta.json"),
        format!(
            r#"{{"model": "synthetic", "layers": [3, 7], "num_q_heads": {}, "num_kv_heads": {kv}, "head_dim": {d}, "n_tokens": {n}}}"#,
            kv * group
        ),
    )
    .unwrap();

    let out = bin()
        .arg("gates")
        .arg("--real")
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "| layer 3, KV head 0 |",
        "| layer 3, KV head 1 |",
        "| layer 7, KV head 1 |",
    ] {
        assert!(text.contains(row), "{row} missing:\n{text}");
    }
    let out = bin()
        .arg("gates")
        .arg("--real")
        .arg(dir.path())
        .args(["--layers", "7"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("layer 3,") && text.contains("layer 7, KV head 0"),
        "{text}"
    );

    // A layer that was not captured, a damaged file: I/O errors, exit 1.
    let out = bin()
        .arg("gates")
        .arg("--real")
        .arg(dir.path())
        .args(["--layers", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("layer 5"));
    std::fs::write(dir.path().join("k_7.npy"), b"not numpy").unwrap();
    let out = bin()
        .arg("gates")
        .arg("--real")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("k_7.npy"));
}

#[test]
fn usage_and_io_errors_exit_non_zero() {
    let code = |args: &[&str]| bin().args(args).output().unwrap().status.code();
    assert_eq!(code(&["gates"]), Some(2), "a source is required");
    assert_eq!(code(&["gates", "--synthetic", "--real", "x"]), Some(2));
    assert_eq!(
        code(&["gates", "--synthetic", "--regime", "other"]),
        Some(2)
    );
    assert_eq!(
        code(&["gates", "--real", "x", "--n", "5"]),
        Some(2),
        "synthetic-only flag"
    );
    assert_eq!(
        code(&["gates", "--synthetic", "--n", "10"]),
        Some(1),
        "n below 256"
    );
    assert_eq!(code(&["gates", "--real", "/nonexistent/capture"]), Some(1));
}
