//! Booting an unmodified Linux kernel.
//!
//! [`crate::Vm::boot_linux`] takes a [`LinuxBoot`] (kernel, optional
//! initramfs, command line) and builds what a Linux guest expects of a PC:
//!
//! * **Loading** ([`boot`]) with `linux-loader`: an ELF `vmlinux` with a
//!   PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`) starts at its PVH entry in 32-bit
//!   protected mode with an `hvm_start_info`; an ELF without one starts at its
//!   64-bit entry, and a bzImage at `startup_64` through the 64-bit boot
//!   protocol, both with a zero page (`boot_params`). Each gets the same e820
//!   map ([`e820_map`]), command line and initramfs.
//! * **Platform**: KVM's in-kernel PIC, IOAPIC, local APICs and PIT (the VMM
//!   creates them for every VM), minimal hardware-reduced ACPI ([`acpi`]:
//!   RSDP, XSDT, FADT, MADT, DSDT) describing COM1 and the virtio-mmio
//!   devices, and a 16550A UART on COM1 ([`serial`]) whose output goes to the
//!   VMM log, to an in-memory [`Console`] and, if asked, to the terminal.
//! * **CPUID** ([`cpuid`]): what KVM supports, minus what the host cannot
//!   back (IA32_ARCH_CAPABILITIES everywhere; on PVM, the instructions KVM's
//!   emulator cannot run in guest ring 0).
//! * **Emulation failures** ([`emulation`]): on PVM a ring-0 guest runs
//!   through KVM's instruction emulator, which gives up on some instructions;
//!   the vCPU stops with a [`crate::StopReason::EmulationFailure`] that names
//!   the exit, RIP and the instruction bytes read from guest memory.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod emulation;
pub mod layout;
pub mod serial;

use std::path::PathBuf;

pub use boot::{BootProtocol, LinuxBootReport};
pub use cpuid::CpuidPolicy;
pub use emulation::EmulationFailure;
pub use serial::{Console, SerialState};

/// What to boot: a Linux kernel, an optional initramfs and a command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    /// An ELF `vmlinux` (booted through its PVH entry when it has one) or a
    /// bzImage (booted through the 64-bit boot protocol).
    pub kernel: PathBuf,
    /// An initramfs (cpio, compressed as the kernel accepts), loaded at the
    /// top of RAM.
    pub initrd: Option<PathBuf>,
    /// The kernel command line, given to the kernel exactly as written.
    pub cmdline: String,
}

impl LinuxBoot {
    /// A command line for a console on COM1 that also shows the kernel's
    /// early messages there (`earlyprintk`), reboots by triple fault (there
    /// is no keyboard controller) and does not wait after a panic.
    pub const DEFAULT_CMDLINE: &'static str =
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=t panic=-1";
}

/// The kind of an e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM (type 1).
    Ram,
    /// Reserved (type 2).
    Reserved,
}

impl E820Kind {
    /// The e820 type number.
    pub fn code(self) -> u32 {
        match self {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
        }
    }

    /// How Linux names it in its boot log (`e820__print_type`).
    pub fn linux_name(self) -> &'static str {
        match self {
            E820Kind::Ram => "usable",
            E820Kind::Reserved => "reserved",
        }
    }
}

/// One range of the e820 memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What it is.
    pub kind: E820Kind,
}

impl E820Entry {
    /// The line Linux prints for this range at boot, without the printk
    /// prefix: `BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable`.
    pub fn linux_line(&self) -> String {
        format!(
            "BIOS-e820: [mem {:#018x}-{:#018x}] {}",
            self.addr,
            self.addr + self.size - 1,
            self.kind.linux_name()
        )
    }
}

/// The e820 map of a Linux guest with `mem_bytes` of RAM from address 0:
/// low RAM below the EBDA; the EBDA, the ISA hole and the BIOS area (where
/// the ACPI tables are) reserved as one range, as the PVH entry code
/// reserves the ISA hole itself; the rest of RAM from 1 MiB.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: E820Kind::Reserved,
        },
        E820Entry {
            addr: layout::HIMEM_START,
            size: mem_bytes - layout::HIMEM_START,
            kind: E820Kind::Ram,
        },
    ]
}

/// Errors of booting a Linux guest.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// The kernel or initramfs file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an ELF file nor a bzImage.
    #[error("{} is neither an ELF vmlinux nor a bzImage", path.display())]
    UnknownKernelFormat {
        /// The file.
        path: PathBuf,
    },
    /// A bzImage too old for the 64-bit boot protocol.
    #[error(
        "{} is a bzImage without a 64-bit entry (boot protocol {major}.{minor:02}, xloadflags {xloadflags:#x}): use an ELF vmlinux with PVH, or a kernel from 3.8 on",
        path.display()
    )]
    No64BitEntry {
        /// The file.
        path: PathBuf,
        /// Boot protocol major version.
        major: u8,
        /// Boot protocol minor version.
        minor: u8,
        /// The header's xloadflags.
        xloadflags: u16,
    },
    /// linux-loader refused the kernel.
    #[error("loading {}: {source}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// linux-loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line is not one the kernel can take.
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// The command line is too long.
    #[error("kernel command line of {len} bytes: at most {max} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The longest the kernel takes.
        max: usize,
    },
    /// Writing the command line into guest memory failed.
    #[error("writing the kernel command line: {0}")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    /// The initramfs does not fit between the kernel and the top of RAM.
    #[error("initramfs of {size} bytes does not fit in RAM above the kernel (which ends at {kernel_end:#x}; RAM ends at {ram_end:#x}): give the VM more memory")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// Where the kernel (and its unpacking room) ends.
        kernel_end: u64,
        /// Where RAM ends.
        ram_end: u64,
    },
    /// The VM's memory does not suit a Linux guest.
    #[error("a Linux guest needs {min} to {max} MiB of memory (the VM has {have} MiB): RAM must end below the IOAPIC and local APIC windows")]
    MemorySize {
        /// The VM's memory in MiB.
        have: u64,
        /// Least, in MiB.
        min: u64,
        /// Most, in MiB.
        max: u64,
    },
    /// A structure could not be written into guest memory.
    #[error("writing the {what} into guest memory: {source}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// linux-loader could not write the boot parameters.
    #[error("writing the boot parameters: {0}")]
    BootParams(#[from] linux_loader::configurator::Error),
    /// More virtio devices than interrupt lines.
    #[error("{devices} virtio devices: a Linux guest takes at most {max}")]
    TooManyDevices {
        /// Devices on the bus.
        devices: usize,
        /// Most that get an interrupt line.
        max: usize,
    },
    /// An eventfd for an interrupt could not be created.
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A captured UART state holds more received bytes than its FIFO.
    #[error("serial state holds {len} received bytes, more than the UART's FIFO")]
    SerialFifo {
        /// Bytes in the state's receive buffer.
        len: usize,
    },
    /// The UART's interrupt could not be raised.
    #[error("raising the COM1 interrupt: {0}")]
    SerialInterrupt(#[source] std::io::Error),
}

/// Lists the virtio-mmio devices on `bus` with the GSI each gets
/// ([`layout::VIRTIO_GSI_BASE`] + slot), as (window base, GSI, virtio type).
pub(crate) fn declare_virtio(
    bus: &crate::devices::DeviceBus,
) -> std::result::Result<Vec<(u64, u32, u32)>, LinuxError> {
    let types = bus.device_types();
    let max = (layout::MAX_GSI - layout::VIRTIO_GSI_BASE + 1) as usize;
    if types.len() > max {
        return Err(LinuxError::TooManyDevices {
            devices: types.len(),
            max,
        });
    }
    Ok(types
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            (
                castor_guest_abi::pv::DEVICES_BASE + i as u64 * crate::devices::WINDOW_SIZE,
                layout::VIRTIO_GSI_BASE + i as u32,
                t,
            )
        })
        .collect())
}
