//! Boundary 2: the gRPC service in process, through the real client over TCP
//! and the Unix socket, and the zero-copy path through the mapped arena.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use strata_client::{Client, LocalPut, PutBlock, PutResult};
use strata_proto::{BlockKey, NamespaceId, TierKind, pb};
use stratad::config::ByteSize;
use tonic::Code;

fn key(chain: u8, i: u32) -> BlockKey {
    let mut k = [0u8; 16];
    k[0] = chain;
    k[12..].copy_from_slice(&i.to_be_bytes());
    BlockKey::new(&k).unwrap()
}

fn chain(c: u8, n: u32, len: usize) -> Vec<PutBlock> {
    (0..n)
        .map(|i| PutBlock {
            key: key(c, i),
            parent: (i > 0).then(|| key(c, i - 1)),
            data: Bytes::from(payload(key(c, i).as_bytes(), len)),
        })
        .collect()
}

#[tokio::test]
async fn stream_round_trip_over_tcp_and_uds() {
    let d = start(|_| {}).await;
    for mut c in [d.tcp_client().await, d.uds_client().await] {
        let reg = c.register_layout(&layout(16)).await.unwrap();
        let ns = reg.namespace;
        assert_eq!(reg.block_bytes, 16 * 256);
        let blocks = chain(1, 8, reg.block_bytes as usize);
        let r = c.put(ns, &blocks).await.unwrap();
        // The second client (UDS) finds the first one's blocks present.
        assert!(r.iter().all(|x| *x == r[0]));
        let keys: Vec<_> = blocks.iter().map(|b| b.key).collect();
        let mut asked = keys.clone();
        asked.push(key(9, 9));
        let l = c.lookup(ns, &asked, 0).await.unwrap();
        assert_eq!(l.hits, 8);
        assert!(l.tiers.iter().all(|t| *t == TierKind::Dram));
        let got = c.get(ns, &keys, None).await.unwrap();
        for (b, g) in blocks.iter().zip(&got) {
            assert_eq!(b.data, g.data, "byte exact");
            assert_eq!(b.parent, g.parent);
        }
    }
    let mut c = d.tcp_client().await;
    let s = c.stats().await.unwrap();
    assert_eq!(s.blocks, 8);
    assert_eq!(s.namespaces, 1);
    d.stop().await;
}

#[tokio::test]
async fn large_blocks_travel_in_chunks() {
    let d = start(|c| {
        c.server.max_message_bytes = ByteSize(1 << 20);
        c.server.stream_chunk_bytes = ByteSize(256 << 10);
    })
    .await;
    let mut c = d.tcp_client().await;
    // 2 MiB blocks: the client splits puts into 4 MiB chunks, which is over
    // this daemon's 1 MiB limit, so build the stream by hand in 512 KiB parts.
    let ns = c.register_layout(&layout(8192)).await.unwrap().namespace;
    let data = payload(b"big", 2 << 20);
    let mut msgs = vec![pb::PutRequest {
        header: Some(pb::PutHeader {
            namespace_id: ns.0,
            key: Bytes::from_static(b"big"),
            parent: Bytes::new(),
            length: data.len() as u64,
            checksum: strata_proto::checksum(&data),
        }),
        data: Bytes::new(),
    }];
    for part in data.chunks(512 << 10) {
        msgs.push(pb::PutRequest {
            header: None,
            data: Bytes::copy_from_slice(part),
        });
    }
    c.rpc().put(futures_util::stream::iter(msgs)).await.unwrap();
    let got = c
        .get(ns, &[BlockKey::new(b"big").unwrap()], None)
        .await
        .unwrap();
    assert_eq!(&got[0].data[..], &data[..]);
    d.stop().await;
}

#[tokio::test]
async fn zero_copy_round_trip_and_tcp_refusal() {
    let d = start(|_| {}).await;
    let mut lc = d.local().await;
    assert_eq!(lc.arena().len(), 32 << 20);
    let ns = lc
        .client()
        .register_layout(&layout(16))
        .await
        .unwrap()
        .namespace;
    let datas: Vec<Vec<u8>> = (0..6)
        .map(|i| payload(key(2, i).as_bytes(), 4096))
        .collect();
    let puts: Vec<_> = (0..6)
        .map(|i| LocalPut {
            key: key(2, i),
            parent: (i > 0).then(|| key(2, i - 1)),
            data: &datas[i as usize],
        })
        .collect();
    let r = lc.put(ns, &puts).await.unwrap();
    assert!(r.iter().all(|x| *x == PutResult::Stored));
    assert!(
        lc.put(ns, &puts[..2])
            .await
            .unwrap()
            .iter()
            .all(|x| *x == PutResult::AlreadyPresent)
    );
    // The stream path sees the same blocks.
    let mut tc = d.tcp_client().await;
    let keys: Vec<_> = (0..6).map(|i| key(2, i)).collect();
    let got = tc.get(ns, &keys, None).await.unwrap();
    for (g, want) in got.iter().zip(&datas) {
        assert_eq!(&g.data[..], &want[..]);
    }
    // Zero-copy load of a prefix: 6 present, the 7th absent.
    let mut bufs = vec![vec![0u8; 4096]; 7];
    let mut dst: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    let mut asked = keys.clone();
    asked.push(key(2, 99));
    let lens = lc.load_prefix(ns, &asked, &mut dst).await.unwrap();
    assert_eq!(lens, vec![4096; 6]);
    for (b, want) in bufs.iter().zip(&datas) {
        assert_eq!(b, want);
    }
    // The load's lease is released (in the background).
    let mut leases = 1;
    for _ in 0..200 {
        leases = tc.stats().await.unwrap().leases;
        if leases == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(leases, 0);
    // A lease taken by another process (a scheduler) and loaded here.
    let l = tc
        .lookup(ns, &keys[..3], 5000)
        .await
        .unwrap()
        .lease
        .unwrap();
    let mut bufs2 = vec![vec![0u8; 4096]; 3];
    let mut dst2: Vec<&mut [u8]> = bufs2.iter_mut().map(|b| &mut b[..]).collect();
    assert_eq!(
        lc.load_leased(ns, l.id, &keys[..3], &mut dst2)
            .await
            .unwrap(),
        vec![4096; 3]
    );
    assert_eq!(bufs2[2], datas[2]);
    tc.release(ns, l.id).await.unwrap();
    // want_slots is for zero-copy peers only.
    let e = tc
        .rpc()
        .lookup(pb::LookupRequest {
            namespace_id: ns.0,
            keys: vec![Bytes::copy_from_slice(keys[0].as_bytes())],
            lease_ttl_ms: 100,
            want_slots: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // Slot offsets mean nothing off-node: zero-copy calls are refused on TCP.
    let e = tc
        .rpc()
        .reserve(pb::ReserveRequest {
            namespace_id: ns.0,
            blocks: vec![],
            ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    d.stop().await;
}

/// What a bad call must not change.
async fn snapshot(c: &mut Client) -> (u64, u64, u64, u64) {
    let s = c.stats().await.unwrap();
    (s.blocks, s.tiers[0].used_bytes, s.leases, s.reservations)
}

fn assert_status(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, field: &str) {
    let e = r.unwrap_err();
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().starts_with(field),
        "message {:?} should name {field:?}",
        e.message()
    );
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_changes_nothing() {
    let d = start(|c| {
        c.server.max_message_bytes = ByteSize(256 << 10);
        c.server.stream_chunk_bytes = ByteSize(64 << 10);
        c.server.max_keys_per_call = 64;
    })
    .await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout(16)).await.unwrap().namespace;
    c.put(ns, &chain(1, 2, 4096)).await.unwrap();
    let before = snapshot(&mut c).await;
    let rpc = c.rpc().clone();

    let hdr = |key: &[u8], length: u64, checksum: u64| pb::PutHeader {
        namespace_id: ns.0,
        key: Bytes::copy_from_slice(key),
        parent: Bytes::new(),
        length,
        checksum,
    };
    let put = |msgs: Vec<pb::PutRequest>| {
        let mut rpc = rpc.clone();
        async move { rpc.put(futures_util::stream::iter(msgs)).await }
    };
    let good = payload(b"x", 4096);
    let sum = strata_proto::checksum(&good);

    // Unknown namespace.
    let r = c
        .rpc()
        .lookup(pb::LookupRequest {
            namespace_id: 777,
            keys: vec![Bytes::from_static(b"k")],
            lease_ttl_ms: 0,
            want_slots: false,
        })
        .await;
    assert_status(r, Code::NotFound, "namespace_id");
    let r = put(vec![pb::PutRequest {
        header: Some(pb::PutHeader {
            namespace_id: 777,
            ..hdr(b"k", 4096, sum)
        }),
        data: Bytes::from(good.clone()),
    }])
    .await;
    assert_status(r, Code::NotFound, "namespace_id");
    // Key too long, key empty.
    let r = put(vec![pb::PutRequest {
        header: Some(hdr(&[1; 33], 4096, sum)),
        data: Bytes::from(good.clone()),
    }])
    .await;
    assert_status(r, Code::InvalidArgument, "blocks[0].key");
    let r = c
        .rpc()
        .lookup(pb::LookupRequest {
            namespace_id: ns.0,
            keys: vec![Bytes::new()],
            lease_ttl_ms: 0,
            want_slots: false,
        })
        .await;
    assert_status(r, Code::InvalidArgument, "keys[0]");
    // Length: not whole tokens; fewer bytes than promised; more.
    let r = put(vec![pb::PutRequest {
        header: Some(hdr(b"k", 100, sum)),
        data: Bytes::from(vec![0; 100]),
    }])
    .await;
    assert_status(r, Code::InvalidArgument, "blocks[0].length");
    let r = put(vec![pb::PutRequest {
        header: Some(hdr(b"k", 4096, sum)),
        data: Bytes::from(good[..4000].to_vec()),
    }])
    .await;
    assert_status(r, Code::InvalidArgument, "blocks[0].data");
    let mut more = good.clone();
    more.push(0);
    let r = put(vec![pb::PutRequest {
        header: Some(hdr(b"k", 4096, sum)),
        data: Bytes::from(more),
    }])
    .await;
    assert_status(r, Code::InvalidArgument, "blocks[0].data");
    // A block's first message without a header.
    let r = put(vec![pb::PutRequest {
        header: None,
        data: Bytes::from(good.clone()),
    }])
    .await;
    assert_status(r, Code::InvalidArgument, "blocks[0].header");
    // Checksum mismatch.
    let r = put(vec![pb::PutRequest {
        header: Some(hdr(b"k", 4096, sum ^ 1)),
        data: Bytes::from(good.clone()),
    }])
    .await;
    assert_status(r, Code::InvalidArgument, "blocks[0].checksum");
    // Same key, other content.
    let r = put(vec![pb::PutRequest {
        header: Some(hdr(key(1, 0).as_bytes(), 4096, sum)),
        data: Bytes::from(good.clone()),
    }])
    .await;
    assert_status(r, Code::AlreadyExists, "blocks[0].checksum");
    // Oversize message.
    let big = payload(b"big", 512 << 10);
    let r = put(vec![pb::PutRequest {
        header: Some(hdr(b"k", 4096, sum)),
        data: Bytes::from(big),
    }])
    .await;
    assert_status(r, Code::ResourceExhausted, "server.max_message_bytes");
    // Too many keys.
    let keys: Vec<_> = (0..65).map(|i| Bytes::from(vec![i as u8 + 1])).collect();
    let r = c
        .rpc()
        .lookup(pb::LookupRequest {
            namespace_id: ns.0,
            keys,
            lease_ttl_ms: 0,
            want_slots: false,
        })
        .await;
    assert_status(r, Code::InvalidArgument, "keys");
    // Get of a missing key.
    let r = c.get(ns, &[key(1, 0), key(5, 5)], None).await;
    let e = r.unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound));
    assert!(e.to_string().contains("keys[1]"), "{e}");
    // Layouts with zero or absurd dimensions.
    let mut l = layout(16);
    l.num_layers = 0;
    let r = c
        .rpc()
        .register_layout(pb::RegisterLayoutRequest {
            layout: Some((&l).into()),
        })
        .await;
    assert_status(r, Code::InvalidArgument, "layout.num_layers");
    let mut l = layout(16);
    l.head_dim = 1 << 20;
    let r = c
        .rpc()
        .register_layout(pb::RegisterLayoutRequest {
            layout: Some((&l).into()),
        })
        .await;
    assert_status(r, Code::InvalidArgument, "layout.head_dim");
    let mut l = layout(16);
    l.num_layers = 1000;
    l.num_kv_heads = 1000;
    l.head_dim = 1000;
    let r = c
        .rpc()
        .register_layout(pb::RegisterLayoutRequest {
            layout: Some((&l).into()),
        })
        .await;
    assert_status(r, Code::InvalidArgument, "layout");
    // Valid on its own, but one block would not fit this daemon's DRAM tier.
    let mut l = layout(16);
    l.num_layers = 1000;
    l.num_kv_heads = 64; // 64 MB per block
    let r = c
        .rpc()
        .register_layout(pb::RegisterLayoutRequest {
            layout: Some((&l).into()),
        })
        .await;
    assert_status(r, Code::InvalidArgument, "layout");
    let r = c
        .rpc()
        .register_layout(pb::RegisterLayoutRequest { layout: None })
        .await;
    assert_status(r, Code::InvalidArgument, "layout");

    // Leases: never issued, foreign, expired.
    let r = c
        .rpc()
        .release(pb::ReleaseRequest {
            lease_id: 1 << 40,
            namespace_id: ns.0,
        })
        .await;
    assert_status(r, Code::InvalidArgument, "lease_id");
    let l = c
        .lookup(ns, &[key(1, 0)], 100)
        .await
        .unwrap()
        .lease
        .unwrap();
    let other = c.register_layout(&layout(8)).await.unwrap().namespace;
    let r = c
        .rpc()
        .release(pb::ReleaseRequest {
            lease_id: l.id.0,
            namespace_id: other.0,
        })
        .await;
    assert_status(r, Code::PermissionDenied, "lease_id");
    let r = c
        .rpc()
        .get(pb::GetRequest {
            namespace_id: ns.0,
            keys: vec![Bytes::copy_from_slice(key(1, 1).as_bytes())],
            lease_id: l.id.0,
        })
        .await;
    assert_status(r, Code::FailedPrecondition, "keys[0]");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c
        .rpc()
        .get(pb::GetRequest {
            namespace_id: ns.0,
            keys: vec![Bytes::copy_from_slice(key(1, 0).as_bytes())],
            lease_id: l.id.0,
        })
        .await;
    assert_status(r, Code::FailedPrecondition, "lease_id");

    // Nothing changed (the extra namespace aside).
    assert_eq!(snapshot(&mut c).await, before);
    let got = c.get(ns, &[key(1, 0), key(1, 1)], None).await.unwrap();
    assert_eq!(&got[0].data[..], &payload(key(1, 0).as_bytes(), 4096)[..]);
    assert_eq!(&got[1].data[..], &payload(key(1, 1).as_bytes(), 4096)[..]);
    d.stop().await;
}

/// Polls a gauge on /metrics until it reaches `want` (bounded wait).
async fn wait_gauge(d: &TestDaemon, name: &str, want: f64) {
    for _ in 0..200 {
        let (_, body) = http_get(d.metrics, "/metrics").await;
        let v = body
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if v == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name} never reached {want}");
}

#[tokio::test]
async fn inflight_bytes_limit() {
    let d = start(|c| c.server.max_inflight_put_bytes = ByteSize(6000)).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout(16)).await.unwrap().namespace;
    // A put held open mid-block holds its 4096 bytes of admission.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::PutRequest {
        header: Some(pb::PutHeader {
            namespace_id: ns.0,
            key: Bytes::from_static(b"held"),
            parent: Bytes::new(),
            length: 4096,
            checksum: 0,
        }),
        data: Bytes::from(vec![0u8; 100]),
    })
    .await
    .unwrap();
    let mut rpc = c.rpc().clone();
    let held = tokio::spawn(async move {
        rpc.put(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    wait_gauge(&d, "strata_server_inflight_put_bytes", 4096.0).await;
    // 4096 + 4096 > 6000.
    let e = c.put(ns, &chain(3, 1, 4096)).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted));
    assert!(
        e.to_string().contains("server.max_inflight_put_bytes"),
        "{e}"
    );
    // The held stream breaks off: its half block is never visible.
    drop(tx);
    assert_status(held.await.unwrap(), Code::InvalidArgument, "blocks[0].data");
    wait_gauge(&d, "strata_server_inflight_put_bytes", 0.0).await;
    assert_eq!(
        c.lookup(ns, &[BlockKey::new(b"held").unwrap()], 0)
            .await
            .unwrap()
            .hits,
        0
    );
    assert_eq!(c.stats().await.unwrap().tiers[0].used_bytes, 0);
    c.put(ns, &chain(3, 1, 4096)).await.unwrap();
    d.stop().await;
}

#[tokio::test]
async fn stream_count_limit() {
    let d = start(|c| c.server.max_streams = 1).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout(16)).await.unwrap().namespace;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PutRequest>(1);
    let mut rpc = c.rpc().clone();
    let h = tokio::spawn(async move {
        rpc.put(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    wait_gauge(&d, "strata_server_streams_active", 1.0).await;
    let e = c.put(ns, &chain(1, 1, 4096)).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted));
    assert!(e.to_string().contains("server.max_streams"), "{e}");
    let e = c.get(ns, &[key(1, 0)], None).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            Some(Code::ResourceExhausted) | Some(Code::NotFound)
        ),
        "{e}"
    );
    drop(tx);
    h.await.unwrap().unwrap();
    c.put(ns, &chain(1, 1, 4096)).await.unwrap();
    d.stop().await;
}

#[tokio::test]
async fn eviction_through_the_api_stays_within_the_cap() {
    let d = start(|c| c.tiers.dram.bytes = ByteSize(4 << 20)).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout(256)).await.unwrap().namespace; // 64 KiB blocks
    for round in 0..8u8 {
        c.put(ns, &chain(round, 16, 64 << 10)).await.unwrap(); // 1 MiB per round
        let s = c.stats().await.unwrap();
        assert!(s.tiers[0].used_bytes <= s.tiers[0].capacity_bytes);
    }
    let s = c.stats().await.unwrap();
    // 128 blocks of 64 KiB into a 64-block tier.
    assert!(s.tiers[0].evictions >= 8 * 16 - 64, "{s:?}");
    // The most recent chain is whole; the oldest lost its tail first.
    assert_eq!(
        c.lookup(ns, &(0..16).map(|i| key(7, i)).collect::<Vec<_>>(), 0)
            .await
            .unwrap()
            .hits,
        16
    );
    d.stop().await;
}

#[tokio::test]
async fn metrics_health_and_readiness() {
    let d = start(|_| {}).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout(16)).await.unwrap().namespace;
    c.put(ns, &chain(1, 4, 4096)).await.unwrap();
    c.lookup(ns, &[key(1, 0), key(1, 1), key(8, 8)], 0)
        .await
        .unwrap();
    c.get(ns, &[key(1, 0)], None).await.unwrap();
    let (st, body) = http_get(d.metrics, "/metrics").await;
    assert_eq!(st, 200);
    for needle in [
        "strata_server_request_duration_seconds_bucket{method=\"Lookup\",le=\"0.0001\"}",
        "strata_server_request_duration_seconds_count{method=\"Put\"} 1",
        "strata_store_lookups_total 1",
        "strata_store_lookup_hits_total{tier=\"dram\"} 2",
        "strata_store_lookup_misses_total{reason=\"absent\"} 1",
        "strata_tier_bytes_in_total{tier=\"dram\"} 16384",
        "strata_tier_bytes_out_total{tier=\"dram\"} 4096",
        "strata_tier_used_bytes{tier=\"dram\"} 16384",
        "strata_tier_capacity_bytes{tier=\"dram\"} 33554432",
        "strata_store_checksum_failures_total{tier=\"dram\"} 0",
        "strata_store_evictions_total{tier=\"dram\"} 0",
        "strata_store_leases 0",
        "strata_server_streams_active 0",
        "# TYPE strata_server_request_duration_seconds histogram",
        "strata_ready 1",
        "strata_draining 0",
        concat!(
            "strata_build_info{version=\"",
            env!("CARGO_PKG_VERSION"),
            "\"} 1"
        ),
    ] {
        assert!(body.contains(needle), "missing {needle}\n{body}");
    }
    assert_eq!(http_get(d.metrics, "/livez").await.0, 200);
    let (st, body) = http_get(d.metrics, "/readyz").await;
    assert_eq!((st, body.starts_with("ready")), (200, true));
    // The standard gRPC health service.
    let ch = tonic::transport::Endpoint::from_shared(d.tcp.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "strata.v1.Strata".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    d.stop().await;
}

#[tokio::test]
async fn namespaces_are_stable_and_separate() {
    let d = start(|_| {}).await;
    let mut c = d.tcp_client().await;
    let a = c.register_layout(&layout(16)).await.unwrap();
    assert!(!a.existed);
    let again = c.register_layout(&layout(16)).await.unwrap();
    assert_eq!((again.namespace, again.existed), (a.namespace, true));
    assert_eq!(
        a.namespace,
        layout(16).namespace_id(),
        "same id in every process"
    );
    let mut l = layout(16);
    l.tp_rank = 1;
    l.tp_size = 2;
    let b = c.register_layout(&l).await.unwrap().namespace;
    assert_ne!(a.namespace, b);
    c.put(a.namespace, &chain(1, 1, 4096)).await.unwrap();
    assert_eq!(
        c.lookup(b, &[key(1, 0)], 0).await.unwrap().hits,
        0,
        "namespaces never mix"
    );
    let _ = NamespaceId(0);
    d.stop().await;
}

#[tokio::test]
async fn a_broken_stream_keeps_the_blocks_before_the_error_and_says_so() {
    let d = start(|_| {}).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout(16)).await.unwrap().namespace;
    let good = payload(b"g", 4096);
    let msgs = vec![
        pb::PutRequest {
            header: Some(pb::PutHeader {
                namespace_id: ns.0,
                key: Bytes::from_static(b"g"),
                parent: Bytes::new(),
                length: 4096,
                checksum: strata_proto::checksum(&good),
            }),
            data: Bytes::from(good.clone()),
        },
        // Data after a complete block, where the next header belongs.
        pb::PutRequest {
            header: None,
            data: Bytes::from_static(b"extra"),
        },
    ];
    let e = c
        .rpc()
        .put(futures_util::stream::iter(msgs))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("blocks[1].header"), "{e:?}");
    assert!(
        e.message()
            .ends_with("the 1 blocks before it in this stream were stored"),
        "{e:?}"
    );
    let got = c
        .get(ns, &[BlockKey::new(b"g").unwrap()], None)
        .await
        .unwrap();
    assert_eq!(&got[0].data[..], &good[..]);
    d.stop().await;
}

/// Receives the next batch (with a deadline: a missing event fails the test
/// instead of hanging it).
async fn next_batch(s: &mut tonic::Streaming<pb::KvEventBatch>) -> pb::KvEventBatch {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an event batch within 10 s")
        .unwrap()
        .expect("the stream stays open")
}

/// Collects live events until `n` have arrived.
async fn events(s: &mut tonic::Streaming<pb::KvEventBatch>, n: usize) -> Vec<pb::KvEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let b = next_batch(s).await;
        assert_eq!(b.missed, 0);
        out.extend(b.events);
    }
    assert_eq!(out.len(), n, "no more events than expected");
    out
}

fn stored(e: &pb::KvEvent) -> &pb::BlockStored {
    match &e.kind {
        Some(pb::kv_event::Kind::Stored(s)) => s,
        other => panic!("expected BlockStored, got {other:?}"),
    }
}

fn removed(e: &pb::KvEvent) -> &pb::BlockRemoved {
    match &e.kind {
        Some(pb::kv_event::Kind::Removed(r)) => r,
        other => panic!("expected BlockRemoved, got {other:?}"),
    }
}

#[tokio::test]
async fn subscribe_streams_ordered_events_snapshots_and_gaps() {
    let d = start(|c| c.store.event_buffer = 64).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout(16)).await.unwrap().namespace;
    let other = c.register_layout(&layout(8)).await.unwrap().namespace;
    let mut sub = c
        .rpc()
        .subscribe(pb::SubscribeRequest {
            namespace_ids: vec![ns.0],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let hello = next_batch(&mut sub).await;
    assert!(hello.events.is_empty() && hello.epoch != 0);
    // Another namespace's blocks are filtered out; ours arrive in order with
    // parent, token count and tier.
    c.put(other, &chain(7, 2, 8 * 256)).await.unwrap();
    let blocks = chain(1, 3, 16 * 256);
    c.put(ns, &blocks).await.unwrap();
    let ev = events(&mut sub, 3).await;
    for (i, e) in ev.iter().enumerate() {
        let s = stored(e);
        assert_eq!(s.namespace_id, ns.0);
        assert_eq!(s.key.as_ref(), blocks[i].key.as_bytes());
        let parent = blocks[i]
            .parent
            .map(|p| p.as_bytes().to_vec())
            .unwrap_or_default();
        assert_eq!(s.parent.as_ref(), parent.as_slice());
        assert_eq!(s.token_count, 16);
        assert_eq!(s.medium, pb::Tier::Dram as i32);
    }
    assert!(ev.windows(2).all(|w| w[0].seq < w[1].seq));
    // A partial block counts its tokens; a delete is a removal.
    c.put(
        ns,
        &[PutBlock {
            key: key(2, 0),
            parent: None,
            data: Bytes::from(payload(b"p", 5 * 256)),
        }],
    )
    .await
    .unwrap();
    assert_eq!(stored(&events(&mut sub, 1).await[0]).token_count, 5);
    c.delete(ns, &[blocks[2].key]).await.unwrap();
    let r = events(&mut sub, 1).await;
    assert_eq!(removed(&r[0]).key.as_ref(), blocks[2].key.as_bytes());
    assert_eq!(removed(&r[0]).medium, pb::Tier::Dram as i32);

    // A snapshot describes what is held now, then live events follow.
    let mut snap = c
        .rpc()
        .subscribe(pb::SubscribeRequest {
            snapshot: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    next_batch(&mut snap).await;
    let mut held = std::collections::BTreeSet::new();
    loop {
        let b = next_batch(&mut snap).await;
        assert!(b.snapshot);
        held.extend(b.events.iter().map(|e| stored(e).key.to_vec()));
        if b.snapshot_done {
            break;
        }
    }
    assert_eq!(
        held.len(),
        2 + 2 + 1,
        "two of ours, the other namespace's two, the partial"
    );
    assert!(!held.contains(blocks[2].key.as_bytes()));

    // A subscriber that fell behind the 64-event ring (here: resuming from a
    // cursor the ring no longer holds) is told how many events it missed.
    // (A slow reader over the network only gets there once HTTP/2 windows
    // are full; the cursor is what counts.)
    let many: Vec<PutBlock> = (0..200u32)
        .map(|i| PutBlock {
            key: key(3, i),
            parent: None,
            data: Bytes::from(payload(&i.to_be_bytes(), 16 * 256)),
        })
        .collect();
    c.put(ns, &many).await.unwrap();
    let mut late = c
        .rpc()
        .subscribe(pb::SubscribeRequest {
            after_seq: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let hello = next_batch(&mut late).await;
    let first = next_batch(&mut late).await;
    assert!(first.missed > 0, "the ring holds 64 events; 200 went by");
    assert_eq!(
        first.events[0].seq,
        1 + first.missed + 1,
        "resumes at the oldest event held"
    );
    let total = first.missed + 1 + first.events.len() as u64;
    assert!(total <= hello.last_seq);
    // Bad input names the field.
    let e = c
        .rpc()
        .subscribe(pb::SubscribeRequest {
            max_batch: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("max_batch"), "{}", e.message());
    // Drain ends subscriptions rather than waiting for them.
    let t = std::time::Instant::now();
    d.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drain waited on subscribers"
    );
    // What was sent before the end is still delivered; then the stream ends.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = sub.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the subscription ended with the daemon");
}
