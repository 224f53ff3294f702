//! Devices the VMM emulates for the built-in guest, on a small MMIO bus.
//!
//! Every device owns one 4 KiB window starting at [`pv::DEVICES_BASE`]
//! (`castor_guest_abi::pv::DEVICES_BASE`): slot `i` is at
//! `DEVICES_BASE + i * 0x1000`. The vCPU exit handler forwards MMIO exits in
//! that range to [`DeviceBus::read`] / [`DeviceBus::write`]; devices know
//! nothing else of the VM loop (Firecracker's `devices/virtio` is the model).
//!
//! All device activity happens inside vCPU exits (the guest polls: see
//! [`virtio::net`] for why there is no RX thread), so once the vCPUs are
//! paused the devices are quiescent and [`DeviceBus::capture`] is consistent
//! with guest memory. Device state is plain serde data ([`DeviceState`]);
//! [`DeviceBus::restore`] is the mirror of capture, into a bus of the same
//! devices (same kinds, same order) built by the restoring side.

pub mod tap;
pub mod virtio;

use crate::memory::GuestMemoryMmap;
use castor_guest_abi::pv;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use virtio::mmio::{VirtioMmio, VirtioMmioState};

pub use tap::{Tap, TapError};
pub use virtio::blk::{BlkConfig, VirtioBlk};
pub use virtio::net::{NetConfig, TapTxSink, TxOutcome, TxSink, VirtioNet};

/// Size of one device's MMIO window.
pub const WINDOW_SIZE: u64 = 0x1000;
/// Most devices the bus holds (the MMIO window is 64 KiB of the 4 GiB hole).
pub const MAX_DEVICES: usize = 16;

/// Errors of device setup, capture and restore (never of guest input: a
/// malformed request gets a device error status, not a VMM error).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The tap device could not be set up.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The disk image could not be opened or sized.
    #[error("disk image {path}: {source}")]
    DiskImage {
        /// The image path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The bus is full.
    #[error("no room for another device (at most {MAX_DEVICES})")]
    BusFull,
    /// A captured device state does not fit this bus.
    #[error("device state does not fit: {0}")]
    StateMismatch(String),
    /// A virtqueue in a captured state is invalid.
    #[error("virtqueue state: {0}")]
    Queue(String),
}

/// Captured state of one device on the bus.
pub type DeviceState = VirtioMmioState;

/// The MMIO device bus of one VM.
pub struct DeviceBus {
    mem: GuestMemoryMmap,
    slots: RwLock<Vec<Arc<Mutex<VirtioMmio>>>>,
}

impl DeviceBus {
    /// An empty bus over `mem`.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        DeviceBus {
            mem,
            slots: RwLock::new(Vec::new()),
        }
    }

    fn slots(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Mutex<VirtioMmio>>>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, dev: VirtioMmio) -> Result<u64, DeviceError> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if slots.len() >= MAX_DEVICES {
            return Err(DeviceError::BusFull);
        }
        let addr = pv::DEVICES_BASE + slots.len() as u64 * WINDOW_SIZE;
        slots.push(Arc::new(Mutex::new(dev)));
        Ok(addr)
    }

    /// Adds a virtio-blk device; returns the guest-physical base of its window.
    pub fn add_virtio_blk(&self, blk: VirtioBlk) -> Result<u64, DeviceError> {
        self.add(VirtioMmio::new(Box::new(blk)))
    }

    /// Adds a virtio-net device; returns the guest-physical base of its window.
    pub fn add_virtio_net(&self, net: VirtioNet) -> Result<u64, DeviceError> {
        self.add(VirtioMmio::new(Box::new(net)))
    }

    /// Base of the first device of the given virtio type, if any.
    pub fn find(&self, device_type: u32) -> Option<u64> {
        self.slots()
            .iter()
            .position(|d| lock(d).device_type() == device_type)
            .map(|i| pv::DEVICES_BASE + i as u64 * WINDOW_SIZE)
    }

    /// Number of devices on the bus.
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    /// Whether the bus has no device.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, addr: u64) -> Option<(Arc<Mutex<VirtioMmio>>, u64)> {
        let off = addr.checked_sub(pv::DEVICES_BASE)?;
        let idx = usize::try_from(off / WINDOW_SIZE).ok()?;
        let dev = self.slots().get(idx)?.clone();
        Some((dev, off % WINDOW_SIZE))
    }

    /// An MMIO read at `addr`; `false` if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.slot(addr) {
            Some((dev, off)) => {
                lock(&dev).read(&self.mem, off, data);
                true
            }
            None => false,
        }
    }

    /// An MMIO write at `addr`; `false` if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.slot(addr) {
            Some((dev, off)) => {
                lock(&dev).write(&self.mem, off, data);
                true
            }
            None => false,
        }
    }

    /// Captures every device's state, in slot order. Call with the vCPUs paused.
    pub fn capture(&self) -> Vec<DeviceState> {
        self.slots().iter().map(|d| lock(d).capture()).collect()
    }

    /// Restores states captured by [`DeviceBus::capture`] into this bus, which
    /// must hold the same kinds of devices in the same order.
    pub fn restore(&self, states: &[DeviceState]) -> Result<(), DeviceError> {
        let slots = self.slots();
        if slots.len() != states.len() {
            return Err(DeviceError::StateMismatch(format!(
                "the state has {} devices, this VM has {}",
                states.len(),
                slots.len()
            )));
        }
        for (d, s) in slots.iter().zip(states) {
            lock(d).restore(s)?;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
