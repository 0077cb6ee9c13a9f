//! `authz-bench cache`: the sidecar's decision cache in this process, in front of a checker
//! that answers at once, so only the cache is measured:
//!
//! - **memory**: RSS before and after filling the cache to its bound with distinct questions
//!   (VmRSS of this process; nothing else allocates meanwhile), and bytes per entry;
//! - **hit ratio at a working set of 10x the bound** (`--working-set-factor`): questions drawn
//!   from `factor × max_entries` distinct ones, uniformly and with Zipf-skewed popularity
//!   (`--skew`: exponent s, rank r asked with weight 1/r^s), after a warm-up of as many
//!   questions. Next to it the best any cache of that size can do: the share of questions
//!   that go to the `max_entries` most popular ones (the exact value for uniform: 1/factor).
//!
//! It measures and prints; nothing is compared against a threshold.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use authz_sidecar::authz::cache::DecisionCache;
use authz_sidecar::authz::{BackendError, CheckQuery, RelationshipChecker, TupleKey};
use authz_sidecar::config::{CacheConfig, Consistency};
use rand::Rng;
use serde::Serialize;

use crate::procfs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The cache's bound (`cache.max_entries`; the sidecar's default).
    #[arg(long, default_value_t = 100_000)]
    max_entries: usize,
    /// The working set, in multiples of the bound.
    #[arg(long, default_value_t = 10)]
    working_set_factor: usize,
    /// Questions asked in each measured run (after a warm-up of as many).
    #[arg(long, default_value_t = 2_000_000)]
    requests: u64,
    /// Popularity skews to run, comma-separated Zipf exponents (0: uniform).
    #[arg(long, value_delimiter = ',', default_value = "0,0.8,1.0")]
    skew: Vec<f64>,
    /// Append one JSON line per result here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Answers every question at once: allowed when the object's number is even.
struct Instant0;

#[async_trait::async_trait]
impl RelationshipChecker for Instant0 {
    async fn check(&self, queries: &[CheckQuery]) -> Result<Vec<bool>, BackendError> {
        Ok(queries
            .iter()
            .map(|q| q.tuple.object.ends_with(['0', '2', '4', '6', '8']))
            .collect())
    }
    fn ready(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        "instant".into()
    }
}

fn new_cache(max_entries: usize) -> DecisionCache {
    DecisionCache::new(
        Arc::new(Instant0),
        &CacheConfig {
            enabled: true,
            // Nothing expires during a run: the bound, not the TTL, is what is measured.
            allowed_ttl: Duration::from_secs(3600),
            denied_ttl: Duration::from_secs(3600),
            max_entries,
        },
    )
}

/// Question number `i`: 1 000 users, one object each (as a route with `{id}` in it asks).
fn question(i: usize, contextual: &Arc<Vec<TupleKey>>) -> CheckQuery {
    CheckQuery {
        tuple: TupleKey {
            user: format!("user:u{}", i % 1000),
            relation: "viewer".into(),
            object: format!("conversation:{i}"),
        },
        contextual: contextual.clone(),
        consistency: Consistency::MinimizeLatency,
    }
}

#[derive(Debug, Serialize)]
#[serde(tag = "measure", rename_all = "kebab-case")]
enum Result_ {
    Memory {
        entries: u64,
        rss_before_kib: u64,
        rss_after_kib: u64,
        bytes_per_entry: f64,
        fill_seconds: f64,
    },
    HitRatio {
        max_entries: usize,
        working_set: usize,
        skew: f64,
        requests: u64,
        hit_ratio: f64,
        best_possible: f64,
        evictions: u64,
        ns_per_check: f64,
    },
}

/// Cumulative probabilities of ranks 0..n under Zipf exponent `s` (s = 0: uniform).
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(n);
    let mut sum = 0.0;
    for rank in 1..=n {
        sum += 1.0 / (rank as f64).powf(s);
        cdf.push(sum);
    }
    for p in &mut cdf {
        *p /= sum;
    }
    cdf
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    if args.max_entries == 0 || args.working_set_factor == 0 || args.requests == 0 {
        bail!("--max-entries, --working-set-factor and --requests must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let contextual = Arc::new(Vec::new());
    let mut results = Vec::new();

    // Memory first, before anything else in this process allocates.
    let cache = new_cache(args.max_entries);
    let before = procfs::memory("self").map_or(0, |m| m.rss_kib);
    let started = Instant::now();
    runtime.block_on(async {
        for i in 0..args.max_entries {
            cache.check(&[question(i, &contextual)]).await?;
        }
        anyhow::Ok(())
    })?;
    let fill_seconds = started.elapsed().as_secs_f64();
    let after = procfs::memory("self").map_or(0, |m| m.rss_kib);
    let entries = cache.stats().size;
    results.push(Result_::Memory {
        entries,
        rss_before_kib: before,
        rss_after_kib: after,
        bytes_per_entry: after.saturating_sub(before) as f64 * 1024.0 / entries.max(1) as f64,
        fill_seconds,
    });
    drop(cache);

    let working_set = args.max_entries * args.working_set_factor;
    let mut rng = rand::rng();
    for &skew in &args.skew {
        let cdf = zipf_cdf(working_set, skew);
        let best_possible = cdf[args.max_entries - 1];
        let cache = new_cache(args.max_entries);
        // Inverse transform: the first rank whose cumulative probability reaches u.
        let mut draw = || {
            let u: f64 = rng.random();
            cdf.partition_point(|p| *p < u).min(working_set - 1)
        };
        let (hits_before, evictions_before, started) = runtime.block_on(async {
            for _ in 0..args.requests {
                cache.check(&[question(draw(), &contextual)]).await?;
            }
            let s = cache.stats();
            anyhow::Ok((s.hits, s.evictions, Instant::now()))
        })?;
        runtime.block_on(async {
            for _ in 0..args.requests {
                cache.check(&[question(draw(), &contextual)]).await?;
            }
            anyhow::Ok(())
        })?;
        let elapsed = started.elapsed();
        let s = cache.stats();
        results.push(Result_::HitRatio {
            max_entries: args.max_entries,
            working_set,
            skew,
            requests: args.requests,
            hit_ratio: (s.hits - hits_before) as f64 / args.requests as f64,
            best_possible,
            evictions: s.evictions - evictions_before,
            ns_per_check: elapsed.as_nanos() as f64 / args.requests as f64,
        });
    }

    println!("{}", render(&results));
    if let Some(path) = &args.json {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        for r in &results {
            writeln!(f, "{}", serde_json::to_string(r)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn render(results: &[Result_]) -> String {
    let mut out = String::new();
    for r in results {
        match r {
            Result_::Memory {
                entries,
                rss_before_kib,
                rss_after_kib,
                bytes_per_entry,
                fill_seconds,
            } => {
                out.push_str(
                    "| decision cache, in process | entries | RSS before MiB | RSS after MiB | bytes per entry | fill s |\n|---|---:|---:|---:|---:|---:|\n",
                );
                out.push_str(&format!(
                    "| filled to the bound | {entries} | {:.1} | {:.1} | {bytes_per_entry:.0} | {fill_seconds:.1} |\n\n",
                    *rss_before_kib as f64 / 1024.0,
                    *rss_after_kib as f64 / 1024.0,
                ));
                out.push_str(
                    "| popularity | bound | working set | questions | hit ratio | best possible | evictions | ns per check (in process) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
                );
            }
            Result_::HitRatio {
                max_entries,
                working_set,
                skew,
                requests,
                hit_ratio,
                best_possible,
                evictions,
                ns_per_check,
            } => {
                let popularity = if *skew == 0.0 {
                    "uniform".to_string()
                } else {
                    format!("Zipf s={skew}")
                };
                out.push_str(&format!(
                    "| {popularity} | {max_entries} | {working_set} | {requests} | {:.1}% | {:.1}% | {evictions} | {ns_per_check:.0} |\n",
                    hit_ratio * 100.0,
                    best_possible * 100.0,
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_cdf_ends_at_one_and_uniform_is_linear() {
        let u = zipf_cdf(10, 0.0);
        assert!((u[4] - 0.5).abs() < 1e-9 && (u[9] - 1.0).abs() < 1e-9);
        let z = zipf_cdf(1000, 1.0);
        assert!(z[0] > 0.1 && (z[999] - 1.0).abs() < 1e-9);
    }
}
