//! Event-loop threads: one single-threaded runtime per worker, each accepting connections on
//! its own socket bound to the same address (`SO_REUSEPORT`: the kernel spreads new
//! connections over the sockets) and serving them to the end.
//!
//! A request and its upstream exchange therefore stay on one thread, and no thread wakes
//! another to share the work. On the 2-core benchmark machine a work-stealing runtime spent
//! ~2.5 futex wake-ups per request doing that, which cost more latency than sluice's own
//! work. The state (limits, queues, metrics, the configuration) is shared by every worker.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
#[cfg(unix)]
use tokio::net::TcpSocket;
use tokio::sync::{oneshot, watch};

use crate::server;
use crate::state::{AppState, StartError};

/// Pending connections each socket holds before the kernel refuses more.
#[cfg(unix)]
const BACKLOG: u32 = 1024;

/// Binds `count` listening sockets to `addr` (port 0: one free port for all of them). Call
/// it inside a runtime (the sockets register with it; [`spawn`] moves them to their own).
///
/// An address already taken fails here, as a plain bind would, even when the holder is
/// another sluice whose sockets would accept a share of the port: connections must not be
/// split silently between two daemons.
///
/// Where `SO_REUSEPORT` is missing (not Linux or another Unix) one socket is returned, and
/// sluice runs one worker.
pub fn bind(addr: SocketAddr, count: usize) -> io::Result<Vec<TcpListener>> {
    let probe = std::net::TcpListener::bind(addr)?;
    #[cfg(unix)]
    if count > 1 {
        let addr = probe.local_addr()?;
        drop(probe);
        return (0..count).map(|_| bind_shared(addr)).collect();
    }
    probe.set_nonblocking(true)?;
    Ok(vec![TcpListener::from_std(probe)?])
}

#[cfg(unix)]
fn bind_shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Tells every worker to stop accepting and drain.
#[derive(Clone)]
pub struct Stop(Arc<watch::Sender<bool>>);

impl Stop {
    pub fn new() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }

    pub fn stop(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once [`Stop::stop`] has been called.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut receiver = self.0.subscribe();
        async move {
            let _ = receiver.wait_for(|stopped| *stopped).await;
        }
    }
}

impl Default for Stop {
    fn default() -> Self {
        Self::new()
    }
}

/// A running worker thread.
pub struct Worker {
    index: usize,
    ended: oneshot::Receiver<Result<server::Drain, StartError>>,
}

impl Worker {
    /// Waits for the worker to drain and end.
    pub async fn join(self) -> Result<server::Drain, StartError> {
        self.ended.await.unwrap_or_else(|_| {
            Err(StartError::Serve(io::Error::other(format!(
                "worker {} stopped unexpectedly",
                self.index
            ))))
        })
    }
}

/// Starts worker `index` on a thread of its own: a single-threaded runtime serving
/// `listener` with `state` until `stop`.
pub fn spawn(
    index: usize,
    listener: TcpListener,
    state: Arc<AppState>,
    stop: Stop,
) -> Result<Worker, StartError> {
    // Moved between runtimes as a plain socket: a tokio listener belongs to the runtime that
    // registered it.
    let listener = listener.into_std().map_err(StartError::Serve)?;
    let (report, ended) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("sluice-worker-{index}"))
        .spawn(move || {
            crate::upstream::use_client(index);
            let result = serve(listener, state, stop);
            if let Err(err) = &result {
                tracing::error!(worker = index, "worker failed: {err}");
            }
            let _ = report.send(result);
        })
        .map_err(StartError::Serve)?;
    Ok(Worker { index, ended })
}

fn serve(
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    stop: Stop,
) -> Result<server::Drain, StartError> {
    let runtime = runtime(Arc::clone(&state.tokenizers)).map_err(StartError::Serve)?;
    state.tokenizers.warm();
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener).map_err(StartError::Serve)?;
        server::serve(listener, state, stop.stopped()).await
    })
}

/// A worker's runtime: one event-loop thread (the caller of `block_on`), plus the blocking
/// pool that tokenizes large prompts, whose threads warm the tokenizer as they start.
pub fn runtime(
    tokenizers: Arc<crate::estimate::Tokenizers>,
) -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(move || tokenizers.warm())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_share_one_port_and_the_kernel_spreads_connections_over_them() {
        let listeners = bind("127.0.0.1:0".parse().expect("test setup"), 2).expect("test setup");
        let port = listeners[0].local_addr().expect("test setup").port();
        assert_ne!(port, 0);
        assert!(listeners
            .iter()
            .all(|l| l.local_addr().expect("test setup").port() == port));
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("test setup"),
            );
        }
        // Every connection waits in exactly one socket's queue. 64 connections all hashed to
        // one of two sockets would happen once in 2^63 runs.
        let mut accepted = [0; 2];
        for (i, listener) in listeners.iter().enumerate() {
            while let Ok(Ok(_)) =
                tokio::time::timeout(std::time::Duration::from_millis(50), listener.accept()).await
            {
                accepted[i] += 1;
            }
        }
        assert_eq!(accepted[0] + accepted[1], 64, "{accepted:?}");
        assert!(accepted.iter().all(|&n| n > 0), "{accepted:?}");
    }

    #[tokio::test]
    async fn a_taken_address_is_refused_even_to_a_reuseport_socket() {
        let workers = bind("127.0.0.1:0".parse().expect("test setup"), 2).expect("test setup");
        let addr = workers[0].local_addr().expect("test setup");
        let err = bind(addr, 2).expect_err("a second daemon must not share the port");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            bind(addr, 1).expect_err("taken").kind(),
            io::ErrorKind::AddrInUse
        );
    }
}
