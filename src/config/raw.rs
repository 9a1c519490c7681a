//! The TOML file as written: every key optional, unknown keys rejected, nothing checked yet
//! beyond types. Validation (see [`super::validate`]) turns it into a [`super::Config`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::Deserialize;

use super::{Accounting, ConfigIssue, LogFormat, OnStoreError};
use crate::priority::Priority;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<String>,
    pub(super) metrics_listen: Option<String>,
    pub(super) allow_unauthenticated: Option<bool>,
    pub(super) log_format: Option<LogFormat>,
    #[serde(default)]
    pub(super) upstream: RawUpstream,
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) queue: RawQueue,
    #[serde(default)]
    pub(super) retry: RawRetry,
    #[serde(default)]
    pub(super) estimate: RawEstimate,
    #[serde(default)]
    pub(super) org: Vec<RawOrg>,
    #[serde(default)]
    pub(super) shared: RawShared,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShared {
    pub(super) redis_url: Option<String>,
    pub(super) key_prefix: Option<String>,
    pub(super) store_timeout_secs: Option<f64>,
    pub(super) on_store_error: Option<OnStoreError>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) max_wait_secs: Option<f64>,
    pub(super) max_depth: Option<usize>,
    pub(super) max_depth_per_bucket: Option<usize>,
    pub(super) interactive_reserve: Option<f64>,
    pub(super) client_timeout_margin_secs: Option<f64>,
    pub(super) refill_margin_secs: Option<f64>,
    pub(super) relearn_interval_secs: Option<f64>,
    pub(super) max_buckets: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) max_attempts: Option<u32>,
    pub(super) circuit_breaker_threshold: Option<u32>,
    pub(super) budget_ratio: Option<f64>,
    pub(super) budget_min_per_sec: Option<u32>,
    pub(super) backoff_base_secs: Option<f64>,
    pub(super) backoff_max_secs: Option<f64>,
    pub(super) quota_cooldown_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEstimate {
    pub(super) default_output_tokens: Option<u64>,
    #[serde(default)]
    pub(super) output_tokens_by_model: HashMap<String, u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOrg {
    pub(super) name: String,
    #[serde(default)]
    pub(super) organization_ids: Vec<String>,
    #[serde(default)]
    pub(super) keys: Vec<RawKey>,
    pub(super) keys_env: Option<String>,
    #[serde(default)]
    pub(super) key_sha256: Vec<RawKeyHash>,
    pub(super) default_priority: Option<Priority>,
    #[serde(default)]
    pub(super) limits: BTreeMap<String, RawLimits>,
    pub(super) upstream_key_env: Option<String>,
    pub(super) upstream_key_file: Option<PathBuf>,
    pub(super) client_tokens_env: Option<String>,
}

/// `"sk-..."` or `{ key = "sk-...", priority = "batch" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawKey {
    Plain(String),
    WithPriority { key: String, priority: Priority },
}

/// `"<64 hex digits>"` or `{ sha256 = "...", priority = "batch" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawKeyHash {
    Plain(String),
    WithPriority { sha256: String, priority: Priority },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) rpm: Option<u64>,
    pub(super) tpm: Option<u64>,
    pub(super) rpd: Option<u64>,
    pub(super) tpd: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: Option<String>,
    pub(super) connect_timeout_secs: Option<f64>,
    pub(super) read_timeout_secs: Option<f64>,
    pub(super) pool_idle_timeout_secs: Option<f64>,
    pub(super) total_timeout_secs: Option<f64>,
    pub(super) accounting: Option<Accounting>,
    pub(super) learn_limits: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) max_body_bytes: Option<u64>,
    pub(super) max_buffered_body_bytes: Option<u64>,
    pub(super) drain_timeout_secs: Option<f64>,
    pub(super) config_watch_secs: Option<f64>,
    pub(super) workers: Option<u64>,
    pub(super) header_read_timeout_secs: Option<f64>,
    pub(super) body_read_timeout_secs: Option<f64>,
    pub(super) max_connections: Option<u64>,
    pub(super) http2_max_concurrent_streams: Option<u32>,
}

impl RawConfig {
    /// Parses TOML text; a syntax or type error is named by its key path and line.
    pub(super) fn parse(text: &str) -> Result<Self, ConfigIssue> {
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
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{keys, parse};

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
    fn toml_syntax_errors_are_reported_with_a_line() {
        let err = parse("listen = \n").expect_err("syntax");
        assert!(err.issues[0].message.contains("line"), "{:?}", err.issues);
    }
}
