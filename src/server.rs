//! The HTTP server: shared state, the router, the operational endpoints, and graceful drain.

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use http::{header, HeaderValue};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::error::ProxyError;
use crate::estimate::{OutputDefaults, Tokenizers};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::org::Orgs;
use crate::proxy;
use crate::quota::Exhausted;
use crate::retry::RetryBudget;
use crate::upstream::Upstream;

/// The window over which requests earn the right to retries.
const RETRY_BUDGET_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Everything a request handler needs, shared behind one `Arc`.
pub struct AppState {
    pub config: Config,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub orgs: Orgs,
    pub limiter: Limiter,
    /// Orgs in quota cool-down.
    pub exhausted: Exhausted,
    /// Bounds retries of failed requests to a share of the traffic.
    pub retry_budget: RetryBudget,
    pub tokenizers: Arc<Tokenizers>,
    pub output_defaults: OutputDefaults,
    draining: AtomicBool,
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
        let upstream = Upstream::new(&config.upstream).map_err(StartError::UpstreamClient)?;
        let output_defaults = OutputDefaults::new(
            config.estimate.output_tokens_by_model.clone(),
            config.estimate.default_output_tokens,
        );
        Ok(Self {
            upstream,
            metrics: Arc::new(Metrics::new()),
            orgs: Orgs::new(&config.orgs),
            limiter: Limiter::new(&config.queue, config.retry.circuit_threshold),
            exhausted: Exhausted::default(),
            retry_budget: RetryBudget::new(
                config.retry.budget_ratio,
                config.retry.budget_min_per_sec,
                RETRY_BUDGET_WINDOW,
            ),
            tokenizers: tokenizers()?,
            output_defaults,
            config,
            draining: AtomicBool::new(false),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not build the upstream HTTP client: {0}")]
    UpstreamClient(reqwest::Error),
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error("could not load the tokenizer tables: {0}")]
    Tokenizers(String),
}

/// The router: operational endpoints, and everything else through the proxy.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(proxy::proxy)
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

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests and
/// streams finish for up to the configured drain timeout, and returns.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let drain_timeout = state.config.server.drain_timeout;
    let (drain_started, drain_signal) = tokio::sync::oneshot::channel::<()>();
    let draining_state = Arc::clone(&state);
    // Small writes (SSE events, short JSON answers) must leave at once, not wait on Nagle's
    // algorithm for the client's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        shutdown.await;
        draining_state.draining.store(true, Ordering::Relaxed);
        tracing::info!(
            drain_timeout_secs = drain_timeout.as_secs_f64(),
            "shutdown requested: no new connections; draining in-flight requests"
        );
        let _ = drain_started.send(());
    });
    let deadline = async move {
        if drain_signal.await.is_ok() {
            tokio::time::sleep(drain_timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server.into_future() => {
            result.map_err(StartError::Serve)?;
            tracing::info!("drained; shutting down");
        }
        () = deadline => {
            tracing::warn!("drain timeout elapsed with requests still in flight; closing them");
        }
    }
    Ok(())
}
