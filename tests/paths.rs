//! Hostile path spellings over a raw socket (an HTTP client library would normalize them
//! before sending): every spelling of a metered endpoint is metered, and nothing climbs out of
//! the upstream URL's path prefix.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `POST <target>` with a chat body exactly as written and returns the status and body.
async fn raw_post(addr: SocketAddr, target: &str, body: &str) -> (u16, String) {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {target} HTTP/1.1\r\nhost: sluice\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\nx-sluice-max-wait: 0.2\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut response))
        .await
        .expect("sluice answers")
        .unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

fn limited(rpm: u64) -> String {
    format!("[[org]]\nname = \"acme\"\nkeys = [\"{KEY}\"]\n[org.limits.\"*\"]\nrpm = {rpm}\ntpm = 1000000\n")
}

#[tokio::test]
async fn every_spelling_of_the_chat_path_is_charged_to_the_bucket() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &limited(2)).await;
    let body = chat_body(false).to_string();
    let spellings = [
        "/v1/chat/completions/",
        "/v1/chat//completions",
        "/v1/./chat/completions",
        "/v1/chat/../chat/completions",
        "/v1/chat/completion%73",
        "/v1/chat/%2e/completions",
        "//v1/chat/completions",
        "/V1/chat/completions",
        "/v1/chat/completions;x",
        "/v1/chat/completions%3Bx",
        "/v1/chat%2Fcompletions",
        "/v1/chat/completions?x=1",
        "/v1/x/../chat/completions/",
        "/v1/chat/./completions",
        "/v1/chat/completions//",
        "/v1//chat/completions",
    ];
    let mut statuses = Vec::new();
    for spelling in spellings {
        let (status, body) = raw_post(sluice.addr, spelling, &body).await;
        if status != 200 {
            let error = assert_sluice_error(body.as_bytes());
            let code = error["code"].as_str().unwrap().to_owned();
            assert!(
                ["rate_limit_exceeded", "invalid_path"].contains(&code.as_str()),
                "{spelling}: {status} {body}"
            );
        }
        statuses.push((spelling, status));
    }
    // rpm = 2 (and 1 per second as a burst): at most two requests in all reached the
    // upstream, whatever their spelling, and each in its canonical spelling.
    let stats = mock.stats();
    assert!((1..=2).contains(&stats.requests), "{statuses:?}");
    for received in stats.received {
        assert!(
            received.path.eq_ignore_ascii_case("/v1/chat/completions"),
            "forwarded canonical: {}",
            received.path
        );
    }
    for (spelling, status) in &statuses {
        if spelling.contains(';') || spelling.contains("%3B") || spelling.contains("%2F") {
            assert_eq!(*status, 400, "{spelling} has no safe canonical form");
        }
    }
    sluice.stop().await;
}

#[tokio::test]
async fn no_path_climbs_out_of_the_upstream_prefix() {
    let mock = mock().await;
    // The upstream URL has a path prefix; the mock only serves /v1/..., so anything that
    // escaped the prefix would show up in its log under another path.
    let sluice = Sluice::start_with(&format!("{}/gateway", mock.url()), "").await;
    let body = chat_body(false).to_string();
    for target in [
        "/v1/../../x",
        "/v1/%2e%2e/%2e%2e/x",
        "/v1/../../../v1/chat/completions",
        "/v1/..%2f..%2fx",
    ] {
        let (status, body) = raw_post(sluice.addr, target, &body).await;
        assert_eq!(status, 400, "{target}: {body}");
        assert_eq!(assert_sluice_error(body.as_bytes())["code"], "invalid_path");
    }
    // A dot segment inside /v1/ stays under the prefix.
    let (_, _) = raw_post(sluice.addr, "/v1/models/../models", "").await;
    let received = mock.stats().received;
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].path, "/gateway/v1/models");
    sluice.stop().await;
}
