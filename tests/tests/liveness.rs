//! One liveness rule across sessions: a backup holding a committed replica
//! takes over if and only if nothing from the primary arrived for the
//! timeout, however the last session ended. Here the primary's session ends,
//! then the primary (its pinned certificate) keeps connecting with garbage:
//! malformed Hellos, sessions that stall before Hello, a frame cut short.
//! Each attempt ends in a protocol error or a deadline, and while they keep
//! coming the backup never takes over; once they stop, it does. Real KVM,
//! real QUIC + mTLS on loopback.

mod common;

use castor_net_buffer::OutputBuffer;
use castor_node::BufferedSink;
use castor_replicator::backup::{Backup, BackupConfig, GuardEvent};
use castor_replicator::primary::{Primary, PrimaryConfig, Release};
use castor_replicator::transport::{self, TransportConfig};
use castor_tests::require_kvm;
use castor_vmm::{DirtierParams, GuestBoot, NullSink, Vm, VmConfig, Workload};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Discard;
impl Release for Discard {
    fn release(&self, _epoch: u64, _items: &[castor_net_buffer::HeldItem]) {}
}

#[test]
fn no_takeover_while_the_primary_is_heard_then_takeover_when_silent() {
    require_kvm();
    let _ = env_logger::builder().is_test(true).try_init();
    let (lb, listener) = common::loopback(2);
    let (rt, pid, bid, addr) = (&lb.rt, &lb.pid, &lb.bid, lb.addr);
    let committed = Arc::new(AtomicU64::new(0));
    let ends = Arc::new(Mutex::new(Vec::<String>::new()));
    let backup = {
        let (committed, ends) = (committed.clone(), ends.clone());
        std::thread::spawn(move || {
            let rt2 = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let mut backup = Backup::new(
                BackupConfig {
                    peer_timeout: Duration::from_secs(2),
                    handshake_timeout: Duration::from_millis(200),
                    ..Default::default()
                },
                Box::new(|shape| {
                    Ok(Arc::new(Vm::new(
                        &VmConfig {
                            vcpus: shape.vcpus,
                            mem_bytes: shape.memory_end(),
                            ..VmConfig::default()
                        },
                        Arc::new(NullSink),
                    )?))
                }),
            );
            backup.set_commit_log(Box::new(move |e| committed.store(e, Ordering::SeqCst)));
            let lost = rt2.block_on(backup.guard(&listener, |_, ev| {
                if let GuardEvent::Ended(end) = ev {
                    ends.lock().unwrap().push(format!("{end:?}"));
                }
            }));
            (lost.to_string(), Instant::now(), backup.committed_epoch())
        })
    };

    // A real primary until the backup has committed something.
    let buffer = Arc::new(OutputBuffer::new(castor_net_buffer::Config::default()));
    let release: Arc<dyn Release> = Arc::new(Discard);
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
        workload: Workload::Dirtier(DirtierParams::default()),
        seed: 2,
    })
    .unwrap();
    vm.resume();
    let mut primary = Primary::new(
        vm.clone(),
        buffer,
        release,
        PrimaryConfig {
            epoch_interval: Duration::from_millis(5),
            peer_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    );
    let stop = primary.stop_flag();
    let c2 = committed.clone();
    let stopper = std::thread::spawn(move || {
        let start = Instant::now();
        while c2.load(Ordering::SeqCst) < 20 {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "nothing committed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::SeqCst);
    });
    let connect = || {
        rt.block_on(transport::connect(
            "127.0.0.1:0".parse().unwrap(),
            addr,
            pid,
            &bid.cert(),
            &TransportConfig::default(),
        ))
    };
    let _ = primary.replicate(connect().unwrap(), rt.handle());
    stopper.join().unwrap();
    vm.pause();

    // The primary is still "heard": for 8 s (four timeouts) it keeps
    // connecting and misbehaving in turn, every ~150 ms.
    let heard_until = Instant::now() + Duration::from_secs(8);
    let mut attempt = 0u32;
    while Instant::now() < heard_until {
        let conn = match connect() {
            Ok(c) => c,
            Err(e) => panic!("the backup stopped accepting the primary: {e}"),
        };
        rt.block_on(async {
            let (mut tx, _rx) = conn.open_control().await.unwrap();
            match attempt % 3 {
                // Garbage instead of a Hello.
                0 => {
                    let _ = tx.send_encoded(&[0x5a; 64]).await;
                }
                // Half a frame, then the stream is finished mid-frame.
                1 => {
                    let mut b = Vec::new();
                    castor_replicator::wire::Frame::new(0, castor_replicator::wire::Body::Ack)
                        .encode(&mut b)
                        .unwrap();
                    let _ = tx.send_encoded(&b[..20]).await;
                    let _ = tx.finish();
                }
                // Nothing at all: the Hello deadline runs out.
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        });
        drop(conn);
        attempt += 1;
    }
    let silent_from = Instant::now();
    let (lost, at, epoch) = backup.join().unwrap();
    let ends = ends.lock().unwrap().clone();
    assert!(
        at >= silent_from,
        "took over ({lost}) while the primary was still heard; sessions: {ends:?}"
    );
    assert!(epoch >= 20, "took over from epoch {epoch}");
    assert!(
        ends.len() >= 3,
        "the misbehaving attempts did not reach the backup: {ends:?}"
    );
}
