//! The client's TCP connection, shared by hyper (which reads and writes it) and by the watch
//! that tells, while a request waits inside sluice, whether its client has left.
//!
//! TCP cannot tell a client that shut its write side after sending (`shutdown(SHUT_WR)`, an
//! HTTP/1 half-close) from one that went away: both arrive as a FIN. So hyper is told to
//! allow half-closes (it keeps answering after a FIN), and sluice decides by when the FIN
//! came:
//! - a FIN already there (or arriving within [`HALF_CLOSE_GRACE`]) when the request starts
//!   waiting came with the request: a half-close, and the request is answered;
//! - a FIN that arrives later is a client that gave up: while the request waits for
//!   admission or between attempts, the wait ends, the reservation returns and nothing is
//!   sent; while the upstream works on it, the upstream request is cancelled (which stops the
//!   provider generating, and billing, an answer nobody reads);
//! - once the answer's head is relayed, a client that left is found when writing to it fails
//!   (a stream stops at its next event).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How late after its request a FIN still counts as the request's own half-close: the FIN
/// of a client that sends and then shuts its write side may trail the request by a segment.
pub(crate) const HALF_CLOSE_GRACE: Duration = Duration::from_millis(50);

/// A client connection as hyper's I/O: the socket, shared with the requests' watches.
pub(crate) struct ClientIo(Arc<TcpStream>);

impl ClientIo {
    pub(crate) fn new(stream: TcpStream) -> Self {
        Self(Arc::new(stream))
    }

    /// A handle for the watches of this connection's requests.
    pub(crate) fn socket(&self) -> ClientSocket {
        ClientSocket(Arc::clone(&self.0))
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            // `try_read` clears the readiness it finds stale, so the loop polls again.
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(read) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket (TCP_NODELAY): nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A FIN after the last answer, so the client reads it whole rather than a reset.
        let shut = socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write);
        match shut {
            Err(err) if err.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

/// The socket of the connection a request came on (HTTP/1 only: an HTTP/2 client that
/// leaves resets its stream, and hyper cancels the request itself).
#[derive(Clone)]
pub(crate) struct ClientSocket(Arc<TcpStream>);

impl ClientSocket {
    /// Starts watching for the client leaving, from now: the request has been read whole.
    pub(crate) fn watch(&self) -> ClientWatch {
        ClientWatch {
            socket: Arc::clone(&self.0),
            since: Instant::now(),
            settled: false,
        }
    }
}

/// Whether a request's client has left while the request waits inside sluice (see the module
/// documentation for how a half-close is told apart).
pub(crate) struct ClientWatch {
    socket: Arc<TcpStream>,
    /// When the request was read whole.
    since: Instant,
    /// The client half-closed, or sent more bytes (pipelining): nothing more to learn.
    settled: bool,
}

impl ClientWatch {
    /// Resolves when the client has left; never, for a client that half-closed with its
    /// request or that may still read its answer.
    pub(crate) async fn left(&mut self) {
        let mut byte = [0u8; 1];
        while !self.settled {
            match self.socket.peek(&mut byte).await {
                Ok(0) if self.since.elapsed() <= HALF_CLOSE_GRACE => {
                    tracing::debug!("the client half-closed after its request; it is answered");
                    self.settled = true;
                }
                // A FIN long after the request: the client gave up waiting.
                Ok(0) => return,
                // Bytes of a next request wait unread: the client is there.
                Ok(_) => self.settled = true,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                // Reset: the client is gone.
                Err(_) => return,
            }
        }
        std::future::pending().await
    }
}
