//! Managed keys: an org holds the provider key, applications hold client tokens. The token
//! never leaves sluice; sluice refuses to serve beyond loopback without tokens unless told to.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use mock_openai::org_for_key;
use sluice::config::{Config, Overrides};

const UPSTREAM_KEY: &str = "sk-upstream-provider-key-000000000000";
const TOKEN: &str = "sluice-client-token-0123456789abcdef";

/// Config for one org holding its key; env var names are unique per test (tests share the
/// process environment).
fn managed(tag: &str) -> String {
    let key_var = format!("SLUICE_TEST_UPSTREAM_KEY_{tag}");
    let tokens_var = format!("SLUICE_TEST_CLIENT_TOKENS_{tag}");
    std::env::set_var(&key_var, UPSTREAM_KEY);
    std::env::set_var(
        &tokens_var,
        format!("{TOKEN}, another-token-fedcba9876543210"),
    );
    format!(
        "[[org]]\nname = \"acme\"\nupstream_key_env = \"{key_var}\"\nclient_tokens_env = \"{tokens_var}\"\n"
    )
}

#[tokio::test]
async fn a_client_token_reaches_the_upstream_as_the_orgs_key() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &managed("A")).await;
    let response = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stats = mock.stats();
    assert_eq!(stats.requests, 1);
    // The mock names the org after the key it was sent: the provider key, not the token.
    assert_eq!(stats.received[0].org, org_for_key(UPSTREAM_KEY));
    assert_ne!(stats.received[0].org, org_for_key(TOKEN));
    sluice.stop().await;
}

#[tokio::test]
async fn without_a_valid_token_nothing_reaches_the_upstream() {
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &managed("B")).await;
    for key in [Some("sk-someone-elses-provider-key-000000"), None] {
        let mut request = client()
            .post(sluice.url("/v1/chat/completions"))
            .json(&chat_body(false));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        let error = assert_sluice_error(&response.bytes().await.unwrap());
        assert_eq!(error["code"], "invalid_api_key");
    }
    assert_eq!(mock.stats().requests, 0);
    // Operational endpoints need no token.
    let ready = client().get(sluice.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    sluice.stop().await;
}

#[test]
fn listening_beyond_loopback_needs_tokens_or_an_explicit_opt_out() {
    let open = Overrides {
        listen: Some("0.0.0.0:8787".to_owned()),
        ..Overrides::default()
    };
    let err = Config::parse("", "test", &open).expect_err("refused");
    let message = err.to_string();
    assert!(message.contains("allow_unauthenticated"), "{message}");
    assert!(message.contains("client_tokens_env"), "{message}");

    assert!(Config::parse("allow_unauthenticated = true\n", "test", &open).is_ok());
    assert!(Config::parse(&managed("C"), "test", &open).is_ok());
    // Loopback needs neither.
    assert!(Config::parse("", "test", &Overrides::default()).is_ok());
}

#[test]
fn the_binary_refuses_to_start_open_without_tokens() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--listen", "0.0.0.0:0"])
        .env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_ALLOW_UNAUTHENTICATED")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("allow_unauthenticated"), "{stderr}");
}

#[tokio::test]
async fn a_client_without_a_token_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = mock().await;
    let sluice = Sluice::start_with(&mock.url(), &managed("C")).await;
    // Announces 30 MB and sends none of it: only an answer from the headers alone can come.
    let mut socket = tokio::net::TcpStream::connect(sluice.addr).await.unwrap();
    socket
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: sluice\r\n\
              authorization: Bearer sk-not-a-client-token-00000000000\r\n\
              content-type: application/json\r\ncontent-length: 31457280\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = vec![0u8; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), socket.read(&mut head))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..read]);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert_eq!(mock.stats().requests, 0);
    sluice.stop().await;
}
