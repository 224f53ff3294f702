//! `castor-bench failover`: real `castor primary` / `castor backup` processes
//! on this machine; SIGKILL the primary at a random instant in steady state
//! and measure the time until the first record released by the new primary
//! reaches an observer (plus the backup's own detection / restore / resume
//! timings from its metrics). Needs the `castor` binary next to this one
//! (`cargo build --release -p castor -p castor-bench`) or `CASTOR_BIN`.

use crate::report::{percentile, Output};
use castor::cluster::{metric, scrape, sibling_castor_exe, Cluster, Spec};
use castor::observe::{check, unix_ns, CheckOptions, CommitLog, Observer};
use rand::Rng;
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Failovers to measure.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Heartbeat period (ms), both sides.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_ms: u64,
    /// Peer timeout (ms), both sides.
    #[arg(long, default_value_t = 100)]
    pub timeout_ms: u64,
    /// Guest memory.
    #[arg(long, default_value = "64M")]
    pub memory: String,
    /// Epoch interval (ms).
    #[arg(long, default_value_t = 25)]
    pub epoch_ms: u64,
    /// Protected running before the kill: this many ms plus a random 0..epoch_ms*4.
    #[arg(long, default_value_t = 500)]
    pub settle_ms: u64,
}

struct Sample {
    failover_ms: f64,
    detect_ms: f64,
    restore_ms: f64,
    resume_ms: f64,
}

fn one(exe: &std::path::Path, a: &Args, rng: &mut impl Rng) -> Result<Sample, String> {
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(|e| e.to_string())?;
    let spec = Spec {
        memory: a.memory.clone(),
        epoch_ms: a.epoch_ms,
        heartbeat_ms: a.heartbeat_ms,
        timeout_ms: a.timeout_ms,
        record_every: 16,
        metrics: true,
        log_level: "warn".into(),
        ..Spec::default()
    };
    let c = Cluster::prepare(exe, None, spec, obs.addr()).map_err(|e| e.to_string())?;
    let mut backup = c.start_backup().map_err(|e| e.to_string())?;
    let mut primary = c.start_primary().map_err(|e| e.to_string())?;
    if !obs.wait_until(Duration::from_secs(30), |l| !l.is_empty()) {
        return Err(format!("no output after 30 s; see {}", c.dir.display()));
    }
    let settle = a.settle_ms + rng.gen_range(0..=a.epoch_ms * 4);
    std::thread::sleep(Duration::from_millis(settle));
    primary.check_alive().map_err(|e| e.to_string())?;
    let old = obs.last().map(|d| d.from);
    let kill_unix = unix_ns();
    let killed = primary.kill();
    if !obs.wait_until(Duration::from_secs(5), |l| {
        l.iter().any(|d| d.at >= killed && Some(d.from) != old)
    }) {
        return Err(format!(
            "no takeover output 5 s after the kill; see {}",
            c.backup_config().display()
        ));
    }
    let first = obs
        .first_from_new_source(killed, old)
        .ok_or("takeover output vanished")?;
    std::thread::sleep(Duration::from_millis(50));
    let s = c.backup_metrics.map(scrape).unwrap_or_default();
    backup.kill();
    let log = obs.finish();
    let cl = CommitLog::load(&c.commit_log()).ok();
    let v = check(
        &log,
        cl.as_ref(),
        &CheckOptions {
            from_start: true,
            failovers: Some(1),
        },
    );
    if !v.ok() {
        return Err(format!("invariant violated:\n{v}"));
    }
    let g = |n: &str| metric(&s, n).unwrap_or(f64::NAN);
    Ok(Sample {
        failover_ms: first.at.duration_since(killed).as_secs_f64() * 1e3,
        detect_ms: g("castor_takeover_detected_unix_seconds") * 1e3 - kill_unix as f64 / 1e6,
        restore_ms: g("castor_takeover_restore_seconds") * 1e3,
        resume_ms: g("castor_takeover_resume_seconds") * 1e3,
    })
}

pub fn run(a: &Args, out: &Output) -> Result<(), String> {
    let exe = sibling_castor_exe().map_err(|e| e.to_string())?;
    let mut rng = rand::thread_rng();
    let mut samples = Vec::new();
    let t = Instant::now();
    for i in 0..a.runs {
        let s = one(&exe, a, &mut rng).map_err(|e| format!("run {i}: {e}"))?;
        eprintln!(
            "run {i:>3}: failover {:.1} ms (detect {:.1}, restore {:.2}, detect->resume {:.2})",
            s.failover_ms, s.detect_ms, s.restore_ms, s.resume_ms
        );
        samples.push(s);
    }
    eprintln!("{} runs in {:.1} s", a.runs, t.elapsed().as_secs_f64());
    let col = |f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).filter(|x| x.is_finite()).collect();
        v.sort_by(|x, y| x.total_cmp(y));
        v
    };
    let mut rows = Vec::new();
    for (name, v) in [
        (
            "SIGKILL -> first output of new primary",
            col(|s| s.failover_ms),
        ),
        ("SIGKILL -> backup detects loss", col(|s| s.detect_ms)),
        ("state restore", col(|s| s.restore_ms)),
        ("detection -> guest resumed", col(|s| s.resume_ms)),
    ] {
        rows.push(vec![
            ("phase", json!(name)),
            ("runs", json!(v.len())),
            ("p50_ms", json!(percentile(&v, 50.0))),
            ("p99_ms", json!(percentile(&v, 99.0))),
            ("max_ms", json!(v.last().copied().unwrap_or(f64::NAN))),
        ]);
    }
    out.table(
        &format!(
            "failover ({} runs; heartbeat {} ms, timeout {} ms; {} guest, {} ms epochs)",
            a.runs, a.heartbeat_ms, a.timeout_ms, a.memory, a.epoch_ms
        ),
        &rows,
    );
    Ok(())
}
