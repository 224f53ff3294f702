//! Replication between two real processes (`castor primary`, `castor backup`)
//! over QUIC on loopback, with an observer process (this test) receiving the
//! released output:
//! - with `verify_memory_every = 1` the backup checks a digest of all guest
//!   memory at every commit, over 500+ epochs, at three dirty rates, with 1
//!   and 2 vCPUs: no mismatch, no resync;
//! - no record is released before the backup logged its epoch as committed,
//!   and the released history has no gap, fork or duplicate;
//! - a primary holding the wrong certificate is refused.

use castor::cluster::{metric, scrape, Cluster, Spec};
use castor::observe::{check, CheckOptions, CommitLog, Observer};
use castor_tests::require_kvm;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The `castor` CLI built into this package (same build, same features).
fn castor_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_castor-under-test"))
}

fn set(path: &PathBuf, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

fn verified_run(vcpus: u32, rate: &str, epochs: u64) {
    require_kvm();
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let spec = Spec {
        vcpus,
        memory: "64M".into(),
        epoch_ms: 5,
        dirty_rate: rate.into(),
        record_every: 64,
        metrics: true,
        commit_log: true,
        ..Spec::default()
    };
    let cluster = Cluster::prepare(&castor_exe(), None, spec, obs.addr()).unwrap();
    // Check all of memory at every commit, and keep one session: a generous
    // timeout so a loaded CI machine does not look like a dead peer.
    let p = cluster.primary_config();
    let text = std::fs::read_to_string(&p).unwrap();
    let text = regex_free_set(&text, "verify_memory_every", "1");
    let text = regex_free_set(&text, "timeout_ms", "2000");
    std::fs::write(&p, text).unwrap();
    let b = cluster.backup_config();
    let text = std::fs::read_to_string(&b).unwrap();
    std::fs::write(&b, regex_free_set(&text, "timeout_ms", "2000")).unwrap();

    let mut backup = cluster.start_backup().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut primary = cluster.start_primary().unwrap();
    let bm = cluster.backup_metrics.unwrap();
    let start = Instant::now();
    let mut verified = 0.0;
    while start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(250));
        backup.check_alive().unwrap();
        primary.check_alive().unwrap();
        let m = scrape(bm);
        verified = metric(&m, "castor_verify_ok_total").unwrap_or(0.0);
        if verified >= epochs as f64 {
            break;
        }
    }
    let m = scrape(bm);
    let failures = metric(&m, "castor_verify_failures_total").unwrap_or(0.0);
    let discarded = metric(&m, "castor_backup_epochs_discarded_total").unwrap_or(0.0);
    // The backup first: a backup that outlived its primary would take over
    // (at once: the primary's host reports its port closed) and re-emit its
    // committed output, a failover this clean run does not expect.
    backup.kill();
    std::thread::sleep(Duration::from_millis(100));
    primary.kill();
    let log = obs.finish();
    let commits = CommitLog::load(&cluster.commit_log()).unwrap();

    assert!(
        verified >= epochs as f64,
        "{vcpus} vCPU(s) at {rate}: only {verified} commits verified"
    );
    assert_eq!(failures, 0.0, "replica memory differed from the primary's");
    assert_eq!(discarded, 0.0, "epochs were discarded in a clean run");
    let primary_log = std::fs::read_to_string(&primary.log).unwrap_or_default();
    assert!(
        !primary_log.contains("lost:") && !primary_log.contains("BACKUP LOST"),
        "the session broke during a clean run:\n{primary_log}"
    );
    let v = check(
        &log,
        Some(&commits),
        &CheckOptions {
            from_start: true,
            failovers: Some(0),
        },
    );
    assert!(v.ok(), "output invariant violated: {:?}", v.violations);
    // At 5 MiB/s with a record every 64 page touches the guest emits ~20
    // records/s, so 500 epochs of 5 ms release a few dozen.
    assert!(v.datagrams >= 20, "only {} records released", v.datagrams);
    assert!(
        v.commit_checked >= v.datagrams - v.unprotected,
        "not every released record was checked against the commit log"
    );
    assert_eq!(v.vcpus.len(), vcpus as usize);
}

/// Replaces the value of `key = ...` on its line (the generated configs have
/// one such line each).
fn regex_free_set(text: &str, key: &str, value: &str) -> String {
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if !found && (t.starts_with(&format!("{key} ")) || t.starts_with(&format!("{key}="))) {
                found = true;
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    if found {
        out.join("\n") + "\n"
    } else {
        // Absent: add it to the [replication] section.
        text.replace(
            "[replication]\n",
            &format!("[replication]\n{key} = {value}\n"),
        )
    }
}

#[test]
fn verified_500_epochs_1_vcpu_three_rates() {
    for rate in ["5M", "20M", "60M"] {
        verified_run(1, rate, 500);
    }
}

#[test]
fn verified_500_epochs_2_vcpus_three_rates() {
    for rate in ["5M", "20M", "60M"] {
        verified_run(2, rate, 500);
    }
}

#[test]
fn primary_with_the_wrong_certificate_is_refused() {
    require_kvm();
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let cluster = Cluster::prepare(
        &castor_exe(),
        None,
        Spec {
            memory: "32M".into(),
            ..Spec::default()
        },
        obs.addr(),
    )
    .unwrap();
    // An impostor: a fresh key pair the backup was never told about.
    castor_replicator::transport::write_identity(&cluster.dir, "impostor").unwrap();
    let p = cluster.primary_config();
    set(&p, "primary.crt", "impostor.crt");
    set(&p, "primary.key", "impostor.key");
    let mut backup = cluster.start_backup().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut primary = cluster.start_primary().unwrap();
    // Wait for the refusal itself (a loaded host only makes it later).
    let refused = |log: &str| log.contains("refusing") && log.contains("certificate");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !refused(&std::fs::read_to_string(&backup.log).unwrap_or_default())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The primary keeps trying meanwhile; give it a few more attempts.
    std::thread::sleep(Duration::from_secs(1));
    backup.check_alive().unwrap();
    primary.kill();
    backup.kill();
    let log = std::fs::read_to_string(&backup.log).unwrap();
    assert!(refused(&log), "the backup did not log the refusal:\n{log}");
    assert!(
        !log.contains("new replication session"),
        "the backup accepted the impostor:\n{log}"
    );
    assert_eq!(obs.count(), 0, "output was released without a backup");
}
