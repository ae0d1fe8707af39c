//! Boundary 3 for authentication: real `stratad` processes. What a process
//! adds over the in-process tests: the refusal at start (exit status and
//! message), the start-up log line, and re-reading the tokens file on
//! SIGHUP.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::Command;
use std::time::{Duration, Instant};

use strata_client::{Client, Credentials};
use strata_tests::{Daemon, bin, free_port, signal, strata};

const OLD: &str = "alice-old-token-0123456789";
const NEW: &str = "alice-new-token-0123456789";

/// The tenant the daemon sees for `token`, or the error's text.
async fn tenant_of(d: &Daemon, token: &str) -> Result<String, String> {
    let mut c = Client::connect_with(
        &d.endpoint(),
        &Credentials {
            token: Some(token.into()),
            tls: None,
        },
    )
    .await
    .unwrap();
    c.stats().await.map(|s| s.tenant).map_err(|e| e.to_string())
}

fn wait_for_log(d: &Daemon, needle: &str, count: usize) {
    let t = Instant::now();
    while d.log_text().matches(needle).count() < count {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{needle:?} not logged:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tcp_beyond_loopback_without_auth_stops_the_daemon_with_what_to_configure() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("stratad"))
        .args(["--listen", &format!("0.0.0.0:{}", free_port())])
        .args(["--metrics-listen", "off", "--data-dir"])
        .arg(dir.path())
        .args(["--nvme-bytes", "0", "--dram-bytes", "8MiB"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in ["server.listen", "auth.tcp = \"mtls\"", "allow_insecure_tcp"] {
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn the_default_daemon_says_auth_is_off_and_why_that_is_safe() {
    let mut d = Daemon::spawn(&["--nvme-bytes", "0", "--dram-bytes", "8MiB"]);
    let log = d.log_text();
    assert!(
        log.contains("authentication is off") && log.contains("loopback"),
        "{log}"
    );
    assert!(d.terminate().success());
}

/// A daemon with `auth.tcp = "token"` and one tenant whose token is
/// [`OLD`]; the directory holding its config and tokens file, and that file.
fn token_daemon(tenant: &str, admin: bool) -> (tempfile::TempDir, std::path::PathBuf, Daemon) {
    let cfg_dir = tempfile::tempdir().unwrap();
    let tokens = cfg_dir.path().join("tokens");
    std::fs::write(&tokens, format!("{tenant} {OLD}\n")).unwrap();
    let cfg = cfg_dir.path().join("stratad.toml");
    std::fs::write(
        &cfg,
        format!(
            "[auth]\ntcp = \"token\"\ntokens_file = \"{}\"\n[[tenants]]\nname = \"{tenant}\"\nadmin = {admin}\n",
            tokens.display()
        ),
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let d = Daemon::spawn(&[
        "--config",
        &cfg,
        "--nvme-bytes",
        "0",
        "--dram-bytes",
        "8MiB",
    ]);
    (cfg_dir, tokens, d)
}

#[tokio::test]
async fn sighup_rereads_the_tokens_file() {
    let (_cfg_dir, tokens, mut d) = token_daemon("alice", false);
    assert!(d.log_text().contains("authentication is on"));
    assert_eq!(tenant_of(&d, OLD).await.unwrap(), "alice");
    assert!(
        tenant_of(&d, NEW)
            .await
            .unwrap_err()
            .starts_with("UNAUTHENTICATED")
    );
    // Rotate: the new token in, the old one out, then SIGHUP.
    std::fs::write(&tokens, format!("alice {NEW}\n")).unwrap();
    signal(d.pid(), "HUP");
    wait_for_log(&d, "tokens file re-read", 1);
    assert_eq!(tenant_of(&d, NEW).await.unwrap(), "alice");
    assert!(
        tenant_of(&d, OLD)
            .await
            .unwrap_err()
            .starts_with("UNAUTHENTICATED")
    );
    // A broken file is refused and the tokens in use stay.
    std::fs::write(&tokens, "alice short\n").unwrap();
    signal(d.pid(), "HUP");
    wait_for_log(&d, "the tokens in use stay", 1);
    assert_eq!(tenant_of(&d, NEW).await.unwrap(), "alice");
    assert!(d.terminate().success());
}

/// The CLI against a daemon with tokens: refused without one (with the
/// hint), served with --token-file or STRATA_TOKEN, and bad flag
/// combinations refused before connecting.
#[test]
fn the_cli_passes_a_token() {
    let (cfg_dir, _tokens, mut d) = token_daemon("ops", true);
    let ep = d.endpoint();
    let out = strata(&ep, &["stats"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("UNAUTHENTICATED") && err.contains("--token-file"),
        "{err}"
    );

    let token_file = cfg_dir.path().join("ops.token");
    std::fs::write(&token_file, format!("{OLD}\n")).unwrap();
    let tf = token_file.display().to_string();
    let out = strata(&ep, &["--token-file", &tf, "stats"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tier"));

    let out = Command::new(bin("strata"))
        .args(["--endpoint", &ep, "stats"])
        .env("STRATA_TOKEN", OLD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (args, want) in [
        (vec!["--tls-cert", "x.pem", "stats"], "go together"),
        (vec!["--tls-ca", "ca.pem", "stats"], "https://"),
        (
            vec!["--token-file", "/nonexistent/token", "stats"],
            "cannot read --token-file",
        ),
    ] {
        let out = strata(&ep, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
    assert!(d.terminate().success());
}
