// Temporary probe (not committed).
use castor_vmm::*;
use std::sync::Arc;
fn main() {
    for policy in [linux::CpuidPolicy::Hardware, linux::CpuidPolicy::Pvm] {
        let vm = Vm::new(
            &VmConfig {
                vcpus: 1,
                mem_bytes: 256 << 20,
                ..VmConfig::default()
            },
            Arc::new(NullSink),
        )
        .unwrap();
        let r = vm
            .boot_linux_with(
                &LinuxBoot {
                    kernel: "/tmp/kit/t/cpuid.elf".into(),
                    initrd: None,
                    cmdline: String::new(),
                },
                policy,
            )
            .unwrap();
        vm.resume();
        std::thread::sleep(std::time::Duration::from_secs(2));
        vm.pause();
        let m = vm.read_memory().unwrap();
        let st = vm.capture_state().unwrap();
        for e in &st.vcpus[0].cpuid {
            if e.function == 1 || (e.function == 7 && e.index == 0) {
                println!(
                    "  stored leaf {:#x}.{} eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
                    e.function, e.index, e.eax, e.ebx, e.ecx, e.edx
                );
            }
        }
        let w = |o: usize| u32::from_le_bytes(m[o..o + 4].try_into().unwrap());
        println!(
            "{policy:?} {:?} leaf1.ecx={:#x} leaf7.ebx={:#x} marker={:#x} states={:?}",
            r.protocol,
            w(0x5000),
            w(0x5004),
            w(0x5008),
            vm.vcpu_states()
        );
    }
}
