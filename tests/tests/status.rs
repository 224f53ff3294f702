//! What an operator sees of a live pair (`castor primary` and `castor
//! backup` as real processes on loopback):
//! - the primary reports "protected" (on `/status`, in its log, as the
//!   `castor_protection_state` gauge) within 2 s of the backup's first
//!   commit (issue 14's acceptance figure);
//! - `castor status` (control socket and HTTP) prints role, state, peer and
//!   epochs, and `--json` is the same `Status`;
//! - `castor ctl SOCKET suspend` runs the guest unprotected on purpose (its
//!   records then released with epoch 0), `resume` protects it again;
//! - after SIGSTOP of the backup the primary reports the loss within
//!   `timeout_ms` + 1 s (the acceptance figure), with the reason.

use castor::cluster::{metric, scrape, Cluster, Spec};
use castor::observe::{unix_ns, CommitLog, Observer};
use castor::status::{fetch_http, fetch_socket};
use castor_node::{ProtectionState, Reason, Role, Status};
use castor_tests::require_kvm;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn castor_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_castor-under-test"))
}

/// Runs `castor ARGS` and returns its stdout (asserting success).
fn castor(args: &[&str]) -> String {
    let out = Command::new(castor_exe()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "castor {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Polls `addr`'s `/status` until `pred` holds (or `limit` passes).
fn wait_status(addr: SocketAddr, limit: Duration, pred: impl Fn(&Status) -> bool) -> Status {
    let t = Instant::now();
    loop {
        if let Ok(s) = fetch_http(addr) {
            if pred(&s) || t.elapsed() > limit {
                return s;
            }
        } else if t.elapsed() > limit {
            panic!("no /status from {addr} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn first_commit_unix(path: &Path) -> f64 {
    let log = CommitLog::load(path).unwrap();
    let ns = log
        .commits
        .values()
        .min()
        .copied()
        .expect("no commit logged");
    ns as f64 / 1e9
}

#[test]
fn live_pair_status_control_and_backup_loss() {
    require_kvm();
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    // A generous peer timeout: a loaded 2-core machine must not look like a
    // dead backup while the test checks "protected".
    let timeout_ms = 1000;
    let spec = Spec {
        memory: "64M".into(),
        dirty_rate: "5M".into(),
        timeout_ms,
        metrics: true,
        commit_log: true,
        on_backup_loss: "pause".into(),
        ..Spec::default()
    };
    let cluster = Cluster::prepare(&castor_exe(), None, spec, obs.addr()).unwrap();
    let mut backup = cluster.start_backup().unwrap();
    let pm = cluster.primary_metrics.unwrap();
    let bm = cluster.backup_metrics.unwrap();
    // The backup is up and waiting before the primary starts.
    let b = wait_status(bm, Duration::from_secs(30), |s| {
        s.state.name() == "unprotected"
    });
    assert_eq!(b.role, Role::Backup);
    assert_eq!(
        b.state,
        ProtectionState::Unprotected {
            reason: Reason::NoPrimary
        }
    );
    let mut primary = cluster.start_primary().unwrap();

    // 1. Protected within 2 s of the first commit.
    let s = wait_status(pm, Duration::from_secs(90), |s| {
        s.state == ProtectionState::Protected
    });
    primary.check_alive().unwrap();
    assert_eq!(
        s.state,
        ProtectionState::Protected,
        "never protected: {s:#?}"
    );
    let protected_at = s
        .events
        .iter()
        .find(|e| e.kind == "protected")
        .map(|e| e.at_unix)
        .expect("no protected event");
    let first_commit = first_commit_unix(&cluster.commit_log());
    let lag = protected_at - first_commit;
    println!(
        "first commit -> primary reports protected: {:.0} ms",
        lag * 1e3
    );
    assert!(
        lag < 2.0,
        "protected reported {lag:.3} s after the first commit (limit 2 s)"
    );
    let log = std::fs::read_to_string(&primary.log).unwrap();
    assert!(
        log.contains("PROTECTED: backup"),
        "no PROTECTED line in the log:\n{log}"
    );

    // 2. The figures, on every channel.
    let s = wait_status(pm, Duration::from_secs(30), |s| {
        s.acked_epoch >= 10 && s.pause_p99_ms.is_some() && s.series.len() >= 2
    });
    assert_eq!(s.role, Role::Primary);
    assert_eq!(
        s.peer.as_deref(),
        Some(cluster.backup_addr.to_string().as_str())
    );
    assert!(s.epoch >= s.acked_epoch && s.acked_epoch >= 10, "{s:#?}");
    assert!(s.last_ack_age_seconds.is_some_and(|a| a < 60.0));
    assert!(s.pause_p50_ms.is_some() && s.pause_epochs > 0);
    assert!(s.wire_bytes_per_second > 0.0);
    let text = castor(&[
        "status",
        "--socket",
        cluster.primary_socket().to_str().unwrap(),
    ]);
    println!("castor status (primary):\n{text}");
    assert!(text.contains("role:          primary"), "{text}");
    assert!(text.contains("PROTECTED"), "{text}");
    assert!(text.contains(&cluster.backup_addr.to_string()), "{text}");
    let text = castor(&[
        "status",
        "--config",
        cluster.backup_config().to_str().unwrap(),
    ]);
    println!("castor status (backup):\n{text}");
    assert!(
        text.contains("role:          backup") && text.contains("PROTECTED"),
        "{text}"
    );
    let json = castor(&["status", "--json", "--http", &pm.to_string()]);
    let parsed: Status = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed.role, Role::Primary);
    let b = fetch_socket(&cluster.backup_socket()).unwrap();
    assert_eq!(b.role, Role::Backup);
    assert_eq!(b.state, ProtectionState::Protected);
    assert!(b.epoch > 0 && b.commits > 0);
    let m = scrape(pm);
    assert_eq!(
        metric(&m, "castor_protection_state{state=\"protected\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&m, "castor_protected"), Some(1.0));
    assert!(metric(&m, "castor_last_ack_age_seconds").is_some());
    assert!(metric(&m, "castor_pause_p99_seconds").is_some());
    assert_eq!(
        metric(&scrape(bm), "castor_role{role=\"backup\"}"),
        Some(1.0)
    );

    // 3. Suspend: unprotected on purpose, the guest keeps running and its
    // records are released at once (epoch 0); resume: protected again.
    let sock = cluster.primary_socket();
    let out = castor(&["ctl", sock.to_str().unwrap(), "suspend"]);
    assert!(out.contains("suspended"), "{out}");
    let s = wait_status(pm, Duration::from_secs(10), |s| {
        s.state.name() == "unprotected"
    });
    assert_eq!(
        s.state,
        ProtectionState::Unprotected {
            reason: Reason::Suspended
        }
    );
    let suspended_at = unix_ns();
    assert!(
        obs.wait_until(Duration::from_secs(30), |d| d
            .iter()
            .any(|d| d.epoch == 0 && d.at_unix_ns > suspended_at)),
        "no record released unprotected while suspended"
    );
    let again = Command::new(castor_exe())
        .args(["ctl", sock.to_str().unwrap(), "suspend"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already suspended"));
    castor(&["ctl", sock.to_str().unwrap(), "resume"]);
    let s = wait_status(pm, Duration::from_secs(60), |s| {
        s.state == ProtectionState::Protected
    });
    assert_eq!(
        s.state,
        ProtectionState::Protected,
        "not protected after resume: {s:#?}"
    );
    let log = std::fs::read_to_string(&primary.log).unwrap();
    assert!(log.contains("SUSPENDED by the operator"), "{log}");

    // 4. SIGSTOP of the backup: the primary reports the loss within
    // timeout_ms + 1 s.
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(backup.pid() as i32, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let s = wait_status(pm, Duration::from_secs(30), |s| {
        s.state != ProtectionState::Protected
    });
    let took = stopped.elapsed();
    println!(
        "SIGSTOP of the backup -> primary reports {}: {took:?}",
        s.state
    );
    assert!(
        matches!(
            &s.state,
            ProtectionState::PausedAwaitingBackup {
                reason: Reason::BackupLost { .. }
            }
        ),
        "{:?}",
        s.state
    );
    assert!(
        took < Duration::from_millis(timeout_ms + 1000),
        "the loss was reported after {took:?} (limit timeout_ms {timeout_ms} ms + 1 s)"
    );
    // SAFETY: as above.
    unsafe { libc::kill(backup.pid() as i32, libc::SIGCONT) };
    primary.kill();
    backup.kill();
}
