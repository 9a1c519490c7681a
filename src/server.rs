//! The HTTP server: shared state, the router, the operational endpoints, and graceful drain.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
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
use crate::config::Config;
use crate::error::ProxyError;
use crate::estimate::{OutputDefaults, Tokenizers};
use crate::limiter::bucket::Limits;
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::org::Orgs;
use crate::proxy;
use crate::quota::Exhausted;
use crate::retry::RetryBudget;
use crate::upstream::Upstream;

/// The window over which requests earn the right to retries.
const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// What a config reload replaces. A request reads it once, when it arrives, and runs to the
/// end under that one configuration.
pub struct Live {
    pub config: Config,
    pub orgs: Orgs,
    pub output_defaults: OutputDefaults,
    /// Counts reloads; buckets ignore limits from an older configuration than the one they
    /// already took (a request that arrived just before a reload must not undo it).
    pub generation: u64,
}

impl Live {
    fn new(config: Config, generation: u64) -> Self {
        Self {
            orgs: Orgs::new(&config.orgs),
            output_defaults: OutputDefaults::new(
                config.estimate.output_tokens_by_model.clone(),
                config.estimate.default_output_tokens,
            ),
            config,
            generation,
        }
    }

    /// The configured limits of `org`'s `model` (none for an org the config does not list).
    pub fn limits_of(&self, org: &str, model: &str) -> Limits {
        self.config
            .orgs
            .iter()
            .find(|configured| configured.name == org)
            .and_then(|configured| configured.limits_for(model))
            .unwrap_or_default()
    }
}

/// Everything a request handler needs, shared behind one `Arc`.
pub struct AppState {
    live: RwLock<Arc<Live>>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub limiter: Limiter,
    /// Orgs in quota cool-down.
    pub exhausted: Exhausted,
    /// Bounds retries of failed requests to a share of the traffic.
    pub retry_budget: RetryBudget,
    pub tokenizers: Arc<Tokenizers>,
    /// Bounds the request bodies read whole at once.
    pub body_budget: crate::body_budget::BodyBudget,
    draining: AtomicBool,
    /// Woken when the drain begins: queued requests stop waiting for admission.
    drain_started: tokio::sync::watch::Sender<bool>,
    /// Client connections open now, over all workers (see `server.max_connections`).
    connections: AtomicUsize,
}

/// The BPE tables take a moment to build and never change: built once per process and
/// shared by every server in it (tests start many).
static TOKENIZERS: std::sync::OnceLock<Arc<Tokenizers>> = std::sync::OnceLock::new();

/// The process's tokenizers, built on first call (the binary calls this before starting its
/// runtime, so it can warm every runtime thread).
pub fn tokenizers() -> Result<Arc<Tokenizers>, StartError> {
    if let Some(built) = TOKENIZERS.get() {
        return Ok(Arc::clone(built));
    }
    let built = Arc::new(Tokenizers::new().map_err(|err| StartError::Tokenizers(err.to_string()))?);
    Ok(Arc::clone(TOKENIZERS.get_or_init(|| built)))
}

impl AppState {
    pub fn new(config: Config) -> Result<Self, StartError> {
        let upstream = Upstream::new(&config.upstream, config.server.workers)
            .map_err(StartError::UpstreamClient)?;
        Ok(Self {
            upstream,
            metrics: Arc::new(Metrics::new()),
            limiter: Limiter::new(&config.queue, config.retry.circuit_threshold),
            exhausted: Exhausted::default(),
            retry_budget: RetryBudget::new(
                config.retry.budget_ratio,
                config.retry.budget_min_per_sec,
                RETRY_BUDGET_WINDOW,
            ),
            tokenizers: tokenizers()?,
            body_budget: crate::body_budget::BodyBudget::new(config.server.max_buffered_body_bytes),
            live: RwLock::new(Arc::new(Live::new(config, 0))),
            draining: AtomicBool::new(false),
            drain_started: tokio::sync::watch::channel(false).0,
            connections: AtomicUsize::new(0),
        })
    }

    /// Stops readiness and wakes every request still waiting for admission (see
    /// [`AppState::drained`]).
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drain_started.send_replace(true);
    }

    /// Resolves once the drain has begun (at once if it has).
    pub fn drained(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut receiver = self.drain_started.subscribe();
        async move {
            let _ = receiver.wait_for(|draining| *draining).await;
        }
    }

    /// The configuration in force now.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(
            &self
                .live
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Puts a newly loaded configuration in force: the next request is identified, limited
    /// and retried under it; buckets take their new limits at once, keeping what they have
    /// spent; queued and in-flight requests carry on. Settings that need a restart keep their
    /// running values; their keys are returned.
    ///
    /// Reloads come one at a time from the single watcher task ([`crate::reload::watch`]).
    pub fn reload(&self, mut config: Config) -> Vec<&'static str> {
        let (next, restart_only) = {
            let mut live = self
                .live
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let restart_only = config.keep_restart_only(&live.config);
            let next = Arc::new(Live::new(config, live.generation + 1));
            *live = Arc::clone(&next);
            (next, restart_only)
        };
        // Outside the lock, so arriving requests never wait on the walk over every bucket; a
        // request that read the old configuration cannot undo this (see `generation`).
        self.limiter
            .reconfigure(&next.config.queue, next.generation, |org, model| {
                next.limits_of(org, model)
            });
        restart_only
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not build the upstream HTTP client: {0}")]
    UpstreamClient(crate::upstream::UpstreamError),
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot listen on {0}: {1} (choose another address with --metrics-listen or SLUICE_METRICS_LISTEN)")]
    Bind(std::net::SocketAddr, std::io::Error),
    #[error("could not load the tokenizer tables: {0}")]
    Tokenizers(String),
}

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
    if state.draining.load(Ordering::Relaxed) {
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

/// Every bucket as JSON: limits (configured, learned, in force), sluice's view, the
/// upstream's last headers, the queue, the circuit and the last 429. `sluice status` prints it.
async fn status(State(state): State<Arc<AppState>>) -> Response {
    let mut buckets: Vec<serde_json::Value> = state
        .limiter
        .buckets()
        .iter()
        .map(|queue| bucket_json(queue))
        .collect();
    buckets.sort_by(|a, b| {
        (a["org"].as_str(), a["model"].as_str()).cmp(&(b["org"].as_str(), b["model"].as_str()))
    });
    let now = tokio::time::Instant::now();
    let cooldowns: Vec<serde_json::Value> = state
        .exhausted
        .orgs(now)
        .into_iter()
        .map(|(org, left)| serde_json::json!({"org": &*org, "remaining_secs": left.as_secs_f64()}))
        .collect();
    let body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "upstream": state.live().config.upstream.base_url,
        "draining": state.draining.load(Ordering::Relaxed),
        "quota_cooldowns": cooldowns,
        "buckets": buckets,
    });
    let mut response = body.to_string().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn bucket_json(queue: &crate::queue::BucketQueue) -> serde_json::Value {
    use crate::limiter::bucket::Limits;
    use crate::limiter::gate::Circuit;
    use serde_json::json;
    fn limits(limits: &Limits) -> serde_json::Value {
        json!({"rpm": limits.rpm, "tpm": limits.tpm, "rpd": limits.rpd, "tpd": limits.tpd})
    }
    let status = queue.status();
    let upstream = status.upstream.as_ref().map(|(headers, age)| {
        let mut view = serde_json::Map::new();
        view.insert("age_secs".into(), json!(age.as_secs_f64()));
        for (resource, window) in headers.iter() {
            view.insert(
                resource.label().into(),
                json!({
                    "limit": window.limit,
                    "remaining": window.remaining,
                    "reset_secs": window.reset.map(|reset| reset.as_secs_f64()),
                }),
            );
        }
        serde_json::Value::Object(view)
    });
    json!({
        "org": &*queue.org,
        "model": &*queue.model,
        "limits": {
            "configured": limits(&status.configured),
            "learned": limits(&status.learned),
            "in_force": limits(&status.limits),
        },
        "learning": status.learning,
        "available": {"requests": status.available[0], "tokens": status.available[1]},
        "burst": {"requests": status.burst[0], "tokens": status.burst[1]},
        "circuit": match status.circuit {
            Circuit::Closed => "closed",
            Circuit::Open { .. } => "open",
            Circuit::HalfOpen { .. } => "half_open",
        },
        "paused_for_secs": status.paused_for.map(|wait| wait.as_secs_f64()),
        "queue": {
            "interactive": status.depth.0,
            "batch": status.depth.1,
            "replays": status.replays,
        },
        "upstream": upstream,
        "last_429": status.last_429.map(|(last, age)| json!({
            "reason": last.reason,
            "wait_secs": last.wait.as_secs_f64(),
            "age_secs": age.as_secs_f64(),
        })),
    })
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
