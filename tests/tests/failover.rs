//! Failover on real KVM with real processes: `castor primary` and `castor
//! backup` run as child processes, an in-process observer receives the
//! released output, and the one-history invariant is checked after every
//! SIGKILL (castor::observe::check).
//!
//! `CASTOR_FAILOVER_KILLS=N` sets the number of primary kills of the kill
//! matrix (default 30); `CASTOR_KEEP_DIR=1` keeps each run's directory.

use castor::cluster::{sibling_castor_exe, Cluster, Daemon, Spec};
use castor::observe::{check, CheckOptions, CommitLog, Datagram, Observer, Verdict};
use castor_tests::require_kvm;
use rand::Rng;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Builds the `castor` binary once (same profile as this test) and returns it.
fn castor_exe() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        if std::env::var_os("CASTOR_BIN").is_none() {
            let me = std::env::current_exe().unwrap_or_default();
            let release = me.components().any(|c| c.as_os_str() == "release");
            let mut cmd = std::process::Command::new(env!("CARGO"));
            cmd.args(["build", "-q", "-p", "castor", "--bin", "castor"])
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
            if release {
                cmd.arg("--release");
            }
            let st = cmd.status();
            assert!(
                st.as_ref().is_ok_and(|s| s.success()),
                "cargo build -p castor failed: {st:?}"
            );
        }
        match sibling_castor_exe() {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    })
    .clone()
}

fn small_spec() -> Spec {
    Spec {
        vcpus: 1,
        memory: "64M".into(),
        epoch_ms: 5,
        dirty_rate: "20M".into(),
        record_every: 16,
        ..Spec::default()
    }
}

fn observer() -> Observer {
    match Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0))) {
        Ok(o) => o,
        Err(e) => panic!("observer: {e}"),
    }
}

fn prepare(spec: Spec, obs: &Observer) -> Cluster {
    match Cluster::prepare(&castor_exe(), None, spec, obs.addr()) {
        Ok(c) => c,
        Err(e) => panic!("cluster: {e}"),
    }
}

fn start(c: &Cluster, backup: bool) -> Daemon {
    let r = if backup {
        c.start_backup()
    } else {
        c.start_primary()
    };
    match r {
        Ok(d) => d,
        Err(e) => panic!("start: {e}"),
    }
}

fn logs(c: &Cluster) -> String {
    let mut s = String::new();
    for n in ["primary", "backup", "backup2"] {
        if let Ok(t) = std::fs::read_to_string(c.dir.join(format!("{n}.log"))) {
            let lines: Vec<&str> = t.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            s.push_str(&format!("--- {n}.log (tail) ---\n{}\n", tail.join("\n")));
        }
    }
    s
}

fn verdict(c: &Cluster, log: &[Datagram], failovers: usize, with_commit_log: bool) -> Verdict {
    let cl = if with_commit_log {
        CommitLog::load(&c.commit_log()).ok()
    } else {
        None
    };
    check(
        log,
        cl.as_ref(),
        &CheckOptions {
            from_start: true,
            failovers: Some(failovers),
        },
    )
}

/// Where a kill landed, from what the world and the backup had seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Window {
    /// Before the first commit: nothing released, no takeover.
    InitialSync,
    /// The backup had committed epochs whose Ack had not yet released output.
    CommittedNotAcked,
    /// Every committed epoch had been acked (between checkpoints / just after an ack).
    AfterAck,
}

struct KillOutcome {
    window: Window,
    failover: Option<Duration>,
}

/// One kill run: start a pair, SIGKILL the primary `delay` after it started,
/// check that the backup takes over (if anything was committed) and the invariant.
fn kill_run(delay: Duration) -> KillOutcome {
    let obs = observer();
    let c = prepare(small_spec(), &obs);
    let mut backup = start(&c, true);
    let mut primary = start(&c, false);
    std::thread::sleep(delay);
    let old = obs.last().map(|d| d.from);
    let max_label = obs.datagrams().iter().map(|d| d.epoch).max().unwrap_or(0);
    let killed = primary.kill();
    let committed = CommitLog::load(&c.commit_log())
        .map(|l| l.commits.keys().copied().max().unwrap_or(0))
        .unwrap_or(0);
    let window = if committed == 0 {
        Window::InitialSync
    } else if committed > max_label {
        Window::CommittedNotAcked
    } else {
        Window::AfterAck
    };
    let mut failover = None;
    if committed > 0 {
        let got = obs.wait_until(Duration::from_secs(5), |l| {
            l.iter().any(|d| d.at >= killed && Some(d.from) != old)
        });
        assert!(
            got,
            "no output from the backup 5 s after killing the primary at {delay:?}\n{}",
            logs(&c)
        );
        failover = obs
            .first_from_new_source(killed, old)
            .map(|d| d.at.duration_since(killed));
        // Let the new primary run a little, then stop it.
        std::thread::sleep(Duration::from_millis(150));
    } else {
        std::thread::sleep(Duration::from_millis(150));
    }
    backup.kill();
    let log = obs.finish();
    let v = verdict(&c, &log, usize::from(committed > 0), true);
    assert!(
        v.ok(),
        "invariant violated after a kill at {delay:?} ({window:?}):\n{v}\n{}",
        logs(&c)
    );
    if committed == 0 {
        assert!(
            log.is_empty(),
            "output released before anything was committed"
        );
    }
    KillOutcome { window, failover }
}

/// The kill matrix: SIGKILL the primary at random instants, from during the
/// initial synchronisation to well into steady state (5 ms epochs, so pauses,
/// checkpoints in flight, commit-before-ack and just-after-ack are all hit).
#[test]
fn primary_sigkill_matrix_keeps_one_history() {
    require_kvm();
    let kills: usize = std::env::var("CASTOR_FAILOVER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut rng = rand::thread_rng();
    let mut by_window = std::collections::BTreeMap::new();
    let mut times = Vec::new();
    castor_exe();
    let t = Instant::now();
    for i in 0..kills {
        let ti = Instant::now();
        // A few kills early (initial sync takes ~100-300 ms), most later.
        let delay = if i % 6 == 0 {
            Duration::from_millis(rng.gen_range(0..250))
        } else {
            Duration::from_millis(rng.gen_range(250..1200))
        };
        let o = kill_run(delay);
        eprintln!(
            "kill {i}: at {delay:?} ({:?}), failover {:?}, run {:.2} s",
            o.window,
            o.failover,
            ti.elapsed().as_secs_f64()
        );
        *by_window.entry(o.window).or_insert(0) += 1;
        if let Some(f) = o.failover {
            times.push(f);
        }
    }
    times.sort();
    eprintln!(
        "{kills} kills in {:.1} s: {by_window:?}; failover (SIGKILL -> first output of the new primary) min {:?} median {:?} max {:?}",
        t.elapsed().as_secs_f64(),
        times.first(),
        times.get(times.len() / 2),
        times.last()
    );
    assert!(
        by_window.len() >= 2,
        "the kills did not cover several windows: {by_window:?}"
    );
}
