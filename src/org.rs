//! Which organization (budget) a request spends from, and at which priority.
//!
//! In order: the org whose config lists the request's `OpenAI-Organization` header value; the
//! org whose config lists its API key (compared by SHA-256, so configs may hold hashes only);
//! otherwise an automatic org named `key-` plus the first 8 hex digits of the key's SHA-256.
//! The key itself is never kept, logged or used as a label.
//!
//! An org may hold its provider key itself and hand applications client tokens instead: a
//! request bearing one belongs to that org and goes upstream with the org's key. Tokens are
//! compared by SHA-256 in constant time. Once any org has tokens, every request must bear one.

use std::collections::HashMap;
use std::sync::Arc;

use http::{header, HeaderMap};
use sha2::{Digest, Sha256};

use crate::config::{hex_prefix, OrgConfig, UpstreamKey};
use crate::priority::Priority;

/// Name of the org of requests that carry no API key at all (the upstream will reject them;
/// they are forwarded uncharged so the client sees the upstream's own 401).
pub(crate) const ANONYMOUS: &str = "anonymous";

/// Whether `org` names an automatic org (`key-` plus a hash prefix of a key): one per key,
/// so as many as the keys clients make up. Configured names never take this form (the
/// configuration rejects them).
pub(crate) fn is_automatic(org: &str) -> bool {
    org.starts_with(AUTOMATIC_PREFIX)
}

/// What an automatic org's name starts with.
const AUTOMATIC_PREFIX: &str = "key-";

/// The org a request belongs to.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The org's name: a configured one, `key-xxxxxxxx`, or [`ANONYMOUS`].
    pub org: Arc<str>,
    /// The configured org, when there is one.
    pub config: Option<Arc<OrgConfig>>,
    pub priority: Priority,
    /// The org's provider key, when the request bore one of its client tokens.
    pub upstream_key: Option<UpstreamKey>,
}

/// Client tokens are required and the request bore none that matches.
#[derive(Debug)]
pub struct Unauthenticated;

/// Lookup tables built once from the config.
pub struct Orgs {
    by_org_id: HashMap<String, Arc<OrgConfig>>,
    by_key_hash: HashMap<[u8; 32], (Arc<OrgConfig>, Priority)>,
    by_token: Vec<([u8; 32], Arc<OrgConfig>)>,
}

impl Orgs {
    pub fn new(orgs: &[OrgConfig]) -> Self {
        let mut by_org_id = HashMap::new();
        let mut by_key_hash = HashMap::new();
        let mut by_token = Vec::new();
        for org in orgs {
            let org = Arc::new(org.clone());
            for id in &org.organization_ids {
                by_org_id.insert(id.clone(), Arc::clone(&org));
            }
            for (hash, priority) in &org.key_hashes {
                by_key_hash.insert(*hash, (Arc::clone(&org), *priority));
            }
            for hash in &org.client_token_hashes {
                by_token.push((*hash, Arc::clone(&org)));
            }
        }
        Self {
            by_org_id,
            by_key_hash,
            by_token,
        }
    }

    /// Whether requests must bear a client token.
    pub fn require_tokens(&self) -> bool {
        !self.by_token.is_empty()
    }

    /// Identifies the org of a request, checking its client token first when tokens are
    /// required.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, Unauthenticated> {
        if !self.require_tokens() {
            return Ok(self.identify(headers));
        }
        let hash: [u8; 32] = Sha256::digest(api_key(headers).ok_or(Unauthenticated)?).into();
        // Every token is compared, whole, whatever matched before: how long this takes says
        // nothing about which token came close.
        let mut owner = None;
        for (token, org) in &self.by_token {
            if constant_time_eq(token, &hash) {
                owner = Some(org);
            }
        }
        let org = owner.ok_or(Unauthenticated)?;
        let requested = headers
            .get("x-sluice-priority")
            .and_then(|value| value.to_str().ok())
            .and_then(Priority::parse);
        Ok(Identity {
            org: Arc::from(org.name.as_str()),
            config: Some(Arc::clone(org)),
            priority: requested.unwrap_or(org.default_priority),
            upstream_key: org.upstream_key.clone(),
        })
    }

    /// Identifies the org of a request from its headers. An `x-sluice-priority` header
    /// overrides the key's or org's default priority.
    pub fn identify(&self, headers: &HeaderMap) -> Identity {
        let requested = headers
            .get("x-sluice-priority")
            .and_then(|value| value.to_str().ok())
            .and_then(Priority::parse);
        let key_hash = api_key(headers).map(|key| -> [u8; 32] { Sha256::digest(key).into() });

        let by_header = headers
            .get("openai-organization")
            .and_then(|value| value.to_str().ok())
            .and_then(|id| self.by_org_id.get(id.trim()));
        let by_key = key_hash
            .as_ref()
            .and_then(|hash| self.by_key_hash.get(hash));

        let (org, config, default_priority) = match (by_header, by_key) {
            (Some(org), key) => {
                // The key's own priority still applies when it belongs to this same org.
                let priority = key
                    .filter(|(owner, _)| Arc::ptr_eq(owner, org))
                    .map_or(org.default_priority, |(_, priority)| *priority);
                (
                    Arc::from(org.name.as_str()),
                    Some(Arc::clone(org)),
                    priority,
                )
            }
            (None, Some((org, priority))) => (
                Arc::from(org.name.as_str()),
                Some(Arc::clone(org)),
                *priority,
            ),
            (None, None) => {
                let name = match &key_hash {
                    Some(hash) => {
                        let mut name = String::with_capacity(12);
                        name.push_str(AUTOMATIC_PREFIX);
                        name.push_str(&hex_prefix(hash));
                        name
                    }
                    None => ANONYMOUS.to_owned(),
                };
                (Arc::from(name), None, Priority::default())
            }
        };
        Identity {
            org,
            config,
            priority: requested.unwrap_or(default_priority),
            upstream_key: None,
        }
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut difference = 0u8;
    for (x, y) in a.iter().zip(b) {
        difference |= x ^ y;
    }
    std::hint::black_box(difference) == 0
}

/// The API key of a request: `Authorization: Bearer <key>` (OpenAI), else `api-key: <key>`
/// (Azure OpenAI).
fn api_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let bytes = value.as_bytes();
        let key = bytes
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| bytes[7..].trim_ascii())?;
        return (!key.is_empty()).then_some(key);
    }
    headers
        .get("api-key")
        .map(|value| value.as_bytes().trim_ascii())
        .filter(|key| !key.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};
    use http::HeaderValue;

    fn orgs(toml: &str) -> Orgs {
        let config = Config::parse(toml, "test", &Overrides::default()).expect("valid");
        Orgs::new(&config.orgs)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).expect("ascii"));
        }
        map
    }

    const CONFIG: &str = r#"
        [[org]]
        name = "acme"
        organization_ids = ["org-acme"]
        keys = ["sk-acme-1", { key = "sk-acme-batch", priority = "batch" }]
        [org.limits."*"]
        rpm = 10
    "#;

    #[test]
    fn organization_header_wins() {
        let orgs = orgs(CONFIG);
        let id = orgs.identify(&headers(&[
            ("authorization", "Bearer sk-unknown"),
            ("openai-organization", "org-acme"),
        ]));
        assert_eq!(&*id.org, "acme");
        assert!(id.config.is_some());
    }

    #[test]
    fn configured_keys_identify_their_org_and_priority() {
        let orgs = orgs(CONFIG);
        let id = orgs.identify(&headers(&[("authorization", "Bearer sk-acme-1")]));
        assert_eq!(&*id.org, "acme");
        assert_eq!(id.priority, Priority::Interactive);
        let id = orgs.identify(&headers(&[("authorization", "bearer  sk-acme-batch ")]));
        assert_eq!(&*id.org, "acme");
        assert_eq!(id.priority, Priority::Batch);
        let id = orgs.identify(&headers(&[("api-key", "sk-acme-1")]));
        assert_eq!(&*id.org, "acme");
    }

    #[test]
    fn hashed_keys_match() {
        let hash = Sha256::digest(b"sk-hashed");
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let config = format!(
            "[[org]]\nname = \"hashed\"\ndefault_priority = \"batch\"\nkey_sha256 = [\"{hex}\"]\n"
        );
        let id = orgs(&config).identify(&headers(&[("authorization", "Bearer sk-hashed")]));
        assert_eq!(&*id.org, "hashed");
        assert_eq!(id.priority, Priority::Batch);
    }

    #[test]
    fn unknown_keys_get_an_automatic_org_that_does_not_reveal_them() {
        let orgs = orgs(CONFIG);
        let id = orgs.identify(&headers(&[("authorization", "Bearer sk-secret-123")]));
        let hash = Sha256::digest(b"sk-secret-123");
        let expected: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&*id.org, format!("key-{expected}"));
        assert!(!id.org.contains("secret"));
        assert!(id.config.is_none());
        assert_eq!(&*orgs.identify(&HeaderMap::new()).org, ANONYMOUS);
        assert_eq!(
            &*orgs.identify(&headers(&[("authorization", "Bearer ")])).org,
            ANONYMOUS
        );
    }

    #[test]
    fn priority_header_overrides_the_default() {
        let orgs = orgs(CONFIG);
        let id = orgs.identify(&headers(&[
            ("authorization", "Bearer sk-acme-1"),
            ("x-sluice-priority", "batch"),
        ]));
        assert_eq!(id.priority, Priority::Batch);
        let id = orgs.identify(&headers(&[
            ("authorization", "Bearer sk-acme-batch"),
            ("x-sluice-priority", "interactive"),
        ]));
        assert_eq!(id.priority, Priority::Interactive);
    }
}
