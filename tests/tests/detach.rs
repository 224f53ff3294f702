//! A planned detach: a backup stopped with SIGTERM, or told `castor ctl
//! SOCKET detach`, says goodbye on the wire (an `Error` frame with
//! `ErrorCode::Detach`), exits 0 and never takes over; its primary, even
//! under `on_backup_loss = "pause"`, runs on unprotected instead of pausing
//! its guest, and protection resumes when a backup attaches again. A
//! SIGKILL of the backup still means loss and follows the policy (see
//! tests/tests/failover.rs). Real processes on real KVM.

use castor::cluster::{Cluster, Daemon, Spec};
use castor::observe::{check, CheckOptions, CommitLog, Observer};
use castor_tests::require_kvm;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn castor_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_castor-under-test"))
}

/// One pair at a time: on 2 cores parallel pairs starve each other.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn logs(c: &Cluster) -> String {
    castor_tests::log_tails(&c.dir, &["primary", "backup", "backup2"], 15)
}

fn log_of(c: &Cluster, name: &str) -> String {
    std::fs::read_to_string(c.dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Waits for `d` to exit (a stuck deadline, not a speed bound).
fn wait_exit(d: &mut Daemon, c: &Cluster) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = d.child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the backup did not exit 30 s after being asked to detach\n{}",
            logs(c)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[derive(Clone, Copy, Debug)]
enum How {
    Sigterm,
    Ctl,
}

fn detach_and_reattach(how: How) {
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let spec = Spec {
        epoch_ms: 5,
        record_every: 16,
        on_backup_loss: "pause".into(),
        ..Spec::default()
    };
    let c = Cluster::prepare(&castor_exe(), None, spec, obs.addr()).unwrap();
    let mut backup = c.start_backup().unwrap();
    let mut primary = c.start_primary().unwrap();
    assert!(
        obs.wait_until(Duration::from_secs(60), |l| l.len() >= 20),
        "no protected output\n{}",
        logs(&c)
    );
    let committed_before = CommitLog::load(&c.commit_log())
        .map(|l| l.commits.len())
        .unwrap_or(0);
    assert!(committed_before > 0, "nothing committed\n{}", logs(&c));
    let asked = Instant::now();
    match how {
        How::Sigterm => {
            // SAFETY: kill(2) on our own child's pid with a valid signal.
            let r = unsafe { libc::kill(backup.pid() as libc::pid_t, libc::SIGTERM) };
            assert_eq!(r, 0);
        }
        How::Ctl => {
            let out = std::process::Command::new(castor_exe())
                .args(["ctl", c.backup_socket().to_str().unwrap(), "detach"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "castor ctl detach failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let status = wait_exit(&mut backup, &c);
    assert!(
        status.success(),
        "the detached backup exited with {status}\n{}",
        logs(&c)
    );
    let blog = log_of(&c, "backup");
    assert!(
        blog.contains("detaching on purpose") && !blog.contains("TAKEOVER"),
        "the backup did not say goodbye, or took over\n{blog}"
    );
    // The primary runs on, unprotected (epoch label 0), never paused.
    assert!(
        obs.wait_until(Duration::from_secs(30), |l| l
            .iter()
            .filter(|d| d.at > asked && d.epoch == 0)
            .count()
            >= 50),
        "the primary's guest did not keep running unprotected after the detach\n{}",
        logs(&c)
    );
    assert!(primary.check_alive().is_ok(), "primary died\n{}", logs(&c));
    let plog = log_of(&c, "primary");
    assert!(
        plog.contains("DETACHED on purpose"),
        "the primary did not recognise the goodbye\n{plog}"
    );
    assert!(
        !plog.contains("guest paused"),
        "the primary paused its guest for a planned detach\n{plog}"
    );
    // How long the output stopped around the detach (a figure, not a bound).
    let times: Vec<Instant> = obs
        .datagrams()
        .iter()
        .map(|d| d.at)
        .filter(|t| *t > asked.checked_sub(Duration::from_secs(1)).unwrap_or(asked))
        .collect();
    let gap = times
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default();
    eprintln!("{how:?}: the largest gap in the guest's output around the detach: {gap:?}");

    // A backup attaches again: protection resumes (epoch labels > 0 again).
    let reattached = Instant::now();
    let mut backup2 = c.spawn("backup2", "backup").unwrap();
    assert!(
        obs.wait_until(Duration::from_secs(60), |l| l
            .iter()
            .filter(|d| d.at > reattached && d.epoch > 0)
            .count()
            >= 20),
        "protection did not resume when a backup attached again\n{}",
        logs(&c)
    );
    backup2.kill();
    primary.kill();
    let log = obs.finish();
    let v = check(
        &log,
        None,
        &CheckOptions {
            from_start: true,
            failovers: Some(0),
        },
    );
    assert!(v.ok(), "{v}\n{}", logs(&c));
    assert_eq!(v.senders.len(), 1, "a detach is not a failover: {v}");
}

#[test]
fn backup_sigterm_says_goodbye_and_the_primary_runs_on_unprotected() {
    require_kvm();
    let _serial = serial();
    detach_and_reattach(How::Sigterm);
}

#[test]
fn ctl_detach_on_the_backup_says_goodbye_the_same_way() {
    require_kvm();
    let _serial = serial();
    detach_and_reattach(How::Ctl);
}
