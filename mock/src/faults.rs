//! Failures a test can ask for, queued and applied in order.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use crate::bucket::Resource;

/// A fault and which requests it applies to.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct FaultRule {
    pub fault: Fault,
    /// Only requests whose path contains this; `None` matches every request.
    #[serde(default)]
    pub path_contains: Option<String>,
    /// How many matching requests get the fault before the rule is used up.
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

impl FaultRule {
    /// A rule for the next request, whatever its path.
    pub fn once(fault: Fault) -> FaultRule {
        FaultRule {
            fault,
            path_contains: None,
            times: 1,
        }
    }

    fn matches(&self, path: &str) -> bool {
        self.path_contains
            .as_deref()
            .is_none_or(|needle| path.contains(needle))
    }
}

/// What goes wrong.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// An arbitrary response. The body defaults to an OpenAI-shaped `server_error`.
    Status {
        status: u16,
        #[serde(default)]
        body: Option<serde_json::Value>,
        #[serde(default)]
        headers: Vec<(String, String)>,
    },
    /// A realistic rate-limit 429 with `x-ratelimit-*` headers, without touching the buckets.
    RateLimit {
        resource: Resource,
        /// Whether to send `retry-after` / `retry-after-ms`.
        retry_after: bool,
    },
    /// The `insufficient_quota` 429, which no retry fixes; no `retry-after`.
    InsufficientQuota,
    /// Sleep, then handle the request normally.
    Delay { ms: u64 },
    /// Streams: send this many SSE events, then abort the connection without a clean end.
    /// Other responses: abort right after the headers.
    StreamReset { after_events: u32 },
    /// Read the request, then close the connection without sending any response: what a
    /// load balancer's idle timeout does to a long generation.
    CloseConnection,
    /// A 200 whose head is larger than any client accepts (one header of `bytes` bytes): the
    /// client fails to parse it after the request was received.
    OversizedHead { bytes: usize },
}

/// The FIFO of rules. The first rule matching a request's path is applied and its `times`
/// decremented.
#[derive(Debug, Default)]
pub(crate) struct FaultQueue {
    rules: Mutex<VecDeque<FaultRule>>,
}

impl FaultQueue {
    pub(crate) fn push(&self, rule: FaultRule) {
        if rule.times > 0 {
            self.lock().push_back(rule);
        }
    }

    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    /// The fault for a request to `path`, if a rule matches.
    pub(crate) fn take(&self, path: &str) -> Option<Fault> {
        let mut rules = self.lock();
        if rules.is_empty() {
            return None;
        }
        let index = rules.iter().position(|rule| rule.matches(path))?;
        let rule = rules.get_mut(index)?;
        rule.times -= 1;
        if rule.times == 0 {
            rules.remove(index).map(|rule| rule.fault)
        } else {
            Some(rule.fault.clone())
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<FaultRule>> {
        // A panic elsewhere must not turn every later request into a panic too.
        self.rules.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_rule_applies_and_wears_out() {
        let queue = FaultQueue::default();
        queue.push(FaultRule {
            fault: Fault::InsufficientQuota,
            path_contains: Some("embeddings".into()),
            times: 2,
        });
        queue.push(FaultRule::once(Fault::Delay { ms: 5 }));
        assert!(matches!(
            queue.take("/v1/chat/completions"),
            Some(Fault::Delay { ms: 5 })
        ));
        assert!(queue.take("/v1/chat/completions").is_none());
        assert!(matches!(
            queue.take("/v1/embeddings"),
            Some(Fault::InsufficientQuota)
        ));
        assert!(matches!(
            queue.take("/v1/embeddings"),
            Some(Fault::InsufficientQuota)
        ));
        assert!(queue.take("/v1/embeddings").is_none());
    }

    #[test]
    fn parses_the_documented_json() {
        let rule: FaultRule = serde_json::from_str(
            r#"{"fault": {"kind": "rate_limit", "resource": "tokens", "retry_after": false}}"#,
        )
        .expect("valid rule");
        assert_eq!(rule.times, 1);
        assert!(matches!(
            rule.fault,
            Fault::RateLimit {
                resource: Resource::Tokens,
                retry_after: false
            }
        ));
        let rule: FaultRule = serde_json::from_str(
            r#"{"fault": {"kind": "status", "status": 503}, "path_contains": "chat", "times": 3}"#,
        )
        .expect("valid rule");
        assert!(matches!(rule.fault, Fault::Status { status: 503, .. }));
    }
}
