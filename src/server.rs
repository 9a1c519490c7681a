//! The HTTP server: the router, the operational endpoints, the accept loop and graceful drain.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::{header, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::client::{ClientIo, ClientSocket};
use crate::error::ProxyError;
use crate::limiter::status::{BucketReport, QuotaCooldown, StatusDocument};
use crate::proxy;
use crate::state::{AppState, StartError};

/// The router: operational endpoints, and everything else through the proxy.
///
/// With a separate metrics address (`metrics_listen`), `/metrics` and `/status` (org names,
/// limits, the upstream URL) are served only there: this listener may be open to every
/// application, and its tokens do not guard those pages.
pub fn app(state: Arc<AppState>) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let router = match state.live().config.metrics_listen {
        Some(_) => router
            .route("/metrics", get(elsewhere))
            .route("/status", get(elsewhere)),
        None => router
            .route("/metrics", get(metrics))
            .route("/status", get(status)),
    };
    router.fallback(proxy::proxy).with_state(state)
}

/// `/metrics` or `/status` asked of the main listener when they are served elsewhere.
async fn elsewhere(State(state): State<Arc<AppState>>, uri: http::Uri) -> Response {
    ProxyError::ServedElsewhere {
        path: uri.path().to_owned(),
        addr: state.live().config.metrics_listen,
    }
    .into_response()
}

/// The operational endpoints alone, for a separate metrics address (`metrics_listen`).
pub fn ops_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state)
}

/// Alive: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready to forward: not draining. A load balancer stops sending new work on the first 503.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_draining() {
        ProxyError::ShuttingDown.into_response()
    } else {
        "ready\n".into_response()
    }
}

/// Rendered on the blocking pool: reading every bucket and encoding the text takes time in
/// proportion to the series (seconds for the 1.26M that per-value label caps once allowed),
/// which on a worker's event loop would stall every request it serves.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let metrics = Arc::clone(&state.metrics);
    let counts = state.limiter.counts();
    let buckets = state.limiter.buckets();
    let rendered = tokio::task::spawn_blocking(move || {
        metrics.bucket_counts(counts);
        metrics.render(&buckets)
    })
    .await;
    let text = match rendered {
        Ok(text) => text,
        Err(err) => {
            return ProxyError::Internal(format!("metrics rendering failed: {err}")).into_response()
        }
    };
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Every bucket as JSON (a [`StatusDocument`]): limits (configured, learned, in force),
/// sluice's view, the upstream's last headers, the queue, the circuit and the last 429.
/// `sluice status` prints it.
async fn status(State(state): State<Arc<AppState>>) -> Response {
    let mut buckets: Vec<BucketReport> = state
        .limiter
        .buckets()
        .iter()
        .map(|queue| BucketReport::new(&queue.org, &queue.model, &queue.status()))
        .collect();
    buckets.sort_by(|a, b| (&a.org, &a.model).cmp(&(&b.org, &b.model)));
    let now = tokio::time::Instant::now();
    let quota_cooldowns = state
        .exhausted
        .orgs(now)
        .into_iter()
        .map(|(org, left)| QuotaCooldown {
            org: Some(org.to_string()),
            remaining_secs: Some(left.as_secs_f64()),
        })
        .collect();
    let document = StatusDocument {
        version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        upstream: Some(state.live().config.upstream.base_url.clone()),
        draining: Some(state.is_draining()),
        quota_cooldowns,
        shared_store: state.limiter.store().map(|store| store.report()),
        buckets,
    };
    let body = match serde_json::to_string(&document) {
        Ok(body) => body,
        Err(err) => {
            return ProxyError::Internal(format!("status encoding failed: {err}")).into_response()
        }
    };
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// How a server's drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Drain {
    /// Every connection finished its exchanges within the drain timeout.
    Complete,
    /// The drain timeout cut these connections (and whatever they were still doing).
    Cut { connections: usize },
}

impl Drain {
    /// The drain of both: cut if either was.
    pub fn and(self, other: Drain) -> Drain {
        match (self, other) {
            (Drain::Cut { connections: a }, Drain::Cut { connections: b }) => {
                Drain::Cut { connections: a + b }
            }
            (cut @ Drain::Cut { .. }, _) | (_, cut @ Drain::Cut { .. }) => cut,
            _ => Drain::Complete,
        }
    }
}

/// A pause after a failed accept (out of file descriptors, say), so the loop neither spins
/// nor stops: the condition usually passes once connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// At most one warning per this interval about refused connections or failed accepts.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One open client connection, counted over every worker while it lives.
struct Open(Arc<AppState>);

impl Open {
    /// Counts a new connection, or `None` when `server.max_connections` are open.
    fn try_new(state: &Arc<AppState>, max: usize) -> Option<Open> {
        let previous = state.connections.fetch_add(1, Ordering::AcqRel);
        if previous >= max {
            state.connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        state.metrics.connections_open.inc();
        Some(Open(Arc::clone(state)))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.connections_open.dec();
    }
}

/// A warning that repeats at most every [`WARN_EVERY`], with how often it was due meanwhile.
struct Throttled {
    next: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl Throttled {
    fn new() -> Self {
        Self {
            next: None,
            suppressed: 0,
        }
    }

    /// Whether to log now; `Some(n)`: log, and `n` more happened since the last line.
    fn due(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        if self.next.is_some_and(|next| now < next) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + WARN_EVERY);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The HTTP/1 and HTTP/2 connection settings, from the configuration at start.
fn connection_builder(config: &crate::config::ServerConfig) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper runs this timer from the moment a connection waits for a request: it bounds
        // a slowloris client's headers and an idle keep-alive connection alike.
        .header_read_timeout(config.header_read_timeout)
        // A FIN does not cancel the exchange: it may be the client's half-close. Whether a
        // waiting request's client has left is sluice's call (`crate::client`).
        .half_close(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        // Pings find dead peers of an otherwise silent connection.
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// The router, for one connection: each HTTP/1 request carries the connection's socket, for
/// its client watch (see [`crate::client`]).
#[derive(Clone)]
struct WithSocket {
    inner: Router,
    socket: ClientSocket,
}

impl<B> tower_service::Service<http::Request<B>> for WithSocket
where
    Router: tower_service::Service<http::Request<B>>,
{
    type Response = <Router as tower_service::Service<http::Request<B>>>::Response;
    type Error = <Router as tower_service::Service<http::Request<B>>>::Error;
    type Future = <Router as tower_service::Service<http::Request<B>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower_service::Service::<http::Request<B>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if request.version() <= http::Version::HTTP_11 {
            request.extensions_mut().insert(self.socket.clone());
        }
        tower_service::Service::call(&mut self.inner, request)
    }
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests and
/// streams finish for up to the configured drain timeout, and says whether it had to cut any.
///
/// Each connection is served by hyper with the header-read (and idle) timeout, HTTP/2 stream
/// bound and half-close handling of [`connection_builder`]; connections beyond
/// `server.max_connections` (over all workers) are closed as soon as they are accepted, so
/// the process never runs out of descriptors for `/healthz` or its upstream connections.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Drain, StartError> {
    let server_config = state.live().config.server.clone();
    let builder = connection_builder(&server_config);
    let router = app(Arc::clone(&state));
    let graceful = GracefulShutdown::new();
    let mut refused = Throttled::new();
    let mut failed = Throttled::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(err) => {
                if let Some(more) = failed.due() {
                    tracing::warn!(error = %err, more, "could not accept a connection; retrying");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(open) = Open::try_new(&state, server_config.max_connections) else {
            state.metrics.connections_refused.inc();
            if let Some(more) = refused.due() {
                tracing::warn!(
                    max_connections = server_config.max_connections,
                    more,
                    "connection limit reached (server.max_connections); closing new connections"
                );
            }
            drop(tcp);
            continue;
        };
        // Small writes (SSE events, short JSON answers) must leave at once, not wait on
        // Nagle's algorithm for the client's delayed ACK.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
        let io = ClientIo::new(tcp);
        let service = TowerToHyperService::new(WithSocket {
            inner: router.clone(),
            socket: io.socket(),
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "client connection ended with an error");
            }
            drop(open);
        });
    }

    state.begin_drain();
    // Read now: a reload may have changed it since the server started.
    let drain_timeout = state.live().config.server.drain_timeout;
    tracing::info!(
        drain_timeout_secs = drain_timeout.as_secs_f64(),
        "shutdown requested: no new connections; draining in-flight requests"
    );
    drop(listener);
    let remaining = graceful.count();
    match tokio::time::timeout(drain_timeout, graceful.shutdown()).await {
        Ok(()) => {
            tracing::info!("drained; shutting down");
            Ok(Drain::Complete)
        }
        Err(_) => {
            let connections = state
                .connections
                .load(Ordering::Acquire)
                .min(remaining.max(1));
            tracing::warn!(
                connections,
                "drain timeout elapsed with requests still in flight; closing them"
            );
            Ok(Drain::Cut { connections })
        }
    }
}
