//! Polling virtio-mmio drivers' common half: device initialisation through
//! the MMIO registers (each access one exit, so only at setup and for kicks)
//! and split virtqueues in guest memory, used without interrupts: the driver
//! polls the used ring's index.

use crate::rt::{pv_read32, pv_write32};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG: u64 = 0x100;

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// Bytes reserved for one queue: descriptor table, avail ring, used ring, 4 KiB each.
pub const QUEUE_AREA: u64 = 0x4000;

/// A split virtqueue of `size` entries laid out at `base`.
pub struct Virtq {
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Next avail-ring index we publish.
    avail_idx: u16,
    /// Next used-ring index we consume.
    last_used: u16,
}

impl Virtq {
    pub fn new(base: u64, size: u16) -> Self {
        let q = Virtq {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            last_used: 0,
        };
        // Clear the rings (memory may hold a previous run's content).
        for off in (0..QUEUE_AREA).step_by(8) {
            // SAFETY: the queue area is RAM reserved for this queue.
            unsafe { write_volatile((base + off) as *mut u64, 0) };
        }
        q
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * i as u64;
        // SAFETY: `i < size`, inside the descriptor table in RAM.
        unsafe {
            write_volatile(d as *mut u64, addr);
            write_volatile((d + 8) as *mut u32, len);
            write_volatile((d + 12) as *mut u16, flags);
            write_volatile((d + 14) as *mut u16, next);
        }
    }

    /// Sets descriptor `i`'s length only.
    pub fn set_desc_len(&mut self, i: u16, len: u32) {
        // SAFETY: as set_desc.
        unsafe { write_volatile((self.desc + 16 * i as u64 + 8) as *mut u32, len) };
    }

    /// Puts chain head `head` in the available ring (published at once).
    pub fn push_avail(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
        // SAFETY: inside the avail ring.
        unsafe { write_volatile(slot as *mut u16, head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::Release);
        // SAFETY: the avail ring's idx field.
        unsafe { write_volatile((self.avail + 2) as *mut u16, self.avail_idx) };
    }

    /// The next used entry (descriptor id, bytes written), if any.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: the used ring's idx field, written by the device.
        let idx = unsafe { read_volatile((self.used + 2) as *const u16) };
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * (self.last_used % self.size) as u64;
        // SAFETY: inside the used ring.
        let (id, len) = unsafe {
            (
                read_volatile(e as *const u32),
                read_volatile((e + 4) as *const u32),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        // Tell the device how far we consumed (used_event: notification suppression).
        // SAFETY: used_event follows the avail ring's `size` entries.
        unsafe {
            write_volatile(
                (self.avail + 4 + 2 * self.size as u64) as *mut u16,
                self.last_used,
            )
        };
        Some(((id as u16) % self.size, len))
    }
}

/// A virtio-mmio device window.
pub struct Mmio {
    pub base: u64,
}

impl Mmio {
    pub fn read(&self, reg: u64) -> u32 {
        pv_read32(self.base + reg)
    }

    pub fn write(&self, reg: u64, v: u32) {
        pv_write32(self.base + reg, v)
    }

    pub fn notify(&self, queue: u32) {
        self.write(REG_QUEUE_NOTIFY, queue);
    }

    /// Initialises the device: checks it, negotiates `wanted` features (must
    /// include VERSION_1), sets up `queues` (index, queue), then DRIVER_OK.
    pub fn init(&self, device_id: u32, wanted: u64, queues: &[(u32, &Virtq)]) -> u64 {
        if self.read(REG_MAGIC) != 0x7472_6976 || self.read(REG_VERSION) != 2 {
            panic!("no virtio-mmio v2 device at {:#x}", self.base);
        }
        if self.read(REG_DEVICE_ID) != device_id {
            panic!(
                "device at {:#x} is not virtio type {}",
                self.base, device_id
            );
        }
        self.write(REG_STATUS, 0);
        self.write(REG_STATUS, S_ACK);
        self.write(REG_STATUS, S_ACK | S_DRIVER);
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let lo = self.read(REG_DEVICE_FEATURES) as u64;
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let hi = self.read(REG_DEVICE_FEATURES) as u64;
        let features = ((hi << 32) | lo) & wanted;
        if features & F_VERSION_1 == 0 {
            panic!("virtio device at {:#x} is not a 1.x device", self.base);
        }
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, features as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (features >> 32) as u32);
        self.write(REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if self.read(REG_STATUS) & S_FEATURES_OK == 0 {
            panic!(
                "virtio device at {:#x} refused features {:#x}",
                self.base, features
            );
        }
        for (idx, q) in queues {
            self.write(REG_QUEUE_SEL, *idx);
            let max = self.read(REG_QUEUE_NUM_MAX);
            if max < q.size as u32 {
                panic!(
                    "queue {} of {:#x}: max {} < {}",
                    idx, self.base, max, q.size
                );
            }
            self.write(REG_QUEUE_NUM, q.size as u32);
            self.write(REG_QUEUE_DESC_LOW, q.desc as u32);
            self.write(REG_QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
            self.write(REG_QUEUE_DRIVER_LOW, q.avail as u32);
            self.write(REG_QUEUE_DRIVER_HIGH, (q.avail >> 32) as u32);
            self.write(REG_QUEUE_DEVICE_LOW, q.used as u32);
            self.write(REG_QUEUE_DEVICE_HIGH, (q.used >> 32) as u32);
            self.write(REG_QUEUE_READY, 1);
        }
        self.write(REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        if self.read(REG_STATUS) & 0x40 != 0 {
            panic!(
                "virtio device at {:#x} needs reset after DRIVER_OK",
                self.base
            );
        }
        features
    }
}
