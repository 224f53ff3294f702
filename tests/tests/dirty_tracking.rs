//! Dirty tracking on real KVM: every harvest holds every page whose content
//! changed since the previous epoch (checked against a host-side copy of
//! guest memory) and every page the VMM wrote, and nothing is lost when a
//! vCPU's dirty ring fills (forced with the smallest ring KVM accepts).
//!
//! These are correctness tests: a missed page fails them, however loaded the
//! machine. How many unchanged pages a host also reports (PVM's shadow MMU
//! logs neighbours of written pages) is printed as a figure, never bounded:
//! it depends on the host, not on our code. Nothing here waits for a fixed
//! time and then expects the guest to have done something: each wait that
//! needs guest progress waits for the progress itself (with a generous
//! deadline that fails loudly).

use castor_tests::{require_kvm, Recorder};
use castor_vmm::{
    DirtierParams, DirtyBackend, DirtySet, DirtyTracking, GuestBoot, Pattern, StopReason,
    VcpuRunState, Vm, VmConfig, Workload,
};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MEM: u64 = 32 << 20;
const PAGE: usize = 4096;
/// The dirtier's regions end here (4 MiB + working set); the VMM writes above.
const WORKING_SET: u64 = 16 << 20;
const SPARE_START: u64 = (4 << 20) + WORKING_SET;
/// How long a wait for guest progress may take before the test fails (only
/// a guest that is stuck, not one that is slow, gets near it).
const PROGRESS_DEADLINE: Duration = Duration::from_secs(60);

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

/// The smallest dirty ring this host's KVM accepts: powers of two from
/// castor-dirty-tracking's minimum (256 entries, one page) up; KVM may want
/// more where it reserves room for the CPU's own dirty log (e.g. Intel PML).
fn smallest_ring_vm(vcpus: u32) -> (Vm, Arc<Recorder>, u32) {
    let mut last = None;
    let mut entries = 256;
    while entries <= 65536 {
        let rec = Arc::new(Recorder::new());
        match Vm::new(
            &VmConfig {
                vcpus,
                mem_bytes: MEM,
                dirty_tracking: DirtyTracking::Ring,
                dirty_ring_entries: entries,
            },
            rec.clone(),
        ) {
            Ok(vm) => return (vm, rec, entries),
            Err(e) => last = Some(e),
        }
        entries *= 2;
    }
    panic!("no dirty ring of 256 to 65536 entries was accepted: {last:?}");
}

/// Waits until `vcpu` has emitted `records` more records than now (the
/// dirtier touched pages), or fails the test.
fn wait_for_records(rec: &Recorder, vcpu: u32, records: u64, what: &str) {
    let target = rec.last_seq(vcpu) + records;
    assert!(
        rec.wait_seq(vcpu, target, PROGRESS_DEADLINE),
        "{what}: vCPU {vcpu} emitted no record for {PROGRESS_DEADLINE:?} (stuck guest?)"
    );
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
    ring_full_exits: u64,
}

/// How long each epoch runs before the pause.
#[derive(Clone)]
enum EpochEnd {
    /// A random time (microseconds): pauses land anywhere.
    After(std::ops::Range<u64>),
    /// Until a vCPU's dirty ring filled (a `KVM_EXIT_DIRTY_RING_FULL` was
    /// handled) during this epoch, then a random extra time (microseconds),
    /// so every epoch crosses a ring-full exit and the pause lands anywhere
    /// in the next ring's filling, full included.
    RingFullThen(std::ops::Range<u64>),
}

/// What an exactness run needs: at least `epochs` epochs, and more (up to
/// ten times as many) until the guest changed at least `min_changed` pages,
/// so a starved guest makes the run longer rather than vacuous.
struct Run {
    mode: DirtyTracking,
    vcpus: u32,
    /// Ring backend: the smallest ring KVM accepts instead of the default.
    smallest_ring: bool,
    boot: GuestBoot,
    epochs: usize,
    end: EpochEnd,
    min_changed: u64,
}

/// Runs epochs of: resume, run a while ([`EpochEnd`]), pause, harvest,
/// compare with the host-side copy; between epochs the VMM writes spare pages
/// through `write_obj`, `write_slice` and a raw pointer + `mark_dirty`.
/// Panics on any changed page or VMM write missing from a harvest.
fn exactness(r: Run) -> Outcome {
    require_kvm();
    let (mode, vcpus) = (r.mode, r.vcpus);
    let (vm, _rec, ring_entries) = if r.smallest_ring {
        smallest_ring_vm(vcpus)
    } else {
        let (vm, rec) = new_vm(mode, vcpus, 0);
        (vm, rec, 0)
    };
    vm.boot(&r.boot).expect("boot");
    vm.start_dirty_tracking().expect("start tracking");
    let mut rng = rand::rngs::StdRng::seed_from_u64(vcpus as u64 * 31 + r.epochs as u64);
    let mut shadow = vm.read_memory().expect("read memory");
    let mut out = Outcome {
        epochs: 0,
        max_harvested: 0,
        total_changed: 0,
        extras: BTreeMap::new(),
        ring_full_exits: 0,
    };
    let spare_pages = (MEM - SPARE_START) / PAGE as u64;
    let mut vmm_written: Vec<u64> = Vec::new();
    let full_at_start = vm.dirty_ring_full_exits();
    let mut epoch = 0;
    while epoch < r.epochs || out.total_changed < r.min_changed {
        assert!(
            epoch < r.epochs * 10,
            "{mode} {vcpus} vCPU(s): the guest changed only {} pages in {epoch} epochs              (at least {} wanted)",
            out.total_changed,
            r.min_changed
        );
        vm.resume();
        match &r.end {
            EpochEnd::After(us) => {
                std::thread::sleep(Duration::from_micros(rng.gen_range(us.clone())));
            }
            EpochEnd::RingFullThen(us) => {
                let before = vm.dirty_ring_full_exits();
                let deadline = Instant::now() + PROGRESS_DEADLINE;
                while vm.dirty_ring_full_exits() == before {
                    assert!(
                        Instant::now() < deadline,
                        "{mode} {vcpus} vCPU(s), epoch {epoch}: no ring of {ring_entries} \
                         entries filled in {PROGRESS_DEADLINE:?}"
                    );
                    std::thread::sleep(Duration::from_micros(100));
                }
                std::thread::sleep(Duration::from_micros(rng.gen_range(us.clone())));
            }
        }
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
        epoch += 1;
    }
    out.epochs = epoch;
    out.ring_full_exits = vm.dirty_ring_full_exits() - full_at_start;
    let neighbours = out
        .extras
        .get("other (shadow-MMU side effect)")
        .copied()
        .unwrap_or(0);
    // A figure of this host, not a bound (castor-bench harvest reports it too).
    println!(
        "{mode} {vcpus} vCPU(s){}: {} epochs, {} changed pages in all, largest harvest {}, \
         ring-full exits {}, unchanged-but-harvested: {:?} (shadow-MMU extras {:.3}% of the \
         changed pages)",
        if ring_entries > 0 {
            format!(", ring of {ring_entries} entries")
        } else {
            String::new()
        },
        out.epochs,
        out.total_changed,
        out.max_harvested,
        out.ring_full_exits,
        out.extras,
        neighbours as f64 * 100.0 / out.total_changed.max(1) as f64
    );
    out
}

fn uniform_exactness(mode: DirtyTracking, vcpus: u32) {
    exactness(Run {
        mode,
        vcpus,
        smallest_ring: false,
        boot: boot(Pattern::Uniform, WORKING_SET, 64),
        epochs: 1000,
        end: EpochEnd::After(50..3000),
        min_changed: 10_000,
    });
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

/// The smallest ring KVM accepts (256 entries here: KVM makes the vCPU exit
/// with `KVM_EXIT_DIRTY_RING_FULL` after 192) and a sequential dirtier over
/// 6,144 pages: every epoch runs until a ring has filled, then a random while
/// longer, so ring-full exits happen in every epoch and pauses land at every
/// point of a ring's filling (full included); nothing is lost.
#[test]
fn ring_full_loses_nothing() {
    for vcpus in [1, 2] {
        let o = exactness(Run {
            mode: DirtyTracking::Ring,
            vcpus,
            smallest_ring: true,
            // 24 MiB: 6,144 pages (3,072 per vCPU with 2), many rings' worth.
            boot: boot(Pattern::Sequential, 24 << 20, 512),
            epochs: 150,
            end: EpochEnd::RingFullThen(0..5_000),
            min_changed: 0,
        });
        assert!(
            o.ring_full_exits >= o.epochs as u64,
            "{vcpus} vCPU(s): {} ring-full exits in {} epochs",
            o.ring_full_exits,
            o.epochs
        );
    }
}

/// The same heavy sequential workload with the bitmap backend (the control
/// for `ring_full_loses_nothing`).
#[test]
fn bitmap_heavy_sequential() {
    for vcpus in [1, 2] {
        exactness(Run {
            mode: DirtyTracking::Bitmap,
            vcpus,
            smallest_ring: false,
            boot: boot(Pattern::Sequential, WORKING_SET, 512),
            epochs: 60,
            end: EpochEnd::After(15_000..40_000),
            min_changed: 0,
        });
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
        let (vm, rec) = new_vm(mode, 1, 0);
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
        // The guest's writes show up too: two records = 128 touches of
        // random pages of 1,024 (seeded, so always the same ~120 pages).
        vm.resume();
        wait_for_records(&rec, 0, 2, &format!("{mode}: tracked run"));
        vm.pause();
        let s = vm.harvest_dirty().unwrap();
        assert!(
            s.count() > 10,
            "{mode}: only {} pages after 128 dirtier touches",
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
        wait_for_records(&rec, 0, 2, &format!("{mode}: run after restart"));
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
