//! Server limits: message size, keys per call, concurrent streams, bytes of
//! puts in flight. Exceeding one is `RESOURCE_EXHAUSTED` (a capacity limit)
//! or `INVALID_ARGUMENT` (a request shaped beyond what is ever accepted),
//! with a message that names the configuration field.
//!
//! The message-size limit is enforced by [`MessageLimitLayer`], which reads
//! the gRPC length prefix of every incoming message before it is buffered, so
//! an oversize message costs nothing and is answered with the limit's name
//! (tonic's own check would answer `OUT_OF_RANGE` without it; it stays on,
//! slightly higher, as a second line).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::metrics::ServerMetrics;

#[derive(Debug, Clone)]
pub struct MessageLimitLayer {
    max: u64,
    rejections: metrics::Counter,
}

impl MessageLimitLayer {
    pub fn new(max: u64, rejections: metrics::Counter) -> Self {
        MessageLimitLayer { max, rejections }
    }
}

impl<S> tower::Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;
    fn layer(&self, inner: S) -> MessageLimit<S> {
        MessageLimit {
            inner,
            max: self.max,
            rejections: self.rejections.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    max: u64,
    rejections: metrics::Counter,
}

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for MessageLimit<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let (max, rejections) = (self.max, self.rejections.clone());
        self.inner.call(req.map(|b| {
            tonic::body::Body::new(LimitedBody {
                inner: b,
                scan: FrameScan::default(),
                max,
                rejections,
            })
        }))
    }
}

/// Tracks gRPC framing (1 byte flag, 4 bytes big-endian length, payload)
/// across arbitrary chunk boundaries.
#[derive(Debug, Default)]
struct FrameScan {
    header: [u8; 5],
    have: usize,
    remaining: u64,
}

impl FrameScan {
    /// Consumes a chunk; returns the length of the first message over `max`.
    fn feed(&mut self, mut data: &[u8], max: u64) -> Result<(), u64> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = (self.remaining as usize).min(data.len());
                self.remaining -= take as u64;
                data = &data[take..];
                continue;
            }
            let take = (5 - self.have).min(data.len());
            self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as u64;
                if len > max {
                    return Err(len);
                }
                self.remaining = len;
                self.have = 0;
            }
        }
        Ok(())
    }
}

struct LimitedBody {
    inner: tonic::body::Body,
    scan: FrameScan,
    max: u64,
    rejections: metrics::Counter,
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(len) = this.scan.feed(data.chunk(), this.max)
                {
                    this.rejections.increment(1);
                    return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                        "server.max_message_bytes: a message of {len} bytes exceeds the limit of {} bytes; send large blocks in several data messages",
                        this.max
                    )))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Capacity limits shared by all connections.
#[derive(Clone)]
pub struct Limits {
    pub max_keys_per_call: usize,
    streams: Arc<Semaphore>,
    max_streams: u32,
    subscribers: Arc<Semaphore>,
    max_subscribers: u32,
    rejected_subscribers: metrics::Counter,
    inflight: Arc<Semaphore>,
    max_inflight: u64,
    metrics: Arc<ServerMetrics>,
    rejected_streams: metrics::Counter,
    rejected_inflight: metrics::Counter,
    rejected_keys: metrics::Counter,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("max_streams", &self.max_streams)
            .finish()
    }
}

/// A stream slot; released on drop.
pub struct StreamPermit {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<ServerMetrics>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.metrics.streams_active.decrement(1.0);
    }
}

/// Admission of one block's bytes to the put path; released on drop.
pub struct BytesPermit {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    metrics: Arc<ServerMetrics>,
}

impl Drop for BytesPermit {
    fn drop(&mut self) {
        self.metrics.inflight_put_bytes.decrement(self.bytes as f64);
    }
}

impl Limits {
    pub fn new(
        max_keys_per_call: u32,
        max_streams: u32,
        max_subscribers: u32,
        max_inflight_put_bytes: u64,
        metrics: Arc<ServerMetrics>,
    ) -> Self {
        Limits {
            max_keys_per_call: max_keys_per_call as usize,
            streams: Arc::new(Semaphore::new(max_streams as usize)),
            max_streams,
            subscribers: Arc::new(Semaphore::new(max_subscribers as usize)),
            max_subscribers,
            rejected_subscribers: metrics.limit_rejection("server.max_subscribers"),
            inflight: Arc::new(Semaphore::new(max_inflight_put_bytes as usize)),
            max_inflight: max_inflight_put_bytes,
            rejected_streams: metrics.limit_rejection("server.max_streams"),
            rejected_inflight: metrics.limit_rejection("server.max_inflight_put_bytes"),
            rejected_keys: metrics.limit_rejection("server.max_keys_per_call"),
            metrics,
        }
    }

    /// A Subscribe slot, held for the subscription's life.
    pub fn subscriber(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.subscribers.clone().try_acquire_owned().map_err(|_| {
            self.rejected_subscribers.increment(1);
            Status::resource_exhausted(format!(
                "server.max_subscribers: {} subscriptions are open, the limit; close one or raise the limit",
                self.max_subscribers
            ))
        })
    }

    pub fn stream(&self) -> Result<StreamPermit, Status> {
        match self.streams.clone().try_acquire_owned() {
            Ok(p) => {
                self.metrics.streams_active.increment(1.0);
                Ok(StreamPermit {
                    _permit: p,
                    metrics: self.metrics.clone(),
                })
            }
            Err(_) => {
                self.rejected_streams.increment(1);
                Err(Status::resource_exhausted(format!(
                    "server.max_streams: {} Put/Get streams are in progress, the limit; retry later",
                    self.max_streams
                )))
            }
        }
    }

    pub fn inflight_bytes(&self, bytes: u64) -> Result<BytesPermit, Status> {
        let n = u32::try_from(bytes)
            .ok()
            .filter(|&n| (n as u64) <= self.max_inflight);
        let permit = n.and_then(|n| self.inflight.clone().try_acquire_many_owned(n).ok());
        match permit {
            Some(p) => {
                self.metrics.inflight_put_bytes.increment(bytes as f64);
                Ok(BytesPermit {
                    _permit: p,
                    bytes,
                    metrics: self.metrics.clone(),
                })
            }
            None => {
                self.rejected_inflight.increment(1);
                Err(Status::resource_exhausted(format!(
                    "server.max_inflight_put_bytes: admitting {bytes} more bytes would pass the limit of {} bytes of puts in flight; retry later",
                    self.max_inflight
                )))
            }
        }
    }

    /// Keys (or blocks) per call.
    pub fn keys(&self, field: &str, n: usize) -> Result<(), Status> {
        if n > self.max_keys_per_call {
            self.rejected_keys.increment(1);
            return Err(Status::invalid_argument(format!(
                "{field}: {n} entries exceed server.max_keys_per_call = {}; split the call",
                self.max_keys_per_call
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_scan_across_chunks() {
        let mut msg = vec![0u8];
        msg.extend_from_slice(&10u32.to_be_bytes());
        msg.extend_from_slice(&[7; 10]);
        msg.push(0);
        msg.extend_from_slice(&300u32.to_be_bytes());
        // Every split point of the stream, one byte at a time included.
        for split in 0..msg.len() {
            let mut s = FrameScan::default();
            let a = s.feed(&msg[..split], 100);
            let b = a.and_then(|_| s.feed(&msg[split..], 100));
            assert_eq!(a.and(b), Err(300), "split {split}");
        }
        let mut s = FrameScan::default();
        for b in &msg[..15] {
            s.feed(std::slice::from_ref(b), 100).unwrap();
        }
        assert_eq!(s.remaining, 0);
    }
}
