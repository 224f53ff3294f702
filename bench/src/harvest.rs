//! `castor-bench harvest`: the cost of one dirty-page harvest (VM paused),
//! per backend, guest size and number of pages dirtied in the epoch.
//!
//! To dirty exactly N pages per epoch, one vCPU runs the dirtier with a
//! sequential pattern over a working set of N pages, flat out; each epoch runs
//! until the records show at least N more touches than were possible at the
//! previous pause (so every page of the set was written), then the VM is
//! paused and `Vm::harvest_dirty_into` is timed. N = 0: the paused guest is
//! harvested with nothing written (the idle cost).
//!
//! `extra_pages` counts the harvested pages that the dirtier cannot have
//! written (outside its working set and vCPU 0's control/stack area), over
//! all samples, and `extra_pct` relates them to the pages dirtied: what this
//! host's KVM reports beyond the writes (PVM's shadow MMU logs neighbours of
//! written pages). A figure of the host, which the correctness tests print
//! but do not bound.

use crate::report::{percentile, Output};
use castor_vmm::{
    DirtierParams, DirtyTracking, Emit, GuestBoot, OutputSink, Pattern, Record, Vm, VmConfig,
    Workload,
};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Backends to measure, comma separated (bitmap, ring).
    #[arg(long, value_delimiter = ',', default_value = "bitmap,ring")]
    pub backends: Vec<String>,
    /// Guest sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
    pub sizes: Vec<String>,
    /// Pages dirtied per epoch, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "0,100,1000,10000,100000")]
    pub dirty: Vec<u64>,
    /// Harvests per cell (cells of 10,000 pages or more take a quarter, at least 10).
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
}

struct Touches(AtomicU64);

/// Guest-physical layout of the built-in guest (castor-guest-abi `layout`):
/// the workload area starts here ...
const WORKLOAD_ADDR: u64 = 0x40_0000;
/// ... and vCPU 0's control page and stack are here.
const VCPU0_AREA: std::ops::Range<u64> = 0x20_0000..0x22_0000;

impl OutputSink for Touches {
    fn emit(&self, r: &Record) -> Emit {
        self.0.fetch_max(r.iterations, Ordering::AcqRel);
        Emit::Accepted
    }
}

pub fn run(args: &Args, out: &Output) -> Result<(), String> {
    let mut rows = Vec::new();
    for b in &args.backends {
        let mode: DirtyTracking = b.parse().map_err(|e| format!("--backends: {e}"))?;
        for size in &args.sizes {
            let mem_bytes = castor_vmm::parse_size(size)?;
            for &n in &args.dirty {
                match cell(mode, mem_bytes, n, args.samples)? {
                    Some(r) => rows.push(
                        [
                            vec![("backend", json!(b)), ("guest", json!(size))],
                            r,
                        ]
                        .concat(),
                    ),
                    None => eprintln!(
                        "castor-bench harvest: {n} pages do not fit a {size} guest's workload area; skipped"
                    ),
                }
            }
        }
    }
    out.table(
        "dirty-page harvest cost (VM paused, 1 vCPU, sequential dirtier), microseconds",
        &rows,
    );
    Ok(())
}

fn cell(
    mode: DirtyTracking,
    mem_bytes: u64,
    n: u64,
    samples: usize,
) -> Result<Option<Vec<(&'static str, serde_json::Value)>>, String> {
    let available = (mem_bytes - (4 << 20)) / 4096;
    if n > available {
        return Ok(None);
    }
    let touches = Arc::new(Touches(AtomicU64::new(0)));
    let vm = Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes,
            dirty_tracking: mode,
            dirty_ring_entries: 0,
        },
        touches.clone(),
    )
    .map_err(|e| e.to_string())?;
    let record_every = n.clamp(1, 4096);
    vm.boot(&GuestBoot {
        workload: Workload::Dirtier(DirtierParams {
            working_set: n.max(1) * 4096,
            dirty_rate: 0,
            pattern: Pattern::Sequential,
            bytes_per_page: 8,
            record_every,
            use_entropy: false,
        }),
        seed: 1,
    })
    .map_err(|e| e.to_string())?;
    vm.start_dirty_tracking().map_err(|e| e.to_string())?;
    let samples = if n >= 10_000 {
        (samples / 4).max(10)
    } else {
        samples
    };
    let mut set = vm.empty_dirty_set();
    let mut times = Vec::with_capacity(samples);
    let mut counts = Vec::with_capacity(samples);
    let written = WORKLOAD_ADDR..WORKLOAD_ADDR + n * 4096;
    let mut extra: u64 = 0;
    // One warm-up epoch (first touches after boot also fault page tables in).
    for i in 0..samples + 1 {
        if n > 0 {
            let target = touches.0.load(Ordering::Acquire) + record_every + n;
            vm.resume();
            let deadline = Instant::now() + Duration::from_secs(30);
            while touches.0.load(Ordering::Acquire) < target {
                if Instant::now() > deadline {
                    return Err(format!("the dirtier stalled ({n} pages)"));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            vm.pause();
        }
        set.clear();
        let t = Instant::now();
        vm.harvest_dirty_into(&mut set).map_err(|e| e.to_string())?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i > 0 {
            times.push(us);
            counts.push(set.count() as f64);
            extra += set
                .iter()
                .filter(|gpa| !written.contains(gpa) && !VCPU0_AREA.contains(gpa))
                .count() as u64;
        }
    }
    for (i, s) in vm.vcpu_states().iter().enumerate() {
        if let castor_vmm::VcpuRunState::Stopped(r) = s {
            return Err(format!("vCPU {i} stopped during the benchmark: {r}"));
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    counts.sort_by(|a, b| a.total_cmp(b));
    Ok(Some(vec![
        ("dirty_pages", json!(n)),
        ("harvested_p50", json!(percentile(&counts, 50.0) as u64)),
        ("samples", json!(times.len())),
        ("extra_pages", json!(extra)),
        (
            "extra_pct",
            json!(extra as f64 * 100.0 / (n * times.len() as u64).max(1) as f64),
        ),
        ("p50_us", json!(percentile(&times, 50.0))),
        ("p99_us", json!(percentile(&times, 99.0))),
    ]))
}
