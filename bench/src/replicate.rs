//! `castor-bench replicate`: end-to-end checkpoint replication in one process,
//! primary -> QUIC+mTLS on loopback -> backup, per dirty rate, epoch length
//! and access pattern.
//!
//! Each cell boots a fresh guest (dirtier, `--bytes-per-page` bytes written
//! per touched page) with dirty tracking, replicates it to an in-process
//! backup, waits for the initial synchronisation (pre-copy, then the first
//! acknowledged checkpoint: `PrimaryStatus::protected`), and measures for
//! `--seconds`. Only epochs staged inside that window count.
//!
//! Per-epoch figures come from the pipeline's own `metrics` calls, captured by
//! a recorder installed here (`PrimaryStatus::history` is declared but not
//! filled by the pipeline): `castor_pause_seconds` and `castor_dirty_pages`
//! (per epoch, recorded after the pause), `castor_wire_bytes_total` and
//! `castor_dirty_bytes_total` (per epoch, after encoding), and
//! `castor_ack_latency_seconds` (per acknowledged epoch). Each is attributed to
//! its epoch through `PrimaryStatus::epoch` / `acked`, which the pipeline
//! stores just before recording it. Ack latency is reported as pause start ->
//! Ack (what a released output waits at least), and separately as the
//! pipeline's own figure (sender dequeue -> Ack).
//!
//! Guest slowdown: the same guest config (no dirty tracking, no replication)
//! runs unprotected for the same duration, after a warm-up as long as the
//! protected run's synchronisation took (at most 3 s); page-touch rates come
//! from the guest's records (each carries its vCPU's cumulative touch count).
//! The dirtier's rate is a cap, so the achieved touch rates are reported too.

use crate::report::{percentile, Output};
use castor_net_buffer::{OutputBuffer, PushError};
use castor_replicator::backup::{Backup, BackupConfig, SessionEnd};
use castor_replicator::primary::{Primary, PrimaryConfig, PrimaryError, PrimaryStatus, Release};
use castor_replicator::transport::{self, TransportConfig};
use castor_vmm::{
    DirtierParams, DirtyTracking, Emit, GuestBoot, NullSink, OutputSink, Pattern, Record,
    VcpuRunState, Vm, VmConfig, Workload,
};
use metrics::{Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata};
use metrics::{SharedString, Unit};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PAGE: f64 = 4096.0;
const MIB: f64 = (1u64 << 20) as f64;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds measured per cell (after the initial synchronisation).
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Dirty-rate caps (bytes of dirtied pages per second), comma separated; 0 = flat out.
    #[arg(long, value_delimiter = ',', default_value = "10M,100M,500M")]
    pub rates: Vec<String>,
    /// Epoch intervals in milliseconds, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10,25,100")]
    pub epochs: Vec<u64>,
    /// Access patterns, comma separated (uniform, hot-cold, sequential).
    #[arg(long, value_delimiter = ',', default_value = "uniform,hot-cold")]
    pub patterns: Vec<String>,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory.
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// Dirtier working set over all vCPUs (every pattern); 0 = all memory left to workloads.
    #[arg(long, default_value = "256M")]
    pub working_set: String,
    /// Bytes the guest writes per touched page.
    #[arg(long, default_value_t = 64)]
    pub bytes_per_page: u32,
    /// A guest record (touch-count sample) every this many page touches.
    #[arg(long, default_value_t = 64)]
    pub record_every: u64,
    /// Dirty tracking backend of the protected guest (bitmap, ring, auto).
    #[arg(long, default_value = "auto")]
    pub tracking: String,
    /// Memory digest verified by the backup every N epochs (0: never). The
    /// digest of all guest memory is taken inside the pause: it inflates pauses.
    #[arg(long, default_value_t = 0)]
    pub verify_every: u64,
}

// ---------------------------------------------------------------------------
// Per-epoch figures, from the pipeline's metrics calls.

#[derive(Default, Clone, Copy)]
struct EpochFig {
    /// Pause start (estimated: record time minus the pause).
    pause_start: Option<Instant>,
    pause_us: Option<f64>,
    dirty_pages: u64,
    wire_bytes: u64,
    dirty_bytes: u64,
    /// Pause start -> Ack.
    ack_us: Option<f64>,
    /// The pipeline's figure: sender dequeue -> Ack.
    send_ack_us: Option<f64>,
}

struct Tap {
    status: Arc<PrimaryStatus>,
    epochs: BTreeMap<u64, EpochFig>,
}

static TAP: Mutex<Option<Tap>> = Mutex::new(None);

fn tap_lock() -> std::sync::MutexGuard<'static, Option<Tap>> {
    TAP.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone, Copy)]
enum Metric {
    Pause,
    DirtyPages,
    AckLatency,
    WireBytes,
    DirtyBytes,
}

struct Hook(Metric);

impl Hook {
    fn on(&self, value: f64) {
        let now = Instant::now();
        let mut g = tap_lock();
        let Some(tap) = g.as_mut() else { return };
        let epoch = match self.0 {
            Metric::AckLatency => tap.status.acked.load(Ordering::Relaxed),
            _ => tap.status.epoch.load(Ordering::Relaxed),
        };
        let f = tap.epochs.entry(epoch).or_default();
        match self.0 {
            Metric::Pause => {
                f.pause_us = Some(value * 1e6);
                f.pause_start = now.checked_sub(Duration::from_secs_f64(value.max(0.0)));
            }
            Metric::DirtyPages => f.dirty_pages = value as u64,
            Metric::AckLatency => {
                f.send_ack_us = Some(value * 1e6);
                f.ack_us = f
                    .pause_start
                    .map(|t| now.duration_since(t).as_secs_f64() * 1e6);
            }
            Metric::WireBytes => f.wire_bytes += value as u64,
            Metric::DirtyBytes => f.dirty_bytes += value as u64,
        }
    }
}

impl HistogramFn for Hook {
    fn record(&self, value: f64) {
        self.on(value);
    }
}

impl CounterFn for Hook {
    fn increment(&self, value: u64) {
        self.on(value as f64);
    }
    fn absolute(&self, _value: u64) {}
}

struct Recorder;

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match key.name() {
            "castor_wire_bytes_total" => Counter::from_arc(Arc::new(Hook(Metric::WireBytes))),
            "castor_dirty_bytes_total" => Counter::from_arc(Arc::new(Hook(Metric::DirtyBytes))),
            _ => Counter::noop(),
        }
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match key.name() {
            "castor_pause_seconds" => Histogram::from_arc(Arc::new(Hook(Metric::Pause))),
            "castor_dirty_pages" => Histogram::from_arc(Arc::new(Hook(Metric::DirtyPages))),
            "castor_ack_latency_seconds" => Histogram::from_arc(Arc::new(Hook(Metric::AckLatency))),
            _ => Histogram::noop(),
        }
    }
}

fn install_recorder() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            metrics::set_global_recorder(Recorder)
                .map_err(|e| format!("installing the metrics recorder: {e}"))
        })
        .clone()
}

// ---------------------------------------------------------------------------
// The guest's records: page-touch counts.

/// Latest (cumulative touches, time) per vCPU; records pass on to the output
/// buffer when there is one (protected run), else are dropped.
struct Touches {
    last: Vec<Mutex<Option<(u64, Instant)>>>,
    buffer: Option<Arc<OutputBuffer>>,
}

impl Touches {
    fn new(vcpus: u32, buffer: Option<Arc<OutputBuffer>>) -> Self {
        Touches {
            last: (0..vcpus).map(|_| Mutex::new(None)).collect(),
            buffer,
        }
    }

    fn snapshot(&self) -> Vec<Option<(u64, Instant)>> {
        self.last
            .iter()
            .map(|m| *m.lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }
}

impl OutputSink for Touches {
    fn emit(&self, r: &Record) -> Emit {
        let verdict = match &self.buffer {
            None => Emit::Accepted,
            Some(b) => match b.try_push(r.to_bytes().to_vec()) {
                // Pass-through (unprotected) items go nowhere: no outside world here.
                Ok(_) => Emit::Accepted,
                Err(PushError::Full(_)) => Emit::Busy,
                Err(PushError::TooLarge { .. }) => Emit::Stop,
            },
        };
        if verdict == Emit::Accepted {
            if let Some(m) = self.last.get(r.vcpu as usize) {
                *m.lock().unwrap_or_else(|e| e.into_inner()) = Some((r.iterations, Instant::now()));
            }
        }
        verdict
    }
}

/// Page touches per second between two snapshots, summed over vCPUs.
fn touch_rate(a: &[Option<(u64, Instant)>], b: &[Option<(u64, Instant)>]) -> Result<f64, String> {
    let mut total = 0.0;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let (Some((i0, t0)), Some((i1, t1))) = (x, y) else {
            return Err(format!(
                "vCPU {i} emitted no record in the measurement window"
            ));
        };
        let dt = t1.duration_since(*t0).as_secs_f64();
        if dt <= 0.0 {
            return Err(format!(
                "vCPU {i} emitted no record in the measurement window (raise --seconds or lower --record-every)"
            ));
        }
        total += i1.saturating_sub(*i0) as f64 / dt;
    }
    Ok(total)
}

fn check_vcpus(vm: &Vm, what: &str) -> Result<(), String> {
    for (i, s) in vm.vcpu_states().iter().enumerate() {
        if let VcpuRunState::Stopped(r) = s {
            return Err(format!("{what}: vCPU {i} stopped: {r}"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------

struct Discard;

impl Release for Discard {
    fn release(&self, _epoch: u64, _items: &[castor_net_buffer::HeldItem]) {}
}

#[derive(Clone)]
struct Guest {
    vcpus: u32,
    mem_bytes: u64,
    params: DirtierParams,
}

impl Guest {
    fn boot(&self, vm: &Vm) -> Result<(), String> {
        vm.boot(&GuestBoot {
            workload: Workload::Dirtier(self.params.clone()),
            seed: 7,
        })
        .map_err(|e| format!("booting the guest: {e}"))
    }
}

struct Protected {
    /// Resume -> first checkpoint staged (the pre-copy).
    precopy: Duration,
    /// Resume -> protected.
    sync: Duration,
    window: f64,
    touches_per_s: f64,
    epochs: Vec<EpochFig>,
}

/// Longest warm-up of the unprotected run (it mirrors the protected run's
/// synchronisation time, so both guests have run as long when measured).
const MAX_WARMUP: Duration = Duration::from_secs(3);
/// How long the pair may take to synchronise before the cell fails.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Peer timeouts of both sides (loopback, but 2 cores shared with the guest).
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

type BackupOutcome = Result<(SessionEnd, u64, u64, u64), String>;

fn protected(
    guest: &Guest,
    tracking: DirtyTracking,
    epoch: Duration,
    seconds: f64,
    verify_every: u64,
) -> Result<Protected, String> {
    let crate::pair::Loopback {
        rt,
        primary: pid,
        backup: bid,
        listener,
        addr,
    } = crate::pair::loopback()?;

    let buffer = Arc::new(OutputBuffer::new(
        castor_net_buffer::Config::with_max_bytes(1 << 20),
    ));
    let touches = Arc::new(Touches::new(guest.vcpus, Some(buffer.clone())));
    let vm = Arc::new(
        Vm::new(
            &VmConfig {
                vcpus: guest.vcpus,
                mem_bytes: guest.mem_bytes,
                dirty_tracking: tracking,
                ..VmConfig::default()
            },
            touches.clone(),
        )
        .map_err(|e| format!("primary VM: {e}"))?,
    );
    guest.boot(&vm)?;

    let backup_thread: JoinHandle<BackupOutcome> = std::thread::Builder::new()
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
                Box::new(|shape| {
                    let mem = shape.memory_end();
                    Ok(Arc::new(Vm::new(
                        &VmConfig {
                            vcpus: shape.vcpus,
                            mem_bytes: mem,
                            ..VmConfig::default()
                        },
                        Arc::new(NullSink),
                    )?))
                }),
            );
            let status = backup.status();
            let conn = rt2
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(30), listener.accept()).await
                })
                .map_err(|_| "backup: no connection from the primary within 30 s".to_string())?
                .map_err(|e| format!("backup accept: {e}"))?;
            let end = rt2
                .block_on(backup.serve(conn))
                .map_err(|e| format!("backup session failed: {e}"))?;
            Ok((
                end,
                status.commits.load(Ordering::Relaxed),
                status.discarded.load(Ordering::Relaxed),
                status.verify_failures.load(Ordering::Relaxed),
            ))
        })
        .map_err(|e| format!("spawning the backup thread: {e}"))?;

    let mut primary = Primary::new(
        vm.clone(),
        buffer,
        Arc::new(Discard),
        PrimaryConfig {
            epoch_interval: epoch,
            verify_memory_every: verify_every,
            peer_timeout: PEER_TIMEOUT,
            ..Default::default()
        },
    );
    let status = primary.status();
    let stop = primary.stop_flag();
    *tap_lock() = Some(Tap {
        status: status.clone(),
        epochs: BTreeMap::new(),
    });
    let conn = rt
        .block_on(transport::connect(
            ([127, 0, 0, 1], 0).into(),
            addr,
            &pid,
            &bid.cert(),
            &TransportConfig::default(),
        ))
        .map_err(|e| format!("connecting to the backup: {e}"))?;
    let handle = rt.handle().clone();
    let started = Instant::now();
    vm.resume();
    let primary_thread = std::thread::Builder::new()
        .name("bench-primary".into())
        .spawn(move || primary.replicate(conn, &handle))
        .map_err(|e| format!("spawning the primary thread: {e}"))?;

    // Whatever happens from here, stop the pipeline and collect both sides.
    let measured = measure(
        &vm,
        &touches,
        &status,
        started,
        seconds,
        &primary_thread,
        &backup_thread,
    );
    stop.store(true, Ordering::Relaxed);
    let primary_end = primary_thread
        .join()
        .map_err(|_| "the primary thread panicked".to_string())?;
    let backup_end = backup_thread
        .join()
        .map_err(|_| "the backup thread panicked".to_string())?;
    vm.pause();
    let epochs = tap_lock().take().map(|t| t.epochs).unwrap_or_default();
    drop(rt);

    let measured = measured.map_err(|e| {
        let mut why = e;
        match &primary_end {
            Err(PrimaryError::Stopped) | Ok(()) => {}
            Err(p) => why.push_str(&format!("; primary: {p}")),
        }
        match &backup_end {
            Ok((end, ..)) => why.push_str(&format!("; backup session: {end:?}")),
            Err(b) => why.push_str(&format!("; backup: {b}")),
        }
        why
    });
    let Window {
        precopy,
        sync,
        window,
        touches_per_s,
        e_start,
        e_end,
    } = measured?;
    match primary_end {
        Err(PrimaryError::Stopped) => {}
        Err(e) => return Err(format!("replication failed: {e}")),
        Ok(()) => return Err("replication ended without being stopped".into()),
    }
    let (end, commits, discarded, verify_failures) = backup_end?;
    if verify_failures > 0 {
        return Err(format!(
            "the backup reported {verify_failures} memory verification failure(s)"
        ));
    }
    if discarded > 0 {
        return Err(format!("the backup discarded {discarded} epoch(s)"));
    }
    if let SessionEnd::ProtocolError(why) = &end {
        return Err(format!("the backup rejected the primary's data: {why}"));
    }
    if commits < e_end {
        return Err(format!(
            "the backup committed {commits} epochs, the primary staged {e_end} in the window"
        ));
    }
    let figs: Vec<EpochFig> = epochs.range(e_start + 1..=e_end).map(|(_, f)| *f).collect();
    if figs.len() as u64 != e_end - e_start || figs.iter().any(|f| f.pause_us.is_none()) {
        return Err(format!(
            "epoch figures missing: {} of epochs {}..={} captured",
            figs.len(),
            e_start + 1,
            e_end
        ));
    }
    Ok(Protected {
        precopy,
        sync,
        window,
        touches_per_s,
        epochs: figs,
    })
}

struct Window {
    precopy: Duration,
    sync: Duration,
    /// Seconds measured.
    window: f64,
    touches_per_s: f64,
    /// Last epoch staged before the window (excluded).
    e_start: u64,
    /// Last epoch staged in the window (included).
    e_end: u64,
}

/// Waits for protection, then measures the window.
fn measure(
    vm: &Vm,
    touches: &Touches,
    status: &PrimaryStatus,
    started: Instant,
    seconds: f64,
    primary: &JoinHandle<Result<(), PrimaryError>>,
    backup: &JoinHandle<BackupOutcome>,
) -> Result<Window, String> {
    let alive = |what: &str| -> Result<(), String> {
        if primary.is_finished() {
            return Err(format!("the primary's session ended {what}"));
        }
        if backup.is_finished() {
            return Err(format!("the backup's session ended {what}"));
        }
        check_vcpus(vm, "primary guest")
    };
    let mut precopy = None;
    while !status.protected.load(Ordering::Relaxed) {
        if precopy.is_none() && status.epoch.load(Ordering::Relaxed) > 0 {
            precopy = Some(started.elapsed());
        }
        alive("before the first checkpoint was acknowledged")?;
        if started.elapsed() > SYNC_TIMEOUT {
            return Err(format!(
                "no checkpoint acknowledged within {SYNC_TIMEOUT:?} (pre-copy did not converge?)"
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let sync = started.elapsed();
    let precopy = precopy.unwrap_or(sync);
    let e_start = status.epoch.load(Ordering::Relaxed);
    let a0 = touches.snapshot();
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(seconds);
    let mut last_acked = status.acked.load(Ordering::Relaxed);
    let mut last_progress = Instant::now();
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        alive("during the measurement")?;
        let acked = status.acked.load(Ordering::Relaxed);
        if acked > last_acked {
            (last_acked, last_progress) = (acked, Instant::now());
        } else if last_progress.elapsed() > PEER_TIMEOUT {
            return Err(format!(
                "no acknowledgement for {:?} (last acked epoch {acked})",
                last_progress.elapsed()
            ));
        }
    }
    let a1 = touches.snapshot();
    let window = t0.elapsed().as_secs_f64();
    let e_end = status.epoch.load(Ordering::Relaxed);
    // Let the window's last epochs be acknowledged.
    let t = Instant::now();
    while status.acked.load(Ordering::Relaxed) < e_end {
        alive("while the last epochs were acknowledged")?;
        if t.elapsed() > PEER_TIMEOUT {
            return Err(format!(
                "epoch {e_end} not acknowledged within {PEER_TIMEOUT:?} (acked {})",
                status.acked.load(Ordering::Relaxed)
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if e_end <= e_start {
        return Err(format!("no epoch staged in {window:.1} s"));
    }
    Ok(Window {
        precopy,
        sync,
        window,
        touches_per_s: touch_rate(&a0, &a1)?,
        e_start,
        e_end,
    })
}

/// The same guest without dirty tracking or replication: touches/s.
fn unprotected(guest: &Guest, warmup: Duration, seconds: f64) -> Result<f64, String> {
    let touches = Arc::new(Touches::new(guest.vcpus, None));
    let vm = Vm::new(
        &VmConfig {
            vcpus: guest.vcpus,
            mem_bytes: guest.mem_bytes,
            dirty_tracking: DirtyTracking::None,
            ..VmConfig::default()
        },
        touches.clone(),
    )
    .map_err(|e| format!("unprotected VM: {e}"))?;
    guest.boot(&vm)?;
    vm.resume();
    std::thread::sleep(warmup);
    let a0 = touches.snapshot();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let a1 = touches.snapshot();
    vm.pause();
    check_vcpus(&vm, "unprotected guest")?;
    touch_rate(&a0, &a1)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

pub fn run(args: &Args, out: &Output) -> Result<(), String> {
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err(format!(
            "--seconds {}: give a positive number of seconds",
            args.seconds
        ));
    }
    let mem_bytes = castor_vmm::parse_size(&args.mem).map_err(|e| format!("--mem: {e}"))?;
    let working_set =
        castor_vmm::parse_size(&args.working_set).map_err(|e| format!("--working-set: {e}"))?;
    let tracking: DirtyTracking = args
        .tracking
        .parse()
        .map_err(|e| format!("--tracking: {e}"))?;
    if tracking == DirtyTracking::None {
        return Err("--tracking none cannot replicate: use bitmap, ring or auto".into());
    }
    let mut rates = Vec::new();
    for r in &args.rates {
        rates.push((
            r.clone(),
            castor_vmm::parse_size(r).map_err(|e| format!("--rates: {e}"))?,
        ));
    }
    let mut patterns = Vec::new();
    for p in &args.patterns {
        patterns.push(
            p.parse::<Pattern>()
                .map_err(|e| format!("--patterns: {e}"))?,
        );
    }
    if args.epochs.contains(&0) {
        return Err("--epochs: epoch intervals must be at least 1 ms".into());
    }
    install_recorder()?;
    let load_before = loadavg();

    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for &pattern in &patterns {
        for (rate_name, rate) in &rates {
            let params = DirtierParams {
                working_set,
                dirty_rate: *rate,
                pattern,
                bytes_per_page: args.bytes_per_page,
                record_every: args.record_every,
                use_entropy: false,
            };
            VmConfig {
                vcpus: args.vcpus,
                mem_bytes,
                ..VmConfig::default()
            }
            .validate()
            .map_err(|e| e.to_string())?;
            params
                .to_abi(args.vcpus, mem_bytes)
                .map_err(|e| e.to_string())?;
            let guest = Guest {
                vcpus: args.vcpus,
                mem_bytes,
                params,
            };
            for &ms in &args.epochs {
                let cell = format!("{pattern} {rate_name}/s {ms} ms");
                eprintln!("castor-bench replicate: {cell} ...");
                let p = protected(
                    &guest,
                    tracking,
                    Duration::from_millis(ms),
                    args.seconds,
                    args.verify_every,
                )
                .map_err(|e| format!("{cell}: {e}"))?;
                let base = unprotected(&guest, p.sync.min(MAX_WARMUP), args.seconds)
                    .map_err(|e| format!("{cell} (unprotected run): {e}"))?;
                if base <= 0.0 {
                    return Err(format!("{cell}: the unprotected guest made no progress"));
                }
                let pauses = sorted(p.epochs.iter().filter_map(|f| f.pause_us).collect());
                let acks = sorted(p.epochs.iter().filter_map(|f| f.ack_us).collect());
                let send_acks = sorted(p.epochs.iter().filter_map(|f| f.send_ack_us).collect());
                let wire: u64 = p.epochs.iter().map(|f| f.wire_bytes).sum();
                let dirty_pages: u64 = p.epochs.iter().map(|f| f.dirty_pages).sum();
                let dirty_bytes: u64 = p.epochs.iter().map(|f| f.dirty_bytes).sum();
                if dirty_bytes != dirty_pages * 4096 {
                    return Err(format!(
                        "{cell}: dirty bytes encoded ({dirty_bytes}) != dirty pages staged x 4 KiB ({})",
                        dirty_pages * 4096
                    ));
                }
                let wire_per_dirty = if dirty_pages == 0 {
                    f64::NAN
                } else {
                    wire as f64 / (dirty_pages as f64 * PAGE)
                };
                let speed = p.touches_per_s / base;
                let pause_p99 = percentile(&pauses, 99.0);
                let slowdown = (1.0 - speed) * 100.0;
                if *rate == 100 << 20 && ms == 25 {
                    targets.push((
                        cell.clone(),
                        "pause p99 us",
                        pause_p99,
                        "<= 2000",
                        pause_p99 <= 2000.0,
                    ));
                    targets.push((
                        cell.clone(),
                        "slowdown %",
                        slowdown,
                        "<= 10",
                        slowdown <= 10.0,
                    ));
                }
                if pattern == Pattern::HotCold {
                    targets.push((
                        cell.clone(),
                        "wire B / dirty B",
                        wire_per_dirty,
                        "<= 0.3",
                        wire_per_dirty <= 0.3,
                    ));
                }
                rows.push(vec![
                    ("pattern", json!(pattern.to_string())),
                    ("rate_cap", json!(format!("{rate_name}/s"))),
                    ("epoch_ms", json!(ms)),
                    ("precopy_s", json!(p.precopy.as_secs_f64())),
                    ("sync_s", json!(p.sync.as_secs_f64())),
                    ("epochs", json!(p.epochs.len())),
                    ("epochs_per_s", json!(p.epochs.len() as f64 / p.window)),
                    ("pause_p50_us", json!(percentile(&pauses, 50.0))),
                    ("pause_p99_us", json!(pause_p99)),
                    ("ack_p50_us", json!(percentile(&acks, 50.0))),
                    ("ack_p99_us", json!(percentile(&acks, 99.0))),
                    ("send_ack_p99_us", json!(percentile(&send_acks, 99.0))),
                    (
                        "dirty_pages_per_epoch",
                        json!(dirty_pages as f64 / p.epochs.len() as f64),
                    ),
                    ("wire_per_dirty", json!(wire_per_dirty)),
                    ("touch_mib_s_unprot", json!(base * PAGE / MIB)),
                    ("touch_mib_s_prot", json!(p.touches_per_s * PAGE / MIB)),
                    (
                        "dirty_mib_s",
                        json!(dirty_pages as f64 * PAGE / MIB / p.window),
                    ),
                    ("speed_ratio", json!(speed)),
                    ("slowdown_pct", json!(slowdown)),
                ]);
            }
        }
    }
    let title = format!(
            "replication over QUIC loopback: {} vCPU(s), {} guest, working set {}, {} B written per touched page, {} s per cell \
             (ack = pause start -> Ack; send_ack = the pipeline's sender -> Ack; touch = dirtier page touches x 4 KiB; \
             dirty = pages harvested x 4 KiB; speed = protected / unprotected touches/s); host load average {} before, {} after",
            args.vcpus, args.mem, args.working_set, args.bytes_per_page, args.seconds,
        load_before,
        loadavg()
    );
    out.table(&title, &rows);
    out.table(
        "targets (measured above; not tuned for)",
        &targets
            .iter()
            .map(|(cell, what, value, target, met)| {
                vec![
                    ("cell", json!(cell)),
                    ("figure", json!(what)),
                    ("measured", json!(value)),
                    ("target", json!(target)),
                    ("verdict", json!(verdict(*met))),
                ]
            })
            .collect::<Vec<_>>(),
    );
    Ok(())
}

/// The 1-minute load average (other work on the host skews every figure).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}
