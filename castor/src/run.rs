//! `castor run`: boots the built-in guest (or, with `--kernel`, a Linux
//! kernel) and reports its progress.

use castor_vmm::devices::{BlkConfig, DeviceError, NetConfig, Tap, VirtioBlk, VirtioNet};
use castor_vmm::{
    parse_size, DirtierParams, DirtyTracking, Emit, GuestBoot, OutputSink, Pattern, Record,
    VcpuRunState, Vm, VmConfig, Workload,
};
use castor_vmm::{DiskParams, LinuxBoot, NetParams, NullSink, StopReason};
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
    /// TCP counter (--port) and echo (--port + 1) services on virtio-net (needs --tap).
    Net,
    /// Writes numbered blocks to virtio-blk and reads them back (needs --disk).
    Disk,
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
    /// Tap interface for virtio-net (net guest).
    #[arg(long)]
    pub tap: Option<String>,
    /// Create the tap if needed and bring it up (needs CAP_NET_ADMIN).
    #[arg(long)]
    pub tap_create: bool,
    /// With --tap-create: the host side's address on the tap, e.g. 10.0.0.1/24.
    #[arg(long)]
    pub host_ip: Option<String>,
    /// The guest's IPv4 address and prefix (net guest).
    #[arg(long, default_value = "10.0.0.2/24")]
    pub ip: String,
    /// The guest's MAC address.
    #[arg(long, default_value = "02:ca:57:00:00:02")]
    pub mac: String,
    /// Port of the counter service (echo on port + 1).
    #[arg(long, default_value_t = 7000)]
    pub port: u16,
    /// Counter numbers per second per client; 0 = as fast as TCP takes them.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Raw disk image for virtio-blk.
    #[arg(long)]
    pub disk: Option<std::path::PathBuf>,
    /// Blocks (4 KiB) the disk guest writes and reads back.
    #[arg(long, default_value_t = 256)]
    pub disk_blocks: u64,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Dirty tracking: none, bitmap (KVM dirty bitmap, manual protect), ring
    /// (KVM dirty ring) or auto (the bitmap where KVM offers manual protect,
    /// else the ring: the bitmap measured faster for typical epochs). With tracking on, the pages dirtied each second are reported.
    #[arg(long, default_value = "none")]
    pub dirty_tracking: String,
    /// A Linux guest instead of the built-in one (boxed: it keeps the CLI's
    /// command enum small).
    #[command(flatten)]
    pub linux: Box<LinuxArgs>,
}

/// `castor run`'s Linux guest options.
#[derive(clap::Args, Debug)]
pub struct LinuxArgs {
    /// Boot this Linux kernel instead of the built-in guest: an ELF vmlinux
    /// (PVH entry when it has one) or a bzImage. Its serial console (COM1)
    /// is shown here; --guest and the workload options are then ignored.
    #[arg(long)]
    pub kernel: Option<std::path::PathBuf>,
    /// With --kernel: an initramfs (cpio, gzip).
    #[arg(long, requires = "kernel")]
    pub initrd: Option<std::path::PathBuf>,
    /// With --kernel: the kernel command line (default: a console on ttyS0).
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
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

fn parse_cidr(v: &str) -> Result<([u8; 4], u8), RunError> {
    let bad = || {
        RunError::BadArgument(format!(
            "--ip {v:?}: use an IPv4 address with a prefix, e.g. 10.0.0.2/24"
        ))
    };
    let (addr, prefix) = v.split_once('/').ok_or_else(bad)?;
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix == 0 || prefix > 30 {
        return Err(bad());
    }
    Ok((addr.octets(), prefix))
}

fn parse_mac(v: &str) -> Result<[u8; 6], RunError> {
    let bad = || {
        RunError::BadArgument(format!(
            "--mac {v:?}: use six hex bytes, e.g. 02:ca:57:00:00:02"
        ))
    };
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// Puts the virtio devices the arguments ask for on the VM's bus.
fn attach_devices(vm: &Vm, a: &RunArgs) -> Result<(), RunError> {
    let dev = |e: DeviceError| RunError::BadArgument(e.to_string());
    if let Some(path) = &a.disk {
        let blk = VirtioBlk::open(&BlkConfig {
            path: path.clone(),
            read_only: false,
        })
        .map_err(dev)?;
        println!(
            "castor run: virtio-blk on {} ({} sectors)",
            path.display(),
            blk.capacity_sectors()
        );
        vm.devices().add_virtio_blk(blk).map_err(dev)?;
    }
    if let Some(name) = &a.tap {
        let exists = std::path::Path::new("/sys/class/net").join(name).exists();
        if !exists && !a.tap_create {
            return Err(RunError::BadArgument(format!(
                "tap {name:?} does not exist: pass --tap-create, or create it with `ip tuntap add {name} mode tap`"
            )));
        }
        let tap = Tap::open(name).map_err(|e| dev(e.into()))?;
        if a.tap_create {
            tap.set_up().map_err(|e| dev(e.into()))?;
            if let Some(host) = &a.host_ip {
                let out = std::process::Command::new("ip")
                    .args(["addr", "replace", host, "dev", tap.name()])
                    .output()
                    .map_err(|e| RunError::BadArgument(format!("running `ip addr`: {e}")))?;
                if !out.status.success() {
                    return Err(RunError::BadArgument(format!(
                        "ip addr replace {host} dev {}: {}",
                        tap.name(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
        }
        let net = VirtioNet::new(NetConfig {
            tap: Arc::new(tap),
            mac: parse_mac(&a.mac)?,
            tx_sink: None,
        });
        println!(
            "castor run: virtio-net on tap {name}, guest {} port {} (echo {})",
            a.ip,
            a.port,
            a.port as u32 + 1
        );
        vm.devices().add_virtio_net(net).map_err(dev)?;
    }
    Ok(())
}

fn size_arg(name: &str, v: &str) -> Result<u64, RunError> {
    parse_size(v).map_err(|e| RunError::BadArgument(format!("--{name}: {e}")))
}

/// Parses the arguments into a VM shape and a boot description.
pub fn plan(a: &RunArgs) -> Result<(VmConfig, GuestBoot), RunError> {
    let mem_bytes = size_arg("mem", &a.mem)?;
    let dirty_tracking: DirtyTracking = a
        .dirty_tracking
        .parse()
        .map_err(|e| RunError::BadArgument(format!("--dirty-tracking: {e}")))?;
    let config = VmConfig {
        vcpus: a.vcpus,
        mem_bytes,
        dirty_tracking,
        ..VmConfig::default()
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
        GuestKind::Net => {
            if a.tap.is_none() {
                return Err(RunError::BadArgument("--guest net needs --tap NAME".into()));
            }
            let (ip, prefix_len) = parse_cidr(&a.ip)?;
            Workload::Net(NetParams {
                ip,
                prefix_len,
                gateway: None,
                mac: parse_mac(&a.mac)?,
                port: a.port,
                rate: a.rate,
            })
        }
        GuestKind::Disk => {
            if a.disk.is_none() {
                return Err(RunError::BadArgument(
                    "--guest disk needs --disk IMAGE".into(),
                ));
            }
            Workload::Disk(DiskParams {
                blocks: a.disk_blocks,
                continuous: false,
                rate: 0,
                ops: 0,
                sequential: false,
            })
        }
    };
    Ok((
        config,
        GuestBoot {
            workload,
            seed: a.seed,
        },
    ))
}

/// Boots the Linux kernel of `--kernel` with its console on this terminal,
/// runs it for `--seconds` (or until a vCPU stops) and reports.
fn run_linux(a: &RunArgs, kernel: &std::path::Path) -> Result<(), RunError> {
    let mem_bytes = size_arg("mem", &a.mem)?;
    let dirty_tracking: DirtyTracking = a
        .dirty_tracking
        .parse()
        .map_err(|e| RunError::BadArgument(format!("--dirty-tracking: {e}")))?;
    let config = VmConfig {
        vcpus: a.vcpus,
        mem_bytes,
        dirty_tracking,
        ..VmConfig::default()
    };
    config.validate()?;
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        return Err(RunError::BadArgument(format!(
            "--seconds {}: give a positive number of seconds",
            a.seconds
        )));
    }
    let boot = LinuxBoot {
        kernel: kernel.to_path_buf(),
        initrd: a.linux.initrd.clone(),
        cmdline: a
            .linux
            .cmdline
            .clone()
            .unwrap_or_else(|| LinuxBoot::DEFAULT_CMDLINE.to_string()),
    };
    let vm = Vm::new(&config, Arc::new(NullSink))?;
    attach_devices(&vm, a)?;
    let report = vm.boot_linux(&boot)?;
    println!(
        "castor run: Linux kernel {} via {}, entry {:#x}, {} vCPU(s), {} MiB",
        kernel.display(),
        report.protocol,
        report.entry,
        config.vcpus,
        config.mem_bytes >> 20
    );
    if let Some((addr, size)) = report.initrd {
        println!("castor run: initramfs of {size} bytes at {addr:#x}");
    }
    println!("castor run: command line: {}", report.cmdline);
    if !report.cpuid_kept.is_empty() {
        println!(
            "castor run: KVM keeps CPUID features Castor hid (this host cannot back them in ring 0): {}",
            report.cpuid_kept.join(" ")
        );
    }
    for (base, gsi, kind) in &report.virtio {
        println!("castor run: virtio-mmio type {kind} at {base:#x}, GSI {gsi}");
    }
    let console = vm.console();
    console.set_echo(true);
    let start = Instant::now();
    vm.resume();
    let total = Duration::from_secs_f64(a.seconds);
    let mut banner_at = None;
    while start.elapsed() < total {
        std::thread::sleep(Duration::from_millis(50).min(total.saturating_sub(start.elapsed())));
        if banner_at.is_none()
            && console
                .wait_for(0, Duration::ZERO, |l| l.contains("Linux version"))
                .is_some()
        {
            banner_at = Some(start.elapsed());
        }
        let stopped = vm
            .vcpu_states()
            .iter()
            .enumerate()
            .find_map(|(i, s)| match s {
                VcpuRunState::Stopped(r) => Some((i, r.clone())),
                _ => None,
            });
        if let Some((vcpu, reason)) = stopped {
            vm.pause();
            println!();
            print_linux_summary(&console, start.elapsed(), banner_at);
            return Err(RunError::VcpuStopped {
                vcpu,
                reason: reason.to_string(),
            });
        }
    }
    vm.pause();
    println!();
    print_linux_summary(&console, start.elapsed(), banner_at);
    Ok(())
}

fn print_linux_summary(console: &castor_vmm::Console, ran: Duration, banner: Option<Duration>) {
    println!(
        "summary: ran {:.1} s, {} console lines{}",
        ran.as_secs_f64(),
        console.line_count(),
        match banner {
            Some(t) => format!(", kernel banner after {:.1} s", t.as_secs_f64()),
            None => ", no kernel banner".to_string(),
        }
    );
}

pub fn run(a: &RunArgs) -> Result<(), RunError> {
    if let Some(kernel) = &a.linux.kernel {
        return run_linux(a, kernel);
    }
    let (config, boot) = plan(a)?;
    let progress = Arc::new(Progress {
        records: AtomicU64::new(0),
        iterations: (0..config.vcpus).map(|_| AtomicU64::new(0)).collect(),
    });
    let vm = Vm::new(&config, progress.clone())?;
    attach_devices(&vm, a)?;
    vm.boot(&boot)?;
    if let Some(b) = vm.dirty_backend() {
        println!("castor run: dirty tracking with the {b} backend");
        vm.start_dirty_tracking()?;
    }
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
        if vm.dirty_backend().is_some() {
            vm.pause();
            let t = Instant::now();
            let dirty = vm.harvest_dirty()?;
            let took = t.elapsed();
            vm.resume();
            println!(
                "         dirty pages since last report {:>9}   harvest {:>7.1} us",
                dirty.count(),
                took.as_secs_f64() * 1e6
            );
        }
        for (i, s) in vm.vcpu_states().iter().enumerate() {
            if let VcpuRunState::Stopped(r) = s {
                if *r == StopReason::GuestDone && a.guest != GuestKind::Dirtier {
                    if i == 0 {
                        println!("castor run: the {:?} workload finished", a.guest);
                        return Ok(());
                    }
                    continue;
                }
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
