//! The state every request handler shares: the configuration in force ([`Live`]), the
//! upstream client, the limiter, metrics and the process-wide bounds, and the errors that
//! stop sluice from starting.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::body_budget::BodyBudget;
use crate::config::Config;
use crate::estimate::{OutputDefaults, Tokenizers};
use crate::limiter::bucket::Limits;
use crate::limiter::store::Store;
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::org::Orgs;
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
    pub exhausted: Arc<Exhausted>,
    /// Bounds retries of failed requests to a share of the traffic.
    pub retry_budget: RetryBudget,
    pub tokenizers: Arc<Tokenizers>,
    /// Bounds the request bodies read whole at once.
    pub body_budget: BodyBudget,
    draining: AtomicBool,
    /// Woken when the drain begins: queued requests stop waiting for admission.
    drain_started: tokio::sync::watch::Sender<bool>,
    /// Client connections open now, over all workers (see `server.max_connections`).
    pub(crate) connections: AtomicUsize,
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
        let metrics = Arc::new(Metrics::new());
        let store = match &config.shared {
            Some(shared) => {
                Some(Store::new(shared, metrics.registry()).map_err(StartError::SharedStore)?)
            }
            None => None,
        };
        let exhausted = Arc::new(Exhausted::new(store.clone()));
        if let Some(store) = &store {
            let exhausted = Arc::downgrade(&exhausted);
            store.start(move |heard| {
                let Some(exhausted) = exhausted.upgrade() else {
                    return false;
                };
                exhausted.heard(heard);
                true
            });
        }
        Ok(Self {
            upstream,
            metrics,
            limiter: Limiter::new(&config.queue, config.retry.circuit_threshold, store),
            exhausted,
            retry_budget: RetryBudget::new(
                config.retry.budget_ratio,
                config.retry.budget_min_per_sec,
                RETRY_BUDGET_WINDOW,
            ),
            tokenizers: tokenizers()?,
            body_budget: BodyBudget::new(config.server.max_buffered_body_bytes),
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

    /// Whether the drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
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
    #[error("could not set up the shared store: {0}")]
    SharedStore(String),
}
