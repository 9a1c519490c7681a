//! The running mock: bind, serve, control, shut down.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{Limits, MockConfig};
use crate::control;
use crate::faults::FaultRule;
use crate::handler::{self, App};
use crate::stats::Stats;

/// How long [`MockServer::shutdown`] lets open streams finish before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The router: `/_mock/*` control routes, and everything else as the OpenAI API.
fn app(state: Arc<App>) -> Router {
    Router::new()
        .route("/_mock/stats", get(control::stats))
        .route(
            "/_mock/faults",
            post(control::inject).delete(control::clear_faults),
        )
        .route("/_mock/reset", post(control::reset))
        .route("/_mock/spend", post(control::spend))
        .route("/_mock/limits", post(control::limits))
        .fallback(handler::handle)
        .with_state(state)
}

/// A mock OpenAI server running on a tokio task. Dropping it stops it too.
#[derive(Debug)]
pub struct MockServer {
    app: Arc<App>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(config: MockConfig) -> io::Result<MockServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        MockServer::start_on(listener, config).await
    }

    /// Starts serving on `listener`. Must be called within a tokio runtime.
    pub async fn start_on(listener: TcpListener, config: MockConfig) -> io::Result<MockServer> {
        let addr = listener.local_addr()?;
        // Build the tokenizer tables before the first request rather than during it.
        tokio::task::spawn_blocking(|| {
            tiktoken_rs::o200k_base_singleton();
        })
        .await
        .map_err(io::Error::other)?;
        let state = Arc::new(App::new(config));
        let (shutdown, stopped) = oneshot::channel::<()>();
        // Small SSE writes must not wait for delayed ACKs.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let serve = axum::serve(listener, app(Arc::clone(&state))).with_graceful_shutdown(async {
            // Resolves when told to stop, or when the MockServer is gone.
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move {
            // Documented never to fail: accept errors are retried inside.
            let _ = serve.await;
        });
        Ok(MockServer {
            app: state,
            addr,
            shutdown: Some(shutdown),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash or `/v1`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> Stats {
        self.app.stats.snapshot()
    }

    /// Queues a fault (FIFO); the first rule matching a request's path applies.
    pub fn inject(&self, rule: FaultRule) {
        self.app.faults.push(rule);
    }

    /// Stops accepting `key`, as the provider does once a rotated-out key is revoked.
    pub fn revoke_key(&self, key: &str) {
        self.app
            .revoked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key.to_owned());
    }

    pub fn clear_faults(&self) {
        self.app.faults.clear();
    }

    /// Spends an organization's budget as another client would; may push it into debt.
    pub fn spend(&self, org: &str, model: &str, requests: u64, tokens: u64) {
        self.app
            .limiter
            .spend(org, model, requests, tokens, Instant::now());
    }

    /// Sets the limits of `model`, or the default of every model without its own (`None`).
    /// Existing buckets change in place and keep what they have used.
    pub fn set_limits(&self, model: Option<&str>, limits: Limits) {
        self.app.limiter.set_limits(model, limits, Instant::now());
    }

    /// Clears the stats and every bucket (limits and queued faults stay).
    pub fn reset(&self) {
        self.app.stats.reset();
        self.app.limiter.reset();
    }

    /// Stops accepting, lets open requests finish for a moment, then stops.
    pub async fn shutdown(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}
