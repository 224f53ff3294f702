//! The bitmap backend: KVM_GET_DIRTY_LOG with manual protect, then one
//! KVM_CLEAR_DIRTY_LOG per slot re-protecting exactly what was harvested.

use crate::kvm::{self, Slot};
use crate::marks::DirtyMarks;
use crate::set::DirtySet;
use crate::{Backend, DirtyTracker, Result};
use kvm_ioctls::VmFd;
use std::sync::Arc;

/// Dirty tracking through KVM's per-slot dirty bitmap with
/// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.
///
/// With manual protect, KVM_GET_DIRTY_LOG only copies the bitmap out; pages
/// stay writable (and their bits set) until KVM_CLEAR_DIRTY_LOG clears the bits
/// and write-protects the pages again. A harvest does one GET per slot, then
/// one CLEAR covering the 64-page-aligned span from the first to the last
/// dirty word, passing the harvested bitmap itself: exactly the harvested
/// pages are re-protected, in one ioctl (a CLEAR per word costs ~16x more).
pub struct BitmapTracker {
    vm: Arc<VmFd>,
    slots: Vec<Slot>,
    marks: DirtyMarks,
    /// Reused GET_DIRTY_LOG buffer per slot.
    bufs: Vec<Vec<u64>>,
    logging: bool,
}

impl BitmapTracker {
    /// A tracker over `slots` of `vm`; the VM must have had manual protect
    /// enabled ([`crate::prepare_vm`]) and the slots registered with
    /// `KVM_MEM_LOG_DIRTY_PAGES` when `logging` is true.
    pub fn new(vm: Arc<VmFd>, slots: Vec<Slot>, marks: DirtyMarks, logging: bool) -> Self {
        let bufs = slots
            .iter()
            .map(|s| vec![0u64; s.pages().div_ceil(64) as usize])
            .collect();
        BitmapTracker {
            vm,
            slots,
            marks,
            bufs,
            logging,
        }
    }

    fn shape(&self) -> Vec<(u64, u64)> {
        self.slots.iter().map(|s| (s.guest_addr, s.size)).collect()
    }

    /// Harvests KVM's bits of every slot into `set`, re-protecting them.
    fn harvest_kvm(&mut self, set: &mut DirtySet) -> Result<()> {
        if !self.logging {
            return Ok(());
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let buf = &mut self.bufs[i];
            kvm::get_dirty_log(&self.vm, slot.slot, buf)?;
            let Some(first) = buf.iter().position(|&w| w != 0) else {
                continue;
            };
            let last = buf.iter().rposition(|&w| w != 0).unwrap_or(first);
            let first_page = first as u64 * 64;
            let end_page = ((last as u64 + 1) * 64).min(slot.pages());
            kvm::clear_dirty_log(
                &self.vm,
                slot.slot,
                first_page,
                (end_page - first_page) as u32,
                &buf[first..=last],
            )?;
            if let Some(r) = set.regions_mut().get_mut(i) {
                let words = r.words_mut();
                for (w, b) in words[first..=last].iter_mut().zip(&buf[first..=last]) {
                    *w |= *b;
                }
            }
        }
        Ok(())
    }
}

impl DirtyTracker for BitmapTracker {
    fn backend(&self) -> Backend {
        Backend::Bitmap
    }

    fn start(&mut self) -> Result<()> {
        if !self.logging {
            for s in &self.slots {
                kvm::set_slot_logging(&self.vm, s, true)?;
            }
            self.logging = true;
        }
        let mut scratch = DirtySet::new(&self.shape());
        self.harvest_kvm(&mut scratch)?;
        self.marks.discard();
        Ok(())
    }

    fn harvest_into(&mut self, set: &mut DirtySet) -> Result<()> {
        self.harvest_kvm(set)?;
        self.marks.drain_into(set);
        Ok(())
    }

    fn empty_set(&self) -> DirtySet {
        DirtySet::new(&self.shape())
    }

    fn stop(&mut self) -> Result<()> {
        if self.logging {
            for s in &self.slots {
                kvm::set_slot_logging(&self.vm, s, false)?;
            }
            self.logging = false;
        }
        Ok(())
    }
}
