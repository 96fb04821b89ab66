//! Shared pieces of Weft's benchmarks.

pub mod handshake;
pub mod operator_process;
pub mod procfs;

/// Nearest-rank percentiles of a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for an empty sample.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |q: f64| rank_of_sorted(&sorted, q);
        (!sorted.is_empty()).then(|| Self {
            count: sorted.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: rank(1.0),
        })
    }
}

/// The nearest-rank `q` quantile (0 < q <= 1) of a non-empty sample.
pub fn nearest_rank(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    rank_of_sorted(&sorted, q)
}

fn rank_of_sorted(sorted: &[f64], q: f64) -> f64 {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::Percentiles;

    #[test]
    fn nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&samples).unwrap();
        assert_eq!((p.count, p.p50, p.p90, p.p99, p.max), (100, 50.0, 90.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&[3.0]).unwrap().p99, 3.0);
        assert_eq!(Percentiles::of(&[]), None);
    }
}
