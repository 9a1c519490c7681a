//! What `sluice status` prints: the `/status` document ([`StatusDocument`]) as a table for a
//! terminal, one row per (org, model) bucket, then the orgs in quota cool-down.
//!
//! Pure: JSON in, text out. The CLI and the server may be different versions, so every field
//! is optional on the way in: a missing or mistyped value prints as `-`, never a panic.

use std::fmt::Write;

use serde_json::Value;

use crate::limiter::status::{BucketReport, Last429Report, StatusDocument, WindowReport};
use crate::upstream::ratelimit::Family;

/// Renders a `/status` document. Counts are exact; only round ones are shortened (`30k`).
pub fn render(status: &Value) -> String {
    let status = StatusDocument::read(status);
    let mut out = String::new();
    let version = status.version.as_deref().unwrap_or("?");
    let upstream = status.upstream.as_deref().unwrap_or("?");
    let draining = if status.draining == Some(true) {
        " (draining: not accepting new work)"
    } else {
        ""
    };
    let _ = writeln!(out, "sluice {version}, upstream {upstream}{draining}");
    if let Some(store) = &status.shared_store {
        let url = store.url.as_deref().unwrap_or("?");
        let replicas = store
            .replicas
            .map_or_else(|| "?".to_owned(), |replicas| replicas.to_string());
        let state = match (store.up, store.on_store_error.as_deref()) {
            (Some(true), _) => format!("up, {replicas} replicas alive"),
            (Some(false), Some("fail_closed")) => {
                "DOWN: refusing metered requests (on_store_error = fail_closed)".to_owned()
            }
            (Some(false), _) => {
                format!("DOWN: each replica spends its share of the limits (1/{replicas})")
            }
            (None, _) => "?".to_owned(),
        };
        let _ = writeln!(out, "shared store {url}: {state}");
    }
    out.push('\n');

    if status.buckets.is_empty() {
        out.push_str("No buckets yet: no metered request has been seen.\n");
    } else {
        out.push_str(&bucket_table(&status.buckets).render());
    }

    out.push('\n');
    if status.quota_cooldowns.is_empty() {
        out.push_str("Quota cool-down: none.\n");
    } else {
        out.push_str(
            "Quota cool-down (answered with the upstream's quota error, not forwarded):\n",
        );
        let mut table = Table::new(&[("ORG", Align::Left), ("LEFT", Align::Right)]);
        for cooldown in &status.quota_cooldowns {
            table.push(vec![
                text(cooldown.org.as_deref()),
                duration(cooldown.remaining_secs),
            ]);
        }
        for line in table.render().lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

fn bucket_table(buckets: &[BucketReport]) -> Table {
    // Daily limits are rare: their columns appear only when some bucket has one.
    let daily = buckets.iter().any(|bucket| {
        let in_force = &bucket.limits.in_force;
        in_force.rpd.is_some() || in_force.tpd.is_some()
    });
    // So is the sharing column: only with a shared store.
    let shared = buckets.iter().any(|bucket| bucket.sharing.is_some());
    let mut columns = vec![("ORG", Align::Left), ("MODEL", Align::Left)];
    if shared {
        columns.push(("SHARED", Align::Left));
    }
    columns.extend([("RPM", Align::Right), ("TPM", Align::Right)]);
    if daily {
        columns.extend([("RPD", Align::Right), ("TPD", Align::Right)]);
    }
    columns.extend([
        ("AVAIL REQ", Align::Right),
        ("AVAIL TOK", Align::Right),
        ("UPSTREAM REQ", Align::Right),
        ("UPSTREAM TOK", Align::Right),
        ("SEEN", Align::Left),
        ("QUEUE I/B/R", Align::Right),
        ("CIRCUIT", Align::Left),
        ("PAUSED", Align::Left),
        ("LEARNING", Align::Left),
        ("LAST 429", Align::Left),
    ]);
    let mut table = Table::new(&columns);
    for bucket in buckets {
        let in_force = &bucket.limits.in_force;
        let upstream = bucket.upstream.as_ref();
        let family = |family| upstream.and_then(|upstream| upstream.family(family));
        let queue = &bucket.queue;
        let mut row = vec![text(bucket.org.as_deref()), text(bucket.model.as_deref())];
        if shared {
            row.push(match (bucket.sharing.as_deref(), bucket.share_of) {
                (Some("degraded"), Some(replicas)) => format!("degraded 1/{replicas}"),
                (sharing, _) => text(sharing),
            });
        }
        row.extend([whole(in_force.rpm), whole(in_force.tpm)]);
        if daily {
            row.extend([whole(in_force.rpd), whole(in_force.tpd)]);
        }
        row.extend([
            count(bucket.available.requests),
            count(bucket.available.tokens),
            window(family(Family::Requests)),
            window(family(Family::Tokens)),
            ago(upstream.and_then(|upstream| upstream.age_secs)),
            format!(
                "{}/{}/{}",
                whole(queue.interactive),
                whole(queue.batch),
                whole(queue.replays)
            ),
            text(bucket.circuit.map(|circuit| circuit.label())),
            duration(bucket.paused_for_secs),
            match bucket.learning {
                Some(true) => "yes".to_owned(),
                Some(false) => "no".to_owned(),
                None => "-".to_owned(),
            },
            last_429(bucket.last_429.as_ref()),
        ]);
        table.push(row);
    }
    table
}

/// The upstream's last view of one resource: `remaining/limit`.
fn window(window: Option<&WindowReport>) -> String {
    let Some(window) = window else {
        return "-".to_owned();
    };
    format!("{}/{}", whole(window.remaining), whole(window.limit))
}

fn last_429(last: Option<&Last429Report>) -> String {
    let Some(last) = last else {
        return "-".to_owned();
    };
    format!("{} {}", text(last.reason.as_deref()), ago(last.age_secs))
}

fn text(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

/// A whole count, as [`count`] prints it.
fn whole(value: Option<u64>) -> String {
    count(value.map(|n| n as f64))
}

/// A count, exact: a round one from 10,000 on is shortened (`30k`, `1.5M`), any other is
/// printed whole, so a remaining `9999970` never reads as a round `10M`. Available budget is
/// fractional (it refills continuously) and is rounded down.
fn count(value: Option<f64>) -> String {
    let Some(number) = value.filter(|n| n.is_finite()) else {
        return "-".to_owned();
    };
    let whole = number.floor().clamp(i64::MIN as f64, i64::MAX as f64) as i64;
    for (unit, suffix) in [(1_000_000_000i64, "G"), (1_000_000, "M"), (1_000, "k")] {
        let tenth = unit / 10;
        if whole.unsigned_abs() >= unit.max(10_000).unsigned_abs() && whole % tenth == 0 {
            let tenths = whole / tenth;
            return match tenths % 10 {
                0 => format!("{}{suffix}", tenths / 10),
                frac => format!("{}.{}{suffix}", tenths / 10, frac.abs()),
            };
        }
    }
    whole.to_string()
}

fn ago(secs: Option<f64>) -> String {
    match secs {
        Some(_) => format!("{} ago", duration(secs)),
        None => "-".to_owned(),
    }
}

/// Seconds as `0.3s`, `42s`, `5m12s`, `2h5m`, `3d4h`.
fn duration(secs: Option<f64>) -> String {
    let Some(secs) = secs.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "-".to_owned();
    };
    if secs < 10.0 {
        return format!("{secs:.1}s");
    }
    let whole = secs.round().min(u64::MAX as f64) as u64;
    match whole {
        0..60 => format!("{whole}s"),
        60..3_600 => format!("{}m{}s", whole / 60, whole % 60),
        3_600..86_400 => format!("{}h{}m", whole / 3_600, whole % 3_600 / 60),
        _ => format!("{}d{}h", whole / 86_400, whole % 86_400 / 3_600),
    }
}

#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Columns as wide as their widest cell, two spaces apart.
struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    fn render(&self) -> String {
        let header: Vec<String> = self.columns.iter().map(|(h, _)| (*h).to_owned()).collect();
        let lines: Vec<&Vec<String>> = std::iter::once(&header).chain(&self.rows).collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|column| {
                lines
                    .iter()
                    .filter_map(|line| line.get(column))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for line in lines {
            let mut text = String::new();
            for (column, ((_, align), width)) in self.columns.iter().zip(&widths).enumerate() {
                let cell = line.get(column).map_or("", String::as_str);
                if column > 0 {
                    text.push_str("  ");
                }
                let _ = match align {
                    Align::Left => write!(text, "{cell:<width$}"),
                    Align::Right => write!(text, "{cell:>width$}"),
                };
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    /// A `/status` document as the server writes it: a bucket after traffic and a 429, an
    /// untouched learning bucket, and an org in quota cool-down.
    fn sample() -> Value {
        json!({
            "version": "0.1.0",
            "upstream": "https://api.openai.com",
            "draining": false,
            "quota_cooldowns": [{"org": "broke", "remaining_secs": 54.2}],
            "buckets": [
                {
                    "org": "acme",
                    "model": "gpt-4o-mini",
                    "limits": {
                        "configured": {"rpm": 500, "tpm": 200000, "rpd": null, "tpd": null},
                        "learned": {"rpm": 10000, "tpm": 10000000, "rpd": null, "tpd": null},
                        "in_force": {"rpm": 500, "tpm": 200000, "rpd": null, "tpd": null},
                    },
                    "learning": false,
                    "available": {"requests": 497.6, "tokens": 199_950.2},
                    "burst": {"requests": 500.0, "tokens": 200000.0},
                    "circuit": "closed",
                    "paused_for_secs": 1.26,
                    "queue": {"interactive": 3, "batch": 1, "replays": 1},
                    "upstream": {
                        "age_secs": 2.04,
                        "requests": {"limit": 10000, "remaining": 9998, "reset_secs": 0.012},
                        "tokens": {"limit": 10000000, "remaining": 9_999_950, "reset_secs": 0.0},
                    },
                    "last_429": {"reason": "tokens", "wait_secs": 1.25, "age_secs": 75.0},
                },
                {
                    "org": "key-1a2b3c4d",
                    "model": "text-embedding-3-small",
                    "limits": {
                        "configured": {"rpm": null, "tpm": null, "rpd": null, "tpd": null},
                        "learned": {"rpm": null, "tpm": null, "rpd": null, "tpd": null},
                        "in_force": {"rpm": null, "tpm": null, "rpd": null, "tpd": null},
                    },
                    "learning": true,
                    "available": {"requests": null, "tokens": null},
                    "burst": {"requests": null, "tokens": null},
                    "circuit": "open",
                    "paused_for_secs": null,
                    "queue": {"interactive": 0, "batch": 0, "replays": 0},
                    "upstream": null,
                    "last_429": null,
                },
            ],
        })
    }

    /// A number as a document field reads it: `None` when missing or mistyped.
    fn figure(value: &Value) -> Option<f64> {
        Option::<f64>::deserialize(value).unwrap_or_default()
    }

    fn row<'a>(text: &'a str, starts: &str) -> &'a str {
        text.lines()
            .find(|line| line.starts_with(starts))
            .unwrap_or_else(|| panic!("no line starting {starts:?} in\n{text}"))
    }

    #[test]
    fn one_row_per_bucket_with_every_figure() {
        let text = render(&sample());
        assert!(text.starts_with("sluice 0.1.0, upstream https://api.openai.com\n"));
        let header = row(&text, "ORG");
        for column in [
            "MODEL",
            "RPM",
            "TPM",
            "AVAIL REQ",
            "AVAIL TOK",
            "UPSTREAM REQ",
            "UPSTREAM TOK",
            "SEEN",
            "QUEUE I/B/R",
            "CIRCUIT",
            "PAUSED",
            "LEARNING",
            "LAST 429",
        ] {
            assert!(header.contains(column), "{column} missing: {header}");
        }
        assert!(!header.contains("RPD"), "no daily limits, no daily columns");
        let acme: Vec<&str> = row(&text, "acme").split_whitespace().collect();
        assert_eq!(
            acme,
            [
                "acme",
                "gpt-4o-mini",
                "500",
                "200k",
                "497",
                "199950",
                "9998/10k",
                "9999950/10M",
                "2.0s",
                "ago",
                "3/1/1",
                "closed",
                "1.3s",
                "no",
                "tokens",
                "1m15s",
                "ago",
            ]
        );
        let unknown: Vec<&str> = row(&text, "key-").split_whitespace().collect();
        assert_eq!(
            unknown,
            [
                "key-1a2b3c4d",
                "text-embedding-3-small",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "0/0/0",
                "open",
                "-",
                "yes",
                "-",
            ]
        );
    }

    #[test]
    fn columns_line_up() {
        let text = render(&sample());
        let header = row(&text, "ORG");
        let acme = row(&text, "acme");
        let unknown = row(&text, "key-");
        // Left-aligned columns start where their header does.
        for (column, cell_acme, cell_unknown) in [
            ("MODEL", "gpt-4o-mini", "text-embedding-3-small"),
            ("CIRCUIT", "closed", "open"),
        ] {
            let at = header.find(column).expect("column");
            assert_eq!(acme.find(cell_acme), Some(at), "{text}");
            assert_eq!(unknown.find(cell_unknown), Some(at), "{text}");
        }
        // Right-aligned ones end where their header does.
        let end = header.find("QUEUE I/B/R").expect("column") + "QUEUE I/B/R".len();
        assert_eq!(acme.find("3/1/1").map(|at| at + 5), Some(end), "{text}");
    }

    #[test]
    fn quota_cool_downs_and_draining_are_shown() {
        let text = render(&sample());
        let broke: Vec<&str> = row(&text, "  broke").split_whitespace().collect();
        assert_eq!(broke, ["broke", "54s"]);

        let mut status = sample();
        status["quota_cooldowns"] = json!([]);
        status["draining"] = json!(true);
        let text = render(&status);
        assert!(text.lines().next().is_some_and(|l| l.contains("draining")));
        assert!(text.contains("Quota cool-down: none."), "{text}");
    }

    #[test]
    fn a_shared_store_and_each_buckets_sharing_are_shown() {
        assert!(!row(&render(&sample()), "ORG").contains("SHARED"));
        let mut status = sample();
        status["shared_store"] = json!({
            "url": "redis://redis:6379/0", "up": false, "replicas": 3,
            "on_store_error": "degrade",
        });
        status["buckets"][0]["sharing"] = json!("degraded");
        status["buckets"][0]["share_of"] = json!(3);
        status["buckets"][1]["sharing"] = json!("local");
        let text = render(&status);
        assert!(
            text.contains(
                "shared store redis://redis:6379/0: DOWN: each replica spends its share of \
                 the limits (1/3)"
            ),
            "{text}"
        );
        let acme: Vec<&str> = row(&text, "acme").split_whitespace().collect();
        assert_eq!(acme[..5], ["acme", "gpt-4o-mini", "degraded", "1/3", "500"]);
        let unknown: Vec<&str> = row(&text, "key-").split_whitespace().collect();
        assert_eq!(unknown[2], "local");
        status["shared_store"]["up"] = json!(true);
        assert!(render(&status).contains("redis://redis:6379/0: up, 3 replicas alive"));
    }

    #[test]
    fn daily_limits_get_columns_only_when_set() {
        let mut status = sample();
        status["buckets"][0]["limits"]["in_force"]["tpd"] = json!(90_000_000);
        let text = render(&status);
        assert!(row(&text, "ORG").contains("TPD"), "{text}");
        let acme: Vec<&str> = row(&text, "acme").split_whitespace().collect();
        assert_eq!(acme[2..6], ["500", "200k", "-", "90M"]);
    }

    #[test]
    fn anything_missing_or_mistyped_prints_a_dash() {
        for status in [
            json!({}),
            json!(null),
            json!("nonsense"),
            json!({"buckets": "x", "quota_cooldowns": 3}),
            json!({"buckets": [{}], "quota_cooldowns": [{}]}),
            json!({"buckets": [{"limits": 1, "queue": [], "upstream": {"requests": 5}}]}),
        ] {
            let text = render(&status);
            assert!(text.starts_with("sluice ?, upstream ?"), "{text}");
        }
        let text = render(&json!({"buckets": []}));
        assert!(text.contains("No buckets yet"), "{text}");
    }

    #[test]
    fn counts_are_exact_and_shortened_only_when_round() {
        let cases = [
            (json!(0), "0"),
            (json!(1_000), "1000"),
            (json!(9_999), "9999"),
            (json!(10_000), "10k"),
            (json!(12_300), "12.3k"),
            (json!(29_950), "29950"),
            (json!(200_000), "200k"),
            (json!(1_500_000), "1.5M"),
            (json!(9_999_970), "9999970"),
            (json!(10_000_000), "10M"),
            (json!(2_000_000_000u64), "2G"),
            (json!(497.9), "497"),
            (json!(-12.2), "-13"),
            (json!(-25_000.0), "-25k"),
            (json!(-1_500_000), "-1.5M"),
            (json!(null), "-"),
            (json!("12"), "-"),
        ];
        for (value, expected) in cases {
            assert_eq!(count(figure(&value)), expected, "{value}");
        }
    }

    #[test]
    fn durations_read_naturally() {
        let cases = [
            (json!(0.0), "0.0s"),
            (json!(0.26), "0.3s"),
            (json!(9.94), "9.9s"),
            (json!(42.4), "42s"),
            (json!(312), "5m12s"),
            (json!(7_500), "2h5m"),
            (json!(273_600), "3d4h"),
            (json!(-1), "-"),
            (json!(null), "-"),
        ];
        for (value, expected) in cases {
            assert_eq!(duration(figure(&value)), expected, "{value}");
        }
    }
}
