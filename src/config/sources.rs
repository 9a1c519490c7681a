//! What the configuration names outside itself: the environment variables that hold keys and
//! tokens, and the key files. They are read here, all at once and before validation, so
//! validation is a pure function of the file's text, the overrides and these values. Every
//! [`Config::load`](super::Config::load), a reload's included, reads them again: replacing a
//! key file rotates the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::raw::RawConfig;

/// The values of every environment variable and key file a raw configuration names.
#[derive(Debug, Default)]
pub(super) struct Sources {
    /// `None`: not set, or not UTF-8.
    env: HashMap<String, Option<String>>,
    /// The file's text, or why it could not be read.
    files: HashMap<PathBuf, Result<String, String>>,
}

impl Sources {
    /// Reads what `raw`'s orgs name: `keys_env`, `upstream_key_env`, `upstream_key_file` and
    /// `client_tokens_env`.
    pub(super) fn read(raw: &RawConfig) -> Self {
        let mut sources = Self::default();
        for org in &raw.org {
            let vars = [&org.keys_env, &org.upstream_key_env, &org.client_tokens_env];
            for var in vars.into_iter().flatten() {
                sources
                    .env
                    .entry(var.clone())
                    .or_insert_with(|| std::env::var(var).ok());
            }
            if let Some(path) = &org.upstream_key_file {
                sources.files.entry(path.clone()).or_insert_with(|| {
                    std::fs::read_to_string(path).map_err(|err| err.to_string())
                });
            }
        }
        sources
    }

    /// The value of `var`; `None` if it is not set or not UTF-8.
    pub(super) fn env(&self, var: &str) -> Option<&str> {
        self.env.get(var).and_then(Option::as_deref)
    }

    /// The text of the file at `path`, or why it could not be read.
    pub(super) fn file(&self, path: &Path) -> Result<&str, &str> {
        match self.files.get(path) {
            Some(Ok(text)) => Ok(text),
            Some(Err(err)) => Err(err),
            None => Err("not named by the configuration"),
        }
    }
}
