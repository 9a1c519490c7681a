//! The shared store: bucket levels and pauses that several sluice replicas share through Redis
//! (or Valkey), so N sidecars of one team spend one budget instead of N.
//!
//! Every admission is one round trip: a server-side script (`scripts/admit.lua`) that takes
//! a request's whole cost from every limit of its bucket or none of them, on the server's
//! clock (`TIME`, so replicas' clocks never matter), and says on refusal how long until it
//! would fit, whether a burst another replica proved needs no proof, and the smaller burst another replica's 429 showed (`scripts/shrink.lua`). A settlement (`scripts/settle.lua`) is applied once per reservation: it first
//! sets a marker for the reservation's id (`SET NX`), so a settle that is retried or replayed
//! never charges twice. A 429's pause (`scripts/pause.lua`) holds for every replica.
//!
//! What one replica learns from the upstream, every replica knows: the limits its headers
//! announce (`scripts/learn.lua`, returned by every admission when they changed), the level
//! correction from their `remaining` (corrected for what *every* replica took after the
//! request, from the bucket's send counters, and applied with the request's settlement in the
//! same round trip), a 429's pause and an open circuit (a pause until the limit resets), the
//! burst a quantized limit allows, and an org's quota cool-down (`scripts/quota.lua`, heard by
//! every replica with its next heartbeat).
//!
//! Keys: `<prefix>{<org>}:b:<model>` holds a bucket (a hash: level and capacity per limit, the
//! time of its last refill, the pause, the send counters, the learned limits);
//! `<prefix>{<org>}:s:<replica>:<id>` marks a settled reservation; `<prefix>{sluice}:replicas`
//! is the heartbeat set and `<prefix>{sluice}:quota` the orgs in quota cool-down. The braces are
//! hash tags, so all of one org's keys share a Redis Cluster slot (what a script touches at
//! once is always in one slot). Levels refill continuously from the
//! stored time, so a bucket's TTL may be re-armed on every write: a key that expires has been
//! idle for two of its longest windows, and would be full again by then anyway. A replica that
//! dies holding reservations leaks nothing: their cost was taken from the level, which
//! refills; only their refunds are lost (the conservative side).
//!
//! When the store fails (an error, or no answer within `shared.store_timeout_secs`), a
//! breaker stops calling it for a moment, so an outage never adds a timeout to every request;
//! the heartbeat, once a second, is the probe that closes it again. Meanwhile each replica
//! either admits from a local bucket holding its share of the limit (the limit divided by the
//! replicas it last saw alive), or refuses with a 503 (`shared.on_store_error`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::time::Instant;

use crate::config::{OnStoreError, SharedConfig};
use crate::limiter::bucket::{Cost, Limits, MeterSpec, Resource, DAY, MINUTE};
use crate::limiter::status::SharedStoreReport;

/// How often a replica says it is alive (and probes an open breaker).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a heartbeat counts: a replica silent this long is no longer counted alive.
const ALIVE: Duration = Duration::from_secs(5);
/// How long the breaker stays open after the first failure, and at most.
const BREAKER_MIN: Duration = Duration::from_millis(500);
const BREAKER_MAX: Duration = Duration::from_secs(5);
/// How long a settled reservation's marker is kept: longer than any retry of its settle.
const SETTLED_TTL: Duration = Duration::from_secs(600);
/// The most of an upstream quota error's body shared with the other replicas.
const QUOTA_BODY_MAX: usize = 4096;

impl MeterSpec {
    /// The limit's field name in the bucket's hash: `rm`, `tm`, `rd`, `td`.
    fn name(&self) -> &'static str {
        match (self.resource, self.window == DAY) {
            (Resource::Requests, false) => "rm",
            (Resource::Tokens, false) => "tm",
            (Resource::Requests, true) => "rd",
            (Resource::Tokens, true) => "td",
        }
    }
}

/// How an admission asks ([`Store::admit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A new request: within the proven part of the burst only.
    New = 0,
    /// The request that proves the burst.
    Proof = 1,
    /// A refused request sent again (the reserve and the proof do not apply).
    Again = 2,
}

/// What every replica had taken from a bucket (its send counters), as an admission saw
/// them: a header answering that admission's request had not seen what came after.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Sent {
    pub requests: i64,
    pub tokens: i64,
}

/// The level correction one response's headers ask for, sent with its settlement
/// ([`Store::settle`]).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Correction {
    /// The counters when the request was admitted (this admission included): what had been
    /// sent when the headers came is never less.
    pub sent: Sent,
    /// When the headers came: what was sent before is taken as seen by the upstream, and
    /// the refill since is allowed for.
    pub at: Instant,
    /// What the upstream had left, per resource and window.
    pub remaining: Vec<(Resource, Duration, f64)>,
}

/// The store's answer to an admission, and what it tells beside it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Reply {
    pub admission: Admission,
    /// The bucket's send counters after it.
    pub sent: Sent,
    /// The version of the learned limits in the store (0: none published).
    pub version: u64,
    /// The learned limits, when the store's version is newer than the caller's.
    pub learned: Option<Limits>,
}

/// An org another replica found out of quota, as the heartbeat hears of it.
#[derive(Clone, Debug)]
pub(crate) struct HeardQuota {
    pub org: String,
    /// The upstream's answer, replayed to the org's requests meanwhile.
    pub status: http::StatusCode,
    pub body: bytes::Bytes,
    /// When the cool-down ends.
    pub until: Instant,
}

/// A bucket's keys in the store.
#[derive(Clone, Debug)]
pub(crate) struct BucketKeys {
    /// The bucket's hash.
    pub bucket: String,
    /// The prefix of its settled reservations' markers.
    marker: String,
}

/// The store's answer to an admission.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Admission {
    /// Taken; the levels after it, in the order of the specs.
    Taken { levels: Vec<f64> },
    /// Not before this wait (the refill, or the burst's proof).
    Wait { wait: Duration, unproven: bool },
    /// The bucket is paused after an upstream 429, for this long.
    Paused(Duration),
}

/// Why a store call failed, as the errors metric labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreError {
    /// No answer within the store timeout.
    Timeout,
    /// The connection failed or was refused.
    Connection,
    /// The store answered with an error, or with something the scripts never return.
    Reply,
    /// The breaker is open: the store was not called.
    Down,
}

impl StoreError {
    fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::Reply => "reply",
            Self::Down => "down",
        }
    }
}

/// The store's metrics, registered beside sluice's others.
struct StoreMetrics {
    up: IntGauge,
    duration: Histogram,
    errors: IntCounterVec,
    replicas: IntGauge,
}

impl StoreMetrics {
    fn new(registry: &Registry) -> Self {
        let up = IntGauge::new(
            "sluice_shared_store_up",
            "1 while the shared store (Redis) is in use, 0 while this replica is degraded.",
        )
        .expect("a valid gauge");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "sluice_shared_store_duration_seconds",
                "Round trips to the shared store (admission, settlement, pause, heartbeat).",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
        )
        .expect("a valid histogram");
        let errors = IntCounterVec::new(
            Opts::new(
                "sluice_shared_store_errors_total",
                "Shared-store calls that failed, by kind (timeout, connection, reply, down: \
                 not called while the breaker is open).",
            ),
            &["kind"],
        )
        .expect("a valid counter");
        let replicas = IntGauge::new(
            "sluice_shared_replicas",
            "sluice replicas seen alive through the shared store's heartbeats.",
        )
        .expect("a valid gauge");
        for metric in [
            Box::new(up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(errors.clone()),
            Box::new(replicas.clone()),
        ] {
            // Registered once per registry; a second store on one registry is a bug.
            let _ = registry.register(metric);
        }
        for kind in [
            StoreError::Timeout,
            StoreError::Connection,
            StoreError::Reply,
            StoreError::Down,
        ] {
            errors.with_label_values(&[kind.label()]);
        }
        Self {
            up,
            duration,
            errors,
            replicas,
        }
    }
}

/// The breaker: after a failure the store is not called until `open_until`.
#[derive(Debug, Default)]
struct Breaker {
    open_until: Option<Instant>,
    /// How long it opens next time (doubling while failures continue).
    next: Duration,
}

/// The connection to the shared store, its scripts and its health.
pub(crate) struct Store {
    connection: ConnectionManager,
    /// The store's address, without its password.
    url: String,
    prefix: String,
    timeout: Duration,
    on_error: OnStoreError,
    /// This process's id in the heartbeat set and in settlement markers.
    replica: String,
    admit: Script,
    settle: Script,
    pause: Script,
    prove: Script,
    shrink: Script,
    learn: Script,
    learned: Script,
    release: Script,
    quota: Script,
    heartbeat: Script,
    breaker: Mutex<Breaker>,
    up: AtomicBool,
    replicas: AtomicUsize,
    metrics: StoreMetrics,
}

impl Store {
    /// A store for `config`, connecting lazily (the first call connects); its metrics go to
    /// `registry`. Fails only on a URL the client cannot read.
    pub(crate) fn new(config: &SharedConfig, registry: &Registry) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|err| format!("shared.redis_url: {err}"))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.store_timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(config.store_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|err| format!("shared.redis_url: {err}"))?;
        let metrics = StoreMetrics::new(registry);
        metrics.up.set(1);
        let store = Arc::new(Self {
            connection,
            url: crate::config::redacted_url(&config.redis_url),
            prefix: config.key_prefix.clone(),
            timeout: config.store_timeout,
            on_error: config.on_store_error,
            replica: format!("{:016x}", fastrand::u64(..)),
            admit: Script::new(include_str!("scripts/admit.lua")),
            settle: Script::new(include_str!("scripts/settle.lua")),
            pause: Script::new(include_str!("scripts/pause.lua")),
            prove: Script::new(include_str!("scripts/prove.lua")),
            shrink: Script::new(include_str!("scripts/shrink.lua")),
            learn: Script::new(include_str!("scripts/learn.lua")),
            learned: Script::new(include_str!("scripts/learned.lua")),
            release: Script::new(include_str!("scripts/release.lua")),
            quota: Script::new(include_str!("scripts/quota.lua")),
            heartbeat: Script::new(include_str!("scripts/heartbeat.lua")),
            breaker: Mutex::new(Breaker::default()),
            up: AtomicBool::new(true),
            replicas: AtomicUsize::new(1),
            metrics,
        });
        Ok(store)
    }

    /// Starts the heartbeat, which also probes an open breaker and hears of the orgs other
    /// replicas found out of quota (handed to `heard`, which says `false` once nobody
    /// listens any more). It ends with the store.
    pub(crate) fn start<F>(self: &Arc<Self>, heard: F)
    where
        F: Fn(HeardQuota) -> bool + Send + Sync + 'static,
    {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { return };
                for quota in store.beat().await {
                    if !heard(quota) {
                        return;
                    }
                }
            }
        });
    }

    /// The key every replica's global state shares a slot under.
    fn global(&self, name: &str) -> String {
        format!("{}{{sluice}}:{name}", self.prefix)
    }

    /// One heartbeat: the orgs other replicas found out of quota come back.
    async fn beat(&self) -> Vec<HeardQuota> {
        let mut heard = Vec::new();
        let mut invocation = self.heartbeat.key(self.global("replicas"));
        invocation
            .key(self.global("quota"))
            .arg(&self.replica)
            .arg(ALIVE.as_secs_f64());
        // The heartbeat is the breaker's probe: it runs whether the breaker is open or not.
        match self.call::<Vec<Value>>(&invocation, true).await {
            Ok(reply) => {
                let alive = reply.first().and_then(integer).unwrap_or(1);
                let alive = usize::try_from(alive).unwrap_or(1).max(1);
                self.replicas.store(alive, Ordering::Relaxed);
                self.metrics.replicas.set(alive as i64);
                let now = Instant::now();
                for entry in reply.get(1..).unwrap_or_default().chunks_exact(4) {
                    let (Some(org), Some(left), Some(status), Some(body)) = (
                        text(&entry[0]),
                        integer(&entry[1]),
                        integer(&entry[2]),
                        bytes(&entry[3]),
                    ) else {
                        continue;
                    };
                    let Ok(status) = http::StatusCode::from_u16(status as u16) else {
                        continue;
                    };
                    heard.push(HeardQuota {
                        org,
                        status,
                        body,
                        until: now + Duration::from_millis(left.max(0) as u64),
                    });
                }
            }
            Err(err) => tracing::debug!(error = err.label(), "shared store heartbeat failed"),
        }
        heard
    }

    /// Puts `org` in quota cool-down for every replica for `cooldown` (the upstream answered
    /// `status` with `body`); they hear of it with their next heartbeat.
    pub(crate) async fn quota(
        &self,
        org: &str,
        cooldown: Duration,
        status: http::StatusCode,
        body: &[u8],
    ) -> Result<(), StoreError> {
        let mut invocation = self.quota.key(self.global("quota"));
        invocation
            .arg(org)
            .arg(cooldown.as_millis() as u64)
            .arg(status.as_u16())
            .arg(&body[..body.len().min(QUOTA_BODY_MAX)]);
        let _: i64 = self.call(&invocation, false).await?;
        Ok(())
    }

    /// Whether the store is in use now (the breaker is closed).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether the store is in use now; while the breaker is open, counts the call the
    /// caller skips as a `down` error.
    pub(crate) fn usable(&self) -> bool {
        let up = self.is_up();
        if !up {
            self.metrics
                .errors
                .with_label_values(&[StoreError::Down.label()])
                .inc();
        }
        up
    }

    /// The store as the status view shows it.
    pub(crate) fn report(&self) -> SharedStoreReport {
        SharedStoreReport {
            url: Some(self.url.clone()),
            up: Some(self.is_up()),
            replicas: Some(self.replicas() as u64),
            on_store_error: Some(
                match self.on_error {
                    OnStoreError::Degrade => "degrade",
                    OnStoreError::FailClosed => "fail_closed",
                }
                .to_owned(),
            ),
        }
    }

    /// What a replica does while the store is down.
    pub(crate) fn on_error(&self) -> OnStoreError {
        self.on_error
    }

    /// The replicas seen alive at the last heartbeat (at least this one).
    pub(crate) fn replicas(&self) -> usize {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// A bucket's keys; the org's name is escaped so it cannot end the hash tag early.
    pub(crate) fn bucket_keys(&self, org: &str, model: &str) -> BucketKeys {
        let mut tag = String::with_capacity(self.prefix.len() + org.len() + 2);
        tag.push_str(&self.prefix);
        tag.push('{');
        escape(&mut tag, org);
        tag.push('}');
        BucketKeys {
            bucket: format!("{tag}:b:{model}"),
            marker: format!("{tag}:s:{}:", self.replica),
        }
    }

    /// Takes `cost` from the bucket at `key`, all limits or none (see `scripts/admit.lua`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn admit(
        &self,
        key: &str,
        cost: Cost,
        keep: f64,
        in_hand: f64,
        mode: Mode,
        version: u64,
        meters: &[MeterSpec],
    ) -> Result<Reply, StoreError> {
        let mut invocation = self.admit.key(key);
        invocation
            .arg(cost.requests)
            .arg(cost.tokens)
            .arg(keep)
            .arg(in_hand)
            .arg(mode as u8)
            .arg(ttl_ms(meters))
            .arg(version);
        for meter in meters {
            invocation
                .arg(meter.name())
                .arg(resource_code(meter.resource))
                .arg(meter.capacity)
                .arg(meter.window.as_secs_f64())
                .arg(meter.burst)
                .arg(u8::from(meter.unproven))
                .arg(meter.level)
                .arg(meter.debt);
        }
        let reply: Vec<Value> = self.call(&invocation, false).await?;
        let number = |index: usize| reply.get(index).and_then(float).ok_or(StoreError::Reply);
        let millis = || number(1).map(|ms| Duration::from_millis(ms.max(0.0) as u64));
        let admission = match number(0)? as i64 {
            1 => {
                let levels = (0..meters.len())
                    .map(|index| number(index + 9))
                    .collect::<Result<_, _>>()?;
                Admission::Taken { levels }
            }
            0 => Admission::Wait {
                wait: millis()?,
                unproven: false,
            },
            2 => Admission::Wait {
                wait: millis()?,
                unproven: true,
            },
            3 => Admission::Paused(millis()?),
            _ => return Err(StoreError::Reply),
        };
        let sent = Sent {
            requests: number(2)? as i64,
            tokens: number(3)? as i64,
        };
        let stored = number(4)? as u64;
        let learned = match reply.get(5..9) {
            Some(fields) if text(&fields[0]).as_deref() != Some("-") => {
                Some(learned_limits(fields).ok_or(StoreError::Reply)?)
            }
            _ => None,
        };
        Ok(Reply {
            admission,
            sent,
            version: stored,
            learned,
        })
    }

    /// Publishes the limits this replica learned from the upstream's headers; returns their
    /// version in the store (raised when they changed).
    pub(crate) async fn learn(
        &self,
        key: &str,
        limits: &Limits,
        meters: &[MeterSpec],
    ) -> Result<u64, StoreError> {
        let mut invocation = self.learn.key(key);
        invocation.arg(ttl_ms(meters));
        for limit in [limits.rpm, limits.tpm, limits.rpd, limits.tpd] {
            invocation.arg(limit.map_or_else(String::new, |limit| limit.to_string()));
        }
        let version: i64 = self.call(&invocation, false).await?;
        Ok(version.max(0) as u64)
    }

    /// The learned limits every replica shares, and their version (0 and none when nothing
    /// was published).
    pub(crate) async fn learned(&self, key: &str) -> Result<(u64, Limits), StoreError> {
        let invocation = self.learned.key(key);
        let reply: Vec<Value> = self.call(&invocation, false).await?;
        let version = reply.first().and_then(integer).ok_or(StoreError::Reply)?;
        let limits = reply
            .get(1..5)
            .and_then(learned_limits)
            .ok_or(StoreError::Reply)?;
        Ok((version.max(0) as u64, limits))
    }

    /// Applies a reservation's settlement once: `cost` per limit, charged beyond the
    /// estimate or `refund`ed, and the `correction` its response's headers asked for, if
    /// any, in the same round trip. `Ok(false)` when this `ticket` was already settled.
    pub(crate) async fn settle(
        &self,
        keys: &BucketKeys,
        ticket: u64,
        meters: &[MeterSpec],
        cost: Cost,
        refund: bool,
        correction: Option<&Correction>,
    ) -> Result<bool, StoreError> {
        let mut invocation = self.settle.key(&keys.bucket);
        invocation
            .key(format!("{}{ticket}", keys.marker))
            .arg(SETTLED_TTL.as_millis() as u64)
            .arg(ttl_ms(meters));
        match correction {
            Some(correction) => invocation
                .arg(correction.sent.requests)
                .arg(correction.sent.tokens)
                .arg(correction.at.elapsed().as_secs_f64()),
            None => invocation.arg("").arg("").arg(0),
        };
        let sign = if refund { -1.0 } else { 1.0 };
        for meter in meters {
            let amount = cost.of(meter.resource);
            let remaining = correction
                .and_then(|correction| {
                    correction
                        .remaining
                        .iter()
                        .find(|(resource, window, _)| {
                            *resource == meter.resource && *window == meter.window
                        })
                        .map(|(_, _, remaining)| remaining.to_string())
                })
                .unwrap_or_default();
            invocation
                .arg(meter.name())
                .arg(resource_code(meter.resource))
                .arg(meter.capacity)
                .arg(meter.window.as_secs_f64())
                .arg(meter.burst)
                .arg(sign * amount)
                .arg(remaining);
        }
        let applied: i64 = self.call(&invocation, false).await?;
        Ok(applied == 1)
    }

    /// Pauses the bucket at `key` for every replica for `wait` (a longer pause already set
    /// stands); returns the pause now in force.
    pub(crate) async fn pause(
        &self,
        key: &str,
        wait: Duration,
        meters: &[MeterSpec],
    ) -> Result<Duration, StoreError> {
        let mut invocation = self.pause.key(key);
        invocation.arg(wait.as_millis() as u64).arg(ttl_ms(meters));
        let left: i64 = self.call(&invocation, false).await?;
        Ok(Duration::from_millis(left.max(0) as u64))
    }

    /// Records the burst of every limit in `meters` as proven, for every replica.
    pub(crate) async fn prove(&self, key: &str, meters: &[MeterSpec]) -> Result<(), StoreError> {
        let mut invocation = self.prove.key(key);
        invocation.arg(ttl_ms(meters));
        for meter in meters {
            invocation.arg(meter.name()).arg(meter.burst);
        }
        let _: i64 = self.call(&invocation, false).await?;
        Ok(())
    }

    /// Ends this replica's claim on the burst proof of the bucket at `key` when its proof
    /// proved nothing, so the next proof (any replica's) need not wait for the claim to lapse.
    pub(crate) async fn release(&self, key: &str) -> Result<(), StoreError> {
        let invocation = self.release.key(key);
        let _: i64 = self.call(&invocation, false).await?;
        Ok(())
    }

    /// Records the smaller burst a 429 showed (a quantized limit) for every limit in `meters`
    /// whose burst is below its capacity, and empties it, for every replica, for `hold`.
    pub(crate) async fn shrink(
        &self,
        key: &str,
        meters: &[MeterSpec],
        hold: Duration,
    ) -> Result<(), StoreError> {
        let mut invocation = self.shrink.key(key);
        invocation.arg(ttl_ms(meters)).arg(hold.as_secs_f64());
        for meter in meters.iter().filter(|meter| meter.burst < meter.capacity) {
            invocation.arg(meter.name()).arg(meter.burst);
        }
        let _: i64 = self.call(&invocation, false).await?;
        Ok(())
    }

    /// One script call, bounded by the store timeout and skipped while the breaker is open
    /// (unless `probe`); failures open the breaker, a success closes it.
    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        probe: bool,
    ) -> Result<T, StoreError> {
        let now = Instant::now();
        if !probe && self.breaker_open(now) {
            self.metrics
                .errors
                .with_label_values(&[StoreError::Down.label()])
                .inc();
            return Err(StoreError::Down);
        }
        let mut connection = self.connection.clone();
        let result = tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection))
            .await
            .map_err(|_| StoreError::Timeout)
            .and_then(|reply| {
                reply.map_err(|err| {
                    if err.is_io_error() || err.is_connection_dropped() || err.is_timeout() {
                        StoreError::Connection
                    } else {
                        StoreError::Reply
                    }
                })
            });
        self.metrics.duration.observe(now.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.closed(),
            Err(err) => self.failed(*err, now),
        }
        result
    }

    fn breaker_open(&self, now: Instant) -> bool {
        let breaker = self
            .breaker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        breaker.open_until.is_some_and(|until| until > now)
    }

    fn closed(&self) {
        let mut breaker = self
            .breaker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        breaker.open_until = None;
        breaker.next = BREAKER_MIN;
        drop(breaker);
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!("shared store reachable again: buckets are shared once more");
            self.metrics.up.set(1);
        }
    }

    fn failed(&self, err: StoreError, now: Instant) {
        self.metrics.errors.with_label_values(&[err.label()]).inc();
        let mut breaker = self
            .breaker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let open_for = breaker.next.clamp(BREAKER_MIN, BREAKER_MAX);
        breaker.open_until = Some(now + open_for);
        breaker.next = (open_for * 2).min(BREAKER_MAX);
        drop(breaker);
        if self.up.swap(false, Ordering::Relaxed) {
            let degraded = match self.on_error {
                OnStoreError::Degrade => format!(
                    "admitting from this replica's share of each limit (1/{})",
                    self.replicas()
                ),
                OnStoreError::FailClosed => "refusing metered requests with 503".to_owned(),
            };
            tracing::warn!(
                error = err.label(),
                "shared store unreachable; {degraded} until it answers again"
            );
            self.metrics.up.set(0);
        }
    }
}

/// How the scripts name a resource.
fn resource_code(resource: Resource) -> u8 {
    match resource {
        Resource::Requests => 0,
        Resource::Tokens => 1,
    }
}

fn float(value: &Value) -> Option<f64> {
    match value {
        Value::Int(n) => Some(*n as f64),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

fn bytes(value: &Value) -> Option<bytes::Bytes> {
    match value {
        Value::BulkString(bytes) => Some(bytes::Bytes::copy_from_slice(bytes)),
        Value::SimpleString(text) => Some(bytes::Bytes::copy_from_slice(text.as_bytes())),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Learned limits as the scripts return them: rpm, tpm, rpd, tpd, empty for none.
fn learned_limits(fields: &[Value]) -> Option<Limits> {
    let limit = |value: &Value| -> Option<Option<u64>> {
        let text = text(value)?;
        if text.is_empty() {
            return Some(None);
        }
        text.parse().ok().map(Some)
    };
    Some(Limits {
        rpm: limit(fields.first()?)?,
        tpm: limit(fields.get(1)?)?,
        rpd: limit(fields.get(2)?)?,
        tpd: limit(fields.get(3)?)?,
    })
}

/// A bucket hash's TTL: two of its longest windows (it is full again by then).
fn ttl_ms(meters: &[MeterSpec]) -> u64 {
    let longest = meters
        .iter()
        .map(|meter| meter.window)
        .max()
        .unwrap_or(MINUTE);
    (longest * 2).as_millis() as u64
}

/// Appends `name` with `%`, `{` and `}` percent-escaped.
fn escape(out: &mut String, name: &str) {
    for c in name.chars() {
        match c {
            '%' | '{' | '}' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `redis-server` on a free port, killed when dropped (installed by `.ci/run`).
    struct Redis(std::process::Child, u16);

    impl Redis {
        fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .map(|addr| addr.port())
                .expect("a free port");
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is installed (apt-get install redis-server)");
            // Dropping it kills and waits for the server, however the test ends.
            let redis = Self(child, port);
            for _ in 0..200 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return redis;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            panic!("redis-server did not start");
        }

        fn store(&self) -> Arc<Store> {
            let config = SharedConfig {
                redis_url: format!("redis://127.0.0.1:{}/0", self.1),
                key_prefix: "sluice-test:".to_owned(),
                store_timeout: Duration::from_secs(1),
                on_store_error: OnStoreError::Degrade,
            };
            Store::new(&config, &Registry::new()).expect("a store")
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn tpm(limit: f64) -> Vec<MeterSpec> {
        vec![MeterSpec {
            resource: Resource::Tokens,
            window: MINUTE,
            capacity: limit,
            burst: limit,
            unproven: false,
            level: limit,
            debt: 0.0,
        }]
    }

    fn level(reply: Reply) -> f64 {
        match reply.admission {
            Admission::Taken { levels } => levels[0],
            other => panic!("not taken: {other:?}"),
        }
    }

    #[tokio::test]
    async fn admission_is_all_or_nothing_and_says_how_long_to_wait() {
        let redis = Redis::start();
        let store = redis.store();
        let keys = store.bucket_keys("acme", "gpt-4o");
        let key = keys.bucket.clone();
        let meters = tpm(6000.0);
        let take = |tokens| {
            store.admit(
                &key,
                Cost {
                    requests: 1,
                    tokens,
                },
                0.0,
                0.0,
                Mode::New,
                0,
                &meters,
            )
        };
        let after = level(take(5000).await.expect("admitted"));
        assert!((1000.0..1002.0).contains(&after), "{after}");
        // 2000 more do not fit; the wait is the refill of the missing ~1000 (100 per second).
        match take(2000).await.expect("answered").admission {
            Admission::Wait { wait, unproven } => {
                assert!(!unproven);
                assert!(
                    (Duration::from_millis(9_800)..=Duration::from_millis(10_000)).contains(&wait),
                    "{wait:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Nothing was taken by the refusal.
        let now = level(take(0).await.expect("admitted"));
        assert!((1000.0..1005.0).contains(&now), "{now}");
    }

    #[tokio::test]
    async fn a_settle_is_applied_once_per_reservation() {
        let redis = Redis::start();
        let store = redis.store();
        let keys = store.bucket_keys("acme", "gpt-4o");
        let key = keys.bucket.clone();
        let meters = tpm(6000.0);
        let nothing = Cost {
            requests: 0,
            tokens: 0,
        };
        let taken = store.admit(
            &key,
            Cost {
                requests: 0,
                tokens: 3000,
            },
            0.0,
            0.0,
            Mode::New,
            0,
            &meters,
        );
        let before = level(taken.await.expect("admitted"));
        let refund = Cost {
            requests: 0,
            tokens: 1000,
        };
        assert!(store
            .settle(&keys, 7, &meters, refund, true, None)
            .await
            .expect("settled"));
        // The same reservation again (a retried or replayed settle): not applied.
        assert!(!store
            .settle(&keys, 7, &meters, refund, true, None)
            .await
            .expect("answered"));
        let after = level(
            store
                .admit(&key, nothing, 0.0, 0.0, Mode::New, 0, &meters)
                .await
                .expect("admitted"),
        );
        assert!(
            (before + 1000.0..before + 1005.0).contains(&after),
            "{before} -> {after}"
        );
        // Another reservation's debt is its own.
        assert!(store
            .settle(&keys, 8, &meters, refund, false, None)
            .await
            .expect("settled"));
    }

    #[tokio::test]
    async fn a_correction_never_subtracts_what_was_sent_before_the_headers_came() {
        let redis = Redis::start();
        let store = redis.store();
        let keys = store.bucket_keys("acme", "gpt-4o");
        let rpm = vec![MeterSpec {
            resource: Resource::Requests,
            window: MINUTE,
            capacity: 60.0,
            burst: 60.0,
            unproven: false,
            level: 60.0,
            debt: 0.0,
        }];
        let one = Cost {
            requests: 1,
            tokens: 0,
        };
        let admit = || store.admit(&keys.bucket, one, 0.0, 0.0, Mode::New, 0, &rpm);
        let first = admit().await.expect("admitted").sent;
        // Nine more, from any replica, overtake the first on the way: the upstream counted all
        // ten when it answered the first, with 50 left.
        for _ in 0..9 {
            admit().await.expect("admitted");
        }
        let correction = Correction {
            sent: first,
            at: Instant::now(),
            remaining: vec![(Resource::Requests, MINUTE, 50.0)],
        };
        let nothing = Cost::default();
        assert!(store
            .settle(&keys, 1, &rpm, nothing, true, Some(&correction))
            .await
            .expect("settled"));
        let after = level(admit().await.expect("admitted"));
        // 50, less the admission just made: the nine were not subtracted a second time.
        assert!((48.5..50.0).contains(&after), "{after}");
        // Someone else spent 30 more: the next answer shows it, and every replica holds back.
        let correction = Correction {
            sent: first,
            at: Instant::now(),
            remaining: vec![(Resource::Requests, MINUTE, 19.0)],
        };
        store
            .settle(&keys, 2, &rpm, nothing, true, Some(&correction))
            .await
            .expect("settled");
        let after = level(admit().await.expect("admitted"));
        assert!((17.5..19.0).contains(&after), "{after}");
    }

    #[tokio::test]
    async fn a_bucket_the_store_lost_starts_from_the_level_its_caller_knew() {
        let redis = Redis::start();
        let store = redis.store();
        let keys = store.bucket_keys("acme", "gpt-4o");
        let mut meters = tpm(6000.0);
        // The replica last saw 500 left (and owes 100 it spent while the store was away).
        meters[0].level = 500.0;
        meters[0].debt = 100.0;
        let cost = Cost {
            requests: 0,
            tokens: 50,
        };
        let after = level(
            store
                .admit(&keys.bucket, cost, 0.0, 0.0, Mode::New, 0, &meters)
                .await
                .expect("admitted"),
        );
        assert!((350.0..352.0).contains(&after), "{after}");
        // Once the bucket exists the hint is not used (and a debt of 0 takes nothing).
        meters[0].level = 6000.0;
        meters[0].debt = 0.0;
        let again = level(
            store
                .admit(&keys.bucket, cost, 0.0, 0.0, Mode::New, 0, &meters)
                .await
                .expect("admitted"),
        );
        assert!((300.0..305.0).contains(&again), "{again}");
        // A settle does not create a lost bucket full: it leaves it to the next admission.
        let other = store.bucket_keys("acme", "gpt-4o-mini");
        store
            .settle(&other, 9, &tpm(6000.0), cost, true, None)
            .await
            .expect("settled");
        meters[0].level = 10.0;
        match store
            .admit(&other.bucket, cost, 0.0, 0.0, Mode::New, 0, &meters)
            .await
            .expect("answered")
            .admission
        {
            // 40 short of the 50 at 100 a second: the bucket started at the caller's 10.
            Admission::Wait { wait, .. } => {
                assert!(wait >= Duration::from_millis(390), "{wait:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_pause_holds_for_every_caller_and_a_longer_one_stands() {
        let redis = Redis::start();
        let store = redis.store();
        let keys = store.bucket_keys("acme", "gpt-4o");
        let key = keys.bucket.clone();
        let meters = tpm(6000.0);
        let left = store
            .pause(&key, Duration::from_secs(2), &meters)
            .await
            .expect("paused");
        assert!(left > Duration::from_millis(1900), "{left:?}");
        let shorter = store
            .pause(&key, Duration::from_millis(100), &meters)
            .await
            .expect("paused");
        assert!(shorter > Duration::from_millis(1900), "{shorter:?}");
        let cost = Cost {
            requests: 1,
            tokens: 1,
        };
        match store
            .admit(&key, cost, 0.0, 0.0, Mode::New, 0, &meters)
            .await
            .expect("answered")
            .admission
        {
            Admission::Paused(wait) => assert!(wait > Duration::from_millis(1800), "{wait:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_burst_one_replica_found_smaller_caps_every_replica() {
        let redis = Redis::start();
        let store = redis.store();
        let keys = store.bucket_keys("acme", "gpt-4o");
        let key = keys.bucket.clone();
        let rpm = |burst| {
            vec![MeterSpec {
                resource: Resource::Requests,
                window: MINUTE,
                capacity: 240.0,
                burst,
                unproven: false,
                level: burst,
                debt: 0.0,
            }]
        };
        let one = Cost {
            requests: 1,
            tokens: 0,
        };
        // The replica that saw the 429 shrank its burst to 4 and empties it, for everyone.
        store
            .shrink(&key, &rpm(4.0), Duration::from_secs(60))
            .await
            .expect("shrunk");
        // Another replica still believes in the whole 240: it waits for the refill (4 per
        // second) like the first, instead of sending a burst into the quantized limit.
        match store
            .admit(&key, one, 0.0, 0.0, Mode::New, 0, &rpm(240.0))
            .await
            .expect("answered")
            .admission
        {
            Admission::Wait { wait, .. } => {
                assert!(wait <= Duration::from_millis(260), "{wait:?}");
            }
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let level = level(
            store
                .admit(&key, one, 0.0, 0.0, Mode::New, 0, &rpm(240.0))
                .await
                .expect("admitted"),
        );
        // Refilled to at most the shrunk burst of 4, less this request.
        assert!(level <= 3.0, "{level}");
    }

    #[tokio::test]
    async fn an_unreachable_store_fails_fast_then_is_not_called() {
        let redis = Redis::start();
        let store = redis.store();
        drop(redis);
        let keys = store.bucket_keys("acme", "gpt-4o");
        let key = keys.bucket.clone();
        let cost = Cost {
            requests: 1,
            tokens: 1,
        };
        let first = store
            .admit(&key, cost, 0.0, 0.0, Mode::New, 0, &tpm(10.0))
            .await;
        assert!(
            matches!(first, Err(StoreError::Connection | StoreError::Timeout)),
            "{first:?}"
        );
        assert!(!store.is_up());
        let started = Instant::now();
        let second = store
            .admit(&key, cost, 0.0, 0.0, Mode::New, 0, &tpm(10.0))
            .await;
        assert_eq!(second, Err(StoreError::Down));
        assert!(started.elapsed() < Duration::from_millis(5));
    }

    #[test]
    fn names_cannot_end_the_hash_tag() {
        let mut out = String::new();
        escape(&mut out, "a}b{c%");
        assert_eq!(out, "a%7Db%7Bc%25");
    }
}
