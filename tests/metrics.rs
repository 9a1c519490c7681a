//! The operational views over real HTTP: `/metrics` as a Prometheus server reads it (parsed
//! with a real exposition-format parser, not string matching), `/status`, and the
//! `sluice status` command that prints it. Scripted traffic through the mock upstream, whose
//! answers (headers, usage, injected faults) are the truth the figures are checked against.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use mock_openai::{Fault, FaultRule, Limits, MockConfig, Resource};
use prometheus_parse::{Scrape, Value};

const OTHER_KEY: &str = "sk-other-org-key-000000000000000000";
const MODEL: &str = "gpt-4o-mini";
const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// How long a test waits for figures recorded after a response (they are written just after
/// the body's last byte).
const SETTLE: Duration = Duration::from_secs(5);

/// Two orgs by key, each with its own buckets; the first limited when `limits` is given.
fn orgs(limits: &str) -> String {
    format!(
        "[[org]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n{limits}\n\
         [[org]]\nname = \"broke\"\nkeys = [\"{OTHER_KEY}\"]\n"
    )
}

fn chat(model: &str, max_tokens: u64) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
    })
}

async fn post(sluice: &Sluice, key: &str, body: &serde_json::Value) -> reqwest::Response {
    client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn inject(mock: &mock_openai::MockServer, fault: Fault) {
    mock.inject(FaultRule::once(fault));
}

async fn scrape(sluice: &Sluice) -> Scrape {
    let response = client().get(sluice.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).expect("valid exposition format")
}

/// Scrapes until `check` holds; panics naming `what` after [`SETTLE`].
async fn scrape_until(sluice: &Sluice, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let scrape = scrape(sluice).await;
        if check(&scrape) {
            return scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last scrape: {:#?}",
            scrape.samples
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of the one sample of `name` whose labels include `labels`; `None` when no sample
/// matches. Histograms are read through their `_count` and `_sum` series.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut matching = scrape.samples.iter().filter(|sample| {
        sample.metric == name
            && labels
                .iter()
                .all(|(label, wanted)| sample.labels.get(label) == Some(*wanted))
    });
    let sample = matching.next()?;
    assert!(
        matching.next().is_none(),
        "several {name} samples match {labels:?}"
    );
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
        ref other => panic!("{name} is not a single value: {other:?}"),
    }
}

/// Like [`value`], for a sample that must be there (0 when it is not).
fn count(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(scrape, name, labels).unwrap_or(0.0)
}

/// Seconds in a Go duration as OpenAI's headers write it: `0s`, `6ms`, `9.816s`, `1m26.4s`.
fn go_duration_secs(text: &str) -> f64 {
    let mut rest = text;
    let mut total = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or_else(|| panic!("no unit in {text:?}"));
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => panic!("unknown unit {unit:?} in {text:?}"),
        };
        total += number.parse::<f64>().unwrap() * scale;
        rest = next;
    }
    total
}

#[test]
fn go_durations_as_the_mock_writes_them() {
    assert_eq!(go_duration_secs("0s"), 0.0);
    assert!((go_duration_secs("6ms") - 0.006).abs() < 1e-12);
    assert!((go_duration_secs("9.816s") - 9.816).abs() < 1e-12);
    assert!((go_duration_secs("1m26.4s") - 86.4).abs() < 1e-9);
    assert!((go_duration_secs("2h2m24s") - 7344.0).abs() < 1e-9);
}

#[tokio::test]
async fn ratelimit_gauges_are_the_upstreams_last_headers() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &orgs("")).await;
    let mut last = None;
    for _ in 0..3 {
        let response = post(&sluice, KEY, &chat(MODEL, 5)).await;
        assert_eq!(response.status(), 200);
        // sluice relays the upstream's headers unchanged: these are what the mock sent.
        last = Some(response.headers().clone());
        response.bytes().await.unwrap();
    }
    let headers = last.unwrap();
    let header = |name: &str| headers[name].to_str().unwrap().to_owned();
    let scrape = scrape(&sluice).await;
    for resource in ["requests", "tokens"] {
        let labels = [("org", "acme"), ("model", MODEL), ("resource", resource)];
        let remaining: f64 = header(&format!("x-ratelimit-remaining-{resource}"))
            .parse()
            .unwrap();
        let limit: f64 = header(&format!("x-ratelimit-limit-{resource}"))
            .parse()
            .unwrap();
        let reset = go_duration_secs(&header(&format!("x-ratelimit-reset-{resource}")));
        assert_eq!(
            value(&scrape, "sluice_upstream_ratelimit_remaining", &labels),
            Some(remaining),
            "{resource}"
        );
        assert_eq!(
            value(&scrape, "sluice_upstream_ratelimit_limit", &labels),
            Some(limit),
            "{resource}"
        );
        let gauge = value(&scrape, "sluice_upstream_ratelimit_reset_seconds", &labels).unwrap();
        assert!(
            (gauge - reset).abs() < 0.001,
            "{resource}: gauge {gauge}, header {reset}"
        );
        // sluice's own view of the bucket, learned from those headers.
        let available = value(&scrape, "sluice_bucket_available", &labels).unwrap();
        assert!(
            available > 0.0 && available <= limit,
            "{resource}: {available}"
        );
    }
    // Nothing reports the families the mock does not send.
    assert_eq!(
        value(
            &scrape,
            "sluice_upstream_ratelimit_remaining",
            &[("resource", "project_requests")]
        ),
        None
    );
    sluice.stop().await;
}

#[tokio::test]
async fn fixed_families_are_exposed() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &orgs("")).await;
    let scrape = scrape(&sluice).await;
    assert_eq!(
        value(
            &scrape,
            "sluice_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    for result in ["ok", "error"] {
        assert_eq!(
            value(
                &scrape,
                "sluice_config_reloads_total",
                &[("result", result)]
            ),
            Some(0.0),
            "{result}"
        );
    }
    // Bucket gauges appear with the bucket.
    assert_eq!(value(&scrape, "sluice_circuit_open", &[]), None);
    let response = post(&sluice, KEY, &chat(MODEL, 5)).await;
    assert_eq!(response.status(), 200);
    let scrape = scrape_until(&sluice, "the bucket's gauges", |scrape| {
        value(scrape, "sluice_circuit_open", &[]).is_some()
    })
    .await;
    assert_eq!(
        value(
            &scrape,
            "sluice_circuit_open",
            &[("org", "acme"), ("model", MODEL)]
        ),
        Some(0.0)
    );
    for priority in ["interactive", "batch"] {
        assert_eq!(
            value(
                &scrape,
                "sluice_queue_depth",
                &[("org", "acme"), ("model", MODEL), ("priority", priority)]
            ),
            Some(0.0),
            "{priority}"
        );
    }
    sluice.stop().await;
}

#[tokio::test]
async fn upstream_429s_are_counted_by_reason_and_resends_by_cause() {
    // A model whose whole token limit is smaller than one request: "request too large".
    let mock = mock_with(MockConfig {
        model_limits: HashMap::from([(
            "gpt-tiny".to_owned(),
            Limits {
                rpm: 10_000,
                tpm: 1_000,
            },
        )]),
        ..MockConfig::default()
    })
    .await;
    let toml = format!("{}[retry]\nbackoff_base_secs = 0.05\n", orgs(""));
    let sluice = Sluice::start_with(&mock.url(), &toml).await;

    // Rate-limit 429s are replayed by sluice; the client sees the replay's 200.
    for resource in [Resource::Requests, Resource::Tokens] {
        inject(
            &mock,
            Fault::RateLimit {
                resource,
                retry_after: true,
            },
        );
        let response = post(&sluice, KEY, &chat(MODEL, 5)).await;
        assert_eq!(response.status(), 200);
    }
    // A 500 is retried.
    inject(
        &mock,
        Fault::Status {
            status: 500,
            body: None,
            headers: Vec::new(),
        },
    );
    let response = post(&sluice, KEY, &chat(MODEL, 5)).await;
    assert_eq!(response.status(), 200);
    // Neither of these is ever retried.
    let response = post(&sluice, KEY, &chat("gpt-tiny", 5_000)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-should-retry"], "false");
    inject(&mock, Fault::InsufficientQuota);
    let response = post(&sluice, OTHER_KEY, &chat(MODEL, 5)).await;
    assert_eq!(response.status(), 429);
    let error = assert_openai_error(&response.bytes().await.unwrap());
    assert_eq!(error["code"], "insufficient_quota");

    let stats = mock.stats();
    assert_eq!(stats.status_counts.get(&429), Some(&4));
    assert_eq!(stats.status_counts.get(&500), Some(&1));
    assert_eq!(stats.requests, 8, "3 resent, 2 not");

    let scrape = scrape(&sluice).await;
    let upstream_429 = |org: &str, model: &str, reason: &str| {
        count(
            &scrape,
            "sluice_upstream_429_total",
            &[("org", org), ("model", model), ("reason", reason)],
        )
    };
    assert_eq!(upstream_429("acme", MODEL, "requests"), 1.0);
    assert_eq!(upstream_429("acme", MODEL, "tokens"), 1.0);
    assert_eq!(upstream_429("acme", "gpt-tiny", "too_large"), 1.0);
    assert_eq!(upstream_429("broke", MODEL, "quota"), 1.0);
    // Every 429 the mock sent is counted once, under one of those.
    let total: f64 = scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == "sluice_upstream_429_total")
        .map(|sample| match sample.value {
            Value::Counter(v) => v,
            ref other => panic!("not a counter: {other:?}"),
        })
        .sum();
    assert_eq!(total, 4.0);

    let retries = |reason: &str| {
        count(
            &scrape,
            "sluice_retries_total",
            &[("org", "acme"), ("model", MODEL), ("reason", reason)],
        )
    };
    assert_eq!(retries("rate_limit"), 2.0);
    assert_eq!(retries("server_error"), 1.0);
    assert_eq!(retries("connection"), 0.0);
    assert_eq!(
        count(&scrape, "sluice_retries_total", &[("org", "broke")]),
        0.0
    );
    sluice.stop().await;
}

#[tokio::test]
async fn a_queued_burst_shows_in_depth_and_wait_then_drains() {
    let mock = mock().await;
    // 120 requests at once, then one every 0.5 s: a burst of 124 queues 4 for up to 2 s.
    let limits = "[org.limits.\"*\"]\nrpm = 120\ntpm = 10000000\n";
    let toml = format!("{}[queue]\nrefill_margin_secs = 0\n", orgs(limits));
    let sluice = std::sync::Arc::new(Sluice::start_with(&mock.url(), &toml).await);
    const BURST: usize = 124;
    let burst: Vec<_> = (0..BURST)
        .map(|_| {
            let sluice = std::sync::Arc::clone(&sluice);
            tokio::spawn(async move {
                let response = post(&sluice, KEY, &chat(MODEL, 5)).await;
                let status = response.status();
                let queue_ms: u64 = response.headers()["x-sluice-queue-ms"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                response.bytes().await.unwrap();
                (status, queue_ms)
            })
        })
        .collect();

    let depth = |scrape: &Scrape, priority: &str| {
        count(
            scrape,
            "sluice_queue_depth",
            &[("org", "acme"), ("model", MODEL), ("priority", priority)],
        )
    };
    let scrape = scrape_until(&sluice, "a queue", |scrape| {
        depth(scrape, "interactive") > 0.0
    })
    .await;
    assert_eq!(depth(&scrape, "batch"), 0.0);

    // With requests queued ahead, a request that may not wait at all is refused at once.
    let refused = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-sluice-max-wait", "0")
        .json(&chat(MODEL, 5))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let error = assert_sluice_error(&refused.bytes().await.unwrap());
    assert_eq!(error["code"], "rate_limit_exceeded");

    let mut queued = 0;
    for request in burst {
        let (status, queue_ms) = request.await.unwrap();
        assert_eq!(status, 200);
        if queue_ms > 0 {
            queued += 1;
        }
    }
    assert!(queued > 0, "some of the burst waited");
    let labels = [("org", "acme"), ("model", MODEL)];
    let scrape = scrape_until(&sluice, "every wait recorded", |scrape| {
        count(scrape, "sluice_queue_wait_seconds_count", &labels) == BURST as f64
    })
    .await;
    assert_eq!(depth(&scrape, "interactive"), 0.0);
    assert!(count(&scrape, "sluice_queue_wait_seconds_sum", &labels) > 0.0);
    let rejections = |reason: &str| {
        count(
            &scrape,
            "sluice_queue_rejections_total",
            &[("org", "acme"), ("model", MODEL), ("reason", reason)],
        )
    };
    assert_eq!(rejections("deadline"), 1.0);
    assert_eq!(rejections("queue_full"), 0.0);
    // The refused request never reached the upstream.
    assert_eq!(mock.stats().requests, BURST as u64);
    std::sync::Arc::into_inner(sluice).unwrap().stop().await;
}

/// The `usage` object of a streamed chat completion (the client asked for it).
fn stream_usage(body: &str) -> serde_json::Value {
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str::<serde_json::Value>(data).unwrap())
        .find(|event| event["usage"].is_object())
        .expect("a usage chunk")["usage"]
        .clone()
}

#[tokio::test]
async fn token_counters_match_the_usage_the_upstream_reported() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &orgs("")).await;
    let response = post(&sluice, KEY, &chat(MODEL, 32)).await;
    assert_eq!(response.status(), 200);
    let json: serde_json::Value = response.json().await.unwrap();
    let plain = json["usage"].clone();
    let mut streamed = chat(MODEL, 32);
    streamed["stream"] = true.into();
    streamed["stream_options"] = serde_json::json!({"include_usage": true});
    let response = post(&sluice, KEY, &streamed).await;
    assert_eq!(response.status(), 200);
    let streamed = stream_usage(&response.text().await.unwrap());

    let tokens = |usage: &serde_json::Value, kind: &str| usage[kind].as_u64().unwrap();
    let prompt = tokens(&plain, "prompt_tokens");
    assert_eq!(prompt, tokens(&streamed, "prompt_tokens"), "same prompt");
    let completion = tokens(&plain, "completion_tokens") + tokens(&streamed, "completion_tokens");
    assert!(prompt > 0 && completion > 0);

    let labels = [("org", "acme"), ("model", MODEL)];
    let used = |scrape: &Scrape, kind: &str| {
        count(
            scrape,
            "sluice_tokens_used_total",
            &[("org", "acme"), ("model", MODEL), ("kind", kind)],
        )
    };
    let scrape = scrape_until(&sluice, "both requests' usage", |scrape| {
        count(
            scrape,
            "sluice_prompt_estimate_ratio_count",
            &[("model", MODEL)],
        ) == 2.0
            && count(scrape, "sluice_tokens_reserved_total", &labels) > 0.0
    })
    .await;
    assert_eq!(used(&scrape, "prompt"), (2 * prompt) as f64);
    assert_eq!(used(&scrape, "completion"), completion as f64);
    // Each request reserved its prompt estimate plus its 32-token cap; the ratio histogram
    // says what that estimate was (estimated / actual prompt tokens).
    let ratio_sum = count(
        &scrape,
        "sluice_prompt_estimate_ratio_sum",
        &[("model", MODEL)],
    );
    let estimate = (ratio_sum / 2.0 * prompt as f64).round();
    assert!(estimate > 0.0, "{ratio_sum}");
    assert_eq!(
        count(&scrape, "sluice_tokens_reserved_total", &labels),
        2.0 * (estimate + 32.0)
    );
    sluice.stop().await;
}

async fn status_json(sluice: &Sluice) -> serde_json::Value {
    let response = client().get(sluice.url("/status")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

fn bucket<'a>(status: &'a serde_json::Value, org: &str, model: &str) -> &'a serde_json::Value {
    status["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|bucket| bucket["org"] == org && bucket["model"] == model)
        .unwrap_or_else(|| panic!("no bucket {org}/{model} in {status:#}"))
}

#[tokio::test]
async fn status_describes_every_bucket_after_traffic() {
    let mock = mock().await;
    let limits = "[org.limits.\"*\"]\nrpm = 500\ntpm = 200000\n";
    let sluice = Sluice::start_with(&mock.url(), &orgs(limits)).await;
    let before = status_json(&sluice).await;
    assert_eq!(before["buckets"], serde_json::json!([]));
    assert_eq!(before["quota_cooldowns"], serde_json::json!([]));

    inject(
        &mock,
        Fault::RateLimit {
            resource: Resource::Tokens,
            retry_after: true,
        },
    );
    assert_eq!(post(&sluice, KEY, &chat(MODEL, 5)).await.status(), 200);
    let response = post(&sluice, KEY, &chat(MODEL, 5)).await;
    assert_eq!(response.status(), 200);
    let header =
        |name: &str| -> u64 { response.headers()[name].to_str().unwrap().parse().unwrap() };
    let (remaining_requests, remaining_tokens) = (
        header("x-ratelimit-remaining-requests"),
        header("x-ratelimit-remaining-tokens"),
    );
    inject(&mock, Fault::InsufficientQuota);
    assert_eq!(
        post(&sluice, OTHER_KEY, &chat(MODEL, 5)).await.status(),
        429
    );

    let status = status_json(&sluice).await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["upstream"], mock.url());
    assert_eq!(status["draining"], false);
    let acme = bucket(&status, "acme", MODEL);
    assert_eq!(acme["limits"]["configured"]["rpm"], 500);
    assert_eq!(acme["limits"]["configured"]["tpm"], 200_000);
    // The mock's own limits, learned from its headers; the tighter ones are in force.
    assert_eq!(acme["limits"]["learned"]["rpm"], 10_000);
    assert_eq!(acme["limits"]["learned"]["tpm"], 10_000_000);
    assert_eq!(acme["limits"]["in_force"]["rpm"], 500);
    assert_eq!(acme["limits"]["in_force"]["tpm"], 200_000);
    assert_eq!(acme["learning"], false);
    let available_requests = acme["available"]["requests"].as_f64().unwrap();
    assert!(
        (490.0..=500.0).contains(&available_requests),
        "{available_requests}"
    );
    // The injected 429 said the upstream had no tokens left: sluice's view followed it down
    // and refills at 200k a minute from there.
    let available_tokens = acme["available"]["tokens"].as_f64().unwrap();
    assert!(
        available_tokens > 0.0 && available_tokens < 100_000.0,
        "{available_tokens}"
    );
    assert_eq!(acme["circuit"], "closed");
    assert_eq!(
        acme["queue"],
        serde_json::json!({"interactive": 0, "batch": 0, "replays": 0})
    );
    let upstream = &acme["upstream"];
    assert_eq!(upstream["requests"]["remaining"], remaining_requests);
    assert_eq!(upstream["requests"]["limit"], 10_000);
    assert_eq!(upstream["tokens"]["remaining"], remaining_tokens);
    assert_eq!(upstream["tokens"]["limit"], 10_000_000);
    assert!(upstream["requests"]["reset_secs"].as_f64().unwrap() >= 0.0);
    let age = upstream["age_secs"].as_f64().unwrap();
    assert!((0.0..5.0).contains(&age), "{age}");
    let last_429 = &acme["last_429"];
    assert_eq!(last_429["reason"], "tokens");
    assert!(last_429["wait_secs"].as_f64().unwrap() >= 0.0);
    let age = last_429["age_secs"].as_f64().unwrap();
    assert!((0.0..5.0).contains(&age), "{age}");
    // The pause was a few milliseconds, long over.
    assert_eq!(acme["paused_for_secs"], serde_json::Value::Null);

    let cooldowns = status["quota_cooldowns"].as_array().unwrap();
    assert_eq!(cooldowns.len(), 1, "{cooldowns:?}");
    assert_eq!(cooldowns[0]["org"], "broke");
    let left = cooldowns[0]["remaining_secs"].as_f64().unwrap();
    assert!(left > 50.0 && left <= 60.0, "{left}");

    // The table `sluice status` prints, from this very document.
    let table = sluice::status_view::render(&status);
    let row = table
        .lines()
        .find(|line| line.starts_with("acme "))
        .unwrap_or_else(|| panic!("no acme row in\n{table}"));
    assert!(row.contains(MODEL) && row.contains("tokens"), "{row}");
    assert!(table.contains("  broke "), "{table}");
    sluice.stop().await;
}

/// Runs `sluice status` with `args` and `envs` off the async runtime, so the in-process
/// sluice it asks keeps serving meanwhile.
async fn sluice_status(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .arg("status")
            .args(&args)
            .env_remove("SLUICE_CONFIG")
            .env_remove("SLUICE_LISTEN")
            .envs(envs)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn sluice_status_prints_the_buckets_of_a_running_instance() {
    let mock = mock().await;
    let limits = "[org.limits.\"*\"]\nrpm = 500\ntpm = 200000\n";
    let sluice = Sluice::start_with(&mock.url(), &orgs(limits)).await;
    assert_eq!(post(&sluice, KEY, &chat(MODEL, 5)).await.status(), 200);

    let output = sluice_status(&["--url", &sluice.url("")], &[]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.lines().any(|line| line.starts_with("ORG")),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|line| line.starts_with("acme "))
        .unwrap_or_else(|| panic!("no acme row in\n{stdout}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..4], ["acme", MODEL, "500", "200k"], "{row}");

    // --json: the document itself. Without --url: the listen address, 0.0.0.0 on loopback
    // (a configuration that listens beyond loopback must say it may).
    let listen = format!("0.0.0.0:{}", sluice.addr.port());
    let envs = [
        ("SLUICE_LISTEN", listen.as_str()),
        ("SLUICE_ALLOW_UNAUTHENTICATED", "true"),
    ];
    let output = sluice_status(&["--json"], &envs).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        bucket(&json, "acme", MODEL)["limits"]["in_force"]["rpm"],
        500
    );
    sluice.stop().await;

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = sluice_status(&["--url", &format!("http://{closed}")], &[]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/status"), "{stderr}");
}
