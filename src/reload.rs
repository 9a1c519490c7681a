//! Configuration reload: SIGHUP, or a change on disk to the config file or to a key file it
//! names, loads the file again. A valid configuration goes into force for the next request
//! (see [`AppState::reload`]); an invalid one is rejected whole, logged by key path and
//! counted, and the running configuration stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::{Config, ConfigSource};
use crate::state::AppState;

/// How long a changed file must stay unchanged before it is read: an editor or a deploy tool
/// writing it in pieces is not caught halfway.
const SETTLE: Duration = Duration::from_millis(200);

/// Why a reload happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Signal,
    FileChanged,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChanged => "file changed",
        }
    }
}

/// What the watched files hold now, for [`watch`] to start from: taken before the address is
/// announced, so a change made right after the start is seen as one (a fingerprint taken
/// later by the watcher task could already be of the changed files).
pub(crate) struct Watched([u8; 32]);

impl Watched {
    pub(crate) fn now(state: &AppState) -> Self {
        Self(digest(&state.live().config.watched_files()))
    }
}

/// Reloads `source` on SIGHUP and whenever a watched file changes from `watched`, until the
/// task is dropped.
/// Without a config file there is nothing to reload; SIGHUP is logged and otherwise ignored
/// (rather than ending the process, its default).
pub(crate) async fn watch(
    state: Arc<AppState>,
    source: Option<ConfigSource>,
    watched: Watched,
    mut hangup: Hangup,
) {
    let Some(source) = source else {
        loop {
            hangup.recv().await;
            tracing::info!(
                "SIGHUP: sluice runs without a config file (--config); nothing to reload"
            );
        }
    };
    let mut seen = watched.0;
    loop {
        let poll = state.live().config.server.config_watch;
        let trigger = tokio::select! {
            () = hangup.recv() => Trigger::Signal,
            () = sleep_or_forever(poll) => Trigger::FileChanged,
        };
        if trigger == Trigger::FileChanged {
            let files = state.live().config.watched_files();
            let now = fingerprint(files.clone()).await;
            if now == seen {
                continue;
            }
            // Wait for the writer to finish.
            seen = now;
            loop {
                tokio::time::sleep(SETTLE).await;
                let settled = fingerprint(files.clone()).await;
                if settled == seen {
                    break;
                }
                seen = settled;
            }
        }
        reload(&state, &source, trigger).await;
        seen = fingerprint(state.live().config.watched_files()).await;
    }
}

/// Loads `source` and puts it in force, or logs why not.
async fn reload(state: &AppState, source: &ConfigSource, trigger: Trigger) {
    let path = source.path.clone();
    let overrides = source.overrides.clone();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&path, &overrides)).await;
    match loaded {
        Ok(Ok(config)) => {
            let orgs = config.orgs.len();
            let restart_only = state.reload(config);
            state.metrics.reloaded(true);
            tracing::info!(
                trigger = trigger.label(),
                file = %source.path.display(),
                orgs,
                "configuration reloaded; new limits, orgs and keys apply from the next request"
            );
            if !restart_only.is_empty() {
                tracing::warn!(
                    keys = restart_only.join(", "),
                    "these settings changed in the file but only take effect on restart; \
                     their running values stay"
                );
            }
        }
        Ok(Err(err)) => {
            state.metrics.reloaded(false);
            // One line (log pipelines split on newlines), naming each problem by its key path;
            // no message holds a key's value.
            let problems: Vec<String> = err.issues.iter().map(ToString::to_string).collect();
            tracing::error!(
                trigger = trigger.label(),
                file = %err.source_name,
                problems = problems.join("; "),
                "configuration reload rejected; the previous configuration stays in force \
                 (sluice check-config shows the same problems)"
            );
        }
        Err(err) => {
            state.metrics.reloaded(false);
            tracing::error!(error = %err, "configuration reload failed; the previous configuration stays in force");
        }
    }
}

/// A digest of the watched files' contents (a missing file counts as a state of its own).
async fn fingerprint(files: Vec<PathBuf>) -> [u8; 32] {
    tokio::task::spawn_blocking(move || digest(&files))
        .await
        .unwrap_or_default()
}

fn digest(files: &[PathBuf]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for file in files {
        hasher.update(file.as_os_str().as_encoded_bytes());
        match std::fs::read(file) {
            Ok(bytes) => {
                hasher.update([1]);
                hasher.update((bytes.len() as u64).to_le_bytes());
                hasher.update(&bytes);
            }
            Err(_) => hasher.update([0]),
        }
    }
    hasher.finalize().into()
}

async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// SIGHUP, where there is such a thing; listened for from the moment this is made.
pub(crate) struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    pub(crate) fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signal = signal(SignalKind::hangup())
                .inspect_err(|err| {
                    tracing::warn!(error = %err, "cannot listen for SIGHUP; the config file is still watched")
                })
                .ok();
            Self { signal }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            if signal.recv().await.is_some() {
                return;
            }
        }
        std::future::pending().await
    }
}
