//! The virtio-mmio transport, version 2 ("modern", virtio 1.x section 4.2.2).
//!
//! Register reads and writes arrive as MMIO exits. The guest takes no
//! interrupts: `InterruptStatus` is kept for the spec's sake but no IRQ is
//! ever injected; the guest polls the used rings. With
//! `VIRTIO_F_RING_EVENT_IDX` negotiated the device publishes `avail_event`
//! after each batch, so a driver that honours it only notifies when there is
//! new work.

use super::{status, BackendState, VirtioDevice, F_RING_EVENT_IDX};
use crate::devices::DeviceError;
use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern transport.
pub const VERSION: u32 = 2;
/// Our vendor id ("CSTR").
pub const VENDOR_ID: u32 = 0x5254_5343;
/// Largest queue the devices offer.
pub const QUEUE_MAX: u16 = 256;

/// Register offsets.
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// One virtqueue's captured state (a serde mirror of `virtio_queue::QueueState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
    /// EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// The captured state of one virtio-mmio device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    /// virtio device type.
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus (never signalled: the guest polls).
    pub interrupt_status: u32,
    /// The virtqueues.
    pub queues: Vec<QueueSnapshot>,
    /// Device-specific state.
    pub backend: BackendState,
}

/// A virtio device behind the MMIO transport.
pub struct VirtioMmio {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    interrupt_status: u32,
}

fn new_queues(n: usize) -> Vec<Queue> {
    // QUEUE_MAX is a power of two no larger than 32768: Queue::new cannot fail.
    (0..n).filter_map(|_| Queue::new(QUEUE_MAX).ok()).collect()
}

impl VirtioMmio {
    /// Puts `device` behind a fresh (reset) transport.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let queues = new_queues(device.queue_count());
        VirtioMmio {
            device,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            interrupt_status: 0,
        }
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn reset(&mut self) {
        self.queues = new_queues(self.device.queue_count());
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queues may be configured only before DRIVER_OK.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Handles a read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, _mem: &GuestMemoryMmap, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| q.max_size() as u32),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| q.ready() as u32),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// Handles a write of `data` at `offset` in the window.
    pub fn write(&mut self, mem: &GuestMemoryMmap, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            // Read-only configuration spaces: ignore.
            return;
        }
        let mut w = [0u8; 4];
        let n = data.len().min(4);
        w[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(w);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                // Only while negotiating; only what the device offers.
                if self.status & status::FEATURES_OK == 0 {
                    let offered = self.device.avail_features();
                    match self.driver_features_sel {
                        0 => {
                            self.acked_features =
                                (self.acked_features & !0xffff_ffff) | (v as u64 & offered)
                        }
                        1 => {
                            self.acked_features =
                                (self.acked_features & 0xffff_ffff) | (((v as u64) << 32) & offered)
                        }
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                let event_idx = self.acked_features & F_RING_EVENT_IDX != 0;
                if let Some(q) = self.selected_queue() {
                    q.set_event_idx(event_idx);
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(Some(v), None);
                }
            }
            reg::QUEUE_DESC_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(None, Some(v));
                }
            }
            reg::QUEUE_DRIVER_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(Some(v), None);
                }
            }
            reg::QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(None, Some(v));
                }
            }
            reg::QUEUE_DEVICE_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(Some(v), None);
                }
            }
            reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(None, Some(v));
                }
            }
            reg::QUEUE_NOTIFY => self.notify(mem, v as usize),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.set_status(mem, v),
            _ => log::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }

    fn set_status(&mut self, mem: &GuestMemoryMmap, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            // Modern devices need VERSION_1.
            if self.acked_features & super::F_VERSION_1 == 0 {
                v &= !status::FEATURES_OK;
            }
        }
        if v & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0 {
            let bad = self.queues.iter().any(|q| q.ready() && !q.is_valid(mem));
            if bad {
                v |= status::DEVICE_NEEDS_RESET;
            }
        }
        // The driver only sets bits (DEVICE_NEEDS_RESET is the device's).
        self.status = (self.status & status::DEVICE_NEEDS_RESET) | v;
    }

    fn notify(&mut self, mem: &GuestMemoryMmap, idx: usize) {
        if self.status & status::DRIVER_OK == 0
            || self.status & status::DEVICE_NEEDS_RESET != 0
            || idx >= self.queues.len()
        {
            return;
        }
        let p = self.device.process(idx, &mut self.queues, mem);
        if p.broken {
            self.status |= status::DEVICE_NEEDS_RESET;
        }
        if p.used > 0 {
            self.interrupt_status |= 1;
        }
    }

    /// The transport and device state.
    pub fn capture(&self) -> VirtioMmioState {
        VirtioMmioState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt_status,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            backend: self.device.capture(),
        }
    }

    /// What device this is (for the Hello manifest).
    pub fn identity(&self) -> castor_parts::PartIdentity {
        self.device.identity()
    }

    /// The mirror of [`VirtioMmio::capture`].
    pub fn restore(&mut self, s: &VirtioMmioState) -> Result<(), DeviceError> {
        let queues = self.check(s)?;
        self.device.restore(&s.backend)?;
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.interrupt_status = s.interrupt_status;
        Ok(())
    }

    /// Validates a captured state against this device, applying nothing:
    /// returns the queues it would become (virtio-queue's `TryFrom<QueueState>`
    /// checks each ready queue).
    pub fn check(&self, s: &VirtioMmioState) -> Result<Vec<Queue>, DeviceError> {
        if s.device_type != self.device.device_type() {
            return Err(DeviceError::StateMismatch(format!(
                "device type {} in the state, {} here",
                s.device_type,
                self.device.device_type()
            )));
        }
        if s.queues.len() != self.device.queue_count() {
            return Err(DeviceError::StateMismatch(format!(
                "{} queues in the state, {} here",
                s.queues.len(),
                self.device.queue_count()
            )));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for q in &s.queues {
            let state: QueueState = (*q).into();
            // A queue never configured has size 0... keep it as reset.
            let queue = if q.size == 0 || !q.ready {
                let mut fresh =
                    Queue::new(q.max_size).map_err(|e| DeviceError::Queue(e.to_string()))?;
                fresh.set_next_avail(q.next_avail);
                fresh.set_next_used(q.next_used);
                fresh.set_event_idx(q.event_idx_enabled);
                fresh.set_size(q.size);
                fresh.set_desc_table_address(
                    Some(q.desc_table as u32),
                    Some((q.desc_table >> 32) as u32),
                );
                fresh.set_avail_ring_address(
                    Some(q.avail_ring as u32),
                    Some((q.avail_ring >> 32) as u32),
                );
                fresh.set_used_ring_address(
                    Some(q.used_ring as u32),
                    Some((q.used_ring >> 32) as u32),
                );
                fresh
            } else {
                Queue::try_from(state).map_err(|e| DeviceError::Queue(e.to_string()))?
            };
            queues.push(queue);
        }
        self.device.check(&s.backend)?;
        Ok(queues)
    }
}
