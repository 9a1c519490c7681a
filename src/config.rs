//! Configuration: a TOML file parsed raw (every key optional, unknown keys rejected), merged
//! with command-line and environment overrides, then validated once into a [`Config`] whose
//! fields cannot be wrong. Precedence: flags, then environment (both resolved by clap before
//! they reach [`Overrides`]), then the file, then the defaults below.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::limiter::bucket::Limits;
use crate::priority::Priority;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";
pub const DEFAULT_UPSTREAM: &str = "https://api.openai.com";
const DEFAULT_CONNECT_TIMEOUT_SECS: f64 = 5.0;
/// The official SDKs wait 600 s by default; a shorter idle timeout here would cut off slow
/// reasoning-model answers the client is still willing to wait for.
const DEFAULT_READ_TIMEOUT_SECS: f64 = 600.0;
const DEFAULT_POOL_IDLE_TIMEOUT_SECS: f64 = 90.0;
/// An hour: far beyond the longest generation a client waits for (the SDKs' own timeout is
/// 600 s between reads), short enough that a dripping upstream cannot hold a connection for
/// a day.
const DEFAULT_TOTAL_TIMEOUT_SECS: f64 = 3600.0;
/// 32 MiB: well above the largest chat request the API accepts with inline images.
const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
const DEFAULT_DRAIN_TIMEOUT_SECS: f64 = 30.0;
/// Twice what a slow mobile link needs for a request's headers, and four times the SDKs' own
/// idle keep-alive expiry (httpx 5 s), so a pooled connection is the client's to close: a
/// server closing first races the client's next request on it.
const DEFAULT_HEADER_READ_TIMEOUT_SECS: f64 = 20.0;
const DEFAULT_BODY_READ_TIMEOUT_SECS: f64 = 20.0;
/// Far above a sidecar's traffic, below the open-files limit sluice raises itself to (and
/// each request also holds an upstream connection).
const DEFAULT_MAX_CONNECTIONS: u64 = 16_384;
/// HTTP/2's recommended minimum; each stream may hold an upstream connection.
const DEFAULT_HTTP2_MAX_STREAMS: u32 = 100;
/// 256 MiB: eight bodies of the largest default size at once. Bodies beyond it wait (briefly)
/// for room instead of growing the process past what a sidecar's memory limit allows.
const DEFAULT_MAX_BUFFERED_BODY_BYTES: u64 = 256 * 1024 * 1024;
/// How often the config file (and the key files it names) is checked for changes. Reading a
/// few small files every two seconds costs nothing, and an edit or a Kubernetes ConfigMap
/// update takes effect before anyone wonders whether it did.
const DEFAULT_CONFIG_WATCH_SECS: f64 = 2.0;
const MAX_WORKERS: u64 = 1024;

/// One event loop per core the process may run on.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
const DEFAULT_MAX_WAIT_SECS: f64 = 60.0;
const DEFAULT_MAX_DEPTH: usize = 10_000;
const DEFAULT_MAX_DEPTH_PER_BUCKET: usize = 2_000;
/// Made-up keys and model names create buckets; 10,000 is far more (org, model) pairs than
/// a deployment configures or learns.
const DEFAULT_MAX_BUCKETS: usize = 10_000;
const DEFAULT_INTERACTIVE_RESERVE: f64 = 0.2;
/// The SDKs give up after their own timeout; a request admitted just before that moment would
/// spend budget on an answer nobody reads, so sluice stops queueing a little earlier.
const DEFAULT_CLIENT_TIMEOUT_MARGIN_SECS: f64 = 2.0;
/// Reserved for output when a request sets no cap. Undocumented upstream; trued up to the
/// actual completion once the response reports usage.
const DEFAULT_OUTPUT_TOKENS: u64 = 1024;
/// A request reaches the upstream tens of milliseconds after admission; a quarter second of
/// refill in hand covers that with room to spare for a slow network.
const DEFAULT_REFILL_MARGIN_SECS: f64 = 0.25;
/// A limit learned from one broken header refuses a bucket's large requests for at most a
/// minute; a real one costs one refused request a minute.
const DEFAULT_RELEARN_INTERVAL_SECS: f64 = 60.0;
/// Upstream attempts per request, the first included: enough to ride out a pause or two and a
/// transient 5xx, few enough that a request does not bounce for minutes.
const DEFAULT_MAX_ATTEMPTS: u32 = 5;
const DEFAULT_CIRCUIT_THRESHOLD: u32 = 3;
/// At most a fifth of the traffic may be retries of failures (tower's default share).
const DEFAULT_RETRY_BUDGET_RATIO: f64 = 0.2;
const DEFAULT_RETRY_BUDGET_MIN_PER_SEC: u32 = 5;
/// The official SDKs' own backoff: 0.5 s doubling up to 8 s.
const DEFAULT_BACKOFF_BASE_SECS: f64 = 0.5;
const DEFAULT_BACKOFF_MAX_SECS: f64 = 8.0;
/// Quota errors do not clear by themselves; a minute spares the upstream a call per request
/// while someone fixes billing, and a fixed org is back soon after.
const DEFAULT_QUOTA_COOLDOWN_SECS: f64 = 60.0;

/// The validated configuration sluice runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// A separate address for `/metrics`, `/status` and the health endpoints, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Some org holds client tokens: every proxied request must bear one (401 otherwise).
    pub require_client_tokens: bool,
    pub log_format: LogFormat,
    pub upstream: UpstreamConfig,
    pub server: ServerConfig,
    pub queue: QueueConfig,
    pub retry: RetryConfig,
    pub estimate: EstimateConfig,
    pub orgs: Vec<OrgConfig>,
    /// Where the configuration came from, to reload it; `None` without a config file.
    pub source: Option<ConfigSource>,
}

/// A config file and the overrides applied on top of it: what a reload reads again.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub overrides: Overrides,
}

/// What sluice does with the upstream's 429s and failures.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    /// Upstream attempts per request, the first included (429 re-sends and 5xx retries).
    pub max_attempts: u32,
    /// Consecutive 429s on a bucket that open its circuit.
    pub circuit_threshold: u32,
    /// Share of requests (0..=1) that may be retried after a 5xx or a connection failure.
    pub budget_ratio: f64,
    /// Retries per second allowed whatever the traffic.
    pub budget_min_per_sec: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long an org that hit a quota error is answered with it without calling upstream.
    pub quota_cooldown: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamConfig {
    /// Origin plus optional path prefix, without a trailing slash; the request's own
    /// `/v1/...` path and query are appended to it.
    pub base_url: String,
    pub connect_timeout: Duration,
    /// Longest silence between two reads of an upstream response (an idle timeout, so a
    /// long stream that keeps sending is never cut).
    pub read_timeout: Duration,
    /// Longest a whole response may take, head to last byte: a body that keeps dripping a
    /// byte before each read timeout would otherwise hold its connection and reservation
    /// forever.
    pub total_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub accounting: Accounting,
    /// Learn the limits of buckets with none configured from the upstream's headers (and
    /// send their first request alone to do so).
    pub learn_limits: bool,
}

/// How the upstream counts a request against its token limit, and so what sluice settles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accounting {
    /// OpenAI: the output cap stays charged whatever is generated; actual usage only
    /// corrects the prompt estimate.
    #[default]
    Reserved,
    /// Providers that count real usage: unused output is refunded.
    Actual,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// Longest a request waits for admission, whatever the client allows.
    pub max_wait: Duration,
    /// Requests waiting across all buckets.
    pub max_depth: usize,
    pub max_depth_per_bucket: usize,
    /// Share (0..=0.9) of each bucket that batch requests leave for interactive ones.
    pub interactive_reserve: f64,
    /// Subtracted from the client's own timeout (x-stainless-read-timeout) to get its deadline.
    pub client_timeout_margin: Duration,
    /// Refill each bucket leaves unused, covering the moment between sluice's admission and
    /// the upstream's own charge.
    pub refill_margin: Duration,
    /// How long a learned limit goes unconfirmed before a request larger than it (that the
    /// configuration allows) is sent anyway, to learn whether it still holds.
    pub relearn_interval: Duration,
    /// Buckets kept before idle learned ones are evicted (see [`crate::limiter::Limiter`]).
    pub max_buckets: usize,
}

#[derive(Clone, Debug)]
pub struct EstimateConfig {
    /// Output tokens reserved when a request gives no cap.
    pub default_output_tokens: u64,
    /// Per-model overrides of `default_output_tokens` (exact name or prefix).
    pub output_tokens_by_model: HashMap<String, u64>,
}

/// An organization: a budget shared by everyone who spends from it.
#[derive(Clone, Debug)]
pub struct OrgConfig {
    /// Used in metrics and logs.
    pub name: String,
    /// `OpenAI-Organization` header values that identify this org.
    pub organization_ids: Vec<String>,
    /// SHA-256 of each API key that identifies this org, with the key's default priority.
    pub key_hashes: Vec<([u8; 32], Priority)>,
    pub default_priority: Priority,
    /// Limits by model; `"*"` applies to every other model.
    pub limits: HashMap<String, Limits>,
    /// The provider key sluice sends for requests bearing one of `client_token_hashes`.
    pub upstream_key: Option<UpstreamKey>,
    /// SHA-256 of the client tokens applications use instead of the provider key.
    pub client_token_hashes: Vec<[u8; 32]>,
    /// The file `upstream_key` was read from: watched, so replacing it rotates the key.
    pub upstream_key_file: Option<PathBuf>,
}

/// A provider key held by sluice. Its `Debug` never shows it.
#[derive(Clone)]
pub struct UpstreamKey(pub http::HeaderValue);

impl fmt::Debug for UpstreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UpstreamKey(<redacted>)")
    }
}

impl OrgConfig {
    /// The limits for a model: its own entry, else `"*"`, else none.
    pub fn limits_for(&self, model: &str) -> Option<Limits> {
        self.limits
            .get(model)
            .or_else(|| self.limits.get("*"))
            .copied()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    /// Largest JSON body read whole (estimated endpoints); other bodies stream unbounded.
    pub max_body_bytes: usize,
    /// The most bytes of request bodies read whole at once, over every request of the process
    /// (at least `max_body_bytes`). A body that does not fit waits briefly, then gets a 503.
    pub max_buffered_body_bytes: usize,
    /// How long in-flight requests may run on after a shutdown signal.
    pub drain_timeout: Duration,
    /// How often the config file and its key files are checked for changes; `None`: only
    /// SIGHUP reloads.
    pub config_watch: Option<Duration>,
    /// Event-loop threads, each serving the connections it accepts from its own socket.
    pub workers: usize,
    /// HTTP/1: the longest a client may take to send a request's headers, counted from the
    /// moment the connection waits for a request, so it is also the idle keep-alive timeout.
    pub header_read_timeout: Duration,
    /// The longest gap between two pieces of a body read whole; the whole body must also
    /// arrive at [`MIN_BODY_RATE`] bytes a second past this grace.
    pub body_read_timeout: Duration,
    /// Client connections open at once, over all workers; beyond it new ones are closed at
    /// once (counted and logged).
    pub max_connections: usize,
    /// Requests one HTTP/2 connection may have in flight at once.
    pub http2_max_concurrent_streams: u32,
}

/// The slowest average rate a body read whole may arrive at, past `body_read_timeout`: 64 KiB
/// a second takes a 32 MiB body in about 8 minutes, and cuts a body dripped a byte a second.
pub const MIN_BODY_RATE: u64 = 64 * 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Values from flags or the environment, which win over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub allow_unauthenticated: Option<bool>,
    pub metrics_listen: Option<String>,
    pub upstream: Option<String>,
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    metrics_listen: Option<String>,
    allow_unauthenticated: Option<bool>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    queue: RawQueue,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    estimate: RawEstimate,
    #[serde(default)]
    org: Vec<RawOrg>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    max_wait_secs: Option<f64>,
    max_depth: Option<usize>,
    max_depth_per_bucket: Option<usize>,
    interactive_reserve: Option<f64>,
    client_timeout_margin_secs: Option<f64>,
    refill_margin_secs: Option<f64>,
    relearn_interval_secs: Option<f64>,
    max_buckets: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    circuit_breaker_threshold: Option<u32>,
    budget_ratio: Option<f64>,
    budget_min_per_sec: Option<u32>,
    backoff_base_secs: Option<f64>,
    backoff_max_secs: Option<f64>,
    quota_cooldown_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEstimate {
    default_output_tokens: Option<u64>,
    #[serde(default)]
    output_tokens_by_model: HashMap<String, u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrg {
    name: String,
    #[serde(default)]
    organization_ids: Vec<String>,
    #[serde(default)]
    keys: Vec<RawKey>,
    keys_env: Option<String>,
    #[serde(default)]
    key_sha256: Vec<RawKeyHash>,
    default_priority: Option<Priority>,
    #[serde(default)]
    limits: BTreeMap<String, RawLimits>,
    upstream_key_env: Option<String>,
    upstream_key_file: Option<PathBuf>,
    client_tokens_env: Option<String>,
}

/// `"sk-..."` or `{ key = "sk-...", priority = "batch" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawKey {
    Plain(String),
    WithPriority { key: String, priority: Priority },
}

/// `"<64 hex digits>"` or `{ sha256 = "...", priority = "batch" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawKeyHash {
    Plain(String),
    WithPriority { sha256: String, priority: Priority },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    rpm: Option<u64>,
    tpm: Option<u64>,
    rpd: Option<u64>,
    tpd: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    connect_timeout_secs: Option<f64>,
    read_timeout_secs: Option<f64>,
    pool_idle_timeout_secs: Option<f64>,
    total_timeout_secs: Option<f64>,
    accounting: Option<Accounting>,
    learn_limits: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    max_body_bytes: Option<u64>,
    max_buffered_body_bytes: Option<u64>,
    drain_timeout_secs: Option<f64>,
    config_watch_secs: Option<f64>,
    workers: Option<u64>,
    header_read_timeout_secs: Option<f64>,
    body_read_timeout_secs: Option<f64>,
    max_connections: Option<u64>,
    http2_max_concurrent_streams: Option<u32>,
}

/// One problem with the configuration, named by the key path it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Everything wrong with a configuration, so one `check-config` run shows all of it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({}):", self.source_name)?;
        for issue in &self.issues {
            write!(f, "\n  - {issue}")?;
        }
        Ok(())
    }
}

impl Config {
    /// The configuration with no file: defaults plus overrides.
    pub fn from_overrides(overrides: &Overrides) -> Result<Self, ConfigError> {
        validate(RawConfig::default(), overrides, "defaults")
    }

    /// Reads and validates a TOML file, then applies the overrides.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            source_name: source_name.clone(),
            issues: vec![ConfigIssue {
                key: "(file)".to_owned(),
                message: format!("cannot read the file: {err}"),
            }],
        })?;
        let mut config = Self::parse(&text, &source_name, overrides)?;
        config.source = Some(ConfigSource {
            path: path.to_owned(),
            overrides: overrides.clone(),
        });
        Ok(config)
    }

    /// The files a reload would read: the config file and the key files it names.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.source.iter().map(|s| s.path.clone()).collect();
        files.extend(
            self.orgs
                .iter()
                .filter_map(|org| org.upstream_key_file.clone()),
        );
        files
    }

    /// Gives this (newly loaded) configuration the running one's values of the settings a
    /// reload cannot change, and names those that differed: they take effect on restart.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! keep {
            ($($field:ident).+, $key:literal) => {
                if self.$($field).+ != running.$($field).+ {
                    changed.push($key);
                    self.$($field).+ = running.$($field).+.clone();
                }
            };
        }
        keep!(listen, "listen");
        keep!(metrics_listen, "metrics_listen");
        keep!(log_format, "log_format");
        keep!(server.workers, "server.workers");
        keep!(
            server.header_read_timeout,
            "server.header_read_timeout_secs"
        );
        keep!(server.max_connections, "server.max_connections");
        keep!(
            server.http2_max_concurrent_streams,
            "server.http2_max_concurrent_streams"
        );
        keep!(
            server.max_buffered_body_bytes,
            "server.max_buffered_body_bytes"
        );
        keep!(upstream.base_url, "upstream.url");
        keep!(upstream.connect_timeout, "upstream.connect_timeout_secs");
        keep!(upstream.read_timeout, "upstream.read_timeout_secs");
        keep!(upstream.total_timeout, "upstream.total_timeout_secs");
        keep!(
            upstream.pool_idle_timeout,
            "upstream.pool_idle_timeout_secs"
        );
        keep!(queue.refill_margin, "queue.refill_margin_secs");
        keep!(queue.relearn_interval, "queue.relearn_interval_secs");
        keep!(retry.circuit_threshold, "retry.circuit_breaker_threshold");
        keep!(retry.budget_ratio, "retry.budget_ratio");
        keep!(retry.budget_min_per_sec, "retry.budget_min_per_sec");
        changed
    }

    /// Parses TOML text; `source_name` names it in errors.
    pub fn parse(
        text: &str,
        source_name: &str,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let raw = parse_raw(text).map_err(|issue| ConfigError {
            source_name: source_name.to_owned(),
            issues: vec![issue],
        })?;
        validate(raw, overrides, source_name)
    }
}

fn parse_raw(text: &str) -> Result<RawConfig, ConfigIssue> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        // toml's message carries a source snippet over several lines; the first line plus
        // the key path is what a reader needs.
        let message = inner
            .message()
            .lines()
            .next()
            .unwrap_or("invalid TOML")
            .to_owned();
        let location = inner
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].lines().count().max(1);
                format!(" (line {line})")
            })
            .unwrap_or_default();
        ConfigIssue {
            key: if path == "." {
                "(top level)".to_owned()
            } else {
                path
            },
            message: format!("{message}{location}"),
        }
    })
}

fn validate(
    raw: RawConfig,
    overrides: &Overrides,
    source_name: &str,
) -> Result<Config, ConfigError> {
    let mut issues = Issues::default();

    let (listen_text, listen_key) = match &overrides.listen {
        Some(value) => (value.as_str(), "listen (from --listen / SLUICE_LISTEN)"),
        None => (raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN), "listen"),
    };
    let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|err| {
        issues.add(
            listen_key,
            format!(
                "{listen_text:?} is not an IP:port address ({err}); for example \"127.0.0.1:8787\""
            ),
        );
        SocketAddr::from(([127, 0, 0, 1], 8787))
    });

    let (metrics_text, metrics_key) = match &overrides.metrics_listen {
        Some(value) => (
            Some(value.as_str()),
            "metrics_listen (from --metrics-listen / SLUICE_METRICS_LISTEN)",
        ),
        None => (raw.metrics_listen.as_deref(), "metrics_listen"),
    };
    let metrics_listen = metrics_text.and_then(|text| match text.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(err) => {
            issues.add(
                metrics_key,
                format!("{text:?} is not an IP:port address ({err}); for example \"0.0.0.0:9090\""),
            );
            None
        }
    });

    let (url_text, url_key) = match &overrides.upstream {
        Some(value) => (
            value.as_str(),
            "upstream.url (from --upstream / SLUICE_UPSTREAM)",
        ),
        None => (
            raw.upstream.url.as_deref().unwrap_or(DEFAULT_UPSTREAM),
            "upstream.url",
        ),
    };
    let base_url = match validate_upstream_url(url_text) {
        Ok(url) => url,
        Err(message) => {
            issues.add(url_key, message);
            String::new()
        }
    };

    let connect_timeout = seconds(
        &mut issues,
        "upstream.connect_timeout_secs",
        raw.upstream.connect_timeout_secs,
        DEFAULT_CONNECT_TIMEOUT_SECS,
    );
    let read_timeout = seconds(
        &mut issues,
        "upstream.read_timeout_secs",
        raw.upstream.read_timeout_secs,
        DEFAULT_READ_TIMEOUT_SECS,
    );
    let total_timeout = seconds(
        &mut issues,
        "upstream.total_timeout_secs",
        raw.upstream.total_timeout_secs,
        DEFAULT_TOTAL_TIMEOUT_SECS,
    );
    let pool_idle_timeout = seconds(
        &mut issues,
        "upstream.pool_idle_timeout_secs",
        raw.upstream.pool_idle_timeout_secs,
        DEFAULT_POOL_IDLE_TIMEOUT_SECS,
    );
    let drain_timeout = seconds(
        &mut issues,
        "server.drain_timeout_secs",
        raw.server.drain_timeout_secs,
        DEFAULT_DRAIN_TIMEOUT_SECS,
    );
    // 0 turns watching off (SIGHUP still reloads).
    let config_watch = match raw.server.config_watch_secs {
        Some(0.0) => None,
        secs => Some(seconds(
            &mut issues,
            "server.config_watch_secs",
            secs,
            DEFAULT_CONFIG_WATCH_SECS,
        )),
    };

    // 0 (the default): one per core.
    let workers = match raw.server.workers.unwrap_or(0) {
        0 => default_workers(),
        n @ 1..=MAX_WORKERS => n as usize,
        n => {
            issues.add(
                "server.workers",
                format!("{n} is out of range: use 1 to {MAX_WORKERS}, or 0 for one per core"),
            );
            1
        }
    };

    let header_read_timeout = seconds(
        &mut issues,
        "server.header_read_timeout_secs",
        raw.server.header_read_timeout_secs,
        DEFAULT_HEADER_READ_TIMEOUT_SECS,
    );
    let body_read_timeout = seconds(
        &mut issues,
        "server.body_read_timeout_secs",
        raw.server.body_read_timeout_secs,
        DEFAULT_BODY_READ_TIMEOUT_SECS,
    );
    let max_connections = match raw
        .server
        .max_connections
        .unwrap_or(DEFAULT_MAX_CONNECTIONS)
    {
        n @ 1..=1_000_000 => n as usize,
        n => {
            issues.add(
                "server.max_connections",
                format!("{n} is out of range: use 1 to 1000000"),
            );
            1
        }
    };
    let http2_max_concurrent_streams = match raw
        .server
        .http2_max_concurrent_streams
        .unwrap_or(DEFAULT_HTTP2_MAX_STREAMS)
    {
        n @ 1..=10_000 => n,
        n => {
            issues.add(
                "server.http2_max_concurrent_streams",
                format!("{n} is out of range: use 1 to 10000"),
            );
            1
        }
    };
    let max_body = raw.server.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    let max_body_bytes = match usize::try_from(max_body) {
        Ok(n) if n >= 1024 => n,
        _ => {
            issues.add(
                "server.max_body_bytes",
                format!("{max_body} is out of range: use at least 1024 bytes"),
            );
            0
        }
    };
    let buffered = raw
        .server
        .max_buffered_body_bytes
        .unwrap_or(DEFAULT_MAX_BUFFERED_BODY_BYTES.max(max_body_bytes as u64));
    let max_buffered_body_bytes = match usize::try_from(buffered) {
        Ok(n) if n >= max_body_bytes => n,
        _ => {
            issues.add(
                "server.max_buffered_body_bytes",
                format!(
                    "{buffered} is out of range: use at least server.max_body_bytes \
                     ({max_body_bytes}), or one body of the largest size could never be read"
                ),
            );
            0
        }
    };

    let max_wait = seconds(
        &mut issues,
        "queue.max_wait_secs",
        raw.queue.max_wait_secs,
        DEFAULT_MAX_WAIT_SECS,
    );
    let client_timeout_margin = seconds(
        &mut issues,
        "queue.client_timeout_margin_secs",
        raw.queue.client_timeout_margin_secs,
        DEFAULT_CLIENT_TIMEOUT_MARGIN_SECS,
    );
    // Zero is allowed here: it means "trust the bucket exactly".
    let refill_margin = if raw.queue.refill_margin_secs == Some(0.0) {
        Duration::ZERO
    } else {
        seconds(
            &mut issues,
            "queue.refill_margin_secs",
            raw.queue.refill_margin_secs,
            DEFAULT_REFILL_MARGIN_SECS,
        )
    };
    let relearn_interval = seconds(
        &mut issues,
        "queue.relearn_interval_secs",
        raw.queue.relearn_interval_secs,
        DEFAULT_RELEARN_INTERVAL_SECS,
    );
    let interactive_reserve = raw
        .queue
        .interactive_reserve
        .unwrap_or(DEFAULT_INTERACTIVE_RESERVE);
    if !(0.0..=0.9).contains(&interactive_reserve) {
        issues.add(
            "queue.interactive_reserve",
            format!("{interactive_reserve} is not a share between 0 and 0.9"),
        );
    }
    let max_depth = raw.queue.max_depth.unwrap_or(DEFAULT_MAX_DEPTH);
    let max_depth_per_bucket = raw
        .queue
        .max_depth_per_bucket
        .unwrap_or(DEFAULT_MAX_DEPTH_PER_BUCKET);
    for (key, value) in [
        ("queue.max_depth", max_depth),
        ("queue.max_depth_per_bucket", max_depth_per_bucket),
    ] {
        if value == 0 || value > 1_000_000 {
            issues.add(key, format!("{value} is out of range: use 1 to 1000000"));
        }
    }

    let max_buckets = raw.queue.max_buckets.unwrap_or(DEFAULT_MAX_BUCKETS);
    if max_buckets == 0 || max_buckets > 10_000_000 {
        issues.add(
            "queue.max_buckets",
            format!("{max_buckets} is out of range: use 1 to 10000000"),
        );
    }

    let default_output_tokens = raw
        .estimate
        .default_output_tokens
        .unwrap_or(DEFAULT_OUTPUT_TOKENS);
    for (model, tokens) in &raw.estimate.output_tokens_by_model {
        if *tokens > 10_000_000 {
            issues.add(
                &format!("estimate.output_tokens_by_model.{model}"),
                format!("{tokens} is out of range"),
            );
        }
    }

    let retry = validate_retry(&raw.retry, &mut issues);
    let orgs = validate_orgs(raw.org, &mut issues);
    let require_client_tokens = orgs.iter().any(|org| !org.client_token_hashes.is_empty());
    let allow_unauthenticated = overrides
        .allow_unauthenticated
        .or(raw.allow_unauthenticated)
        .unwrap_or(false);
    if !is_loopback(listen.ip()) && !require_client_tokens && !allow_unauthenticated {
        issues.add(
            listen_key,
            format!(
                "{listen} is reachable beyond this machine, and nothing authenticates the clients \
                 that could spend your organizations' budgets through it. Give an org \
                 client_tokens_env (with upstream_key_env or upstream_key_file) so applications \
                 use tokens instead of the provider key, or set allow_unauthenticated = true \
                 (SLUICE_ALLOW_UNAUTHENTICATED=true) if the network in front of sluice is trusted"
            ),
        );
    }

    if !issues.0.is_empty() {
        return Err(ConfigError {
            source_name: source_name.to_owned(),
            issues: issues.0,
        });
    }
    Ok(Config {
        listen,
        metrics_listen,
        require_client_tokens,
        log_format: overrides.log_format.or(raw.log_format).unwrap_or_default(),
        upstream: UpstreamConfig {
            base_url,
            connect_timeout,
            read_timeout,
            total_timeout,
            pool_idle_timeout,
            accounting: raw.upstream.accounting.unwrap_or_default(),
            learn_limits: raw.upstream.learn_limits.unwrap_or(true),
        },
        server: ServerConfig {
            max_body_bytes,
            max_buffered_body_bytes,
            drain_timeout,
            config_watch,
            workers,
            header_read_timeout,
            body_read_timeout,
            max_connections,
            http2_max_concurrent_streams,
        },
        queue: QueueConfig {
            max_wait,
            max_depth,
            max_depth_per_bucket,
            interactive_reserve,
            client_timeout_margin,
            refill_margin,
            relearn_interval,
            max_buckets,
        },
        retry,
        estimate: EstimateConfig {
            default_output_tokens,
            output_tokens_by_model: raw.estimate.output_tokens_by_model,
        },
        orgs,
        source: None,
    })
}

fn validate_retry(raw: &RawRetry, issues: &mut Issues) -> RetryConfig {
    let max_attempts = raw.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if !(1..=20).contains(&max_attempts) {
        issues.add(
            "retry.max_attempts",
            format!("{max_attempts} is out of range: use 1 (never retry) to 20"),
        );
    }
    let circuit_threshold = raw
        .circuit_breaker_threshold
        .unwrap_or(DEFAULT_CIRCUIT_THRESHOLD);
    if !(1..=1000).contains(&circuit_threshold) {
        issues.add(
            "retry.circuit_breaker_threshold",
            format!("{circuit_threshold} is out of range: use 1 to 1000"),
        );
    }
    let budget_ratio = raw.budget_ratio.unwrap_or(DEFAULT_RETRY_BUDGET_RATIO);
    if !(0.0..=1.0).contains(&budget_ratio) {
        issues.add(
            "retry.budget_ratio",
            format!("{budget_ratio} is not a share between 0 and 1"),
        );
    }
    let backoff_base = seconds(
        issues,
        "retry.backoff_base_secs",
        raw.backoff_base_secs,
        DEFAULT_BACKOFF_BASE_SECS,
    );
    let backoff_max = seconds(
        issues,
        "retry.backoff_max_secs",
        raw.backoff_max_secs,
        DEFAULT_BACKOFF_MAX_SECS,
    );
    let quota_cooldown = seconds(
        issues,
        "retry.quota_cooldown_secs",
        raw.quota_cooldown_secs,
        DEFAULT_QUOTA_COOLDOWN_SECS,
    );
    RetryConfig {
        max_attempts: max_attempts.clamp(1, 20),
        circuit_threshold: circuit_threshold.max(1),
        budget_ratio,
        budget_min_per_sec: raw
            .budget_min_per_sec
            .unwrap_or(DEFAULT_RETRY_BUDGET_MIN_PER_SEC),
        backoff_base,
        backoff_max: backoff_max.max(backoff_base),
        quota_cooldown,
    }
}

/// Problems found so far; validation goes on after one, so all are reported together.
#[derive(Default)]
struct Issues(Vec<ConfigIssue>);

impl Issues {
    fn add(&mut self, key: &str, message: String) {
        self.0.push(ConfigIssue {
            key: key.to_owned(),
            message,
        });
    }
}

/// A number of seconds, checked: the upper bound keeps `Duration::from_secs_f64` from
/// panicking and catches unit slips (milliseconds given as seconds).
fn seconds(issues: &mut Issues, key: &str, value: Option<f64>, default: f64) -> Duration {
    let value = value.unwrap_or(default);
    if !(value.is_finite() && value > 0.0 && value <= 86_400.0) {
        issues.add(
            key,
            format!("{value} is not a number of seconds between 0 (exclusive) and 86400"),
        );
        return Duration::from_secs_f64(default);
    }
    Duration::from_secs_f64(value)
}

/// Loopback, IPv4-mapped IPv6 loopback (`[::ffff:127.0.0.1]`) included.
pub fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

/// Org names label metrics: short, plain, and never in the automatic `key-` namespace.
fn valid_org_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with("key-")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn validate_orgs(raw: Vec<RawOrg>, issues: &mut Issues) -> Vec<OrgConfig> {
    let mut names = HashSet::new();
    let mut key_owner: HashMap<[u8; 32], String> = HashMap::new();
    let mut org_id_owner: HashMap<String, String> = HashMap::new();
    let mut orgs = Vec::with_capacity(raw.len());
    for (index, org) in raw.into_iter().enumerate() {
        let at = format!("org[{index}]");
        if !valid_org_name(&org.name) {
            issues.add(
                &format!("{at}.name"),
                format!(
                    "{:?} is not a valid org name: use 1-64 letters, digits, '-', '_' or '.', \
                     not starting with \"key-\" (reserved for automatic orgs)",
                    org.name
                ),
            );
        } else if !names.insert(org.name.clone()) {
            issues.add(
                &format!("{at}.name"),
                format!("{:?} is used by another org", org.name),
            );
        }
        let default_priority = org.default_priority.unwrap_or_default();

        for id in &org.organization_ids {
            if id.trim().is_empty() {
                issues.add(
                    &format!("{at}.organization_ids"),
                    "an entry is empty".to_owned(),
                );
            } else if let Some(owner) = org_id_owner.insert(id.clone(), org.name.clone()) {
                issues.add(
                    &format!("{at}.organization_ids"),
                    format!("{id:?} is also listed by org {owner:?}"),
                );
            }
        }

        let mut key_hashes = Vec::new();
        let mut add_key = |key: &str, priority: Priority, key_path: &str, issues: &mut Issues| {
            let key = key.trim();
            if key.is_empty() {
                issues.add(key_path, "an API key is empty".to_owned());
                return;
            }
            let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            key_hashes.push((hash, priority));
            // Never echo the key: name the duplicate by its automatic org name.
            if let Some(owner) = key_owner.insert(hash, org.name.clone()) {
                issues.add(
                    key_path,
                    format!(
                        "the key hashed {} is also listed by org {owner:?}",
                        hex_prefix(&hash)
                    ),
                );
            }
        };
        for (k, key) in org.keys.iter().enumerate() {
            let (text, priority) = match key {
                RawKey::Plain(text) => (text.as_str(), default_priority),
                RawKey::WithPriority { key, priority } => (key.as_str(), *priority),
            };
            add_key(text, priority, &format!("{at}.keys[{k}]"), issues);
        }
        if let Some(var) = &org.keys_env {
            match std::env::var(var) {
                Ok(list) => {
                    for key in list.split(',').filter(|k| !k.trim().is_empty()) {
                        add_key(key, default_priority, &format!("{at}.keys_env"), issues);
                    }
                }
                Err(_) => issues.add(
                    &format!("{at}.keys_env"),
                    format!("environment variable {var} is not set (or not UTF-8); it should hold a comma-separated list of keys"),
                ),
            }
        }
        for (k, entry) in org.key_sha256.iter().enumerate() {
            let (text, priority) = match entry {
                RawKeyHash::Plain(text) => (text.as_str(), default_priority),
                RawKeyHash::WithPriority { sha256, priority } => (sha256.as_str(), *priority),
            };
            match parse_sha256(text) {
                Some(hash) => {
                    key_hashes.push((hash, priority));
                    if let Some(owner) = key_owner.insert(hash, org.name.clone()) {
                        issues.add(
                            &format!("{at}.key_sha256[{k}]"),
                            format!("this hash is also listed by org {owner:?}"),
                        );
                    }
                }
                None => issues.add(
                    &format!("{at}.key_sha256[{k}]"),
                    "not a SHA-256 in hex (64 hex digits; compute it with: printf %s \"$KEY\" | sha256sum)".to_owned(),
                ),
            }
        }

        let mut limits = HashMap::new();
        for (model, raw_limits) in org.limits {
            let key_path = format!("{at}.limits.{model}");
            if model.trim().is_empty() {
                issues.add(
                    &key_path,
                    "the model name is empty (use \"*\" for any model)".to_owned(),
                );
                continue;
            }
            let parsed = Limits {
                rpm: raw_limits.rpm,
                tpm: raw_limits.tpm,
                rpd: raw_limits.rpd,
                tpd: raw_limits.tpd,
            };
            for (name, value) in [
                ("rpm", parsed.rpm),
                ("tpm", parsed.tpm),
                ("rpd", parsed.rpd),
                ("tpd", parsed.tpd),
            ] {
                if value == Some(0) {
                    issues.add(
                        &format!("{key_path}.{name}"),
                        "a limit of 0 admits nothing; remove the key to leave it unlimited"
                            .to_owned(),
                    );
                }
            }
            if parsed.is_empty() {
                issues.add(
                    &key_path,
                    "no limit set: give at least one of rpm, tpm, rpd, tpd".to_owned(),
                );
            }
            limits.insert(model, parsed);
        }

        let upstream_key = match (&org.upstream_key_env, &org.upstream_key_file) {
            (Some(_), Some(_)) => {
                issues.add(
                    &format!("{at}.upstream_key_env"),
                    "give upstream_key_env or upstream_key_file, not both".to_owned(),
                );
                None
            }
            (Some(var), None) => match std::env::var(var) {
                Ok(key) => upstream_key(&key, &format!("{at}.upstream_key_env"), issues),
                Err(_) => {
                    issues.add(
                        &format!("{at}.upstream_key_env"),
                        format!("environment variable {var} is not set (or not UTF-8); it should hold the provider's API key"),
                    );
                    None
                }
            },
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(key) => upstream_key(&key, &format!("{at}.upstream_key_file"), issues),
                Err(err) => {
                    issues.add(
                        &format!("{at}.upstream_key_file"),
                        format!("cannot read {}: {err}", path.display()),
                    );
                    None
                }
            },
            (None, None) => None,
        };
        let mut client_token_hashes = Vec::new();
        if let Some(var) = &org.client_tokens_env {
            let key_path = format!("{at}.client_tokens_env");
            match std::env::var(var) {
                Ok(list) => {
                    for token in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                        if token.len() < 16 {
                            issues.add(&key_path, format!("a client token in {var} is shorter than 16 characters; use long random tokens (openssl rand -hex 24)"));
                            continue;
                        }
                        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                        if let Some(owner) = key_owner.insert(hash, org.name.clone()) {
                            issues.add(&key_path, format!("a token in {var} is also listed by org {owner:?}"));
                        }
                        client_token_hashes.push(hash);
                    }
                    if client_token_hashes.is_empty() {
                        issues.add(&key_path, format!("environment variable {var} holds no token"));
                    }
                }
                Err(_) => issues.add(
                    &key_path,
                    format!("environment variable {var} is not set (or not UTF-8); it should hold a comma-separated list of client tokens"),
                ),
            }
            if upstream_key.is_none()
                && org.upstream_key_env.is_none()
                && org.upstream_key_file.is_none()
            {
                issues.add(
                    &key_path,
                    "client tokens need the org's own provider key: set upstream_key_env or upstream_key_file".to_owned(),
                );
            }
        }

        orgs.push(OrgConfig {
            name: org.name,
            organization_ids: org.organization_ids,
            key_hashes,
            default_priority,
            limits,
            upstream_key,
            client_token_hashes,
            upstream_key_file: org.upstream_key_file,
        });
    }
    refuse_tokens_equal_to_provider_keys(&orgs, issues);
    orgs
}

/// A client token that is some org's provider key defeats the point of tokens: whoever holds
/// it holds the provider key too, and could go around sluice with it.
fn refuse_tokens_equal_to_provider_keys(orgs: &[OrgConfig], issues: &mut Issues) {
    let provider_keys: Vec<([u8; 32], &str)> = orgs
        .iter()
        .filter_map(|org| {
            let value = org.upstream_key.as_ref()?.0.as_bytes();
            let key = value.strip_prefix(b"Bearer ")?;
            Some((Sha256::digest(key).into(), org.name.as_str()))
        })
        .collect();
    for (index, org) in orgs.iter().enumerate() {
        for token in &org.client_token_hashes {
            if let Some((_, owner)) = provider_keys.iter().find(|(key, _)| key == token) {
                issues.add(
                    &format!("org[{index}].client_tokens_env"),
                    format!(
                        "a client token of org {:?} is the provider key of org {owner:?}; \
                         client tokens must be secrets of their own (openssl rand -hex 24), \
                         never a provider key",
                        org.name
                    ),
                );
            }
        }
    }
}

/// A provider key as sluice will send it: `Bearer <key>`, trimmed (files end in a newline).
fn upstream_key(text: &str, key_path: &str, issues: &mut Issues) -> Option<UpstreamKey> {
    let key = text.trim();
    if key.is_empty() {
        issues.add(key_path, "the provider key is empty".to_owned());
        return None;
    }
    match http::HeaderValue::from_str(&format!("Bearer {key}")) {
        Ok(mut value) => {
            value.set_sensitive(true);
            Some(UpstreamKey(value))
        }
        Err(_) => {
            issues.add(
                key_path,
                "the provider key contains characters a header cannot carry".to_owned(),
            );
            None
        }
    }
}

fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The first 8 hex digits of a hash: how keys are named wherever a name is needed.
pub fn hex_prefix(hash: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    hash[..4]
        .iter()
        .flat_map(|byte| [byte >> 4, byte & 0xf])
        .map(|nibble| char::from(DIGITS[usize::from(nibble)]))
        .collect()
}

/// Accepts `scheme://host[:port][/prefix]`; returns it without a trailing slash.
fn validate_upstream_url(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|err| {
        format!("{text:?} is not a URL ({err}); for example \"https://api.openai.com\"")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?} must use http or https"));
    }
    if url.host_str().is_none() {
        return Err(format!("{text:?} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{text:?} must not have a query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "credentials do not belong in the upstream URL: clients send their own keys".to_owned(),
        );
    }
    let trimmed = url.as_str().trim_end_matches('/');
    if trimmed.ends_with("/v1") {
        return Err(format!(
            "{text:?} ends in /v1: give the origin only (e.g. \"https://api.openai.com\"), \
             sluice appends each request's own /v1/... path"
        ));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", &Overrides::default())
    }

    fn keys(err: ConfigError) -> Vec<String> {
        err.issues.into_iter().map(|issue| issue.key).collect()
    }

    #[test]
    fn hex_prefix_is_the_first_four_bytes_in_lowercase_hex() {
        let mut hash = [0xffu8; 32];
        hash[..4].copy_from_slice(&[0x0a, 0xbc, 0xde, 0xf1]);
        assert_eq!(hex_prefix(&hash), "0abcdef1");
        assert_eq!(hex_prefix(&[0; 32]), "00000000");
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = parse("").expect("defaults are valid");
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.upstream.base_url, DEFAULT_UPSTREAM);
        assert_eq!(config.upstream.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.server.max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(config.log_format, LogFormat::Pretty);
    }

    #[test]
    fn config_watch_defaults_to_two_seconds_and_zero_turns_it_off() {
        let config = parse("").expect("valid");
        assert_eq!(config.server.config_watch, Some(Duration::from_secs(2)));
        let off = parse("[server]\nconfig_watch_secs = 0").expect("valid");
        assert_eq!(off.server.config_watch, None);
        let err = parse("[server]\nconfig_watch_secs = -1").expect_err("negative");
        assert_eq!(keys(err), ["server.config_watch_secs"]);
    }

    #[test]
    fn workers_default_to_one_per_core() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(parse("").expect("valid").server.workers, cores);
        assert_eq!(
            parse("[server]\nworkers = 0")
                .expect("valid")
                .server
                .workers,
            cores
        );
        assert_eq!(
            parse("[server]\nworkers = 3")
                .expect("valid")
                .server
                .workers,
            3
        );
        let err = parse("[server]\nworkers = 5000").expect_err("too many");
        assert_eq!(keys(err), ["server.workers"]);
    }

    #[test]
    fn a_reload_keeps_the_running_values_of_restart_only_settings() {
        let running = parse("[queue]\nmax_depth = 10\n[retry]\nmax_attempts = 2").expect("valid");
        let mut next = parse(
            "listen = \"127.0.0.1:9999\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n\
             [queue]\nmax_depth = 20\n[retry]\nmax_attempts = 3\ncircuit_breaker_threshold = 9",
        )
        .expect("valid");
        let changed = next.keep_restart_only(&running);
        assert_eq!(
            changed,
            ["listen", "upstream.url", "retry.circuit_breaker_threshold"]
        );
        assert_eq!(next.listen, running.listen);
        assert_eq!(next.upstream.base_url, running.upstream.base_url);
        assert_eq!(
            next.retry.circuit_threshold,
            running.retry.circuit_threshold
        );
        // What a reload can change, it does.
        assert_eq!(next.queue.max_depth, 20);
        assert_eq!(next.retry.max_attempts, 3);
        assert!(next.clone().keep_restart_only(&next).is_empty());
    }

    #[test]
    fn ipv4_mapped_loopback_is_loopback() {
        for (addr, loopback) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.0.0.1", false),
            ("0.0.0.0", false),
            ("::", false),
        ] {
            assert_eq!(
                is_loopback(addr.parse().expect("an address")),
                loopback,
                "{addr}"
            );
        }
    }

    #[test]
    fn a_client_token_that_is_a_provider_key_is_refused() {
        let provider = "sk-provider-key-of-acme-0123456789abcdef";
        std::env::set_var("SLUICE_CONFIG_TEST_PROVIDER_KEY", provider);
        std::env::set_var(
            "SLUICE_CONFIG_TEST_TOKENS",
            format!("client-token-0123456789abcdef, {provider}"),
        );
        let text =
            "[[org]]\nname = \"acme\"\nupstream_key_env = \"SLUICE_CONFIG_TEST_PROVIDER_KEY\"\n\
                    client_tokens_env = \"SLUICE_CONFIG_TEST_TOKENS\"\n";
        let err = parse(text).expect_err("a token equal to the provider key");
        assert!(
            err.issues
                .iter()
                .any(|issue| issue.key == "org[0].client_tokens_env"
                    && issue.message.contains("provider key")),
            "{err:?}"
        );
        std::env::set_var("SLUICE_CONFIG_TEST_TOKENS", "client-token-0123456789abcdef");
        parse(text).expect("distinct tokens are fine");
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../config/sluice.toml");
        parse(text).expect("config/sluice.toml must stay valid");
    }

    #[test]
    fn shipped_org_example_is_valid_once_uncommented() {
        let text = include_str!("../config/sluice.toml");
        let start = text.find("# [[org]]").expect("the example has an org");
        let example: String = text[start..]
            .lines()
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            // Variables for the environment-based keys and tokens: checked in
            // tests/managed_keys.rs; the other key forms are checked here.
            .filter(|line| {
                !["keys_env", "upstream_key_env", "client_tokens_env"]
                    .iter()
                    .any(|key| line.starts_with(key))
            })
            .map(|line| {
                line.replace("\"sk-...\"", "\"sk-a\"")
                    .replace("\"sk-batch-...\"", "\"sk-b\"")
                    .replace("\"<64 hex digits>\"", &format!("\"{}\"", "0".repeat(64)))
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = parse(&example).expect("the org example is valid");
        let org = &config.orgs[0];
        assert_eq!(org.name, "acme");
        assert_eq!(org.key_hashes.len(), 3);
        assert_eq!(
            org.limits_for("gpt-4o-mini").and_then(|l| l.tpm),
            Some(200_000)
        );
        assert_eq!(
            org.limits_for("gpt-4.1").and_then(|l| l.tpd),
            Some(90_000_000)
        );
    }

    #[test]
    fn org_validation_names_every_problem() {
        let err = parse(
            "[[org]]\nname = \"key-x\"\nkeys = [\"sk-1\"]\n[org.limits.\"*\"]\nrpm = 0\n\
             [[org]]\nname = \"b\"\nkeys = [\"sk-1\"]\nkey_sha256 = [\"zz\"]\nkeys_env = \"SLUICE_TEST_UNSET_VAR\"\n\
             [org.limits.\"gpt-4o\"]\n",
        )
        .expect_err("invalid orgs");
        let keys = keys(err);
        assert_eq!(
            keys,
            [
                "org[0].name",
                "org[0].limits.*.rpm",
                "org[1].keys[0]",
                "org[1].keys_env",
                "org[1].key_sha256[0]",
                "org[1].limits.gpt-4o",
            ]
        );
    }

    #[test]
    fn unknown_keys_are_named_by_path() {
        let err = parse("[upstream]\nurll = \"http://x\"\n").expect_err("unknown key");
        assert_eq!(err.issues.len(), 1);
        assert_eq!(err.issues[0].key, "upstream.urll");
        assert!(
            err.issues[0].message.contains("unknown field"),
            "{}",
            err.issues[0].message
        );
    }

    #[test]
    fn wrong_types_are_named_by_path() {
        let err = parse("[server]\nmax_body_bytes = \"big\"\n").expect_err("type error");
        assert_eq!(keys(err), ["server.max_body_bytes"]);
    }

    #[test]
    fn every_invalid_value_is_reported_at_once() {
        let err = parse(
            "listen = \"nowhere\"\n[upstream]\nurl = \"ftp://x\"\nread_timeout_secs = -1\n\
             [server]\nmax_body_bytes = 10\n",
        )
        .expect_err("invalid values");
        assert_eq!(
            keys(err),
            [
                "listen",
                "upstream.url",
                "upstream.read_timeout_secs",
                "server.max_body_bytes"
            ]
        );
    }

    #[test]
    fn upstream_url_rules() {
        assert_eq!(
            validate_upstream_url("http://127.0.0.1:9000/").as_deref(),
            Ok("http://127.0.0.1:9000")
        );
        assert_eq!(
            validate_upstream_url("https://gw.example.com/openai").as_deref(),
            Ok("https://gw.example.com/openai")
        );
        assert!(validate_upstream_url("https://api.openai.com/v1").is_err());
        assert!(validate_upstream_url("https://api.openai.com/v1/").is_err());
        assert!(validate_upstream_url("https://u:p@api.openai.com").is_err());
        assert!(validate_upstream_url("api.openai.com").is_err());
        assert!(validate_upstream_url("https://api.openai.com?x=1").is_err());
    }

    #[test]
    fn overrides_win_over_the_file() {
        let overrides = Overrides {
            listen: Some("127.0.0.1:9999".to_owned()),
            upstream: Some("http://127.0.0.1:1".to_owned()),
            log_format: Some(LogFormat::Json),
            ..Overrides::default()
        };
        let text = "listen = \"127.0.0.1:1111\"\nlog_format = \"pretty\"\n[upstream]\nurl = \"http://a:2\"\n";
        let config = Config::parse(text, "t", &overrides).expect("valid");
        assert_eq!(config.listen.port(), 9999);
        assert_eq!(config.upstream.base_url, "http://127.0.0.1:1");
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn a_bad_override_names_its_flag() {
        let overrides = Overrides {
            listen: Some("localhost".to_owned()),
            ..Overrides::default()
        };
        let err = Config::from_overrides(&overrides).expect_err("bad listen");
        assert!(err.issues[0].key.contains("--listen"), "{:?}", err.issues);
    }

    #[test]
    fn toml_syntax_errors_are_reported_with_a_line() {
        let err = parse("listen = \n").expect_err("syntax");
        assert!(err.issues[0].message.contains("line"), "{:?}", err.issues);
    }
}
