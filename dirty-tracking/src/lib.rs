//! Exact, fast, per-epoch harvest of the guest pages that changed.
//!
//! A Remus-style replicator pauses the guest at the end of each epoch, asks
//! which pages were written since the previous epoch, copies them, and
//! resumes. This crate answers the question with a [`DirtySet`] (one bit per
//! 4 KiB page, `u64` words per memory region) through a [`DirtyTracker`] with
//! two KVM backends:
//!
//! * **bitmap** ([`BitmapTracker`]): KVM's per-slot dirty bitmap with
//!   `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`. A harvest is one
//!   `KVM_GET_DIRTY_LOG` per slot (a copy of the bitmap, nothing re-protected)
//!   and one `KVM_CLEAR_DIRTY_LOG` over the 64-page-aligned span between the
//!   first and last dirty word, given the harvested bitmap itself, so exactly
//!   the harvested pages are write-protected again. Cost grows with the guest
//!   size (the bitmap is copied and scanned) and with the dirty pages.
//! * **ring** ([`RingTracker`]): `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (or
//!   `KVM_CAP_DIRTY_LOG_RING`), enabled on the VM before any vCPU exists, one
//!   ring per vCPU mapped from the vCPU fd at page `KVM_DIRTY_LOG_PAGE_OFFSET`.
//!   KVM pushes an entry per page on the first write after protection. A
//!   harvest reads each ring up to the first unpublished entry (flags loaded
//!   with acquire), marks the entries RESET (release store), and one
//!   `KVM_RESET_DIRTY_RINGS` re-protects them. Cost grows with the dirty pages
//!   only. A ring that fills mid-epoch makes its vCPU exit with
//!   `KVM_EXIT_DIRTY_RING_FULL`; the VMM's vCPU thread calls
//!   [`RingShared::on_ring_full`], which moves that ring into a pending set
//!   (merged at the next harvest) and recycles it, and the vCPU runs on.
//!   `KVM_DIRTY_LOG_INITIALLY_SET` is never combined with the ring.
//!
//! [`DirtyTracking::Auto`] picks the bitmap where KVM offers manual protect,
//! else the ring. Measured here (`castor-bench harvest`, PVM, 1 vCPU, p50):
//! 1,000 dirty pages of a 1 GiB guest cost 40 us with the bitmap and 52 us
//! with the ring, 10,000 cost 263 us vs 349 us, 100 cost 18 vs 16 us; the ring
//! wins only when idle (4 GiB: 41 vs 55 us, both far under target) and at
//! 100,000 pages, where most of its work already happened on ring-full exits
//! during the epoch (which the guest pays for). The bitmap also needs no
//! ring-full exits and no reset from signalled vCPU threads.
//!
//! # The merge with the VMM's own writes
//!
//! KVM only sees writes made by vCPUs (and by KVM itself). Pages the VMM
//! writes (device emulation, boot, restores) are tracked on the VMM side by
//! [`DirtyMarks`]:
//!
//! * writes through vm-memory (`Bytes::write_slice`, `write_obj`, `store`,
//!   `VolatileSlice`, `read_volatile_from`) set bits in the region's
//!   `AtomicBitmap` by themselves;
//! * writes through raw host pointers must be reported with
//!   [`DirtyMarks::mark_dirty`];
//! * ranges written through raw pointers all the time (virtqueue rings) can be
//!   registered once with [`DirtyMarks::add_always_dirty`] and are reported at
//!   every harvest.
//!
//! Every harvest ORs the VMM-side bitmap (taken with an atomic swap per word,
//! so a concurrent device write lands in this harvest or the next one, never
//! neither) and the always-dirty ranges into the KVM result. The harvested
//! pages must be copied *after* the harvest: a write whose mark the harvest
//! took happened before the harvest.
//!
//! # What a harvest holds beyond the pages whose content changed
//!
//! The set is exact with respect to *writes*, not to content: a page written
//! with the bytes it already held is reported too, and KVM logs a page when it
//! maps it writable, which is not always a write. The tests
//! (`tests/tests/dirty_tracking.rs`: 1,000 epochs per backend with 1 and 2
//! vCPUs, plus 150 epochs per vCPU count on the smallest ring KVM accepts,
//! each epoch crossing ring-full exits; every page compared with a host-side
//! copy) assert that no changed page is ever missing, and print the unchanged
//! pages harvested, which were:
//!
//! * unchanged workload pages close to pages written in this or the previous
//!   epoch: on PVM, the shadow MMU logs pages it maps writable around a
//!   faulting write (most lie in the same aligned 8-page block as a written
//!   page) and occasionally reports a page written in the previous epoch
//!   again. How many is a figure of the host, not a property of this crate:
//!   about 0.08% of the changed pages on one host (~700 per 900,000), 0.13 to
//!   0.26% on another; `castor-bench harvest` reports them (its `extra_pages` column).
//!   No test bounds them: they cost bandwidth, never correctness;
//! * a vCPU's stack pages (`0x200000 + id * 0x20000 + 0x1000 ..` up to the
//!   next area), rarely: the guest stored the same values again;
//! * allowed but not observed: a vCPU's control page (`0x200000 + id *
//!   0x20000`; it always changes while the dirtier runs) and the page tables
//!   (`0x10000` PML4, `0x11000` PDPT, `0x12000 ..` page directories) when
//!   accessed/dirty bits are set, only in the first epochs after boot.
//!
//! # Kernel pitfall
//!
//! On this host a `KVM_RESET_DIRTY_RINGS` issued from a vCPU thread that
//! receives a pause kick mid-reset lost a re-protection now and then (a later
//! write to that page was never logged; the ring-full test caught it in 2 of
//! 4 runs). The reset now runs with all signals blocked and retries on
//! `EINTR`; since then 5 of 5 ring-full runs passed.
#![deny(missing_docs)]

mod bitmap;
pub mod kvm;
mod marks;
mod ring;
mod set;

pub use bitmap::BitmapTracker;
pub use kvm::{Capabilities, Slot};
pub use marks::{AlwaysDirtyId, DirtyMarks};
pub use ring::{RingShared, RingTracker};
pub use set::{DirtySet, PageRun, RegionBits, Runs};

use kvm_ioctls::VmFd;
use std::fmt;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::sync::Arc;

/// Size of the pages tracked: 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Ring entries per vCPU when none is asked for (1 MiB of ring; capped at
/// what KVM offers).
pub const DEFAULT_RING_ENTRIES: u32 = 65536;
/// Smallest ring KVM accepts: one page of 16-byte entries.
pub const MIN_RING_ENTRIES: u32 = 256;

/// Everything that can go wrong while tracking dirty pages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This host's KVM lacks what the chosen backend needs.
    #[error("KVM on this host lacks {cap}: {hint}")]
    MissingCapability {
        /// The capability.
        cap: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU's dirty ring could not be mapped.
    #[error("cannot mmap a vCPU's dirty ring: {0}")]
    RingMap(#[source] std::io::Error),
    /// The configuration is invalid; the message says what to fix.
    #[error("invalid dirty-tracking configuration: {0}")]
    InvalidConfig(String),
    /// Two dirty sets over different memory layouts were combined.
    #[error("dirty sets of different shapes: {ours:?} vs {theirs:?}")]
    ShapeMismatch {
        /// `(guest_addr, bytes)` of this set's regions.
        ours: Vec<(u64, u64)>,
        /// `(guest_addr, bytes)` of the other set's regions.
        theirs: Vec<(u64, u64)>,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Which dirty tracking a VM gets (chosen when it is created: the ring must
/// be enabled before any vCPU exists).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyTracking {
    /// No dirty tracking (no write-protection faults either).
    #[default]
    None,
    /// KVM dirty bitmap with manual protect ([`BitmapTracker`]).
    Bitmap,
    /// KVM dirty ring ([`RingTracker`]).
    Ring,
    /// The bitmap where KVM offers manual protect, else the ring (the
    /// bitmap measured faster for typical epochs; see the crate docs).
    Auto,
}

impl FromStr for DirtyTracking {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" | "off" => Ok(DirtyTracking::None),
            "bitmap" => Ok(DirtyTracking::Bitmap),
            "ring" => Ok(DirtyTracking::Ring),
            "auto" => Ok(DirtyTracking::Auto),
            other => Err(Error::InvalidConfig(format!(
                "unknown dirty tracking {other:?}: use bitmap, ring, auto or none"
            ))),
        }
    }
}

impl fmt::Display for DirtyTracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DirtyTracking::None => "none",
            DirtyTracking::Bitmap => "bitmap",
            DirtyTracking::Ring => "ring",
            DirtyTracking::Auto => "auto",
        })
    }
}

/// A concrete backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// [`BitmapTracker`].
    Bitmap,
    /// [`RingTracker`].
    Ring,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Bitmap => "bitmap",
            Backend::Ring => "ring",
        })
    }
}

/// Harvests the pages dirtied between epochs.
///
/// Call [`DirtyTracker::harvest`] only while no vCPU is in `KVM_RUN` (the
/// VM is paused), then copy the pages: a page written after the harvest is in
/// the next one.
pub trait DirtyTracker: Send {
    /// Which backend this is.
    fn backend(&self) -> Backend;
    /// Starts (or restarts) tracking: logging is switched on if it was off,
    /// and everything dirtied so far is dropped, so the next harvest holds the
    /// pages written from now on.
    fn start(&mut self) -> Result<()>;
    /// The pages dirtied since the last harvest (or `start`), re-protected so
    /// that the next write to each is seen again.
    fn harvest(&mut self) -> Result<DirtySet> {
        let mut set = self.empty_set();
        self.harvest_into(&mut set)?;
        Ok(set)
    }
    /// Like [`DirtyTracker::harvest`], adding the pages to `set` (which must
    /// come from [`DirtyTracker::empty_set`] or have the same shape).
    fn harvest_into(&mut self, set: &mut DirtySet) -> Result<()>;
    /// An empty set of this tracker's shape.
    fn empty_set(&self) -> DirtySet;
    /// Stops logging (no more write-protection faults); `start` resumes it.
    fn stop(&mut self) -> Result<()>;
}

/// Dirty tracking resolved and enabled on a VM, before its vCPUs exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The backend in use.
    pub backend: Backend,
    /// Ring entries per vCPU (ring backend), else 0.
    pub ring_entries: u32,
}

/// What [`Prepared::build`] returns: the tracker, and for the ring the part
/// the vCPU threads need on `KVM_EXIT_DIRTY_RING_FULL`.
pub struct Built {
    /// The tracker.
    pub tracker: Box<dyn DirtyTracker>,
    /// The ring's shared part (ring backend only).
    pub ring: Option<Arc<RingShared>>,
}

/// Resolves `mode` against what KVM offers and enables it on `vm`. Must run
/// before any vCPU is created (and, by convention, before memslots are
/// registered). `ring_entries` = 0 picks [`DEFAULT_RING_ENTRIES`] (capped at
/// KVM's maximum); otherwise a power of two of at least
/// [`MIN_RING_ENTRIES`]. Returns `None` for [`DirtyTracking::None`].
pub fn prepare_vm(vm: &VmFd, mode: DirtyTracking, ring_entries: u32) -> Result<Option<Prepared>> {
    let caps = Capabilities::probe(vm);
    let backend = match mode {
        DirtyTracking::None => return Ok(None),
        DirtyTracking::Bitmap => Backend::Bitmap,
        DirtyTracking::Ring => Backend::Ring,
        DirtyTracking::Auto if caps.manual_protect => Backend::Bitmap,
        DirtyTracking::Auto => Backend::Ring,
    };
    match backend {
        Backend::Bitmap => {
            if !caps.manual_protect {
                return Err(Error::MissingCapability {
                    cap: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                    hint: "the bitmap backend needs it; try --dirty-tracking ring or auto",
                });
            }
            kvm::enable_manual_protect(vm)?;
            Ok(Some(Prepared {
                backend,
                ring_entries: 0,
            }))
        }
        Backend::Ring => {
            let max = caps.ring_max_entries();
            if max == 0 {
                return Err(Error::MissingCapability {
                    cap: "KVM_CAP_DIRTY_LOG_RING",
                    hint: "the ring backend needs Linux 5.11 or later; try --dirty-tracking bitmap or auto",
                });
            }
            let entries = if ring_entries == 0 {
                DEFAULT_RING_ENTRIES.min(max)
            } else {
                ring_entries
            };
            if !entries.is_power_of_two() || entries < MIN_RING_ENTRIES || entries > max {
                return Err(Error::InvalidConfig(format!(
                    "dirty ring of {entries} entries: use a power of two from {MIN_RING_ENTRIES} to {max}"
                )));
            }
            kvm::enable_ring(vm, &caps, entries * 16)?;
            Ok(Some(Prepared {
                backend,
                ring_entries: entries,
            }))
        }
    }
}

impl Prepared {
    /// The memslot flags to register guest memory with (dirty logging on).
    pub fn memslot_flags(&self) -> u32 {
        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
    }

    /// Builds the tracker once the slots are registered (with
    /// [`Prepared::memslot_flags`]) and the vCPUs exist (`vcpu_fds` in id
    /// order). Tracking is on from slot registration; call
    /// [`DirtyTracker::start`] to drop what was dirtied before.
    pub fn build(
        &self,
        vm: Arc<VmFd>,
        slots: Vec<Slot>,
        marks: DirtyMarks,
        vcpu_fds: &[RawFd],
    ) -> Result<Built> {
        Ok(match self.backend {
            Backend::Bitmap => Built {
                tracker: Box::new(BitmapTracker::new(vm, slots, marks, true)),
                ring: None,
            },
            Backend::Ring => {
                let t = RingTracker::new(vm, slots, marks, vcpu_fds, self.ring_entries, true)?;
                Built {
                    ring: Some(t.shared()),
                    tracker: Box::new(t),
                }
            }
        })
    }
}
