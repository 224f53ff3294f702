//! virtio 1.x devices over the MMIO transport ([`mmio`]), with split
//! virtqueues from the `virtio-queue` crate.

pub mod blk;
pub mod blk_track;
pub mod mmio;
pub mod net;

use super::DeviceError;
use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

/// virtio device type of a network card.
pub const TYPE_NET: u32 = 1;
/// virtio device type of a block device.
pub const TYPE_BLOCK: u32 = 2;

/// Feature bit: the device conforms to virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;
/// Feature bit: `used_event` / `avail_event` notification suppression.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// What a device reports after processing a queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Processed {
    /// Descriptor chains completed (put in the used ring).
    pub used: u32,
    /// The queue is broken (its rings are not in guest memory): the
    /// transport sets DEVICE_NEEDS_RESET.
    pub broken: bool,
}

/// The device-specific half of a virtio device; [`mmio::VirtioMmio`] is the
/// transport half.
pub trait VirtioDevice: Send {
    /// virtio device type ([`TYPE_NET`], [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Number of virtqueues.
    fn queue_count(&self) -> usize;
    /// Reads the device configuration space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The guest notified queue `idx` (a poll, for a polling guest): do the work.
    fn process(&mut self, idx: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Processed;
    /// The device-specific state, for capture.
    fn capture(&self) -> BackendState;
    /// What device this is (for the Hello manifest).
    fn identity(&self) -> castor_parts::PartIdentity;
    /// Checks a captured device-specific state against this device, taking nothing.
    fn check(&self, s: &BackendState) -> Result<(), DeviceError>;
    /// Checks a captured device-specific state against this device and takes it.
    fn restore(&mut self, s: &BackendState) -> Result<(), DeviceError>;
}

/// Device-specific captured state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendState {
    /// virtio-blk: the capacity the guest saw (the backing file is the
    /// restoring side's; it must hold the same data).
    Blk {
        /// Capacity in 512-byte sectors.
        capacity_sectors: u64,
    },
    /// virtio-net: the MAC the guest saw (the tap is handed over or reopened
    /// by the restoring side).
    Net {
        /// MAC address.
        mac: [u8; 6],
    },
}

/// Reads `data.len()` bytes at `offset` of `config`, zero past its end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
