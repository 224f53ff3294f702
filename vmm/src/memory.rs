//! Guest memory: one anonymous mapping, one KVM memory slot, tracked by
//! vm-memory's `AtomicBitmap` so every write the VMM makes through `Bytes`
//! marks its page dirty.

use crate::error::{Error, Result};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory with the VMM-side dirty bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Smallest guest Castor runs: 16 MiB.
pub const MIN_MEM_BYTES: u64 = 16 << 20;
/// Largest guest Castor runs: 16 GiB.
pub const MAX_MEM_BYTES: u64 = 16 << 30;

/// One contiguous range of guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryRegionSpec {
    /// First guest-physical address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
}

/// Creates guest memory of `size` bytes at guest address 0.
pub fn create(size: u64) -> Result<GuestMemoryMmap> {
    if !(MIN_MEM_BYTES..=MAX_MEM_BYTES).contains(&size) {
        return Err(Error::InvalidConfig(format!(
            "memory size {} MiB is out of range: use 16 MiB to 16 GiB",
            size >> 20
        )));
    }
    if !size.is_multiple_of(2 << 20) {
        return Err(Error::InvalidConfig(format!(
            "memory size {size} bytes is not a multiple of 2 MiB"
        )));
    }
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|e| Error::Memory(format!("cannot map {} MiB: {e}", size >> 20)))
}

/// The layout of `mem` as plain data.
pub fn layout_of(mem: &GuestMemoryMmap) -> Vec<MemoryRegionSpec> {
    mem.iter()
        .map(|r| MemoryRegionSpec {
            guest_addr: r.start_addr().0,
            size: r.len(),
        })
        .collect()
}
