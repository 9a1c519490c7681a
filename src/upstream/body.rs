//! A response body wrapper that reports, exactly once, how the body ended: completely, with
//! an error, or cancelled because the client went away and the body was dropped. This is
//! where a streamed exchange is settled and recorded, since its handler returned long before.
//! On the way it can read the usage the upstream reports, from a JSON body or an SSE stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::endpoint::Endpoint;
use crate::upstream::usage::{usage_from_json, SseUsage, Usage};

/// An upstream response body that fails when the upstream sends nothing for a read timeout.
/// The timer exists only while the body waits: a body whose bytes are already there (most
/// JSON answers) never sets one.
pub struct TimedBody {
    inner: Incoming,
    timeout: Duration,
    /// Armed on the first wait, re-armed on the first wait after each frame.
    timer: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since the timer was last armed.
    progressed: bool,
    /// The whole response ends by then (`upstream.total_timeout_secs`), however steadily it
    /// drips: checked as each frame arrives (a silent body is the read timeout's).
    deadline: Instant,
    total: Duration,
    /// A frame read ahead by [`TimedBody::prefetch`], handed out first.
    prefetched: Option<Frame<Bytes>>,
}

impl TimedBody {
    /// `timeout` bounds each wait for the next frame; `deadline` (the request's send time plus
    /// `total`) bounds the whole body.
    pub fn new(inner: Incoming, timeout: Duration, deadline: Instant, total: Duration) -> Self {
        Self {
            inner,
            timeout,
            timer: None,
            progressed: false,
            deadline,
            total,
            prefetched: None,
        }
    }

    /// Reads the first frame ahead, so that a body which fails before its first byte is an
    /// error the caller can still answer with a status of its own: once the response head has
    /// gone to the client, a broken body can only cut the connection.
    pub async fn prefetch(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let first = std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await;
        match first {
            Some(Ok(frame)) => {
                self.prefetched = Some(frame);
                Ok(())
            }
            Some(Err(err)) => Err(err),
            None => Ok(()),
        }
    }
}

/// The upstream's response took longer in all than the total timeout.
#[derive(Debug, thiserror::Error)]
#[error("the upstream's response took longer than {0:?} in all (upstream.total_timeout_secs)")]
pub struct TotalTimeout(Duration);

/// The upstream sent no body bytes within the read timeout.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?} (upstream.read_timeout_secs)")]
pub struct ReadTimeout(Duration);

impl Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.prefetched.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(_))) if Instant::now() >= this.deadline => {
                Poll::Ready(Some(Err(TotalTimeout(this.total).into())))
            }
            Poll::Ready(frame) => {
                this.progressed = true;
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let timer = match &mut this.timer {
                    Some(timer) => {
                        if this.progressed {
                            timer.as_mut().reset(Instant::now() + timeout);
                        }
                        timer
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep(timeout))),
                };
                this.progressed = false;
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(ReadTimeout(this.timeout).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefetched.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead = self
            .prefetched
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |data| data.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + ahead);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

/// JSON bodies larger than this are not kept for usage extraction: the reservation then stays
/// at its estimate. Chat and completion responses are a few KiB; only huge embedding batches
/// exceed it.
const MAX_JSON_COPY: usize = 1 << 20;

/// Reads the usage out of a response body as it passes.
pub enum UsageTap {
    /// A complete JSON body: a copy is kept (up to [`MAX_JSON_COPY`]) and parsed at the end.
    Json {
        endpoint: Endpoint,
        copy: BytesMut,
        overflowed: bool,
    },
    /// An SSE stream, scanned event by event; may strip the usage chunk sluice asked for.
    Sse(SseUsage),
}

impl UsageTap {
    pub fn json(endpoint: Endpoint) -> Self {
        Self::Json {
            endpoint,
            copy: BytesMut::new(),
            overflowed: false,
        }
    }

    fn frame(&mut self, data: Bytes) -> Bytes {
        match self {
            Self::Json {
                copy, overflowed, ..
            } => {
                if !*overflowed {
                    if copy.len() + data.len() > MAX_JSON_COPY {
                        *overflowed = true;
                        *copy = BytesMut::new();
                    } else {
                        copy.extend_from_slice(&data);
                    }
                }
                data
            }
            Self::Sse(scanner) => scanner.feed(data),
        }
    }

    fn finish(&mut self) -> Bytes {
        match self {
            Self::Json { .. } => Bytes::new(),
            Self::Sse(scanner) => scanner.finish(),
        }
    }

    fn usage(&self) -> Option<Usage> {
        match self {
            Self::Json {
                endpoint,
                copy,
                overflowed: false,
            } => usage_from_json(*endpoint, copy),
            Self::Json { .. } => None,
            Self::Sse(scanner) => scanner.usage(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyOutcome {
    /// The upstream body ended cleanly and every byte was handed to the server.
    Complete,
    /// The upstream body failed part-way (connection reset, read timeout).
    Failed,
    /// The body was dropped before its end: the client disconnected or the server shut down.
    Cancelled,
}

impl BodyOutcome {
    /// The access log's `outcome` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Failed => "upstream_body_failed",
            Self::Cancelled => "client_cancelled",
        }
    }
}

/// How a body ended, how many bytes of data it yielded, and the usage it reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyEnd {
    pub outcome: BodyOutcome,
    pub bytes: u64,
    pub usage: Option<Usage>,
}

/// A body's end as reported while its last bytes are still on their way to the client: the
/// usage is read from them by [`Ended::resolve`], later, off the response's path.
pub struct Ended {
    outcome: BodyOutcome,
    bytes: u64,
    tap: Option<UsageTap>,
}

impl Ended {
    pub fn resolve(self) -> BodyEnd {
        BodyEnd {
            outcome: self.outcome,
            bytes: self.bytes,
            usage: self.tap.as_ref().and_then(UsageTap::usage),
        }
    }
}

/// Wraps `B`, counts its data bytes, optionally reads usage through a [`UsageTap`], and calls
/// `on_end` once when it ends, fails or is dropped.
pub struct ObservedBody<B, F: FnOnce(Ended)> {
    inner: B,
    bytes: u64,
    tap: Option<UsageTap>,
    /// Set once the inner body ended and the tap's held-back bytes were flushed.
    done: bool,
    /// An SSE stream: a failure of the upstream body ends it with an error event instead of
    /// a cut connection, so the client's SDK raises an error instead of seeing a short answer.
    error_event: bool,
    /// The bytes forwarded so far end at an event boundary.
    at_boundary: bool,
    on_end: Option<F>,
}

/// The SSE event that ends a stream whose upstream broke (docs/upstream.md §2: mid-stream errors
/// arrive as `data: {"error": ...}`).
const BROKEN_STREAM_EVENT: &str = "data: {\"error\":{\"message\":\"The upstream connection broke mid-stream; this response is incomplete. Send the request again.\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_stream_broken\"}}\n\n";

impl<B, F: FnOnce(Ended)> ObservedBody<B, F> {
    pub fn new(inner: B, tap: Option<UsageTap>, on_end: F) -> Self {
        Self {
            inner,
            bytes: 0,
            tap,
            done: false,
            error_event: false,
            at_boundary: true,
            on_end: Some(on_end),
        }
    }

    /// Ends the stream with an SSE error event if the upstream body fails.
    pub fn with_error_event(mut self) -> Self {
        self.error_event = true;
        self
    }

    fn broken_stream_event(&self) -> Bytes {
        if self.at_boundary {
            Bytes::from_static(BROKEN_STREAM_EVENT.as_bytes())
        } else {
            // Close the event the stream broke inside first; the client's parser drops it.
            Bytes::from([b"\n\n", BROKEN_STREAM_EVENT.as_bytes()].concat())
        }
    }

    fn end(&mut self, outcome: BodyOutcome) {
        if let Some(on_end) = self.on_end.take() {
            on_end(Ended {
                outcome,
                bytes: self.bytes,
                tap: self.tap.take(),
            });
        }
    }
}

impl<B, F> Body for ObservedBody<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
    F: FnOnce(Ended) + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            return match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    let ending = this.inner.is_end_stream();
                    let frame = match (frame.into_data(), &mut this.tap) {
                        (Ok(data), Some(tap)) => {
                            let mut data = tap.frame(data);
                            if ending {
                                // hyper stops polling once the body says it is complete, so
                                // held-back bytes go out with the last frame.
                                let rest = tap.finish();
                                if !rest.is_empty() {
                                    let mut joined = BytesMut::from(&data[..]);
                                    joined.extend_from_slice(&rest);
                                    data = joined.freeze();
                                }
                            } else if data.is_empty() {
                                // The tap held the whole chunk back (an incomplete event).
                                continue;
                            }
                            Frame::data(data)
                        }
                        (Ok(data), None) => Frame::data(data),
                        (Err(trailers), _) => trailers,
                    };
                    if let Some(data) = frame.data_ref() {
                        this.bytes += data.len() as u64;
                        if !data.is_empty() {
                            this.at_boundary =
                                data.ends_with(b"\n\n") || data.ends_with(b"\r\n\r\n");
                        }
                    }
                    if ending {
                        this.done = true;
                        this.end(BodyOutcome::Complete);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(err))) => {
                    // The access line says the body failed; this says why (reset, timeout).
                    tracing::warn!(error = %err, bytes = this.bytes, "upstream response body failed");
                    this.done = true;
                    this.end(BodyOutcome::Failed);
                    if this.error_event {
                        let event = this.broken_stream_event();
                        this.bytes += event.len() as u64;
                        return Poll::Ready(Some(Ok(Frame::data(event))));
                    }
                    Poll::Ready(Some(Err(err)))
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let rest = this.tap.as_mut().map(UsageTap::finish).unwrap_or_default();
                    this.bytes += rest.len() as u64;
                    this.end(BodyOutcome::Complete);
                    if rest.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(Frame::data(rest))))
                    }
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.tap {
            // Stripping may change the length; a JSON tap never does.
            Some(UsageTap::Sse(_)) => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

impl<B, F: FnOnce(Ended)> Drop for ObservedBody<B, F> {
    fn drop(&mut self) {
        self.end(BodyOutcome::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::{Arc, Mutex};

    fn recorder() -> (Arc<Mutex<Vec<BodyEnd>>>, impl FnOnce(Ended) + Unpin) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        (seen, move |end: Ended| {
            sink.lock().expect("test mutex").push(end.resolve())
        })
    }

    #[tokio::test]
    async fn reports_completion_once_with_byte_count() {
        let (seen, on_end) = recorder();
        let body = ObservedBody::new(Full::new(Bytes::from_static(b"hello")), None, on_end);
        let collected = body.collect().await.expect("infallible").to_bytes();
        assert_eq!(collected, "hello");
        let seen = seen.lock().expect("test mutex");
        assert_eq!(
            *seen,
            [BodyEnd {
                outcome: BodyOutcome::Complete,
                bytes: 5,
                usage: None
            }]
        );
    }

    #[tokio::test]
    async fn reports_failure() {
        let (seen, on_end) = recorder();
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Err(std::io::Error::other("reset")),
        ];
        let body = ObservedBody::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            None,
            on_end,
        );
        assert!(body.collect().await.is_err());
        assert_eq!(
            *seen.lock().expect("test mutex"),
            [BodyEnd {
                outcome: BodyOutcome::Failed,
                bytes: 3,
                usage: None
            }]
        );
    }

    #[tokio::test]
    async fn reports_cancellation_on_drop() {
        let (seen, on_end) = recorder();
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
        ];
        let mut body = ObservedBody::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            None,
            on_end,
        );
        let first = body.frame().await.expect("a frame").expect("ok");
        assert_eq!(first.into_data().expect("data"), "ab");
        drop(body);
        assert_eq!(
            *seen.lock().expect("test mutex"),
            [BodyEnd {
                outcome: BodyOutcome::Cancelled,
                bytes: 2,
                usage: None
            }]
        );
    }
}
