//! Rate-limited log lines, for events a client can repeat at will (a flood of HTTP/2
//! connections each ending in GOAWAY would otherwise write one line per connection): the first
//! is logged at once, then at most one line per period, saying how many were left out since the
//! last one. Time is tokio's and passed in, so the decisions are pure and tested with any clock.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

/// One kind of event's log lines.
#[derive(Debug)]
pub struct LogLimit {
    period: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// When the last line was logged.
    logged: Option<Instant>,
    /// Events left out since then.
    suppressed: u64,
}

impl LogLimit {
    pub const fn new(period: Duration) -> LogLimit {
        LogLimit { period, state: Mutex::new(State { logged: None, suppressed: 0 }) }
    }

    /// An event happened at `now`: `Some(n)` says log it, adding that `n` more were left out
    /// since the last line; `None` says leave it out (it is counted for the next line).
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.logged {
            Some(last) if now.saturating_duration_since(last) < self.period => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.logged = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

/// The `--log` filter as given, with h2's own warnings silenced unless it names h2: h2 warns
/// once per connection it ends for a flood, so a flood would write a line per connection; the
/// proxy logs those connections itself, rate-limited (`http::server`).
pub fn filter(given: &str) -> String {
    let names_h2 = given
        .split(',')
        .map(str::trim)
        .any(|d| d == "h2" || ["h2=", "h2::", "h2["].iter().any(|p| d.starts_with(p)));
    if names_h2 || given.trim().is_empty() {
        return given.to_owned();
    }
    format!("{given},h2=error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_silences_h2_unless_asked_for() {
        assert_eq!(filter("info"), "info,h2=error");
        assert_eq!(filter("warn,weft_proxy=debug"), "warn,weft_proxy=debug,h2=error");
        assert_eq!(filter("info,h2=debug"), "info,h2=debug");
        assert_eq!(filter("h2::proto=trace"), "h2::proto=trace");
        assert_eq!(filter("info,h2x=debug"), "info,h2x=debug,h2=error");
        for f in ["info", "warn,weft_proxy=debug"] {
            assert!(tracing_subscriber::EnvFilter::try_new(filter(f)).is_ok());
        }
    }

    #[test]
    fn first_logged_then_one_line_per_period_with_the_count() {
        let limit = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(limit.check(at(0)), Some(0), "the first is logged");
        for ms in 1..=999 {
            assert_eq!(limit.check(at(ms * 10)), None, "within the period");
        }
        assert_eq!(limit.check(at(10_000)), Some(999), "the next line says how many were left out");
        assert_eq!(limit.check(at(10_001)), None);
        // A quiet spell: the next event is logged at once, with what was left out before it.
        assert_eq!(limit.check(at(60_000)), Some(1));
        assert_eq!(limit.check(at(60_000)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn follows_tokio_time() {
        static LIMIT: LogLimit = LogLimit::new(Duration::from_secs(10));
        assert_eq!(LIMIT.check(Instant::now()), Some(0));
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(LIMIT.check(Instant::now()), None);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(LIMIT.check(Instant::now()), Some(1));
    }
}
