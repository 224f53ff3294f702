//! The part conformance test (castor_parts::part_conformance!) for every
//! part a VM has, on real KVM: stage on a running-then-paused VM, encode,
//! check and restore into a fresh VM twice, stage again and compare (fields
//! that a running clock moves are masked), and the refusals every part owes
//! an untrusted peer.

use castor_parts::{part_conformance, Part, PartId, PartKind};
use castor_tests::require_kvm;
use castor_vmm::devices::{NetConfig, Tap, VirtioNet};
use castor_vmm::state::{VcpuState, VmDevicesState};
use castor_vmm::{DirtierParams, GuestBoot, NullSink, Vm, VmConfig, Workload};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

static TAPS: AtomicU32 = AtomicU32::new(0);

fn vm(net: bool) -> Arc<Vm> {
    require_kvm();
    let vm = Vm::new(
        &VmConfig {
            vcpus: 2,
            mem_bytes: 32 << 20,
            ..VmConfig::default()
        },
        Arc::new(NullSink),
    )
    .unwrap();
    if net {
        let name = format!(
            "cpt{}x{}",
            std::process::id() % 10_000,
            TAPS.fetch_add(1, Ordering::Relaxed)
        );
        vm.devices()
            .add_virtio_net(VirtioNet::new(NetConfig {
                tap: Arc::new(Tap::open(&name).expect("creating a tap needs root")),
                mac: [2, 0xca, 0x57, 0, 0, 7],
                tx_sink: None,
            }))
            .unwrap();
    }
    Arc::new(vm)
}

/// A source VM that ran its guest for a while, paused, and a fresh one.
fn pair(net: bool) -> (Arc<Vm>, Arc<Vm>) {
    let src = vm(net);
    src.boot(&GuestBoot {
        workload: Workload::Dirtier(DirtierParams::default()),
        seed: 5,
    })
    .unwrap();
    src.resume();
    std::thread::sleep(Duration::from_millis(50));
    src.pause();
    (src, vm(net))
}

fn part(vm: &Arc<Vm>, id: PartId) -> Arc<dyn Part> {
    castor_vmm::parts::vm_parts(vm)
        .get(id)
        .cloned()
        .unwrap_or_else(|| panic!("no part {id}"))
}

fn same_vcpu(a: &[u8], b: &[u8]) -> Result<(), String> {
    let id = PartId::new(PartKind::Vcpu, 0);
    let a: VcpuState = castor_parts::decode_section(id, 1, a).map_err(|e| e.to_string())?;
    let b: VcpuState = castor_parts::decode_section(id, 1, b).map_err(|e| e.to_string())?;
    let regs = |s: &VcpuState| format!("{:?}", s.regs);
    let sregs = |s: &VcpuState| format!("{:?}", s.sregs);
    // IA32_TSC keeps counting while a VM is paused: mask it.
    let msrs = |s: &VcpuState| -> Vec<(u32, u64)> {
        s.msrs
            .iter()
            .filter(|m| m.index != 0x10)
            .map(|m| (m.index, m.data))
            .collect()
    };
    for (what, x, y) in [
        ("regs", regs(&a), regs(&b)),
        ("sregs", sregs(&a), sregs(&b)),
        ("xcrs", format!("{:?}", a.xcrs), format!("{:?}", b.xcrs)),
        (
            "mp_state",
            format!("{:?}", a.mp_state),
            format!("{:?}", b.mp_state),
        ),
        ("cpuid", format!("{:?}", a.cpuid), format!("{:?}", b.cpuid)),
        ("msrs", format!("{:?}", msrs(&a)), format!("{:?}", msrs(&b))),
    ] {
        if x != y {
            return Err(format!("{what} differ"));
        }
    }
    if a.xsave != b.xsave || a.id != b.id {
        return Err("xsave or id differ".into());
    }
    Ok(())
}

fn same_kvm_vm(a: &[u8], b: &[u8]) -> Result<(), String> {
    let id = PartId::new(PartKind::KvmVm, 0);
    let a: VmDevicesState = castor_parts::decode_section(id, 1, a).map_err(|e| e.to_string())?;
    let b: VmDevicesState = castor_parts::decode_section(id, 1, b).map_err(|e| e.to_string())?;
    // The PIT's and kvmclock's counters run in real time: compare the chips.
    for (what, x, y) in [
        (
            "pic master",
            format!("{:?}", a.pic_master),
            format!("{:?}", b.pic_master),
        ),
        (
            "pic slave",
            format!("{:?}", a.pic_slave),
            format!("{:?}", b.pic_slave),
        ),
        (
            "ioapic",
            format!("{:?}", a.ioapic),
            format!("{:?}", b.ioapic),
        ),
    ] {
        if x != y {
            return Err(format!("{what} differ"));
        }
    }
    if b.clock.clock < a.clock.clock {
        return Err("kvmclock went backwards".into());
    }
    Ok(())
}

part_conformance!(
    vcpu_part_conforms,
    || {
        let (s, d) = pair(false);
        let id = PartId::new(PartKind::Vcpu, 0);
        (part(&s, id), part(&d, id))
    },
    same_vcpu
);

part_conformance!(
    kvm_vm_part_conforms,
    || {
        let (s, d) = pair(false);
        let id = PartId::new(PartKind::KvmVm, 0);
        (part(&s, id), part(&d, id))
    },
    same_kvm_vm
);

part_conformance!(mmio_net_part_conforms, || {
    let (s, d) = pair(true);
    let id = PartId::new(PartKind::Mmio, 0);
    (part(&s, id), part(&d, id))
});

/// A vCPU state with another vCPU's label, or an XSAVE area of another size,
/// is refused at check, before it can become live.
#[test]
fn mislabelled_or_misshapen_vcpu_state_is_refused() {
    let (s, d) = pair(false);
    let id0 = PartId::new(PartKind::Vcpu, 0);
    let id1 = PartId::new(PartKind::Vcpu, 1);
    let staged = part(&s, id0).stage().unwrap();
    let mut bytes = Vec::new();
    staged.encode(&mut bytes).unwrap();
    assert!(
        part(&d, id1).check(1, &bytes).is_err(),
        "vCPU 0's state accepted for vCPU 1"
    );
    let mut st: VcpuState = castor_parts::decode_section(id0, 1, &bytes).unwrap();
    st.xsave.push(0);
    let mut bad = Vec::new();
    castor_parts::encode_section(id0, &st, &mut bad).unwrap();
    assert!(
        part(&d, id0).check(1, &bad).is_err(),
        "wrong XSAVE size accepted"
    );
}
