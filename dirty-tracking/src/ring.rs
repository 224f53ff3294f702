//! The ring backend: one KVM dirty ring per vCPU (KVM_CAP_DIRTY_LOG_RING,
//! the ACQ_REL flavour where offered), harvested at the epoch boundary and on
//! KVM_EXIT_DIRTY_RING_FULL, recycled with KVM_RESET_DIRTY_RINGS.

use crate::kvm::{self, Slot};
use crate::marks::DirtyMarks;
use crate::set::DirtySet;
use crate::{Backend, DirtyTracker, Error, Result, PAGE_SIZE};
use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::VmFd;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Entry flag: KVM pushed this entry.
const GFN_DIRTY: u32 = 1;
/// Entry flag: userspace harvested this entry; KVM may recycle it.
const GFN_RESET: u32 = 2;

/// One vCPU's ring, mapped from its vCPU fd.
struct Ring {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    bytes: usize,
    /// Next entry to read (free-running; index = fetch & (entries - 1)).
    fetch: u32,
}

// SAFETY: the mapping belongs to this struct alone (unmapped in Drop) and is
// only touched through `&mut Ring`, which the Mutex around each ring serialises.
unsafe impl Send for Ring {}

impl Ring {
    fn map(vcpu_fd: RawFd, entries: u32) -> Result<Ring> {
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset = KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * PAGE_SIZE as libc::off_t;
        // SAFETY: a fresh shared mapping of the vCPU's dirty ring at the offset
        // KVM defines; the result is checked, and the mapping is owned by Ring.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::RingMap(std::io::Error::last_os_error()));
        }
        Ok(Ring {
            base: p.cast(),
            entries,
            bytes,
            fetch: 0,
        })
    }

    /// Reads every entry KVM pushed since the last call, hands `(slot, page
    /// offset)` to `f`, and marks each entry RESET. Returns how many.
    fn collect(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mask = self.entries - 1;
        let mut n = 0;
        loop {
            // SAFETY: the index is masked into the ring, which is mapped for
            // `entries` entries while `self` lives.
            let e = unsafe { self.base.add((self.fetch & mask) as usize) };
            // SAFETY: `flags` is a naturally aligned u32 in the shared mapping
            // that KVM and we access atomically (acquire here pairs with KVM's
            // release store when it publishes the entry).
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is published (acquire above) and KVM does not
            // write it again until we set RESET and call KVM_RESET_DIRTY_RINGS.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(std::ptr::addr_of!((*e).slot)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*e).offset)),
                )
            };
            f(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`.
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}

/// The part of the ring backend the vCPU threads share: on
/// KVM_EXIT_DIRTY_RING_FULL, a vCPU thread calls
/// [`RingShared::on_ring_full`] and runs on.
pub struct RingShared {
    vm: Arc<VmFd>,
    rings: Vec<Mutex<Ring>>,
    slots: Vec<Slot>,
    /// Pages harvested from full rings since the last epoch harvest, per slot.
    pending: Vec<Vec<AtomicU64>>,
    pending_any: AtomicBool,
    full_exits: AtomicU64,
    foreign: AtomicU64,
}

impl RingShared {
    fn ring(&self, vcpu: usize) -> Option<MutexGuard<'_, Ring>> {
        self.rings
            .get(vcpu)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    #[inline]
    fn slot_index(&self, slot: u32) -> Option<usize> {
        // Address space 0 only (bits 16.. hold the address space id).
        self.slots.iter().position(|s| s.slot == slot)
    }

    /// Harvests vCPU `vcpu`'s ring into the pending set and lets KVM recycle
    /// it. Called on the vCPU's thread after KVM_EXIT_DIRTY_RING_FULL (the
    /// vCPU is out of KVM_RUN); other vCPUs may be running. Returns how many
    /// entries were harvested.
    pub fn on_ring_full(&self, vcpu: usize) -> Result<u32> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let n = match self.ring(vcpu) {
            Some(mut r) => r.collect(|slot, off| match self.slot_index(slot) {
                Some(i) if off < self.slots[i].pages() => {
                    let w = &self.pending[i][(off / 64) as usize];
                    w.fetch_or(1u64 << (off % 64), Ordering::Relaxed);
                }
                _ => {
                    self.foreign.fetch_add(1, Ordering::Relaxed);
                }
            }),
            None => 0,
        };
        self.pending_any.store(true, Ordering::Release);
        kvm::reset_dirty_rings(&self.vm)?;
        Ok(n)
    }

    /// How many KVM_EXIT_DIRTY_RING_FULL exits were handled.
    pub fn full_exits(&self) -> u64 {
        self.full_exits.load(Ordering::Relaxed)
    }

    /// Ring entries naming a slot the tracker does not know (ignored).
    pub fn foreign_entries(&self) -> u64 {
        self.foreign.load(Ordering::Relaxed)
    }

    /// Collects every ring and the pending set into `set`, then resets the rings.
    fn harvest_into(&self, set: &mut DirtySet) -> Result<()> {
        let mut total = 0;
        for v in 0..self.rings.len() {
            let Some(mut r) = self.ring(v) else { continue };
            let regions = set.regions_mut();
            total += r.collect(|slot, off| match self.slot_index(slot) {
                Some(i) if off < self.slots[i].pages() => {
                    if let Some(reg) = regions.get_mut(i) {
                        reg.words_mut()[(off / 64) as usize] |= 1u64 << (off % 64);
                    }
                }
                _ => {
                    self.foreign.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        if total > 0 {
            kvm::reset_dirty_rings(&self.vm)?;
        }
        if self.pending_any.swap(false, Ordering::Acquire) {
            for (i, words) in self.pending.iter().enumerate() {
                if let Some(reg) = set.regions_mut().get_mut(i) {
                    for (w, p) in reg.words_mut().iter_mut().zip(words) {
                        if p.load(Ordering::Relaxed) != 0 {
                            *w |= p.swap(0, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Dirty tracking through per-vCPU dirty rings.
///
/// KVM pushes one 16-byte entry (slot, page offset) per page the first time a
/// vCPU writes it after it was (re-)protected. A harvest walks each ring from
/// where the last one stopped until the first entry KVM has not published
/// (flags read with acquire), marks each entry RESET (release store), then
/// one KVM_RESET_DIRTY_RINGS re-protects exactly those pages. The cost is
/// proportional to the pages dirtied, not to the guest size. A ring that
/// fills mid-epoch makes its vCPU exit with KVM_EXIT_DIRTY_RING_FULL; the
/// vCPU thread harvests that ring into a pending set ([`RingShared`]) merged
/// at the next harvest, so nothing is lost.
pub struct RingTracker {
    shared: Arc<RingShared>,
    marks: DirtyMarks,
    logging: bool,
}

impl RingTracker {
    /// Maps the ring of each vCPU (fds in vCPU id order) of a VM that had the
    /// ring enabled with `entries` entries ([`crate::prepare_vm`]).
    pub fn new(
        vm: Arc<VmFd>,
        slots: Vec<Slot>,
        marks: DirtyMarks,
        vcpu_fds: &[RawFd],
        entries: u32,
        logging: bool,
    ) -> Result<Self> {
        let rings = vcpu_fds
            .iter()
            .map(|&fd| Ring::map(fd, entries).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;
        let pending = slots
            .iter()
            .map(|s| {
                (0..s.pages().div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
            .collect();
        Ok(RingTracker {
            shared: Arc::new(RingShared {
                vm,
                rings,
                slots,
                pending,
                pending_any: AtomicBool::new(false),
                full_exits: AtomicU64::new(0),
                foreign: AtomicU64::new(0),
            }),
            marks,
            logging,
        })
    }

    /// The part the vCPU threads use on KVM_EXIT_DIRTY_RING_FULL.
    pub fn shared(&self) -> Arc<RingShared> {
        self.shared.clone()
    }

    fn shape(&self) -> Vec<(u64, u64)> {
        self.shared
            .slots
            .iter()
            .map(|s| (s.guest_addr, s.size))
            .collect()
    }
}

impl DirtyTracker for RingTracker {
    fn backend(&self) -> Backend {
        Backend::Ring
    }

    fn start(&mut self) -> Result<()> {
        if !self.logging {
            for s in &self.shared.slots {
                kvm::set_slot_logging(&self.shared.vm, s, true)?;
            }
            self.logging = true;
        }
        let mut scratch = self.empty_set();
        self.shared.harvest_into(&mut scratch)?;
        self.marks.discard();
        Ok(())
    }

    fn harvest_into(&mut self, set: &mut DirtySet) -> Result<()> {
        self.shared.harvest_into(set)?;
        self.marks.drain_into(set);
        Ok(())
    }

    fn empty_set(&self) -> DirtySet {
        DirtySet::new(&self.shape())
    }

    fn stop(&mut self) -> Result<()> {
        if self.logging {
            for s in &self.shared.slots {
                kvm::set_slot_logging(&self.shared.vm, s, false)?;
            }
            self.logging = false;
        }
        let mut scratch = self.empty_set();
        self.shared.harvest_into(&mut scratch)
    }
}
