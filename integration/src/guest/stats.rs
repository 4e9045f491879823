//! Statistics of the throughput benchmarks: `l3-blkperf`'s measurements
//! and the figures reported from them.
//!
//! A figure is reported as a [`Spread`]: the median of the values it
//! summarizes, how many there are, their quartiles and their range, so a
//! reader sees how far one run's headline can be trusted, and can
//! recompute it from the values (the benchmarks print them).

use std::fmt;

/// One `l3-blkperf` measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Repetition within the boot (0 is a warm-up).
    pub rep: u64,
    /// Index of the disk in `l3-blkperf`'s arguments.
    pub dev: u64,
    /// Units per second.
    pub rate: f64,
}

/// The measurements of console lines `<rep> <dev> <count> <ns>`, `count`
/// divided by `unit` per second; lines of another shape are left out.
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

/// The rates of disk `dev`, warm-up repetition 0 left out.
pub fn rates_of(samples: &[Sample], dev: u64) -> Vec<f64> {
    samples
        .iter()
        .filter(|s| s.rep > 0 && s.dev == dev)
        .map(|s| s.rate)
        .collect()
}

/// Bridge over passthrough of each repetition (the two measurements of a
/// repetition ran back to back in one guest), in repetition order,
/// skipping warm-up `rep` 0 and repetitions that lack either half.
/// `bridged` is the index of the bridged disk in the sample lines.
pub fn paired_ratios(samples: &[Sample], bridged: u64) -> Vec<f64> {
    let mut reps: Vec<u64> = samples.iter().map(|s| s.rep).filter(|&r| r > 0).collect();
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

/// `median(b[i]) / median(a[i])` for each `i`: the ratio of each pair of
/// boots. `None` when a boot has no finite median.
pub fn ratios_of_medians(a: &[Vec<f64>], b: &[Vec<f64>]) -> Option<Vec<f64>> {
    a.iter()
        .zip(b)
        .map(|(a, b)| Some(median(b)? / median(a)?))
        .collect()
}

/// The `p`-quantile (0 ≤ p ≤ 1) of sorted values, interpolating linearly
/// between the two nearest ranks (R's and numpy's default).
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * p;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// The median: the middle value, or the mean of the two middle ones.
/// `None` without values or with a value that is not finite.
pub fn median(values: &[f64]) -> Option<f64> {
    Spread::of(values).map(|s| s.median)
}

/// A set of values summarized: median, quartiles, range.
///
/// Displayed as `<median> (n <n>, IQR <q1>..<q3>, range <min>..<max>)`
/// with the formatter's precision (3 decimals by default).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// How many values.
    pub n: usize,
    /// Their median.
    pub median: f64,
    /// First quartile.
    pub q1: f64,
    /// Third quartile.
    pub q3: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` without values or with a value that
    /// is not finite (a division by a zero rate, say).
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() || !values.iter().all(|v| v.is_finite()) {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Self {
            n: v.len(),
            median: quantile(&v, 0.5),
            q1: quantile(&v, 0.25),
            q3: quantile(&v, 0.75),
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = f.precision().unwrap_or(3);
        write!(
            f,
            "{:.p$} (n {}, IQR {:.p$}..{:.p$}, range {:.p$}..{:.p$})",
            self.median, self.n, self.q1, self.q3, self.min, self.max
        )
    }
}

/// Values with `precision` decimals, space-separated.
pub fn list(values: &[f64], precision: usize) -> String {
    values
        .iter()
        .map(|x| format!("{x:.precision$}"))
        .collect::<Vec<_>>()
        .join(" ")
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
    fn sequential_bytes_become_mib_per_second() {
        let got = parse_rates(&[vec![1, 0, 512 << 20, 2_000_000_000]], (1 << 20) as f64);

        assert_eq!(got[0].rate, 256.0);
    }

    #[test]
    fn rates_of_a_disk_leave_out_the_warm_up_and_the_other_disk() {
        let s = |rep, dev, rate| Sample { rep, dev, rate };
        let samples = [s(0, 1, 1.0), s(1, 1, 10.0), s(1, 0, 99.0), s(2, 1, 20.0)];

        assert_eq!(rates_of(&samples, 1), [10.0, 20.0]);
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
    }

    #[test]
    fn round_ratio_divides_the_medians_of_its_two_boots() {
        let a = vec![vec![100.0, 90.0, 110.0], vec![50.0]];
        let b = vec![vec![95.0, 1.0, 99.0], vec![60.0]];

        assert_eq!(ratios_of_medians(&a, &b), Some(vec![0.95, 1.2]));
        assert_eq!(ratios_of_medians(&a, &[vec![1.0], vec![]]), None);
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[7.0]), Some(7.0));
    }

    #[test]
    fn no_values_or_a_non_finite_one_have_no_median() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::INFINITY]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn spread_has_interpolated_quartiles_and_the_range() {
        let s = Spread::of(&[9.0, 1.0, 5.0, 3.0, 7.0]).unwrap();

        assert_eq!(
            s,
            Spread {
                n: 5,
                median: 5.0,
                q1: 3.0,
                q3: 7.0,
                min: 1.0,
                max: 9.0
            }
        );
        assert_eq!(Spread::of(&[1.0, 2.0]).unwrap().q1, 1.25);
    }

    #[test]
    fn spread_prints_median_count_quartiles_and_range_at_the_asked_precision() {
        let s = Spread::of(&[0.9, 1.0, 1.1, 1.2]).unwrap();

        assert_eq!(
            s.to_string(),
            "1.050 (n 4, IQR 0.975..1.125, range 0.900..1.200)"
        );
        assert_eq!(format!("{s:.1}"), "1.1 (n 4, IQR 1.0..1.1, range 0.9..1.2)");
        assert_eq!(list(&[0.9, 1.25], 2), "0.90 1.25");
    }
}
