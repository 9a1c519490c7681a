//! Hot reload: sluice watches its config file (and the key files it names) and puts a valid
//! new configuration in force without dropping or double-charging a request; an invalid one
//! is rejected whole and the running configuration stays.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use mock_openai::org_for_key;

const ACME_KEY: &str = "sk-acme-reload-0000000000000000000000";

/// A scratch directory of its own per test (tests run in parallel processes).
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-reload-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Replaces a file the way deploy tools do: a new file renamed over the old one, so a
/// reader never sees it half written.
fn replace(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// One org limited to `rpm`, checked for changes every 100 ms; the queue allows long waits
/// so a slow bucket queues instead of rejecting.
fn acme(rpm: u64) -> String {
    format!(
        "[server]\nconfig_watch_secs = 0.1\n[queue]\nmax_wait_secs = 300\n\n\
         [[org]]\nname = \"acme\"\nkeys = [\"{ACME_KEY}\"]\n[org.limits.\"*\"]\nrpm = {rpm}\n"
    )
}

/// The value of one sample of the exposition, e.g. `sluice_config_reloads_total{result="ok"}`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

async fn reloads(sluice: &Sluice, result: &str) -> f64 {
    sample(
        &metrics_text(sluice).await,
        &format!("sluice_config_reloads_total{{result=\"{result}\"}}"),
    )
}

/// The `/status` entry of acme's bucket.
async fn acme_bucket(sluice: &Sluice) -> serde_json::Value {
    let status: serde_json::Value = client()
        .get(sluice.url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    status["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|bucket| bucket["org"] == "acme")
        .cloned()
        .expect("acme has a bucket")
}

/// Polls an async condition every 20 ms; panics naming `what` after 20 s.
macro_rules! wait_for {
    ($what:expr, $check:expr) => {{
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if $check {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

fn send(sluice: &Sluice, key: &'static str) -> tokio::task::JoinHandle<reqwest::StatusCode> {
    let request = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(key)
        .timeout(Duration::from_secs(60))
        .json(&chat_body(false));
    tokio::spawn(async move { request.send().await.unwrap().status() })
}

#[tokio::test]
async fn new_limits_reach_a_queued_burst_and_the_spent_budget_is_kept() {
    let dir = scratch("limits");
    let path = dir.join("sluice.toml");
    std::fs::write(&path, acme(2)).unwrap();
    let mock = mock().await;
    let sluice = Sluice::start_file(&mock.url(), &path).await;

    // Two requests fit in 2 rpm; two more queue (for 30 and 60 s at that rate).
    let burst: Vec<_> = (0..4).map(|_| send(&sluice, ACME_KEY)).collect();
    wait_for!(
        "two requests answered and two queued",
        mock.stats().requests == 2 && acme_bucket(&sluice).await["queue"]["interactive"] == 2
    );

    // 3 rpm, of which 2 are spent: room for exactly one more. A bucket that forgot what it
    // had spent would let both queued requests through.
    replace(&path, &acme(3));
    wait_for!("the reload", reloads(&sluice, "ok").await == 1.0);
    wait_for!("the third request", mock.stats().requests == 3);
    let bucket = acme_bucket(&sluice).await;
    assert_eq!(bucket["limits"]["configured"]["rpm"], 3, "{bucket}");
    assert_eq!(bucket["queue"]["interactive"], 1, "{bucket}");
    let left = bucket["available"]["requests"].as_f64().unwrap();
    assert!(left < 0.5, "3 of 3 spent, yet {left} left: {bucket}");

    // Plenty: the last queued request goes at once (its client would time out otherwise).
    replace(&path, &acme(600));
    for request in burst {
        assert_eq!(request.await.unwrap(), 200);
    }
    // Nothing lost, nothing sent twice.
    assert_eq!(mock.stats().requests, 4);
    assert_eq!(reloads(&sluice, "ok").await, 2.0);
    assert_eq!(reloads(&sluice, "error").await, 0.0);
    let bucket = acme_bucket(&sluice).await;
    assert_eq!(bucket["limits"]["configured"]["rpm"], 600, "{bucket}");
    sluice.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_invalid_config_is_rejected_whole_and_the_old_one_keeps_serving() {
    let dir = scratch("invalid");
    let path = dir.join("sluice.toml");
    std::fs::write(&path, acme(600)).unwrap();
    let mock = mock().await;
    let sluice = Sluice::start_file(&mock.url(), &path).await;
    assert_eq!(send(&sluice, ACME_KEY).await.unwrap(), 200);

    // A new org that is fine, and a limit that is not: none of it applies.
    let broken = format!(
        "{}\n[[org]]\nname = \"newcomer\"\nkeys = [\"sk-newcomer-000000000000000000\"]\n\
         [org.limits.\"*\"]\nrpm = \"lots\"\n",
        acme(1)
    );
    replace(&path, &broken);
    wait_for!(
        "the rejected reload",
        reloads(&sluice, "error").await == 1.0
    );
    let text = metrics_text(&sluice).await;
    assert_eq!(sample(&text, "sluice_config_last_reload_successful"), 0.0);
    assert_eq!(
        sample(&text, "sluice_config_reloads_total{result=\"ok\"}"),
        0.0
    );

    // Still 600 rpm: three requests in a row pass where 1 rpm would queue the second.
    for _ in 0..3 {
        let response = client()
            .post(sluice.url("/v1/chat/completions"))
            .bearer_auth(ACME_KEY)
            .header("x-sluice-max-wait", "1")
            .json(&chat_body(false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let bucket = acme_bucket(&sluice).await;
    assert_eq!(bucket["limits"]["configured"]["rpm"], 600, "{bucket}");

    // Fixed: in force, and the gauge says so again.
    replace(&path, &acme(900));
    wait_for!("the good reload", reloads(&sluice, "ok").await == 1.0);
    let text = metrics_text(&sluice).await;
    assert_eq!(sample(&text, "sluice_config_last_reload_successful"), 1.0);
    let bucket = acme_bucket(&sluice).await;
    assert_eq!(bucket["limits"]["configured"]["rpm"], 900, "{bucket}");
    assert_eq!(mock.stats().requests, 4);
    sluice.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

const OLD_KEY: &str = "sk-provider-old-000000000000000000000";
const NEW_KEY: &str = "sk-provider-new-111111111111111111111";
const TOKEN: &str = "sluice-reload-token-0123456789abcdef";

#[tokio::test]
async fn rotating_the_provider_key_file_fails_no_request() {
    let dir = scratch("rotate");
    let key_file = dir.join("openai-key");
    std::fs::write(&key_file, format!("{OLD_KEY}\n")).unwrap();
    std::env::set_var("SLUICE_TEST_RELOAD_TOKENS", TOKEN);
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nconfig_watch_secs = 0.1\n\n[[org]]\nname = \"acme\"\n\
             upstream_key_file = {:?}\nclient_tokens_env = \"SLUICE_TEST_RELOAD_TOKENS\"\n",
            key_file.display().to_string()
        ),
    )
    .unwrap();
    let mock = mock().await;
    let sluice = Sluice::start_file(&mock.url(), &path).await;

    // Applications keep sending with their token, four at a time, throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            let url = sluice.url("/v1/chat/completions");
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let response = client()
                        .post(&url)
                        .bearer_auth(TOKEN)
                        .json(&chat_body(false))
                        .send()
                        .await
                        .unwrap();
                    statuses.push(response.status());
                }
                statuses
            })
        })
        .collect();
    let old_org = org_for_key(OLD_KEY);
    let new_org = org_for_key(NEW_KEY);
    wait_for!("traffic with the old key", mock.stats().requests >= 20);

    // The operator puts the new key in place; once sluice uses it, the provider revokes
    // the old one.
    replace(&key_file, &format!("{NEW_KEY}\n"));
    // Each worker has one request in flight at most: once the new key has carried a few
    // rounds of them, no request that started under the old configuration is left.
    wait_for!(
        "the new key upstream",
        mock.stats()
            .received
            .iter()
            .filter(|r| r.org == new_org)
            .count()
            >= 8
    );
    mock.revoke_key(OLD_KEY);
    let seen = mock.stats().requests;
    wait_for!(
        "traffic after the revocation",
        mock.stats().requests >= seen + 20
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut sent = 0;
    for worker in workers {
        let statuses = worker.await.unwrap();
        sent += statuses.len();
        assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    }
    let stats = mock.stats();
    assert_eq!(stats.requests, sent as u64);
    // Every request went with one of the provider keys, never with the token; the last
    // ones with the new key.
    assert!(stats
        .received
        .iter()
        .all(|r| r.org == old_org || r.org == new_org));
    assert!(stats.received.iter().all(|r| r.org != org_for_key(TOKEN)));
    assert!(stats
        .received
        .iter()
        .rev()
        .take(10)
        .all(|r| r.org == new_org));
    assert_eq!(reloads(&sluice, "ok").await, 1.0);
    sluice.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_changed_configuration_clears_a_pause_and_what_was_learned() {
    let dir = scratch("clears");
    let path = dir.join("sluice.toml");
    std::fs::write(&path, acme(100)).unwrap();
    let mock = mock().await;
    let sluice = Sluice::start_file(&mock.url(), &path).await;
    // An hour's pause (plausible: a daily bucket) from one 429, and a learned limit of 2 rpm.
    mock.inject(mock_openai::FaultRule::once(mock_openai::Fault::Status {
        status: 429,
        body: Some(serde_json::json!({"error": {
            "message": "Rate limit reached for requests", "type": "requests",
            "param": null, "code": "rate_limit_exceeded"}})),
        headers: vec![
            ("retry-after".into(), "3600".into()),
            ("x-ratelimit-limit-requests".into(), "2".into()),
        ],
    }));
    let paused = client()
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth(ACME_KEY)
        .header("x-sluice-max-wait", "1")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 429);
    let bucket = acme_bucket(&sluice).await;
    assert!(
        bucket["paused_for_secs"].as_f64().unwrap() > 3000.0,
        "{bucket}"
    );
    assert_eq!(bucket["limits"]["learned"]["rpm"], 2, "{bucket}");

    // The operator changes the org's limits: the pause and the learned limit go with the old
    // configuration, and the next request is sent at once.
    replace(&path, &acme(120));
    wait_for!("the reload", reloads(&sluice, "ok").await == 1.0);
    let bucket = acme_bucket(&sluice).await;
    assert!(bucket["paused_for_secs"].is_null(), "{bucket}");
    assert!(bucket["limits"]["learned"]["rpm"].is_null(), "{bucket}");
    assert_eq!(send(&sluice, ACME_KEY).await.unwrap(), 200);
    assert_eq!(mock.stats().requests, 2);
    sluice.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}
