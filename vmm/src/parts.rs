//! The VM's replicated state as parts (see `castor_parts`): the VM walks its
//! pieces, as Cloud Hypervisor's device manager walks its device tree, and
//! hands the replicator one [`Part`] each, in restore order:
//!
//! 1. the VM-wide in-kernel devices and the clock ([`KvmVmPart`]), first:
//!    the LAPICs restore into the irqchip;
//! 2. each MMIO device, by bus slot ([`MmioPart`]);
//! 3. each vCPU ([`VcpuPart`]), KVM's ordering rules inside (see `state.rs`).
//!
//! Each part's section is its serde state in postcard, format version
//! [`SECTION_VERSION`]; `check` decodes and validates it against this VM
//! without touching it (the vCPU's XSAVE size and MSRs, the device's kind and
//! queues), `restore` applies it to the paused VM.

use crate::devices::DeviceState;
use crate::state::{VcpuState, VmDevicesState};
use crate::Vm;
use castor_parts::{
    decode_section, encode_section, Checked, Part, PartDescriptor, PartError, PartId, PartIdentity,
    PartKind, PartSet, Staged, VersionRange,
};
use serde::Serialize;
use std::sync::Arc;

/// Format version of the VM's sections (vCPU, KVM VM, MMIO device states).
pub const SECTION_VERSION: u16 = 1;

/// Section versions the VM's parts read.
pub const SECTION_VERSIONS: VersionRange = VersionRange::only(SECTION_VERSION);

/// The parts of `vm`, in restore order.
pub fn vm_parts(vm: &Arc<Vm>) -> PartSet {
    let mut set = PartSet::new();
    set.push(Arc::new(KvmVmPart { vm: vm.clone() }));
    for slot in 0..vm.devices().len() {
        set.push(Arc::new(MmioPart {
            vm: vm.clone(),
            slot,
        }));
    }
    for index in 0..vm.vcpu_count() {
        set.push(Arc::new(VcpuPart {
            vm: vm.clone(),
            index,
        }));
    }
    set
}

/// A staged serde state, encoded after resume.
struct StagedState<T> {
    id: PartId,
    state: T,
}

impl<T: Serialize + Send> Staged for StagedState<T> {
    fn version(&self) -> u16 {
        SECTION_VERSION
    }
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), PartError> {
        encode_section(self.id, &self.state, out)
    }
}

fn version_ok(id: PartId, version: u16) -> Result<(), PartError> {
    if SECTION_VERSIONS.contains(version) {
        Ok(())
    } else {
        Err(PartError::UnsupportedVersion {
            id,
            version,
            accepted: SECTION_VERSIONS,
        })
    }
}

fn capture(id: PartId) -> impl FnOnce(crate::Error) -> PartError {
    move |e| PartError::Capture {
        id,
        source: Box::new(e),
    }
}

fn invalid<E: std::error::Error + Send + Sync + 'static>(
    id: PartId,
) -> impl FnOnce(E) -> PartError {
    move |e| PartError::Invalid {
        id,
        source: Box::new(e),
    }
}

fn restore_err<E: std::error::Error + Send + Sync + 'static>(
    id: PartId,
) -> impl FnOnce(E) -> PartError {
    move |e| PartError::Restore {
        id,
        source: Box::new(e),
    }
}

/// The PIC, IOAPIC, PIT and kvmclock of a VM.
pub struct KvmVmPart {
    vm: Arc<Vm>,
}

impl KvmVmPart {
    const ID: PartId = PartId::new(PartKind::KvmVm, 0);
}

impl Part for KvmVmPart {
    fn id(&self) -> PartId {
        Self::ID
    }
    fn descriptor(&self) -> PartDescriptor {
        PartDescriptor {
            id: Self::ID,
            identity: PartIdentity::KvmVm,
            versions: SECTION_VERSIONS,
        }
    }
    fn stage(&self) -> Result<Box<dyn Staged>, PartError> {
        let state = self
            .vm
            .capture_vm_devices_state()
            .map_err(capture(Self::ID))?;
        Ok(Box::new(StagedState {
            id: Self::ID,
            state,
        }))
    }
    fn check(&self, version: u16, data: &[u8]) -> Result<Checked, PartError> {
        version_ok(Self::ID, version)?;
        let s: VmDevicesState = decode_section(Self::ID, version, data)?;
        Ok(Checked::new(Self::ID, version, s))
    }
    fn restore(&self, state: &Checked) -> Result<(), PartError> {
        let s: &VmDevicesState = state.get(Self::ID)?;
        self.vm
            .restore_vm_devices_state(s)
            .map_err(restore_err(Self::ID))
    }
}

/// One virtio-mmio device, by bus slot.
pub struct MmioPart {
    vm: Arc<Vm>,
    slot: usize,
}

impl MmioPart {
    fn part_id(&self) -> PartId {
        PartId::new(PartKind::Mmio, self.slot as u32)
    }
}

impl Part for MmioPart {
    // Without this the default would build the descriptor (locking the
    // device for its identity) every time the pause stages the part.
    fn id(&self) -> PartId {
        self.part_id()
    }
    fn descriptor(&self) -> PartDescriptor {
        PartDescriptor {
            id: self.part_id(),
            identity: self
                .vm
                .devices()
                .identity(self.slot)
                .unwrap_or(PartIdentity::Virtio { device_type: 0 }),
            versions: SECTION_VERSIONS,
        }
    }
    fn stage(&self) -> Result<Box<dyn Staged>, PartError> {
        let id = self.part_id();
        let state = self
            .vm
            .devices()
            .capture_slot(self.slot)
            .map_err(|e| PartError::Capture {
                id,
                source: Box::new(e),
            })?;
        Ok(Box::new(StagedState { id, state }))
    }
    fn check(&self, version: u16, data: &[u8]) -> Result<Checked, PartError> {
        let id = self.part_id();
        version_ok(id, version)?;
        let s: DeviceState = decode_section(id, version, data)?;
        self.vm
            .devices()
            .check_slot(self.slot, &s)
            .map_err(invalid(id))?;
        Ok(Checked::new(id, version, s))
    }
    fn restore(&self, state: &Checked) -> Result<(), PartError> {
        let id = self.part_id();
        let s: &DeviceState = state.get(id)?;
        self.vm
            .devices()
            .restore_slot(self.slot, s)
            .map_err(restore_err(id))
    }
}

/// One vCPU's architectural state.
pub struct VcpuPart {
    vm: Arc<Vm>,
    index: u32,
}

impl VcpuPart {
    fn part_id(&self) -> PartId {
        PartId::new(PartKind::Vcpu, self.index)
    }
}

impl Part for VcpuPart {
    fn id(&self) -> PartId {
        self.part_id()
    }
    fn descriptor(&self) -> PartDescriptor {
        PartDescriptor {
            id: self.part_id(),
            identity: PartIdentity::Vcpu,
            versions: SECTION_VERSIONS,
        }
    }
    fn stage(&self) -> Result<Box<dyn Staged>, PartError> {
        let id = self.part_id();
        let state = self
            .vm
            .capture_vcpu_state(self.index)
            .map_err(capture(id))?;
        Ok(Box::new(StagedState { id, state }))
    }
    fn check(&self, version: u16, data: &[u8]) -> Result<Checked, PartError> {
        let id = self.part_id();
        version_ok(id, version)?;
        let s: VcpuState = decode_section(id, version, data)?;
        self.vm
            .check_vcpu_state(self.index, &s)
            .map_err(invalid(id))?;
        Ok(Checked::new(id, version, s))
    }
    fn restore(&self, state: &Checked) -> Result<(), PartError> {
        let id = self.part_id();
        let s: &VcpuState = state.get(id)?;
        self.vm
            .restore_vcpu_state(self.index, s)
            .map_err(restore_err(id))
    }
}
