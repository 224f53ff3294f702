//! `castor-bench disk`: what protecting a virtio-blk disk costs.
//!
//! 1. Guest write throughput (sequential 64 KiB writes, a flush every 1 MiB)
//!    and the guest's flush latency, unprotected and protected, in the same
//!    run, on fresh images.
//! 2. Initial synchronisation of an image, half of it data (incompressible)
//!    and half a hole, while the guest runs: time and bytes on the wire.
//! 3. The pause time the disk adds (harvest + read-back of the epoch's
//!    blocks inside the pause) with random 4 KiB writes at a set rate.
//!
//! Everything runs in one process: the primary pipeline and the backup over
//! QUIC on loopback, each VM on its own image in a temporary directory.

use crate::report::Output;
use castor_net_buffer::{OutputBuffer, PushError};
use castor_replicator::backup::{Backup, BackupConfig};
use castor_replicator::primary::{Primary, PrimaryConfig, PrimaryStatus, Release};
use castor_replicator::transport::{self, TransportConfig};
use castor_vmm::devices::{BlkConfig, VirtioBlk};
use castor_vmm::{
    DirtyTracking, DiskParams, Emit, GuestBoot, NullSink, OutputSink, Record, Vm, VmConfig,
    Workload,
};
use serde_json::json;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Arguments of `castor-bench disk`.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds measured per throughput and pause cell.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Image size of the throughput cells, MiB.
    #[arg(long, default_value_t = 256)]
    pub image_mib: u64,
    /// Image size of the initial-synchronisation cell, MiB (half data, half hole).
    #[arg(long, default_value_t = 1024)]
    pub sync_mib: u64,
    /// Rate of the paced throughput cells, MiB/s (the others run flat out).
    #[arg(long, default_value_t = 64)]
    pub paced_mib_s: u64,
    /// Random 4 KiB write rate of the pause cell, MiB/s.
    #[arg(long, default_value_t = 20)]
    pub write_mib_s: u64,
    /// Epoch interval, milliseconds.
    #[arg(long, default_value_t = 25)]
    pub epoch_ms: u64,
    /// Directory for the images (default: the system's temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

const MEM: u64 = 64 << 20;
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);

struct Discard;
impl Release for Discard {
    fn release(&self, _epoch: u64, _items: &[castor_net_buffer::HeldItem]) {}
}

/// The guest's records: the last (writes, time), every flush latency (TSC
/// ticks); passed to the output buffer in a protected run.
struct Rec {
    buffer: Option<Arc<OutputBuffer>>,
    last: Mutex<Option<(u64, Instant)>>,
    flushes: Mutex<Vec<u64>>,
}

impl OutputSink for Rec {
    fn emit(&self, r: &Record) -> Emit {
        if let Some(b) = &self.buffer {
            match b.try_push(r.to_bytes().to_vec()) {
                Ok(_) => {}
                Err(PushError::Full(_)) => return Emit::Busy,
                Err(PushError::TooLarge { .. }) => return Emit::Stop,
            }
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((r.iterations, Instant::now()));
        self.flushes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(r.checksum);
        Emit::Accepted
    }
}

fn make_image(path: &Path, bytes: u64) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(bytes)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn vm_on(
    image: &Path,
    sink: Arc<dyn OutputSink>,
    tracking: DirtyTracking,
) -> Result<Arc<Vm>, String> {
    let vm = Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes: MEM,
            dirty_tracking: tracking,
            ..VmConfig::default()
        },
        sink,
    )
    .map_err(|e| format!("VM: {e}"))?;
    let blk = VirtioBlk::open(&BlkConfig {
        path: image.into(),
        read_only: false,
    })
    .map_err(|e| format!("disk: {e}"))?;
    vm.devices()
        .add_virtio_blk(blk)
        .map_err(|e| format!("disk: {e}"))?;
    Ok(Arc::new(vm))
}

/// A running protected pair.
struct Pair {
    vm: Arc<Vm>,
    status: Arc<PrimaryStatus>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    primary: std::thread::JoinHandle<Result<(), castor_replicator::primary::PrimaryError>>,
    backup: std::thread::JoinHandle<Result<(), String>>,
    started: Instant,
    _rt: tokio::runtime::Runtime,
}

fn protect(
    image: &Path,
    backup_image: &Path,
    boot: &GuestBoot,
    rec: Arc<Rec>,
    buffer: Arc<OutputBuffer>,
    epoch: Duration,
) -> Result<Pair, String> {
    let crate::pair::Loopback {
        rt,
        primary: pid,
        backup: bid,
        listener,
        addr,
    } = crate::pair::loopback()?;
    let bimg = backup_image.to_path_buf();
    let backup = std::thread::Builder::new()
        .name("bench-backup".into())
        .spawn(move || {
            let rt2 = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| format!("backup runtime: {e}"))?;
            let mut backup = Backup::new(
                BackupConfig {
                    peer_timeout: PEER_TIMEOUT,
                    ..Default::default()
                },
                Box::new(move |_shape| {
                    vm_on(&bimg, Arc::new(NullSink), DirtyTracking::None)
                        .map_err(castor_vmm::Error::InvalidConfig)
                }),
            );
            let conn = rt2
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(30), listener.accept()).await
                })
                .map_err(|_| "backup: no connection within 30 s".to_string())?
                .map_err(|e| format!("backup accept: {e}"))?;
            rt2.block_on(backup.serve(conn))
                .map(|_| ())
                .map_err(|e| format!("backup session: {e}"))
        })
        .map_err(|e| format!("backup thread: {e}"))?;
    let vm = vm_on(image, rec, DirtyTracking::Auto)?;
    vm.boot(boot).map_err(|e| format!("boot: {e}"))?;
    let mut primary = Primary::new(
        vm.clone(),
        buffer,
        Arc::new(Discard),
        PrimaryConfig {
            epoch_interval: epoch,
            peer_timeout: PEER_TIMEOUT,
            ..Default::default()
        },
    );
    let status = primary.status();
    let stop = primary.stop_flag();
    let conn = rt
        .block_on(transport::connect(
            ([127, 0, 0, 1], 0).into(),
            addr,
            &pid,
            &bid.cert(),
            &TransportConfig::default(),
        ))
        .map_err(|e| format!("connect: {e}"))?;
    let handle = rt.handle().clone();
    let started = Instant::now();
    vm.resume();
    let primary = std::thread::Builder::new()
        .name("bench-primary".into())
        .spawn(move || primary.replicate(conn, &handle))
        .map_err(|e| format!("primary thread: {e}"))?;
    Ok(Pair {
        vm,
        status,
        stop,
        primary,
        backup,
        started,
        _rt: rt,
    })
}

impl Pair {
    /// Waits until the guest is protected; returns how long it took.
    fn wait_protected(&self) -> Result<Duration, String> {
        while !self.status.protected.load(Ordering::Relaxed) {
            if self.started.elapsed() > SYNC_TIMEOUT || self.primary.is_finished() {
                return Err(format!("not protected after {:?}", self.started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(self.started.elapsed())
    }

    fn finish(self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        let p = self
            .primary
            .join()
            .map_err(|_| "the primary thread panicked".to_string())?;
        self.vm.pause();
        let b = self
            .backup
            .join()
            .map_err(|_| "the backup thread panicked".to_string())?;
        match p {
            Err(castor_replicator::primary::PrimaryError::Stopped) => {}
            Err(e) => return Err(format!("replication failed: {e}")),
            Ok(()) => {}
        }
        b
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// (MiB/s of guest writes, flush p50 us, flush p99 us) over `seconds`.
fn measure_writes(rec: &Rec, tsc_khz: u32, seconds: f64) -> Result<(f64, f64, f64), String> {
    let snap = || *rec.last.lock().unwrap_or_else(|e| e.into_inner());
    let skip = rec.flushes.lock().unwrap_or_else(|e| e.into_inner()).len();
    let a = snap().ok_or("no record from the guest")?;
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let b = snap().ok_or("no record from the guest")?;
    let dt = b.1.duration_since(a.1).as_secs_f64();
    if dt <= 0.0 || b.0 <= a.0 {
        return Err("the guest made no progress".into());
    }
    let mib_s = (b.0 - a.0) as f64 * 64.0 / 1024.0 / dt;
    let flushes: Vec<f64> = rec.flushes.lock().unwrap_or_else(|e| e.into_inner())[skip..]
        .iter()
        .map(|&t| t as f64 * 1000.0 / f64::from(tsc_khz.max(1)))
        .collect();
    Ok((
        mib_s,
        percentile(flushes.clone(), 0.5),
        percentile(flushes, 0.99),
    ))
}

fn sequential_boot(blocks: u64, writes_per_s: u64) -> GuestBoot {
    GuestBoot {
        workload: Workload::Disk(DiskParams {
            blocks,
            continuous: true,
            rate: writes_per_s,
            ops: 0,
            sequential: true,
        }),
        seed: 5,
    }
}

fn rec(buffer: Option<Arc<OutputBuffer>>) -> Arc<Rec> {
    Arc::new(Rec {
        buffer,
        last: Mutex::new(None),
        flushes: Mutex::new(Vec::new()),
    })
}

pub fn run(a: &Args, out: &Output) -> Result<(), String> {
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("castor-bench-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_in(a, out, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(a: &Args, out: &Output, dir: &Path) -> Result<(), String> {
    let epoch = Duration::from_millis(a.epoch_ms);
    let bytes = a.image_mib << 20;
    let blocks = bytes / 4096;

    // 1. Throughput, unprotected then protected, flat out and paced.
    let mut rows = Vec::new();
    for (i, paced) in [0u64, a.paced_mib_s].into_iter().enumerate() {
        let writes_per_s = paced * 16; // 64 KiB writes
        let img = dir.join(format!("u{i}.img"));
        make_image(&img, bytes)?;
        let r = rec(None);
        let vm = vm_on(&img, r.clone(), DirtyTracking::None)?;
        vm.boot(&sequential_boot(blocks, writes_per_s))
            .map_err(|e| format!("boot: {e}"))?;
        vm.resume();
        std::thread::sleep(Duration::from_secs(1));
        let (u_mib, u_f50, u_f99) = measure_writes(&r, vm.tsc_khz(), a.seconds)?;
        vm.pause();
        drop(vm);

        let (pimg, bimg) = (dir.join(format!("p{i}.img")), dir.join(format!("b{i}.img")));
        make_image(&pimg, bytes)?;
        make_image(&bimg, bytes)?;
        let buffer = Arc::new(OutputBuffer::new(
            castor_net_buffer::Config::with_max_bytes(1 << 20),
        ));
        let r = rec(Some(buffer.clone()));
        let pair = protect(
            &pimg,
            &bimg,
            &sequential_boot(blocks, writes_per_s),
            r.clone(),
            buffer,
            epoch,
        )?;
        let measured = pair.wait_protected().and_then(|_| {
            std::thread::sleep(Duration::from_secs(1));
            measure_writes(&r, pair.vm.tsc_khz(), a.seconds)
        });
        pair.finish()?;
        let (p_mib, p_f50, p_f99) = measured?;
        let asked = if paced == 0 {
            json!("flat out")
        } else {
            json!(paced)
        };
        rows.push(vec![
            ("mode", json!("unprotected")),
            ("asked MiB/s", asked.clone()),
            ("write MiB/s", json!(u_mib)),
            ("flush p50 us", json!(u_f50)),
            ("flush p99 us", json!(u_f99)),
            ("vs unprotected", json!("100%")),
        ]);
        rows.push(vec![
            ("mode", json!("protected")),
            ("asked MiB/s", asked),
            ("write MiB/s", json!(p_mib)),
            ("flush p50 us", json!(p_f50)),
            ("flush p99 us", json!(p_f99)),
            (
                "vs unprotected",
                json!(format!("{:.0}%", p_mib * 100.0 / u_mib.max(1e-9))),
            ),
        ]);
    }
    out.table(
        &format!(
            "disk: sequential 64 KiB guest writes, flush every 1 MiB ({} MiB image, {} ms epochs)",
            a.image_mib, a.epoch_ms
        ),
        &rows,
    );

    // 2. Initial synchronisation of a half-data, half-hole image.
    let sync_bytes = a.sync_mib << 20;
    let (pimg, bimg) = (dir.join("sp.img"), dir.join("sb.img"));
    make_image(&pimg, sync_bytes)?;
    make_image(&bimg, sync_bytes)?;
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&pimg)
            .map_err(|e| format!("{}: {e}", pimg.display()))?;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut chunk = vec![0u8; 1 << 20];
        for off in (0..sync_bytes / 2).step_by(1 << 20) {
            for w in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all_at(&chunk, off)
                .map_err(|e| format!("{}: {e}", pimg.display()))?;
        }
        f.sync_all()
            .map_err(|e| format!("{}: {e}", pimg.display()))?;
    }
    let buffer = Arc::new(OutputBuffer::new(
        castor_net_buffer::Config::with_max_bytes(1 << 20),
    ));
    let r = rec(Some(buffer.clone()));
    // A light writer meanwhile (100 random 4 KiB writes/s on the first 4 MiB).
    let boot = GuestBoot {
        workload: Workload::Disk(DiskParams {
            blocks: 1024,
            continuous: true,
            rate: 100,
            ops: 0,
            sequential: false,
        }),
        seed: 6,
    };
    let pair = protect(&pimg, &bimg, &boot, r, buffer, epoch)?;
    let synced = pair.wait_protected();
    let disk_sync = Duration::from_micros(pair.status.disk_sync_us.load(Ordering::Relaxed));
    let wire = pair.status.wire_bytes.load(Ordering::Relaxed);
    pair.finish()?;
    let synced = synced?;
    out.table(
        &format!(
            "disk: initial synchronisation of a {} MiB image (half incompressible data, half hole), guest writing",
            a.sync_mib
        ),
        &[vec![
            ("image MiB", json!(a.sync_mib)),
            ("disk sync s", json!(disk_sync.as_secs_f64())),
            ("to protected s", json!(synced.as_secs_f64())),
            ("wire MiB (disk + 64 MiB RAM)", json!(wire as f64 / f64::from(1u32 << 20))),
            ("disk MiB/s", json!(a.sync_mib as f64 / disk_sync.as_secs_f64().max(1e-9))),
        ]],
    );

    // 3. Pause time the disk adds, random 4 KiB writes at a set rate.
    let ops = a.write_mib_s * 256;
    let (pimg, bimg) = (dir.join("pp.img"), dir.join("pb.img"));
    make_image(&pimg, 64 << 20)?;
    make_image(&bimg, 64 << 20)?;
    let buffer = Arc::new(OutputBuffer::new(
        castor_net_buffer::Config::with_max_bytes(1 << 20),
    ));
    let r = rec(Some(buffer.clone()));
    let boot = GuestBoot {
        workload: Workload::Disk(DiskParams {
            blocks: 16384,
            continuous: true,
            rate: ops,
            ops: 0,
            sequential: false,
        }),
        seed: 7,
    };
    let pair = protect(&pimg, &bimg, &boot, r, buffer, epoch)?;
    let window = pair.wait_protected().map(|_| {
        std::thread::sleep(Duration::from_secs(1));
        let e0 = pair.status.epoch.load(Ordering::Relaxed);
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(a.seconds));
        (e0, pair.status.epoch.load(Ordering::Relaxed), t.elapsed())
    });
    let samples: Vec<_> = {
        let h = pair
            .status
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        h.iter().copied().collect()
    };
    pair.finish()?;
    let (e0, e1, dt) = window?;
    let s: Vec<_> = samples
        .into_iter()
        .filter(|s| s.epoch > e0 && s.epoch <= e1)
        .collect();
    let us = |f: &dyn Fn(&castor_replicator::primary::EpochSample) -> Duration| -> Vec<f64> {
        s.iter().map(|x| f(x).as_secs_f64() * 1e6).collect()
    };
    let blocks_sum: u64 = s.iter().map(|x| x.disk_blocks).sum();
    out.table(
        &format!(
            "disk: pause with random 4 KiB writes at {} MiB/s asked ({} ms epochs, 64 MiB guest)",
            a.write_mib_s, a.epoch_ms
        ),
        &[vec![
            ("epochs", json!(s.len())),
            (
                "disk MiB/s achieved",
                json!(blocks_sum as f64 * 4096.0 / f64::from(1u32 << 20) / dt.as_secs_f64()),
            ),
            (
                "blocks/epoch p50",
                json!(percentile(
                    s.iter().map(|x| x.disk_blocks as f64).collect(),
                    0.5
                )),
            ),
            ("pause p50 us", json!(percentile(us(&|x| x.pause), 0.5))),
            ("pause p99 us", json!(percentile(us(&|x| x.pause), 0.99))),
            (
                "disk part p50 us",
                json!(percentile(us(&|x| x.disk_pause), 0.5)),
            ),
            (
                "disk part p99 us",
                json!(percentile(us(&|x| x.disk_pause), 0.99)),
            ),
        ]],
    );
    Ok(())
}
