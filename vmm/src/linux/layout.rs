//! Guest-physical layout of a Linux guest (the low megabyte follows
//! Firecracker's x86_64 layout, which the Linux boot protocols expect).
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)          0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info       0x0000_6040  PVH module list (initrd)
//! 0x0000_6100  PVH memory map           0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack (64-bit entry)
//! 0x0000_9000  PML4, PDPT, 4 PDs: identity map of the first 4 GiB (64-bit entry)
//! 0x0002_0000  kernel command line (2 KiB)
//! 0x0009_fc00  EBDA (reserved)          0x000e_0000  ACPI: RSDP, XSDT, FADT, MADT, DSDT
//! 0x0010_0000  bzImage (protected-mode part); an ELF vmlinux goes to its own
//!              physical addresses (16 MiB for a stock x86-64 kernel)
//! top of RAM   initramfs, page aligned
//! 0xfec0_0000  IOAPIC (in-kernel)       0xfee0_0000  local APIC (in-kernel)
//! 0x8_0000_1000 virtio-mmio windows (`castor_guest_abi::pv::DEVICES_BASE`)
//! ```
//!
//! RAM is one region from 0, so it must end below the IOAPIC and local APIC
//! windows: a Linux guest has at most [`MAX_RAM`] of memory.

/// GDT of the boot CPU.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT (the kernel installs its own before enabling interrupts).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (one entry: the initramfs).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// The zero page (`struct boot_params`) of the 64-bit boot protocol.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack of the 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page tables of the 64-bit entry: PML4, then the PDPT, then 4 PDs.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the 64-bit entry.
pub const PDPT_ADDR: u64 = 0xa000;
/// First PD of the 64-bit entry (four, 1 GiB each).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line (x86's `COMMAND_LINE_SIZE`, with its NUL).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area (reserved in the e820 map).
pub const EBDA_START: u64 = 0x9_fc00;
/// End of conventional memory.
pub const LOWMEM_END: u64 = 0xa_0000;
/// Where the ACPI tables go (the RSDP first: the kernel also scans here).
pub const ACPI_START: u64 = 0xe_0000;
/// End of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// The RSDP.
pub const RSDP_ADDR: u64 = ACPI_START;
/// First byte of high memory (where a bzImage is loaded).
pub const HIMEM_START: u64 = 0x10_0000;
/// The IOAPIC's MMIO window (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO window.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Most RAM a Linux guest may have: it must end below the 32-bit device hole.
pub const MAX_RAM: u64 = 3 << 30;
/// Least RAM a Linux guest may have (a stock kernel needs room to unpack).
pub const MIN_RAM: u64 = 128 << 20;

/// COM1's I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt (ISA IRQ 4, IOAPIC pin 4).
pub const COM1_GSI: u32 = 4;
/// GSI of the first virtio-mmio device; device `i` on the bus gets `+ i`.
pub const VIRTIO_GSI_BASE: u32 = 5;
/// Highest GSI the IOAPIC has.
pub const MAX_GSI: u32 = 23;
