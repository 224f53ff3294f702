//! x86-64 set-up for a guest that starts directly in 64-bit long mode at CPL 3.
//!
//! On PVM (`kvm_pvm`) ring-0 guest code runs through KVM's instruction
//! emulator while ring-3 code runs natively, so Castor's built-in guest never
//! enters ring 0: the VMM builds its GDT, TSS and identity page tables in
//! guest memory and loads the segment and control registers through
//! `KVM_SET_SREGS`, with IOPL 3 so `in`/`out` reach the VMM. The same set-up
//! runs unchanged on hardware KVM.

use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;
use castor_guest_abi::layout;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs, CpuId};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

/// GDT selectors (index << 3 | RPL).
const SEL_USER_DATA: u16 = (3 << 3) | 3;
const SEL_USER_CODE: u16 = (4 << 3) | 3;
const SEL_TSS: u16 = 5 << 3;
const TSS_LIMIT: u32 = 0x67;

fn gdt_entry(flags: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Writes the GDT, TSS and page tables the CPL-3 guest runs on.
pub fn write_system_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("writing system tables at {addr:#x}: {e}")))
    };
    // GDT: null, kernel code, kernel data, user data, user code, 16-byte TSS.
    let tss = layout::TSS_ADDR;
    let gdt = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff),            // kernel code, L=1
        gdt_entry(0xc093, 0, 0xfffff),            // kernel data
        gdt_entry(0xc0f3, 0, 0xfffff),            // user data, DPL 3
        gdt_entry(0xa0fb, 0, 0xfffff),            // user code, DPL 3, L=1
        gdt_entry(0x008b, tss, TSS_LIMIT as u64), // busy 64-bit TSS, low half
        tss >> 32,                                // TSS high half
    ];
    for (i, e) in gdt.iter().enumerate() {
        w(layout::GDT_ADDR + 8 * i as u64, *e)?;
    }
    // TSS: zeroed; the I/O map base points past the limit (no bitmap: IOPL 3 rules).
    for off in (0..0x68).step_by(8) {
        w(tss + off, 0)?;
    }
    mem.write_obj(0x68u16, GuestAddress(tss + 0x66))
        .map_err(|e| Error::Memory(format!("writing TSS: {e}")))?;

    // Identity map of MAPPED_GIB with 2 MiB user pages.
    w(
        layout::PML4_ADDR,
        layout::PDPT_ADDR | PTE_PRESENT | PTE_WRITE | PTE_USER,
    )?;
    for gib in 0..layout::MAPPED_GIB {
        let pd = layout::PD_ADDR + gib * 4096;
        w(
            layout::PDPT_ADDR + gib * 8,
            pd | PTE_PRESENT | PTE_WRITE | PTE_USER,
        )?;
        let mut entries = [0u8; 4096];
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            let e = phys | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE;
            entries[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))
            .map_err(|e| Error::Memory(format!("writing page directory at {pd:#x}: {e}")))?;
    }
    Ok(())
}

fn user_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets the special registers for 64-bit long mode at CPL 3.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<()> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let code = user_segment(SEL_USER_CODE, true);
    let data = user_segment(SEL_USER_DATA, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: layout::TSS_ADDR,
        limit: TSS_LIMIT,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0; // no IDT: any guest fault is a triple fault, a clean stop
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))
}

/// Sets the general registers so the vCPU enters `entry(vcpu_id, boot_info)`.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, vcpu_id: u64) -> Result<()> {
    let regs = kvm_regs {
        rip: entry,
        rsp: layout::vcpu_stack_top(vcpu_id) - 8,
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        rdi: vcpu_id,
        rsi: layout::BOOT_INFO_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))
}

/// x87 and SSE defaults (FCW 0x37f, MXCSR 0x1f80: every exception masked) and
/// XCR0 = x87 | SSE | AVX where supported.
pub fn setup_fpu(vcpu: &VcpuFd, xsave_supported: bool) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
    if xsave_supported {
        let mut xcrs: kvm_xcrs = vcpu.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?;
        xcrs.nr_xcrs = 1;
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = 0x7;
        if vcpu.set_xcrs(&xcrs).is_err() {
            // No AVX state offered: x87 | SSE.
            xcrs.xcrs[0].value = 0x3;
            vcpu.set_xcrs(&xcrs).map_err(Error::kvm("KVM_SET_XCRS"))?;
        }
    }
    Ok(())
}

/// The CPUID table for vCPU `id`: what KVM supports, with this vCPU's APIC id.
pub fn cpuid_for(supported: &CpuId, id: u32, vcpus: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
                e.ebx = (e.ebx & 0xff00_ffff) | (vcpus.min(255) << 16);
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    cpuid
}
