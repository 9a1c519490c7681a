//! The fault matrix: every way an upstream can fail, against a plain and a streamed request.
//! For each it asserts what the client received (status and error code), how many times the
//! upstream received the request (never more than once unless the upstream *answered* with
//! something a retry can fix), that sluice stays up, and that nothing stays in flight.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mock_openai::{Fault, FaultRule, Resource};

/// A configured org, so every request is estimated, admitted and holds a reservation.
fn config() -> String {
    format!(
        "[[org]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n[org.limits.\"*\"]\nrpm = 10000\ntpm = 10000000\n\
         [upstream]\nread_timeout_secs = 1\n[retry]\nbackoff_base_secs = 0.01\nbackoff_max_secs = 0.02\n"
    )
}

/// What the client saw.
#[derive(Debug)]
enum Seen {
    /// A complete answer: its status and, for an error, its `code`.
    Answer(u16, Option<String>),
    /// A 200 stream that ended with sluice's error event of this code.
    StreamError(String),
    /// The connection broke with no complete answer.
    Broken,
}

async fn send(sluice: &Sluice, stream: bool) -> Seen {
    let sent = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat_body(stream))
        .send()
        .await;
    // A relayed body that fails on its first read takes the connection down before the
    // head leaves: the client sees the upstream's break as a broken connection.
    let Ok(response) = sent else {
        return Seen::Broken;
    };
    let status = response.status().as_u16();
    let bytes = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(_) => return Seen::Broken,
    };
    if stream && status == 200 {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let last = text
            .split("\n\n")
            .filter(|event| !event.trim().is_empty())
            .last()
            .unwrap_or_default()
            .to_owned();
        if let Some(data) = last.strip_prefix("data: ") {
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(data) {
                if let Some(code) = value["error"]["code"].as_str() {
                    return Seen::StreamError(code.to_owned());
                }
            }
        }
        return Seen::Answer(status, None);
    }
    if status == 200 {
        return Seen::Answer(status, None);
    }
    let error = assert_openai_error(&bytes);
    Seen::Answer(status, error["code"].as_str().map(str::to_owned))
}

/// sluice is still up and holds nothing: no request in flight, no queue.
async fn assert_settled(sluice: &Sluice) {
    let health = client().get(sluice.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "sluice stays up");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = metrics_text(sluice).await;
        let idle = metrics.contains("sluice_requests_in_flight 0")
            && !metrics
                .lines()
                .any(|line| line.starts_with("sluice_queue_depth{") && !line.ends_with(" 0"));
        if idle {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests still in flight or queued:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rule(fault: Fault, times: u32) -> FaultRule {
    FaultRule {
        fault,
        path_contains: None,
        times,
    }
}

/// One row of the matrix against the mock: inject, send, check the client's view and the
/// number of times the mock received the request.
async fn row(fault: Fault, times: u32, stream: bool, want: fn(&Seen) -> bool, received: u64) {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &config()).await;
    let label = format!("{fault:?} stream={stream}");
    let quota = matches!(fault, Fault::InsufficientQuota);
    mock.inject(rule(fault, times));
    let seen = send(&sluice, stream).await;
    assert!(want(&seen), "{label}: client saw {seen:?}");
    assert_eq!(
        mock.stats().requests,
        received,
        "{label}: upstream received"
    );
    assert_settled(&sluice).await;
    mock.clear_faults();
    let next = send(&sluice, stream).await;
    if quota {
        // The org cools down: answered from sluice's memory, without calling the upstream.
        assert!(
            matches!(next, Seen::Answer(429, _)),
            "{label}: next saw {next:?}"
        );
        assert_eq!(mock.stats().requests, received, "{label}: cool-down");
    } else {
        assert!(
            matches!(next, Seen::Answer(200, None)),
            "{label}: next saw {next:?}"
        );
    }
    sluice.stop().await;
}

fn upstream_failed(seen: &Seen) -> bool {
    matches!(seen, Seen::Answer(502, Some(code)) if code == "upstream_failed")
}

#[tokio::test]
async fn a_connection_closed_after_the_request_is_answered_502_and_never_resent() {
    for stream in [false, true] {
        row(Fault::CloseConnection, 5, stream, upstream_failed, 1).await;
    }
}

#[tokio::test]
async fn an_oversized_response_head_is_answered_502_and_never_resent() {
    for stream in [false, true] {
        row(
            Fault::OversizedHead { bytes: 1 << 20 },
            5,
            stream,
            upstream_failed,
            1,
        )
        .await;
    }
}

#[tokio::test]
async fn a_body_that_breaks_after_the_head_is_not_resent() {
    // A JSON body that fails before its first byte: sluice had not sent the head yet, so the
    // client gets a 502 it can read.
    row(
        Fault::StreamReset { after_events: 0 },
        5,
        false,
        upstream_failed,
        1,
    )
    .await;
    row(
        Fault::StreamReset { after_events: 2 },
        5,
        true,
        |seen| matches!(seen, Seen::StreamError(code) if code == "upstream_stream_broken"),
        1,
    )
    .await;
}

#[tokio::test]
async fn a_response_slower_than_the_read_timeout_is_answered_504_and_never_resent() {
    for stream in [false, true] {
        row(
            Fault::Delay { ms: 3000 },
            5,
            stream,
            |seen| matches!(seen, Seen::Answer(504, Some(code)) if code == "upstream_timeout"),
            1,
        )
        .await;
    }
}

#[tokio::test]
async fn server_errors_the_upstream_answered_are_retried_up_to_max_attempts() {
    for stream in [false, true] {
        // Five attempts in all (retry.max_attempts), each a complete 500 answer.
        row(
            Fault::Status {
                status: 500,
                body: None,
                headers: Vec::new(),
            },
            5,
            stream,
            |seen| matches!(seen, Seen::Answer(500, _)),
            5,
        )
        .await;
    }
}

#[tokio::test]
async fn a_rate_limit_is_replayed_once_and_quota_is_never_retried() {
    for stream in [false, true] {
        row(
            Fault::RateLimit {
                resource: Resource::Requests,
                retry_after: true,
            },
            1,
            stream,
            |seen| matches!(seen, Seen::Answer(200, None)),
            2,
        )
        .await;
        row(
            Fault::InsufficientQuota,
            5,
            stream,
            |seen| matches!(seen, Seen::Answer(429, Some(code)) if code == "insufficient_quota"),
            1,
        )
        .await;
    }
}

/// An upstream that reads each request head, counts it, and answers `response` raw.
async fn scripted_upstream(response: &'static [u8]) -> (SocketAddr, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = socket.write_all(response).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (addr, received)
}

#[tokio::test]
async fn a_garbage_or_truncated_response_head_is_answered_502_and_never_resent() {
    let heads: [&'static [u8]; 3] = [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nbad header line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-",
    ];
    for head in heads {
        for stream in [false, true] {
            let (addr, received) = scripted_upstream(head).await;
            let sluice = Sluice::start_with(&format!("http://{addr}"), &config()).await;
            let seen = send(&sluice, stream).await;
            let label = String::from_utf8_lossy(head);
            assert!(upstream_failed(&seen), "{label}: client saw {seen:?}");
            assert_eq!(
                received.load(Ordering::SeqCst),
                1,
                "{label}: upstream received"
            );
            assert_settled(&sluice).await;
            sluice.stop().await;
        }
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_answered_502_and_refunded() {
    // A port nobody listens on: bind, note it, close.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let sluice = Sluice::start_with(&format!("http://{addr}"), &config()).await;
    for stream in [false, true] {
        let seen = send(&sluice, stream).await;
        assert!(
            matches!(&seen, Seen::Answer(502, Some(code)) if code == "upstream_unreachable"),
            "client saw {seen:?}"
        );
    }
    assert_settled(&sluice).await;
    // Nothing reached the upstream, so the whole estimate came back to the bucket.
    let status = status_json(&sluice).await;
    let bucket = &status["buckets"][0];
    assert_eq!(bucket["available"]["tokens"], 10_000_000.0, "{status}");
    sluice.stop().await;
}

#[tokio::test]
async fn hostile_rate_limit_headers_on_a_success_are_counted_and_harmless() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &config()).await;
    let hostile: Vec<(String, String)> = [
        ("x-ratelimit-limit-requests", "-5"),
        ("x-ratelimit-remaining-requests", "NaN"),
        ("x-ratelimit-reset-requests", "1.2.3s"),
        ("x-ratelimit-limit-tokens", "99999999999999999999999"),
        ("x-ratelimit-remaining-tokens", "-1"),
        ("x-ratelimit-reset-tokens", "9999999h"),
        ("retry-after", "Wed, 99 Foo 3000"),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect();
    mock.inject(rule(
        Fault::Status {
            status: 200,
            body: Some(serde_json::json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                "model": "gpt-4o-mini", "choices": [],
                "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}})),
            headers: hostile,
        },
        1,
    ));
    assert!(matches!(
        send(&sluice, false).await,
        Seen::Answer(200, None)
    ));
    assert_eq!(mock.stats().requests, 1);
    let metrics = metrics_text(&sluice).await;
    let errors: f64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("sluice_upstream_header_errors_total ")?
                .parse()
                .ok()
        })
        .unwrap();
    assert!(errors >= 4.0, "{metrics}");
    assert_settled(&sluice).await;
    // The configured limits still rule: nothing learned from garbage.
    let status = status_json(&sluice).await;
    assert_eq!(
        status["buckets"][0]["limits"]["in_force"]["tpm"], 10_000_000,
        "{status}"
    );
    assert!(matches!(
        send(&sluice, false).await,
        Seen::Answer(200, None)
    ));
    sluice.stop().await;
}
