//! The foundation's KVM tests: capture/restore equivalence, pause/resume
//! under load, and shape checks. Each runs real guests on /dev/kvm.

use castor_tests::{check_contiguous, require_kvm, Recorder};
use castor_vmm::{
    DirtierParams, Error, GuestBoot, Pattern, StopReason, VcpuRunState, Vm, VmConfig, Workload,
};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

const MEM: u64 = 64 << 20;

fn dirtier(record_every: u64, rate: u64) -> GuestBoot {
    GuestBoot {
        workload: Workload::Dirtier(DirtierParams {
            working_set: 16 << 20,
            dirty_rate: rate,
            pattern: Pattern::Uniform,
            bytes_per_page: 64,
            record_every,
            use_entropy: false,
        }),
        seed: 42,
    }
}

fn no_vcpu_failed(vm: &Vm) {
    for (i, s) in vm.vcpu_states().iter().enumerate() {
        if let VcpuRunState::Stopped(r) = s {
            assert_eq!(
                *r,
                StopReason::SinkStop,
                "vCPU {i} stopped unexpectedly: {r}"
            );
        }
    }
}

/// (a) Capture at a random instant, restore into a fresh VM, resume both: both
/// emit the identical next 1,000 records and end with identical memory.
fn capture_restore_equivalence(vcpus: u32, instants: usize, seed: u64) {
    require_kvm();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cfg = VmConfig {
        vcpus,
        mem_bytes: MEM,
        ..VmConfig::default()
    };
    for round in 0..instants {
        let rec_a = Arc::new(Recorder::new());
        let a = Vm::new(&cfg, rec_a.clone()).expect("create VM A");
        a.boot(&dirtier(64, 0)).expect("boot");
        a.resume();
        std::thread::sleep(Duration::from_micros(rng.gen_range(500..40_000)));
        a.pause();
        no_vcpu_failed(&a);
        let state = a.capture_state().expect("capture");
        let mem = a.read_memory().expect("read memory");
        let tsc_before: Vec<u64> = state
            .vcpus
            .iter()
            .map(|v| {
                v.msrs
                    .iter()
                    .find(|m| m.index == 0x10)
                    .map(|m| m.data)
                    .unwrap_or(0)
            })
            .collect();

        let rec_b = Arc::new(Recorder::new());
        let b = Vm::new(&cfg, rec_b.clone()).expect("create VM B");
        b.write_memory(&mem).expect("copy memory");
        b.restore_state(&state).expect("restore");

        // The restored guest's clock does not run backwards.
        let state_b = b.capture_state().expect("capture B");
        for (i, v) in state_b.vcpus.iter().enumerate() {
            let tsc = v
                .msrs
                .iter()
                .find(|m| m.index == 0x10)
                .map(|m| m.data)
                .unwrap_or(0);
            assert!(
                tsc >= tsc_before[i],
                "round {round}: vCPU {i} TSC went backwards: {tsc} < {}",
                tsc_before[i]
            );
        }
        assert!(
            state_b.vm.clock.clock >= state.vm.clock.clock,
            "kvmclock went backwards"
        );

        let mut starts = Vec::new();
        for v in 0..vcpus {
            let last = rec_a.last_seq(v);
            starts.push(last);
            rec_a.stop_after(v, last + 1000);
            rec_b.stop_after(v, last + 1000);
        }
        a.resume();
        b.resume();
        assert!(
            rec_a.wait_stopped(vcpus as usize, Duration::from_secs(60)),
            "A never reached its limit"
        );
        assert!(
            rec_b.wait_stopped(vcpus as usize, Duration::from_secs(60)),
            "B never reached its limit"
        );
        a.pause();
        b.pause();
        no_vcpu_failed(&a);
        no_vcpu_failed(&b);
        for v in 0..vcpus {
            let after_a: Vec<_> = rec_a
                .records_of(v)
                .into_iter()
                .filter(|r| r.seq > starts[v as usize])
                .collect();
            let after_b = rec_b.records_of(v);
            assert_eq!(
                after_a.len(),
                1000,
                "round {round}: A vCPU {v} emitted {}",
                after_a.len()
            );
            assert_eq!(
                after_a, after_b,
                "round {round}: vCPU {v}: the restored VM's records differ from the original's"
            );
        }
        let (ma, mb) = (a.read_memory().unwrap(), b.read_memory().unwrap());
        if ma != mb {
            let diffs: Vec<usize> = ma
                .iter()
                .zip(&mb)
                .enumerate()
                .filter(|(_, (x, y))| x != y)
                .map(|(i, _)| i)
                .collect();
            let show: Vec<String> = diffs
                .iter()
                .take(16)
                .map(|&i| format!("{i:#x}: {:#04x} vs {:#04x}", ma[i], mb[i]))
                .collect();
            panic!(
                "round {round}: memory differs in {} bytes: {}",
                diffs.len(),
                show.join(", ")
            );
        }
    }
}

#[test]
fn capture_restore_equivalence_1_vcpu() {
    capture_restore_equivalence(1, 10, 1);
}

#[test]
fn capture_restore_equivalence_2_vcpus() {
    capture_restore_equivalence(2, 10, 2);
}

/// (b) 1,000 pause/resume cycles under load lose or duplicate no record.
#[test]
fn pause_resume_cycles_lose_nothing() {
    require_kvm();
    for vcpus in [1, 2] {
        let rec = Arc::new(Recorder::new());
        let vm = Vm::new(
            &VmConfig {
                vcpus,
                mem_bytes: MEM,
                ..VmConfig::default()
            },
            rec.clone(),
        )
        .unwrap();
        let every = 32;
        vm.boot(&dirtier(every, 0)).unwrap();
        vm.resume();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..300)));
            vm.pause();
            assert!(vm.is_paused());
            for s in vm.vcpu_states() {
                assert_eq!(
                    s,
                    VcpuRunState::Paused,
                    "a vCPU is not paused after pause()"
                );
            }
            vm.resume();
        }
        // Every vCPU still makes progress: each goes on to its 101st record
        // (waiting for the records, not a fixed time, so a loaded host
        // only makes this slower).
        for v in 0..vcpus {
            assert!(
                rec.wait_seq(v, 101, Duration::from_secs(60)),
                "vCPU {v} made too little progress: last record {}",
                rec.last_seq(v)
            );
        }
        vm.pause();
        no_vcpu_failed(&vm);
        let records = rec.records();
        check_contiguous(&records, vcpus, every).unwrap();
    }
}

/// (c) A state restored into a VM of another shape is refused with a clear error.
#[test]
fn restore_into_other_shape_fails() {
    require_kvm();
    let sink = Arc::new(Recorder::new());
    let a = Vm::new(
        &VmConfig {
            vcpus: 2,
            mem_bytes: MEM,
            ..VmConfig::default()
        },
        sink.clone(),
    )
    .unwrap();
    a.boot(&dirtier(64, 0)).unwrap();
    a.resume();
    std::thread::sleep(Duration::from_millis(5));
    a.pause();
    let state = a.capture_state().unwrap();

    let fewer = Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes: MEM,
            ..VmConfig::default()
        },
        sink.clone(),
    )
    .unwrap();
    let err = fewer.restore_state(&state).unwrap_err();
    assert!(matches!(err, Error::StateMismatch(_)), "{err}");
    assert!(err.to_string().contains("2 vCPUs"), "{err}");

    let bigger = Vm::new(
        &VmConfig {
            vcpus: 2,
            mem_bytes: 2 * MEM,
            ..VmConfig::default()
        },
        sink,
    )
    .unwrap();
    let err = bigger.restore_state(&state).unwrap_err();
    assert!(matches!(err, Error::StateMismatch(_)), "{err}");
    assert!(err.to_string().contains("memory layout"), "{err}");
}

/// The state survives serialization (it is plain serde data).
#[test]
fn state_is_plain_serde_data() {
    require_kvm();
    let a = Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes: MEM,
            ..VmConfig::default()
        },
        Arc::new(Recorder::new()),
    )
    .unwrap();
    a.boot(&dirtier(64, 0)).unwrap();
    a.resume();
    std::thread::sleep(Duration::from_millis(5));
    a.pause();
    let state = a.capture_state().unwrap();
    let bytes = bincode::serialize(&state).unwrap();
    let back: castor_vmm::VmState = bincode::deserialize(&bytes).unwrap();
    assert_eq!(bincode::serialize(&back).unwrap(), bytes);
}

/// Invalid shapes are refused before touching KVM, with a message that says what to fix.
#[test]
fn invalid_shapes_are_explained() {
    let sink = Arc::new(Recorder::new());
    let e = Vm::new(
        &VmConfig {
            vcpus: 0,
            mem_bytes: MEM,
            ..VmConfig::default()
        },
        sink.clone(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("use 1 to 8"), "{e}");
    let e = Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes: 8 << 20,
            ..VmConfig::default()
        },
        sink,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("16M to 16G"), "{e}");
}
