//! sluice: a rate-limit-aware reverse proxy for OpenAI-compatible APIs.
//!
//! Every request goes through the same phases (see [`proxy`], and `docs/architecture.md` for
//! one request walked through): route ([`endpoint`]) -> identify the org ([`org`]) -> read the
//! body ([`body_budget`]) -> estimate ([`estimate`]) and admit ([`limiter`]) -> exchange with
//! the upstream ([`upstream`], [`retry`]) -> relay the answer unchanged -> settle and record
//! ([`access`], [`metrics`]). What sluice relies on about the upstream is in
//! `docs/upstream.md`.
//!
//! Module map, from the process down:
//! - [`workers`]: the event-loop threads, one socket each.
//! - [`server`]: the router, the operational endpoints, the accept loop, graceful drain.
//! - [`client`]: the client connection, and whether a waiting request's client has left.
//! - [`reload`]: SIGHUP and file changes put a new configuration in force.
//! - [`state`]: what every handler shares, and the configuration in force ([`state::Live`]).
//! - [`proxy`]: the lifecycle, in phase order (route, identify, read; admission; exchange;
//!   relay).
//! - [`limiter`]: admission: the table of buckets, the waiting line, the budget behind it
//!   (the storage seam: level, pause, learned limits), the budget's arithmetic, what the
//!   upstream's headers teach, the gate (pause, circuit, probes), the reservation and its
//!   settlement, and the typed `/status` document.
//! - [`retry`]: the retry policy: classify a failure, its wait hint, backoff, the decision
//!   after a failed attempt, the retry budget.
//! - [`quota`]: orgs out of quota, answered from a cool-down without calling upstream.
//! - [`estimate`]: token estimation per endpoint, with the model's own encoding.
//! - [`org`]: which organization (budget) a request spends from, by key or client token.
//! - [`priority`]: interactive or batch, and values kept per class.
//! - [`resource`]: requests or tokens, what a limit meters, and values kept per resource.
//! - [`upstream`]: the per-worker HTTP clients, header rules, rate-limit headers, usage, the
//!   observed response body.
//! - [`endpoint`]: a request path's canonical spelling, and which OpenAI endpoint it names.
//! - [`body_budget`]: the bound on request-body bytes read whole at once.
//! - [`access`]: the access-log line and request metrics of a finished exchange.
//! - [`metrics`]: the Prometheus registry.
//! - [`config`]: the TOML file and overrides, read and validated into [`config::Config`].
//! - [`error`]: the one error enum and its OpenAI-shaped response.
//! - [`log_writer`]: the log's batched, lossless stderr writer.
//! - [`status_view`]: the `/status` JSON as the table `sluice status` prints.

// What is `pub` is what the binary and the integration tests use; everything else is
// `pub(crate)`, so the compiler sees dead code. The docs are an application's: read them with
// `cargo doc --document-private-items` (`make doc`), where links to private items resolve.
#![warn(unreachable_pub)]
#![allow(rustdoc::private_intra_doc_links)]

pub mod access;
pub(crate) mod body_budget;
pub(crate) mod client;
pub mod config;
pub mod endpoint;
pub(crate) mod error;
pub mod estimate;
pub(crate) mod limiter;
pub mod log_writer;
pub mod metrics;
pub(crate) mod org;
pub(crate) mod priority;
pub(crate) mod proxy;
pub(crate) mod quota;
pub(crate) mod reload;
pub(crate) mod resource;
pub mod retry;
pub mod server;
pub mod state;
pub mod status_view;
pub mod upstream;
pub mod workers;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;
pub use state::StartError;

/// Runs sluice on `listener` until `shutdown` resolves, then drains and returns. The
/// integration tests (on port 0) start the server through this function; the binary through
/// [`run_workers`], which adds event-loop threads around the same server.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<server::Drain, StartError> {
    run_workers(listener, Vec::new(), config, shutdown).await
}

/// Runs sluice on `listener` in the calling task, and on each of `more` (sockets bound to
/// the same address, see [`workers::bind`]) in a thread of its own with a single-threaded
/// runtime, all sharing one state. When `shutdown` resolves every worker stops accepting and
/// drains; this returns once all have.
pub async fn run_workers(
    listener: TcpListener,
    more: Vec<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<server::Drain, StartError> {
    let metrics_listen = config.metrics_listen;
    let source = config.source.clone();
    let upstream = config.upstream.base_url.clone();
    let state = Arc::new(state::AppState::new(config)?);
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
    let stop = workers::Stop::new();
    let mut started = Vec::with_capacity(more.len());
    for (index, listener) in more.into_iter().enumerate() {
        started.push(workers::spawn(
            index + 1,
            listener,
            Arc::clone(&state),
            stop.clone(),
        )?);
    }
    // Listening for SIGHUP before announcing the address: a reload signalled right after the
    // start must reload, not end the process (SIGHUP's default).
    let hangup = reload::Hangup::listen();
    let watched = reload::Watched::now(&state);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            upstream = %upstream,
            workers = started.len() + 1,
            "sluice listening on http://{addr}"
        );
    }
    let reloader = tokio::spawn(reload::watch(Arc::clone(&state), source, watched, hangup));
    let served = server::serve(listener, state, {
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.stop();
        }
    })
    .await;
    // However this worker ended, the others end too.
    stop.stop();
    let mut result = served;
    for worker in started {
        let ended = worker.join().await;
        result = match (result, ended) {
            (Ok(a), Ok(b)) => Ok(a.and(b)),
            (Err(err), _) | (_, Err(err)) => Err(err),
        };
    }
    reloader.abort();
    if let Some(ops) = ops {
        ops.abort();
    }
    result
}
