//! Request bodies as streams of `Bytes`, with three guards a parser can't give us:
//!
//! - an idle timeout: a client that stops sending mid-body gets 408 instead of holding a
//!   connection and a temporary file forever;
//! - a metered allowance: multipart parsers buffer everything between parts (preamble,
//!   part headers) until they find the next delimiter, so while no field is being read
//!   the body may deliver only a bounded number of bytes before it is cut off;
//! - a drain on drop: when we answer before the client has sent its whole body (a bad
//!   token, an unknown session, a size limit), the rest is read and discarded in the
//!   background for a while. Closing instead would reset the connection while the client
//!   (or nginx, streaming the body to us) is still sending, and it would never see our
//!   answer: nginx turns that into a 502.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};

/// How long an abandoned body is drained before the connection is given up.
const DRAIN_FOR: Duration = Duration::from_secs(30);
/// How many abandoned bodies are drained at once; past that, connections are cut.
const MAX_CONCURRENT_DRAINS: usize = 256;

static DRAINS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_DRAINS);

/// Why the body stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the client sent nothing for {0:?}")]
    Idle(Duration),
    #[error("more than {0} bytes arrived outside any form field (preamble or part headers)")]
    OutsideFields(u64),
    #[error("reading the request body failed: {0}")]
    Read(String),
}

/// How many bytes the body may still deliver before it is cut off; shared between the
/// stream and the parser's driver.
#[derive(Clone, Debug)]
pub struct BodyMeter(Arc<AtomicU64>);

impl BodyMeter {
    /// Unmetered: while a field's own size limit applies.
    pub fn in_field(&self) {
        self.0.store(u64::MAX, Ordering::Relaxed);
    }
    /// While looking for the next field.
    pub fn between_fields(&self, allowance: u64) {
        self.0.store(allowance, Ordering::Relaxed);
    }
}

type BoxedSource<B, E> = Pin<Box<dyn Stream<Item = Result<B, E>> + Send>>;

/// See the module comment.
pub struct GuardedBody<B: Send + 'static, E: Send + 'static> {
    /// `None` once the body ended or failed: nothing is left to drain.
    source: Option<BoxedSource<B, E>>,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// Whether `idle` runs: it starts when the source first makes us wait after a chunk,
    /// so time the server spends not reading is not held against the client.
    idle_armed: bool,
    idle_timeout: Duration,
    meter: Arc<AtomicU64>,
    cut_at: u64,
    /// The client sent `Expect: 100-continue`: until we read, it sends nothing, so an
    /// early answer needs no drain (and a drain would swallow its next request).
    expects_continue: bool,
    received_any: bool,
}

impl<B, E> GuardedBody<B, E>
where
    B: Buf + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    pub fn new(
        source: impl Stream<Item = Result<B, E>> + Send + 'static,
        idle_timeout: Duration,
        between_fields: u64,
    ) -> (Self, BodyMeter) {
        let meter = Arc::new(AtomicU64::new(between_fields));
        let body = Self {
            source: Some(Box::pin(source)),
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            idle_armed: false,
            idle_timeout,
            meter: meter.clone(),
            cut_at: between_fields,
            expects_continue: false,
            received_any: false,
        };
        (body, BodyMeter(meter))
    }

    /// Marks a request that sent `Expect: 100-continue`.
    pub fn expecting_continue(mut self, expects: bool) -> Self {
        self.expects_continue = expects;
        self
    }
}

impl<B: Buf + Send + 'static, E: std::fmt::Display + Send + 'static> Stream for GuardedBody<B, E> {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(source) = this.source.as_mut() else { return Poll::Ready(None) };
        match source.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(mut buf))) => {
                let chunk = buf.copy_to_bytes(buf.remaining());
                this.idle_armed = false;
                this.received_any = true;
                let allowance = this.meter.load(Ordering::Relaxed);
                if allowance != u64::MAX {
                    // A chunk may overshoot the allowance once (chunks also carry field
                    // content): the parser then holds at most the allowance plus a chunk.
                    if allowance == 0 {
                        // Keep the source: dropping us drains what the client still sends.
                        return Poll::Ready(Some(Err(BodyError::OutsideFields(this.cut_at))));
                    }
                    this.meter.store(allowance.saturating_sub(chunk.len() as u64), Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.source = None;
                Poll::Ready(Some(Err(BodyError::Read(error.to_string()))))
            }
            Poll::Ready(None) => {
                this.source = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if !this.idle_armed {
                    this.idle.as_mut().reset(tokio::time::Instant::now() + this.idle_timeout);
                    this.idle_armed = true;
                }
                match this.idle.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.source = None;
                        Poll::Ready(Some(Err(BodyError::Idle(this.idle_timeout))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<B: Send + 'static, E: Send + 'static> Drop for GuardedBody<B, E> {
    fn drop(&mut self) {
        let Some(mut source) = self.source.take() else { return };
        if self.expects_continue && !self.received_any {
            return;
        }
        let idle_timeout = self.idle_timeout;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let Ok(permit) = DRAINS.try_acquire() else { return };
        runtime.spawn(async move {
            let _permit = permit;
            let drain =
                async { while let Ok(Some(Ok(_))) = tokio::time::timeout(idle_timeout, source.next()).await {} };
            let _ = tokio::time::timeout(DRAIN_FOR, drain).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(n: usize) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        futures::stream::iter((0..n).map(|_| Ok(Bytes::from(vec![0u8; 10]))))
    }

    #[tokio::test]
    async fn bytes_outside_fields_are_metered_and_fields_are_not() {
        let (body, _meter) = GuardedBody::new(chunks(5), Duration::from_secs(5), 25);
        let mut body = std::pin::pin!(body);
        for _ in 0..3 {
            assert!(body.next().await.unwrap().is_ok(), "25 bytes, and one chunk past them");
        }
        assert!(matches!(body.next().await.unwrap(), Err(BodyError::OutsideFields(25))));

        let (body, meter) = GuardedBody::new(chunks(5), Duration::from_secs(5), 5);
        meter.in_field();
        assert_eq!(body.count().await, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_times_out() {
        let source = futures::stream::pending::<Result<Bytes, std::io::Error>>();
        let (body, _meter) = GuardedBody::new(source, Duration::from_secs(3), 100);
        let mut body = std::pin::pin!(body);
        assert!(matches!(body.next().await.unwrap(), Err(BodyError::Idle(_))));
    }

    #[tokio::test]
    async fn an_abandoned_body_is_drained_in_the_background() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let source = tokio_stream_from(rx);
        let (body, _meter) = GuardedBody::new(source, Duration::from_secs(5), 100);
        drop(body);
        // The drain keeps receiving: a sender of three more chunks is not blocked.
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(2), tx.send(Ok(Bytes::from_static(b"x")))).await.unwrap().unwrap();
        }
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl Stream<Item = T> + Send + 'static {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
