//! Measuring a real-time cluster from the outside, shared by `cargo xtask demo` and the
//! `bench` crate so that both report the same measurement.
//!
//! Nothing here asks the daemons when a change has arrived: latency is the time from
//! the write on the source until the new bytes are readable on every replica, polled
//! with plain `std::fs`, and a burst is done when [`compare`] finds every replica
//! identical to the source.
//!
//! - [`wait_capture`]: waits until the source reports its capture backend.
//! - [`replicated_dir`] and [`measure_latency`]: change→replica latency of small writes.
//! - [`LatencyStats`] / [`percentile`]: summary of the samples (nearest rank).
//! - [`burst`]: a seeded tree written into the running source, timed until every
//!   replica is identical ([`wait_replicas`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::cluster::Cluster;
use crate::compare::compare;
use crate::tree::{Summary, TreeSpec, generate};

/// Waits (up to `limit`) until the source node's status shows its real-time capture;
/// returns that status object (`backend`, `reason`, `events_total`, `lost_total`).
pub fn wait_capture(c: &Cluster, limit: Duration) -> Result<Value> {
    let until = Instant::now() + limit;
    loop {
        let capture = c.status(c.source())?["node"]["capture"].clone();
        if !capture.is_null() {
            return Ok(capture);
        }
        ensure!(
            Instant::now() < until,
            "real-time capture did not start on the source within {limit:?}:\n{}",
            c.diagnostics()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every target of `c` equals its source, or `limit` passes; returns the
/// differences left (empty: all identical). Once a target has been found identical it
/// is not compared again, so call this when the source has stopped changing.
pub fn wait_replicas(c: &Cluster, limit: Duration) -> Result<Vec<String>> {
    let source = c.root(c.source())?;
    let mut pending = c.targets();
    let start = Instant::now();
    loop {
        let mut diffs = Vec::new();
        let mut still = Vec::new();
        for t in pending {
            let d = compare(&source, &c.root(&t)?)?;
            if !d.is_empty() {
                diffs.extend(d.into_iter().map(|d| format!("{t}: {d}")));
                still.push(t);
            }
        }
        if still.is_empty() || start.elapsed() > limit {
            return Ok(diffs);
        }
        pending = still;
        thread::sleep(Duration::from_millis(20));
    }
}

/// Roots of the targets of `c`.
fn target_roots(c: &Cluster) -> Result<Vec<PathBuf>> {
    c.targets().iter().map(|t| c.root(t)).collect()
}

/// Creates directory `rel` in the source root and waits (up to `limit`) until every
/// replica is identical, so that a measurement in it starts from a settled cluster.
pub fn replicated_dir(c: &Cluster, rel: &str, limit: Duration) -> Result<()> {
    let dir = c.root(c.source())?.join(rel);
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let diffs = wait_replicas(c, limit)?;
    ensure!(
        diffs.is_empty(),
        "replicas did not converge within {limit:?} after creating {rel}: {} differences, \
         first: {}",
        diffs.len(),
        diffs[0]
    );
    Ok(())
}

/// Content of latency sample `i`: `len` bytes that differ from every other sample's.
#[must_use]
pub fn sample_bytes(i: usize, len: usize) -> Vec<u8> {
    #[expect(clippy::cast_possible_truncation, reason = "a byte pattern")]
    (0..len)
        .map(|k| (k.wrapping_mul(31) ^ i.wrapping_mul(97)) as u8)
        .collect()
}

/// Writes `samples` new files of `size` bytes, one at a time, as `rel_dir/sample-<i>.bin`
/// on the source, and times each from the start of the write until the new bytes are
/// readable on every replica (polled every 200 µs). `rel_dir` must exist (see
/// [`replicated_dir`]). Fails if one sample takes longer than `limit`.
pub fn measure_latency(
    c: &Cluster,
    rel_dir: &str,
    samples: usize,
    size: usize,
    limit: Duration,
) -> Result<Vec<Duration>> {
    let source = c.root(c.source())?;
    let targets = target_roots(c)?;
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        let data = sample_bytes(i, size);
        let rel = Path::new(rel_dir).join(format!("sample-{i}.bin"));
        let start = Instant::now();
        fs::write(source.join(&rel), &data)
            .with_context(|| format!("writing {}", source.join(&rel).display()))?;
        while !targets
            .iter()
            .all(|r| fs::read(r.join(&rel)).is_ok_and(|d| d == data))
        {
            ensure!(
                start.elapsed() < limit,
                "{} did not reach every replica within {limit:?}{}",
                rel.display(),
                c.diagnostics()
            );
            thread::sleep(Duration::from_micros(200));
        }
        lat.push(start.elapsed());
    }
    Ok(lat)
}

/// Nearest-rank percentile `p` (0 < p ≤ 1) of `sorted` (ascending, not empty).
#[must_use]
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty(), "percentile of no samples");
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a rank among at most millions of samples"
    )]
    let rank = (sorted.len() as f64 * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summary of latency samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyStats {
    /// Number of samples.
    pub samples: usize,
    /// Fastest.
    pub min: Duration,
    /// Median (nearest rank).
    pub p50: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
    /// Slowest.
    pub max: Duration,
    /// Arithmetic mean.
    pub mean: Duration,
}

impl LatencyStats {
    /// Summarises `samples` (any order); `None` when there are none.
    #[must_use]
    pub fn new(samples: &[Duration]) -> Option<Self> {
        let mut s = samples.to_vec();
        s.sort();
        let (&min, &max) = (s.first()?, s.last()?);
        let total: Duration = s.iter().sum();
        Some(Self {
            samples: s.len(),
            min,
            p50: percentile(&s, 0.50),
            p99: percentile(&s, 0.99),
            max,
            mean: total / u32::try_from(s.len()).unwrap_or(u32::MAX),
        })
    }
}

/// Outcome of [`burst`].
#[derive(Debug, Clone)]
pub struct Burst {
    /// What was written.
    pub summary: Summary,
    /// Time to write the tree on the source.
    pub written: Duration,
    /// Time from the first write until every replica was found identical (or the
    /// limit passed).
    pub took: Duration,
    /// Differences left when the limit passed; empty when every replica is identical.
    pub diffs: Vec<String>,
}

/// Writes a seeded tree of about `files` files (see [`TreeSpec::new`]) into the new
/// directory `rel_dir` of the running source, then waits until every replica is
/// identical to the source, for at most `limit` after the writes.
pub fn burst(
    c: &Cluster,
    rel_dir: &str,
    files: usize,
    seed: u64,
    limit: Duration,
) -> Result<Burst> {
    let dir = c.root(c.source())?.join(rel_dir);
    let start = Instant::now();
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let summary = generate(&dir, &TreeSpec::new(files, seed))?;
    let written = start.elapsed();
    let diffs = wait_replicas(c, limit)?;
    Ok(Burst {
        summary,
        written,
        took: start.elapsed(),
        diffs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = ms(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&s, 0.50), Duration::from_millis(50));
        assert_eq!(percentile(&s, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&s, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&s, 0.001), Duration::from_millis(1));
        let one = ms(&[7]);
        assert_eq!(percentile(&one, 0.5), Duration::from_millis(7));
        assert_eq!(percentile(&one, 0.99), Duration::from_millis(7));
        // 50 samples (the demo): p99 is the largest, p50 the 25th.
        let s = ms(&(1..=50).collect::<Vec<_>>());
        assert_eq!(percentile(&s, 0.99), Duration::from_millis(50));
        assert_eq!(percentile(&s, 0.50), Duration::from_millis(25));
    }

    #[test]
    fn stats_sort_their_input() {
        let st = LatencyStats::new(&ms(&[30, 10, 20, 40])).unwrap();
        assert_eq!(st.samples, 4);
        assert_eq!(st.min, Duration::from_millis(10));
        assert_eq!(st.p50, Duration::from_millis(20));
        assert_eq!(st.p99, Duration::from_millis(40));
        assert_eq!(st.max, Duration::from_millis(40));
        assert_eq!(st.mean, Duration::from_millis(25));
        assert!(LatencyStats::new(&[]).is_none());
    }

    #[test]
    fn samples_differ() {
        assert_eq!(sample_bytes(3, 4096).len(), 4096);
        assert_ne!(sample_bytes(1, 4096), sample_bytes(2, 4096));
    }
}
