//! Loading a Linux kernel with `linux-loader` and setting up the boot CPU
//! for its entry protocol (PVH, or the 64-bit boot protocol).

use super::{e820_map, layout, E820Entry, E820Kind, LinuxBoot, LinuxError};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// ELF `vmlinux` with a PVH note: 32-bit protected mode, paging off,
    /// `ebx` = `hvm_start_info`.
    Pvh,
    /// ELF `vmlinux` without a PVH note: its 64-bit entry, `rsi` = zero page.
    Elf64,
    /// bzImage: `startup_64` of the compressed kernel (load address +
    /// 0x200), `rsi` = zero page; the kernel unpacks itself first.
    BzImage64,
}

impl std::fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootProtocol::Pvh => "PVH (ELF vmlinux, 32-bit entry)",
            BootProtocol::Elf64 => "64-bit boot protocol (ELF vmlinux)",
            BootProtocol::BzImage64 => "64-bit boot protocol (bzImage)",
        })
    }
}

/// What [`crate::Vm::boot_linux`] gave the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBootReport {
    /// The entry protocol.
    pub protocol: BootProtocol,
    /// Guest-physical entry point.
    pub entry: u64,
    /// First byte the kernel image occupies.
    pub kernel_start: u64,
    /// End of the kernel image (and, for a bzImage, of its unpacking room).
    pub kernel_end: u64,
    /// Address and size of the initramfs.
    pub initrd: Option<(u64, u64)>,
    /// The command line exactly as written into guest memory.
    pub cmdline: String,
    /// The e820 map.
    pub e820: Vec<E820Entry>,
    /// The virtio-mmio devices declared to the kernel: window base, GSI, virtio type.
    pub virtio: Vec<(u64, u32, u32)>,
    /// CPUID features Castor hid but KVM kept (PVM keeps leaves 1 and 7 at
    /// the host's values); the guest sees and may use them.
    pub cpuid_kept: Vec<&'static str>,
}

const BZIMAGE_MAGIC: u32 = 0x5372_6448; // "HdrS"
const XLF_KERNEL_64: u16 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// The 64-bit entry of a bzImage is 0x200 past its 32-bit one.
const STARTUP_64_OFFSET: u64 = 0x200;

enum Format {
    Elf,
    BzImage { version: u16, xloadflags: u16 },
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> LinuxError + '_ {
    move |source| LinuxError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn sniff(path: &Path, f: &mut File) -> std::result::Result<Format, LinuxError> {
    let mut head = [0u8; 0x240];
    f.seek(SeekFrom::Start(0)).map_err(read_err(path))?;
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]).map_err(read_err(path))? {
            0 => break,
            n => got += n,
        }
    }
    if got >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Format::Elf);
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    let magic = u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]);
    if got >= 0x238 && magic == BZIMAGE_MAGIC {
        return Ok(Format::BzImage {
            version: u16_at(0x206),
            xloadflags: u16_at(0x236),
        });
    }
    Err(LinuxError::UnknownKernelFormat {
        path: path.to_path_buf(),
    })
}

fn write_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> LinuxError {
    move |source| LinuxError::GuestWrite { what, source }
}

/// Loads the kernel, command line and initramfs, and writes the boot
/// parameters and the e820 map for a VM with `mem_bytes` of RAM.
pub(crate) fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    boot: &LinuxBoot,
) -> std::result::Result<LinuxBootReport, LinuxError> {
    if !(layout::MIN_RAM..=layout::MAX_RAM).contains(&mem_bytes) {
        return Err(LinuxError::MemorySize {
            have: mem_bytes >> 20,
            min: layout::MIN_RAM >> 20,
            max: layout::MAX_RAM >> 20,
        });
    }
    let path = boot.kernel.as_path();
    let mut kernel = File::open(path).map_err(read_err(path))?;
    let load_err = |source| LinuxError::Load {
        path: path.to_path_buf(),
        source,
    };
    let highmem = Some(GuestAddress(layout::HIMEM_START));
    let (protocol, entry, kernel_start, mut kernel_end, header) = match sniff(path, &mut kernel)? {
        Format::Elf => {
            let r = Elf::load(mem, None, &mut kernel, highmem).map_err(load_err)?;
            let start = r.kernel_load.0;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(pvh) => {
                    (BootProtocol::Pvh, pvh.0, start, r.kernel_end, None)
                }
                _ => (BootProtocol::Elf64, start, start, r.kernel_end, None),
            }
        }
        Format::BzImage {
            version,
            xloadflags,
        } => {
            if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LinuxError::No64BitEntry {
                    path: path.to_path_buf(),
                    major: (version >> 8) as u8,
                    minor: version as u8,
                    xloadflags,
                });
            }
            let r = BzImage::load(mem, None, &mut kernel, highmem).map_err(load_err)?;
            let start = r.kernel_load.0;
            let hdr = r.setup_header.unwrap_or_default();
            // The kernel unpacks itself at its preferred address (or where it
            // lies, if that is higher) and needs init_size bytes there.
            let pref = { hdr.pref_address }.max(start);
            let unpacked_end = pref.saturating_add({ hdr.init_size } as u64);
            (
                BootProtocol::BzImage64,
                start + STARTUP_64_OFFSET,
                start,
                r.kernel_end.max(unpacked_end),
                Some(hdr),
            )
        }
    };

    // Command line.
    let max = match &header {
        Some(h) if { h.cmdline_size } > 0 => {
            ({ h.cmdline_size } as usize + 1).min(layout::CMDLINE_MAX)
        }
        _ => layout::CMDLINE_MAX,
    };
    if boot.cmdline.len() >= max {
        return Err(LinuxError::CmdlineTooLong {
            len: boot.cmdline.len(),
            max: max - 1,
        });
    }
    let cmdline = Cmdline::try_from(&boot.cmdline, max)?;
    let cmdline_text = cmdline
        .as_cstring()?
        .into_string()
        .unwrap_or_else(|e| String::from_utf8_lossy(e.into_cstring().as_bytes()).into_owned());
    load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cmdline)
        .map_err(LinuxError::CmdlineWrite)?;

    // Initramfs at the top of RAM, page aligned.
    let initrd = match &boot.initrd {
        None => None,
        Some(p) => {
            let mut f = File::open(p).map_err(read_err(p))?;
            let size = f.metadata().map_err(read_err(p))?.len();
            let top = mem_bytes;
            let addr = top.checked_sub(size).map(|a| a & !0xfff);
            kernel_end = kernel_end.max(layout::HIMEM_START);
            let addr = match addr {
                Some(a) if a >= kernel_end => a,
                _ => {
                    return Err(LinuxError::InitrdTooLarge {
                        size,
                        kernel_end,
                        ram_end: top,
                    })
                }
            };
            mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
                .map_err(write_err("initramfs"))?;
            Some((addr, size))
        }
    };

    let e820 = e820_map(mem_bytes);
    match protocol {
        BootProtocol::Pvh => write_pvh_start_info(mem, &e820, initrd)?,
        BootProtocol::Elf64 | BootProtocol::BzImage64 => {
            write_zero_page(mem, &e820, header, cmdline_text.len(), initrd)?
        }
    }
    write_gdt(mem, protocol)?;
    if protocol != BootProtocol::Pvh {
        write_page_tables(mem)?;
    }
    Ok(LinuxBootReport {
        protocol,
        entry,
        kernel_start,
        kernel_end,
        initrd,
        cmdline: cmdline_text,
        e820,
        virtio: Vec::new(),
        cpuid_kept: Vec::new(),
    })
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
) -> std::result::Result<(), LinuxError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.code(),
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: initrd.is_some() as u32,
        modlist_paddr: if initrd.is_some() {
            layout::PVH_MODLIST_ADDR
        } else {
            0
        },
        cmdline_paddr: layout::CMDLINE_ADDR,
        rsdp_paddr: layout::RSDP_ADDR,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_ADDR));
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(layout::PVH_MODLIST_ADDR));
    }
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)?;
    Ok(())
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> std::result::Result<(), LinuxError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = BZIMAGE_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = layout::RSDP_ADDR;
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind.code(),
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_ADDR)),
        mem,
    )?;
    Ok(())
}

fn gdt_entry(flags: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The boot GDT: null, code, data, TSS; 32-bit flat segments for PVH,
/// a 64-bit code segment otherwise.
fn gdt(protocol: BootProtocol) -> [u64; 4] {
    match protocol {
        BootProtocol::Pvh => [
            0,
            gdt_entry(0xc09b, 0, 0xf_ffff),
            gdt_entry(0xc093, 0, 0xf_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
        BootProtocol::Elf64 | BootProtocol::BzImage64 => [
            0,
            gdt_entry(0xa09b, 0, 0xf_ffff),
            gdt_entry(0xc093, 0, 0xf_ffff),
            gdt_entry(0x808b, 0, 0xf_ffff),
        ],
    }
}

fn write_gdt(mem: &GuestMemoryMmap, protocol: BootProtocol) -> std::result::Result<(), LinuxError> {
    for (i, e) in gdt(protocol).iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_ADDR + 8 * i as u64))
            .map_err(write_err("boot GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
        .map_err(write_err("boot IDT"))
}

/// Identity map of the first 4 GiB with 2 MiB pages (64-bit entry only).
fn write_page_tables(mem: &GuestMemoryMmap) -> std::result::Result<(), LinuxError> {
    const P: u64 = 1;
    const RW: u64 = 2;
    const PS: u64 = 1 << 7;
    mem.write_obj(layout::PDPT_ADDR | P | RW, GuestAddress(layout::PML4_ADDR))
        .map_err(write_err("boot page tables"))?;
    for gib in 0..4u64 {
        let pd = layout::PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | P | RW, GuestAddress(layout::PDPT_ADDR + gib * 8))
            .map_err(write_err("boot page tables"))?;
        let mut entries = [0u8; 4096];
        for (i, e) in entries.chunks_exact_mut(8).enumerate() {
            let phys = (gib << 30) | ((i as u64) << 21);
            e.copy_from_slice(&(phys | P | RW | PS).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))
            .map_err(write_err("boot page tables"))?;
    }
    Ok(())
}

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let limit_raw = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            ((limit_raw << 12) | 0xfff) as u32
        } else {
            limit_raw as u32
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Segment and control registers for the entry protocol.
fn boot_sregs(vcpu: &VcpuFd, protocol: BootProtocol) -> Result<()> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let table = gdt(protocol);
    let code = segment_from_gdt(table[1], 1);
    let data = segment_from_gdt(table[2], 2);
    let tss = segment_from_gdt(table[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;
    match protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Elf64 | BootProtocol::BzImage64 => {
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
            sregs.cr3 = layout::PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// MSRs a ring-0 guest programs that `KVM_GET_MSR_INDEX_LIST` does not list
/// (QEMU saves them separately too): the MTRRs (default type, the fixed
/// ranges, 8 variable pairs) and PAT. A kernel reads them back, so a state
/// without them boots differently after a restore (a restored 6.1 kernel
/// printed "MTRRs disabled" where the original set up PAT). The VM's MSR list
/// takes each one this KVM can read and set back.
pub const STATE_MSRS_BEYOND_INDEX_LIST: &[u32] = &[
    0x2ff, // IA32_MTRR_DEF_TYPE
    0x250, // IA32_MTRR_FIX64K_00000
    0x258, // IA32_MTRR_FIX16K_80000
    0x259, // IA32_MTRR_FIX16K_A0000
    0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, // IA32_MTRR_FIX4K_*
    0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, // IA32_MTRR_PHYSBASE/MASK 0-3
    0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d, 0x20e, 0x20f, // IA32_MTRR_PHYSBASE/MASK 4-7
    0x277, // IA32_PAT
];

/// The MSRs a firmware would leave set; those this KVM refuses are skipped.
fn boot_msrs(vcpu: &VcpuFd) {
    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    for (index, data) in wanted {
        let entry = [kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }];
        let ok = Msrs::from_entries(&entry)
            .ok()
            .and_then(|m| vcpu.set_msrs(&m).ok())
            == Some(1);
        if !ok {
            log::debug!("linux boot: KVM refused MSR {index:#x} = {data:#x}; left as reset");
        }
    }
}

/// LINT0 as ExtINT and LINT1 as NMI ("virtual wire" mode, as a BIOS leaves it).
fn boot_lapic(vcpu: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut w = [0u8; 4];
        for (i, b) in w.iter_mut().enumerate() {
            *b = lapic.regs[reg + i] as u8;
        }
        let v = u32::from_le_bytes(w);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(Error::kvm("KVM_SET_LAPIC"))
}

/// Points vCPU `id` at the kernel: the boot CPU at the entry with the boot
/// parameters, every vCPU with boot MSRs, x87/SSE defaults and virtual-wire
/// LINT pins. Application processors keep KVM's reset state and wait for
/// the kernel's INIT/SIPI.
pub(crate) fn setup_vcpu(vcpu: &VcpuFd, id: u32, report: &LinuxBootReport) -> Result<()> {
    boot_msrs(vcpu);
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
    boot_lapic(vcpu)?;
    if id != 0 {
        return Ok(());
    }
    boot_sregs(vcpu, report.protocol)?;
    let mut regs = kvm_regs {
        rip: report.entry,
        rflags: 2,
        ..Default::default()
    };
    match report.protocol {
        BootProtocol::Pvh => regs.rbx = layout::PVH_INFO_ADDR,
        BootProtocol::Elf64 | BootProtocol::BzImage64 => {
            regs.rsi = layout::ZERO_PAGE_ADDR;
            regs.rsp = layout::BOOT_STACK;
            regs.rbp = layout::BOOT_STACK;
        }
    }
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))
}

/// The e820 lines a kernel prints for `map` (see [`E820Entry::linux_line`]).
pub fn linux_e820_lines(map: &[E820Entry]) -> Vec<String> {
    map.iter()
        .filter(|e| e.size > 0 && matches!(e.kind, E820Kind::Ram | E820Kind::Reserved))
        .map(E820Entry::linux_line)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_back() {
        let pvh = gdt(BootProtocol::Pvh);
        let cs = segment_from_gdt(pvh[1], 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.db, cs.l, cs.g),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let long = gdt(BootProtocol::Elf64);
        let cs = segment_from_gdt(long[1], 1);
        assert_eq!((cs.l, cs.db, cs.present), (1, 0, 1));
        let ds = segment_from_gdt(long[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.db), (16, 3, 1));
    }

    #[test]
    fn e820_lines_look_like_linux() {
        let lines = linux_e820_lines(&e820_map(256 << 20));
        assert_eq!(
            lines,
            [
                "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
                "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
                "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
            ]
        );
    }

    fn tiny_elf(base: u64, code: &[u8]) -> Vec<u8> {
        let mut f = b"\x7fELF\x02\x01\x01\0".to_vec();
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&0x3eu16.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        for v in [base, 64, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 1, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&7u32.to_le_bytes());
        let len = code.len() as u64;
        for v in [0x1000u64, base, base, len, len, 0x1000] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.resize(0x1000, 0);
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn elf_without_pvh_note_gets_a_zero_page_with_initrd_and_cmdline() {
        let dir = std::env::temp_dir().join(format!("castor-linux-zp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (kernel, initrd) = (dir.join("k.elf"), dir.join("initrd"));
        std::fs::write(&kernel, tiny_elf(0x100_0000, &[0xf4])).unwrap();
        std::fs::write(&initrd, vec![7u8; 10_000]).unwrap();
        let mem_bytes = 256 << 20;
        let mem = crate::memory::create(mem_bytes).unwrap();
        let boot = LinuxBoot {
            kernel,
            initrd: Some(initrd),
            cmdline: "console=ttyS0 quiet".into(),
        };
        let r = load(&mem, mem_bytes, &boot).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(r.protocol, BootProtocol::Elf64);
        assert_eq!(r.entry, 0x100_0000);
        let initrd_addr = (mem_bytes - 10_000) & !0xfff;
        assert_eq!(r.initrd, Some((initrd_addr, 10_000)));
        let zp: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        assert_eq!(
            ({ zp.hdr.ramdisk_image }, { zp.hdr.ramdisk_size }),
            (initrd_addr as u32, 10_000)
        );
        assert_eq!({ zp.hdr.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
        assert_eq!({ zp.acpi_rsdp_addr }, layout::RSDP_ADDR);
        assert_eq!(zp.e820_entries, 3);
        let last = zp.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }),
            (0x10_0000, mem_bytes - 0x10_0000)
        );
        let mut cmd = [0u8; 20];
        mem.read_slice(&mut cmd, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 quiet\0");
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(initrd_addr + 9_999))
            .unwrap();
        assert_eq!(byte[0], 7);
    }

    #[test]
    fn unknown_kernel_format_is_refused() {
        let dir = std::env::temp_dir().join(format!("castor-linux-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("not-a-kernel");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let mem = crate::memory::create(256 << 20).unwrap();
        let boot = LinuxBoot {
            kernel: p.clone(),
            initrd: None,
            cmdline: String::new(),
        };
        let err = load(&mem, 256 << 20, &boot).unwrap_err();
        assert!(
            matches!(err, LinuxError::UnknownKernelFormat { .. }),
            "{err}"
        );
        let _ = std::fs::remove_file(p);
    }
}
