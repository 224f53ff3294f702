//! Replication in one process: a primary VM replicated over real QUIC+mTLS on
//! loopback to a backup replica, with the full-memory digest checked at every
//! commit; and faults injected into the frames, which the backup must reject
//! (typed error, partial epoch discarded) before the pair recovers by
//! incremental resync with no bad commit. (Two-process tests: replication_e2e.rs.)

use castor_net_buffer::OutputBuffer;
use castor_node::BufferedSink;
use castor_replicator::backup::{Backup, BackupConfig, BackupFault, SessionEnd};
use castor_replicator::primary::{Fault, Primary, PrimaryConfig, PrimaryError, Release};
use castor_replicator::transport::{self, Identity, TransportConfig};
use castor_tests::require_kvm;
use castor_vmm::{
    DirtierParams, DirtyTracking, GuestBoot, NullSink, Pattern, Record, Vm, VmConfig, Workload,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Released output, with the backup's committed epoch at the moment of release.
struct Collect {
    items: Mutex<Vec<(u64, u64, Vec<u8>)>>,
    committed: Arc<Mutex<u64>>,
}

impl Release for Collect {
    fn release(&self, epoch: u64, items: &[castor_net_buffer::HeldItem]) {
        let committed = *self.committed.lock().unwrap();
        assert!(
            epoch <= committed,
            "output released for epoch {epoch} while the backup has committed only {committed}"
        );
        let mut v = self.items.lock().unwrap();
        for castor_net_buffer::HeldItem { seq: s, data: d } in items {
            v.push((*s, epoch, d.clone()));
        }
    }
}

struct Outcome {
    acked: u64,
    sessions: Vec<String>,
    verified: u64,
    verify_failures: u64,
    discarded: u64,
    commits: Vec<u64>,
    released: Vec<(u64, u64, Vec<u8>)>,
    primary_errors: Vec<String>,
}

struct Params {
    vcpus: u32,
    rate: u64,
    tracking: DirtyTracking,
    epochs: u64,
    fault: Option<(u64, Fault)>,
    /// Protocol versions the primary offers.
    protocol: castor_parts::VersionRange,
    /// A fault the backup injects into itself.
    backup_fault: Option<BackupFault>,
}

fn run_pair(p: Params) -> Outcome {
    require_kvm();
    let _ = env_logger::builder().is_test(true).try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pid = Identity::generate("primary").unwrap();
    let bid = Identity::generate("backup").unwrap();
    let listener = {
        let _g = rt.enter();
        transport::listen(
            "127.0.0.1:0".parse().unwrap(),
            &bid,
            &pid.cert(),
            &TransportConfig::default(),
        )
        .unwrap()
    };
    let addr = listener.local_addr().unwrap();

    let committed = Arc::new(Mutex::new(0u64));
    let commits = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));

    // The backup: serves sessions until told to stop.
    let backup_fault = p.backup_fault;
    let backup_thread = {
        let (committed, commits, done) = (committed.clone(), commits.clone(), done.clone());
        std::thread::spawn(move || {
            let rt2 = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let mut backup = Backup::new(
                BackupConfig {
                    peer_timeout: Duration::from_secs(3),
                    fault: backup_fault,
                    ..Default::default()
                },
                Box::new(move |shape| {
                    let mem = shape.memory_end();
                    Ok(Arc::new(Vm::new(
                        &VmConfig {
                            vcpus: shape.vcpus,
                            mem_bytes: mem,
                            ..VmConfig::default()
                        },
                        Arc::new(NullSink),
                    )?))
                }),
            );
            backup.set_commit_log(Box::new(move |e| {
                *committed.lock().unwrap() = e;
                commits.lock().unwrap().push(e);
            }));
            let status = backup.status();
            let mut sessions = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let conn = match rt2.block_on(async {
                    tokio::time::timeout(Duration::from_millis(500), listener.accept()).await
                }) {
                    Ok(Ok(c)) => c,
                    _ => continue,
                };
                let end = rt2.block_on(backup.serve(conn));
                sessions.push(match end {
                    Ok(SessionEnd::ProtocolError(w)) => format!("protocol: {w}"),
                    Ok(SessionEnd::PrimaryLost(w)) => format!("lost: {w}"),
                    Ok(SessionEnd::Refused(w)) => format!("refused: {w}"),
                    Ok(SessionEnd::Detached) => "detached".into(),
                    Err(e) => format!("error: {e}"),
                });
            }
            (
                sessions,
                status.verified.load(Ordering::Relaxed),
                status.verify_failures.load(Ordering::Relaxed),
                status.discarded.load(Ordering::Relaxed),
            )
        })
    };

    let cfg = VmConfig {
        vcpus: p.vcpus,
        mem_bytes: 64 << 20,
        dirty_tracking: p.tracking,
        ..VmConfig::default()
    };
    let release = Arc::new(Collect {
        items: Mutex::new(Vec::new()),
        committed: committed.clone(),
    });
    let buffer = Arc::new(OutputBuffer::new(
        castor_net_buffer::Config::with_max_bytes(1 << 20),
    ));
    let vm = Arc::new(
        Vm::new(
            &cfg,
            Arc::new(BufferedSink {
                buffer: buffer.clone(),
                release: release.clone(),
            }),
        )
        .unwrap(),
    );
    vm.boot(&GuestBoot {
        workload: Workload::Dirtier(DirtierParams {
            working_set: 16 << 20,
            dirty_rate: p.rate,
            pattern: Pattern::HotCold,
            bytes_per_page: 64,
            record_every: 64,
            use_entropy: true,
        }),
        seed: 3,
    })
    .unwrap();
    vm.resume();

    let mut primary = Primary::new(
        vm.clone(),
        buffer.clone(),
        release.clone(),
        PrimaryConfig {
            epoch_interval: Duration::from_millis(5),
            verify_memory_every: 1,
            peer_timeout: Duration::from_secs(3),
            fault: p.fault,
            protocol: p.protocol,
            ..Default::default()
        },
    );
    let status = primary.status();
    let stop = primary.stop_flag();
    let epochs = p.epochs;
    let watcher = std::thread::spawn(move || {
        let start = Instant::now();
        while status.acked.load(Ordering::Relaxed) < epochs
            && start.elapsed() < Duration::from_secs(120)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        status.acked.load(Ordering::Relaxed)
    });
    let mut primary_errors = Vec::new();
    for _attempt in 0..10 {
        let conn = rt
            .block_on(transport::connect(
                "127.0.0.1:0".parse().unwrap(),
                addr,
                &pid,
                &bid.cert(),
                &TransportConfig::default(),
            ))
            .unwrap();
        match primary.replicate(conn, rt.handle()) {
            Err(PrimaryError::Stopped) => break,
            Err(e) => primary_errors.push(e.to_string()),
            Ok(()) => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let acked = watcher.join().unwrap();
    done.store(true, Ordering::Relaxed);
    let (sessions, verified, verify_failures, discarded) = backup_thread.join().unwrap();
    vm.pause();
    let released = release.items.lock().unwrap().clone();
    let commits = commits.lock().unwrap().clone();
    Outcome {
        acked,
        sessions,
        verified,
        verify_failures,
        discarded,
        commits,
        released,
        primary_errors,
    }
}

/// Checks the released records: per vCPU the guest's record numbers are
/// contiguous from 1, each released once, and output sequence numbers increase.
fn check_released(o: &Outcome) {
    assert!(!o.released.is_empty(), "nothing released");
    for w in o.released.windows(2) {
        assert!(w[0].0 < w[1].0, "released out of order or twice");
    }
    let mut next: HashMap<u32, u64> = HashMap::new();
    for (_, _, d) in &o.released {
        let r = Record::from_bytes(d).expect("a 32-byte record");
        let n = next.entry(r.vcpu).or_insert(1);
        assert_eq!(
            r.seq, *n,
            "vCPU {}: gap or duplicate in released records",
            r.vcpu
        );
        *n += 1;
    }
    for w in o.commits.windows(2) {
        assert!(
            w[0] < w[1],
            "epoch committed twice or out of order: {:?}",
            w
        );
    }
}

fn clean_run(vcpus: u32, rate: u64, tracking: DirtyTracking) {
    clean_run_with(
        vcpus,
        rate,
        tracking,
        castor_replicator::wire::PROTOCOL_VERSIONS,
    );
}

fn clean_run_with(
    vcpus: u32,
    rate: u64,
    tracking: DirtyTracking,
    protocol: castor_parts::VersionRange,
) {
    let o = run_pair(Params {
        vcpus,
        rate,
        tracking,
        epochs: 200,
        fault: None,
        protocol,
        backup_fault: None,
    });
    assert!(o.acked >= 200, "only {} epochs acknowledged", o.acked);
    assert_eq!(o.verify_failures, 0, "memory verification failed");
    assert!(o.verified >= 200, "only {} commits verified", o.verified);
    assert!(o.primary_errors.is_empty(), "{:?}", o.primary_errors);
    check_released(&o);
}

#[test]
fn replicate_1_vcpu_bitmap_verified() {
    clean_run(1, 20 << 20, DirtyTracking::Bitmap);
}

/// Rolling upgrade: a primary that speaks only the previous protocol
/// version (the previous release's newest) pairs with this backup, which
/// speaks it too, and replicates, every commit verified.
#[test]
fn previous_protocol_version_pairs_and_replicates() {
    use castor_replicator::wire::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
    let previous = PROTOCOL_VERSION - 1;
    assert!(
        previous >= MIN_PROTOCOL_VERSION,
        "this build dropped the previous version"
    );
    clean_run_with(
        1,
        20 << 20,
        DirtyTracking::Bitmap,
        castor_parts::VersionRange::only(previous),
    );
}

#[test]
fn replicate_2_vcpus_ring_verified() {
    clean_run(2, 20 << 20, DirtyTracking::Ring);
}

/// A rejected epoch: typed error on the backup, the partial epoch dropped,
/// the primary reconnects and resyncs incrementally, every later commit
/// verified, output released exactly once and in order.
fn fault_run(fault: Fault, expect_reject: bool) {
    let o = run_pair(Params {
        vcpus: 1,
        rate: 20 << 20,
        tracking: DirtyTracking::Auto,
        epochs: 120,
        fault: Some((40, fault)),
        protocol: castor_replicator::wire::PROTOCOL_VERSIONS,
        backup_fault: None,
    });
    assert!(
        o.acked >= 120,
        "only {} epochs acknowledged: {:?}",
        o.acked,
        o.primary_errors
    );
    assert_eq!(o.verify_failures, 0, "a bad commit reached the replica");
    if expect_reject {
        assert!(
            o.sessions.iter().any(|s| s.starts_with("protocol:")),
            "the backup did not reject the {fault:?} frames: {:?}",
            o.sessions
        );
        assert!(o.discarded >= 1, "no partial epoch was discarded");
        assert!(
            !o.primary_errors.is_empty(),
            "the primary never saw the rejection"
        );
        assert!(
            !o.commits.contains(&40),
            "the faulty epoch 40 was committed"
        );
    } else {
        assert!(
            o.primary_errors.is_empty(),
            "{fault:?} was not tolerated: {:?}",
            o.primary_errors
        );
        assert!(o.commits.contains(&40));
    }
    assert!(o.verified >= 100, "only {} verified commits", o.verified);
    check_released(&o);
}

#[test]
fn corrupted_frame_is_rejected_and_the_pair_resyncs() {
    fault_run(Fault::Corrupt, true);
}

#[test]
fn truncated_frame_is_rejected_and_the_pair_resyncs() {
    fault_run(Fault::Truncate, true);
}

#[test]
fn duplicated_frame_is_rejected_and_the_pair_resyncs() {
    fault_run(Fault::Duplicate, true);
}

#[test]
fn reordered_frames_are_tolerated_and_verified() {
    fault_run(Fault::Reorder, false);
}

/// The link dies twice in a row before an incremental resync commits (the
/// backup fails the next two resumed sessions before their first commit):
/// the pair still converges incrementally, every commit verified. (Before the
/// fix the primary counted the dead session's epochs as acked and fell back
/// to a full sync the backup refused, forever.)
#[test]
fn two_failures_before_a_resync_commits_converge() {
    let o = run_pair(Params {
        vcpus: 1,
        rate: 20 << 20,
        tracking: DirtyTracking::Bitmap,
        epochs: 200,
        fault: Some((40, Fault::Truncate)),
        protocol: castor_replicator::wire::PROTOCOL_VERSIONS,
        backup_fault: Some(BackupFault::FailResumes(2)),
    });
    let injected = o
        .sessions
        .iter()
        .filter(|s| s.contains("injected fault"))
        .count();
    assert_eq!(injected, 2, "sessions: {:?}", o.sessions);
    assert!(
        o.acked >= 200,
        "only {} epochs acknowledged: {:?}",
        o.acked,
        o.primary_errors
    );
    assert_eq!(o.verify_failures, 0);
    assert!(o.verified >= 150, "only {} verified commits", o.verified);
    assert!(
        !o.sessions
            .iter()
            .any(|s| s.contains("pre-copy pages after the first commit")),
        "the primary fell back to a full sync: {:?}",
        o.sessions
    );
    check_released(&o);
}

/// A replica page corrupted behind the pipeline's back: the next commit's
/// memory digest mismatches, that epoch is never acked, the replica is
/// marked diverged and replaced by a full resync, after which every commit
/// verifies again.
#[test]
fn a_diverged_replica_is_never_acked_and_is_fully_resynced() {
    let o = run_pair(Params {
        vcpus: 1,
        rate: 20 << 20,
        tracking: DirtyTracking::Bitmap,
        epochs: 200,
        fault: None,
        protocol: castor_replicator::wire::PROTOCOL_VERSIONS,
        backup_fault: Some(BackupFault::CorruptPage {
            epoch: 50,
            page: 300,
        }),
    });
    assert_eq!(o.verify_failures, 1, "sessions: {:?}", o.sessions);
    assert!(
        !o.commits.contains(&50),
        "the diverged epoch was logged as committed"
    );
    assert!(
        o.sessions.iter().any(|s| s.contains("digest differs")),
        "sessions: {:?}",
        o.sessions
    );
    assert!(
        o.acked >= 200,
        "only {} epochs acknowledged: {:?}",
        o.acked,
        o.primary_errors
    );
    let after: Vec<u64> = o.commits.iter().copied().filter(|&e| e > 50).collect();
    assert!(
        after.len() >= 100,
        "only {} commits after the resync",
        after.len()
    );
    assert!(o.verified >= 100);
    check_released(&o);
}
