//! A mock OpenAI upstream that behaves like the real service (see `docs/upstream.md`):
//! per-(organization, model) continuously refilling request and token buckets that charge the
//! output cap at admission, `x-ratelimit-*` headers, OpenAI-worded 429s, SSE streams with usage,
//! and injectable faults. Tests start it with [`MockServer::start`]; the `mock-openai` binary
//! serves it for benchmarks.
//!
//! Module map:
//! - [`config`]: [`MockConfig`] and [`Limits`].
//! - `handler`: one request's lifecycle, from counting to the response.
//! - `bucket`: the limiter's pure math; `limiter`: the buckets of every (org, model).
//! - `request`: what a request costs and gets; `tokens`: the token-counting heuristic.
//! - `openai`: response bodies and SSE events; `error`: OpenAI-shaped errors.
//! - [`faults`], [`stats`]: what tests inject and observe; `control`: their HTTP routes.
//! - `duration`: Go-style durations as OpenAI writes them.

mod bucket;
pub mod config;
mod control;
mod duration;
mod error;
pub mod faults;
mod handler;
mod limiter;
mod openai;
mod request;
mod server;
pub mod stats;
mod tokens;

pub use bucket::Resource;
pub use config::{Limits, MockConfig};
pub use duration::go_duration;
pub use faults::{Fault, FaultRule};
pub use handler::org_for_key;
pub use server::MockServer;
pub use stats::{Received, Stats};
