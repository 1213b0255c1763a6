//! Summaries of repeated measurements.

use std::time::Duration;

/// Median, min and max of a set of durations.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub median: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Summary {
    pub fn of(samples: &[Duration]) -> Self {
        assert!(!samples.is_empty(), "no samples");
        let mut sorted = samples.to_vec();
        sorted.sort();
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2
        };
        Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        }
    }

    /// Throughput in MB/s of `bytes` at the median, and at the best and worst runs.
    pub fn rate(&self, bytes: u64) -> (f64, f64, f64) {
        let mbps = |d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
        (mbps(self.median), mbps(self.max), mbps(self.min))
    }
}

/// One line: label, median seconds [min..max], MB/s median [worst..best].
pub fn report(label: &str, samples: &[Duration], bytes: u64) -> Summary {
    let s = Summary::of(samples);
    let (median, worst, best) = s.rate(bytes);
    println!(
        "{label:<48} {:>7.2} s [{:.2} .. {:.2}]  {median:>7.1} MB/s [{worst:.1} .. {best:.1}]",
        s.median.as_secs_f64(),
        s.min.as_secs_f64(),
        s.max.as_secs_f64(),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_sets() {
        let s = |v: &[u64]| {
            Summary::of(
                &v.iter()
                    .map(|&ms| Duration::from_millis(ms))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(s(&[3, 1, 2]).median, Duration::from_millis(2));
        assert_eq!(s(&[4, 1, 2, 3]).median, Duration::from_micros(2500));
        assert_eq!(s(&[5, 1, 9]).min, Duration::from_millis(1));
        assert_eq!(s(&[5, 1, 9]).max, Duration::from_millis(9));
    }
}
