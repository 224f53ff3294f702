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
pub use virtio::blk_track::{
    DiskDirty, DiskTrackError, DiskTracker, LoggedBlocks, DISK_BLOCK, LOG_CAP,
};
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
    /// No device in that slot.
    #[error("no device in slot {slot} (the bus has {devices})")]
    NoSuchSlot {
        /// The slot asked for.
        slot: usize,
        /// Devices on the bus.
        devices: usize,
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
    /// Per slot, the interrupt a Linux guest's driver waits for (an irqfd);
    /// none for the built-in guest, which polls.
    irqs: RwLock<Vec<Option<Arc<vmm_sys_util::eventfd::EventFd>>>>,
    /// The write log of the first virtio-blk device (a protected disk).
    disk: RwLock<Option<Arc<DiskTracker>>>,
}

impl DeviceBus {
    /// An empty bus over `mem`.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        DeviceBus {
            mem,
            slots: RwLock::new(Vec::new()),
            irqs: RwLock::new(Vec::new()),
            disk: RwLock::new(None),
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
        let tracker = blk.tracker();
        let addr = self.add(VirtioMmio::new(Box::new(blk)))?;
        let mut disk = self.disk.write().unwrap_or_else(|e| e.into_inner());
        if disk.is_none() {
            *disk = tracker;
        }
        Ok(addr)
    }

    /// The write log of the VM's (first) virtio-blk disk: what disk
    /// replication harvests at each pause.
    pub fn disk(&self) -> Option<Arc<DiskTracker>> {
        self.disk.read().unwrap_or_else(|e| e.into_inner()).clone()
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

    /// The virtio type of each device, in slot order.
    pub fn device_types(&self) -> Vec<u32> {
        self.slots().iter().map(|d| lock(d).device_type()).collect()
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
                let mut d = lock(&dev);
                let before = interrupt_status(&mut d, &self.mem);
                d.write(&self.mem, off, data);
                self.raise_on_new_interrupt(addr, before, &mut d);
                true
            }
            None => false,
        }
    }

    /// What the device in `slot` is (for the Hello manifest).
    pub fn identity(&self, slot: usize) -> Option<castor_parts::PartIdentity> {
        self.slots().get(slot).map(|d| lock(d).identity())
    }

    fn with_slot<R>(
        &self,
        slot: usize,
        f: impl FnOnce(&mut VirtioMmio) -> R,
    ) -> Result<R, DeviceError> {
        let slots = self.slots();
        let dev = slots.get(slot).ok_or(DeviceError::NoSuchSlot {
            slot,
            devices: slots.len(),
        })?;
        let mut guard = lock(dev);
        let r = f(&mut guard);
        Ok(r)
    }

    /// Captures the state of the device in `slot`. Call with the vCPUs paused.
    pub fn capture_slot(&self, slot: usize) -> Result<DeviceState, DeviceError> {
        self.with_slot(slot, |d| d.capture())
    }

    /// Checks, applying nothing, that `state` can be restored into `slot`
    /// (same device, valid queues: virtio-queue's `TryFrom<QueueState>`).
    pub fn check_slot(&self, slot: usize, state: &DeviceState) -> Result<(), DeviceError> {
        self.with_slot(slot, |d| d.check(state).map(|_| ()))?
    }

    /// Restores `state` into the device in `slot`. Call with the vCPUs paused.
    pub fn restore_slot(&self, slot: usize, state: &DeviceState) -> Result<(), DeviceError> {
        self.with_slot(slot, |d| d.restore(state))?
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

impl DeviceBus {
    /// Raises `evt` whenever the device in `slot` sets its InterruptStatus
    /// (used buffers), as a Linux guest's virtio-mmio driver expects.
    pub fn set_interrupt(&self, slot: usize, evt: Arc<vmm_sys_util::eventfd::EventFd>) {
        let mut irqs = self.irqs.write().unwrap_or_else(|e| e.into_inner());
        if irqs.len() <= slot {
            irqs.resize(slot + 1, None);
        }
        irqs[slot] = Some(evt);
    }

    fn raise_on_new_interrupt(&self, addr: u64, before: u32, dev: &mut VirtioMmio) {
        let Some(slot) = addr
            .checked_sub(pv::DEVICES_BASE)
            .and_then(|o| usize::try_from(o / WINDOW_SIZE).ok())
        else {
            return;
        };
        let evt = match self
            .irqs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(slot)
        {
            Some(Some(evt)) => evt.clone(),
            _ => return,
        };
        if before == 0 && interrupt_status(dev, &self.mem) != 0 {
            if let Err(e) = evt.write(1) {
                log::warn!("virtio-mmio slot {slot}: raising the interrupt: {e}");
            }
        }
    }

    /// Processes every device that has an interrupt as a queue notification
    /// would, so input (frames on a tap) reaches an interrupt-driven guest
    /// without waiting for a kick, and raises the interrupts of those that
    /// completed work. Call only while the vCPUs run: a paused VM's devices
    /// must stay quiescent.
    pub fn poll(&self) {
        let irqs = self.irqs.read().unwrap_or_else(|e| e.into_inner()).clone();
        let slots = self.slots();
        for (i, dev) in slots.iter().enumerate() {
            if !matches!(irqs.get(i), Some(Some(_))) {
                continue;
            }
            let mut d = lock(dev);
            if d.status() & virtio::status::DRIVER_OK == 0 {
                continue;
            }
            let before = interrupt_status(&mut d, &self.mem);
            d.write(
                &self.mem,
                virtio::mmio::reg::QUEUE_NOTIFY,
                &0u32.to_le_bytes(),
            );
            if before == 0 && interrupt_status(&mut d, &self.mem) != 0 {
                if let Some(Some(evt)) = irqs.get(i) {
                    if let Err(e) = evt.write(1) {
                        log::warn!("virtio-mmio slot {i}: raising the interrupt: {e}");
                    }
                }
            }
        }
    }
}

fn interrupt_status(dev: &mut VirtioMmio, mem: &GuestMemoryMmap) -> u32 {
    let mut b = [0u8; 4];
    dev.read(mem, virtio::mmio::reg::INTERRUPT_STATUS, &mut b);
    u32::from_le_bytes(b)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
