//! Who a part is: its typed identity on the wire and in the Hello manifest.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The kind of state a part holds. The numbers are wire values (never reuse
/// one); a VM lists its parts in restore order (VM-wide devices, then MMIO
/// devices, then vCPUs, then the output buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[repr(u16)]
pub enum PartKind {
    /// The VM-wide in-kernel devices and clock (PIC, IOAPIC, PIT, kvmclock).
    KvmVm = 1,
    /// One MMIO device (virtio transport and backend), by bus slot.
    Mmio = 2,
    /// One vCPU's architectural state, by index.
    Vcpu = 3,
    /// The output buffer: held output of every sealed, unacknowledged epoch
    /// and the next sequence number.
    Output = 4,
    /// Legacy platform devices of a Linux guest (serial console).
    Legacy = 5,
}

impl PartKind {
    /// The kind for a wire value.
    pub fn from_u16(v: u16) -> Option<PartKind> {
        Some(match v {
            1 => PartKind::KvmVm,
            2 => PartKind::Mmio,
            3 => PartKind::Vcpu,
            4 => PartKind::Output,
            5 => PartKind::Legacy,
            _ => return None,
        })
    }

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    fn name(self) -> &'static str {
        match self {
            PartKind::KvmVm => "kvm-vm",
            PartKind::Mmio => "mmio",
            PartKind::Vcpu => "vcpu",
            PartKind::Output => "output",
            PartKind::Legacy => "legacy",
        }
    }
}

/// A part's identity within one VM: its kind and instance (vCPU index, bus
/// slot; 0 for singletons).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PartId {
    /// What kind of state.
    pub kind: PartKind,
    /// Which one.
    pub instance: u32,
}

impl PartId {
    /// The part `instance` of `kind`.
    pub const fn new(kind: PartKind, instance: u32) -> Self {
        PartId { kind, instance }
    }
}

impl fmt::Display for PartId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.kind.name(), self.instance)
    }
}

/// An inclusive range of format versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

impl VersionRange {
    /// `min..=max`.
    pub const fn new(min: u16, max: u16) -> Self {
        VersionRange { min, max }
    }

    /// Exactly one version.
    pub const fn only(v: u16) -> Self {
        VersionRange { min: v, max: v }
    }

    /// Whether `v` is in the range.
    pub fn contains(&self, v: u16) -> bool {
        (self.min..=self.max).contains(&v)
    }

    /// The newest version both ranges contain, if any.
    pub fn common_max(&self, other: &VersionRange) -> Option<u16> {
        let hi = self.max.min(other.max);
        (hi >= self.min.max(other.min)).then_some(hi)
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.min)
        } else {
            write!(f, "versions {} to {}", self.min, self.max)
        }
    }
}

/// What a part is, as far as the other side must agree before it may hold a
/// replica of it: the kind of device and what makes it the same device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartIdentity {
    /// A vCPU.
    Vcpu,
    /// The VM-wide in-kernel devices.
    KvmVm,
    /// A virtio-net device with this MAC.
    VirtioNet {
        /// The guest's MAC address.
        mac: [u8; 6],
    },
    /// A virtio-blk device over an image of this size.
    VirtioBlk {
        /// Image capacity in bytes.
        capacity_bytes: u64,
        /// Whether the guest sees it read-only.
        read_only: bool,
    },
    /// Another virtio device type (by virtio device id).
    Virtio {
        /// The virtio device id.
        device_type: u32,
    },
    /// The output buffer.
    Output,
    /// The 16550 serial console of a Linux guest.
    Serial,
}

impl fmt::Display for PartIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartIdentity::Vcpu => f.write_str("vCPU"),
            PartIdentity::KvmVm => f.write_str("in-kernel devices"),
            PartIdentity::VirtioNet { mac } => write!(
                f,
                "virtio-net with MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
            ),
            PartIdentity::VirtioBlk {
                capacity_bytes,
                read_only,
            } => write!(
                f,
                "virtio-blk of {capacity_bytes} bytes{}",
                if *read_only { " (read-only)" } else { "" }
            ),
            PartIdentity::Virtio { device_type } => write!(f, "virtio device type {device_type}"),
            PartIdentity::Output => f.write_str("output buffer"),
            PartIdentity::Serial => f.write_str("serial console"),
        }
    }
}

/// A part as announced in the Hello manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartDescriptor {
    /// Kind and instance.
    pub id: PartId,
    /// The device it is.
    pub identity: PartIdentity,
    /// The section format versions it writes (primary) or reads (backup).
    pub versions: VersionRange,
}
