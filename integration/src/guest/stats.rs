//! Statistics of the throughput benchmarks: `l3-blkperf`'s measurements
//! and the ratios and medians reported from them.

/// One `l3-blkperf` measurement: `rate` is units per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Repetition (0 is a warm-up).
    pub rep: u64,
    /// Index of the disk in `l3-blkperf`'s arguments.
    pub dev: u64,
    /// Units per second.
    pub rate: f64,
}

/// The measurements of console lines `<rep> <dev> <count> <ns>`, `count`
/// divided by `unit`; lines of another shape are left out.
pub fn parse_rates(lines: &[Vec<u64>], unit: f64) -> Vec<Sample> {
    lines
        .iter()
        .filter_map(|s| match s[..] {
            [rep, dev, n, ns] if ns > 0 => Some(Sample {
                rep,
                dev,
                rate: n as f64 / unit / (ns as f64 / 1e9),
            }),
            _ => None,
        })
        .collect()
}

/// The upper median; NaN for no values.
pub fn med(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Values with two decimals, space-separated.
pub fn fmt(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bridge over passthrough of each repetition (the two measurements of a
/// repetition ran back to back in one guest), skipping warm-up `rep` 0.
/// `bridged` is the index of the bridged disk in the sample lines.
pub fn paired_ratios(samples: &[Sample], bridged: u64) -> Vec<f64> {
    let reps = samples.iter().map(|s| s.rep).filter(|&r| r > 0);
    let mut reps: Vec<u64> = reps.collect();
    reps.sort_unstable();
    reps.dedup();
    reps.into_iter()
        .filter_map(|r| {
            let of = |bridge: bool| {
                samples
                    .iter()
                    .find(|s| s.rep == r && (s.dev == bridged) == bridge)
                    .map(|s| s.rate)
            };
            Some(of(true)? / of(false)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_need_rep_dev_count_and_time() {
        let lines = vec![
            vec![1, 0, 2000, 1_000_000_000],
            vec![1, 1, 2000],
            vec![2, 1, 5, 0],
        ];

        let got = parse_rates(&lines, 1.0);

        assert_eq!(
            got,
            [Sample {
                rep: 1,
                dev: 0,
                rate: 2000.0
            }]
        );
    }

    #[test]
    fn pairs_divide_bridge_by_passthrough_per_repetition() {
        let s = |rep, dev, rate| Sample { rep, dev, rate };
        // rep 0 is a warm-up; rep 2 lacks its bridged half.
        let samples = [
            s(0, 0, 1.0),
            s(0, 1, 9.0),
            s(1, 0, 100.0),
            s(1, 1, 90.0),
            s(2, 0, 50.0),
            s(3, 1, 120.0),
            s(3, 0, 100.0),
        ];

        assert_eq!(paired_ratios(&samples, 1), [0.9, 1.2]);
        assert_eq!(paired_ratios(&samples, 0), [100.0 / 90.0, 100.0 / 120.0]);
        assert!(med(Vec::new()).is_nan());
    }
}
