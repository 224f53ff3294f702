//! A clear report when KVM gives up on a guest instruction.
//!
//! On PVM, guest ring 0 runs through KVM's x86 instruction emulator, which
//! lacks some instructions (`xrstor`, `int3`, `lock cmpxchg16b`, 32-bit
//! `iret`, ...). KVM then exits with `KVM_EXIT_INTERNAL_ERROR` (suberror
//! `KVM_INTERNAL_ERROR_EMULATION`). Instead of a bare "internal error" (or a
//! vCPU that spins re-entering), the vCPU stops with an
//! [`EmulationFailure`]: the exit, the CPU mode, RIP, the physical address
//! it maps to, and the instruction bytes read from guest memory there.

use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_sregs, KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

/// Longest x86 instruction.
const MAX_INSN: usize = 15;

/// Why and where a vCPU stopped in KVM's emulator (or on another internal error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmulationFailure {
    /// The KVM exit reason (17, `KVM_EXIT_INTERNAL_ERROR`).
    pub exit_reason: u32,
    /// `kvm_run.internal.suberror` (1: emulation failure).
    pub suberror: u32,
    /// The instruction pointer.
    pub rip: u64,
    /// Current privilege level.
    pub cpl: u8,
    /// CPU mode: "64-bit", "32-bit protected", "16-bit protected" or "real".
    pub mode: &'static str,
    /// The guest-physical address of the instruction, when the guest's page
    /// tables map it.
    pub phys: Option<u64>,
    /// The instruction bytes read from guest memory at `phys` (up to 15).
    pub bytes: Vec<u8>,
    /// The instruction bytes KVM itself reported, if it did.
    pub kvm_bytes: Vec<u8>,
    /// The raw `kvm_run.internal.data` words.
    pub data: Vec<u64>,
}

impl EmulationFailure {
    /// A guess at the instruction from its bytes (e.g. "xrstor"), for the report.
    pub fn instruction(&self) -> Option<&'static str> {
        let b = if self.bytes.is_empty() {
            &self.kvm_bytes
        } else {
            &self.bytes
        };
        guess_instruction(b)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl std::fmt::Display for EmulationFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.exit_reason == KVM_EXIT_INTERNAL_ERROR
            && self.suberror == KVM_INTERNAL_ERROR_EMULATION
        {
            "KVM's instruction emulator could not run the guest's instruction".to_string()
        } else {
            format!("KVM internal error (suberror {})", self.suberror)
        };
        write!(
            f,
            "{what}: exit reason {} (KVM_EXIT_INTERNAL_ERROR), suberror {}, rip {:#x} ({} mode, CPL {})",
            self.exit_reason, self.suberror, self.rip, self.mode, self.cpl
        )?;
        match self.phys {
            Some(p) => write!(f, ", physical {p:#x}")?,
            None => write!(f, ", not mapped by the guest's page tables")?,
        }
        if !self.bytes.is_empty() {
            write!(f, ", instruction bytes [{}]", hex(&self.bytes))?;
        }
        if !self.kvm_bytes.is_empty() && self.kvm_bytes != self.bytes {
            write!(f, ", KVM's copy [{}]", hex(&self.kvm_bytes))?;
        }
        if let Some(i) = self.instruction() {
            write!(f, " = `{i}`")?;
        }
        Ok(())
    }
}

/// Builds the report for the internal-error exit the vCPU just took.
pub(crate) fn report(fd: &mut VcpuFd, mem: &GuestMemoryMmap) -> EmulationFailure {
    let (suberror, data) = {
        let run = fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR (the caller matched
        // VcpuExit::InternalError), so `internal` is the union member KVM filled.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        (internal.suberror, internal.data[..n].to_vec())
    };
    // With KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES the data is
    // `struct emulation_failure`: data[0] = flags, then one byte of length and
    // 15 instruction bytes (data[1] and data[2]).
    let kvm_bytes = if suberror == KVM_INTERNAL_ERROR_EMULATION
        && data.len() >= 3
        && data[0] & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
            != 0
    {
        let mut raw = data[1].to_le_bytes().to_vec();
        raw.extend_from_slice(&data[2].to_le_bytes());
        let len = (raw[0] as usize).min(MAX_INSN);
        raw[1..1 + len].to_vec()
    } else {
        Vec::new()
    };
    let regs = fd.get_regs().unwrap_or_default();
    let sregs = fd.get_sregs().unwrap_or_default();
    let (mode, linear) = mode_and_linear(&sregs, regs.rip);
    let cpl = if sregs.cr0 & 1 == 0 {
        0
    } else {
        (sregs.cs.selector & 3) as u8
    };
    let phys = fd
        .translate_gva(linear)
        .ok()
        .filter(|t| t.valid != 0)
        .map(|t| t.physical_address)
        .or_else(|| walk(mem, &sregs, linear));
    let bytes = phys.map(|p| read_bytes(mem, p)).unwrap_or_default();
    EmulationFailure {
        exit_reason: KVM_EXIT_INTERNAL_ERROR,
        suberror,
        rip: regs.rip,
        cpl,
        mode,
        phys,
        bytes,
        kvm_bytes,
        data,
    }
}

fn mode_and_linear(s: &kvm_sregs, rip: u64) -> (&'static str, u64) {
    const EFER_LMA: u64 = 1 << 10;
    if s.cr0 & 1 == 0 {
        ("real", (s.cs.base + (rip & 0xffff)) & 0xf_ffff)
    } else if s.efer & EFER_LMA != 0 && s.cs.l == 1 {
        ("64-bit", rip)
    } else if s.cs.db == 1 {
        ("32-bit protected", (s.cs.base + rip) & 0xffff_ffff)
    } else {
        (
            "16-bit protected",
            (s.cs.base + (rip & 0xffff)) & 0xffff_ffff,
        )
    }
}

/// Reads up to 15 bytes at `phys`, stopping at the end of guest memory.
fn read_bytes(mem: &GuestMemoryMmap, phys: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_INSN);
    for i in 0..MAX_INSN as u64 {
        match mem.read_obj::<u8>(GuestAddress(phys + i)) {
            Ok(b) => out.push(b),
            Err(_) => break,
        }
    }
    out
}

/// Walks the guest's page tables for `linear` (4- or 5-level, PAE, 32-bit).
pub fn walk(mem: &GuestMemoryMmap, s: &kvm_sregs, linear: u64) -> Option<u64> {
    const CR0_PG: u64 = 1 << 31;
    const CR4_PSE: u64 = 1 << 4;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_LA57: u64 = 1 << 12;
    const EFER_LMA: u64 = 1 << 10;
    const P: u64 = 1;
    const PS: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    if s.cr0 & CR0_PG == 0 {
        return Some(linear);
    }
    let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).ok();
    if s.efer & EFER_LMA != 0 {
        let levels = if s.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        let mut table = s.cr3 & ADDR;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let e = read(table + ((linear >> shift) & 0x1ff) * 8)?;
            if e & P == 0 {
                return None;
            }
            if level == 1 || ((level == 2 || level == 3) && e & PS != 0) {
                let page = (e & ADDR) & !((1u64 << shift) - 1);
                return Some(page | (linear & ((1u64 << shift) - 1)));
            }
            table = e & ADDR;
        }
        None
    } else if s.cr4 & CR4_PAE != 0 {
        let pdpte = read((s.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8)?;
        if pdpte & P == 0 {
            return None;
        }
        let pde = read((pdpte & ADDR) + ((linear >> 21) & 0x1ff) * 8)?;
        if pde & P == 0 {
            return None;
        }
        if pde & PS != 0 {
            return Some((pde & ADDR & !0x1f_ffff) | (linear & 0x1f_ffff));
        }
        let pte = read((pde & ADDR) + ((linear >> 12) & 0x1ff) * 8)?;
        (pte & P != 0).then_some((pte & ADDR) | (linear & 0xfff))
    } else {
        let read32 = |addr: u64| mem.read_obj::<u32>(GuestAddress(addr)).ok().map(u64::from);
        let pde = read32((s.cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4)?;
        if pde & P == 0 {
            return None;
        }
        if pde & PS != 0 && s.cr4 & CR4_PSE != 0 {
            return Some((pde & 0xffc0_0000) | (linear & 0x3f_ffff));
        }
        let pte = read32((pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4)?;
        (pte & P != 0).then_some((pte & 0xffff_f000) | (linear & 0xfff))
    }
}

/// Names the instructions KVM's emulator is known to refuse, from their bytes.
pub fn guess_instruction(bytes: &[u8]) -> Option<&'static str> {
    let mut i = 0;
    let mut rep = false;
    let mut rex_w = false;
    let mut opsize = false;
    while let Some(&b) = bytes.get(i) {
        match b {
            0xf3 => rep = true,
            0x66 => opsize = true,
            0xf0 | 0xf2 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x67 => {}
            0x40..=0x4f => {
                rex_w = b & 8 != 0;
                i += 1;
                break;
            }
            _ => break,
        }
        i += 1;
    }
    let op = bytes.get(i..)?;
    let modrm = |k: usize| op.get(k).map(|m| (m >> 6, (m >> 3) & 7, m & 7));
    Some(match *op.first()? {
        0xcc => "int3",
        0xcd => "int n",
        0xcf if rex_w => "iretq",
        0xcf => "iret",
        0x9b => "fwait",
        0xd8..=0xdf => "x87 floating point",
        0xf4 => "hlt",
        0x0f => match *op.get(1)? {
            0x0b => "ud2",
            0x31 => "rdtsc",
            0x30 => "wrmsr",
            0x32 => "rdmsr",
            0xa2 => "cpuid",
            0x01 => match *op.get(2)? {
                0xca => "clac",
                0xcb => "stac",
                0xd0 => "xgetbv",
                0xd1 => "xsetbv",
                0xee => "rdpkru",
                0xef => "wrpkru",
                0xf9 => "rdtscp",
                _ => return None,
            },
            0xb8 if rep => "popcnt",
            0xbc if rep => "tzcnt",
            0xbd if rep => "lzcnt",
            0xae => match modrm(2)? {
                (3, r, _) if rep => ["rdfsbase", "rdgsbase", "wrfsbase", "wrgsbase"]
                    .get(r as usize)
                    .copied()
                    .unwrap_or("fence"),
                (3, 5, _) => "lfence",
                (3, 6, _) => "mfence",
                (3, 7, _) => "sfence",
                (_, 0, _) => "fxsave",
                (_, 1, _) => "fxrstor",
                (_, 2, _) => "ldmxcsr",
                (_, 3, _) => "stmxcsr",
                (_, 4, _) => "xsave",
                (_, 5, _) => "xrstor",
                (_, 6, _) => "xsaveopt",
                (_, 7, _) => "clflush",
                _ => return None,
            },
            0xc7 => match modrm(2)? {
                (m, 1, _) if m != 3 && rex_w => "cmpxchg16b",
                (m, 1, _) if m != 3 => "cmpxchg8b",
                (3, 6, _) => "rdrand",
                (3, 7, _) => "rdseed",
                (_, 3, _) => "xrstors",
                (_, 4, _) => "xsavec",
                (_, 5, _) => "xsaves",
                _ => return None,
            },
            0x38 if opsize && op.get(2) == Some(&0x82) => "invpcid",
            0x10 | 0x11 | 0x28 | 0x29 | 0x57 | 0x6f | 0x7f | 0xef => "SSE",
            _ => return None,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_known_refusals() {
        assert_eq!(guess_instruction(&[0xcc]), Some("int3"));
        assert_eq!(guess_instruction(&[0x48, 0x0f, 0xae, 0x2f]), Some("xrstor"));
        assert_eq!(guess_instruction(&[0x0f, 0xae, 0x6d, 0x00]), Some("xrstor"));
        assert_eq!(
            guess_instruction(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7]),
            Some("popcnt")
        );
        assert_eq!(guess_instruction(&[0x0f, 0x01, 0xca]), Some("clac"));
        assert_eq!(guess_instruction(&[0x9b]), Some("fwait"));
        assert_eq!(
            guess_instruction(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]),
            Some("cmpxchg16b")
        );
        assert_eq!(guess_instruction(&[0x90]), None);
        assert_eq!(guess_instruction(&[]), None);
    }

    #[test]
    fn walks_4_level_tables() {
        let mem = crate::memory::create(16 << 20).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> page 0x5000.
        let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).unwrap();
        let linear: u64 = 0xffff_ffff_8123_4567;
        let idx = |shift: u32| (linear >> shift) & 0x1ff;
        w(0x1000 + idx(39) * 8, 0x2000 | 3);
        w(0x2000 + idx(30) * 8, 0x3000 | 3);
        w(0x3000 + idx(21) * 8, 0x4000 | 3);
        w(0x4000 + idx(12) * 8, 0x5000 | 3);
        let s = kvm_sregs {
            cr0: 0x8000_0011,
            cr3: 0x1000,
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        };
        assert_eq!(walk(&mem, &s, linear), Some(0x5567));
        // A 2 MiB page at the PD level.
        w(0x3000 + idx(21) * 8, 0x60_0000 | 0x83);
        assert_eq!(
            walk(&mem, &s, linear),
            Some(0x60_0000 | (linear & 0x1f_ffff))
        );
        // Not present.
        w(0x1000 + idx(39) * 8, 0);
        assert_eq!(walk(&mem, &s, linear), None);
    }
}
