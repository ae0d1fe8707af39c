//! Boundary 2 for authentication, authorisation and tenant quotas: the
//! gRPC service in process, over TLS (certificates made here with rcgen),
//! bearer tokens, and the Unix socket's peer credentials.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use strata_client::{Client, Credentials, LocalClient, LocalPut, PutBlock, TlsCredentials};
use strata_proto::{BlockKey, NamespaceId, convert::ReserveBlock, convert::ReserveReq, pb};
use stratad::config::{ByteSize, Config, TenantSection};
use tonic::Code;

fn key(chain: u8, i: u32) -> BlockKey {
    let mut k = [0u8; 16];
    k[0] = chain;
    k[12..].copy_from_slice(&i.to_be_bytes());
    BlockKey::new(&k).unwrap()
}

/// A chain of `n` full blocks of `layout(16)` (4 KiB each).
fn chain(c: u8, n: u32) -> Vec<PutBlock> {
    (0..n)
        .map(|i| PutBlock {
            key: key(c, i),
            parent: (i > 0).then(|| key(c, i - 1)),
            data: Bytes::from(payload(key(c, i).as_bytes(), 4096)),
        })
        .collect()
}

fn keys(blocks: &[PutBlock]) -> Vec<BlockKey> {
    blocks.iter().map(|b| b.key).collect()
}

fn tenant(name: &str) -> TenantSection {
    TenantSection {
        name: name.into(),
        uids: vec![],
        gids: vec![],
        tls_names: vec![],
        admin: false,
        zero_copy: false,
        dram_bytes: ByteSize(0),
        nvme_bytes: ByteSize(0),
    }
}

fn code<T>(r: Result<T, strata_client::Error>) -> (Code, String) {
    let Err(e) = r else {
        panic!("expected an error status, the call succeeded")
    };
    match e {
        strata_client::Error::Status(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a status, got {other}"),
    }
}

/// The value of one series on /metrics (0 if absent).
async fn metric(d: &TestDaemon, series: &str) -> f64 {
    let (_, body) = http_get(d.metrics, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn denied(d: &TestDaemon, reason: &str) -> f64 {
    metric(
        d,
        &format!("strata_auth_denied_total{{reason=\"{reason}\"}}"),
    )
    .await
}

// ---- tokens ---------------------------------------------------------------

const ALICE: &str = "alice-token-0123456789abcdef";
const BOB: &str = "bob-token-0123456789abcdef00";
const OPS: &str = "ops-token-0123456789abcdef00";

/// A daemon with bearer tokens for alice, bob and ops (an admin).
async fn token_daemon(tweak: impl FnOnce(&mut Config)) -> TestDaemon {
    start(|c| {
        let path = c.data_dir.join("tokens");
        std::fs::create_dir_all(&c.data_dir).unwrap();
        std::fs::write(&path, format!("alice {ALICE}\nbob {BOB}\nops {OPS}\n")).unwrap();
        c.auth.tcp = "token".into();
        c.auth.tokens_file = path.display().to_string();
        let mut ops = tenant("ops");
        ops.admin = true;
        c.tenants = vec![tenant("alice"), tenant("bob"), ops];
        tweak(c);
    })
    .await
}

async fn with_token(d: &TestDaemon, token: &str) -> Client {
    Client::connect_with(
        &d.tcp,
        &Credentials {
            token: Some(token.into()),
            tls: None,
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn tokens_good_wrong_and_missing() {
    let d = token_daemon(|_| {}).await;
    let mut alice = with_token(&d, ALICE).await;
    assert_eq!(alice.stats().await.unwrap().tenant, "alice");
    let mut none = d.tcp_client().await;
    let (c, m) = code(none.stats().await);
    assert_eq!(c, Code::Unauthenticated);
    assert!(m.contains("authorization: Bearer"), "{m}");
    for wrong in [
        "alice-token-0123456789abcdeX",
        "alice-token-0123456789abcdef0",
        BOB.get(..20).unwrap(),
    ] {
        let mut c = with_token(&d, wrong).await;
        let (code, m) = code(c.register_layout(&layout(16)).await);
        assert_eq!(code, Code::Unauthenticated, "{wrong}");
        assert!(m.contains("not one this daemon knows"), "{m}");
    }
    assert_eq!(denied(&d, "no_credential").await, 1.0);
    assert_eq!(denied(&d, "bad_credential").await, 3.0);
    // Rotation: a new file, re-read (SIGHUP in stratad).
    let path = d.dir.path().join("tokens");
    std::fs::write(&path, format!("alice {BOB}x\nbob {BOB}\nops {OPS}\n")).unwrap();
    assert_eq!(d.running.as_ref().unwrap().reload_tokens().unwrap(), 3);
    let (c, _) = code(alice.stats().await);
    assert_eq!(c, Code::Unauthenticated, "the old token is gone");
    let mut again = with_token(&d, &format!("{BOB}x")).await;
    assert_eq!(again.stats().await.unwrap().tenant, "alice");
    d.stop().await;
}

#[tokio::test]
async fn cross_tenant_access_is_denied_counted_and_changes_nothing() {
    let d = token_daemon(|_| {}).await;
    let (mut alice, mut bob, mut ops) = (
        with_token(&d, ALICE).await,
        with_token(&d, BOB).await,
        with_token(&d, OPS).await,
    );
    // The same layout is a different namespace per tenant.
    let a = alice.register_layout(&layout(16)).await.unwrap().namespace;
    let b = bob.register_layout(&layout(16)).await.unwrap().namespace;
    assert_ne!(a, b);
    // Bob subscribes to everything he may see before anything is stored.
    let mut feed = bob
        .rpc()
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let hello = feed.next().await.unwrap().unwrap();
    assert!(hello.events.is_empty());
    let blocks = chain(1, 4);
    alice.put(a, &blocks).await.unwrap();
    bob.put(b, &chain(2, 2)).await.unwrap();
    let lease = alice
        .lookup(a, &keys(&blocks), 30_000)
        .await
        .unwrap()
        .lease
        .unwrap();
    let before = ops.stats_per_namespace().await.unwrap();

    let mut refused = Vec::new();
    refused.push(code(bob.lookup(a, &keys(&blocks), 0).await));
    refused.push(code(bob.get(a, &keys(&blocks), None).await));
    refused.push(code(bob.get(a, &keys(&blocks), Some(lease.id)).await));
    refused.push(code(bob.put(a, &chain(3, 1)).await));
    refused.push(code(bob.delete(a, &keys(&blocks)).await));
    refused.push(code(bob.release(a, lease.id).await));
    refused.push(code(
        bob.rpc()
            .attend(pb::AttendRequest {
                namespace_id: a.0,
                layer: 0,
                mode: pb::AttendMode::Dense as i32,
                sequences: vec![pb::AttendSequence {
                    keys: vec![Bytes::copy_from_slice(key(1, 0).as_bytes())],
                    last_block_tokens: 0,
                    queries: vec![0.5; 2 * 16],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .map_err(strata_client::Error::from),
    ));
    refused.push(code(
        bob.rpc()
            .subscribe(pb::SubscribeRequest {
                namespace_ids: vec![a.0],
                ..Default::default()
            })
            .await
            .map_err(strata_client::Error::from),
    ));
    for (i, (c, m)) in refused.iter().enumerate() {
        assert_eq!(*c, Code::PermissionDenied, "call {i}: {m}");
        assert!(
            m.contains(&a.to_string()) && m.contains("tenant bob"),
            "call {i}: {m}"
        );
    }
    assert_eq!(denied(&d, "foreign_namespace").await, refused.len() as f64);
    // Admin calls: not for bob.
    for (c, m) in [
        code(bob.evict_namespace(a).await),
        code(bob.export_namespace(a).await),
        code(bob.drain().await),
    ] {
        assert_eq!(c, Code::PermissionDenied, "{m}");
        assert!(m.contains("admin call") && m.contains("tenant bob"), "{m}");
    }
    assert_eq!(denied(&d, "not_admin").await, 3.0);
    assert!(!d.running.as_ref().unwrap().gate().is_draining());

    // Nothing changed: alice's blocks, byte for byte, and every count.
    let got = alice.get(a, &keys(&blocks), Some(lease.id)).await.unwrap();
    for (b, g) in blocks.iter().zip(&got) {
        assert_eq!(b.data, g.data);
    }
    let after = ops.stats_per_namespace().await.unwrap();
    assert_eq!(before.blocks, after.blocks);
    assert_eq!(before.namespace_stats, after.namespace_stats);
    assert_eq!(alice.lookup(a, &[key(3, 0)], 0).await.unwrap().hits, 0);

    // Bob's feed carried his own namespace's events only.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch = feed.next().await.unwrap().unwrap();
        for e in batch.events {
            if let Some(pb::kv_event::Kind::Stored(s)) = e.kind {
                seen.push(NamespaceId(s.namespace_id));
            }
        }
    }
    assert_eq!(seen, [b, b]);
    // Stats: each tenant sees itself; the admin sees everyone.
    let s = bob.stats_per_namespace().await.unwrap();
    assert_eq!(s.tenant, "bob");
    assert!(s.namespace_stats.iter().all(|n| n.tenant == "bob"));
    assert_eq!(s.tenant_stats.len(), 1);
    let names: Vec<_> = after.tenant_stats.iter().map(|t| t.name.as_str()).collect();
    assert!(
        names.contains(&"alice") && names.contains(&"bob"),
        "{names:?}"
    );
    let alice_ns = after
        .namespace_stats
        .iter()
        .find(|n| n.namespace_id == a.0)
        .unwrap();
    assert_eq!(alice_ns.tenant, "alice");
    // The admin may read and evict anyone's namespace.
    let mut export = ops.export_namespace(a).await.unwrap();
    while export.next().await.unwrap().is_some() {}
    alice.release(a, lease.id).await.unwrap();
    let ev = ops.evict_namespace(a).await.unwrap();
    assert_eq!(ev.evicted_blocks, 4);
    // A salt holding a NUL is refused: only the daemon writes tenant names.
    let mut forged = layout(16);
    forged.tenant_salt = b"alice\0".to_vec();
    let (c, m) = code(bob.register_layout(&forged).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.starts_with("layout.tenant_salt"), "{m}");
    d.stop().await;
}

// ---- quotas ---------------------------------------------------------------

#[tokio::test]
async fn quota_exhaustion_is_resource_exhausted_and_changes_nothing() {
    // Alice: 16 blocks of 4 KiB.
    let d = token_daemon(|c| c.tenants[0].dram_bytes = ByteSize(64 << 10)).await;
    let mut alice = with_token(&d, ALICE).await;
    let a = alice.register_layout(&layout(16)).await.unwrap().namespace;
    let blocks = chain(1, 16);
    alice.put(a, &blocks).await.unwrap();
    let lease = alice
        .lookup(a, &keys(&blocks), 30_000)
        .await
        .unwrap()
        .lease
        .unwrap();
    let usage = |s: &pb::StatsResponse| s.tenant_stats[0].tiers[0];
    let before = usage(&alice.stats().await.unwrap());
    assert_eq!(
        (before.used_bytes, before.quota_bytes, before.share_bytes),
        (64 << 10, 64 << 10, 64 << 10)
    );
    let (c, m) = code(alice.put(a, &chain(9, 1)).await);
    assert_eq!(c, Code::ResourceExhausted);
    for want in [
        "tenant alice",
        "dram quota exceeded",
        "needs 4096 bytes",
        "uses 65536 of its 65536 bytes",
        "65536 pinned",
    ] {
        assert!(m.contains(want), "{want}: {m}");
    }
    let after = usage(&alice.stats().await.unwrap());
    assert_eq!(after.used_bytes, before.used_bytes);
    assert_eq!((after.quota_refusals, after.evictions), (1, 0));
    assert_eq!(alice.lookup(a, &[key(9, 0)], 0).await.unwrap().hits, 0);
    assert_eq!(alice.lookup(a, &keys(&blocks), 0).await.unwrap().hits, 16);
    assert_eq!(
        metric(&d, "strata_tenant_bytes{tenant=\"alice\",tier=\"dram\"}").await,
        65536.0
    );
    assert_eq!(
        metric(
            &d,
            "strata_tenant_quota_refusals_total{tenant=\"alice\",tier=\"dram\"}"
        )
        .await,
        1.0
    );
    // With the lease gone, a put at the quota replaces her own oldest.
    alice.release(a, lease.id).await.unwrap();
    alice.put(a, &chain(9, 1)).await.unwrap();
    let now = usage(&alice.stats().await.unwrap());
    assert_eq!((now.used_bytes, now.evictions), (64 << 10, 1));
    d.stop().await;
}

#[tokio::test]
async fn nvme_writes_over_the_nvme_quota_are_skipped_not_failed() {
    // Write-through: every put is written to NVMe before its ack, unless
    // the tenant is at its NVMe quota (2 blocks): then it stays in DRAM and
    // the put says it is not durable.
    let d = token_daemon(|c| {
        c.tiers.nvme.write_through = true;
        c.tenants[0].nvme_bytes = ByteSize(8 << 10);
    })
    .await;
    let mut alice = with_token(&d, ALICE).await;
    let a = alice.register_layout(&layout(16)).await.unwrap().namespace;
    let blocks = chain(1, 4);
    let r = alice.put_durable(a, &blocks).await.unwrap();
    let durable: Vec<bool> = r.iter().map(|x| x.1).collect();
    assert_eq!(durable, [true, true, false, false]);
    assert_eq!(alice.lookup(a, &keys(&blocks), 0).await.unwrap().hits, 4);
    let nvme = alice.stats().await.unwrap().tenant_stats[0].tiers[1];
    assert_eq!(nvme.tier, pb::Tier::Nvme as i32);
    assert_eq!(
        (
            nvme.used_bytes,
            nvme.quota_bytes,
            nvme.blocks,
            nvme.quota_refusals
        ),
        (8 << 10, 8 << 10, 2, 2)
    );
    // Bob has no NVMe quota.
    let mut bob = with_token(&d, BOB).await;
    let b = bob.register_layout(&layout(16)).await.unwrap().namespace;
    let r = bob.put_durable(b, &chain(2, 4)).await.unwrap();
    assert!(r.iter().all(|x| x.1));
    d.stop().await;
}

#[tokio::test]
async fn a_tenant_filling_the_tier_never_evicts_another_within_its_share() {
    // 1 MiB of DRAM (256 blocks). Bob's quota and share: 32 blocks. Alice
    // has no quota: her share is 0, so she gives way first.
    let d = token_daemon(|c| {
        c.tiers.dram.bytes = ByteSize(1 << 20);
        c.tenants[1].dram_bytes = ByteSize(128 << 10);
    })
    .await;
    let (mut alice, mut bob) = (with_token(&d, ALICE).await, with_token(&d, BOB).await);
    let a = alice.register_layout(&layout(16)).await.unwrap().namespace;
    let b = bob.register_layout(&layout(16)).await.unwrap().namespace;
    // Bob's blocks are the oldest: plain LRU would take them first.
    let bobs = chain(2, 32);
    bob.put(b, &bobs).await.unwrap();
    for part in 0..16u8 {
        alice.put(a, &chain(10 + part, 32)).await.unwrap();
    }
    assert_eq!(bob.lookup(b, &keys(&bobs), 0).await.unwrap().hits, 32);
    let s = bob.stats().await.unwrap();
    assert_eq!(s.tenant_stats[0].tiers[0].evictions, 0);
    let s = with_token(&d, OPS).await.stats().await.unwrap();
    let alice_dram = &s
        .tenant_stats
        .iter()
        .find(|t| t.name == "alice")
        .unwrap()
        .tiers[0];
    assert!(alice_dram.evictions >= 16 * 32 - 256, "{alice_dram:?}");
    d.stop().await;
}

// ---- mutual TLS -----------------------------------------------------------

struct Pki {
    ca: String,
    server: (String, String),
    dir: PathBuf,
}

struct Cert {
    cert: String,
    key: String,
}

fn params(names: &[&str], cn: Option<&str>) -> rcgen::CertificateParams {
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    if let Some(cn) = cn {
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    }
    p
}

fn ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut p = params(&[], Some(name));
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    names: &[&str],
    cn: Option<&str>,
    usage: rcgen::ExtendedKeyUsagePurpose,
) -> Cert {
    let mut p = params(names, cn);
    p.extended_key_usages = vec![usage];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    Cert {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn client_cert(
    ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    names: &[&str],
    cn: Option<&str>,
) -> Cert {
    leaf(ca, names, cn, rcgen::ExtendedKeyUsagePurpose::ClientAuth)
}

fn write_pki(dir: &Path, ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>) -> Pki {
    let server = leaf(
        ca,
        &["localhost"],
        Some("stratad"),
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), &server.cert).unwrap();
    std::fs::write(dir.join("server.key"), &server.key).unwrap();
    Pki {
        ca: ca.pem(),
        server: (server.cert, server.key),
        dir: dir.into(),
    }
}

async fn tls_client(
    d: &TestDaemon,
    ca: &str,
    cert: Option<&Cert>,
) -> Result<Client, strata_client::Error> {
    let url = d.tcp.replace("http://", "https://");
    Client::connect_with(
        &url,
        &Credentials {
            token: None,
            tls: Some(TlsCredentials {
                ca_pem: Some(ca.as_bytes().to_vec()),
                cert_pem: cert.map(|c| c.cert.as_bytes().to_vec()),
                key_pem: cert.map(|c| c.key.as_bytes().to_vec()),
                domain: Some("localhost".into()),
            }),
        },
    )
    .await
}

#[tokio::test]
async fn mtls_maps_certificates_to_tenants_and_refuses_wrong_or_missing_ones() {
    let authority = ca("strata test CA");
    let rogue = ca("another CA");
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path(), &authority);
    assert!(!pki.server.0.is_empty() && !pki.server.1.is_empty());
    let d = start(|c| {
        c.auth.tcp = "mtls".into();
        c.auth.tls_cert = pki.dir.join("server.pem").display().to_string();
        c.auth.tls_key = pki.dir.join("server.key").display().to_string();
        c.auth.tls_client_ca = pki.dir.join("ca.pem").display().to_string();
        let mut alice = tenant("alice");
        alice.tls_names = vec!["alice-engine".into()];
        let mut bob = tenant("bob");
        bob.tls_names = vec!["bob.engines.example".into()];
        c.tenants = vec![alice, bob];
    })
    .await;
    // Alice by her subject CN, Bob by a DNS SAN.
    let alice_cert = client_cert(&authority, &[], Some("alice-engine"));
    let bob_cert = client_cert(&authority, &["bob.engines.example"], Some("some host"));
    let mut alice = tls_client(&d, &pki.ca, Some(&alice_cert)).await.unwrap();
    let s = alice.stats().await.unwrap();
    assert_eq!(s.tenant, "alice");
    let a = alice.register_layout(&layout(16)).await.unwrap().namespace;
    let blocks = chain(1, 2);
    alice.put(a, &blocks).await.unwrap();
    assert_eq!(alice.get(a, &keys(&blocks), None).await.unwrap().len(), 2);
    let mut bob = tls_client(&d, &pki.ca, Some(&bob_cert)).await.unwrap();
    assert_eq!(bob.stats().await.unwrap().tenant, "bob");
    let (c, _) = code(bob.get(a, &keys(&blocks), None).await);
    assert_eq!(c, Code::PermissionDenied);

    // No client certificate: the handshake completes, every call is
    // refused and says what is expected.
    let mut anon = tls_client(&d, &pki.ca, None).await.unwrap();
    let (c, m) = code(anon.stats().await);
    assert_eq!(c, Code::Unauthenticated);
    assert!(m.contains("client certificate"), "{m}");
    // A certificate from the right CA whose names map to no tenant.
    let carol = client_cert(&authority, &["carol.example"], Some("carol"));
    let mut carol = tls_client(&d, &pki.ca, Some(&carol)).await.unwrap();
    let (c, m) = code(carol.stats().await);
    assert_eq!(c, Code::PermissionDenied);
    assert!(
        m.contains("carol.example") && m.contains("tls_names"),
        "{m}"
    );
    // A certificate from another CA: the handshake fails; nothing is served.
    let forged = client_cert(&rogue, &[], Some("alice-engine"));
    let r = match tls_client(&d, &pki.ca, Some(&forged)).await {
        Ok(mut c) => c.stats().await.map(|_| ()),
        Err(e) => Err(e),
    };
    let e = r.unwrap_err();
    assert!(
        matches!(
            e.code(),
            None | Some(Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled)
        ),
        "a forged certificate must fail at the transport, not reach the service: {e}"
    );
    // Plain TCP to the TLS port: no answer either.
    let plain = match Client::connect(&d.tcp).await {
        Ok(mut c) => c.stats().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(plain.is_err());
    assert_eq!(denied(&d, "no_credential").await, 1.0);
    assert_eq!(denied(&d, "unknown_identity").await, 1.0);
    assert_eq!(denied(&d, "foreign_namespace").await, 1.0);
    d.stop().await;
}

// ---- Unix socket: peer credentials ------------------------------------------

fn me() -> (u32, u32) {
    (
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    )
}

#[tokio::test]
async fn peer_credentials_map_local_users_to_tenants() {
    let (uid, gid) = me();
    // By uid; zero-copy allowed.
    let d = start(|c| {
        c.auth.uds = "peercred".into();
        let mut a = tenant("alice");
        a.uids = vec![uid];
        a.zero_copy = true;
        c.tenants = vec![a];
    })
    .await;
    let mode = std::fs::metadata(&d.uds).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o666,
        "identity comes from the credentials, so anyone may connect"
    );
    let mut u = d.uds_client().await;
    assert_eq!(u.stats().await.unwrap().tenant, "alice");
    let mut lc = d.local().await;
    let ns = lc
        .client()
        .register_layout(&layout(16))
        .await
        .unwrap()
        .namespace;
    let data = payload(b"zc", 4096);
    lc.put(
        ns,
        &[LocalPut {
            key: key(4, 0),
            parent: None,
            data: &data,
        }],
    )
    .await
    .unwrap();
    // TCP is unauthenticated here: its clients are "default", which does
    // not own alice's namespace.
    let mut tcp = d.tcp_client().await;
    assert_eq!(tcp.stats().await.unwrap().tenant, "default");
    let (c, m) = code(tcp.lookup(ns, &[key(4, 0)], 0).await);
    assert_eq!(c, Code::PermissionDenied, "{m}");
    d.stop().await;

    // By gid, without zero-copy: the arena is refused, and so are the
    // zero-copy calls; Put and Get work.
    let d = start(|c| {
        c.auth.uds = "peercred".into();
        let mut a = tenant("grp");
        a.gids = vec![gid];
        c.tenants = vec![a];
    })
    .await;
    let mut u = d.uds_client().await;
    assert_eq!(u.stats().await.unwrap().tenant, "grp");
    let ns = u.register_layout(&layout(16)).await.unwrap().namespace;
    u.put(ns, &chain(5, 1)).await.unwrap();
    let e = LocalClient::connect(&d.uds).await.unwrap_err().to_string();
    assert!(
        e.contains("tenant grp may not use the zero-copy path"),
        "{e}"
    );
    let (c, _) = code(
        u.rpc()
            .reserve(pb::ReserveRequest {
                namespace_id: ns.0,
                blocks: vec![],
                ttl_ms: 0,
            })
            .await
            .map_err(strata_client::Error::from),
    );
    assert_eq!(c, Code::PermissionDenied);
    assert_eq!(denied(&d, "zero_copy").await, 2.0);
    assert_eq!(metric(&d, "strata_server_shm_refused_total").await, 1.0);
    d.stop().await;

    // This process's uid and gid map to no tenant: every call and the
    // arena are refused, naming the uid.
    let d = start(|c| {
        c.auth.uds = "peercred".into();
        let mut a = tenant("someone-else");
        a.uids = vec![uid.wrapping_add(1)];
        a.gids = vec![gid.wrapping_add(1)];
        a.zero_copy = true;
        c.tenants = vec![a];
    })
    .await;
    let mut u = d.uds_client().await;
    let (c, m) = code(u.stats().await);
    assert_eq!(c, Code::PermissionDenied);
    assert!(
        m.contains(&format!("uid {uid}")) && m.contains("[[tenants]]"),
        "{m}"
    );
    let e = LocalClient::connect(&d.uds).await.unwrap_err().to_string();
    assert!(e.contains(&format!("uid {uid}")), "{e}");
    assert_eq!(denied(&d, "unknown_identity").await, 2.0);
    d.stop().await;
}

#[tokio::test]
async fn a_zero_copy_client_sees_only_its_tenants_slots_and_reservations() {
    let (uid, _) = me();
    // Alice: this process on the Unix socket. Bob: a token on TCP.
    let d = start(|c| {
        let path = c.data_dir.join("tokens");
        std::fs::create_dir_all(&c.data_dir).unwrap();
        std::fs::write(&path, format!("bob {BOB}\n")).unwrap();
        c.auth.tcp = "token".into();
        c.auth.tokens_file = path.display().to_string();
        c.auth.uds = "peercred".into();
        let mut a = tenant("alice");
        a.uids = vec![uid];
        a.zero_copy = true;
        c.tenants = vec![a, tenant("bob")];
    })
    .await;
    let mut bob = with_token(&d, BOB).await;
    let b = bob.register_layout(&layout(16)).await.unwrap().namespace;
    let bobs = chain(2, 2);
    bob.put(b, &bobs).await.unwrap();
    let mut lc = d.local().await;
    let a = lc
        .client()
        .register_layout(&layout(16))
        .await
        .unwrap()
        .namespace;
    // Slots of Bob's blocks: by Lookup, and by GetSlots with a lease.
    let (c, _) = code(
        lc.client()
            .rpc()
            .lookup(pb::LookupRequest {
                namespace_id: b.0,
                keys: keys(&bobs)
                    .iter()
                    .map(|k| Bytes::copy_from_slice(k.as_bytes()))
                    .collect(),
                lease_ttl_ms: 10_000,
                want_slots: true,
            })
            .await
            .map_err(strata_client::Error::from),
    );
    assert_eq!(c, Code::PermissionDenied);
    let lease = bob
        .lookup(b, &keys(&bobs), 10_000)
        .await
        .unwrap()
        .lease
        .unwrap();
    let (c, _) = code(
        lc.client()
            .rpc()
            .get_slots(pb::GetSlotsRequest {
                namespace_id: b.0,
                lease_id: lease.id.0,
                keys: vec![Bytes::copy_from_slice(key(2, 0).as_bytes())],
            })
            .await
            .map_err(strata_client::Error::from),
    );
    assert_eq!(c, Code::PermissionDenied);
    // Bob's lease under Alice's namespace: the lease belongs elsewhere.
    let (c, _) = code(
        lc.client()
            .rpc()
            .get_slots(pb::GetSlotsRequest {
                namespace_id: a.0,
                lease_id: lease.id.0,
                keys: vec![Bytes::copy_from_slice(key(2, 0).as_bytes())],
            })
            .await
            .map_err(strata_client::Error::from),
    );
    assert_eq!(c, Code::PermissionDenied);
    // Reserving in Bob's namespace, or committing or aborting a
    // reservation of his (ids are sequential: guessable).
    let (c, _) = code(
        lc.client()
            .rpc()
            .reserve(pb::ReserveRequest {
                namespace_id: b.0,
                blocks: vec![pb::ReserveBlock {
                    key: Bytes::from_static(b"x"),
                    parent: Bytes::new(),
                    length: 4096,
                }],
                ttl_ms: 0,
            })
            .await
            .map_err(strata_client::Error::from),
    );
    assert_eq!(c, Code::PermissionDenied);
    let store = &d.running.as_ref().unwrap().store;
    let theirs = store
        .reserve_shared(&ReserveReq {
            namespace: b,
            blocks: vec![ReserveBlock {
                key: key(2, 9),
                parent: None,
                length: 4096,
            }],
            ttl_ms: 60_000,
        })
        .unwrap()[0]
        .id
        .unwrap();
    let (c, m) = code(
        lc.client()
            .rpc()
            .commit(pb::CommitRequest {
                blocks: vec![pb::CommitBlock {
                    reservation_id: theirs.0,
                    checksum: 1,
                }],
            })
            .await
            .map_err(strata_client::Error::from),
    );
    assert_eq!(c, Code::PermissionDenied, "{m}");
    assert!(m.contains("tenant alice"), "{m}");
    let (c, _) = code(
        lc.client()
            .rpc()
            .abort(pb::AbortRequest {
                reservation_ids: vec![theirs.0],
            })
            .await
            .map_err(strata_client::Error::from),
    );
    assert_eq!(c, Code::PermissionDenied);
    assert_eq!(store.stats().reservations, 1, "Bob's reservation is intact");
    assert_eq!(denied(&d, "foreign_namespace").await, 6.0);
    // Alice's own zero-copy round trip works.
    let data = payload(b"mine", 4096);
    lc.put(
        a,
        &[LocalPut {
            key: key(1, 0),
            parent: None,
            data: &data,
        }],
    )
    .await
    .unwrap();
    d.stop().await;
}

#[tokio::test]
async fn tcp_beyond_loopback_without_authentication_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.server.listen = "0.0.0.0:0".into();
    let e = stratad::server::start(&c).await.unwrap_err().to_string();
    assert!(e.contains("server.listen") && e.contains("auth.tcp"), "{e}");
    c.auth.allow_insecure_tcp = true;
    let r = stratad::server::start(&c).await.unwrap();
    r.shutdown().await;
}
