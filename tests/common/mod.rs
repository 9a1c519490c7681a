//! Shared harness: the mock upstream and sluice itself, each on port 0, over real sockets.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use mock_openai::{MockConfig, MockServer};
use sluice::config::{Config, Overrides};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const KEY: &str = "sk-test-0123456789abcdef0123456789abcdef";

/// A running sluice started through the same `run()` as the binary.
pub struct Sluice {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<sluice::server::Drain, sluice::StartError>>,
}

impl Sluice {
    pub async fn start(upstream: &str) -> Self {
        Self::start_with(upstream, "").await
    }

    /// Starts sluice with extra TOML (the upstream URL is set for you).
    pub async fn start_with(upstream: &str, toml: &str) -> Self {
        let overrides = Overrides {
            upstream: Some(upstream.to_owned()),
            ..Overrides::default()
        };
        let config = Config::parse(toml, "test", &overrides).expect("test config is valid");
        Self::start_config(config).await
    }

    /// sluice run from a config file, as `--config` runs it (so it reloads the file).
    pub async fn start_file(upstream: &str, path: &std::path::Path) -> Self {
        let overrides = Overrides {
            upstream: Some(upstream.to_owned()),
            ..Overrides::default()
        };
        let config = Config::load(path, &overrides).expect("test config is valid");
        Self::start_config(config).await
    }

    async fn start_config(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(sluice::run(listener, config, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            shutdown: Some(tx),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Signals shutdown (as SIGTERM does) without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn stop(self) {
        let _drain = self.stop_drained().await;
    }

    /// Stops sluice and returns how its drain ended.
    pub async fn stop_drained(mut self) -> sluice::server::Drain {
        self.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("sluice stops within its drain timeout")
            .expect("server task did not panic")
            .expect("server ran without error")
    }
}

pub async fn mock() -> MockServer {
    mock_with(MockConfig::default()).await
}

pub async fn mock_with(config: MockConfig) -> MockServer {
    MockServer::start(config).await.expect("mock starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub fn chat_body(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 32,
        "stream": stream,
    })
}

/// The Prometheus text sluice serves now.
pub async fn metrics_text(sluice: &Sluice) -> String {
    client()
        .get(sluice.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The `/status` document sluice serves now.
pub async fn status_json(sluice: &Sluice) -> serde_json::Value {
    client()
        .get(sluice.url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until `check` holds, polling; panics with `what` after `timeout`.
pub async fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts an OpenAI-shaped error body and returns its `error` object.
pub fn assert_openai_error(body: &[u8]) -> serde_json::Value {
    let value: serde_json::Value = serde_json::from_slice(body).expect("error body is JSON");
    let error = value.get("error").expect("has an error object").clone();
    for field in ["message", "type", "param", "code"] {
        assert!(error.get(field).is_some(), "error lacks {field}: {value}");
    }
    error
}

/// Asserts an error sluice produced itself: OpenAI-shaped, with a message that says what to do.
pub fn assert_sluice_error(body: &[u8]) -> serde_json::Value {
    let error = assert_openai_error(body);
    let value = &error;
    assert!(
        error["message"].as_str().is_some_and(|m| m.len() > 20),
        "message should say what to do: {value}"
    );
    error
}

/// An upstream that answers every connection with the exact bytes given, so tests can check
/// that sluice passes a body through byte for byte (no re-serialization).
pub async fn raw_upstream(response: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = socket.write_all(response).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}
