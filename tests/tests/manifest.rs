//! Pairing refuses what the backup could not restore, at Hello, while the
//! primary is alive and can be told: a backup without the primary's
//! virtio-net device (no `[net]`), or with another MAC, is refused before
//! anything is acked and the primary hears why; a peer two protocol versions
//! away is refused with a message naming both versions. Real KVM, real
//! QUIC + mTLS on loopback.

mod common;

use castor_net_buffer::OutputBuffer;
use castor_node::BufferedSink;
use castor_replicator::backup::{Backup, BackupConfig, SessionEnd};
use castor_replicator::primary::{Primary, PrimaryConfig, PrimaryError, Release};
use castor_replicator::transport::{self, TransportConfig};
use castor_replicator::wire::{self, Body, Frame, Hello, Role};
use castor_tests::require_kvm;
use castor_vmm::devices::{NetConfig, Tap, VirtioNet};
use castor_vmm::{DirtierParams, GuestBoot, NullSink, Vm, VmConfig, Workload};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Drop0;
impl Release for Drop0 {
    fn release(&self, _epoch: u64, _items: &[castor_net_buffer::HeldItem]) {}
}

static TAPS: AtomicU32 = AtomicU32::new(0);

fn tap() -> Arc<Tap> {
    let name = format!(
        "cmf{}x{}",
        std::process::id() % 10_000,
        TAPS.fetch_add(1, Ordering::Relaxed)
    );
    Arc::new(Tap::open(&name).expect("creating a tap needs root"))
}

fn vm_with_net(mac: Option<[u8; 6]>, sink: Arc<dyn castor_vmm::OutputSink>) -> Arc<Vm> {
    let vm = Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes: 32 << 20,
            ..VmConfig::default()
        },
        sink,
    )
    .unwrap();
    if let Some(mac) = mac {
        vm.devices()
            .add_virtio_net(VirtioNet::new(NetConfig {
                tap: tap(),
                mac,
                tx_sink: None,
            }))
            .unwrap();
    }
    Arc::new(vm)
}

const MAC: [u8; 6] = [0x02, 0xca, 0x57, 0, 0, 2];

/// A primary whose guest has virtio-net with [`MAC`] against a backup whose
/// factory builds `backup_mac`'s device (None: no `[net]`). Returns the
/// primary's error, how the backup's session ended and what it committed.
fn pair(backup_mac: Option<[u8; 6]>) -> (PrimaryError, String, u64) {
    require_kvm();
    let (lb, listener) = common::loopback(2);
    let (rt, pid, bid, addr) = (&lb.rt, &lb.pid, &lb.bid, lb.addr);
    let backup = std::thread::spawn(move || {
        let rt2 = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut backup = Backup::new(
            BackupConfig::default(),
            Box::new(move |_shape| Ok(vm_with_net(backup_mac, Arc::new(NullSink)))),
        );
        let conn = rt2.block_on(listener.accept()).unwrap();
        let end = match rt2.block_on(backup.serve(conn)) {
            Ok(SessionEnd::Refused(w)) => format!("refused: {w}"),
            Ok(SessionEnd::ProtocolError(w)) => format!("protocol: {w}"),
            Ok(SessionEnd::PrimaryLost(w)) => format!("lost: {w}"),
            Ok(SessionEnd::Detached) => "detached".into(),
            Err(e) => format!("error: {e}"),
        };
        (end, backup.committed_epoch())
    });
    let buffer = Arc::new(OutputBuffer::new(castor_net_buffer::Config::default()));
    let release: Arc<dyn Release> = Arc::new(Drop0);
    let vm = vm_with_net(
        Some(MAC),
        Arc::new(BufferedSink {
            buffer: buffer.clone(),
            release: release.clone(),
        }),
    );
    vm.boot(&GuestBoot {
        workload: Workload::Dirtier(DirtierParams::default()),
        seed: 1,
    })
    .unwrap();
    vm.resume();
    let mut primary = Primary::new(
        vm.clone(),
        buffer,
        release,
        PrimaryConfig {
            peer_timeout: Duration::from_secs(3),
            ..Default::default()
        },
    );
    let conn = rt
        .block_on(transport::connect(
            "127.0.0.1:0".parse().unwrap(),
            addr,
            pid,
            &bid.cert(),
            &TransportConfig::default(),
        ))
        .unwrap();
    let err = primary
        .replicate(conn, rt.handle())
        .expect_err("the backup must refuse this primary");
    let acked = primary.acked_epoch();
    vm.pause();
    let (end, committed) = backup.join().unwrap();
    assert_eq!(acked, 0, "an epoch was acked by a backup that refused");
    (err, end, committed)
}

#[test]
fn backup_without_net_is_refused_at_hello() {
    let (err, end, committed) = pair(None);
    let PrimaryError::Refused { message, .. } = &err else {
        panic!("the primary did not hear the refusal: {err}");
    };
    assert!(
        message.contains("[net]") && message.contains("02:ca:57:00:00:02"),
        "the reason does not say what to configure: {message}"
    );
    assert!(end.starts_with("refused:"), "backup session: {end}");
    assert_eq!(committed, 0, "the backup committed a checkpoint it refused");
}

#[test]
fn backup_with_another_mac_is_refused_at_hello() {
    let (err, end, committed) = pair(Some([0x02, 0xca, 0x57, 0, 0, 9]));
    let PrimaryError::Refused { message, .. } = &err else {
        panic!("the primary did not hear the refusal: {err}");
    };
    assert!(
        message.contains("02:ca:57:00:00:02") && message.contains("02:ca:57:00:00:09"),
        "the reason does not name both MACs: {message}"
    );
    assert!(end.starts_with("refused:"), "backup session: {end}");
    assert_eq!(committed, 0);
}

/// A peer two versions away: protocol 1 (the first release, no negotiation)
/// and a peer that speaks only a future version are both refused by name.
#[test]
fn peer_two_versions_away_is_refused_naming_both_versions() {
    require_kvm();
    let (lb, listener) = common::loopback(2);
    let (rt, pid, bid, addr) = (&lb.rt, &lb.pid, &lb.bid, lb.addr);
    let backup = std::thread::spawn(move || {
        let rt2 = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut backup = Backup::new(
            BackupConfig::default(),
            Box::new(|_shape| Ok(vm_with_net(None, Arc::new(NullSink)))),
        );
        let mut ends = Vec::new();
        for _ in 0..2 {
            let conn = rt2.block_on(listener.accept()).unwrap();
            ends.push(match rt2.block_on(backup.serve(conn)) {
                Ok(SessionEnd::Refused(w)) => format!("refused: {w}"),
                other => format!("{other:?}"),
            });
        }
        ends
    });
    // (header version, announced range)
    for (header_version, min, max) in [(1u16, 1u16, 1u16), (2, 5, 6)] {
        let conn = rt
            .block_on(transport::connect(
                "127.0.0.1:0".parse().unwrap(),
                addr,
                pid,
                &bid.cert(),
                &TransportConfig::default(),
            ))
            .unwrap();
        let reply = rt.block_on(async {
            let (mut tx, mut rx) = conn.open_control().await.unwrap();
            let mut bytes = Vec::new();
            Frame::new(
                0,
                Body::Hello(Hello {
                    versions: castor_parts::VersionRange::new(min, max),
                    role: Role::Primary,
                    tracker: "bitmap".into(),
                    epoch_interval_ms: 25,
                    session_id: 7,
                    resume_from_epoch: 0,
                    generation: 0,
                    manifest: Vec::new(),
                }),
            )
            .encode(&mut bytes)
            .unwrap();
            wire::restamp(&mut bytes, header_version);
            tx.send_encoded(&bytes).await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), rx.recv_owned())
                .await
                .expect("no answer from the backup")
        });
        let frame = reply
            .expect("the Error frame must arrive before the close")
            .expect("the backup closed without saying why");
        let Body::Error(e) = frame.body else {
            panic!("expected an Error frame, got {:?}", frame.body);
        };
        assert_eq!(e.code, wire::ErrorCode::Version.as_u16());
        assert!(
            e.message.contains(&format!("version {min}"))
                || e.message.contains(&format!("{min} to {max}")),
            "the refusal does not name the peer's version: {}",
            e.message
        );
        assert!(
            e.message.contains("2 to 4"),
            "the refusal does not name this build's versions: {}",
            e.message
        );
    }
    let ends = backup.join().unwrap();
    assert!(ends.iter().all(|e| e.starts_with("refused:")), "{ends:?}");
}
