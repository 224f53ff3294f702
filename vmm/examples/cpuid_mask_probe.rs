// Temporary probe (not committed): which CPUID bits does this KVM let us clear?
use kvm_ioctls::Kvm;
fn main() {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let sup = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let v = vm.create_vcpu(0).unwrap();
    let mut c = sup.clone();
    for e in c.as_mut_slice() {
        if e.function == 1 {
            println!("sup leaf1 ecx={:#x} edx={:#x}", e.ecx, e.edx);
            e.ecx = 0;
            e.edx = 0;
        }
        if e.function == 7 && e.index == 0 {
            println!(
                "sup leaf7 ebx={:#x} ecx={:#x} edx={:#x}",
                e.ebx, e.ecx, e.edx
            );
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        if e.function == 0x80000001 {
            println!("sup ext edx={:#x} ecx={:#x}", e.edx, e.ecx);
            e.edx = 0;
            e.ecx = 0;
        }
    }
    v.set_cpuid2(&c).unwrap();
    let g = v.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
    for e in g.as_slice() {
        if e.function == 1 {
            println!("kept leaf1 ecx={:#x} edx={:#x}", e.ecx, e.edx);
        }
        if e.function == 7 && e.index == 0 {
            println!(
                "kept leaf7 ebx={:#x} ecx={:#x} edx={:#x}",
                e.ebx, e.ecx, e.edx
            );
        }
        if e.function == 0x80000001 {
            println!("kept ext edx={:#x} ecx={:#x}", e.edx, e.ecx);
        }
    }
}
