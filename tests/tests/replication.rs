//! Replication in one process: a primary VM replicated over real QUIC+mTLS on
//! loopback to a backup replica, with the full-memory digest checked at every
//! commit. (The two-process tests are in replication_e2e.rs.)

use castor_net_buffer::OutputBuffer;
use castor_primary::BufferedSink;
use castor_replicator::backup::{Backup, BackupConfig, SessionEnd};
use castor_replicator::primary::{Primary, PrimaryConfig, PrimaryError, Release};
use castor_replicator::transport::{self, Identity, TransportConfig};
use castor_tests::require_kvm;
use castor_vmm::{
    DirtierParams, DirtyTracking, GuestBoot, NullSink, Pattern, Vm, VmConfig, Workload,
};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Collect(Mutex<Vec<(u64, Vec<u8>)>>);
impl Release for Collect {
    fn release(&self, _epoch: u64, items: &[(u64, Vec<u8>)]) {
        self.0.lock().unwrap().extend_from_slice(items);
    }
}

fn replicate(vcpus: u32, rate: u64, tracking: DirtyTracking, epochs: u64) {
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

    let cfg = VmConfig {
        vcpus,
        mem_bytes: 64 << 20,
        dirty_tracking: tracking,
        ..VmConfig::default()
    };
    let release = Arc::new(Collect::default());
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
            dirty_rate: rate,
            pattern: Pattern::HotCold,
            bytes_per_page: 64,
            record_every: 64,
            use_entropy: true,
        }),
        seed: 3,
    })
    .unwrap();
    vm.resume();

    // Backup in a thread of its own.
    let backup_thread = std::thread::spawn(move || {
        let rt2 = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut backup = Backup::new(
            BackupConfig {
                peer_timeout: Duration::from_secs(2),
                ..Default::default()
            },
            Box::new(move |shape| {
                let mem = shape
                    .memory
                    .iter()
                    .map(|r| r.guest_addr + r.size)
                    .max()
                    .unwrap();
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
        let status = backup.status();
        let conn = rt2.block_on(listener.accept()).unwrap();
        let end = rt2.block_on(backup.serve(conn));
        (
            end,
            status.verified.load(Ordering::Relaxed),
            status.verify_failures.load(Ordering::Relaxed),
            backup.committed_epoch(),
        )
    });

    let mut primary = Primary::new(
        vm.clone(),
        buffer.clone(),
        release.clone(),
        PrimaryConfig {
            epoch_interval: Duration::from_millis(5),
            verify_memory_every: 1,
            peer_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    );
    let status = primary.status();
    let stop = primary.stop_flag();
    let conn = rt
        .block_on(transport::connect(
            "127.0.0.1:0".parse().unwrap(),
            addr,
            &pid,
            &bid.cert(),
            &TransportConfig::default(),
        ))
        .unwrap();
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
    let r = primary.replicate(conn, rt.handle());
    assert!(
        matches!(r, Err(PrimaryError::Stopped)),
        "replication ended with {r:?}"
    );
    let acked = watcher.join().unwrap();
    let (end, verified, failures, committed) = backup_thread.join().unwrap();
    assert!(acked >= epochs, "only {acked} epochs acknowledged");
    assert_eq!(failures, 0, "memory verification failed");
    assert!(
        verified >= epochs,
        "only {verified} commits verified (committed {committed})"
    );
    assert!(matches!(end, Ok(SessionEnd::PrimaryLost(_))), "{end:?}");
    // Released records are exactly the guest's, in order, none lost.
    let released = release.0.lock().unwrap();
    assert!(!released.is_empty());
    for w in released.windows(2) {
        assert!(w[0].0 < w[1].0, "released out of order");
    }
}

#[test]
fn replicate_1_vcpu_bitmap_verified() {
    replicate(1, 20 << 20, DirtyTracking::Bitmap, 200);
}

#[test]
fn replicate_2_vcpus_ring_verified() {
    replicate(2, 20 << 20, DirtyTracking::Ring, 200);
}
