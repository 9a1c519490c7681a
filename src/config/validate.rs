//! Validation: the raw file, the overrides and the [`Sources`] they name become a [`Config`],
//! or every problem with them is reported at once. One function per section, called in the
//! order problems are reported: the listen addresses, `[upstream]`, `[server]`, `[queue]`,
//! `[estimate]`, `[retry]`, the orgs (see [`super::orgs`]), and last whether the listener
//! would be open to anyone. Nothing here reads a file or the environment.

use std::net::SocketAddr;
use std::time::Duration;

use super::issues::Issues;
use super::orgs::validate_orgs;
use super::raw::{RawConfig, RawEstimate, RawQueue, RawRetry, RawServer, RawShared, RawUpstream};
use super::sources::Sources;
use super::{
    Config, ConfigError, EstimateConfig, Overrides, QueueConfig, RetryConfig, ServerConfig,
    SharedConfig, UpstreamConfig, DEFAULT_LISTEN, DEFAULT_UPSTREAM,
};

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
/// Every shared-store key starts with this.
const DEFAULT_KEY_PREFIX: &str = "sluice:";
/// A store call slower than this counts as failed: a Redis in the same zone answers in well
/// under a millisecond, and an outage must not add more than this to a request.
const DEFAULT_STORE_TIMEOUT_SECS: f64 = 0.02;

pub(super) fn validate(
    raw: RawConfig,
    sources: &Sources,
    overrides: &Overrides,
    source_name: &str,
) -> Result<Config, ConfigError> {
    let mut issues = Issues::default();
    let listen = validate_listen(raw.listen.as_deref(), overrides, &mut issues);
    let metrics_listen =
        validate_metrics_listen(raw.metrics_listen.as_deref(), overrides, &mut issues);
    let upstream = validate_upstream(&raw.upstream, overrides, &mut issues);
    let server = validate_server(&raw.server, &mut issues);
    let queue = validate_queue(&raw.queue, &mut issues);
    let estimate = validate_estimate(raw.estimate, &mut issues);
    let retry = validate_retry(&raw.retry, &mut issues);
    let orgs = validate_orgs(raw.org, sources, &mut issues);
    let shared = validate_shared(&raw.shared, overrides, &mut issues);
    let require_client_tokens = orgs.iter().any(|org| !org.client_token_hashes.is_empty());
    let allow_unauthenticated = overrides
        .allow_unauthenticated
        .or(raw.allow_unauthenticated)
        .unwrap_or(false);
    if !require_client_tokens && !allow_unauthenticated {
        refuse_open_listener(&listen, &mut issues);
    }
    issues.into_result(source_name)?;
    Ok(Config {
        listen: listen.addr,
        metrics_listen,
        require_client_tokens,
        log_format: overrides.log_format.or(raw.log_format).unwrap_or_default(),
        upstream,
        server,
        queue,
        retry,
        estimate,
        orgs,
        shared,
        source: None,
    })
}

/// The proxy's address, and the key path that names where it came from.
struct Listen {
    addr: SocketAddr,
    key: &'static str,
}

fn validate_listen(raw: Option<&str>, overrides: &Overrides, issues: &mut Issues) -> Listen {
    let (text, key) = match &overrides.listen {
        Some(value) => (value.as_str(), "listen (from --listen / SLUICE_LISTEN)"),
        None => (raw.unwrap_or(DEFAULT_LISTEN), "listen"),
    };
    let addr = text.parse::<SocketAddr>().unwrap_or_else(|err| {
        issues.add(
            key,
            format!("{text:?} is not an IP:port address ({err}); for example \"127.0.0.1:8787\""),
        );
        SocketAddr::from(([127, 0, 0, 1], 8787))
    });
    Listen { addr, key }
}

fn validate_metrics_listen(
    raw: Option<&str>,
    overrides: &Overrides,
    issues: &mut Issues,
) -> Option<SocketAddr> {
    let (text, key) = match &overrides.metrics_listen {
        Some(value) => (
            Some(value.as_str()),
            "metrics_listen (from --metrics-listen / SLUICE_METRICS_LISTEN)",
        ),
        None => (raw, "metrics_listen"),
    };
    text.and_then(|text| match text.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(err) => {
            issues.add(
                key,
                format!("{text:?} is not an IP:port address ({err}); for example \"0.0.0.0:9090\""),
            );
            None
        }
    })
}

/// Beyond loopback, anyone who reaches the port spends the orgs' budgets: that takes client
/// tokens or an explicit `allow_unauthenticated`.
fn refuse_open_listener(listen: &Listen, issues: &mut Issues) {
    if is_loopback(listen.addr.ip()) {
        return;
    }
    issues.add(
        listen.key,
        format!(
            "{} is reachable beyond this machine, and nothing authenticates the clients \
             that could spend your organizations' budgets through it. Give an org \
             client_tokens_env (with upstream_key_env or upstream_key_file) so applications \
             use tokens instead of the provider key, or set allow_unauthenticated = true \
             (SLUICE_ALLOW_UNAUTHENTICATED=true) if the network in front of sluice is trusted",
            listen.addr
        ),
    );
}

fn validate_upstream(
    raw: &RawUpstream,
    overrides: &Overrides,
    issues: &mut Issues,
) -> UpstreamConfig {
    let (url_text, url_key) = match &overrides.upstream {
        Some(value) => (
            value.as_str(),
            "upstream.url (from --upstream / SLUICE_UPSTREAM)",
        ),
        None => (
            raw.url.as_deref().unwrap_or(DEFAULT_UPSTREAM),
            "upstream.url",
        ),
    };
    let base_url = validate_upstream_url(url_text).unwrap_or_else(|message| {
        issues.add(url_key, message);
        String::new()
    });
    let connect_timeout = seconds(
        issues,
        "upstream.connect_timeout_secs",
        raw.connect_timeout_secs,
        DEFAULT_CONNECT_TIMEOUT_SECS,
    );
    let read_timeout = seconds(
        issues,
        "upstream.read_timeout_secs",
        raw.read_timeout_secs,
        DEFAULT_READ_TIMEOUT_SECS,
    );
    let total_timeout = seconds(
        issues,
        "upstream.total_timeout_secs",
        raw.total_timeout_secs,
        DEFAULT_TOTAL_TIMEOUT_SECS,
    );
    let pool_idle_timeout = seconds(
        issues,
        "upstream.pool_idle_timeout_secs",
        raw.pool_idle_timeout_secs,
        DEFAULT_POOL_IDLE_TIMEOUT_SECS,
    );
    UpstreamConfig {
        base_url,
        connect_timeout,
        read_timeout,
        total_timeout,
        pool_idle_timeout,
        accounting: raw.accounting.unwrap_or_default(),
        learn_limits: raw.learn_limits.unwrap_or(true),
    }
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

fn validate_server(raw: &RawServer, issues: &mut Issues) -> ServerConfig {
    let drain_timeout = seconds(
        issues,
        "server.drain_timeout_secs",
        raw.drain_timeout_secs,
        DEFAULT_DRAIN_TIMEOUT_SECS,
    );
    let config_watch = config_watch(raw.config_watch_secs, issues);
    let workers = workers(raw.workers, issues);
    let header_read_timeout = seconds(
        issues,
        "server.header_read_timeout_secs",
        raw.header_read_timeout_secs,
        DEFAULT_HEADER_READ_TIMEOUT_SECS,
    );
    let body_read_timeout = seconds(
        issues,
        "server.body_read_timeout_secs",
        raw.body_read_timeout_secs,
        DEFAULT_BODY_READ_TIMEOUT_SECS,
    );
    let max_connections = in_range(
        issues,
        "server.max_connections",
        raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        1_000_000,
    ) as usize;
    let http2_max_concurrent_streams = in_range(
        issues,
        "server.http2_max_concurrent_streams",
        raw.http2_max_concurrent_streams
            .unwrap_or(DEFAULT_HTTP2_MAX_STREAMS),
        10_000,
    );
    let (max_body_bytes, max_buffered_body_bytes) = body_sizes(raw, issues);
    ServerConfig {
        max_body_bytes,
        max_buffered_body_bytes,
        drain_timeout,
        config_watch,
        workers,
        header_read_timeout,
        body_read_timeout,
        max_connections,
        http2_max_concurrent_streams,
    }
}

/// 0 turns watching off (SIGHUP still reloads).
fn config_watch(secs: Option<f64>, issues: &mut Issues) -> Option<Duration> {
    match secs {
        Some(0.0) => None,
        secs => Some(seconds(
            issues,
            "server.config_watch_secs",
            secs,
            DEFAULT_CONFIG_WATCH_SECS,
        )),
    }
}

/// One event loop per core the process may run on.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// 0 (the default): one per core.
fn workers(workers: Option<u64>, issues: &mut Issues) -> usize {
    match workers.unwrap_or(0) {
        0 => default_workers(),
        n @ 1..=MAX_WORKERS => n as usize,
        n => {
            issues.add(
                "server.workers",
                format!("{n} is out of range: use 1 to {MAX_WORKERS}, or 0 for one per core"),
            );
            1
        }
    }
}

/// `max_body_bytes`, and `max_buffered_body_bytes`: at least one body of the largest size.
fn body_sizes(raw: &RawServer, issues: &mut Issues) -> (usize, usize) {
    let max_body = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
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
    (max_body_bytes, max_buffered_body_bytes)
}

fn validate_queue(raw: &RawQueue, issues: &mut Issues) -> QueueConfig {
    let max_wait = seconds(
        issues,
        "queue.max_wait_secs",
        raw.max_wait_secs,
        DEFAULT_MAX_WAIT_SECS,
    );
    let client_timeout_margin = seconds(
        issues,
        "queue.client_timeout_margin_secs",
        raw.client_timeout_margin_secs,
        DEFAULT_CLIENT_TIMEOUT_MARGIN_SECS,
    );
    // Zero is allowed here: it means "trust the bucket exactly".
    let refill_margin = match raw.refill_margin_secs {
        Some(0.0) => Duration::ZERO,
        secs => seconds(
            issues,
            "queue.refill_margin_secs",
            secs,
            DEFAULT_REFILL_MARGIN_SECS,
        ),
    };
    let relearn_interval = seconds(
        issues,
        "queue.relearn_interval_secs",
        raw.relearn_interval_secs,
        DEFAULT_RELEARN_INTERVAL_SECS,
    );
    let interactive_reserve = raw
        .interactive_reserve
        .unwrap_or(DEFAULT_INTERACTIVE_RESERVE);
    if !(0.0..=0.9).contains(&interactive_reserve) {
        issues.add(
            "queue.interactive_reserve",
            format!("{interactive_reserve} is not a share between 0 and 0.9"),
        );
    }
    let mut depth = |key, value| in_range(issues, key, value, 1_000_000);
    let max_depth = depth(
        "queue.max_depth",
        raw.max_depth.unwrap_or(DEFAULT_MAX_DEPTH),
    );
    let max_depth_per_bucket = depth(
        "queue.max_depth_per_bucket",
        raw.max_depth_per_bucket
            .unwrap_or(DEFAULT_MAX_DEPTH_PER_BUCKET),
    );
    let max_buckets = in_range(
        issues,
        "queue.max_buckets",
        raw.max_buckets.unwrap_or(DEFAULT_MAX_BUCKETS),
        10_000_000,
    );
    QueueConfig {
        max_wait,
        max_depth,
        max_depth_per_bucket,
        interactive_reserve,
        client_timeout_margin,
        refill_margin,
        relearn_interval,
        max_buckets,
    }
}

fn validate_estimate(raw: RawEstimate, issues: &mut Issues) -> EstimateConfig {
    for (model, tokens) in &raw.output_tokens_by_model {
        if *tokens > 10_000_000 {
            issues.add(
                &format!("estimate.output_tokens_by_model.{model}"),
                format!("{tokens} is out of range"),
            );
        }
    }
    EstimateConfig {
        default_output_tokens: raw.default_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS),
        output_tokens_by_model: raw.output_tokens_by_model,
    }
}

/// `[shared]`: on when a Redis URL is given (the flag or environment wins over the file).
fn validate_shared(
    raw: &RawShared,
    overrides: &Overrides,
    issues: &mut Issues,
) -> Option<SharedConfig> {
    // An empty SLUICE_REDIS_URL reads as "not set" (as an empty variable usually does), so it
    // never hides the file's URL and quietly gives each replica the whole budget.
    let flag = overrides
        .redis_url
        .as_ref()
        .filter(|url| !url.trim().is_empty());
    let (url, key) = match (flag, &raw.redis_url) {
        (Some(url), _) => (
            url,
            "shared.redis_url (from --redis-url / SLUICE_REDIS_URL)",
        ),
        (None, Some(url)) => (url, "shared.redis_url"),
        (None, None) => {
            if raw.key_prefix.is_some()
                || raw.store_timeout_secs.is_some()
                || raw.on_store_error.is_some()
            {
                issues.add(
                    "shared",
                    "settings without a redis_url do nothing: set shared.redis_url (or SLUICE_REDIS_URL) to share limits, or remove the [shared] section"
                        .to_owned(),
                );
            }
            return None;
        }
    };
    match url::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "redis" | "rediss") && parsed.has_host() => {}
        _ => issues.add(
            key,
            format!(
                "{} is not a Redis URL: use redis://host:6379/0 (or rediss:// for TLS)",
                super::redacted_url(url)
            ),
        ),
    }
    let key_prefix = raw
        .key_prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned());
    if key_prefix.contains(['{', '}']) {
        issues.add(
            "shared.key_prefix",
            format!("{key_prefix:?} holds a brace: sluice puts each bucket's name in braces (a Redis Cluster hash tag), so the prefix may not"),
        );
    }
    let store_timeout = seconds(
        issues,
        "shared.store_timeout_secs",
        raw.store_timeout_secs,
        DEFAULT_STORE_TIMEOUT_SECS,
    );
    if store_timeout > Duration::from_secs(5) {
        issues.add(
            "shared.store_timeout_secs",
            format!(
                "{} s is out of range: use a small positive figure (the default, {DEFAULT_STORE_TIMEOUT_SECS} s, suits a store in the same zone) of at most 5 s",
                store_timeout.as_secs_f64()
            ),
        );
    }
    Some(SharedConfig {
        redis_url: url.clone(),
        key_prefix,
        store_timeout,
        on_store_error: raw.on_store_error.unwrap_or_default(),
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

/// A count from 1 to `max`; 1 in place of one out of range (the configuration is refused).
fn in_range<T>(issues: &mut Issues, key: &str, value: T, max: T) -> T
where
    T: Copy + PartialOrd + From<u8> + std::fmt::Display,
{
    if value < T::from(1) || value > max {
        issues.add(key, format!("{value} is out of range: use 1 to {max}"));
        return T::from(1);
    }
    value
}

/// Loopback, IPv4-mapped IPv6 loopback (`[::ffff:127.0.0.1]`) included.
pub(super) fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{is_loopback, validate_upstream_url};
    use crate::config::testing::{keys, parse};
    use crate::config::{Config, LogFormat, Overrides};

    #[test]
    fn the_shared_store_is_off_by_default_and_on_with_a_redis_url() {
        assert_eq!(parse("").expect("valid").shared, None);
        let shared = parse("[shared]\nredis_url = \"redis://:secret@redis:6379/0\"\n")
            .expect("valid")
            .shared
            .expect("on");
        assert_eq!(shared.key_prefix, "sluice:");
        assert_eq!(shared.store_timeout, Duration::from_millis(20));
        assert_eq!(shared.on_store_error, crate::config::OnStoreError::Degrade);
        // The password never shows, not even in a Debug print of the config.
        assert!(!format!("{shared:?}").contains("secret"), "{shared:?}");
        let flag = Overrides {
            redis_url: Some("rediss://cache:6380".to_owned()),
            ..Overrides::default()
        };
        let from_flag = Config::parse("", "test.toml", &flag).expect("valid");
        assert_eq!(
            from_flag.shared.map(|shared| shared.redis_url),
            Some("rediss://cache:6380".to_owned())
        );
    }

    #[test]
    fn shared_store_mistakes_are_named() {
        let err = parse(
            "[shared]\nredis_url = \"http://user:secret@redis\"\nkey_prefix = \"a{b\"\n\
             store_timeout_secs = 9\non_store_error = \"fail_closed\"\n",
        )
        .expect_err("three mistakes");
        let issues = err.issues.clone();
        assert_eq!(
            keys(err),
            [
                "shared.redis_url",
                "shared.key_prefix",
                "shared.store_timeout_secs"
            ]
        );
        assert!(
            !issues.iter().any(|issue| issue.message.contains("secret")),
            "{issues:?}"
        );
        let orphan = parse("[shared]\non_store_error = \"fail_closed\"\n").expect_err("no url");
        assert_eq!(keys(orphan), ["shared"]);
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
}
