//! What each step of the walkthrough expects of its numbers: pure checks that turn a count into a
//! verdict line, with tolerances that fit the sample size.

/// How far a count may stray from its expectation, in standard deviations of the binomial
/// distribution: a correct mesh fails a check this wide about once in 150,000 draws.
const SIGMAS: f64 = 4.5;

/// The verdict of one check: the line to show, and whether it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub held: bool,
    pub line: String,
}

impl Verdict {
    fn new(held: bool, line: String) -> Self {
        Self { held, line }
    }
}

/// The counts out of `n` draws, each a hit with probability `share`, that a correct mesh
/// produces: the expectation plus or minus [`SIGMAS`] standard deviations, widened to whole
/// counts. A share of 0 or 1 allows no slack at all.
pub fn binomial_bounds(n: u64, share: f64) -> (u64, u64) {
    let n_f = n as f64;
    let mean = n_f * share;
    let slack = SIGMAS * (n_f * share * (1.0 - share)).sqrt();
    let low = (mean - slack).floor().max(0.0) as u64;
    let high = ((mean + slack).ceil() as u64).min(n);
    (low, high)
}

/// `count` of `n` is within the binomial bounds of `share`.
pub fn share(what: &str, count: u64, n: u64, share: f64) -> Verdict {
    let (low, high) = binomial_bounds(n, share);
    let held = n > 0 && (low..=high).contains(&count);
    Verdict::new(
        held,
        format!(
            "{what}: {count}/{n} ({:.1}%), expected {:.0}% (accepted {low}..={high})",
            percent(count, n),
            share * 100.0
        ),
    )
}

/// Every one of `n`.
pub fn all(what: &str, count: u64, n: u64) -> Verdict {
    Verdict::new(n > 0 && count == n, format!("{what}: {count}/{n}, expected all"))
}

/// At least `n`.
pub fn at_least(what: &str, count: u64, n: u64) -> Verdict {
    Verdict::new(n > 0 && count >= n, format!("{what}: {count}, expected at least {n}"))
}

/// None of `n`.
pub fn none(what: &str, count: u64, n: u64) -> Verdict {
    Verdict::new(count == 0, format!("{what}: {count}/{n}, expected none"))
}

/// At least one of `n`.
pub fn some(what: &str, count: u64, n: u64) -> Verdict {
    Verdict::new(count > 0, format!("{what}: {count}/{n}, expected some"))
}

/// A latency (milliseconds) within `low..high`.
pub fn latency(what: &str, ms: Option<f64>, low: f64, high: f64) -> Verdict {
    let held = ms.is_some_and(|ms| (low..high).contains(&ms));
    let shown = ms.map_or_else(|| "none".to_owned(), |ms| format!("{ms:.1} ms"));
    Verdict::new(held, format!("{what}: {shown}, expected {low:.0} to {high:.0} ms"))
}

fn percent(count: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { count as f64 * 100.0 / n as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_widen_with_the_spread_of_the_sample() {
        // 400 draws at 10%: mean 40, sd 6, so 40 +- 27.
        assert_eq!(binomial_bounds(400, 0.1), (13, 67));
        // 400 at 50%: mean 200, sd 10.
        assert_eq!(binomial_bounds(400, 0.5), (155, 245));
        // Certain outcomes allow nothing else.
        assert_eq!(binomial_bounds(100, 0.0), (0, 0));
        assert_eq!(binomial_bounds(100, 1.0), (100, 100));
        // Never below 0 nor above n.
        assert_eq!(binomial_bounds(10, 0.1), (0, 6));
    }

    #[test]
    fn a_share_holds_only_within_its_bounds() {
        assert!(share("v2", 40, 400, 0.1).held);
        assert!(share("v2", 13, 400, 0.1).held);
        assert!(!share("v2", 12, 400, 0.1).held);
        assert!(!share("v2", 68, 400, 0.1).held);
        // A canary that took nothing, or everything, is wrong.
        assert!(!share("v2", 0, 400, 0.1).held);
        assert!(!share("v2", 400, 400, 0.5).held);
        assert!(!share("v2", 0, 0, 0.5).held);
        assert_eq!(share("v2", 40, 400, 0.1).line, "v2: 40/400 (10.0%), expected 10% (accepted 13..=67)");
    }

    #[test]
    fn all_none_and_some() {
        assert!(all("ok", 5, 5).held);
        assert!(!all("ok", 4, 5).held);
        assert!(!all("ok", 0, 0).held);
        assert!(at_least("tries", 7, 5).held);
        assert!(at_least("tries", 5, 5).held);
        assert!(!at_least("tries", 4, 5).held);
        assert!(!at_least("tries", 0, 0).held);
        assert!(none("v2", 0, 5).held);
        assert!(!none("v2", 1, 5).held);
        assert!(some("503", 1, 5).held);
        assert!(!some("503", 0, 5).held);
    }

    #[test]
    fn latencies_are_checked_against_a_range() {
        assert!(latency("p50", Some(501.0), 500.0, 1000.0).held);
        assert!(!latency("p50", Some(1000.0), 500.0, 1000.0).held);
        assert!(!latency("p50", None, 0.0, 1000.0).held);
    }
}
