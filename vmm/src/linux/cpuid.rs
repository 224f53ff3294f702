//! The CPUID a Linux guest sees: what KVM supports (with each vCPU's APIC
//! id, as for every Castor VM) minus what the host cannot back.
//!
//! * Everywhere: `IA32_ARCH_CAPABILITIES` (CPUID.7.0:EDX[29]). KVM lists it,
//!   but a host may refuse the MSR (0x10a) it announces, and the kernel reads
//!   it early; a stock kernel under QEMU `-cpu host` died on exactly that.
//! * On PVM (`kvm_pvm`), guest ring 0 runs through KVM's x86 instruction
//!   emulator, which has no emulation for some instructions. A feature whose
//!   instructions the kernel would use in ring 0 is hidden so the kernel
//!   takes its fallback path ([`PVM_HIDDEN`] lists each with the instruction
//!   at stake). Instructions the kernel uses unconditionally (`int3` in its
//!   alternatives self-test, for one) still stop the vCPU, with a report.
//!
//! On hardware KVM (no `kvm_pvm`) only the first rule applies.
//!
//! KVM may put bits back: PVM keeps leaves 1 and 7 at the host's values
//! (see [`kept`]), so on this machine kind the kernel still sees `xsave`,
//! `smap`, `popcnt` and the rest, and stops at `xrstor` when it sets up its
//! FPU. [`crate::Vm::boot_linux`] reports what KVM kept.

use kvm_bindings::CpuId;

/// A CPUID feature bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureBit {
    /// Leaf (EAX input).
    pub leaf: u32,
    /// Sub-leaf (ECX input) for leaves that have them.
    pub subleaf: u32,
    /// Output register: 0 = EAX, 1 = EBX, 2 = ECX, 3 = EDX.
    pub reg: u8,
    /// Bit number.
    pub bit: u8,
    /// Feature name (as in /proc/cpuinfo) and why it goes.
    pub why: &'static str,
}

const fn fb(leaf: u32, subleaf: u32, reg: u8, bit: u8, why: &'static str) -> FeatureBit {
    FeatureBit {
        leaf,
        subleaf,
        reg,
        bit,
        why,
    }
}

const EAX: u8 = 0;
const EBX: u8 = 1;
const ECX: u8 = 2;
const EDX: u8 = 3;

/// Hidden on every host.
pub const ALWAYS_HIDDEN: &[FeatureBit] = &[fb(
    7,
    0,
    EDX,
    29,
    "arch_capabilities: MSR 0x10a, which some hosts refuse",
)];

/// Hidden on PVM: the instruction KVM's emulator cannot run in guest ring 0.
pub const PVM_HIDDEN: &[FeatureBit] = &[
    fb(
        1,
        0,
        ECX,
        26,
        "xsave: xsave/xrstor (the kernel restores FPU state with xrstor at boot)",
    ),
    fb(1, 0, ECX, 27, "osxsave: follows xsave"),
    fb(1, 0, ECX, 28, "avx: needs xsave"),
    fb(1, 0, ECX, 12, "fma: needs avx"),
    fb(1, 0, ECX, 29, "f16c: needs avx"),
    fb(1, 0, ECX, 13, "cx16: lock cmpxchg16b"),
    fb(1, 0, ECX, 23, "popcnt: popcnt (hweight alternatives)"),
    fb(1, 0, ECX, 30, "rdrand: rdrand"),
    fb(1, 0, ECX, 17, "pcid: invpcid/PCID flushes"),
    fb(7, 0, EBX, 0, "fsgsbase: rd/wr{fs,gs}base"),
    fb(7, 0, EBX, 5, "avx2: needs avx"),
    fb(7, 0, EBX, 10, "invpcid: invpcid"),
    fb(7, 0, EBX, 16, "avx512f: needs xsave"),
    fb(7, 0, EBX, 17, "avx512dq: needs xsave"),
    fb(7, 0, EBX, 18, "rdseed: rdseed"),
    fb(7, 0, EBX, 20, "smap: clac/stac"),
    fb(7, 0, EBX, 28, "avx512cd: needs xsave"),
    fb(7, 0, EBX, 30, "avx512bw: needs xsave"),
    fb(7, 0, EBX, 31, "avx512vl: needs xsave"),
    fb(7, 0, ECX, 3, "pku: rdpkru/wrpkru"),
    fb(7, 0, ECX, 16, "la57: 5-level paging"),
    fb(7, 0, ECX, 22, "rdpid: rdpid"),
    fb(0x8000_0001, 0, EDX, 27, "rdtscp: rdtscp"),
    fb(0xd, 1, EAX, 0, "xsaveopt: needs xsave"),
    fb(0xd, 1, EAX, 1, "xsavec: needs xsave"),
    fb(0xd, 1, EAX, 3, "xsaves: needs xsave"),
];

/// Which features a Linux guest's CPUID leaves out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuidPolicy {
    /// [`CpuidPolicy::Pvm`] on a PVM host, else [`CpuidPolicy::Hardware`].
    #[default]
    Auto,
    /// Only what no host backs ([`ALWAYS_HIDDEN`]).
    Hardware,
    /// Also what KVM's emulator cannot run in ring 0 ([`PVM_HIDDEN`]).
    Pvm,
}

impl CpuidPolicy {
    /// Whether the PVM list applies on this host.
    pub fn hides_pvm_features(self) -> bool {
        match self {
            CpuidPolicy::Auto => host_is_pvm(),
            CpuidPolicy::Hardware => false,
            CpuidPolicy::Pvm => true,
        }
    }
}

impl std::str::FromStr for CpuidPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(CpuidPolicy::Auto),
            "hardware" | "host" => Ok(CpuidPolicy::Hardware),
            "pvm" => Ok(CpuidPolicy::Pvm),
            other => Err(format!("{other:?}: use auto, hardware or pvm")),
        }
    }
}

/// Whether this host's KVM is PVM (guest ring 0 emulated).
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The features of `bits` still set in `actual` (what KVM kept after
/// `KVM_SET_CPUID2`), by name. PVM keeps leaves 1 and 7 at the host's own
/// values (on AMD a guest's CPUID at CPL 3 runs natively and cannot be
/// intercepted, so PVM makes the table match it): there, of [`PVM_HIDDEN`],
/// only `cx16` and the extended leaf's `rdtscp` can be hidden.
pub fn kept(actual: &CpuId, bits: &[FeatureBit]) -> Vec<&'static str> {
    let mut out = Vec::new();
    for f in bits {
        let set = actual.as_slice().iter().any(|e| {
            e.function == f.leaf && e.index == f.subleaf && {
                let r = match f.reg {
                    EAX => e.eax,
                    EBX => e.ebx,
                    ECX => e.ecx,
                    _ => e.edx,
                };
                r & (1u32 << f.bit) != 0
            }
        });
        if set {
            out.push(f.why.split(':').next().unwrap_or(f.why));
        }
    }
    out
}

/// Clears `bits` in `cpuid`.
pub fn hide(cpuid: &mut CpuId, bits: &[FeatureBit]) {
    for e in cpuid.as_mut_slice() {
        for f in bits {
            if e.function != f.leaf || e.index != f.subleaf {
                continue;
            }
            let r = match f.reg {
                EAX => &mut e.eax,
                EBX => &mut e.ebx,
                ECX => &mut e.ecx,
                _ => &mut e.edx,
            };
            *r &= !(1u32 << f.bit);
        }
    }
}

/// The CPUID for a Linux guest on this host, from the VM's table.
pub fn for_linux(base: &CpuId, pvm: bool) -> CpuId {
    let mut c = base.clone();
    hide(&mut c, ALWAYS_HIDDEN);
    if pvm {
        hide(&mut c, PVM_HIDDEN);
        // Without XSAVE the XSAVE leaf describes nothing.
        for e in c.as_mut_slice() {
            if e.function == 0xd {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn hides_arch_capabilities_and_pvm_features() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: u32::MAX,
                edx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                ebx: u32::MAX,
                edx: u32::MAX,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        let hw = for_linux(&base, false);
        assert_eq!(hw.as_slice()[1].edx & (1 << 29), 0);
        assert_eq!(hw.as_slice()[0].ecx, u32::MAX, "hardware KVM keeps xsave");
        let pvm = for_linux(&base, true);
        assert_eq!(pvm.as_slice()[0].ecx & (1 << 26), 0, "no xsave on PVM");
        assert_eq!(pvm.as_slice()[1].ebx & (1 << 20), 0, "no smap on PVM");
        assert_eq!(pvm.as_slice()[0].edx, u32::MAX);
    }
}
