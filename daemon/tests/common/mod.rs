//! Shared by the in-process gRPC tests: a daemon started through the
//! library on ephemeral ports and a temporary directory.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use strata_client::{Client, LocalClient};
use strata_proto::{Dtype, KvKind, Layout};
use stratad::config::{ByteSize, Config};
use stratad::server::Running;

pub struct TestDaemon {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub tcp: String,
    pub uds: PathBuf,
    pub metrics: SocketAddr,
}

pub fn config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.server.listen = "127.0.0.1:0".into();
    c.server.metrics_listen = "127.0.0.1:0".into();
    c.tiers.dram.bytes = ByteSize(32 << 20);
    c
}

pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestDaemon {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    tweak(&mut c);
    let running = stratad::server::start(&c).await.unwrap();
    TestDaemon {
        tcp: format!("http://{}", running.tcp_addr.unwrap()),
        uds: running.uds.clone().unwrap(),
        metrics: running.metrics_addr.unwrap(),
        running: Some(running),
        dir,
    }
}

impl TestDaemon {
    pub async fn tcp_client(&self) -> Client {
        Client::connect(&self.tcp).await.unwrap()
    }

    pub async fn uds_client(&self) -> Client {
        Client::connect(&format!("unix:{}", self.uds.display()))
            .await
            .unwrap()
    }

    pub async fn local(&self) -> LocalClient {
        LocalClient::connect(&self.uds).await.unwrap()
    }

    /// Stops the daemon and starts it again on the same data directory,
    /// with the test config changed by `tweak`; a TCP client to it.
    pub async fn restart(&mut self, tweak: impl FnOnce(&mut Config)) -> Client {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        let mut c = config(self.dir.path());
        tweak(&mut c);
        let running = stratad::server::start(&c).await.unwrap();
        self.tcp = format!("http://{}", running.tcp_addr.unwrap());
        self.uds = running.uds.clone().unwrap();
        self.metrics = running.metrics_addr.unwrap();
        self.running = Some(running);
        self.tcp_client().await
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// 2 layers x 2 heads x 16 dim x f16 x K,V = 256 bytes per token.
pub fn layout(tokens: u32) -> Layout {
    Layout {
        model_id: "test/model".into(),
        dtype: Dtype::F16,
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 16,
        tokens_per_block: tokens,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

/// Deterministic block contents for a key.
pub fn payload(seed: &[u8], len: usize) -> Vec<u8> {
    let mut x = strata_proto::checksum(seed) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A plain HTTP/1.0 GET; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
