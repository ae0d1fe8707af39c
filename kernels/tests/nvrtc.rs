//! The CUDA kernels cannot rot: every `kernels/cuda/*.cu` compiles to PTX
//! through NVRTC, without a GPU, and defines the kernels the `gpu` module
//! loads.
//!
//! Run as
//! `LD_LIBRARY_PATH=$(kernels/scripts/nvrtc-env) cargo test -p strata-kernels --features cuda nvrtc`.
//! Without libnvrtc these tests print a notice and pass, unless
//! `STRATA_REQUIRE_NVRTC=1`, when they fail (as in scripts/test).
#![cfg(feature = "cuda")]

use std::collections::BTreeSet;

use strata_kernels::gpu::{SOURCES, compile_ptx, nvrtc_available};

/// Architectures compiled: Ampere (the PTX the GPU check ships, JIT-able
/// by every later GPU) and Hopper (the lent H200).
const ARCHS: [&str; 2] = ["compute_80", "compute_90"];

fn nvrtc_or_skip(test: &str) -> bool {
    if nvrtc_available() {
        return true;
    }
    let how = "NVRTC (libnvrtc.so.13) not found: run with \
               LD_LIBRARY_PATH=$(kernels/scripts/nvrtc-env), which installs PyPI's \
               nvidia-cuda-nvrtc 13.0 into target/nvrtc-venv and prints its directory";
    if std::env::var("STRATA_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
        panic!("{test}: {how} (STRATA_REQUIRE_NVRTC=1)");
    }
    println!("SKIPPED {test}: {how}");
    false
}

#[test]
fn nvrtc_compiles_every_kernel_family() {
    if !nvrtc_or_skip("nvrtc_compiles_every_kernel_family") {
        return;
    }
    for src in &SOURCES {
        for arch in ARCHS {
            let ptx =
                compile_ptx(src, arch).unwrap_or_else(|e| panic!("{} for {arch}: {e}", src.name));
            let target = format!(".target sm_{}", &arch["compute_".len()..]);
            assert!(
                ptx.contains(&target),
                "{}: no `{target}` in the PTX",
                src.name
            );
            for k in src.kernels {
                assert!(
                    ptx.contains(&format!(".entry {k}(")),
                    "{}.cu ({arch}): kernel {k} missing from the PTX",
                    src.name
                );
            }
            // No spills to local memory from the hot kernels' registers.
            assert!(
                !ptx.contains("__local_depot") || src.name == "quant",
                "{}: local memory",
                src.name
            );
        }
    }
}

#[test]
fn nvrtc_sources_cover_every_cu_file() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/cuda");
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
        .expect("kernels/cuda exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .map(|n| n.trim_end_matches(".cu").to_string())
        .collect();
    let listed: BTreeSet<String> = SOURCES.iter().map(|s| s.name.to_string()).collect();
    assert_eq!(
        on_disk, listed,
        "gpu::SOURCES must list every kernels/cuda/*.cu"
    );
}

#[test]
fn nvrtc_reports_compile_errors_with_the_log() {
    if !nvrtc_or_skip("nvrtc_reports_compile_errors_with_the_log") {
        return;
    }
    // A broken copy of a real family must fail with NVRTC's log, not panic.
    let broken = strata_kernels::gpu::Source::broken_for_tests();
    let err = compile_ptx(&broken, "compute_80").expect_err("must not compile");
    let msg = err.to_string();
    assert!(msg.contains("broken.cu") && msg.contains("error"), "{msg}");
}
