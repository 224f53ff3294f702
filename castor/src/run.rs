//! `castor run`: boots the built-in guest and reports its progress.

use castor_vmm::{
    parse_size, DirtierParams, Emit, GuestBoot, OutputSink, Pattern, Record, VcpuRunState, Vm,
    VmConfig, Workload,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors of `castor run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A bad argument; the message says what to fix.
    #[error("{0}")]
    BadArgument(String),
    /// The VMM failed.
    #[error(transparent)]
    Vmm(#[from] castor_vmm::Error),
    /// A vCPU stopped while the guest should have been running.
    #[error("vCPU {vcpu} stopped: {reason}")]
    VcpuStopped {
        /// Which vCPU.
        vcpu: usize,
        /// Why.
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKind {
    /// The memory dirtier.
    Dirtier,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Which built-in guest workload to run.
    #[arg(long, value_enum, default_value = "dirtier")]
    pub guest: GuestKind,
    /// Guest memory (16M to 16G), e.g. 256M, 1G.
    #[arg(long, default_value = "256M")]
    pub mem: String,
    /// Number of vCPUs (1 to 8).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Total dirty rate in bytes of dirtied pages per second, e.g. 50M; 0 = flat out.
    #[arg(long, default_value = "50M")]
    pub dirty_rate: String,
    /// Working set over all vCPUs, e.g. 64M; default: all memory left to workloads.
    #[arg(long)]
    pub working_set: Option<String>,
    /// Access pattern: sequential, uniform or hot-cold.
    #[arg(long, default_value = "uniform")]
    pub pattern: String,
    /// Bytes written per touched page (multiple of 8, 8 to 4096).
    #[arg(long, default_value_t = 64)]
    pub bytes_per_page: u32,
    /// Emit a record every this many page touches.
    #[arg(long, default_value_t = 256)]
    pub record_every: u64,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
}

struct Progress {
    records: AtomicU64,
    iterations: Vec<AtomicU64>,
}

impl OutputSink for Progress {
    fn emit(&self, r: &Record) -> Emit {
        self.records.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = self.iterations.get(r.vcpu as usize) {
            i.store(r.iterations, Ordering::Relaxed);
        }
        Emit::Accepted
    }
}

fn size_arg(name: &str, v: &str) -> Result<u64, RunError> {
    parse_size(v).map_err(|e| RunError::BadArgument(format!("--{name}: {e}")))
}

/// Parses the arguments into a VM shape and a boot description.
pub fn plan(a: &RunArgs) -> Result<(VmConfig, GuestBoot), RunError> {
    let mem_bytes = size_arg("mem", &a.mem)?;
    let config = VmConfig {
        vcpus: a.vcpus,
        mem_bytes,
    };
    config.validate()?;
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        return Err(RunError::BadArgument(format!(
            "--seconds {}: give a positive number of seconds",
            a.seconds
        )));
    }
    let pattern: Pattern = a.pattern.parse()?;
    let params = DirtierParams {
        working_set: match &a.working_set {
            Some(w) => size_arg("working-set", w)?,
            None => 0,
        },
        dirty_rate: size_arg("dirty-rate", &a.dirty_rate)?,
        pattern,
        bytes_per_page: a.bytes_per_page,
        record_every: a.record_every,
        use_entropy: false,
    };
    params.to_abi(config.vcpus, config.mem_bytes)?;
    let workload = match a.guest {
        GuestKind::Dirtier => Workload::Dirtier(params),
    };
    Ok((
        config,
        GuestBoot {
            workload,
            seed: a.seed,
        },
    ))
}

pub fn run(a: &RunArgs) -> Result<(), RunError> {
    let (config, boot) = plan(a)?;
    let progress = Arc::new(Progress {
        records: AtomicU64::new(0),
        iterations: (0..config.vcpus).map(|_| AtomicU64::new(0)).collect(),
    });
    let vm = Vm::new(&config, progress.clone())?;
    vm.boot(&boot)?;
    println!(
        "castor run: {} vCPU(s), {} MiB, guest {:?}, dirty rate {}, pattern {}",
        config.vcpus,
        config.mem_bytes >> 20,
        a.guest,
        a.dirty_rate,
        a.pattern
    );
    let start = Instant::now();
    vm.resume();
    let total = Duration::from_secs_f64(a.seconds);
    let (mut last_t, mut last_rec, mut last_iter) = (start, 0u64, 0u64);
    let iterations =
        |p: &Progress| -> u64 { p.iterations.iter().map(|i| i.load(Ordering::Relaxed)).sum() };
    while start.elapsed() < total {
        std::thread::sleep(Duration::from_secs(1).min(total.saturating_sub(start.elapsed())));
        let (now, rec, it) = (
            Instant::now(),
            progress.records.load(Ordering::Relaxed),
            iterations(&progress),
        );
        let dt = now.duration_since(last_t).as_secs_f64().max(1e-9);
        println!(
            "[{:>5.1}s] records/s {:>9.0}   dirty rate {:>8.1} MiB/s",
            start.elapsed().as_secs_f64(),
            (rec - last_rec) as f64 / dt,
            (it - last_iter) as f64 * 4096.0 / dt / (1 << 20) as f64
        );
        (last_t, last_rec, last_iter) = (now, rec, it);
        for (i, s) in vm.vcpu_states().iter().enumerate() {
            if let VcpuRunState::Stopped(r) = s {
                return Err(RunError::VcpuStopped {
                    vcpu: i,
                    reason: r.to_string(),
                });
            }
        }
    }
    vm.pause();
    let secs = start.elapsed().as_secs_f64();
    let (rec, it) = (
        progress.records.load(Ordering::Relaxed),
        iterations(&progress),
    );
    println!(
        "summary: {:.1} s, {} records ({:.0}/s), {} page touches, average dirty rate {:.1} MiB/s",
        secs,
        rec,
        rec as f64 / secs,
        it,
        it as f64 * 4096.0 / secs / (1 << 20) as f64
    );
    Ok(())
}
