//! VMM-side dirty marks: pages the VMM itself writes, which KVM never sees.

use crate::set::DirtySet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

/// Identifies a range registered with [`DirtyMarks::add_always_dirty`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AlwaysDirtyId(u64);

struct Inner {
    /// Each region's start and mapping (whose `AtomicBitmap` vm-memory marks
    /// on every write through `Bytes` / `VolatileSlice`).
    regions: Vec<(u64, Arc<MmapRegion<AtomicBitmap>>)>,
    /// Ranges reported dirty at every harvest: `(id, gpa, len)`.
    always: Mutex<Vec<(u64, u64, u64)>>,
    next_id: AtomicU64,
}

/// The VMM's side of dirty tracking, cheap to clone and share with device
/// threads.
///
/// * Writes through vm-memory (`Bytes::write_slice`, `write_obj`, `store`,
///   `VolatileSlice` copies, `read_volatile_from`) are marked by vm-memory
///   itself in the region's `AtomicBitmap`; nothing to do.
/// * Writes through raw host pointers (iovecs handed to `readv`, DMA by
///   another process, `as_ptr()`) must be reported with
///   [`DirtyMarks::mark_dirty`] after the write.
/// * Ranges that change behind the VMM's back all the time (virtqueue rings
///   written through raw pointers) can be registered once with
///   [`DirtyMarks::add_always_dirty`]: they are reported at every harvest.
///
/// Every harvest takes and clears these marks and merges them with KVM's.
#[derive(Clone)]
pub struct DirtyMarks {
    inner: Arc<Inner>,
}

impl DirtyMarks {
    /// Marks of the regions of `mem`.
    pub fn new(mem: &vm_memory::GuestMemoryMmap<AtomicBitmap>) -> Self {
        DirtyMarks {
            inner: Arc::new(Inner {
                regions: mem
                    .iter()
                    .map(|r| (r.start_addr().0, r.get_mmap()))
                    .collect(),
                always: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Reports that `[gpa, gpa + len)` was written through a raw pointer.
    /// Parts outside guest memory are ignored.
    pub fn mark_dirty(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = gpa.saturating_add(len);
        for (base, m) in &self.inner.regions {
            let r_end = base + m.size() as u64;
            let lo = gpa.max(*base);
            let hi = end.min(r_end);
            if lo < hi {
                m.bitmap()
                    .set_addr_range((lo - base) as usize, (hi - lo) as usize);
            }
        }
    }

    /// Registers a range reported dirty at every harvest until removed.
    pub fn add_always_dirty(&self, gpa: u64, len: u64) -> AlwaysDirtyId {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.always().push((id, gpa, len));
        AlwaysDirtyId(id)
    }

    /// Removes a range added with [`DirtyMarks::add_always_dirty`]; false if unknown.
    pub fn remove_always_dirty(&self, id: AlwaysDirtyId) -> bool {
        let mut a = self.always();
        let before = a.len();
        a.retain(|e| e.0 != id.0);
        a.len() != before
    }

    fn always(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64, u64)>> {
        self.inner.always.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `(guest_addr, bytes)` of each region.
    pub fn shape(&self) -> Vec<(u64, u64)> {
        self.inner
            .regions
            .iter()
            .map(|(b, m)| (*b, m.size() as u64))
            .collect()
    }

    /// Takes (and clears) the VMM-side marks into `set`, plus the always-dirty ranges.
    pub(crate) fn drain_into(&self, set: &mut DirtySet) {
        for (base, m) in &self.inner.regions {
            // Sets the tracker builds always cover every region; a region a
            // set does not cover keeps its marks for a set that does.
            if let Some(r) = set
                .regions_mut()
                .iter_mut()
                .find(|r| r.guest_addr() == *base)
            {
                r.or_words(&m.bitmap().get_and_reset());
            }
        }
        for &(_, gpa, len) in self.always().iter() {
            set.mark(gpa, len);
        }
    }

    /// Clears the VMM-side marks (a new baseline).
    pub(crate) fn discard(&self) {
        for (_, m) in &self.inner.regions {
            m.bitmap().reset();
        }
    }
}
