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
use castor_vmm::{DirtierParams, GuestBoot, Vm, VmConfig, Workload};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Discard;
impl Release for Discard {
    fn release(&self, _epoch: u64, _items: &[castor_net_buffer::HeldItem]) {}
}

/// What a test gets once a real primary committed 20 epochs and stopped.
struct Paired {
    lb: common::Loopback,
    backup: std::thread::JoinHandle<(String, Instant, u64)>,
    ends: Arc<Mutex<Vec<String>>>,
    manifest: Vec<u8>,
}

/// A backup guarding (timeout 2 s), a real primary that commits 20 epochs
/// and stops: from here on only what the test sends reaches the backup.
fn paired() -> Paired {
    let _ = env_logger::builder().is_test(true).try_init();
    let (lb, listener) = common::loopback(2);
    let (rt, pid, bid, addr) = (&lb.rt, &lb.pid, &lb.bid, lb.addr);
    let committed = Arc::new(AtomicU64::new(0));
    let ends = Arc::new(Mutex::new(Vec::<String>::new()));
    let backup = {
        let (committed, ends) = (committed.clone(), ends.clone());
        std::thread::spawn(move || {
            let rt2 = common::backup_runtime();
            let mut backup = Backup::new(
                BackupConfig {
                    peer_timeout: Duration::from_secs(2),
                    handshake_timeout: Duration::from_millis(200),
                    ..Default::default()
                },
                common::plain_replica(),
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
    let parts = {
        let mut p = castor_vmm::parts::vm_parts(&vm);
        p.push(Arc::new(castor_net_buffer::OutputPart::new(Arc::new(
            OutputBuffer::new(castor_net_buffer::Config::default()),
        ))));
        p
    };
    let manifest = castor_replicator::manifest::Manifest::of(&vm, &parts)
        .encode()
        .unwrap();
    Paired {
        lb,
        backup,
        ends,
        manifest,
    }
}

#[test]
fn no_takeover_while_the_primary_is_heard_then_takeover_when_silent() {
    require_kvm();
    let Paired {
        lb, backup, ends, ..
    } = paired();
    let (rt, pid, bid, addr) = (&lb.rt, &lb.pid, &lb.bid, lb.addr);
    let connect = || {
        rt.block_on(transport::connect(
            "127.0.0.1:0".parse().unwrap(),
            addr,
            pid,
            &bid.cert(),
            &TransportConfig::default(),
        ))
    };
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

/// A valid Hello of *another* session (another guest: a primary daemon
/// restarted on the pair's host boots a new one) is not the pair's primary
/// alive: refused at Hello (`Occupied`, code 15), and the backup takes the
/// pair's guest over once its primary stays silent, while those Hellos keep
/// coming (otherwise the restarted daemon would hold off the takeover
/// forever, its new guest refused and the old one never resumed).
#[test]
fn another_guests_hellos_do_not_hold_off_the_takeover() {
    require_kvm();
    let Paired {
        lb,
        backup,
        ends,
        manifest,
    } = paired();
    let (rt, pid, bid, addr) = (&lb.rt, &lb.pid, &lb.bid, lb.addr);
    let hello = castor_replicator::wire::Frame::new(
        0,
        castor_replicator::wire::Body::Hello(castor_replicator::wire::Hello {
            versions: castor_replicator::wire::PROTOCOL_VERSIONS,
            role: castor_replicator::wire::Role::Primary,
            tracker: "bitmap".into(),
            epoch_interval_ms: 5,
            session_id: 0x0afe_1234,
            resume_from_epoch: 0,
            generation: 0,
            manifest,
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut refused = 0;
    while !backup.is_finished() {
        assert!(
            Instant::now() < deadline,
            "no takeover 60 s after the primary stopped, while another guest's Hellos kept coming; sessions: {:?}",
            ends.lock().unwrap()
        );
        let conn = match rt.block_on(transport::connect(
            "127.0.0.1:0".parse().unwrap(),
            addr,
            pid,
            &bid.cert(),
            &TransportConfig::default(),
        )) {
            Ok(c) => c,
            // The backup took over and stopped listening.
            Err(_) => continue,
        };
        rt.block_on(async {
            let Ok((mut tx, mut rx)) = conn.open_control().await else {
                return;
            };
            if tx.send(&hello).await.is_err() {
                return;
            }
            if let Ok(Ok(Some(f))) =
                tokio::time::timeout(Duration::from_secs(5), rx.recv_owned()).await
            {
                if let castor_replicator::wire::Body::Error(e) = f.body {
                    assert_eq!(e.code, 15, "{}", e.message);
                    refused += 1;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(150));
    }
    let (lost, _, epoch) = backup.join().unwrap();
    assert!(epoch >= 20, "took over ({lost}) from epoch {epoch}");
    assert!(
        refused >= 1,
        "no Hello of another guest was refused before the takeover; sessions: {:?}",
        ends.lock().unwrap()
    );
}

/// A primary daemon for the same pair that boots a NEW guest (restarted
/// after a crash, or started twice) while the backup holds the live replica
/// of the pair's guest: its protect loop is refused (`Occupied`), stops its
/// guest and gives up with `ProtectError::OtherGuest` (the daemon exits
/// with it) instead of running a second guest beside the one the backup
/// will resume; it released nothing.
#[test]
fn a_new_guest_for_an_occupied_backup_is_stopped() {
    require_kvm();
    let Paired {
        lb, backup, ends, ..
    } = paired();
    let released = Arc::new(AtomicU64::new(0));
    struct Count(Arc<AtomicU64>);
    impl Release for Count {
        fn release(&self, _epoch: u64, items: &[castor_net_buffer::HeldItem]) {
            self.0.fetch_add(items.len() as u64, Ordering::SeqCst);
        }
    }
    let buffer = Arc::new(OutputBuffer::new(castor_net_buffer::Config::default()));
    let release: Arc<dyn Release> = Arc::new(Count(released.clone()));
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
        seed: 3,
    })
    .unwrap();
    vm.resume();
    let board = castor_node::StatusBoard::new(castor_node::Role::Primary);
    let end = castor_node::protect(
        vm.clone(),
        buffer,
        release,
        castor_node::Protection {
            backup: lb.addr,
            bind: "127.0.0.1:0".parse().unwrap(),
            identity: lb.pid.clone(),
            peer: lb.bid.cert(),
            pipeline: PrimaryConfig {
                epoch_interval: Duration::from_millis(5),
                peer_timeout: Duration::from_secs(5),
                ..Default::default()
            },
            on_backup_loss: castor_node::OnBackupLoss::Continue,
        },
        &board,
        &lb.rt,
    );
    match end {
        Err(castor_node::ProtectError::OtherGuest { message, .. }) => {
            assert!(message.contains("another guest"), "{message}")
        }
        other => panic!(
            "the new guest's protect loop ended with {other:?}; sessions: {:?}",
            ends.lock().unwrap()
        ),
    }
    assert_eq!(
        released.load(Ordering::SeqCst),
        0,
        "the refused guest released output"
    );
    // The pair's guest is still taken over once its primary stays silent.
    let (lost, _, epoch) = backup.join().unwrap();
    assert!(epoch >= 20, "took over ({lost}) from epoch {epoch}");
}
