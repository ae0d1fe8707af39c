//! Counts gRPC calls in flight, so that a drain waits for calls rather than
//! for connections: engines keep their HTTP/2 connections open between
//! calls, and a drain that waited for those to close would always run into
//! its timeout.
//!
//! A call is in flight from the moment its request reaches the service
//! until its response body ends (for a Get stream, until the last block is
//! sent).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http_body::{Body, Frame};

#[derive(Debug, Default)]
pub struct InFlight {
    calls: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl InFlight {
    pub fn count(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Returns once no call is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn enter(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
    }
}

/// Ends a call when dropped.
pub struct CallGuard(Arc<InFlight>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[derive(Debug, Clone)]
pub struct InFlightLayer(pub Arc<InFlight>);

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            calls: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    calls: Arc<InFlight>,
}

impl<S, Req, ResBody> tower::Service<Req> for Counted<S>
where
    S: tower::Service<Req, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Send + 'static,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let guard = self.calls.enter();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|body| CountedBody {
                inner: body,
                _guard: guard,
            }))
        })
    }
}

/// A response body that ends its call when it is dropped.
pub struct CountedBody<B> {
    inner: B,
    _guard: CallGuard,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
