//! What requests can make sluice keep, over real HTTP: made-up keys and model names flood the
//! bucket table and the metric labels, and neither may turn admission control off for a
//! configured org or grow `/metrics` without bound. Outcomes are counted at the mock upstream
//! and in the scrape, never timed.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use futures_util::StreamExt;
use prometheus_parse::{Scrape, Value};

const BETA_KEY: &str = "sk-beta-org-key-0000000000000000000";
const MODEL: &str = "gpt-4o-mini";

fn chat(model: &str) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 5,
    })
}

/// Posts a chat request; `wait_zero` asks sluice to reject rather than queue.
async fn post(sluice: &Sluice, key: &str, model: &str, wait_zero: bool) -> reqwest::StatusCode {
    let mut request = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat(model));
    if wait_zero {
        request = request.header("x-sluice-max-wait", "0");
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    response.bytes().await.unwrap();
    status
}

async fn scrape(sluice: &Sluice) -> Scrape {
    let text = metrics_text(sluice).await;
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).expect("valid exposition format")
}

/// The sum of the samples of `name` whose labels include `labels`.
fn total(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(label, wanted)| sample.labels.get(label) == Some(*wanted))
        })
        .map(|sample| match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{name} is not a single value: {other:?}"),
        })
        .sum()
}

/// Requests the mock upstream has received so far.
fn upstream_requests(mock: &mock_openai::MockServer) -> u64 {
    mock.stats().requests
}

#[tokio::test]
async fn a_flood_of_made_up_keys_leaves_configured_orgs_metered() {
    let mock = mock().await;
    let max_buckets = 8;
    let toml = format!(
        "[queue]\nmax_buckets = {max_buckets}\nrefill_margin_secs = 0\n\
         [[org]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n[org.limits.\"*\"]\nrpm = 2\n\
         [[org]]\nname = \"beta\"\nkeys = [\"{BETA_KEY}\"]\n[org.limits.\"*\"]\nrpm = 2\n"
    );
    let sluice = Sluice::start_with(&mock.url(), &toml).await;

    // acme spends its minute before the flood.
    for _ in 0..2 {
        assert_eq!(post(&sluice, KEY, MODEL, true).await, 200);
    }
    // Made-up keys: an automatic org each, a learned bucket each, five times the cap.
    let flood = 5 * max_buckets;
    for i in 0..flood {
        let key = format!("sk-made-up-{i:04}-000000000000000000000");
        assert_eq!(post(&sluice, &key, MODEL, false).await, 200);
    }
    assert_eq!(upstream_requests(&mock), 2 + flood as u64);

    // acme's bucket survived the flood with what it had spent: nothing more fits.
    for _ in 0..4 {
        assert_eq!(post(&sluice, KEY, MODEL, true).await, 429);
    }
    assert_eq!(
        upstream_requests(&mock),
        2 + flood as u64,
        "acme went beyond its budget"
    );
    // beta's first bucket is made after the cap was reached: still metered.
    let mut passed = 0;
    for _ in 0..6 {
        if post(&sluice, BETA_KEY, MODEL, true).await == 200 {
            passed += 1;
        }
    }
    assert_eq!(passed, 2, "beta has 2 rpm");
    assert_eq!(
        upstream_requests(&mock),
        2 + flood as u64 + 2,
        "beta's requests beyond its budget reached the upstream"
    );

    let scrape = scrape(&sluice).await;
    let evicted = total(&scrape, "sluice_buckets_evicted_total", &[]);
    assert!(
        evicted >= (flood - max_buckets) as f64,
        "evicted {evicted} of {flood} learned buckets"
    );
    let buckets = total(&scrape, "sluice_buckets", &[]);
    assert!(
        buckets <= max_buckets as f64,
        "{buckets} buckets for a cap of {max_buckets}"
    );
    sluice.stop().await;
}

#[tokio::test]
async fn org_and_model_label_pairs_are_bounded_and_fold_into_other() {
    let mock = mock().await;
    let toml = format!("[[org]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n");
    let sluice = Sluice::start_with(&mock.url(), &toml).await;

    // Made-up keys times made-up models: 750 pairs, within the old caps of 200 orgs and 100
    // models, beyond the share of the pair bound automatic orgs may take.
    let (keys, models) = (25, 30);
    let automatic_share = sluice::metrics::MAX_LABEL_PAIRS / 2;
    assert!(keys * models > automatic_share);
    let statuses: Vec<reqwest::StatusCode> =
        futures_util::stream::iter((0..keys).flat_map(|k| (0..models).map(move |m| (k, m))))
            .map(|(k, m)| {
                let sluice = &sluice;
                async move {
                    let key = format!("sk-made-up-{k:04}-000000000000000000000");
                    post(sluice, &key, &format!("made-up-model-{m}"), false).await
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
    assert!(statuses.iter().all(|status| *status == 200));
    // A configured org arriving after the flood still gets its own labels.
    assert_eq!(post(&sluice, KEY, MODEL, false).await, 200);

    let scrape = scrape(&sluice).await;
    let name = "sluice_requests_total";
    let mut by_pair: HashMap<(String, String), f64> = HashMap::new();
    let mut pairs: HashSet<(String, String)> = HashSet::new();
    for sample in &scrape.samples {
        if let (Some(org), Some(model)) = (sample.labels.get("org"), sample.labels.get("model")) {
            pairs.insert((org.to_owned(), model.to_owned()));
            if sample.metric == name {
                if let Value::Counter(v) = sample.value {
                    *by_pair
                        .entry((org.to_owned(), model.to_owned()))
                        .or_default() += v;
                }
            }
        }
    }
    let automatic = pairs
        .iter()
        .filter(|(org, _)| org.starts_with("key-"))
        .count();
    assert!(
        automatic <= automatic_share,
        "{automatic} automatic (org, model) pairs in the scrape"
    );
    // acme, the fold, and the automatic pairs: nothing else.
    assert!(
        pairs.len() <= automatic + 2,
        "{} pairs in the scrape",
        pairs.len()
    );
    let other = by_pair
        .get(&("other".to_owned(), "other".to_owned()))
        .copied()
        .unwrap_or(0.0);
    assert!(other > 0.0, "no (other, other) fold in {name}");
    // Folded, not lost: every flood request is counted once.
    let flood: f64 = by_pair
        .iter()
        .filter(|((org, _), _)| org.starts_with("key-") || org == "other")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(flood, (keys * models) as f64);
    assert_eq!(
        by_pair.get(&("acme".to_owned(), MODEL.to_owned())).copied(),
        Some(1.0)
    );
    sluice.stop().await;
}
