//! Disk blocks on the backup, with no KVM: blocks of an epoch reach the
//! replica's image only when the whole epoch verified; a bad disk frame
//! (block out of range, wrong length, unknown encoding, a block twice,
//! corrupt LZ4, blocks for a replica without a disk, a `DiskBatch` in a
//! protocol that predates it) is refused with a typed error and leaves the
//! image and the committed epoch as they were; zero blocks cost (almost)
//! nothing on the wire; an epoch that flushed is made durable before it is
//! acknowledged (and only such an epoch, or the first after a pre-copy).

use castor_parts::PartSet;
use castor_replicator::checkpoint::{
    CheckpointEncoder, CheckpointError, EpochAssembler, Replica, StagedEpoch,
};
use castor_replicator::codec::CodecError;
use castor_replicator::disk::{self, DiskError, ReplicaDisk, StagedDisk, BLOCK};
use castor_replicator::wire::{
    self, Body, BodyRef, DiskBatch, EpochTally, Frame, Limits, PageBatch, PageEntry, WireError,
};
use castor_vmm::state::VmShape;
use castor_vmm::MemoryRegionSpec;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const MEM: u64 = 16 << 20;
const BLOCKS: u64 = 64;

struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn image(name: &str) -> (Image, std::fs::File) {
    let path = std::env::temp_dir().join(format!(
        "castor-disk-test-{}-{name}.img",
        std::process::id()
    ));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    f.set_len(BLOCKS * BLOCK as u64).unwrap();
    (Image(path), f)
}

fn replica(file: Option<&std::fs::File>) -> Replica {
    let mem = castor_vmm::memory::create(MEM).unwrap();
    let shape = VmShape {
        vcpus: 1,
        memory: vec![MemoryRegionSpec {
            guest_addr: 0,
            size: MEM,
        }],
    };
    let mut r = Replica::new(mem, &shape, PartSet::new());
    if let Some(f) = file {
        r.set_disk(ReplicaDisk::new(
            f.try_clone().unwrap(),
            BLOCKS * BLOCK as u64,
        ));
    }
    r
}

fn block(f: &std::fs::File, b: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    f.read_exact_at(&mut v, b * BLOCK as u64).unwrap();
    v
}

fn assemble(e: u64, frames: &[u8]) -> EpochAssembler {
    let mut asm = EpochAssembler::new(e, 64 << 20);
    let limits = Limits::default();
    let mut off = 0;
    while off < frames.len() {
        let (f, used) = wire::decode(&frames[off..], &limits).unwrap();
        asm.add(&f, &frames[off..off + used]).unwrap();
        off += used;
    }
    asm
}

/// Epoch `e` carrying `blocks`, each filled with its own byte value.
fn epoch(e: u64, blocks: &[(u64, u8)], flushed: bool) -> Vec<u8> {
    let mut data = Vec::new();
    for &(_, fill) in blocks {
        data.extend(std::iter::repeat_n(fill, BLOCK));
    }
    let staged = StagedEpoch {
        epoch: e,
        pages: Vec::new(),
        data: Vec::new(),
        sections: Vec::new(),
        memory_digest: None,
        disk: Some(StagedDisk {
            blocks: blocks.iter().map(|b| b.0).collect(),
            data,
            flushed,
        }),
    };
    let (mut d, mut end) = (Vec::new(), Vec::new());
    CheckpointEncoder::new(0)
        .encode_epoch(&staged, &mut d, &mut end)
        .unwrap();
    [d, end].concat()
}

/// Epoch `e` made of hand-built `DiskBatch` entries (valid or not).
fn raw_epoch(e: u64, entries: Vec<PageEntry>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut tally = EpochTally::new(e);
    let h = Frame::new(
        e,
        Body::DiskBatch(DiskBatch {
            flags: 0,
            blocks: PageBatch { pages: entries },
        }),
    )
    .encode(&mut out)
    .unwrap();
    tally.add(&h, 0);
    Frame::new(e, Body::EpochEnd(tally.epoch_end(None)))
        .encode(&mut out)
        .unwrap();
    out
}

fn entry(b: u64, tag: u8, data: Vec<u8>) -> PageEntry {
    PageEntry {
        page_number: b,
        tag,
        data,
    }
}

#[test]
fn blocks_reach_the_image_at_commit_and_bad_frames_keep_the_replica() {
    let (_img, f) = image("commit");
    let mut r = replica(Some(&f));

    // Pre-copy: block 3 holds data, the rest is zero (runs).
    let mut data = vec![0u8; BLOCKS as usize * BLOCK];
    data[3 * BLOCK..4 * BLOCK].fill(0x33);
    let blocks: Vec<u64> = (0..BLOCKS).collect();
    let mut sync = Vec::new();
    let enc =
        disk::encode_blocks(0, &blocks, &data, false, &mut sync, &mut EpochTally::new(0)).unwrap();
    assert_eq!(enc.blocks, BLOCKS);
    assert_eq!(enc.zero_blocks, BLOCKS - 1);
    let (frame, _) = wire::decode(&sync, &Limits::default()).unwrap();
    let BodyRef::DiskBatch(batch) = frame.body else {
        panic!("not a disk batch: {frame:?}")
    };
    assert_eq!(r.apply_sync_disk(&batch).unwrap(), BLOCKS);
    assert_eq!(block(&f, 3), vec![0x33; BLOCK]);

    // Epoch 1: blocks 5 and 6, with a flush.
    let info = r
        .commit(
            &assemble(1, &epoch(1, &[(5, 0x55), (6, 0x66)], true)),
            |_| [0; 32],
        )
        .unwrap();
    assert_eq!(info.disk_blocks, 2);
    // The guest flushed (and pre-copy data preceded): durable before the ack.
    assert!(info.disk_synced);
    assert_eq!(block(&f, 5), vec![0x55; BLOCK]);
    assert_eq!(block(&f, 6), vec![0x66; BLOCK]);
    assert_eq!(r.committed_epoch(), 1);
    let before: Vec<Vec<u8>> = (0..BLOCKS).map(|b| block(&f, b)).collect();

    // Bad frames for epoch 2, each after a valid block 7: refused, typed,
    // nothing written.
    let lz4_garbage = vec![0xf0, 0xff, 0xff, 0x01];
    let cases: Vec<(&str, Vec<PageEntry>)> = vec![
        ("block out of range", vec![entry(BLOCKS, 1, vec![9; BLOCK])]),
        (
            "zero run past the end",
            vec![entry(60, 0, 10u32.to_le_bytes().to_vec())],
        ),
        (
            "empty zero run",
            vec![entry(9, 0, 0u32.to_le_bytes().to_vec())],
        ),
        (
            "raw block of the wrong length",
            vec![entry(9, 1, vec![9; 100])],
        ),
        (
            "an encoding disks do not use",
            vec![entry(9, 2, vec![9; 10])],
        ),
        ("a block twice", vec![entry(7, 1, vec![9; BLOCK])]),
        ("corrupt LZ4", vec![entry(9, 3, lz4_garbage)]),
    ];
    for (what, bad) in cases {
        let mut entries = vec![entry(7, 1, vec![0x77; BLOCK])];
        entries.extend(bad);
        let err = r
            .commit(&assemble(2, &raw_epoch(2, entries)), |_| [0; 32])
            .unwrap_err();
        let CheckpointError::Disk { epoch: 2, source } = &err else {
            panic!("{what}: not a disk error: {err}");
        };
        match (what, source) {
            ("block out of range", DiskError::OutOfRange { block: 64, .. })
            | (
                "zero run past the end",
                DiskError::OutOfRange {
                    block: 60,
                    count: 10,
                    ..
                },
            )
            | ("empty zero run", DiskError::BadRun { block: 9, .. })
            | (
                "raw block of the wrong length",
                DiskError::Block {
                    block: 9,
                    source: CodecError::WrongDataLength { .. },
                },
            )
            | ("an encoding disks do not use", DiskError::Tag { block: 9, tag: 2 })
            | ("a block twice", DiskError::Duplicate { block: 7 })
            | (
                "corrupt LZ4",
                DiskError::Block {
                    block: 9,
                    source: CodecError::Decompress { .. },
                },
            ) => {}
            _ => panic!("{what}: unexpected error {err}"),
        }
        println!("{what}: refused: {err}");
        assert_eq!(r.committed_epoch(), 1, "{what}");
        let now: Vec<Vec<u8>> = (0..BLOCKS).map(|b| block(&f, b)).collect();
        assert!(now == before, "{what}: the image changed");
    }

    // The replica still takes the next good epoch.
    let info = r
        .commit(
            &assemble(2, &epoch(2, &[(7, 0x77), (63, 0)], false)),
            |_| [0; 32],
        )
        .unwrap();
    // No flush in this epoch: no fdatasync on the commit path.
    assert!(!info.disk_synced);
    // A flush with no write still syncs.
    let info = r
        .commit(&assemble(3, &epoch(3, &[], true)), |_| [0; 32])
        .unwrap();
    assert!(info.disk_synced);
    assert_eq!(info.disk_blocks, 0);
    assert_eq!(block(&f, 7), vec![0x77; BLOCK]);
    assert_eq!(r.committed_epoch(), 3);
}

#[test]
fn disk_frames_for_a_replica_without_a_disk_are_refused() {
    let mut r = replica(None);
    let err = r
        .commit(&assemble(1, &epoch(1, &[(1, 1)], false)), |_| [0; 32])
        .unwrap_err();
    assert!(
        matches!(
            err,
            CheckpointError::Disk {
                source: DiskError::NoDisk,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("[disk]"), "{err}");
    assert_eq!(r.committed_epoch(), 0);
}

#[test]
fn disk_batches_need_protocol_4() {
    let mut frame = raw_epoch(1, vec![entry(1, 1, vec![1; BLOCK])]);
    wire::restamp(&mut frame, 3);
    let err = wire::decode(&frame, &Limits::default()).unwrap_err();
    assert_eq!(err, WireError::UnknownFrameType { got: 11 });
    // And an encoder that negotiated protocol 3 refuses to send a disk.
    let mut enc = CheckpointEncoder::new(0);
    enc.set_version(3);
    let staged = StagedEpoch {
        epoch: 1,
        disk: Some(StagedDisk::default()),
        ..Default::default()
    };
    let err = enc
        .encode_epoch(&staged, &mut Vec::new(), &mut Vec::new())
        .unwrap_err();
    assert!(
        matches!(
            err,
            CheckpointError::Disk {
                source: DiskError::OldPeer { version: 3 },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn zero_blocks_are_nearly_free_on_the_wire() {
    let n = 4096u64; // 16 MiB of zeros
    let blocks: Vec<u64> = (0..n).collect();
    let data = vec![0u8; n as usize * BLOCK];
    let mut out = Vec::new();
    let enc =
        disk::encode_blocks(0, &blocks, &data, false, &mut out, &mut EpochTally::new(0)).unwrap();
    assert_eq!(enc.zero_blocks, n);
    // One frame header, its count and flags, one 15-byte run entry.
    assert!(out.len() < 64, "{} bytes for 16 MiB of zeros", out.len());
}
