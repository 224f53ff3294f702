//! Nothing acknowledged is lost: output leaves the checkpoint only after it
//! was written to the outside world. The primary is stopped between an Ack
//! and the write of that epoch's output (its release sink blocks there),
//! keeps checkpointing, and dies; the backup that takes over re-emits those
//! items. Real KVM, real QUIC + mTLS on loopback.

mod common;

use castor_net_buffer::OutputBuffer;
use castor_node::BufferedSink;
use castor_replicator::backup::{Backup, BackupConfig, SessionEnd};
use castor_replicator::primary::{Primary, PrimaryConfig, Release};
use castor_replicator::transport::{self, TransportConfig};
use castor_tests::require_kvm;
use castor_vmm::{DirtierParams, GuestBoot, Pattern, Vm, VmConfig, Workload};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Blocks in its first non-empty release until told to go on: the primary
/// "stops" between the ack and the write.
#[derive(Default)]
struct Stuck {
    blocked: Mutex<Option<(u64, Vec<u64>)>>,
    go: Mutex<bool>,
    cv: Condvar,
}

impl Release for Stuck {
    fn release(&self, epoch: u64, items: &[castor_net_buffer::HeldItem]) {
        let first = {
            let mut b = self.blocked.lock().unwrap();
            if b.is_none() && !items.is_empty() {
                *b = Some((epoch, items.iter().map(|i| i.seq).collect()));
                true
            } else {
                false
            }
        };
        if first {
            let mut go = self.go.lock().unwrap();
            while !*go {
                go = self.cv.wait(go).unwrap();
            }
        }
    }
}

#[test]
fn output_stuck_between_ack_and_write_is_reemitted_by_the_takeover() {
    require_kvm();
    let (lb, listener) = common::loopback(3);
    let (rt, pid, bid, addr) = (&lb.rt, &lb.pid, &lb.bid, lb.addr);
    let committed = Arc::new(AtomicU64::new(0));
    let backup = {
        let committed = committed.clone();
        std::thread::spawn(move || {
            let rt2 = common::backup_runtime();
            let mut backup = Backup::new(
                BackupConfig {
                    peer_timeout: Duration::from_secs(5),
                    ..Default::default()
                },
                common::plain_replica(),
            );
            backup.set_commit_log(Box::new(move |e| committed.store(e, Ordering::SeqCst)));
            let conn = rt2.block_on(listener.accept()).unwrap();
            let end = rt2.block_on(backup.serve(conn));
            assert!(
                matches!(end, Ok(SessionEnd::PrimaryLost(_))),
                "the session ended so: {end:?}"
            );
            let t = backup
                .take_over()
                .expect("a committed checkpoint to take over");
            t.vm.pause();
            t.output.items.iter().map(|i| i.seq).collect::<Vec<u64>>()
        })
    };

    let stuck = Arc::new(Stuck::default());
    let release: Arc<dyn Release> = stuck.clone();
    let buffer = Arc::new(OutputBuffer::new(castor_net_buffer::Config::default()));
    let vm = Arc::new(
        Vm::new(
            &VmConfig {
                vcpus: 1,
                mem_bytes: 32 << 20,
                dirty_tracking: castor_vmm::DirtyTracking::Bitmap,
                ..VmConfig::default()
            },
            Arc::new(BufferedSink {
                buffer: buffer.clone(),
                release: release.clone(),
            }),
        )
        .unwrap(),
    );
    vm.boot(&GuestBoot {
        workload: Workload::Dirtier(DirtierParams {
            working_set: 8 << 20,
            dirty_rate: 10 << 20,
            pattern: Pattern::Uniform,
            bytes_per_page: 64,
            record_every: 64,
            use_entropy: false,
        }),
        seed: 9,
    })
    .unwrap();
    vm.resume();
    let mut primary = Primary::new(
        vm.clone(),
        buffer,
        release,
        PrimaryConfig {
            epoch_interval: Duration::from_millis(5),
            // Room to keep checkpointing while the ack task is stuck.
            max_in_flight: 1000,
            peer_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    );
    let stop = primary.stop_flag();
    let watcher = {
        let (stuck, committed) = (stuck.clone(), committed.clone());
        std::thread::spawn(move || {
            // Once the ack task is stuck on epoch e, let the backup commit
            // later checkpoints (staged while e's output was being written),
            // then stop the primary: it dies before the write completes.
            let start = Instant::now();
            let e = loop {
                if let Some((e, _)) = stuck.blocked.lock().unwrap().clone() {
                    break e;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "no output released"
                );
                std::thread::sleep(Duration::from_millis(5));
            };
            while committed.load(Ordering::SeqCst) < e + 3 {
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "no commit after {e}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::SeqCst);
        })
    };
    let conn = rt
        .block_on(transport::connect(
            "127.0.0.1:0".parse().unwrap(),
            addr,
            pid,
            &bid.cert(),
            &TransportConfig::default(),
        ))
        .unwrap();
    let _ = primary.replicate(conn, rt.handle());
    watcher.join().unwrap();
    vm.pause();
    let reemitted = backup.join().unwrap();
    // Let the stuck release finish so the runtime can shut down.
    *stuck.go.lock().unwrap() = true;
    stuck.cv.notify_all();
    let (epoch, items) = stuck.blocked.lock().unwrap().clone().unwrap();
    let missing: Vec<u64> = items
        .iter()
        .copied()
        .filter(|s| !reemitted.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "output of acked epoch {epoch} that was never written out is missing from the \
         takeover's re-emission: seqs {missing:?}"
    );
}
