//! `/_mock/*`: the HTTP face of [`crate::MockServer`]'s control methods, for tests that drive
//! the binary. Never counted in the stats.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use tokio::time::Instant;

use crate::config::Limits;
use crate::faults::FaultRule;
use crate::handler::App;
use crate::stats::Stats;

pub(crate) async fn stats(State(app): State<Arc<App>>) -> Json<Stats> {
    Json(app.stats.snapshot())
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    Many(Vec<FaultRule>),
    One(FaultRule),
}

pub(crate) async fn inject(
    State(app): State<Arc<App>>,
    Json(rules): Json<OneOrMany>,
) -> StatusCode {
    match rules {
        OneOrMany::Many(rules) => rules.into_iter().for_each(|rule| app.faults.push(rule)),
        OneOrMany::One(rule) => app.faults.push(rule),
    }
    StatusCode::NO_CONTENT
}

pub(crate) async fn clear_faults(State(app): State<Arc<App>>) -> StatusCode {
    app.faults.clear();
    StatusCode::NO_CONTENT
}

pub(crate) async fn reset(State(app): State<Arc<App>>) -> StatusCode {
    app.stats.reset();
    app.limiter.reset();
    StatusCode::NO_CONTENT
}

#[derive(serde::Deserialize)]
pub(crate) struct Spend {
    org: String,
    model: String,
    #[serde(default)]
    requests: u64,
    #[serde(default)]
    tokens: u64,
}

pub(crate) async fn spend(State(app): State<Arc<App>>, Json(spend): Json<Spend>) -> StatusCode {
    let now = Instant::now();
    app.limiter
        .spend(&spend.org, &spend.model, spend.requests, spend.tokens, now);
    StatusCode::NO_CONTENT
}

#[derive(serde::Deserialize)]
pub(crate) struct SetLimits {
    #[serde(default)]
    model: Option<String>,
    rpm: u64,
    tpm: u64,
}

pub(crate) async fn limits(State(app): State<Arc<App>>, Json(body): Json<SetLimits>) -> StatusCode {
    let limits = Limits {
        rpm: body.rpm,
        tpm: body.tpm,
    };
    app.limiter
        .set_limits(body.model.as_deref(), limits, Instant::now());
    StatusCode::NO_CONTENT
}
