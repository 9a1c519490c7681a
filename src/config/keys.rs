//! Keys, in one place: the API keys (or their hashes) that identify an org, and its managed
//! keys, the provider key sluice sends for it and the client tokens applications bear instead.
//! A key, token or hash identifies one org; sluice keeps only their hashes (the provider key
//! aside) and names a key in a message by its hash's [`hex_prefix`], never by its value.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::issues::Issues;
use super::raw::{RawKey, RawKeyHash, RawOrg};
use super::sources::Sources;
use super::{OrgConfig, UpstreamKey};
use crate::priority::Priority;

/// The org that most recently listed each key, token or hash, over all orgs so far.
#[derive(Default)]
pub(super) struct KeyOwners(HashMap<[u8; 32], String>);

impl KeyOwners {
    /// Makes `org` the owner of `hash`; returns the previous owner, if the hash had one.
    fn claim(&mut self, hash: [u8; 32], org: &str) -> Option<String> {
        self.0.insert(hash, org.to_owned())
    }
}

/// The hashes of the keys that identify an org, each with the priority its requests get.
struct OrgKeys<'a> {
    org: &'a str,
    owners: &'a mut KeyOwners,
    hashes: Vec<([u8; 32], Priority)>,
}

impl OrgKeys<'_> {
    fn add_key(&mut self, key: &str, priority: Priority, key_path: &str, issues: &mut Issues) {
        let key = key.trim();
        if key.is_empty() {
            issues.add(key_path, "an API key is empty".to_owned());
            return;
        }
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.hashes.push((hash, priority));
        // Never echo the key: name the duplicate by its automatic org name.
        if let Some(owner) = self.owners.claim(hash, self.org) {
            issues.add(
                key_path,
                format!(
                    "the key hashed {} is also listed by org {owner:?}",
                    hex_prefix(&hash)
                ),
            );
        }
    }

    fn add_hash(&mut self, text: &str, priority: Priority, key_path: &str, issues: &mut Issues) {
        match parse_sha256(text) {
            Some(hash) => {
                self.hashes.push((hash, priority));
                if let Some(owner) = self.owners.claim(hash, self.org) {
                    issues.add(
                        key_path,
                        format!("this hash is also listed by org {owner:?}"),
                    );
                }
            }
            None => issues.add(
                key_path,
                "not a SHA-256 in hex (64 hex digits; compute it with: printf %s \"$KEY\" | sha256sum)".to_owned(),
            ),
        }
    }
}

/// The hashes of `org`'s keys, from `keys`, `keys_env` and `key_sha256` in that order; `at`
/// is the org's key path (`org[i]`).
pub(super) fn key_hashes(
    at: &str,
    org: &RawOrg,
    default_priority: Priority,
    sources: &Sources,
    owners: &mut KeyOwners,
    issues: &mut Issues,
) -> Vec<([u8; 32], Priority)> {
    let mut keys = OrgKeys {
        org: &org.name,
        owners,
        hashes: Vec::new(),
    };
    for (k, key) in org.keys.iter().enumerate() {
        let (text, priority) = match key {
            RawKey::Plain(text) => (text.as_str(), default_priority),
            RawKey::WithPriority { key, priority } => (key.as_str(), *priority),
        };
        keys.add_key(text, priority, &format!("{at}.keys[{k}]"), issues);
    }
    if let Some(var) = &org.keys_env {
        match sources.env(var) {
            Some(list) => {
                for key in list.split(',').filter(|k| !k.trim().is_empty()) {
                    keys.add_key(key, default_priority, &format!("{at}.keys_env"), issues);
                }
            }
            None => issues.add(
                &format!("{at}.keys_env"),
                format!("environment variable {var} is not set (or not UTF-8); it should hold a comma-separated list of keys"),
            ),
        }
    }
    for (k, entry) in org.key_sha256.iter().enumerate() {
        let (text, priority) = match entry {
            RawKeyHash::Plain(text) => (text.as_str(), default_priority),
            RawKeyHash::WithPriority { sha256, priority } => (sha256.as_str(), *priority),
        };
        keys.add_hash(text, priority, &format!("{at}.key_sha256[{k}]"), issues);
    }
    keys.hashes
}

/// An org's managed keys: the provider key sluice sends for it, and the client tokens that
/// stand in for that key.
pub(super) struct ManagedKeys {
    pub(super) upstream_key: Option<UpstreamKey>,
    pub(super) client_token_hashes: Vec<[u8; 32]>,
}

/// Resolves `org`'s `upstream_key_env` or `upstream_key_file`, then its `client_tokens_env`.
pub(super) fn managed_keys(
    at: &str,
    org: &RawOrg,
    sources: &Sources,
    owners: &mut KeyOwners,
    issues: &mut Issues,
) -> ManagedKeys {
    let upstream_key = provider_key(at, org, sources, issues);
    let mut client_token_hashes = Vec::new();
    if let Some(var) = &org.client_tokens_env {
        let key_path = format!("{at}.client_tokens_env");
        client_token_hashes = client_tokens(&key_path, var, &org.name, sources, owners, issues);
        if upstream_key.is_none()
            && org.upstream_key_env.is_none()
            && org.upstream_key_file.is_none()
        {
            issues.add(
                &key_path,
                "client tokens need the org's own provider key: set upstream_key_env or upstream_key_file".to_owned(),
            );
        }
    }
    ManagedKeys {
        upstream_key,
        client_token_hashes,
    }
}

/// The provider key named by `upstream_key_env` or `upstream_key_file` (at most one of them).
fn provider_key(
    at: &str,
    org: &RawOrg,
    sources: &Sources,
    issues: &mut Issues,
) -> Option<UpstreamKey> {
    match (&org.upstream_key_env, &org.upstream_key_file) {
        (Some(_), Some(_)) => {
            issues.add(
                &format!("{at}.upstream_key_env"),
                "give upstream_key_env or upstream_key_file, not both".to_owned(),
            );
            None
        }
        (Some(var), None) => match sources.env(var) {
            Some(key) => upstream_key(key, &format!("{at}.upstream_key_env"), issues),
            None => {
                issues.add(
                    &format!("{at}.upstream_key_env"),
                    format!("environment variable {var} is not set (or not UTF-8); it should hold the provider's API key"),
                );
                None
            }
        },
        (None, Some(path)) => match sources.file(path) {
            Ok(key) => upstream_key(key, &format!("{at}.upstream_key_file"), issues),
            Err(err) => {
                issues.add(
                    &format!("{at}.upstream_key_file"),
                    format!("cannot read {}: {err}", path.display()),
                );
                None
            }
        },
        (None, None) => None,
    }
}

/// The hashes of the comma-separated client tokens in `var`, which `org` claims.
fn client_tokens(
    key_path: &str,
    var: &str,
    org: &str,
    sources: &Sources,
    owners: &mut KeyOwners,
    issues: &mut Issues,
) -> Vec<[u8; 32]> {
    let Some(list) = sources.env(var) else {
        issues.add(
            key_path,
            format!("environment variable {var} is not set (or not UTF-8); it should hold a comma-separated list of client tokens"),
        );
        return Vec::new();
    };
    let mut hashes = Vec::new();
    for token in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if token.len() < 16 {
            issues.add(key_path, format!("a client token in {var} is shorter than 16 characters; use long random tokens (openssl rand -hex 24)"));
            continue;
        }
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(owner) = owners.claim(hash, org) {
            issues.add(
                key_path,
                format!("a token in {var} is also listed by org {owner:?}"),
            );
        }
        hashes.push(hash);
    }
    if hashes.is_empty() {
        issues.add(
            key_path,
            format!("environment variable {var} holds no token"),
        );
    }
    hashes
}

/// A client token that is some org's provider key defeats the point of tokens: whoever holds
/// it holds the provider key too, and could go around sluice with it.
pub(super) fn refuse_tokens_equal_to_provider_keys(orgs: &[OrgConfig], issues: &mut Issues) {
    let provider_keys: Vec<([u8; 32], &str)> = orgs
        .iter()
        .filter_map(|org| {
            let value = org.upstream_key.as_ref()?.0.as_bytes();
            let key = value.strip_prefix(b"Bearer ")?;
            Some((Sha256::digest(key).into(), org.name.as_str()))
        })
        .collect();
    for (index, org) in orgs.iter().enumerate() {
        for token in &org.client_token_hashes {
            if let Some((_, owner)) = provider_keys.iter().find(|(key, _)| key == token) {
                issues.add(
                    &format!("org[{index}].client_tokens_env"),
                    format!(
                        "a client token of org {:?} is the provider key of org {owner:?}; \
                         client tokens must be secrets of their own (openssl rand -hex 24), \
                         never a provider key",
                        org.name
                    ),
                );
            }
        }
    }
}

/// A provider key as sluice will send it: `Bearer <key>`, trimmed (files end in a newline).
fn upstream_key(text: &str, key_path: &str, issues: &mut Issues) -> Option<UpstreamKey> {
    let key = text.trim();
    if key.is_empty() {
        issues.add(key_path, "the provider key is empty".to_owned());
        return None;
    }
    match http::HeaderValue::from_str(&format!("Bearer {key}")) {
        Ok(mut value) => {
            value.set_sensitive(true);
            Some(UpstreamKey(value))
        }
        Err(_) => {
            issues.add(
                key_path,
                "the provider key contains characters a header cannot carry".to_owned(),
            );
            None
        }
    }
}

fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The first 8 hex digits of a hash: how keys are named wherever a name is needed.
pub fn hex_prefix(hash: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    hash[..4]
        .iter()
        .flat_map(|byte| [byte >> 4, byte & 0xf])
        .map(|nibble| char::from(DIGITS[usize::from(nibble)]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::hex_prefix;
    use crate::config::testing::parse;

    #[test]
    fn hex_prefix_is_the_first_four_bytes_in_lowercase_hex() {
        let mut hash = [0xffu8; 32];
        hash[..4].copy_from_slice(&[0x0a, 0xbc, 0xde, 0xf1]);
        assert_eq!(hex_prefix(&hash), "0abcdef1");
        assert_eq!(hex_prefix(&[0; 32]), "00000000");
    }

    #[test]
    fn a_client_token_that_is_a_provider_key_is_refused() {
        let provider = "sk-provider-key-of-acme-0123456789abcdef";
        std::env::set_var("SLUICE_CONFIG_TEST_PROVIDER_KEY", provider);
        std::env::set_var(
            "SLUICE_CONFIG_TEST_TOKENS",
            format!("client-token-0123456789abcdef, {provider}"),
        );
        let text =
            "[[org]]\nname = \"acme\"\nupstream_key_env = \"SLUICE_CONFIG_TEST_PROVIDER_KEY\"\n\
                    client_tokens_env = \"SLUICE_CONFIG_TEST_TOKENS\"\n";
        let err = parse(text).expect_err("a token equal to the provider key");
        assert!(
            err.issues
                .iter()
                .any(|issue| issue.key == "org[0].client_tokens_env"
                    && issue.message.contains("provider key")),
            "{err:?}"
        );
        std::env::set_var("SLUICE_CONFIG_TEST_TOKENS", "client-token-0123456789abcdef");
        parse(text).expect("distinct tokens are fine");
    }
}
