//! The replica's invariant, with no KVM: the replica equals exactly one
//! committed checkpoint. A half-delivered epoch, an epoch failing
//! verification, a part refusing its section, a part failing the
//! restorability dry run: each leaves memory, the committed states and the
//! committed epoch as they were. Toy parts stand in for the VM's.

use castor_parts::{
    decode_section, encode_section, Checked, Part, PartDescriptor, PartError, PartId, PartIdentity,
    PartKind, PartSet, Staged, VersionRange,
};
use castor_replicator::checkpoint::{
    CheckpointEncoder, CheckpointError, EpochAssembler, Replica, StagedEpoch,
};
use castor_replicator::wire::{self, Limits};
use castor_vmm::state::VmShape;
use castor_vmm::MemoryRegionSpec;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 16 << 20;

/// A toy part holding one number; it refuses odd numbers at check, and
/// fails its restore when told to.
struct Num {
    id: PartId,
    live: AtomicU64,
    fail_restore: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
#[error("odd value {0}")]
struct Odd(u64);

#[derive(Debug, thiserror::Error)]
#[error("restore refused on purpose")]
struct Refused;

struct StagedNum(PartId, u64);
impl Staged for StagedNum {
    fn version(&self) -> u16 {
        1
    }
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), PartError> {
        encode_section(self.0, &self.1, out)
    }
}

impl Part for Num {
    fn descriptor(&self) -> PartDescriptor {
        PartDescriptor {
            id: self.id,
            identity: PartIdentity::Vcpu,
            versions: VersionRange::only(1),
        }
    }
    fn stage(&self) -> Result<Box<dyn Staged>, PartError> {
        Ok(Box::new(StagedNum(
            self.id,
            self.live.load(Ordering::SeqCst),
        )))
    }
    fn check(&self, version: u16, data: &[u8]) -> Result<Checked, PartError> {
        if version != 1 {
            return Err(PartError::UnsupportedVersion {
                id: self.id,
                version,
                accepted: VersionRange::only(1),
            });
        }
        let v: u64 = decode_section(self.id, version, data)?;
        if v % 2 == 1 {
            return Err(PartError::Invalid {
                id: self.id,
                source: Box::new(Odd(v)),
            });
        }
        Ok(Checked::new(self.id, version, v))
    }
    fn restore(&self, state: &Checked) -> Result<(), PartError> {
        if self.fail_restore.load(Ordering::SeqCst) {
            return Err(PartError::Restore {
                id: self.id,
                source: Box::new(Refused),
            });
        }
        self.live
            .store(*state.get::<u64>(self.id)?, Ordering::SeqCst);
        Ok(())
    }
}

fn num(instance: u32) -> Arc<Num> {
    Arc::new(Num {
        id: PartId::new(PartKind::Vcpu, instance),
        live: AtomicU64::new(0),
        fail_restore: AtomicBool::new(false),
    })
}

struct Rig {
    replica: Replica,
    mem: castor_vmm::GuestMemoryMmap,
    backup_parts: Vec<Arc<Num>>,
    primary_parts: Vec<Arc<Num>>,
    encoder: CheckpointEncoder,
}

fn rig() -> Rig {
    let mem = castor_vmm::memory::create(MEM).unwrap();
    let shape = VmShape {
        vcpus: 2,
        memory: vec![MemoryRegionSpec {
            guest_addr: 0,
            size: MEM,
        }],
    };
    let backup_parts = vec![num(0), num(1)];
    let mut set = PartSet::new();
    for p in &backup_parts {
        set.push(p.clone());
    }
    Rig {
        replica: Replica::new(mem.clone(), &shape, set),
        mem,
        backup_parts,
        primary_parts: vec![num(0), num(1)],
        encoder: CheckpointEncoder::new(1 << 20),
    }
}

impl Rig {
    /// Encodes epoch `e` writing byte `fill` to pages `pages`, the primary's
    /// parts holding `values`; returns the frames and the EpochEnd.
    fn epoch(&mut self, e: u64, pages: &[u64], fill: u8, values: [u64; 2]) -> (Vec<u8>, Vec<u8>) {
        for (p, v) in self.primary_parts.iter().zip(values) {
            p.live.store(v, Ordering::SeqCst);
        }
        let staged = StagedEpoch {
            epoch: e,
            pages: pages.to_vec(),
            data: vec![fill; pages.len() * 4096],
            sections: self
                .primary_parts
                .iter()
                .map(|p| (p.id, p.stage().unwrap()))
                .collect(),
            memory_digest: None,
            disk: None,
        };
        let (mut data, mut end) = (Vec::new(), Vec::new());
        self.encoder
            .encode_epoch(&staged, &mut data, &mut end)
            .unwrap();
        (data, end)
    }

    fn assemble(&self, e: u64, frames: &[u8]) -> EpochAssembler {
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

    fn commit(&mut self, asm: &EpochAssembler) -> Result<(), CheckpointError> {
        self.replica.commit(asm, |_| [0; 32]).map(|_| ())
    }

    fn page(&self, p: u64) -> u8 {
        let mut b = [0u8; 1];
        self.mem.read_slice(&mut b, GuestAddress(p * 4096)).unwrap();
        b[0]
    }

    /// Memory of pages 0..8, the committed epoch, and what a takeover restores.
    fn snapshot(&self) -> (Vec<u8>, u64, Vec<u64>) {
        let pages = (0..8).map(|p| self.page(p)).collect();
        let restored = if self.replica.has_state() {
            self.replica.restore().unwrap();
            self.backup_parts
                .iter()
                .map(|p| p.live.load(Ordering::SeqCst))
                .collect()
        } else {
            Vec::new()
        };
        (pages, self.replica.committed_epoch(), restored)
    }
}

fn committed_once() -> Rig {
    let mut r = rig();
    let (d, e) = r.epoch(1, &[0, 1, 2], 0x11, [2, 4]);
    let asm = r.assemble(1, &[d, e].concat());
    r.commit(&asm).unwrap();
    assert_eq!(
        r.snapshot(),
        (vec![0x11, 0x11, 0x11, 0, 0, 0, 0, 0], 1, vec![2, 4])
    );
    r
}

#[test]
fn a_half_delivered_epoch_leaves_the_replica_as_it_was() {
    let mut r = committed_once();
    let before = r.snapshot();
    let (d, e) = r.epoch(2, &[3, 4, 5], 0x22, [6, 8]);
    // Every data frame but the last, then the EpochEnd: incomplete.
    let mut frames = Vec::new();
    let mut off = 0;
    let mut bounds = Vec::new();
    while off < d.len() {
        let (_, used) = wire::decode(&d[off..], &Limits::default()).unwrap();
        bounds.push((off, off + used));
        off += used;
    }
    for &(a, b) in &bounds[..bounds.len() - 1] {
        frames.extend_from_slice(&d[a..b]);
    }
    frames.extend_from_slice(&e);
    let asm = r.assemble(2, &frames);
    assert!(
        asm.status().is_none(),
        "an epoch missing a frame looks complete"
    );
    assert!(matches!(
        r.commit(&asm),
        Err(CheckpointError::Incomplete { epoch: 2 })
    ));
    assert_eq!(r.snapshot(), before);
}

#[test]
fn an_epoch_failing_verification_leaves_the_replica_as_it_was() {
    let mut r = committed_once();
    let before = r.snapshot();
    let (d, _) = r.epoch(2, &[3, 4], 0x22, [6, 8]);
    // An EpochEnd from another epoch's content: the tally disagrees.
    let (_, other_end) = r.epoch(2, &[6], 0x33, [6, 8]);
    let asm = r.assemble(2, &[d, other_end].concat());
    assert!(matches!(r.commit(&asm), Err(CheckpointError::Tally { .. })));
    assert_eq!(r.snapshot(), before);
}

#[test]
fn a_part_refusing_its_section_leaves_the_replica_as_it_was() {
    let mut r = committed_once();
    let before = r.snapshot();
    // Part 1 refuses odd values; the pages of the epoch come first in the
    // frames and decode fine, yet none reaches memory.
    let (d, e) = r.epoch(2, &[3, 4, 5], 0x22, [6, 7]);
    let asm = r.assemble(2, &[d, e].concat());
    assert!(matches!(
        r.commit(&asm),
        Err(CheckpointError::Part {
            source: PartError::Invalid { .. },
            ..
        })
    ));
    assert_eq!(r.snapshot(), before);
    // The session ends; the primary reconnects and resyncs: its next epoch commits.
    // (A new session invalidates the primary's XOR cache: the rejected
    // epoch's pages never reached the replica.)
    r.replica.expect_any_next();
    r.encoder.invalidate_all();
    let (d, e) = r.epoch(3, &[3], 0x44, [10, 12]);
    r.commit(&r.assemble(3, &[d, e].concat())).unwrap();
    assert_eq!(
        r.snapshot(),
        (vec![0x11, 0x11, 0x11, 0x44, 0, 0, 0, 0], 3, vec![10, 12])
    );
}

#[test]
fn a_failed_restorability_dry_run_refuses_the_session_and_keeps_the_replica() {
    let mut r = committed_once();
    let before = r.snapshot();
    // A new session: its first commit is proven again; part 0 cannot restore.
    r.replica.expect_any_next();
    r.backup_parts[0].fail_restore.store(true, Ordering::SeqCst);
    let (d, e) = r.epoch(5, &[6, 7], 0x55, [20, 22]);
    let asm = r.assemble(5, &[d, e].concat());
    assert!(matches!(
        r.commit(&asm),
        Err(CheckpointError::NotRestorable { epoch: 5, .. })
    ));
    r.backup_parts[0]
        .fail_restore
        .store(false, Ordering::SeqCst);
    assert_eq!(r.snapshot(), before);
}

#[test]
fn every_epoch_carries_every_part_once() {
    let mut r = committed_once();
    let before = r.snapshot();
    // Only part 0's section: missing part 1.
    let staged = StagedEpoch {
        epoch: 2,
        pages: vec![4],
        data: vec![0x66; 4096],
        sections: vec![(r.primary_parts[0].id, r.primary_parts[0].stage().unwrap())],
        memory_digest: None,
        disk: None,
    };
    let (mut d, mut e) = (Vec::new(), Vec::new());
    r.encoder.encode_epoch(&staged, &mut d, &mut e).unwrap();
    let asm = r.assemble(2, &[d, e].concat());
    assert!(matches!(
        r.commit(&asm),
        Err(CheckpointError::MissingSection { .. })
    ));
    // Part 0 twice.
    let staged = StagedEpoch {
        epoch: 2,
        pages: vec![],
        data: vec![],
        sections: vec![
            (r.primary_parts[0].id, r.primary_parts[0].stage().unwrap()),
            (r.primary_parts[0].id, r.primary_parts[0].stage().unwrap()),
            (r.primary_parts[1].id, r.primary_parts[1].stage().unwrap()),
        ],
        memory_digest: None,
        disk: None,
    };
    let (mut d, mut e) = (Vec::new(), Vec::new());
    r.encoder.encode_epoch(&staged, &mut d, &mut e).unwrap();
    let asm = r.assemble(2, &[d, e].concat());
    assert!(matches!(
        r.commit(&asm),
        Err(CheckpointError::DuplicateSection { .. })
    ));
    // A part this replica does not have.
    let stranger = num(9);
    let staged = StagedEpoch {
        epoch: 2,
        pages: vec![],
        data: vec![],
        sections: vec![
            (r.primary_parts[0].id, r.primary_parts[0].stage().unwrap()),
            (r.primary_parts[1].id, r.primary_parts[1].stage().unwrap()),
            (stranger.id, stranger.stage().unwrap()),
        ],
        memory_digest: None,
        disk: None,
    };
    let (mut d, mut e) = (Vec::new(), Vec::new());
    r.encoder.encode_epoch(&staged, &mut d, &mut e).unwrap();
    let asm = r.assemble(2, &[d, e].concat());
    assert!(matches!(
        r.commit(&asm),
        Err(CheckpointError::UnknownPart { .. })
    ));
    assert_eq!(r.snapshot(), before);
}

#[test]
fn frames_restamped_to_the_previous_version_commit_the_same() {
    let mut r = rig();
    r.encoder.set_version(wire::MIN_PROTOCOL_VERSION);
    let (d, e) = r.epoch(1, &[1], 0x77, [2, 2]);
    let (f, _) = wire::decode(&d, &Limits::default()).unwrap();
    assert_eq!(f.header.version, wire::MIN_PROTOCOL_VERSION);
    let asm = r.assemble(1, &[d, e].concat());
    r.commit(&asm).unwrap();
    assert_eq!(r.snapshot().1, 1);
    assert_eq!(r.page(1), 0x77);
}

/// Staging costs 4 KiB per page entry whatever the entry costs on the wire:
/// a page twice in one epoch is refused, and so is an epoch announcing more
/// entries than the guest has pages; the replica stays as it was.
#[test]
fn duplicate_pages_and_oversized_epochs_are_refused() {
    let mut r = committed_once();
    let before = r.snapshot();
    let (d, e) = r.epoch(2, &[3, 4, 3], 0x22, [6, 8]);
    let asm = r.assemble(2, &[d, e].concat());
    assert!(matches!(
        r.commit(&asm),
        Err(CheckpointError::DuplicatePage { page: 3, .. })
    ));
    assert_eq!(r.snapshot(), before);
    // 4097 zero-page entries for a 4096-page guest (pages cycle, so some
    // repeat; the count alone is refused before anything is decoded).
    let many: Vec<u64> = (0..4097).map(|i| i % 4096).collect();
    let staged = StagedEpoch {
        epoch: 2,
        pages: many.clone(),
        data: vec![0; many.len() * 4096],
        sections: r
            .primary_parts
            .iter()
            .map(|p| (p.id, p.stage().unwrap()))
            .collect(),
        memory_digest: None,
        disk: None,
    };
    let (mut d, mut e) = (Vec::new(), Vec::new());
    r.encoder.encode_epoch(&staged, &mut d, &mut e).unwrap();
    let asm = r.assemble(2, &[d, e].concat());
    assert!(matches!(
        r.commit(&asm),
        Err(CheckpointError::TooManyPages { pages: 4097, .. })
    ));
    assert_eq!(r.snapshot(), before);
}
