//! A response body wrapper that reports, exactly once, how the body ended: completely, with
//! an error, or cancelled because the client went away and the body was dropped. This is
//! where a streamed exchange is settled and recorded, since its handler returned long before.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyOutcome {
    /// The upstream body ended cleanly and every byte was handed to the server.
    Complete,
    /// The upstream body failed part-way (connection reset, read timeout).
    Failed,
    /// The body was dropped before its end: the client disconnected or the server shut down.
    Cancelled,
}

/// How a body ended and how many bytes of data it yielded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyEnd {
    pub outcome: BodyOutcome,
    pub bytes: u64,
}

/// Wraps `B`, counts its data bytes and calls `on_end` once when it ends, fails or is dropped.
pub struct ObservedBody<B, F: FnOnce(BodyEnd)> {
    inner: B,
    bytes: u64,
    on_end: Option<F>,
}

impl<B, F: FnOnce(BodyEnd)> ObservedBody<B, F> {
    pub fn new(inner: B, on_end: F) -> Self {
        Self {
            inner,
            bytes: 0,
            on_end: Some(on_end),
        }
    }

    fn end(&mut self, outcome: BodyOutcome) {
        if let Some(on_end) = self.on_end.take() {
            on_end(BodyEnd {
                outcome,
                bytes: self.bytes,
            });
        }
    }
}

impl<B, F> Body for ObservedBody<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    F: FnOnce(BodyEnd) + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                // hyper stops polling once the size hint says the body is complete, so the
                // end must be reported here, not only on `None`.
                if this.inner.is_end_stream() {
                    this.end(BodyOutcome::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(BodyOutcome::Failed),
            Poll::Ready(None) => this.end(BodyOutcome::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, F: FnOnce(BodyEnd)> Drop for ObservedBody<B, F> {
    fn drop(&mut self) {
        self.end(BodyOutcome::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::{Arc, Mutex};

    fn recorder() -> (Arc<Mutex<Vec<BodyEnd>>>, impl FnOnce(BodyEnd) + Unpin) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        (seen, move |end| sink.lock().expect("test mutex").push(end))
    }

    #[tokio::test]
    async fn reports_completion_once_with_byte_count() {
        let (seen, on_end) = recorder();
        let body = ObservedBody::new(Full::new(Bytes::from_static(b"hello")), on_end);
        let collected = body.collect().await.expect("infallible").to_bytes();
        assert_eq!(collected, "hello");
        let seen = seen.lock().expect("test mutex");
        assert_eq!(
            *seen,
            [BodyEnd {
                outcome: BodyOutcome::Complete,
                bytes: 5
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
        let body = ObservedBody::new(StreamBody::new(futures_util::stream::iter(frames)), on_end);
        assert!(body.collect().await.is_err());
        assert_eq!(
            *seen.lock().expect("test mutex"),
            [BodyEnd {
                outcome: BodyOutcome::Failed,
                bytes: 3
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
        let mut body =
            ObservedBody::new(StreamBody::new(futures_util::stream::iter(frames)), on_end);
        let first = body.frame().await.expect("a frame").expect("ok");
        assert_eq!(first.into_data().expect("data"), "ab");
        drop(body);
        assert_eq!(
            *seen.lock().expect("test mutex"),
            [BodyEnd {
                outcome: BodyOutcome::Cancelled,
                bytes: 2
            }]
        );
    }
}
