//! Castor's VMM: a KVM virtual machine that runs the built-in ring-3 guest,
//! pauses and resumes it at any instant, and captures and restores its
//! complete state.
//!
//! The VMM knows nothing of replication: it exposes pause/resume, guest
//! memory (with the VMM-side dirty bitmap), the VM fd for dirty logging, and
//! state capture/restore; the replicator drives it.
//!
//! ```no_run
//! use castor_vmm::{Vm, VmConfig, GuestBoot, Workload, DirtierParams, NullSink};
//! use std::sync::Arc;
//! let vm = Vm::new(&VmConfig { vcpus: 1, mem_bytes: 64 << 20, ..VmConfig::default() }, Arc::new(NullSink))?;
//! vm.boot(&GuestBoot { workload: Workload::Dirtier(DirtierParams::default()), seed: 1 })?;
//! vm.resume();
//! vm.pause();
//! let state = vm.capture_state()?;
//! let memory = vm.read_memory()?;
//! let twin = Vm::new(&VmConfig { vcpus: 1, mem_bytes: 64 << 20, ..VmConfig::default() }, Arc::new(NullSink))?;
//! twin.write_memory(&memory)?;
//! twin.restore_state(&state)?;
//! twin.resume();
//! # Ok::<(), castor_vmm::Error>(())
//! ```
#![deny(missing_docs)]

pub mod arch;
pub mod devices;
mod error;
mod exits;
pub mod guest;
pub mod host;
pub mod linux;
pub mod loader;
pub mod memory;
pub mod parts;
pub mod state;
mod vcpu;
mod vm;

pub use castor_dirty_tracking::{
    AlwaysDirtyId, Backend as DirtyBackend, DirtyMarks, DirtySet, DirtyTracking, PageRun,
};
pub use castor_guest_abi::Record;
pub use error::{Error, Result};
pub use exits::{Emit, NullSink, OutputSink, StopReason};
pub use guest::{parse_size, DirtierParams, DiskParams, GuestBoot, NetParams, Pattern, Workload};
pub use linux::{Console, EmulationFailure, LinuxBoot, LinuxBootReport};
pub use memory::{GuestMemoryMmap, MemoryRegionSpec};
pub use state::{VcpuState, VmShape, VmState};
pub use vcpu::VcpuRunState;
pub use vm::{Vm, VmConfig, MAX_VCPUS};
