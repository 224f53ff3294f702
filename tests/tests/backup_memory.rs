//! The backup's memory is bounded by what it decodes, not by what a peer's
//! entries claim: a primary (holding the pinned certificate) that floods a
//! 4 GiB guest's backup with millions of zero and unchanged page entries,
//! in checkpoints that are otherwise valid and commit, makes the backup
//! grow by megabytes, not by 4 KiB per entry (which would be 16 GiB here).
//! The bound checked is the one README.md states ("Backup memory"),
//! evaluated for this traffic. Real KVM, real QUIC + mTLS on loopback.

mod common;

use castor_net_buffer::{OutputBuffer, OutputPart};
use castor_replicator::backup::{Backup, BackupConfig};
use castor_replicator::checkpoint::{stage_parts, CheckpointEncoder, StagedEpoch};
use castor_replicator::codec::PageTag;
use castor_replicator::manifest::Manifest;
use castor_replicator::transport::{self, TransportConfig};
use castor_replicator::wire::{
    self, Body, EpochTally, Frame, FrameIter, Hello, Limits, PageBatch, PageEntry, Role,
    PROTOCOL_VERSIONS,
};
use castor_tests::require_kvm;
use castor_vmm::{NullSink, Vm, VmConfig};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GUEST_BYTES: u64 = 4 << 30;
const PAGES: u64 = GUEST_BYTES / 4096;
const EPOCHS: u64 = 4;
const BATCH: u64 = 1 << 16;

/// A field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad line {line:?}"));
    kib << 10
}

/// One epoch: every guest page as a zero (even epochs) or unchanged (odd)
/// entry, then the parts' real sections and a correct EpochEnd.
fn flood_epoch(epoch: u64, vm: &Vm, parts: &castor_parts::PartSet) -> (Vec<u8>, Vec<u8>) {
    let tag = if epoch.is_multiple_of(2) {
        PageTag::Zero
    } else {
        PageTag::Unchanged
    } as u8;
    let limits = Limits::for_guest_pages(PAGES);
    let mut data = Vec::new();
    for first in (0..PAGES).step_by(BATCH as usize) {
        let batch = PageBatch {
            pages: (first..(first + BATCH).min(PAGES))
                .map(|page_number| PageEntry {
                    page_number,
                    tag,
                    data: Vec::new(),
                })
                .collect(),
        };
        Frame::new(epoch, Body::PageBatch(batch))
            .encode(&mut data)
            .unwrap();
    }
    // The sections, encoded by the real encoder from the real parts.
    vm.pause();
    let staged = StagedEpoch {
        epoch,
        pages: Vec::new(),
        data: Vec::new(),
        sections: stage_parts(parts).unwrap(),
        memory_digest: None,
        disk: None,
    };
    let mut sections = Vec::new();
    let mut end = Vec::new();
    CheckpointEncoder::new(0)
        .encode_epoch(&staged, &mut sections, &mut end)
        .unwrap();
    data.extend_from_slice(&sections);
    let mut tally = EpochTally::new(epoch);
    for f in FrameIter::new(&data, &limits) {
        tally.add_frame(&f.unwrap());
    }
    let end_frame = Frame::new(epoch, Body::EpochEnd(tally.epoch_end(None)));
    let mut end = Vec::new();
    end_frame.encode(&mut end).unwrap();
    (data, end)
}

#[test]
fn a_flood_of_zero_and_unchanged_entries_stays_within_the_memory_bound() {
    require_kvm();
    let _ = env_logger::builder().is_test(true).try_init();
    let (lb, listener) = common::loopback(2);
    let committed = Arc::new(AtomicU64::new(0));
    let cfg = BackupConfig {
        peer_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let queued = cfg.max_queued_bytes as u64;
    let backup = {
        let committed = committed.clone();
        std::thread::spawn(move || {
            let rt = common::backup_runtime();
            let mut backup = Backup::new(cfg, common::plain_replica());
            backup.set_commit_log(Box::new(move |e| committed.store(e, Ordering::SeqCst)));
            let lost = rt.block_on(backup.guard(&listener, |_, _| {}));
            (lost.to_string(), Instant::now(), backup.committed_epoch())
        })
    };

    // The "primary": a real (never run) 4 GiB VM for an honest manifest and
    // real part sections; its memory is never touched.
    let vm = Arc::new(
        Vm::new(
            &VmConfig {
                vcpus: 1,
                mem_bytes: GUEST_BYTES,
                ..VmConfig::default()
            },
            Arc::new(NullSink),
        )
        .unwrap(),
    );
    let buffer = Arc::new(OutputBuffer::new(castor_net_buffer::Config::default()));
    let mut parts = castor_vmm::parts::vm_parts(&vm);
    parts.push(Arc::new(OutputPart::new(buffer)));
    let manifest = Manifest::of(&vm, &parts).encode().unwrap();

    // Encode every epoch up front: the client's own buffers are not the
    // backup's growth.
    let epochs: Vec<(Vec<u8>, Vec<u8>)> =
        (1..=EPOCHS).map(|e| flood_epoch(e, &vm, &parts)).collect();
    let wire_bytes: u64 = epochs.iter().map(|(d, e)| (d.len() + e.len()) as u64).sum();
    let entries = EPOCHS * PAGES;

    // Peak RSS from here on (writing 5 to clear_refs resets VmHWM).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_bytes("VmRSS:");

    let conn = lb
        .rt
        .block_on(transport::connect(
            "127.0.0.1:0".parse().unwrap(),
            lb.addr,
            &lb.pid,
            &lb.bid.cert(),
            &TransportConfig::default(),
        ))
        .unwrap();
    lb.rt.block_on(async {
        let (mut ctl, mut ctl_rx) = conn.open_control().await.unwrap();
        ctl.send(&Frame::new(
            0,
            Body::Hello(Hello {
                versions: PROTOCOL_VERSIONS,
                role: Role::Primary,
                tracker: "bitmap".into(),
                epoch_interval_ms: 5,
                session_id: 0x5eed,
                resume_from_epoch: 0,
                generation: 0,
                manifest,
            }),
        ))
        .await
        .unwrap();
        let reply = ctl_rx.recv_owned().await.unwrap().unwrap();
        let Body::Hello(h) = reply.body else {
            panic!("the backup answered {:?}", reply.body);
        };
        assert_eq!(h.resume_from_epoch, 0);
        // Same build on both ends: the frames above are in this version.
        assert_eq!(h.versions.max, wire::PROTOCOL_VERSION);
        let mut data = conn.open_data().await.unwrap();
        // All epochs back to back: the backup may hold several in flight.
        for (frames, end) in &epochs {
            data.send_encoded(frames).await.unwrap();
            ctl.send_encoded(end).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while committed.load(Ordering::SeqCst) < EPOCHS {
            assert!(
                Instant::now() < deadline,
                "the backup committed {} of {EPOCHS} flood epochs in 120 s",
                committed.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let peak = status_bytes("VmHWM:");
    let growth = peak.saturating_sub(before);
    // README "Backup memory", for this traffic: the replica's touched pages
    // (none: zero entries on zero pages, unchanged entries, no data pages),
    // the buffered frames (at most everything sent), 4 KiB per data-bearing
    // entry (none) and 8 bytes per zero entry staged, the frame queue, two
    // stream read buffers, and 64 MiB for the runtime, QUIC windows and
    // this test's client.
    let bound = wire_bytes + 8 * PAGES + queued + 2 * (16 << 20) + (64 << 20);
    eprintln!(
        "{entries} entries ({:.1} MiB on the wire) into a {} GiB guest: backup grew {:.1} MiB at its peak (bound {:.1} MiB; 4 KiB per entry would be {} GiB)",
        wire_bytes as f64 / 1048576.0,
        GUEST_BYTES >> 30,
        growth as f64 / 1048576.0,
        bound as f64 / 1048576.0,
        (entries * 4096) >> 30
    );
    assert!(
        growth <= bound,
        "the backup grew {growth} bytes for {entries} dataless entries (bound {bound})"
    );
    // The flood was legitimate content: every epoch committed. Then the
    // primary goes silent and the backup takes over from the last one.
    drop(conn);
    let (lost, _, epoch) = backup.join().unwrap();
    assert_eq!(epoch, EPOCHS, "took over ({lost}) from epoch {epoch}");
}
