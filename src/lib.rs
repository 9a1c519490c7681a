//! sluice: a rate-limit-aware reverse proxy for OpenAI-compatible APIs.
//!
//! Every request goes through the same lifecycle (see [`proxy`]):
//! route ([`endpoint`]) -> read the body -> forward ([`upstream`]) -> relay the response
//! unchanged, streaming -> record ([`access`], [`metrics`]).
//!
//! Module map:
//! - [`config`]: the TOML file and overrides, validated into [`config::Config`].
//! - [`reload`]: SIGHUP and file changes put a new configuration in force.
//! - [`server`]: shared state, the router, health and metrics endpoints, graceful drain.
//! - [`proxy`]: the lifecycle, in phase order.
//! - [`endpoint`]: which OpenAI endpoint a path names.
//! - [`upstream`]: the shared HTTP client, header rules, the observed response body.
//! - [`retry`]: the retry policy: classify a failure, its wait hint, backoff, the retry budget.
//! - [`quota`]: orgs out of quota, answered from a cool-down without calling upstream.
//! - [`access`]: the access-log line and request metrics of a finished exchange.
//! - [`metrics`]: the Prometheus registry.
//! - [`status_view`]: the `/status` JSON as the table `sluice status` prints.
//! - [`error`]: the one error enum and its OpenAI-shaped response.

pub mod access;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod estimate;
pub mod limiter;
pub mod metrics;
pub mod org;
pub mod proxy;
pub mod queue;
pub mod quota;
pub mod reload;
pub mod retry;
pub mod server;
pub mod status_view;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;
pub use server::StartError;

/// Runs sluice on `listener` until `shutdown` resolves, then drains and returns. The binary
/// and the integration tests (on port 0) both start the server through this function.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let metrics_listen = config.metrics_listen;
    let source = config.source.clone();
    let upstream = config.upstream.base_url.clone();
    let state = Arc::new(server::AppState::new(config)?);
    let ops = match metrics_listen {
        Some(addr) => {
            let ops_listener = TcpListener::bind(addr)
                .await
                .map_err(|err| StartError::Bind(addr, err))?;
            tracing::info!("metrics and status on http://{addr}/metrics");
            let app = server::ops_app(Arc::clone(&state));
            Some(tokio::spawn(async move {
                if let Err(err) = axum::serve(ops_listener, app).await {
                    tracing::error!(error = %err, "metrics listener failed");
                }
            }))
        }
        None => None,
    };
    // Listening for SIGHUP before announcing the address: a reload signalled right after the
    // start must reload, not end the process (SIGHUP's default).
    let hangup = reload::Hangup::listen();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            upstream = %upstream,
            "sluice listening on http://{addr}"
        );
    }
    let reloader = tokio::spawn(reload::watch(Arc::clone(&state), source, hangup));
    let served = server::serve(listener, state, shutdown).await;
    reloader.abort();
    if let Some(ops) = ops {
        ops.abort();
    }
    served
}
