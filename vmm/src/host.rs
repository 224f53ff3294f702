//! What a VM's state needs of the host it is restored on, and the check a
//! backup runs at Hello, long before any takeover: the XSAVE area size, the
//! MSRs the state carries, the TSC frequency (this KVM has no TSC scaling)
//! and the CPUID features the guest may be using.

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

/// The CPUID leaves whose feature bits a guest may rely on:
/// (function, index, which registers hold feature bits).
const FEATURE_LEAVES: [(u32, u32, [bool; 4]); 4] = [
    // eax, ebx, ecx, edx
    (1, 0, [false, false, true, true]),
    (7, 0, [false, true, true, true]),
    (0xd, 1, [true, false, false, false]),
    (0x8000_0001, 0, [false, false, true, true]),
];

/// Feature bits that describe the vCPU's place or the hypervisor rather than
/// an instruction set (leaf 1 ecx: bit 31 hypervisor, bit 27 OSXSAVE which
/// mirrors CR4, bit 21 x2APIC which KVM emulates): never a reason to refuse.
fn ignored(function: u32, reg: usize) -> u32 {
    match (function, reg) {
        (1, 2) => (1 << 31) | (1 << 27) | (1 << 21),
        _ => 0,
    }
}

/// One CPUID leaf's feature registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureLeaf {
    /// CPUID function.
    pub function: u32,
    /// Sub-leaf.
    pub index: u32,
    /// eax, ebx, ecx, edx (only the feature registers are compared).
    pub regs: [u32; 4],
}

/// What a VM's state needs of a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNeeds {
    /// 32-bit words of the XSAVE area in the vCPU state.
    pub xsave_words: u32,
    /// MSR indices the vCPU state carries, ascending.
    pub msrs: Vec<u32>,
    /// The guest's TSC frequency, kHz.
    pub tsc_khz: u32,
    /// Feature leaves of the guest's CPUID.
    pub cpuid: Vec<FeatureLeaf>,
}

/// How a host falls short of a state's needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostMismatch {
    /// The XSAVE area sizes differ (different CPU generations).
    #[error("the primary's XSAVE area has {primary} words, this host's {backup}: pair hosts of the same CPU model")]
    Xsave {
        /// The state's.
        primary: u32,
        /// This host's.
        backup: u32,
    },
    /// The state carries an MSR this host's KVM cannot set.
    #[error("the primary's vCPU state carries MSR {index:#x}, which this host's KVM cannot restore: pair hosts with the same kernel and CPU model")]
    Msr {
        /// The MSR.
        index: u32,
    },
    /// The TSC frequencies differ (no TSC scaling here: the guest's clock
    /// would run at another rate).
    #[error("the primary's guest TSC runs at {primary} kHz, this host's at {backup} kHz (no TSC scaling): pair hosts of the same CPU model")]
    TscKhz {
        /// The state's.
        primary: u32,
        /// This host's.
        backup: u32,
    },
    /// The guest may use CPU features this host lacks.
    #[error("the guest may use CPUID {function:#x}.{index} {reg} bits {missing:#x}, which this host lacks: pair hosts of the same CPU model")]
    Cpuid {
        /// Function.
        function: u32,
        /// Sub-leaf.
        index: u32,
        /// Register name.
        reg: &'static str,
        /// Bits missing here.
        missing: u32,
    },
}

/// The feature leaves of a CPUID table.
pub fn feature_leaves(cpuid: &[kvm_cpuid_entry2]) -> Vec<FeatureLeaf> {
    FEATURE_LEAVES
        .iter()
        .filter_map(|&(function, index, _)| {
            cpuid
                .iter()
                .find(|e| e.function == function && e.index == index)
                .map(|e| FeatureLeaf {
                    function,
                    index,
                    regs: [e.eax, e.ebx, e.ecx, e.edx],
                })
        })
        .collect()
}

impl HostNeeds {
    /// Checks these needs (the primary's) against a host that offers `here`
    /// and whose KVM supports `supported` CPUID.
    pub fn check(
        &self,
        here: &HostNeeds,
        supported: &[kvm_cpuid_entry2],
    ) -> Result<(), HostMismatch> {
        if self.xsave_words != here.xsave_words {
            return Err(HostMismatch::Xsave {
                primary: self.xsave_words,
                backup: here.xsave_words,
            });
        }
        if let Some(&index) = self
            .msrs
            .iter()
            .find(|m| here.msrs.binary_search(m).is_err())
        {
            return Err(HostMismatch::Msr { index });
        }
        if self.tsc_khz != here.tsc_khz {
            return Err(HostMismatch::TscKhz {
                primary: self.tsc_khz,
                backup: here.tsc_khz,
            });
        }
        let offered = feature_leaves(supported);
        for leaf in &self.cpuid {
            let Some(&(_, _, which)) = FEATURE_LEAVES
                .iter()
                .find(|(f, i, _)| *f == leaf.function && *i == leaf.index)
            else {
                continue;
            };
            let have = offered
                .iter()
                .find(|o| o.function == leaf.function && o.index == leaf.index)
                .map(|o| o.regs)
                .unwrap_or([0; 4]);
            for (reg, name) in ["eax", "ebx", "ecx", "edx"].into_iter().enumerate() {
                if !which[reg] {
                    continue;
                }
                let missing = leaf.regs[reg] & !have[reg] & !ignored(leaf.function, reg);
                if missing != 0 {
                    return Err(HostMismatch::Cpuid {
                        function: leaf.function,
                        index: leaf.index,
                        reg: name,
                        missing,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn needs(cpuid: &[kvm_cpuid_entry2]) -> HostNeeds {
        HostNeeds {
            xsave_words: 1024,
            msrs: vec![0x10, 0x174],
            tsc_khz: 2_000_000,
            cpuid: feature_leaves(cpuid),
        }
    }

    #[test]
    fn same_host_fits() {
        let c = [leaf(1, 0, [0, 0, 0x8000_0001, 3]), leaf(7, 0, [0, 9, 0, 0])];
        needs(&c).check(&needs(&c), &c).unwrap();
    }

    #[test]
    fn each_difference_is_named() {
        let c = [leaf(7, 0, [0, 0b1011, 0, 0])];
        let here = needs(&c);
        let mut p = needs(&c);
        p.xsave_words = 2000;
        assert!(matches!(
            p.check(&here, &c),
            Err(HostMismatch::Xsave { .. })
        ));
        let mut p = needs(&c);
        p.msrs.push(0x4b56_4d00);
        assert_eq!(
            p.check(&here, &c),
            Err(HostMismatch::Msr { index: 0x4b56_4d00 })
        );
        let mut p = needs(&c);
        p.tsc_khz += 1;
        assert!(matches!(
            p.check(&here, &c),
            Err(HostMismatch::TscKhz { .. })
        ));
        let more = [leaf(7, 0, [0, 0b1111, 0, 0])];
        let p = needs(&more);
        assert_eq!(
            p.check(&here, &c),
            Err(HostMismatch::Cpuid {
                function: 7,
                index: 0,
                reg: "ebx",
                missing: 0b0100
            })
        );
    }

    #[test]
    fn hypervisor_and_osxsave_bits_are_not_features() {
        let p = [leaf(1, 0, [0, 0, 1 << 31 | 1 << 27, 0])];
        let here = [leaf(1, 0, [0, 0, 0, 0])];
        needs(&p).check(&needs(&here), &here).unwrap();
    }
}
