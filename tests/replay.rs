//! Upstream truth over real HTTP: sluice replays rate-limit 429s at the hinted time, never
//! retries what cannot succeed, retries failures within its budget, learns limits from the
//! headers, and ends a broken stream with an error event. The mock counts every call.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use mock_openai::{Fault, FaultRule, MockConfig, Resource};

const OTHER_KEY: &str = "sk-other-org-key-000000000000000000";

fn chat(max_tokens: u64) -> serde_json::Value {
    serde_json::json!({
        "model": "gpt-4o-mini",
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

fn queue_ms(response: &reqwest::Response) -> u64 {
    response.headers()["x-sluice-queue-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn count(mock: &mock_openai::MockServer, status: u16) -> u64 {
    mock.stats()
        .status_counts
        .get(&status)
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_rate_limit_429_is_replayed_at_the_hinted_time() {
    // 600 RPM: one request's retry-after is 100 ms.
    let mock = mock_with(MockConfig {
        rpm: 600,
        ..MockConfig::default()
    })
    .await;
    mock.inject(FaultRule {
        fault: Fault::RateLimit {
            resource: Resource::Requests,
            retry_after: true,
        },
        path_contains: None,
        times: 1,
    });
    let sluice = Sluice::start(&mock.url()).await;
    let response = post(&sluice, KEY, &chat(5)).await;
    assert_eq!(response.status(), 200);
    // Held for the hint (retry-after-ms 100) before going again.
    assert!(queue_ms(&response) >= 100, "{}", queue_ms(&response));
    assert_eq!(mock.stats().requests, 2);
    assert_eq!(count(&mock, 429), 1);
    sluice.stop().await;
}

#[tokio::test]
async fn a_429_without_retry_after_waits_for_the_message_hint() {
    let mock = mock_with(MockConfig {
        rpm: 600,
        ..MockConfig::default()
    })
    .await;
    mock.inject(FaultRule {
        fault: Fault::RateLimit {
            resource: Resource::Tokens,
            retry_after: false,
        },
        path_contains: None,
        times: 1,
    });
    let sluice = Sluice::start(&mock.url()).await;
    let response = post(&sluice, KEY, &chat(5)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(mock.stats().requests, 2);
    sluice.stop().await;
}

#[tokio::test]
async fn replays_stop_at_the_attempt_limit_with_an_honest_retry_after() {
    let mock = mock().await;
    mock.inject(FaultRule {
        fault: Fault::RateLimit {
            resource: Resource::Requests,
            retry_after: true,
        },
        path_contains: None,
        times: 10,
    });
    let sluice = Sluice::start_with(&mock.url(), "[retry]\nmax_attempts = 2\n").await;
    let response = post(&sluice, KEY, &chat(5)).await;
    assert_eq!(response.status(), 429);
    let retry_after_ms: u64 = response.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after_ms >= 1, "{retry_after_ms}");
    let error = assert_openai_error(&response.bytes().await.unwrap());
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(mock.stats().requests, 2);
    sluice.stop().await;
}

#[tokio::test]
async fn a_pause_past_the_deadline_answers_at_once() {
    // 6 RPM: the injected 429's hint is 10 s, beyond the request's 1 s deadline.
    let mock = mock_with(MockConfig {
        rpm: 6,
        ..MockConfig::default()
    })
    .await;
    mock.inject(FaultRule {
        fault: Fault::RateLimit {
            resource: Resource::Requests,
            retry_after: true,
        },
        path_contains: None,
        times: 1,
    });
    let sluice = Sluice::start(&mock.url()).await;
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-sluice-max-wait", "1")
        .json(&chat(5))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after_ms: u64 = response.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after_ms > 5_000, "{retry_after_ms}");
    assert_eq!(mock.stats().requests, 1);
    sluice.stop().await;
}

#[tokio::test]
async fn quota_errors_fail_fast_for_the_whole_cool_down() {
    let mock = mock().await;
    mock.inject(FaultRule {
        fault: Fault::InsufficientQuota,
        path_contains: None,
        times: 1,
    });
    let sluice = Sluice::start(&mock.url()).await;
    for _ in 0..3 {
        let response = post(&sluice, KEY, &chat(5)).await;
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["x-should-retry"], "false");
        let error = assert_openai_error(&response.bytes().await.unwrap());
        assert_eq!(error["code"], "insufficient_quota");
    }
    // Only the first reached the upstream.
    assert_eq!(mock.stats().requests, 1);
    // Another org is not affected.
    let other = post(&sluice, OTHER_KEY, &chat(5)).await;
    assert_eq!(other.status(), 200);
    assert_eq!(mock.stats().requests, 2);
    sluice.stop().await;
}

#[tokio::test]
async fn a_request_larger_than_the_upstream_limit_is_never_retried() {
    let mock = mock_with(MockConfig {
        tpm: 1_000,
        ..MockConfig::default()
    })
    .await;
    let sluice = Sluice::start(&mock.url()).await;
    let response = post(&sluice, KEY, &chat(5_000)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-should-retry"], "false");
    assert_eq!(mock.stats().requests, 1);
    // Learned from that answer's headers: the next one is refused locally.
    let again = post(&sluice, KEY, &chat(5_000)).await;
    assert_eq!(again.status(), 429);
    let error = assert_openai_error(&again.bytes().await.unwrap());
    assert_eq!(error["code"], "request_too_large");
    assert_eq!(mock.stats().requests, 1);
    sluice.stop().await;
}

#[tokio::test]
async fn server_errors_are_retried_within_the_budget() {
    let mock = mock().await;
    mock.inject(FaultRule {
        fault: Fault::Status {
            status: 500,
            body: None,
            headers: Vec::new(),
        },
        path_contains: None,
        times: 2,
    });
    let sluice = Sluice::start_with(&mock.url(), "[retry]\nbackoff_base_secs = 0.05\n").await;
    let response = post(&sluice, KEY, &chat(5)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(mock.stats().requests, 3);
    assert_eq!(count(&mock, 500), 2);
    sluice.stop().await;
}

#[tokio::test]
async fn a_connection_closed_after_the_request_was_written_is_not_resent() {
    // The upstream read the request and may have run it: sending it again could run (and
    // bill) it twice, so the client gets the 502 and decides.
    let mock = mock().await;
    mock.inject(FaultRule {
        fault: Fault::CloseConnection,
        path_contains: None,
        times: 1,
    });
    let sluice = Sluice::start_with(&mock.url(), "[retry]\nbackoff_base_secs = 0.05\n").await;
    let response = post(&sluice, KEY, &chat(5)).await;
    assert_eq!(response.status(), 502);
    let error = assert_sluice_error(&response.bytes().await.unwrap());
    assert_eq!(error["code"], "upstream_failed");
    assert_eq!(mock.stats().requests, 1);
    sluice.stop().await;
}

#[tokio::test]
async fn a_stream_broken_midway_ends_with_an_error_event_and_is_not_retried() {
    let mock = mock_with(MockConfig {
        completion_tokens: 20,
        ..MockConfig::default()
    })
    .await;
    mock.inject(FaultRule {
        fault: Fault::StreamReset { after_events: 3 },
        path_contains: None,
        times: 1,
    });
    let sluice = Sluice::start(&mock.url()).await;
    let response = post(&sluice, KEY, &chat_body(true)).await;
    assert_eq!(response.status(), 200);
    let text = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .collect();
    let last = events.last().unwrap();
    let error: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "upstream_stream_broken");
    assert!(events.len() >= 4, "{text}");
    assert!(!text.contains("[DONE]"));
    assert_eq!(mock.stats().requests, 1);
    sluice.stop().await;
}

#[tokio::test]
async fn unconfigured_limits_are_learned_from_a_first_request_alone() {
    // 1,200 tokens a minute and ~25 tokens a request: about 45 fit at once, the rest wait
    // for the refill. Nothing is configured in sluice.
    let mock = mock_with(MockConfig {
        tpm: 1_200,
        ..MockConfig::default()
    })
    .await;
    let sluice = Sluice::start(&mock.url()).await;
    let requests = (0..50).map(|_| async { post(&sluice, KEY, &chat(10)).await });
    let responses = futures_util::future::join_all(requests).await;
    for response in &responses {
        assert_eq!(response.status(), 200);
    }
    let stats = mock.stats();
    assert_eq!(stats.requests, 50);
    assert_eq!(stats.rate_limited, 0, "{:?}", stats.status_counts);
    assert!(responses.iter().any(|r| queue_ms(r) > 0));
    sluice.stop().await;
}

#[tokio::test]
async fn a_configured_limit_above_the_upstreams_is_lowered_to_it() {
    let mock = mock_with(MockConfig {
        tpm: 1_200,
        ..MockConfig::default()
    })
    .await;
    let config = format!(
        "[[org]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n[org.limits.\"*\"]\nrpm = 10000\ntpm = 1000000\n"
    );
    let sluice = Sluice::start_with(&mock.url(), &config).await;
    // One request teaches sluice the real limit...
    assert_eq!(post(&sluice, KEY, &chat(10)).await.status(), 200);
    // ...so a burst beyond it queues in sluice instead of meeting upstream 429s.
    let requests = (0..50).map(|_| async { post(&sluice, KEY, &chat(10)).await });
    let responses = futures_util::future::join_all(requests).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 0, "{:?}", stats.status_counts);
    sluice.stop().await;
}

#[tokio::test]
async fn another_clients_spending_is_seen_in_the_headers() {
    let mock = mock_with(MockConfig {
        tpm: 1_200,
        ..MockConfig::default()
    })
    .await;
    let sluice = Sluice::start(&mock.url()).await;
    assert_eq!(post(&sluice, KEY, &chat(10)).await.status(), 200);
    // Someone else spends most of the org's budget behind sluice's back.
    let org = mock_openai::org_for_key(KEY);
    mock.spend(&org, "gpt-4o-mini", 0, 1_000);
    // The next answer's headers show it: sluice holds its burst back accordingly.
    assert_eq!(post(&sluice, KEY, &chat(10)).await.status(), 200);
    let requests = (0..20).map(|_| async { post(&sluice, KEY, &chat(10)).await });
    let responses = futures_util::future::join_all(requests).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 0, "{:?}", stats.status_counts);
    assert!(responses.iter().filter(|r| queue_ms(r) > 0).count() > 5);
    sluice.stop().await;
}

fn rate_limit_body() -> serde_json::Value {
    serde_json::json!({"error": {
        "message": "Rate limit reached for gpt-4o-mini in organization org-x on requests per min (RPM): Limit 10000, Used 10000, Requested 1.",
        "type": "requests", "param": null, "code": "rate_limit_exceeded"}})
}

#[tokio::test]
async fn a_wait_hint_longer_than_any_window_is_ignored_and_counted() {
    let mock = mock().await;
    mock.inject(FaultRule::once(Fault::Status {
        status: 429,
        body: Some(rate_limit_body()),
        // 9.5 years: no provider means it.
        headers: vec![("retry-after".into(), "300000000".into())],
    }));
    let sluice = Sluice::start_with(&mock.url(), "[retry]\nbackoff_base_secs = 0.05\n").await;
    let response = post(&sluice, KEY, &chat(5)).await;
    // Replayed after the backoff, not parked for years.
    assert_eq!(response.status(), 200);
    assert_eq!(mock.stats().requests, 2);
    let status = status_json(&sluice).await;
    for bucket in status["buckets"].as_array().unwrap() {
        let paused = bucket["paused_for_secs"].as_f64().unwrap_or(0.0);
        assert!(paused < 60.0, "{bucket}");
    }
    let metrics = metrics_text(&sluice).await;
    assert!(
        metrics.contains("sluice_upstream_header_errors_total 1"),
        "{metrics}"
    );
    sluice.stop().await;
}

#[tokio::test]
async fn a_learned_limit_too_small_for_a_request_is_learned_again() {
    let mock = mock().await;
    // One answer claims a token limit of 1: every later request would be "too large".
    mock.inject(FaultRule::once(Fault::Status {
        status: 200,
        body: Some(serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0,
            "model": "gpt-4o-mini", "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}})),
        headers: vec![
            ("x-ratelimit-limit-tokens".into(), "1".into()),
            ("x-ratelimit-remaining-tokens".into(), "1".into()),
        ],
    }));
    let sluice = Sluice::start_with(&mock.url(), "[queue]\nrelearn_interval_secs = 0.3\n").await;
    assert_eq!(post(&sluice, KEY, &chat(5)).await.status(), 200);
    // Refused locally while the learned limit is fresh...
    let refused = post(&sluice, KEY, &chat(5)).await;
    assert_eq!(refused.status(), 429);
    let error = assert_openai_error(&refused.bytes().await.unwrap());
    assert_eq!(error["code"], "request_too_large");
    assert_eq!(mock.stats().requests, 1);
    // ...then, unconfirmed for the interval, the next request goes upstream to learn it again
    // and the mock's real headers put the real limit back.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(post(&sluice, KEY, &chat(5)).await.status(), 200);
    assert_eq!(post(&sluice, KEY, &chat(5)).await.status(), 200);
    assert_eq!(mock.stats().requests, 3);
    let status = status_json(&sluice).await;
    let learned = &status["buckets"][0]["limits"]["learned"]["tpm"];
    assert!(learned.as_u64().unwrap() > 1000, "{status}");
    sluice.stop().await;
}

#[tokio::test]
async fn a_zero_retry_after_on_server_errors_does_not_skip_the_backoff() {
    let mock = mock().await;
    mock.inject(FaultRule {
        fault: Fault::Status {
            status: 503,
            body: None,
            headers: vec![("retry-after".into(), "0".into())],
        },
        path_contains: None,
        times: 5,
    });
    // Backoff 0.4 s doubling, and a second to spend: room for two or three attempts, where
    // back-to-back attempts would spend all five at once.
    let sluice = Sluice::start_with(&mock.url(), "[retry]\nbackoff_base_secs = 0.4\n").await;
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-sluice-max-wait", "1")
        .json(&chat(5))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let attempts = mock.stats().requests;
    assert!((2..=3).contains(&attempts), "{attempts} attempts");
    sluice.stop().await;
}
