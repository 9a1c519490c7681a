//! Durations the way OpenAI writes them: Go's `time.Duration` text, at millisecond precision.

use std::time::Duration;

/// Longest wait the mock ever states; a bucket that never refills (a limit of 0) reports this.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// Formats `d` like Go's `Duration.String()` after rounding up to whole milliseconds, which is
/// what OpenAI's headers and messages show: `0s`, `120ms`, `9.816s`, `1m26.4s`, `6m0s`,
/// `2h2m24s`. Rounding up means a client that waits exactly the stated time is never early.
pub fn go_duration(d: Duration) -> String {
    let ms = ceil_millis(d);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let hours = ms / 3_600_000;
    let minutes = (ms / 60_000) % 60;
    let seconds = format_seconds(ms % 60_000);
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}s")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

/// Whole milliseconds, rounded up, ignoring float noise below a nanosecond or so (a wait computed
/// as 0.18 s must read `180ms`, not `181ms`).
pub(crate) fn ceil_millis(d: Duration) -> u64 {
    let nanos = d.as_nanos().saturating_sub(10);
    u64::try_from(nanos.div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// Seconds from a float, clamped to `0..=MAX_WAIT` (float math on limits of 0 gives infinities).
pub(crate) fn from_secs(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(secs)
            .unwrap_or(MAX_WAIT)
            .min(MAX_WAIT)
    }
}

fn format_seconds(ms: u64) -> String {
    let (whole, frac) = (ms / 1000, ms % 1000);
    if frac == 0 {
        whole.to_string()
    } else {
        let frac = format!("{frac:03}");
        format!("{whole}.{}", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_openai() {
        let cases = [
            (0, "0s"),
            (2, "2ms"),
            (120, "120ms"),
            (644, "644ms"),
            (1_000, "1s"),
            (1_500, "1.5s"),
            (9_816, "9.816s"),
            (86_400, "1m26.4s"),
            (360_000, "6m0s"),
            (692_334, "11m32.334s"),
            (7_344_000, "2h2m24s"),
            (86_794_000, "24h6m34s"),
            (3_600_000, "1h0m0s"),
        ];
        for (ms, want) in cases {
            assert_eq!(go_duration(Duration::from_millis(ms)), want, "{ms}ms");
        }
    }

    #[test]
    fn rounds_up_to_the_millisecond() {
        assert_eq!(go_duration(Duration::from_micros(1)), "1ms");
        assert_eq!(go_duration(Duration::from_micros(120_001)), "121ms");
        assert_eq!(go_duration(Duration::from_secs_f64(0.18)), "180ms");
        assert_eq!(
            go_duration(Duration::from_secs_f64(120.0 / (40_000.0 / 60.0))),
            "180ms"
        );
    }

    #[test]
    fn clamps_float_seconds() {
        assert_eq!(from_secs(-1.0), Duration::ZERO);
        assert_eq!(from_secs(f64::NAN), Duration::ZERO);
        assert_eq!(from_secs(f64::INFINITY), MAX_WAIT);
        assert_eq!(from_secs(1.5), Duration::from_millis(1500));
    }
}
