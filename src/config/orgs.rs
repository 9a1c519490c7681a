//! The `[[org]]` tables: each org's name, organization ids, keys (see [`super::keys`]) and
//! limits. A name, an organization id or a key belongs to one org, so each is checked against
//! every org before it.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::issues::Issues;
use super::keys::{self, KeyOwners};
use super::raw::{RawLimits, RawOrg};
use super::sources::Sources;
use super::OrgConfig;
use crate::limiter::bucket::Limits;

/// What the orgs checked so far have claimed.
#[derive(Default)]
struct Claimed {
    names: HashSet<String>,
    /// Organization id to the org that lists it.
    organization_ids: HashMap<String, String>,
    keys: KeyOwners,
}

pub(super) fn validate_orgs(
    raw: Vec<RawOrg>,
    sources: &Sources,
    issues: &mut Issues,
) -> Vec<OrgConfig> {
    let mut claimed = Claimed::default();
    let mut orgs = Vec::with_capacity(raw.len());
    for (index, org) in raw.into_iter().enumerate() {
        let at = format!("org[{index}]");
        orgs.push(validate_org(&at, org, sources, &mut claimed, issues));
    }
    keys::refuse_tokens_equal_to_provider_keys(&orgs, issues);
    orgs
}

/// One org; `at` is its key path (`org[i]`).
fn validate_org(
    at: &str,
    org: RawOrg,
    sources: &Sources,
    claimed: &mut Claimed,
    issues: &mut Issues,
) -> OrgConfig {
    check_name(at, &org.name, &mut claimed.names, issues);
    let default_priority = org.default_priority.unwrap_or_default();
    check_organization_ids(at, &org, &mut claimed.organization_ids, issues);
    let key_hashes = keys::key_hashes(
        at,
        &org,
        default_priority,
        sources,
        &mut claimed.keys,
        issues,
    );
    let limits = validate_limits(at, &org.limits, issues);
    let managed = keys::managed_keys(at, &org, sources, &mut claimed.keys, issues);
    OrgConfig {
        name: org.name,
        organization_ids: org.organization_ids,
        key_hashes,
        default_priority,
        limits,
        upstream_key: managed.upstream_key,
        client_token_hashes: managed.client_token_hashes,
        upstream_key_file: org.upstream_key_file,
    }
}

fn check_name(at: &str, name: &str, names: &mut HashSet<String>, issues: &mut Issues) {
    if !valid_org_name(name) {
        issues.add(
            &format!("{at}.name"),
            format!(
                "{name:?} is not a valid org name: use 1-64 letters, digits, '-', '_' or '.', \
                 not starting with \"key-\" (reserved for automatic orgs)"
            ),
        );
    } else if !names.insert(name.to_owned()) {
        issues.add(
            &format!("{at}.name"),
            format!("{name:?} is used by another org"),
        );
    }
}

/// Org names label metrics: short, plain, and never in the automatic `key-` namespace.
fn valid_org_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with("key-")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_organization_ids(
    at: &str,
    org: &RawOrg,
    owners: &mut HashMap<String, String>,
    issues: &mut Issues,
) {
    for id in &org.organization_ids {
        if id.trim().is_empty() {
            issues.add(
                &format!("{at}.organization_ids"),
                "an entry is empty".to_owned(),
            );
        } else if let Some(owner) = owners.insert(id.clone(), org.name.clone()) {
            issues.add(
                &format!("{at}.organization_ids"),
                format!("{id:?} is also listed by org {owner:?}"),
            );
        }
    }
}

/// Limits by model; an entry with a problem is left out (the org is refused anyway).
fn validate_limits(
    at: &str,
    raw: &BTreeMap<String, RawLimits>,
    issues: &mut Issues,
) -> HashMap<String, Limits> {
    let mut limits = HashMap::new();
    for (model, raw_limits) in raw {
        let key_path = format!("{at}.limits.{model}");
        if model.trim().is_empty() {
            issues.add(
                &key_path,
                "the model name is empty (use \"*\" for any model)".to_owned(),
            );
            continue;
        }
        let parsed = Limits {
            rpm: raw_limits.rpm,
            tpm: raw_limits.tpm,
            rpd: raw_limits.rpd,
            tpd: raw_limits.tpd,
        };
        for (name, value) in [
            ("rpm", parsed.rpm),
            ("tpm", parsed.tpm),
            ("rpd", parsed.rpd),
            ("tpd", parsed.tpd),
        ] {
            if value == Some(0) {
                issues.add(
                    &format!("{key_path}.{name}"),
                    "a limit of 0 admits nothing; remove the key to leave it unlimited".to_owned(),
                );
            }
        }
        if parsed.is_empty() {
            issues.add(
                &key_path,
                "no limit set: give at least one of rpm, tpm, rpd, tpd".to_owned(),
            );
        }
        limits.insert(model.clone(), parsed);
    }
    limits
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{keys, parse};

    #[test]
    fn shipped_org_example_is_valid_once_uncommented() {
        let text = include_str!("../../config/sluice.toml");
        let start = text.find("# [[org]]").expect("the example has an org");
        let example: String = text[start..]
            .lines()
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            // Variables for the environment-based keys and tokens: checked in
            // tests/managed_keys.rs; the other key forms are checked here.
            .filter(|line| {
                !["keys_env", "upstream_key_env", "client_tokens_env"]
                    .iter()
                    .any(|key| line.starts_with(key))
            })
            .map(|line| {
                line.replace("\"sk-...\"", "\"sk-a\"")
                    .replace("\"sk-batch-...\"", "\"sk-b\"")
                    .replace("\"<64 hex digits>\"", &format!("\"{}\"", "0".repeat(64)))
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = parse(&example).expect("the org example is valid");
        let org = &config.orgs[0];
        assert_eq!(org.name, "acme");
        assert_eq!(org.key_hashes.len(), 3);
        assert_eq!(
            org.limits_for("gpt-4o-mini").and_then(|l| l.tpm),
            Some(200_000)
        );
        assert_eq!(
            org.limits_for("gpt-4.1").and_then(|l| l.tpd),
            Some(90_000_000)
        );
    }

    #[test]
    fn org_validation_names_every_problem() {
        let err = parse(
            "[[org]]\nname = \"key-x\"\nkeys = [\"sk-1\"]\n[org.limits.\"*\"]\nrpm = 0\n\
             [[org]]\nname = \"b\"\nkeys = [\"sk-1\"]\nkey_sha256 = [\"zz\"]\nkeys_env = \"SLUICE_TEST_UNSET_VAR\"\n\
             [org.limits.\"gpt-4o\"]\n",
        )
        .expect_err("invalid orgs");
        let keys = keys(err);
        assert_eq!(
            keys,
            [
                "org[0].name",
                "org[0].limits.*.rpm",
                "org[1].keys[0]",
                "org[1].keys_env",
                "org[1].key_sha256[0]",
                "org[1].limits.gpt-4o",
            ]
        );
    }
}
