//! Harness for end-to-end tests: real `stratad` processes, driven through
//! the `strata` CLI and the Rust client.
//!
//! The binaries come from the same target directory as the test (built by
//! `cargo build --bins`, which the test command runs first).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; scripts/test does this)",
        p.display()
    );
    p
}

/// A free TCP port on loopback (released before the daemon binds it; a
/// clash makes the daemon exit with "cannot listen", and `spawn` retries).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub metrics_port: u16,
    pub uds: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `stratad` with a temporary data directory, free ports and the
    /// given extra flags; returns once `/readyz` answers 200.
    pub fn spawn(extra: &[&str]) -> Daemon {
        Daemon::start(None, extra)
    }

    /// Like [`spawn`](Self::spawn) on a given data directory (which outlives
    /// the daemon: restarts find their data there).
    pub fn spawn_in(data: &Path, extra: &[&str]) -> Daemon {
        Daemon::start(Some(data), extra)
    }

    fn start(data: Option<&Path>, extra: &[&str]) -> Daemon {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let (port, metrics_port) = (free_port(), free_port());
            let uds = dir.path().join("s.sock");
            let log = dir.path().join("stratad.log");
            let data_dir = data.map_or_else(|| dir.path().to_path_buf(), Path::to_path_buf);
            let mut args: Vec<String> = vec![
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--metrics-listen".into(),
                format!("127.0.0.1:{metrics_port}"),
                "--uds".into(),
                uds.display().to_string(),
                "--data-dir".into(),
                data_dir.display().to_string(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let child = Command::new(bin("stratad"))
                .args(&args)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("spawn stratad");
            let mut d = Daemon {
                child,
                dir,
                port,
                metrics_port,
                uds,
                log,
            };
            if d.wait_ready(Duration::from_secs(120)) {
                return d;
            }
            let log = std::fs::read_to_string(&d.log).unwrap_or_default();
            let _ = d.child.kill();
            let _ = d.child.wait();
            assert!(
                log.contains("cannot listen"),
                "stratad did not start:\n{log}"
            );
        }
        panic!("no free ports after 5 tries");
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok((200, _)) = http_get(self.metrics_port, "/readyz") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn uds_endpoint(&self) -> String {
        format!("unix:{}", self.uds.display())
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM and waits for the exit (bounded).
    pub fn terminate(&mut self) -> ExitStatus {
        signal(self.pid(), "TERM");
        let t = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "stratad did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the daemon, bytes (VmRSS).
    pub fn rss_bytes(&self) -> u64 {
        let s =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        let kb: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS");
        kb * 1024
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the CLI against this daemon.
    pub fn strata(&self, args: &[&str]) -> Output {
        strata(&self.endpoint(), args)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .map(|s| s.success());
    assert_eq!(ok.ok(), Some(true), "kill -{sig} {pid}");
}

/// Runs `strata --endpoint <endpoint> <args>`.
pub fn strata(endpoint: &str, args: &[&str]) -> Output {
    Command::new(bin("strata"))
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .output()
        .expect("run strata")
}

/// HTTP/1.0 GET on loopback; (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    let status = r.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((
        status,
        r.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

/// Deterministic contents for a key.
pub fn payload(seed: &[u8], len: usize) -> Vec<u8> {
    let mut x = xxhash_rust::xxh3::xxh3_64(seed) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
