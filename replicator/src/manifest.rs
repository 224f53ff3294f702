//! The Hello manifest: what a primary's VM is and needs, announced before
//! any page moves, so that a backup that could not restore it refuses at
//! pairing, while the primary is alive and can be told, never at takeover.
//!
//! The primary announces the VM shape (memory regions, vCPUs), every part
//! with its identity and section versions, and what the state needs of the
//! host (XSAVE size, MSRs, TSC frequency, CPUID features). The backup
//! validates the shape as untrusted input (regions sorted, non-overlapping,
//! page-aligned, no wrap, within limits), builds its replica VM from its own
//! configuration, and compares part by part; a mismatch is a typed error
//! whose message names the field and what to change in which config file.

use castor_parts::{PartDescriptor, PartId, PartIdentity, PartSet, VersionRange};
use castor_vmm::host::{HostMismatch, HostNeeds};
use castor_vmm::state::VmShape;
use castor_vmm::{MemoryRegionSpec, Vm};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most memory regions a manifest may list.
pub const MAX_REGIONS: usize = 64;
/// Most guest memory a manifest may describe (the VMM's limit).
pub const MAX_MEMORY_BYTES: u64 = 16 << 30;
/// Most parts a manifest may list.
pub const MAX_PARTS: usize = 256;
/// Most bytes an encoded manifest may take.
pub const MAX_MANIFEST_BYTES: usize = 64 << 10;
const PAGE: u64 = 4096;

/// One guest memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
}

/// What the primary's VM is and needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory regions, ascending.
    pub memory: Vec<Region>,
    /// Every part, in restore order.
    pub parts: Vec<PartDescriptor>,
    /// What the state needs of a host.
    pub host: HostNeeds,
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The manifest bytes did not decode.
    #[error("the manifest does not decode: {0}")]
    Decode(postcard::Error),
    /// The encoded manifest is too large.
    #[error("the manifest takes {len} bytes (at most {MAX_MANIFEST_BYTES})")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// vCPU count out of range.
    #[error("{vcpus} vCPUs announced (1 to {max})")]
    Vcpus {
        /// Announced.
        vcpus: u32,
        /// Most allowed.
        max: u32,
    },
    /// Region count out of range.
    #[error("{count} memory regions announced (1 to {MAX_REGIONS})")]
    RegionCount {
        /// Announced.
        count: usize,
    },
    /// A region is empty, unaligned or wraps the address space.
    #[error("memory region {index} ({addr:#x} + {size:#x}) is empty, not page-aligned or wraps")]
    BadRegion {
        /// Its index.
        index: usize,
        /// Start.
        addr: u64,
        /// Size.
        size: u64,
    },
    /// Regions out of order or overlapping.
    #[error("memory region {index} starts at {addr:#x}, inside or before the one before it")]
    Overlap {
        /// Its index.
        index: usize,
        /// Its start.
        addr: u64,
    },
    /// More memory than a VM may have.
    #[error("{bytes} bytes of guest memory announced (at most {MAX_MEMORY_BYTES})")]
    MemoryTooLarge {
        /// Announced.
        bytes: u64,
    },
    /// Too many parts.
    #[error("{count} parts announced (at most {MAX_PARTS})")]
    PartCount {
        /// Announced.
        count: usize,
    },
    /// A part listed twice.
    #[error("part {id} is listed twice")]
    DuplicatePart {
        /// The part.
        id: PartId,
    },
    /// The replica VM built for this shape has another memory layout.
    #[error("this backup builds a VM with memory {backup:?} for the primary's {primary:?}")]
    Layout {
        /// The primary's.
        primary: Vec<Region>,
        /// This backup's.
        backup: Vec<Region>,
    },
    /// The primary has a part this backup is not configured for.
    #[error("the primary's guest has {identity} ({id}); this backup has no such device: {hint}")]
    MissingPart {
        /// The part.
        id: PartId,
        /// What it is.
        identity: PartIdentity,
        /// What to change.
        hint: String,
    },
    /// This backup has a part the primary lacks.
    #[error("this backup is configured with {identity} ({id}), which the primary's guest does not have: remove it from the backup's config (backup.toml) or add it to the primary's")]
    ExtraPart {
        /// The part.
        id: PartId,
        /// What it is.
        identity: PartIdentity,
    },
    /// The same part is another device on each side.
    #[error("{id}: the primary's guest has {primary}, this backup {backup}: {hint}")]
    Identity {
        /// The part.
        id: PartId,
        /// The primary's.
        primary: PartIdentity,
        /// This backup's.
        backup: PartIdentity,
        /// What to change.
        hint: String,
    },
    /// No section version both sides speak.
    #[error("{id}: the primary writes section {primary}, this backup reads {backup}: upgrade the older host")]
    Versions {
        /// The part.
        id: PartId,
        /// The primary's.
        primary: VersionRange,
        /// This backup's.
        backup: VersionRange,
    },
    /// This host cannot run the primary's state.
    #[error(transparent)]
    Host(#[from] HostMismatch),
}

fn hint_for(identity: &PartIdentity) -> String {
    match identity {
        PartIdentity::VirtioNet { mac } => format!(
            "add a [net] section to the backup's config (backup.toml) with this host's tap and mac = \"{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}\"",
            mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
        ),
        PartIdentity::VirtioBlk { capacity_bytes, .. } => format!(
            "add a [disk] section to the backup's config (backup.toml) naming an image of exactly {capacity_bytes} bytes (create it with `truncate -s {capacity_bytes} IMAGE`, or let the backup create a sparse one: create = \"{capacity_bytes}\" under [disk])"
        ),
        other => format!("configure the backup with the same {other} as the primary"),
    }
}

impl Manifest {
    /// The manifest of `vm` with `parts`.
    pub fn of(vm: &Vm, parts: &PartSet) -> Manifest {
        let shape = vm.shape();
        Manifest {
            vcpus: shape.vcpus,
            memory: shape
                .memory
                .iter()
                .map(|r| Region {
                    guest_addr: r.guest_addr,
                    size: r.size,
                })
                .collect(),
            parts: parts.descriptors(),
            host: vm.host_needs(),
        }
    }

    /// Encodes for the Hello frame.
    pub fn encode(&self) -> Result<Vec<u8>, ManifestError> {
        let v = postcard::to_allocvec(self).map_err(ManifestError::Decode)?;
        if v.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { len: v.len() });
        }
        Ok(v)
    }

    /// Decodes untrusted bytes and validates the shape (nothing is built yet).
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { len: bytes.len() });
        }
        let (m, rest): (Manifest, _) =
            postcard::take_from_bytes(bytes).map_err(ManifestError::Decode)?;
        if !rest.is_empty() {
            return Err(ManifestError::Decode(
                postcard::Error::DeserializeBadEncoding,
            ));
        }
        m.validate()?;
        Ok(m)
    }

    /// Checks the shape and part list as untrusted input.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let max = castor_vmm::MAX_VCPUS;
        if self.vcpus == 0 || self.vcpus > max {
            return Err(ManifestError::Vcpus {
                vcpus: self.vcpus,
                max,
            });
        }
        if self.memory.is_empty() || self.memory.len() > MAX_REGIONS {
            return Err(ManifestError::RegionCount {
                count: self.memory.len(),
            });
        }
        let mut total: u64 = 0;
        let mut end_prev: Option<u64> = None;
        for (index, r) in self.memory.iter().enumerate() {
            let end = r.guest_addr.checked_add(r.size);
            if r.size == 0 || r.guest_addr % PAGE != 0 || r.size % PAGE != 0 || end.is_none() {
                return Err(ManifestError::BadRegion {
                    index,
                    addr: r.guest_addr,
                    size: r.size,
                });
            }
            if end_prev.is_some_and(|e| r.guest_addr < e) {
                return Err(ManifestError::Overlap {
                    index,
                    addr: r.guest_addr,
                });
            }
            end_prev = end;
            total = total.saturating_add(r.size);
        }
        if total > MAX_MEMORY_BYTES || end_prev.is_some_and(|e| e > MAX_MEMORY_BYTES * 4) {
            return Err(ManifestError::MemoryTooLarge { bytes: total });
        }
        if self.parts.len() > MAX_PARTS {
            return Err(ManifestError::PartCount {
                count: self.parts.len(),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.parts {
            if !seen.insert(p.id) {
                return Err(ManifestError::DuplicatePart { id: p.id });
            }
        }
        Ok(())
    }

    /// The VM shape a backup builds its replica for.
    pub fn shape(&self) -> VmShape {
        VmShape {
            vcpus: self.vcpus,
            memory: self
                .memory
                .iter()
                .map(|r| MemoryRegionSpec {
                    guest_addr: r.guest_addr,
                    size: r.size,
                })
                .collect(),
        }
    }

    /// Compares with the replica `vm` and its `parts`, built from the
    /// backup's own configuration: every part present on both sides, the
    /// same device, a section version in common, a host that can run it.
    /// Returns, for each part, the section version the primary will write.
    pub fn check_against(
        &self,
        vm: &Vm,
        parts: &PartSet,
    ) -> Result<BTreeMap<PartId, u16>, ManifestError> {
        let backup_layout: Vec<Region> = vm
            .shape()
            .memory
            .iter()
            .map(|r| Region {
                guest_addr: r.guest_addr,
                size: r.size,
            })
            .collect();
        if backup_layout != self.memory || vm.vcpu_count() != self.vcpus {
            return Err(ManifestError::Layout {
                primary: self.memory.clone(),
                backup: backup_layout,
            });
        }
        let mut versions = BTreeMap::new();
        for p in &self.parts {
            let Some(mine) = parts.get(p.id) else {
                return Err(ManifestError::MissingPart {
                    id: p.id,
                    identity: p.identity.clone(),
                    hint: hint_for(&p.identity),
                });
            };
            let d = mine.descriptor();
            if d.identity != p.identity {
                let hint = match &p.identity {
                    PartIdentity::VirtioBlk { capacity_bytes, .. } => format!(
                        "the backup's image ([disk] path in backup.toml) must be exactly {capacity_bytes} bytes, like the primary's: resize it with `truncate -s {capacity_bytes} IMAGE`, or remove it and set create = \"{capacity_bytes}\" under [disk] (the initial synchronisation then copies the primary's content)"
                    ),
                    other => hint_for(other),
                };
                return Err(ManifestError::Identity {
                    id: p.id,
                    primary: p.identity.clone(),
                    backup: d.identity,
                    hint,
                });
            }
            let v = d
                .versions
                .common_max(&p.versions)
                .ok_or(ManifestError::Versions {
                    id: p.id,
                    primary: p.versions,
                    backup: d.versions,
                })?;
            versions.insert(p.id, v);
        }
        if let Some(extra) = parts
            .iter()
            .map(|p| p.descriptor())
            .find(|d| !self.parts.iter().any(|p| p.id == d.id))
        {
            return Err(ManifestError::ExtraPart {
                id: extra.id,
                identity: extra.identity,
            });
        }
        vm.check_host_needs(&self.host).map_err(|e| match e {
            castor_vmm::Error::HostMismatch(h) => ManifestError::Host(h),
            other => ManifestError::Host(HostMismatch::Msr {
                index: {
                    log::error!("host check: {other}");
                    0
                },
            }),
        })?;
        Ok(versions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use castor_parts::{PartKind, VersionRange};

    fn manifest(memory: Vec<Region>) -> Manifest {
        Manifest {
            vcpus: 1,
            memory,
            parts: vec![PartDescriptor {
                id: PartId::new(PartKind::Vcpu, 0),
                identity: PartIdentity::Vcpu,
                versions: VersionRange::only(1),
            }],
            host: HostNeeds {
                xsave_words: 1024,
                msrs: vec![],
                tsc_khz: 1,
                cpuid: vec![],
            },
        }
    }

    fn r(guest_addr: u64, size: u64) -> Region {
        Region { guest_addr, size }
    }

    #[test]
    fn good_shape_round_trips() {
        let m = manifest(vec![r(0, 64 << 20), r(4 << 30, 1 << 30)]);
        let bytes = m.encode().unwrap();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn bad_shapes_are_refused() {
        for (bad, what) in [
            (vec![], "no region"),
            (vec![r(0, 0)], "empty"),
            (vec![r(1, 4096)], "unaligned start"),
            (vec![r(0, 4095)], "unaligned size"),
            (vec![r(u64::MAX - 4095, 8192)], "wraps"),
            (vec![r(0, 8192), r(4096, 4096)], "overlap"),
            (vec![r(8192, 4096), r(0, 4096)], "unsorted"),
            (vec![r(0, 32 << 30)], "too large"),
        ] {
            assert!(
                Manifest::decode(&manifest(bad).encode().unwrap()).is_err(),
                "{what} accepted"
            );
        }
        let mut m = manifest(vec![r(0, 1 << 20)]);
        m.vcpus = 0;
        assert!(matches!(m.validate(), Err(ManifestError::Vcpus { .. })));
        let mut m = manifest(vec![r(0, 1 << 20)]);
        m.parts.push(m.parts[0].clone());
        assert!(matches!(
            m.validate(),
            Err(ManifestError::DuplicatePart { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for len in 0..2000 {
            let b: Vec<u8> = (0..len % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = Manifest::decode(&b);
        }
    }
}
