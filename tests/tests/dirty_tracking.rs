//! Dirty tracking on real KVM: every harvest holds every page whose content
//! changed since the previous epoch (checked against a host-side copy of
//! guest memory), nothing else beyond the documented extra pages, every page
//! the VMM wrote, and nothing is lost when a vCPU's dirty ring fills.

use castor_tests::{require_kvm, Recorder};
use castor_vmm::{
    DirtierParams, DirtyBackend, DirtySet, DirtyTracking, GuestBoot, Pattern, StopReason,
    VcpuRunState, Vm, VmConfig, Workload,
};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MEM: u64 = 32 << 20;
const PAGE: usize = 4096;
/// The dirtier's regions end here (4 MiB + working set); the VMM writes above.
const WORKING_SET: u64 = 16 << 20;
const SPARE_START: u64 = (4 << 20) + WORKING_SET;

fn boot(pattern: Pattern, working_set: u64, record_every: u64) -> GuestBoot {
    GuestBoot {
        workload: Workload::Dirtier(DirtierParams {
            working_set,
            dirty_rate: 0,
            pattern,
            bytes_per_page: 64,
            record_every,
            use_entropy: false,
        }),
        seed: 7,
    }
}

fn new_vm(mode: DirtyTracking, vcpus: u32, ring_entries: u32) -> (Vm, Arc<Recorder>) {
    let rec = Arc::new(Recorder::new());
    let vm = Vm::new(
        &VmConfig {
            vcpus,
            mem_bytes: MEM,
            dirty_tracking: mode,
            dirty_ring_entries: ring_entries,
        },
        rec.clone(),
    )
    .expect("create VM with dirty tracking");
    (vm, rec)
}

fn no_vcpu_stopped(vm: &Vm) {
    for (i, s) in vm.vcpu_states().iter().enumerate() {
        if let VcpuRunState::Stopped(r) = s {
            assert_eq!(*r, StopReason::SinkStop, "vCPU {i} stopped: {r}");
        }
    }
}

/// What a harvested page whose content did not change may be (see the crate
/// docs of castor-dirty-tracking); `None` = not allowed.
fn extra_kind(gpa: u64, vcpus: u32) -> Option<&'static str> {
    const AREA: u64 = 0x20_0000;
    const AREA_SIZE: u64 = 0x2_0000;
    if (AREA..AREA + vcpus as u64 * AREA_SIZE).contains(&gpa) {
        return Some(if (gpa - AREA).is_multiple_of(AREA_SIZE) {
            "vcpu control page"
        } else {
            "vcpu stack"
        });
    }
    if (0x1_0000..0x1_2000 + 64 * 0x1000).contains(&gpa) {
        return Some("page tables");
    }
    None
}

struct Outcome {
    epochs: usize,
    max_harvested: u64,
    total_changed: u64,
    extras: BTreeMap<&'static str, u64>,
}

/// Runs `epochs` epochs of: resume, run a random while, pause, harvest,
/// compare with the host-side copy; between epochs the VMM writes spare pages
/// through `write_obj`, `write_slice` and a raw pointer + `mark_dirty`.
fn exactness(
    mode: DirtyTracking,
    vcpus: u32,
    ring_entries: u32,
    g: GuestBoot,
    epochs: usize,
    run_us: std::ops::Range<u64>,
) -> Outcome {
    require_kvm();
    let (vm, _rec) = new_vm(mode, vcpus, ring_entries);
    vm.boot(&g).expect("boot");
    vm.start_dirty_tracking().expect("start tracking");
    let mut rng = rand::rngs::StdRng::seed_from_u64(vcpus as u64 * 31 + epochs as u64);
    let mut shadow = vm.read_memory().expect("read memory");
    let mut out = Outcome {
        epochs,
        max_harvested: 0,
        total_changed: 0,
        extras: BTreeMap::new(),
    };
    let spare_pages = (MEM - SPARE_START) / PAGE as u64;
    let mut vmm_written: Vec<u64> = Vec::new();
    for epoch in 0..epochs {
        vm.resume();
        let us = rng.gen_range(run_us.clone());
        std::thread::sleep(Duration::from_micros(us));
        vm.pause();
        no_vcpu_stopped(&vm);
        let set: DirtySet = vm.harvest_dirty().expect("harvest");
        let now = vm.read_memory().expect("read memory");
        out.max_harvested = out.max_harvested.max(set.count());
        for (p, (a, b)) in now.chunks(PAGE).zip(shadow.chunks(PAGE)).enumerate() {
            let gpa = (p * PAGE) as u64;
            let changed = a != b;
            let harvested = set.contains(gpa);
            if changed {
                out.total_changed += 1;
                assert!(
                    harvested,
                    "{mode} {vcpus} vCPU(s), epoch {epoch}: page {gpa:#x} changed but was not harvested \
                     ({} harvested)",
                    set.count()
                );
            } else if harvested {
                match extra_kind(gpa, vcpus) {
                    Some(k) => *out.extras.entry(k).or_default() += 1,
                    None => {
                        // PVM's shadow MMU also logs pages it maps writable
                        // without a write to them (see the crate docs).
                        *out.extras
                            .entry("other (shadow-MMU side effect)")
                            .or_default() += 1;
                    }
                }
            }
        }
        for gpa in vmm_written.drain(..) {
            assert!(
                set.contains(gpa),
                "epoch {epoch}: VMM write to {gpa:#x} not harvested"
            );
        }
        shadow = now;
        // The VMM writes while the VM is paused: the next harvest must hold these.
        for k in 0..3u64 {
            let gpa = SPARE_START + rng.gen_range(0..spare_pages) * PAGE as u64 + 8 * k;
            let v: u64 = rng.gen::<u64>() | 1;
            match (epoch as u64 + k) % 3 {
                0 => vm
                    .memory()
                    .write_obj(v, GuestAddress(gpa))
                    .expect("write_obj"),
                1 => vm
                    .memory()
                    .write_slice(&v.to_le_bytes(), GuestAddress(gpa))
                    .expect("write_slice"),
                _ => {
                    let host = vm
                        .memory()
                        .get_host_address(GuestAddress(gpa))
                        .expect("host address");
                    // SAFETY: `host` points at 8 bytes inside guest memory, which the
                    // paused VM does not touch; a raw write, reported right after.
                    unsafe { std::ptr::write_unaligned(host as *mut u64, v) };
                    vm.mark_dirty(gpa, 8);
                }
            }
            vmm_written.push(gpa & !(PAGE as u64 - 1));
        }
    }
    println!(
        "{mode} {vcpus} vCPU(s): {} epochs, {} changed pages in all, largest harvest {}, \
         unchanged-but-harvested: {:?}",
        out.epochs, out.total_changed, out.max_harvested, out.extras
    );
    out
}

fn uniform_exactness(mode: DirtyTracking, vcpus: u32) {
    let o = exactness(
        mode,
        vcpus,
        0,
        boot(Pattern::Uniform, WORKING_SET, 64),
        1000,
        50..3000,
    );
    assert!(
        o.total_changed > 10_000,
        "the guest barely ran: {} changed pages",
        o.total_changed
    );
    let neighbours = o
        .extras
        .get("other (shadow-MMU side effect)")
        .copied()
        .unwrap_or(0);
    assert!(
        neighbours * 100 <= o.total_changed,
        "{neighbours} unchanged neighbour pages harvested for {} changed: more than 1%",
        o.total_changed
    );
}

#[test]
fn bitmap_exact_1_vcpu() {
    uniform_exactness(DirtyTracking::Bitmap, 1);
}

#[test]
fn bitmap_exact_2_vcpus() {
    uniform_exactness(DirtyTracking::Bitmap, 2);
}

#[test]
fn ring_exact_1_vcpu() {
    uniform_exactness(DirtyTracking::Ring, 1);
}

#[test]
fn ring_exact_2_vcpus() {
    uniform_exactness(DirtyTracking::Ring, 2);
}

/// A 4096-entry ring and a sequential dirtier over more pages than that per
/// epoch: the ring fills (KVM_EXIT_DIRTY_RING_FULL) mid-epoch and at the
/// pause; nothing is lost.
#[test]
fn ring_full_loses_nothing() {
    for vcpus in [1, 2] {
        let o = exactness(
            DirtyTracking::Ring,
            vcpus,
            4096,
            // 24 MiB: 6,144 pages (3,072 per vCPU with 2), more than the
            // 4,032 entries a 4,096-entry ring takes before it is full.
            boot(Pattern::Sequential, 24 << 20, 512),
            150,
            15_000..40_000,
        );
        let others = o
            .extras
            .get("other (shadow-MMU side effect)")
            .copied()
            .unwrap_or(0);
        assert!(
            others * 100 <= o.total_changed,
            "{others} unexplained extra pages"
        );
        assert!(
            o.max_harvested > 4096 + 64,
            "{vcpus} vCPU(s): no epoch dirtied more than a ring holds (largest {})",
            o.max_harvested
        );
    }
}

/// The same heavy sequential workload with the bitmap backend (the control
/// for `ring_full_loses_nothing`).
#[test]
fn bitmap_heavy_sequential() {
    for vcpus in [1, 2] {
        exactness(
            DirtyTracking::Bitmap,
            vcpus,
            0,
            boot(Pattern::Sequential, WORKING_SET, 512),
            60,
            15_000..40_000,
        );
    }
}

/// Pages the VMM writes through a device path are harvested once; ranges
/// registered as always dirty are harvested every time until removed.
#[test]
fn vmm_writes_are_harvested() {
    require_kvm();
    for mode in [
        DirtyTracking::Bitmap,
        DirtyTracking::Ring,
        DirtyTracking::Auto,
    ] {
        let (vm, _rec) = new_vm(mode, 1, 0);
        assert!(vm.dirty_backend().is_some());
        vm.boot(&boot(Pattern::Uniform, 4 << 20, 64)).expect("boot");
        vm.start_dirty_tracking().expect("start");
        assert!(
            vm.harvest_dirty().unwrap().is_empty(),
            "{mode}: a paused VM dirtied pages"
        );
        let (a, b, c) = (MEM - 0x10_0000, MEM - 0x8_0000 + 12, MEM - 0x4000 - 4);
        vm.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(a))
            .unwrap();
        vm.memory()
            .write_slice(&[1u8; 5000], GuestAddress(b))
            .unwrap();
        let host = vm.memory().get_host_address(GuestAddress(c)).unwrap();
        // SAFETY: 8 bytes inside guest memory (straddling two pages); the VM is paused.
        unsafe { std::ptr::write_unaligned(host as *mut u64, 42) };
        vm.mark_dirty(c, 8);
        let ring_gpa = MEM - 0x20_0000;
        let id = vm.add_always_dirty(ring_gpa, 3 * PAGE as u64);
        let s = vm.harvest_dirty().unwrap();
        let want: Vec<u64> = vec![
            ring_gpa,
            ring_gpa + 0x1000,
            ring_gpa + 0x2000,
            a,
            b & !0xfff,
            (b & !0xfff) + 0x1000,
            c & !0xfff,
            (c & !0xfff) + 0x1000,
        ];
        assert_eq!(s.iter().collect::<Vec<_>>(), want, "{mode}");
        assert_eq!(s.runs().count(), 4);
        // Once harvested, only the always-dirty range comes back.
        let s = vm.harvest_dirty().unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), want[..3].to_vec(), "{mode}");
        assert!(vm.remove_always_dirty(id));
        assert!(vm.harvest_dirty().unwrap().is_empty(), "{mode}");
        // The guest's writes show up too.
        vm.resume();
        std::thread::sleep(Duration::from_millis(20));
        vm.pause();
        let s = vm.harvest_dirty().unwrap();
        assert!(
            s.count() > 10,
            "{mode}: only {} pages after 20 ms of dirtier",
            s.count()
        );
        // Stop: no logging; start again: fresh baseline.
        vm.stop_dirty_tracking().unwrap();
        vm.resume();
        std::thread::sleep(Duration::from_millis(5));
        vm.pause();
        vm.start_dirty_tracking().unwrap();
        assert!(
            vm.harvest_dirty().unwrap().is_empty(),
            "{mode}: dirty pages right after start"
        );
        vm.resume();
        std::thread::sleep(Duration::from_millis(10));
        vm.pause();
        assert!(
            !vm.harvest_dirty().unwrap().is_empty(),
            "{mode}: restarted tracking sees nothing"
        );
        if mode == DirtyTracking::Auto {
            assert_eq!(vm.dirty_backend(), Some(DirtyBackend::Bitmap));
        }
    }
}

/// A VM without tracking refuses to harvest, and a paused VM is required.
#[test]
fn harvest_needs_tracking_and_pause() {
    require_kvm();
    let (vm, _rec) = new_vm(DirtyTracking::None, 1, 0);
    assert!(vm.dirty_backend().is_none());
    assert!(vm.harvest_dirty().is_err());
    let (vm, _rec) = new_vm(DirtyTracking::Ring, 1, 0);
    vm.boot(&boot(Pattern::Uniform, 4 << 20, 64)).unwrap();
    vm.resume();
    assert!(
        vm.harvest_dirty().is_err(),
        "harvest of a running VM must fail"
    );
    vm.pause();
    assert!(vm.harvest_dirty().is_ok());
    let bad = Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes: MEM,
            dirty_tracking: DirtyTracking::Ring,
            dirty_ring_entries: 1000,
        },
        Arc::new(Recorder::new()),
    );
    assert!(
        bad.is_err(),
        "a ring of 1000 entries (not a power of two) must be refused"
    );
}
