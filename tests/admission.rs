//! Admission control over real HTTP: org buckets, estimation, the queue and its rejections,
//! with the mock upstream enforcing the same limits as sluice is configured with.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use mock_openai::{Limits, MockConfig};

const OTHER_KEY: &str = "sk-other-org-key-000000000000000000";

fn config(rpm: u64, tpm: u64, extra: &str) -> String {
    format!(
        "[[org]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n[org.limits.\"*\"]\nrpm = {rpm}\ntpm = {tpm}\n\n\
         [[org]]\nname = \"other\"\nkeys = [\"{OTHER_KEY}\"]\n[org.limits.\"*\"]\nrpm = {rpm}\ntpm = {tpm}\n{extra}"
    )
}

async fn mock_limited(rpm: u64, tpm: u64) -> mock_openai::MockServer {
    mock_with(MockConfig {
        rpm,
        tpm,
        ..MockConfig::default()
    })
    .await
}

fn chat(max_tokens: u64) -> serde_json::Value {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
    })
}

async fn post(
    url: &str,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = client().post(url).bearer_auth(key).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn queue_ms(response: &reqwest::Response) -> u64 {
    response.headers()["x-sluice-queue-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_burst_beyond_the_rpm_is_queued_not_rejected() {
    let rpm = 600;
    let mock = mock_limited(rpm, 10_000_000).await;
    // The test process runs client, sluice and mock unoptimized on shared threads, next to
    // other tests: the mock may charge a request long after sluice admitted it, so sluice
    // keeps a second of refill in hand instead of a quarter.
    let sluice = Sluice::start_with(
        &mock.url(),
        &config(rpm, 10_000_000, "[queue]\nrefill_margin_secs = 1.0\n"),
    )
    .await;
    // 60 more than the bucket holds: they wait for the refill (10 per second).
    let burst = rpm as usize + 60;
    let url = sluice.url("/v1/chat/completions");
    let tasks: Vec<_> = (0..burst)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let response = post(&url, KEY, &chat(5), &[]).await;
                let status = response.status();
                let queued = response
                    .headers()
                    .get("x-sluice-queue-ms")
                    .map_or(0, |v| v.to_str().unwrap().parse::<u64>().unwrap());
                let text = response.text().await.unwrap();
                (status, queued, text)
            })
        })
        .collect();
    let mut queued = 0;
    for task in tasks {
        let (status, waited, text) = task.await.unwrap();
        assert_eq!(status, 200, "{text}");
        if waited > 0 {
            queued += 1;
        }
    }
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 0, "the upstream never saw the burst");
    assert_eq!(stats.requests, burst as u64);
    // Sending the burst itself takes a moment, during which the bucket refills a little.
    assert!(
        queued >= 10,
        "the excess waited in sluice's queue ({queued} queued)"
    );

    // Another org's request is not behind that backlog.
    let other = post(&url, OTHER_KEY, &chat(5), &[]).await;
    assert_eq!(other.status(), 200);
    assert_eq!(queue_ms(&other), 0);
    sluice.stop().await;
}

#[tokio::test]
async fn a_tpm_bound_burst_of_long_prompts_is_queued_not_rejected() {
    let tpm = 60_000;
    let mock = mock_limited(10_000, tpm).await;
    // Here the mock tokenizes each 13 KB prompt in an unoptimized build, on the same thread as
    // sluice and the client: it charges a request up to several hundred milliseconds after
    // sluice admitted it, so sluice keeps a second of refill in hand instead of a quarter.
    let sluice = Sluice::start_with(
        &mock.url(),
        &config(10_000, tpm, "[queue]\nrefill_margin_secs = 1.0\n"),
    )
    .await;
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(300); // ~3000 tokens
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "Summarize."}, {"role": "user", "content": prompt}],
        "max_tokens": 100,
    });
    let url = sluice.url("/v1/chat/completions");
    // ~21 requests fit the bucket; the rest wait for tokens to refill (1000 per second).
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move {
                let response = post(&url, KEY, &body, &[]).await;
                (response.status(), response.text().await.unwrap())
            })
        })
        .collect();
    for task in tasks {
        let (status, text) = task.await.unwrap();
        assert_eq!(status, 200, "{text}");
    }
    assert_eq!(mock.stats().rate_limited, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn a_request_larger_than_the_limit_is_rejected_at_once() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &config(100, 1_000, "")).await;
    let response = post(&sluice.url("/v1/chat/completions"), KEY, &chat(5_000), &[]).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-should-retry"], "false");
    assert!(response.headers().get("retry-after").is_none());
    let error = assert_sluice_error(&response.bytes().await.unwrap());
    assert_eq!(error["code"], "request_too_large");
    assert_eq!(error["type"], "tokens");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("Limit 1000") && message.contains("gpt-4o-mini"),
        "{message}"
    );
    assert_eq!(mock.stats().requests, 0, "never sent upstream");
    sluice.stop().await;
}

#[tokio::test]
async fn a_request_that_cannot_make_its_deadline_is_rejected_with_the_wait() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &config(60, 1_000_000, "")).await;
    let url = sluice.url("/v1/chat/completions");
    for _ in 0..60 {
        assert_eq!(post(&url, KEY, &chat(5), &[]).await.status(), 200);
    }
    // The bucket is empty and refills one request per second; this one allows half a second.
    let response = post(&url, KEY, &chat(5), &[("x-sluice-max-wait", "0.5")]).await;
    assert_eq!(response.status(), 429);
    let retry_ms: u64 = response.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (500..=1000).contains(&retry_ms),
        "retry-after-ms {retry_ms}"
    );
    assert_eq!(response.headers()["retry-after"], "1");
    let error = assert_sluice_error(&response.bytes().await.unwrap());
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(error["type"], "requests");
    assert_eq!(
        mock.stats().requests,
        60,
        "the rejected request was not sent"
    );

    // The client's own timeout bounds the wait too (the SDKs send x-stainless-read-timeout).
    let response = post(&url, KEY, &chat(5), &[("x-stainless-read-timeout", "2.2")]).await;
    assert_eq!(
        response.status(),
        429,
        "2.2 s less the 2 s margin leaves 0.2 s"
    );
    sluice.stop().await;
}

#[tokio::test]
async fn a_full_queue_answers_with_its_own_code() {
    let mock = mock().await;
    let sluice = Sluice::start_with(
        &mock.url(),
        &config(
            1,
            1_000_000,
            "[queue]\nmax_depth_per_bucket = 1\nmax_wait_secs = 600\n",
        ),
    )
    .await;
    let url = sluice.url("/v1/chat/completions");
    assert_eq!(post(&url, KEY, &chat(5), &[]).await.status(), 200);
    // The next waits up to 60 s for the 1-per-minute refill: it holds the one queue place.
    let waiting = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, KEY, &chat(5), &[]).await.status() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = post(&url, KEY, &chat(5), &[]).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after-ms"));
    let error = assert_sluice_error(&response.bytes().await.unwrap());
    assert_eq!(error["code"], "queue_full");
    waiting.abort();
    sluice.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_frees_its_place_and_budget() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &config(10_000, 600, "")).await;
    let url = sluice.url("/v1/chat/completions");
    // Fill the token bucket (600 per minute, 10 per second).
    assert_eq!(post(&url, KEY, &chat(570), &[]).await.status(), 200);
    // This one needs most of a minute of refill; its client gives up after a second.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(1000))
        .build()
        .unwrap()
        .post(&url)
        .bearer_auth(KEY)
        .json(&chat(500))
        .send()
        .await;
    assert!(impatient.is_err());
    // Had it kept its place, this small request would queue behind it for ~50 s.
    let response = post(&url, KEY, &chat(5), &[("x-sluice-max-wait", "5")]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(mock.stats().requests, 2);
    sluice.stop().await;
}

#[tokio::test]
async fn a_request_that_never_reached_the_upstream_is_refunded() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let sluice = Sluice::start_with(
        &format!("http://127.0.0.1:{port}"),
        &config(10_000, 1_000, ""),
    )
    .await;
    let url = sluice.url("/v1/chat/completions");
    for _ in 0..3 {
        // Each takes ~600 of the 1000 tokens; without the refund the second could not be
        // admitted within its 0.1 s.
        let response = post(&url, KEY, &chat(580), &[("x-sluice-max-wait", "0.1")]).await;
        assert_eq!(response.status(), 502);
    }
    sluice.stop().await;
}

#[tokio::test]
async fn interactive_requests_overtake_queued_batch_ones() {
    let mock = mock().await;
    let sluice = Sluice::start_with(
        &mock.url(),
        &config(60, 1_000_000, "[queue]\ninteractive_reserve = 0\n"),
    )
    .await;
    let url = sluice.url("/v1/chat/completions");
    for _ in 0..60 {
        assert_eq!(post(&url, KEY, &chat(5), &[]).await.status(), 200);
    }
    // One more waits for the refill and takes it: the next request is due a whole second
    // later, however long the 60 took, so the three below all find the bucket empty.
    assert_eq!(post(&url, KEY, &chat(5), &[]).await.status(), 200);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, priority) in ["batch", "batch", "interactive"].into_iter().enumerate() {
        let (url, tx) = (url.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let response = post(&url, KEY, &chat(5), &[("x-sluice-priority", priority)]).await;
            assert_eq!(response.status(), 200);
            tx.send(priority).unwrap();
        }));
        if i < 2 {
            // Let the batch requests queue first.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    drop(tx);
    let mut order = Vec::new();
    while let Some(priority) = rx.recv().await {
        order.push(priority);
    }
    assert_eq!(order, ["interactive", "batch", "batch"]);
    sluice.stop().await;
}

#[tokio::test]
async fn streams_are_settled_from_usage_the_client_did_not_ask_for() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &config(10_000, 100_000, "")).await;
    let mut body = chat(4);
    body["stream"] = serde_json::json!(true);
    let response = post(&sluice.url("/v1/chat/completions"), KEY, &body, &[]).await;
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        !text.contains("\"choices\":[]"),
        "the usage chunk sluice requested is hidden: {text}"
    );
    assert_eq!(
        text.matches("data: {").count(),
        1 + 4 + 1,
        "the role chunk, four tokens and the finish chunk: {text}"
    );

    // A client that asks for usage gets it, untouched.
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let text = post(&sluice.url("/v1/chat/completions"), KEY, &body, &[])
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("\"choices\":[]") && text.contains("\"prompt_tokens\""),
        "{text}"
    );
    sluice.stop().await;
}

#[tokio::test]
async fn uncharged_paths_and_unlimited_orgs_pass_without_queueing() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &config(1, 1_000, "")).await;
    for _ in 0..5 {
        let response = client()
            .get(sluice.url("/v1/models"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("x-sluice-queue-ms").is_none());
    }
    // A key no org lists gets an automatic org with no local limit.
    for _ in 0..5 {
        let response = post(
            &sluice.url("/v1/chat/completions"),
            "sk-unlisted",
            &chat(5),
            &[],
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    sluice.stop().await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_rejected_before_the_upstream() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &config(100, 100_000, "")).await;
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{\"model\": \"gpt-4o-mini\", \"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error = assert_sluice_error(&response.bytes().await.unwrap());
    assert_eq!(error["code"], "invalid_request_body");
    assert_eq!(mock.stats().requests, 0);
    sluice.stop().await;
}

#[tokio::test]
async fn limits_per_model_fall_back_to_the_star_entry() {
    let mock = mock().await;
    mock.set_limits(
        Some("gpt-4o"),
        Limits {
            rpm: 2,
            tpm: 1_000_000,
        },
    );
    let toml = format!(
        "[[org]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n[org.limits.\"gpt-4o\"]\nrpm = 2\n[org.limits.\"*\"]\nrpm = 1000\n"
    );
    let sluice = Sluice::start_with(&mock.url(), &toml).await;
    let url = sluice.url("/v1/chat/completions");
    let mut body = chat(5);
    body["model"] = serde_json::json!("gpt-4o");
    for _ in 0..2 {
        assert_eq!(post(&url, KEY, &body, &[]).await.status(), 200);
    }
    let limited = post(&url, KEY, &body, &[("x-sluice-max-wait", "0")]).await;
    assert_eq!(limited.status(), 429, "gpt-4o has 2 RPM");
    // gpt-4o-mini uses the "*" limits and its own bucket.
    for _ in 0..5 {
        assert_eq!(
            post(&url, KEY, &chat(5), &[("x-sluice-max-wait", "0")])
                .await
                .status(),
            200
        );
    }
    assert_eq!(mock.stats().rate_limited, 0);
    sluice.stop().await;
}
