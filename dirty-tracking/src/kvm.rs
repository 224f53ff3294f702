//! The raw KVM pieces kvm-ioctls 0.25 does not wrap: KVM_GET_DIRTY_LOG into a
//! reused buffer, KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS, capability
//! probing and enabling.

use crate::{Error, Result};
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, kvm_userspace_memory_region,
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// The ioctl numbers (the macros generate `pub fn`s, kept private here).
#[allow(missing_docs)]
mod nr {
    use super::*;
    const KVMIO: u32 = 0xAE;
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use nr::{KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

/// One KVM memory slot as the VMM registered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// KVM slot number (address space 0).
    pub slot: u32,
    /// First guest-physical address.
    pub guest_addr: u64,
    /// Size in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Host virtual address of the mapping backing it.
    pub host_addr: u64,
}

impl Slot {
    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size / crate::PAGE_SIZE
    }
}

/// What this host's KVM offers for dirty tracking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (needed by the bitmap backend).
    pub manual_protect: bool,
    /// Largest dirty ring in bytes (KVM_CAP_DIRTY_LOG_RING_ACQ_REL or
    /// KVM_CAP_DIRTY_LOG_RING); 0 = no dirty ring.
    pub ring_max_bytes: u32,
    /// The ring is offered with acquire/release ordering (cap 223).
    pub ring_acq_rel: bool,
}

impl Capabilities {
    /// Asks KVM through the VM fd.
    pub fn probe(vm: &VmFd) -> Capabilities {
        let manual = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as _);
        let acq_rel = vm
            .check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL as _)
            .max(0) as u32;
        let plain = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING as _).max(0) as u32;
        Capabilities {
            manual_protect: manual as u32 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0,
            ring_max_bytes: if acq_rel > 0 { acq_rel } else { plain },
            ring_acq_rel: acq_rel > 0,
        }
    }

    /// Largest ring in entries (16 bytes each).
    pub fn ring_max_entries(&self) -> u32 {
        self.ring_max_bytes / std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>() as u32
    }
}

fn last_os_error(op: &'static str) -> Error {
    Error::Kvm {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Enables KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (without INITIALLY_SET).
pub(crate) fn enable_manual_protect(vm: &VmFd) -> Result<()> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64;
    vm.enable_cap(&cap).map_err(|e| Error::Kvm {
        op: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

/// Enables the dirty ring of `bytes` per vCPU (ACQ_REL flavour when offered).
pub(crate) fn enable_ring(vm: &VmFd, caps: &Capabilities, bytes: u32) -> Result<()> {
    let mut cap = kvm_enable_cap {
        cap: if caps.ring_acq_rel {
            KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        } else {
            KVM_CAP_DIRTY_LOG_RING
        },
        ..Default::default()
    };
    cap.args[0] = bytes as u64;
    vm.enable_cap(&cap).map_err(|e| Error::Kvm {
        op: "KVM_ENABLE_CAP(DIRTY_LOG_RING)",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

/// KVM_GET_DIRTY_LOG of `slot` into `buf` (at least `ceil(pages / 64)` words).
pub(crate) fn get_dirty_log(vm: &VmFd, slot: u32, buf: &mut [u64]) -> Result<()> {
    let mut log = kvm_dirty_log {
        slot,
        ..Default::default()
    };
    log.__bindgen_anon_1.dirty_bitmap = buf.as_mut_ptr().cast();
    // SAFETY: `log` points at `buf`, which holds one bit per page of the slot
    // rounded up to 64 bits (the size KVM writes), and outlives the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if ret < 0 {
        return Err(last_os_error("KVM_GET_DIRTY_LOG"));
    }
    Ok(())
}

/// KVM_CLEAR_DIRTY_LOG of pages `[first_page, first_page + num_pages)` of
/// `slot`, with `bits` holding one bit per page starting at `first_page`
/// (`first_page` must be a multiple of 64; `num_pages` too unless the range
/// ends at the slot's end).
pub(crate) fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bits: &[u64],
) -> Result<()> {
    debug_assert_eq!(first_page % 64, 0);
    debug_assert!(bits.len() as u64 * 64 >= num_pages as u64);
    let mut clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    clear.__bindgen_anon_1.dirty_bitmap = bits.as_ptr() as *mut libc::c_void;
    // SAFETY: KVM only reads ceil(num_pages / 64) words from `bits`, which is
    // at least that long and outlives the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret < 0 {
        return Err(last_os_error("KVM_CLEAR_DIRTY_LOG"));
    }
    Ok(())
}

/// KVM_RESET_DIRTY_RINGS: KVM collects the entries marked RESET in every
/// vCPU's ring and write-protects their pages again. Returns how many.
pub(crate) fn reset_dirty_rings(vm: &VmFd) -> Result<u32> {
    // Signals stay blocked during the reset: kernels that abandon a reset
    // when a signal is pending (our vCPU threads get pause kicks) were seen
    // here to leave a harvested page writable, so its next write was never
    // logged. A signal sent meanwhile is delivered when the mask is restored.
    let _blocked = SignalsBlocked::new();
    loop {
        // SAFETY: an argument-less ioctl on a VM fd we hold.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
        if ret >= 0 {
            return Ok(ret as u32);
        }
        let err = std::io::Error::last_os_error();
        // Recent kernels stop a reset when a signal is pending (our vCPU
        // threads get pause kicks); what was reset stays reset: go on.
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(Error::Kvm {
                op: "KVM_RESET_DIRTY_RINGS",
                source: err,
            });
        }
    }
}

/// Blocks every signal on this thread until dropped.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn new() -> Self {
        // SAFETY: plain libc calls on sigset_t values owned here; a zeroed
        // sigset_t is a valid argument for sigfillset / as an out-parameter.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            SignalsBlocked(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Re-registers `slot` with dirty logging on or off (same mapping).
pub(crate) fn set_slot_logging(vm: &VmFd, slot: &Slot, on: bool) -> Result<()> {
    let region = kvm_userspace_memory_region {
        slot: slot.slot,
        flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: slot.guest_addr,
        memory_size: slot.size,
        userspace_addr: slot.host_addr,
    };
    // SAFETY: only the flags change: the slot keeps the mapping the VMM
    // registered, which the tracker keeps alive (it holds a clone of the guest
    // memory) for as long as it can call this.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| Error::Kvm {
        op: "KVM_SET_USER_MEMORY_REGION(dirty logging)",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn ioctl_numbers() {
        assert_eq!(super::KVM_GET_DIRTY_LOG(), 0x4010_AE42);
        assert_eq!(super::KVM_CLEAR_DIRTY_LOG(), 0xC018_AEC0);
        assert_eq!(super::KVM_RESET_DIRTY_RINGS(), 0xAEC7);
    }
}
