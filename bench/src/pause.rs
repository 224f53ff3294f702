//! `castor-bench pause`: how long `pause()` takes, from the call until every
//! vCPU is out of KVM_RUN, with the dirtier running flat out on every vCPU.

use crate::report::{percentile, Output};
use castor_vmm::{DirtierParams, GuestBoot, NullSink, Pattern, Vm, VmConfig, Workload};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Pauses per vCPU count.
    #[arg(long, default_value_t = 10_000)]
    pub pauses: usize,
    /// vCPU counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub vcpus: Vec<u32>,
    /// Time the guest runs between pauses, in microseconds.
    #[arg(long, default_value_t = 200)]
    pub run_us: u64,
}

pub fn run(args: &Args, out: &Output) -> Result<(), String> {
    let mut rows = Vec::new();
    for &vcpus in &args.vcpus {
        let vm = Vm::new(
            &VmConfig {
                vcpus,
                mem_bytes: 256 << 20,
                ..VmConfig::default()
            },
            Arc::new(NullSink),
        )
        .map_err(|e| e.to_string())?;
        vm.boot(&GuestBoot {
            workload: Workload::Dirtier(DirtierParams {
                working_set: 64 << 20,
                dirty_rate: 0,
                pattern: Pattern::Uniform,
                bytes_per_page: 64,
                record_every: 4096,
                use_entropy: false,
            }),
            seed: 1,
        })
        .map_err(|e| e.to_string())?;
        vm.resume();
        std::thread::sleep(Duration::from_millis(50));
        let mut samples = Vec::with_capacity(args.pauses);
        for _ in 0..args.pauses {
            let t = Instant::now();
            vm.pause();
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            vm.resume();
            let until = Instant::now() + Duration::from_micros(args.run_us);
            while Instant::now() < until {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        vm.pause();
        for (i, s) in vm.vcpu_states().iter().enumerate() {
            if let castor_vmm::VcpuRunState::Stopped(r) = s {
                return Err(format!("vCPU {i} stopped during the benchmark: {r}"));
            }
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        rows.push(vec![
            ("vcpus", json!(vcpus)),
            ("pauses", json!(samples.len())),
            ("p50_us", json!(percentile(&samples, 50.0))),
            ("p99_us", json!(percentile(&samples, 99.0))),
            ("max_us", json!(samples.last().copied().unwrap_or(f64::NAN))),
        ]);
    }
    out.table(
        "pause latency (pause() call to all vCPUs out of KVM_RUN), dirtier flat out",
        &rows,
    );
    Ok(())
}
