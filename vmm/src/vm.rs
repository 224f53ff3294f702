//! The live VM: KVM VM and vCPU fds, guest memory, vCPU threads.

use crate::arch;
use crate::error::{Error, Result};
use crate::exits::{GuestPorts, OutputSink};
use crate::guest::{GuestBoot, Workload, GUEST_IMAGE};
use crate::linux::{self, Console, LinuxBoot, LinuxBootReport};
use crate::loader;
use crate::memory::{self, GuestMemoryMmap};
use crate::state::{VcpuState, VmDevicesState, VmShape, VmState, STATE_VERSION};
use crate::vcpu::{self, Ctl, ImmediateExit, Shared, VcpuRunState};
use castor_dirty_tracking::{
    AlwaysDirtyId, Backend, DirtyMarks, DirtySet, DirtyTracker, DirtyTracking, Slot,
};
use castor_guest_abi::{layout, workload, BootInfo, BOOT_MAGIC, BOOT_VERSION};
use kvm_bindings::{
    kvm_irqchip, kvm_mp_state, kvm_msr_entry, kvm_pit_config, kvm_userspace_memory_region, CpuId,
    Msrs, Xsave, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Most vCPUs a Castor VM has.
pub const MAX_VCPUS: u32 = layout::MAX_VCPUS as u32;

/// MSRs KVM lists but refuses to set back (KVM_SET_MSRS stops at the first).
const UNRESTORABLE_MSRS: &[u32] = &[
    0x4b56_4d06, // MSR_KVM_ASYNC_PF_ACK
];

/// The shape of a VM to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs, 1 to 8.
    pub vcpus: u32,
    /// Guest memory in bytes, 16 MiB to 16 GiB, a multiple of 2 MiB.
    pub mem_bytes: u64,
    /// Dirty tracking of guest memory (fixed at creation: the dirty ring must
    /// be enabled before the vCPUs exist). Default: none.
    pub dirty_tracking: DirtyTracking,
    /// Dirty-ring entries per vCPU (ring backend); 0 = the default (65536,
    /// capped at what KVM offers).
    pub dirty_ring_entries: u32,
}

impl Default for VmConfig {
    /// 1 vCPU, 256 MiB, no dirty tracking.
    fn default() -> Self {
        VmConfig {
            vcpus: 1,
            mem_bytes: 256 << 20,
            dirty_tracking: DirtyTracking::None,
            dirty_ring_entries: 0,
        }
    }
}

impl VmConfig {
    /// Checks the shape; the error says what to fix.
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::InvalidConfig(format!(
                "{} vCPUs requested: use 1 to {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if !(memory::MIN_MEM_BYTES..=memory::MAX_MEM_BYTES).contains(&self.mem_bytes) {
            return Err(Error::InvalidConfig(format!(
                "memory of {} MiB requested: use 16M to 16G",
                self.mem_bytes >> 20
            )));
        }
        if !self.mem_bytes.is_multiple_of(2 << 20) {
            return Err(Error::InvalidConfig(format!(
                "memory of {} bytes is not a multiple of 2 MiB",
                self.mem_bytes
            )));
        }
        Ok(())
    }
}

struct VcpuHandle {
    fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
}

/// A KVM virtual machine with its vCPU threads.
///
/// A new VM starts paused. [`Vm::boot`] (or [`Vm::restore_state`] plus a
/// memory copy) gives it something to run; [`Vm::resume`] lets it go;
/// [`Vm::pause`] stops every vCPU out of `KVM_RUN` so the state can be
/// captured with [`Vm::capture_state`].
pub struct Vm {
    _kvm: Kvm,
    fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    config: VmConfig,
    vcpus: Vec<VcpuHandle>,
    shared: Arc<Shared>,
    msr_indices: Vec<u32>,
    xsave2_words: usize,
    tsc_khz: u32,
    /// KVM_GET_SUPPORTED_CPUID of this host (what a restored guest may use).
    supported_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    devices: Arc<crate::devices::DeviceBus>,
    /// A Linux guest's legacy platform (COM1); off for the built-in guest.
    platform: Arc<linux::serial::Platform>,
    /// The dirty tracker (None when the config asked for none).
    dirty: Option<Mutex<Box<dyn DirtyTracker>>>,
    /// VMM-side dirty marks (raw-pointer writes, always-dirty ranges).
    marks: DirtyMarks,
    /// The ring backend's shared part (ring-full exits), if the ring is in use.
    dirty_ring: Option<Arc<castor_dirty_tracking::RingShared>>,
}

impl Vm {
    /// Creates a paused VM of the given shape. `sink` receives the guest's output.
    pub fn new(config: &VmConfig, sink: Arc<dyn OutputSink>) -> Result<Vm> {
        config.validate()?;
        let kvm = Kvm::new().map_err(Error::KvmUnavailable)?;
        let fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::Xcrs, "KVM_CAP_XCRS"),
            (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCapability(name));
            }
        }
        fd.set_tss_address(0xfffb_d000)
            .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;
        // Before memslots and vCPUs: the dirty ring must exist before any vCPU.
        let dirty_prep = castor_dirty_tracking::prepare_vm(
            &fd,
            config.dirty_tracking,
            config.dirty_ring_entries,
        )?;

        let mem = memory::create(config.mem_bytes)?;
        let marks = DirtyMarks::new(&mem);
        let mut slots = Vec::new();
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| Error::Memory(format!("host address of region {slot}: {e}")))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: dirty_prep.map(|p| p.memslot_flags()).unwrap_or(0),
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            slots.push(Slot {
                slot: slot as u32,
                guest_addr: region.start_addr().0,
                size: region.len(),
                host_addr: host as u64,
            });
            // SAFETY: the region is a live mapping owned by `mem`, which the Vm keeps
            // for as long as the VM fd exists (fields drop after the vCPU threads).
            unsafe { fd.set_user_memory_region(r) }
                .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let xsave2_bytes = fd.check_extension_int(Cap::Xsave2).max(0) as usize;
        let xsave2_words = xsave2_bytes.div_ceil(4);
        let fd = Arc::new(fd);

        let mut fds = Vec::new();
        for id in 0..config.vcpus {
            let vcpu = fd
                .create_vcpu(id as u64)
                .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&arch::cpuid_for(&supported, id, config.vcpus))
                .map_err(Error::kvm("KVM_SET_CPUID2"))?;
            fds.push(Arc::new(Mutex::new(vcpu)));
        }
        let (msr_indices, tsc_khz) = {
            let v0 = lock_fd(&fds[0]);
            let msrs = restorable_msrs(&kvm, &v0)?;
            let khz = v0.get_tsc_khz().map_err(Error::kvm("KVM_GET_TSC_KHZ"))?;
            (msrs, khz)
        };

        let (dirty, ring) = match dirty_prep {
            Some(p) => {
                let raw: Vec<std::os::fd::RawFd> =
                    fds.iter().map(|f| lock_fd(f).as_raw_fd()).collect();
                let built = p.build(fd.clone(), slots, marks.clone(), &raw)?;
                (Some(Mutex::new(built.tracker)), built.ring)
            }
            None => (None, None),
        };

        vcpu::install_kick_handler().map_err(Error::Thread)?;
        let n = config.vcpus as usize;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                pause: true,
                quit: false,
                runnable: vec![false; n],
                states: vec![VcpuRunState::Paused; n],
            }),
            resume_cv: Condvar::new(),
            waiting_cv: Condvar::new(),
            waiting: AtomicUsize::new(0),
            exits: fds.iter().map(ImmediateExit::new).collect(),
        });
        let devices = Arc::new(crate::devices::DeviceBus::new(mem.clone()));
        let platform = Arc::new(linux::serial::Platform::new());
        let handler: Arc<dyn vcpu::ExitHandler> = Arc::new(GuestPorts {
            mem: mem.clone(),
            sink,
            devices: devices.clone(),
            platform: platform.clone(),
        });
        let mut vcpus = Vec::new();
        for (id, vfd) in fds.into_iter().enumerate() {
            let (f, s, h, r) = (vfd.clone(), shared.clone(), handler.clone(), ring.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::vcpu_loop(id as u32, f, s, h, r))
                .map_err(Error::Thread)?;
            vcpus.push(VcpuHandle {
                fd: vfd,
                thread: Some(thread),
            });
        }
        let vm = Vm {
            _kvm: kvm,
            fd,
            mem,
            config: config.clone(),
            vcpus,
            shared,
            msr_indices,
            xsave2_words,
            tsc_khz,
            supported_cpuid: supported.as_slice().to_vec(),
            devices,
            platform,
            dirty,
            marks,
            dirty_ring: ring,
        };
        vm.shared.wait_all_out(n);
        Ok(vm)
    }

    /// The VM's shape.
    pub fn shape(&self) -> VmShape {
        VmShape {
            vcpus: self.config.vcpus,
            memory: memory::layout_of(&self.mem),
        }
    }

    /// Guest memory (with the VMM-side dirty bitmap).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The MMIO device bus: add virtio devices here before `boot` or `restore_state`.
    pub fn devices(&self) -> &crate::devices::DeviceBus {
        &self.devices
    }

    /// The KVM VM fd, for dirty logging.
    pub fn vm_fd(&self) -> &VmFd {
        &self.fd
    }

    /// The dirty-tracking backend in use, if any.
    pub fn dirty_backend(&self) -> Option<Backend> {
        self.dirty.as_ref().map(|t| lock_tracker(t).backend())
    }

    fn tracker(&self) -> Result<MutexGuard<'_, Box<dyn DirtyTracker>>> {
        self.dirty
            .as_ref()
            .map(lock_tracker)
            .ok_or(Error::WrongState(
                "this VM was created without dirty tracking: set VmConfig::dirty_tracking",
            ))
    }

    /// How many `KVM_EXIT_DIRTY_RING_FULL` exits the vCPU threads have
    /// handled since the VM was created (each moved a full ring into the
    /// pending set of the next harvest); 0 unless the ring backend is in use.
    pub fn dirty_ring_full_exits(&self) -> u64 {
        self.dirty_ring.as_ref().map_or(0, |r| r.full_exits())
    }

    /// (Re)starts dirty tracking: everything dirtied so far is forgotten; the
    /// next [`Vm::harvest_dirty`] holds the pages written from now on. The VM
    /// must be paused. Tracking is on from creation; call this to set the
    /// baseline (e.g. right after the initial full copy).
    pub fn start_dirty_tracking(&self) -> Result<()> {
        self.require_paused("dirty")?;
        Ok(self.tracker()?.start()?)
    }

    /// Stops dirty logging (no more write-protection faults) until
    /// [`Vm::start_dirty_tracking`]. The VM must be paused.
    pub fn stop_dirty_tracking(&self) -> Result<()> {
        self.require_paused("dirty")?;
        Ok(self.tracker()?.stop()?)
    }

    /// The pages dirtied since the last harvest (or start), by the vCPUs and
    /// by the VMM, re-armed so the next write to each is seen again. The VM
    /// must be paused; copy the pages after this returns.
    pub fn harvest_dirty(&self) -> Result<DirtySet> {
        self.require_paused("dirty")?;
        Ok(self.tracker()?.harvest()?)
    }

    /// Like [`Vm::harvest_dirty`], adding the pages to `set` (from
    /// [`Vm::empty_dirty_set`]), so a caller can reuse one set across epochs.
    pub fn harvest_dirty_into(&self, set: &mut DirtySet) -> Result<()> {
        self.require_paused("dirty")?;
        Ok(self.tracker()?.harvest_into(set)?)
    }

    /// An empty dirty set shaped like guest memory.
    pub fn empty_dirty_set(&self) -> DirtySet {
        DirtySet::new(&self.marks.shape())
    }

    /// Reports that the VMM wrote `[gpa, gpa + len)` through a raw pointer
    /// (writes through vm-memory's `Bytes` are tracked already).
    pub fn mark_dirty(&self, gpa: u64, len: u64) {
        self.marks.mark_dirty(gpa, len);
    }

    /// Registers a range reported dirty at every harvest (e.g. virtqueue
    /// rings the devices write through raw pointers).
    pub fn add_always_dirty(&self, gpa: u64, len: u64) -> AlwaysDirtyId {
        self.marks.add_always_dirty(gpa, len)
    }

    /// Removes a range registered with [`Vm::add_always_dirty`].
    pub fn remove_always_dirty(&self, id: AlwaysDirtyId) -> bool {
        self.marks.remove_always_dirty(id)
    }

    /// A handle on the VMM-side dirty marks, for device threads.
    pub fn dirty_marks(&self) -> DirtyMarks {
        self.marks.clone()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.config.vcpus
    }

    /// The guest TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Where each vCPU is (running, paused, or stopped and why).
    pub fn vcpu_states(&self) -> Vec<VcpuRunState> {
        self.shared.lock().states.clone()
    }

    /// Whether the VM is paused (every vCPU out of `KVM_RUN`).
    pub fn is_paused(&self) -> bool {
        self.shared.lock().pause
    }

    /// Loads the built-in guest and its boot information, and points every
    /// vCPU at its entry in 64-bit CPL 3. The VM must be paused.
    pub fn boot(&self, boot: &GuestBoot) -> Result<()> {
        self.require_paused("boot")?;
        arch::write_system_tables(&self.mem)?;
        let entry = loader::load_elf(&self.mem, GUEST_IMAGE)?;
        let mut info = BootInfo {
            magic: BOOT_MAGIC,
            version: BOOT_VERSION,
            vcpu_count: self.config.vcpus,
            workload: 0,
            _reserved: 0,
            tsc_khz: self.tsc_khz as u64,
            seed: boot.seed,
            dirtier: Default::default(),
        };
        match &boot.workload {
            Workload::Dirtier(p) => {
                info.workload = workload::DIRTIER;
                info.dirtier = p.to_abi(self.config.vcpus, self.config.mem_bytes)?;
            }
            Workload::Net(p) => {
                info.workload = workload::NET;
                p.write_config(&self.mem, &self.devices)?;
            }
            Workload::Disk(p) => {
                info.workload = workload::DISK;
                p.write_config(&self.mem, &self.devices)?;
            }
        }
        self.mem
            .write_slice(&info.to_bytes(), GuestAddress(layout::BOOT_INFO_ADDR))
            .map_err(|e| Error::Memory(format!("writing boot info: {e}")))?;
        let zero_page = [0u8; layout::PAGE_SIZE as usize];
        for id in 0..self.config.vcpus as u64 {
            self.mem
                .write_slice(&zero_page, GuestAddress(layout::vcpu_page(id)))
                .map_err(|e| Error::Memory(format!("clearing vCPU page: {e}")))?;
        }
        for (id, v) in self.vcpus.iter().enumerate() {
            let fd = lock_fd(&v.fd);
            arch::setup_sregs(&fd)?;
            arch::setup_fpu(&fd, true)?;
            arch::setup_regs(&fd, entry, id as u64)?;
            // With the in-kernel LAPIC, vCPUs other than 0 start waiting for SIPI.
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
        }
        self.set_all_runnable();
        Ok(())
    }

    /// Boots a Linux kernel (see [`crate::linux`]): loads the kernel,
    /// initramfs and command line, writes the e820 map, ACPI tables (COM1 and
    /// the virtio devices already on the bus) and boot parameters, gives each
    /// vCPU the Linux CPUID, and points the boot vCPU at the kernel's entry.
    /// The VM must be fresh and paused; its output appears on [`Vm::console`].
    pub fn boot_linux(&self, boot: &LinuxBoot) -> Result<LinuxBootReport> {
        self.boot_linux_with(boot, linux::CpuidPolicy::Auto)
    }

    /// [`Vm::boot_linux`] with an explicit CPUID policy (e.g.
    /// [`linux::CpuidPolicy::Hardware`] on PVM, to see where the emulator stops).
    pub fn boot_linux_with(
        &self,
        boot: &LinuxBoot,
        cpuid: linux::CpuidPolicy,
    ) -> Result<LinuxBootReport> {
        self.require_paused("boot")?;
        let mut report = linux::boot::load(&self.mem, self.config.mem_bytes, boot)?;
        report.virtio = self.platform.connect_virtio(&self.fd, &self.devices)?;
        let decls: Vec<linux::acpi::VirtioDecl> = report
            .virtio
            .iter()
            .map(|&(base, gsi, _)| linux::acpi::VirtioDecl { base, gsi })
            .collect();
        linux::acpi::write_tables(&self.mem, self.config.vcpus, &decls)?;
        self.platform.activate(&self.fd, None)?;
        self.platform.start_poller(&self.shared, &self.devices)?;
        let pvm = cpuid.hides_pvm_features();
        for (id, v) in self.vcpus.iter().enumerate() {
            let fd = lock_fd(&v.fd);
            let base = fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(Error::kvm("KVM_GET_CPUID2"))?;
            fd.set_cpuid2(&linux::cpuid::for_linux(&base, pvm))
                .map_err(Error::kvm("KVM_SET_CPUID2"))?;
            if id == 0 {
                let actual = fd
                    .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map_err(Error::kvm("KVM_GET_CPUID2"))?;
                report.cpuid_kept = linux::cpuid::kept(&actual, linux::cpuid::ALWAYS_HIDDEN);
                if pvm {
                    report
                        .cpuid_kept
                        .extend(linux::cpuid::kept(&actual, linux::cpuid::PVM_HIDDEN));
                }
                if !report.cpuid_kept.is_empty() {
                    log::debug!(
                        "linux boot: KVM keeps CPUID features Castor hid: {}",
                        report.cpuid_kept.join(" ")
                    );
                }
            }
            linux::boot::setup_vcpu(&fd, id as u32, &report)?;
        }
        self.set_all_runnable();
        Ok(report)
    }

    /// The serial console of a Linux guest (COM1's output, line by line).
    pub fn console(&self) -> Console {
        self.platform.console()
    }

    /// Lets every runnable vCPU run.
    pub fn resume(&self) {
        let mut c = self.shared.lock();
        c.pause = false;
        self.shared.resume_cv.notify_all();
    }

    /// Stops every vCPU out of `KVM_RUN`; returns once all are out.
    pub fn pause(&self) {
        {
            let mut c = self.shared.lock();
            if c.pause {
                drop(c);
                self.shared.wait_all_out(self.vcpus.len());
                return;
            }
            c.pause = true;
            for e in &self.shared.exits {
                e.set(true);
            }
        }
        let sig = vcpu::kick_signal();
        for v in &self.vcpus {
            if let Some(t) = &v.thread {
                // SAFETY: the thread is alive (joined only in Drop) and the signal has a
                // no-op handler installed process-wide.
                unsafe { libc::pthread_kill(t.as_pthread_t(), sig) };
            }
        }
        self.shared.wait_all_out(self.vcpus.len());
    }

    fn require_paused(&self, what: &'static str) -> Result<()> {
        if !self.shared.lock().pause {
            return Err(Error::WrongState(match what {
                "boot" => "boot needs a paused VM",
                "capture" => "capture needs a paused VM: call pause() first",
                "dirty" => "dirty tracking needs a paused VM: call pause() first",
                _ => "restore needs a paused VM: call pause() first",
            }));
        }
        self.shared.wait_all_out(self.vcpus.len());
        Ok(())
    }

    fn set_all_runnable(&self) {
        let mut c = self.shared.lock();
        for (r, s) in c.runnable.iter_mut().zip(0..) {
            let _ = s;
            *r = true;
        }
        for s in c.states.iter_mut() {
            *s = VcpuRunState::Paused;
        }
    }

    /// Captures the complete state of the paused VM (all but memory content).
    pub fn capture_state(&self) -> Result<VmState> {
        self.require_paused("capture")?;
        let vm = self.capture_vm_devices()?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (id, v) in self.vcpus.iter().enumerate() {
            vcpus.push(self.capture_vcpu(id as u32, &lock_fd(&v.fd))?);
        }
        Ok(VmState {
            version: STATE_VERSION,
            shape: self.shape(),
            vm,
            vcpus,
            devices: self.devices.capture(),
        })
    }

    fn capture_vm_devices(&self) -> Result<VmDevicesState> {
        let chip = |id: u32| -> Result<kvm_irqchip> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(Error::kvm("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmDevicesState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(Error::kvm("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(Error::kvm("KVM_GET_CLOCK"))?,
            legacy: self.platform.capture(),
        })
    }

    fn capture_vcpu(&self, id: u32, fd: &VcpuFd) -> Result<VcpuState> {
        // MP_STATE first: it flushes pending APIC events into the state.
        let mp_state = fd.get_mp_state().map_err(Error::kvm("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        let xsave = self.get_xsave(fd)?;
        let xcrs = fd.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?;
        let debugregs = fd
            .get_debug_regs()
            .map_err(Error::kvm("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = self.get_msrs(fd)?;
        // VCPU_EVENTS last.
        let vcpu_events = fd
            .get_vcpu_events()
            .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
        })
    }

    fn get_xsave(&self, fd: &VcpuFd) -> Result<Vec<u32>> {
        if self.xsave2_words > 1024 {
            let fam = self.xsave2_words - 1024;
            let mut xs =
                Xsave::new(fam).map_err(|e| Error::Memory(format!("xsave buffer: {e:?}")))?;
            // SAFETY: `xs` was sized from KVM_CAP_XSAVE2, the size KVM writes.
            unsafe { fd.get_xsave2(&mut xs) }.map_err(Error::kvm("KVM_GET_XSAVE2"))?;
            let s = xs.as_fam_struct_ref();
            let mut words = s.xsave.region.to_vec();
            words.extend_from_slice(xs.as_slice());
            Ok(words)
        } else {
            let xs = fd.get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))?;
            Ok(xs.region.to_vec())
        }
    }

    fn set_xsave(&self, fd: &VcpuFd, words: &[u32]) -> Result<()> {
        if words.len() < 1024 {
            return Err(Error::StateMismatch(format!(
                "xsave area of {} words is shorter than 4 KiB",
                words.len()
            )));
        }
        if words.len() > 1024 {
            if words.len() != self.xsave2_words {
                return Err(Error::StateMismatch(format!(
                    "xsave area of {} words, this host's KVM uses {}",
                    words.len(),
                    self.xsave2_words
                )));
            }
            let mut xs = Xsave::from_entries(&words[1024..])
                .map_err(|e| Error::Memory(format!("xsave buffer: {e:?}")))?;
            // SAFETY: the FAM wrapper owns its buffer; we copy the 4 KiB legacy region into it.
            unsafe { xs.as_mut_fam_struct() }
                .xsave
                .region
                .copy_from_slice(&words[..1024]);
            // SAFETY: the buffer holds exactly the KVM_CAP_XSAVE2 size KVM reads.
            unsafe { fd.set_xsave2(&xs) }.map_err(Error::kvm("KVM_SET_XSAVE2"))
        } else {
            let mut xs = kvm_bindings::kvm_xsave::default();
            xs.region.copy_from_slice(&words[..1024]);
            // SAFETY: no XSAVE2 on this host, so KVM reads exactly the 4 KiB struct.
            unsafe { fd.set_xsave(&xs) }.map_err(Error::kvm("KVM_SET_XSAVE"))
        }
    }

    fn get_msrs(&self, fd: &VcpuFd) -> Result<Vec<kvm_msr_entry>> {
        let entries: Vec<kvm_msr_entry> = self
            .msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| Error::Memory(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(Error::kvm("KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(Error::Kvm {
                op: "KVM_GET_MSRS",
                source: kvm_ioctls::Error::new(libc::EIO),
            });
        }
        Ok(msrs.as_slice().to_vec())
    }

    /// Captures one vCPU's state (the vCPU part). The VM must be paused.
    pub fn capture_vcpu_state(&self, index: u32) -> Result<VcpuState> {
        self.require_paused("capture")?;
        let v = self.vcpu_handle(index)?;
        self.capture_vcpu(index, &lock_fd(&v.fd))
    }

    /// Checks, without applying anything, that `s` can be restored into
    /// vCPU `index` of this VM: the label, the XSAVE area size this host's
    /// KVM uses, every MSR among those this VM can set, a CPUID table KVM
    /// can take. What only KVM can judge is proven by a restore dry run.
    pub fn check_vcpu_state(&self, index: u32, s: &VcpuState) -> Result<()> {
        self.vcpu_handle(index)?;
        if s.id != index {
            return Err(Error::StateMismatch(format!(
                "vCPU state labelled {} offered for vCPU {index}",
                s.id
            )));
        }
        let want = if self.xsave2_words > 1024 {
            self.xsave2_words
        } else {
            1024
        };
        if s.xsave.len() != want {
            return Err(Error::StateMismatch(format!(
                "xsave area of {} words, this host's KVM uses {want}",
                s.xsave.len()
            )));
        }
        if s.cpuid.is_empty() || s.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(Error::StateMismatch(format!(
                "CPUID table of {} entries (1 to {KVM_MAX_CPUID_ENTRIES})",
                s.cpuid.len()
            )));
        }
        if let Some(m) = s
            .msrs
            .iter()
            .find(|m| self.msr_indices.binary_search(&m.index).is_err())
        {
            return Err(Error::StateMismatch(format!(
                "MSR {:#x} is not one this host's KVM can restore",
                m.index
            )));
        }
        Ok(())
    }

    /// Restores one vCPU's state (the vCPU part) and makes it runnable. The
    /// VM must be paused; restore the VM-wide devices first (the LAPIC
    /// needs the irqchip).
    pub fn restore_vcpu_state(&self, index: u32, s: &VcpuState) -> Result<()> {
        self.require_paused("restore")?;
        self.check_vcpu_state(index, s)?;
        let v = self.vcpu_handle(index)?;
        self.restore_vcpu(&lock_fd(&v.fd), s)?;
        let mut c = self.shared.lock();
        if let Some(r) = c.runnable.get_mut(index as usize) {
            *r = true;
        }
        if let Some(st) = c.states.get_mut(index as usize) {
            *st = VcpuRunState::Paused;
        }
        Ok(())
    }

    /// Captures the VM-wide in-kernel devices and the clock (the KVM VM
    /// part). The VM must be paused.
    pub fn capture_vm_devices_state(&self) -> Result<VmDevicesState> {
        self.require_paused("capture")?;
        self.capture_vm_devices()
    }

    /// Restores the VM-wide in-kernel devices and the clock. The VM must be
    /// paused.
    pub fn restore_vm_devices_state(&self, s: &VmDevicesState) -> Result<()> {
        self.require_paused("restore")?;
        self.restore_vm_devices(s)
    }

    /// What this VM's state needs of a host to be restored there.
    pub fn host_needs(&self) -> crate::host::HostNeeds {
        crate::host::HostNeeds {
            xsave_words: if self.xsave2_words > 1024 {
                self.xsave2_words as u32
            } else {
                1024
            },
            msrs: self.msr_indices.clone(),
            tsc_khz: self.tsc_khz,
            cpuid: crate::host::feature_leaves(&self.supported_cpuid),
        }
    }

    /// Checks that a state needing `needs` can be restored into this VM:
    /// the error names what differs between the two hosts.
    pub fn check_host_needs(&self, needs: &crate::host::HostNeeds) -> Result<()> {
        needs
            .check(&self.host_needs(), &self.supported_cpuid)
            .map_err(Error::HostMismatch)
    }

    fn vcpu_handle(&self, index: u32) -> Result<&VcpuHandle> {
        self.vcpus.get(index as usize).ok_or_else(|| {
            Error::StateMismatch(format!(
                "vCPU {index} does not exist (this VM has {})",
                self.vcpus.len()
            ))
        })
    }

    /// Restores a captured state into this paused VM (guest memory is copied
    /// separately). Refuses a state of another shape or version.
    pub fn restore_state(&self, state: &VmState) -> Result<()> {
        self.require_paused("restore")?;
        if state.version != STATE_VERSION {
            return Err(Error::StateMismatch(format!(
                "state version {} is not {STATE_VERSION}",
                state.version
            )));
        }
        let shape = self.shape();
        if state.shape.vcpus != shape.vcpus {
            return Err(Error::StateMismatch(format!(
                "the state has {} vCPUs, this VM has {}",
                state.shape.vcpus, shape.vcpus
            )));
        }
        if state.shape.memory != shape.memory {
            return Err(Error::StateMismatch(format!(
                "the state's memory layout {:?} differs from this VM's {:?}",
                state.shape.memory, shape.memory
            )));
        }
        if state.vcpus.len() != self.vcpus.len() {
            return Err(Error::StateMismatch(format!(
                "the state carries {} vCPU states for {} vCPUs",
                state.vcpus.len(),
                self.vcpus.len()
            )));
        }
        self.restore_vm_devices(&state.vm)?;
        self.devices
            .restore(&state.devices)
            .map_err(|e| Error::StateMismatch(e.to_string()))?;
        for (v, s) in self.vcpus.iter().zip(&state.vcpus) {
            self.restore_vcpu(&lock_fd(&v.fd), s)?;
        }
        self.set_all_runnable();
        Ok(())
    }

    fn restore_vm_devices(&self, s: &VmDevicesState) -> Result<()> {
        self.fd
            .set_pit2(&s.pit)
            .map_err(Error::kvm("KVM_SET_PIT2"))?;
        let mut clock = s.clock;
        // Only flags KVM_SET_CLOCK accepts; the clock resumes from the saved value,
        // so the guest never sees it go backwards.
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        clock.flags &= kvm_bindings::KVM_CLOCK_REALTIME;
        self.fd
            .set_clock(&clock)
            .map_err(Error::kvm("KVM_SET_CLOCK"))?;
        for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(Error::kvm("KVM_SET_IRQCHIP"))?;
        }
        match &s.legacy {
            Some(serial) => {
                self.platform.activate(&self.fd, Some(serial))?;
                self.platform.connect_virtio(&self.fd, &self.devices)?;
                self.platform.start_poller(&self.shared, &self.devices)?;
            }
            None => self.platform.deactivate(),
        }
        Ok(())
    }

    fn restore_vcpu(&self, fd: &VcpuFd, s: &VcpuState) -> Result<()> {
        let cpuid = CpuId::from_entries(&s.cpuid)
            .map_err(|e| Error::StateMismatch(format!("CPUID table: {e:?}")))?;
        fd.set_cpuid2(&cpuid)
            .map_err(Error::kvm("KVM_SET_CPUID2"))?;
        fd.set_mp_state(s.mp_state)
            .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(Error::kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&s.sregs)
            .map_err(Error::kvm("KVM_SET_SREGS"))?;
        self.set_xsave(fd, &s.xsave)?;
        fd.set_xcrs(&s.xcrs).map_err(Error::kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&s.debugregs)
            .map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic)
            .map_err(Error::kvm("KVM_SET_LAPIC"))?;
        let mut msrs = s.msrs.clone();
        msrs.sort_by_key(|m| m.index); // IA32_TSC (0x10) before TSC_DEADLINE (0x6e0)
        let list = Msrs::from_entries(&msrs)
            .map_err(|e| Error::StateMismatch(format!("MSR list: {e:?}")))?;
        let n = fd.set_msrs(&list).map_err(Error::kvm("KVM_SET_MSRS"))?;
        if n != msrs.len() {
            return Err(Error::StateMismatch(format!(
                "KVM refused MSR {:#x} ({} of {} set)",
                msrs[n].index,
                n,
                msrs.len()
            )));
        }
        fd.set_vcpu_events(&s.vcpu_events)
            .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Copies the whole of guest memory out (for snapshots and tests).
    pub fn read_memory(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.config.mem_bytes as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(0))
            .map_err(|e| Error::Memory(format!("reading guest memory: {e}")))?;
        Ok(out)
    }

    /// Replaces the whole of guest memory with `data` (its length must match).
    pub fn write_memory(&self, data: &[u8]) -> Result<()> {
        if data.len() as u64 != self.config.mem_bytes {
            return Err(Error::StateMismatch(format!(
                "memory image of {} bytes for a VM of {} bytes",
                data.len(),
                self.config.mem_bytes
            )));
        }
        self.mem
            .write_slice(data, GuestAddress(0))
            .map_err(|e| Error::Memory(format!("writing guest memory: {e}")))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        {
            let mut c = self.shared.lock();
            c.quit = true;
            c.pause = true;
            for e in &self.shared.exits {
                e.set(true);
            }
            self.shared.resume_cv.notify_all();
        }
        let sig = vcpu::kick_signal();
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                // SAFETY: the thread has not been joined yet; no-op handler installed.
                unsafe { libc::pthread_kill(t.as_pthread_t(), sig) };
                let _ = t.join();
            }
        }
    }
}

fn lock_fd(fd: &Mutex<VcpuFd>) -> MutexGuard<'_, VcpuFd> {
    fd.lock().unwrap_or_else(|e| e.into_inner())
}

fn lock_tracker(t: &Mutex<Box<dyn DirtyTracker>>) -> MutexGuard<'_, Box<dyn DirtyTracker>> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// The MSRs of KVM_GET_MSR_INDEX_LIST that this vCPU can both read and set
/// back, sorted by index. Probed on the fresh vCPU by reading each and writing
/// the same value back.
fn restorable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut out = Vec::new();
    let extra = linux::boot::STATE_MSRS_BEYOND_INDEX_LIST.iter();
    for &index in list.as_slice().iter().chain(extra) {
        if UNRESTORABLE_MSRS.contains(&index) || out.contains(&index) {
            continue;
        }
        let entry = [kvm_msr_entry {
            index,
            ..Default::default()
        }];
        let Ok(mut one) = Msrs::from_entries(&entry) else {
            continue;
        };
        if vcpu.get_msrs(&mut one).ok() != Some(1) {
            continue;
        }
        if vcpu.set_msrs(&one).ok() == Some(1) {
            out.push(index);
        }
    }
    out.sort_unstable();
    Ok(out)
}
