//! Configuration: a TOML file parsed raw (every key optional, unknown keys rejected), merged
//! with command-line and environment overrides, then validated once into a [`Config`] whose
//! fields cannot be wrong. Precedence: flags, then environment (both resolved by clap before
//! they reach [`Overrides`]), then the file, then the defaults (in `validate.rs`).
//!
//! - `raw`: the file as written, into serde structs.
//! - `sources`: the environment variables and key files the file names, read before validation.
//! - `validate`: the top-level keys and one validator per section.
//! - `orgs`: the `[[org]]` tables; `keys`: every key an org is known by or holds.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::limiter::bucket::Limits;
use crate::priority::Priority;

mod issues;
mod keys;
mod orgs;
mod raw;
mod sources;
mod validate;

pub use keys::hex_prefix;

use raw::RawConfig;
use sources::Sources;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";
pub const DEFAULT_UPSTREAM: &str = "https://api.openai.com";

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
    /// Limits shared with other replicas through Redis; `None`: this process's own.
    pub shared: Option<SharedConfig>,
    /// Where the configuration came from, to reload it; `None` without a config file.
    pub source: Option<ConfigSource>,
}

/// A config file and the overrides applied on top of it: what a reload reads again.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub overrides: Overrides,
}

/// The shared store (`[shared]`): where replicas keep the budgets they share.
#[derive(Clone, PartialEq)]
pub struct SharedConfig {
    /// `redis://` or `rediss://` (TLS), with a password if any: never logged whole.
    pub redis_url: String,
    /// Prepended to every key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// The longest a store call may take before it counts as failed.
    pub store_timeout: Duration,
    pub on_store_error: OnStoreError,
}

impl fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedConfig")
            .field("redis_url", &redacted_url(&self.redis_url))
            .field("key_prefix", &self.key_prefix)
            .field("store_timeout", &self.store_timeout)
            .field("on_store_error", &self.on_store_error)
            .finish()
    }
}

/// A URL with its password (and user) replaced by `***`, for logs and errors.
pub fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() || !parsed.username().is_empty() => {
            let _ = parsed.set_password(None);
            let _ = parsed.set_username("***");
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "(an unreadable URL)".to_owned(),
    }
}

/// What a replica does while the shared store cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Admit from a local bucket holding this replica's share of each limit (the limit
    /// divided by the replicas last seen alive), never the whole limit.
    #[default]
    Degrade,
    /// Refuse metered requests with a 503 until the store answers.
    FailClosed,
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
    /// `--redis-url` / `SLUICE_REDIS_URL`: turns the shared store on.
    pub redis_url: Option<String>,
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
        Self::from_raw(RawConfig::default(), overrides, "defaults")
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
        keep!(shared, "shared");
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
        let raw = RawConfig::parse(text).map_err(|issue| ConfigError {
            source_name: source_name.to_owned(),
            issues: vec![issue],
        })?;
        Self::from_raw(raw, overrides, source_name)
    }

    /// Reads the environment variables and key files `raw` names, then validates it all.
    fn from_raw(
        raw: RawConfig,
        overrides: &Overrides,
        source_name: &str,
    ) -> Result<Self, ConfigError> {
        let sources = Sources::read(&raw);
        validate::validate(raw, &sources, overrides, source_name)
    }
}

#[cfg(test)]
mod testing {
    use super::{Config, ConfigError, Overrides};

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", &Overrides::default())
    }

    pub(super) fn keys(err: ConfigError) -> Vec<String> {
        err.issues.into_iter().map(|issue| issue.key).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::testing::parse;
    use super::{LogFormat, DEFAULT_LISTEN, DEFAULT_UPSTREAM};

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
    fn shipped_example_is_valid() {
        let text = include_str!("../../config/sluice.toml");
        parse(text).expect("config/sluice.toml must stay valid");
    }
}
