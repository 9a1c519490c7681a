//! The problems a configuration has, collected: validation goes on after the first, so a
//! person fixes them all in one round.

use super::{ConfigError, ConfigIssue};

/// Problems found so far; validation goes on after one, so all are reported together.
#[derive(Default)]
pub(super) struct Issues(Vec<ConfigIssue>);

impl Issues {
    pub(super) fn add(&mut self, key: &str, message: String) {
        self.0.push(ConfigIssue {
            key: key.to_owned(),
            message,
        });
    }

    /// The problems found, if there were any, as the error naming `source_name`.
    pub(super) fn into_result(self, source_name: &str) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            return Ok(());
        }
        Err(ConfigError {
            source_name: source_name.to_owned(),
            issues: self.0,
        })
    }
}
