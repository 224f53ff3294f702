//! The VM's state as plain serde data, separate from the live objects.
//!
//! `VmState` is everything needed, with a copy of guest memory, to bring a
//! paused VM back to life in another VM of the same shape. It is produced by
//! [`crate::Vm::capture_state`] and consumed by [`crate::Vm::restore_state`],
//! the mirror of capture.
//!
//! KVM's ordering rules, which capture and restore follow (as Firecracker's
//! `vstate/vcpu.rs` does):
//! * capture MP_STATE first (it flushes pending events into the state) and
//!   VCPU_EVENTS last;
//! * restore CPUID first, REGS before VCPU_EVENTS, SREGS before LAPIC (the
//!   APIC base MSR lives in SREGS), LAPIC before MSRs (TSC_DEADLINE needs the
//!   LAPIC mode) and IA32_TSC before IA32_TSC_DEADLINE (MSRs are kept sorted by
//!   index, and 0x10 < 0x6e0).

use crate::memory::MemoryRegionSpec;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::{Deserialize, Serialize};

/// Version of the state layout; bumped on any incompatible change.
pub const STATE_VERSION: u32 = 1;

/// The shape a state belongs to; restoring into another shape is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory layout.
    pub memory: Vec<MemoryRegionSpec>,
}

impl VmShape {
    /// The first guest-physical address past every memory region: the
    /// memory size of a VM whose memory starts at 0, as Castor's does.
    pub fn memory_end(&self) -> u64 {
        self.memory
            .iter()
            .map(|r| r.guest_addr + r.size)
            .max()
            .unwrap_or(0)
    }
}

/// One vCPU's architectural state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u32,
    /// CPUID table in effect.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state (captured first).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// XSAVE area (KVM_GET_XSAVE2 where available), as 32-bit words.
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists and can read, sorted by index.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs (captured last).
    pub vcpu_events: kvm_vcpu_events,
}

/// The state of the in-kernel devices and the VM clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmDevicesState {
    /// PIC master (irqchip 0).
    pub pic_master: kvm_irqchip,
    /// PIC slave (irqchip 1).
    pub pic_slave: kvm_irqchip,
    /// IOAPIC (irqchip 2).
    pub ioapic: kvm_irqchip,
    /// i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// The legacy platform of a Linux guest (COM1's registers); `None` for
    /// the built-in guest. Interrupt routing is KVM's default (GSI n = IOAPIC
    /// pin n), and the LAPIC timer, PIT and kvmclock are in the other fields
    /// and the vCPUs' LAPIC and MSRs.
    #[serde(default)]
    pub legacy: Option<crate::linux::SerialState>,
}

/// Everything about a paused VM except the content of its memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// [`STATE_VERSION`] at capture.
    pub version: u32,
    /// The shape of the VM it was captured from.
    pub shape: VmShape,
    /// VM-wide device state.
    pub vm: VmDevicesState,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The MMIO devices (virtio transport + device state), in bus slot order.
    pub devices: Vec<crate::devices::DeviceState>,
}
