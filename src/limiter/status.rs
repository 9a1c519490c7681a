//! The typed `/status` document: what the server writes and `sluice status` reads back.
//!
//! A bucket is seen twice here: [`BucketStatus`], the snapshot [`BucketQueue::status`] takes
//! under the bucket's lock (durations, the circuit, the upstream's headers as parsed), and
//! [`BucketReport`], the same snapshot as the document carries it (seconds, labels).
//!
//! The CLI and the server may be different versions, so every field of the document is
//! optional on the way in: a missing or mistyped value reads as `None` (or empty) instead of
//! failing the whole document. The server fills every field.
//!
//! [`BucketQueue::status`]: super::queue::BucketQueue::status

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::limiter::bucket::Limits;
use crate::limiter::gate::Circuit;
use crate::priority::ByPriority;
use crate::resource::PerResource;
use crate::upstream::ratelimit::{Family, RateLimitHeaders, Reason};

/// Whether a bucket's budget is shared, as the status view tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sharing {
    /// Spent through the shared store, with every replica.
    Shared,
    /// The store is out of reach: spent from this replica's share of the limits (1/replicas).
    Degraded { replicas: usize },
    /// Not shared: nothing to share yet (no limit known).
    Local,
    /// The store is out of reach and metered requests are refused meanwhile
    /// (`shared.on_store_error = "fail_closed"`).
    Refusing,
}

impl Sharing {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Degraded { .. } => "degraded",
            Self::Local => "local",
            Self::Refusing => "refusing",
        }
    }
}

/// A bucket as the status view and metrics show it, at one instant.
#[derive(Clone, Debug)]
pub struct BucketStatus {
    /// How the budget is shared with other replicas (`None` without a shared store).
    pub(crate) sharing: Option<Sharing>,
    pub configured: Limits,
    pub learned: Limits,
    /// The tighter of the configured and the learned limits.
    pub in_force: Limits,
    /// Units available now (negative in debt); `None` where not limited.
    pub available: PerResource<Option<f64>>,
    /// The per-minute burst (the whole limit unless shrunk); `None` where not limited.
    pub burst: PerResource<Option<f64>>,
    pub learning: bool,
    pub circuit: Circuit,
    /// The pause after an upstream 429, while it lasts.
    pub paused_for: Option<Duration>,
    /// Waiting requests per class.
    pub depth: ByPriority<usize>,
    /// Refused requests waiting to be sent again.
    pub replays: u32,
    pub upstream: Option<LastHeaders>,
    pub last_429: Option<Last429>,
}

/// The upstream's last rate-limit headers for a bucket.
#[derive(Clone, Debug)]
pub struct LastHeaders {
    pub headers: RateLimitHeaders,
    /// How long ago they came.
    pub age: Duration,
}

/// The last upstream 429 of a bucket.
#[derive(Clone, Copy, Debug)]
pub struct Last429 {
    pub reason: Reason,
    /// How long the bucket paused for it.
    pub wait: Duration,
    /// How long ago it came.
    pub age: Duration,
}

/// A figure per resource as the document carries it; `None` where the resource is not
/// limited (or, read from another version, unknown).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ResourceFigures {
    #[serde(deserialize_with = "lenient")]
    pub requests: Option<f64>,
    #[serde(deserialize_with = "lenient")]
    pub tokens: Option<f64>,
}

impl From<PerResource<Option<f64>>> for ResourceFigures {
    fn from(figures: PerResource<Option<f64>>) -> Self {
        let PerResource { requests, tokens } = figures;
        Self { requests, tokens }
    }
}

/// The whole `/status` document.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct StatusDocument {
    /// The server's version.
    #[serde(deserialize_with = "lenient")]
    pub version: Option<String>,
    /// The upstream's base URL.
    #[serde(deserialize_with = "lenient")]
    pub upstream: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub draining: Option<bool>,
    /// Orgs answered from a quota cool-down.
    #[serde(deserialize_with = "lenient_each")]
    pub quota_cooldowns: Vec<QuotaCooldown>,
    /// The shared store, when one is configured.
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub shared_store: Option<SharedStoreReport>,
    /// Sorted by org, then model.
    #[serde(deserialize_with = "lenient_each")]
    pub buckets: Vec<BucketReport>,
}

impl StatusDocument {
    /// Reads a document of any version: whatever is missing or mistyped is left out (a value
    /// that is not a document at all reads as an empty one).
    pub(crate) fn read(value: &serde_json::Value) -> Self {
        Self::deserialize(value).unwrap_or_default()
    }
}

/// The shared store as one replica sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct SharedStoreReport {
    /// The store's address, without its password.
    #[serde(deserialize_with = "lenient")]
    pub url: Option<String>,
    /// Whether it is in use now (false: degraded, or refusing).
    #[serde(deserialize_with = "lenient")]
    pub up: Option<bool>,
    /// Replicas seen alive through its heartbeats.
    #[serde(deserialize_with = "lenient")]
    pub replicas: Option<u64>,
    /// `degrade` or `fail_closed`.
    #[serde(deserialize_with = "lenient")]
    pub on_store_error: Option<String>,
}

/// An org in quota cool-down (see [`crate::quota`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct QuotaCooldown {
    #[serde(deserialize_with = "lenient")]
    pub org: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub remaining_secs: Option<f64>,
}

/// One (org, model) bucket.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct BucketReport {
    #[serde(deserialize_with = "lenient")]
    pub org: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub model: Option<String>,
    /// With a shared store: `shared`, `degraded` (spending this replica's share), `local`
    /// (no limit known yet) or `refusing` (store down, `on_store_error = "fail_closed"`).
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub sharing: Option<String>,
    /// While degraded: the replicas the limits are divided by.
    #[serde(deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub share_of: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub limits: LimitsReport,
    #[serde(deserialize_with = "lenient")]
    pub learning: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    pub available: ResourceFigures,
    #[serde(deserialize_with = "lenient")]
    pub burst: ResourceFigures,
    #[serde(deserialize_with = "lenient")]
    pub circuit: Option<CircuitState>,
    #[serde(deserialize_with = "lenient")]
    pub paused_for_secs: Option<f64>,
    #[serde(deserialize_with = "lenient")]
    pub queue: QueueReport,
    /// `None` before the upstream has sent rate-limit headers for the bucket.
    #[serde(deserialize_with = "lenient")]
    pub upstream: Option<UpstreamReport>,
    #[serde(deserialize_with = "lenient")]
    pub last_429: Option<Last429Report>,
}

impl BucketReport {
    pub(crate) fn new(org: &str, model: &str, status: &BucketStatus) -> Self {
        Self {
            org: Some(org.to_owned()),
            model: Some(model.to_owned()),
            sharing: status.sharing.map(|sharing| sharing.label().to_owned()),
            share_of: match status.sharing {
                Some(Sharing::Degraded { replicas }) => Some(replicas as u64),
                _ => None,
            },
            limits: LimitsReport {
                configured: status.configured.into(),
                learned: status.learned.into(),
                in_force: status.in_force.into(),
            },
            learning: Some(status.learning),
            available: status.available.into(),
            burst: status.burst.into(),
            circuit: Some(status.circuit.into()),
            paused_for_secs: status.paused_for.map(|wait| wait.as_secs_f64()),
            queue: QueueReport {
                interactive: Some(status.depth.interactive as u64),
                batch: Some(status.depth.batch as u64),
                replays: Some(u64::from(status.replays)),
            },
            upstream: status.upstream.as_ref().map(UpstreamReport::new),
            last_429: status.last_429.map(|last| Last429Report {
                reason: Some(last.reason.as_str().to_owned()),
                wait_secs: Some(last.wait.as_secs_f64()),
                age_secs: Some(last.age.as_secs_f64()),
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct LimitsReport {
    #[serde(deserialize_with = "lenient")]
    pub configured: LimitFigures,
    #[serde(deserialize_with = "lenient")]
    pub learned: LimitFigures,
    #[serde(deserialize_with = "lenient")]
    pub in_force: LimitFigures,
}

/// [`Limits`] as the document carries them; `None` is "not limited" (or, read from another
/// version, unknown).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct LimitFigures {
    #[serde(deserialize_with = "lenient")]
    pub rpm: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub tpm: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub rpd: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub tpd: Option<u64>,
}

impl From<Limits> for LimitFigures {
    fn from(limits: Limits) -> Self {
        let Limits { rpm, tpm, rpd, tpd } = limits;
        Self { rpm, tpm, rpd, tpd }
    }
}

/// A bucket's circuit, without its timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    /// Its name in the document.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

impl From<Circuit> for CircuitState {
    fn from(circuit: Circuit) -> Self {
        match circuit {
            Circuit::Closed => Self::Closed,
            Circuit::Open { .. } => Self::Open,
            Circuit::HalfOpen { .. } => Self::HalfOpen,
        }
    }
}

/// Requests waiting in a bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct QueueReport {
    #[serde(deserialize_with = "lenient")]
    pub interactive: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub batch: Option<u64>,
    /// Refused requests waiting to be sent again.
    #[serde(deserialize_with = "lenient")]
    pub replays: Option<u64>,
}

/// The upstream's last rate-limit headers: one entry per family that was sent, keyed by its
/// label ([`Family::label`]), beside `age_secs`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct UpstreamReport {
    /// How long ago the headers came.
    #[serde(deserialize_with = "lenient")]
    pub age_secs: Option<f64>,
    /// Keyed by label rather than by [`Family`] so that a family only another
    /// version knows is carried, not fatal.
    #[serde(flatten, deserialize_with = "lenient_values")]
    pub families: BTreeMap<String, WindowReport>,
}

impl UpstreamReport {
    fn new(last: &LastHeaders) -> Self {
        let families = last
            .headers
            .iter()
            .map(|(family, window)| {
                let report = WindowReport {
                    limit: window.limit,
                    remaining: window.remaining,
                    reset_secs: window.reset.map(|reset| reset.as_secs_f64()),
                };
                (family.label().to_owned(), report)
            })
            .collect();
        Self {
            age_secs: Some(last.age.as_secs_f64()),
            families,
        }
    }

    /// One family's window, if the upstream sent it.
    pub(crate) fn family(&self, family: Family) -> Option<&WindowReport> {
        self.families.get(family.label())
    }
}

/// One `x-ratelimit-*` family as the upstream last sent it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct WindowReport {
    #[serde(deserialize_with = "lenient")]
    pub limit: Option<u64>,
    #[serde(deserialize_with = "lenient")]
    pub remaining: Option<u64>,
    /// Seconds until the window is full again, from when the headers came.
    #[serde(deserialize_with = "lenient")]
    pub reset_secs: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Last429Report {
    /// [`Reason::as_str`]: `requests`, `tokens`, `slow_down`, ...
    #[serde(deserialize_with = "lenient")]
    pub reason: Option<String>,
    /// How long the bucket paused for it.
    #[serde(deserialize_with = "lenient")]
    pub wait_secs: Option<f64>,
    #[serde(deserialize_with = "lenient")]
    pub age_secs: Option<f64>,
}

/// A field's value, or its default when the value has another type (a missing field takes
/// the container's default: every struct here is `#[serde(default)]`).
fn lenient<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(T::deserialize(value).unwrap_or_default())
}

/// A list read element by element: a mistyped element reads as the default one, and a value
/// that is not a list as an empty list.
fn lenient_each<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    let serde_json::Value::Array(items) = value else {
        return Ok(Vec::new());
    };
    Ok(items
        .into_iter()
        .map(|item| T::deserialize(item).unwrap_or_default())
        .collect())
}

/// A map read entry by entry: a mistyped value reads as the default one.
fn lenient_values<'de, D, T>(deserializer: D) -> Result<BTreeMap<String, T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    let entries = BTreeMap::<String, serde_json::Value>::deserialize(deserializer)?;
    Ok(entries
        .into_iter()
        .map(|(key, value)| (key, T::deserialize(value).unwrap_or_default()))
        .collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn circuit_labels_are_its_serde_names() {
        for state in [
            CircuitState::Closed,
            CircuitState::Open,
            CircuitState::HalfOpen,
        ] {
            assert_eq!(json!(state), json!(state.label()));
        }
    }

    #[test]
    fn a_document_reads_back_as_written() {
        let bucket = BucketReport {
            org: Some("acme".into()),
            model: Some("m".into()),
            circuit: Some(CircuitState::HalfOpen),
            upstream: Some(UpstreamReport {
                age_secs: Some(1.5),
                families: BTreeMap::from([(
                    "project_tokens".to_owned(),
                    WindowReport {
                        limit: Some(10),
                        remaining: Some(3),
                        reset_secs: None,
                    },
                )]),
            }),
            ..BucketReport::default()
        };
        let document = StatusDocument {
            version: Some("0.1.0".into()),
            buckets: vec![bucket.clone()],
            ..StatusDocument::default()
        };
        let read = StatusDocument::read(&json!(document));
        assert_eq!(read.buckets, [bucket]);
        assert_eq!(read.version.as_deref(), Some("0.1.0"));
    }

    #[test]
    fn mistyped_values_read_as_missing_and_spare_their_neighbours() {
        let read = StatusDocument::read(&json!({
            "version": 1,
            "draining": true,
            "quota_cooldowns": 3,
            "buckets": [
                7,
                {
                    "org": "acme",
                    "limits": {"in_force": {"rpm": "x", "tpm": 5}},
                    "circuit": "tripped",
                    "queue": [],
                    "upstream": {"age_secs": "old", "requests": 5, "tokens": {"limit": 9}},
                },
            ],
        }));
        assert_eq!(read.version, None);
        assert_eq!(read.draining, Some(true));
        assert!(read.quota_cooldowns.is_empty());
        assert_eq!(read.buckets[0], BucketReport::default());
        let acme = &read.buckets[1];
        assert_eq!(acme.org.as_deref(), Some("acme"));
        assert_eq!(acme.limits.in_force.rpm, None);
        assert_eq!(acme.limits.in_force.tpm, Some(5));
        assert_eq!(acme.circuit, None);
        assert_eq!(acme.queue, QueueReport::default());
        let upstream = acme.upstream.as_ref().expect("an object");
        assert_eq!(upstream.age_secs, None);
        assert_eq!(
            upstream.family(Family::Requests),
            Some(&WindowReport::default())
        );
        assert_eq!(
            upstream.family(Family::Tokens).and_then(|w| w.limit),
            Some(9)
        );
    }
}
