//! `castor-bench net`: the built-in guest's TCP services over virtio-net and a
//! tap, measured from a client in another network namespace: stream
//! throughput of the counter service and request/response latency of the
//! echo service. Unprotected by default; `--protected` adds rows for the
//! guest replicated (in this process, QUIC over loopback, to a backup thread)
//! with packet output commit: frames held until their epoch is acked, fixed
//! epochs and output-triggered epochs.
//!
//! The bench makes a tap, moves it into a fresh namespace with the host
//! address, boots the net guest, and runs itself as the client inside the
//! namespace (`ip netns exec NS castor-bench net --client IP`), which prints
//! one JSON line. Namespace and tap are removed on exit, even on failure.

use crate::report::{percentile, Output};
use castor_net_buffer::OutputBuffer;
use castor_node::{NetTxSink, TapRelease};
use castor_replicator::primary::Release;
use castor_vmm::devices::{NetConfig, Tap, VirtioNet};
use castor_vmm::{GuestBoot, NetParams, NullSink, Vm, VmConfig, Workload};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of streaming to measure.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Request/response round trips to time.
    #[arg(long, default_value_t = 2000)]
    pub pings: usize,
    /// Request size in bytes for the latency test.
    #[arg(long, default_value_t = 64)]
    pub request_bytes: usize,
    /// Also measure the guest protected (fixed and output-triggered epochs).
    #[arg(long)]
    pub protected: bool,
    /// Epoch interval of the protected runs, ms.
    #[arg(long, default_value_t = 25)]
    pub epoch_ms: u64,
    /// Shortest epoch in output-triggered mode, ms.
    #[arg(long, default_value_t = 1)]
    pub min_epoch_ms: u64,
    /// With --protected: also SIGKILL the primary (real `castor` processes
    /// in network namespaces) this many times and time the client's next byte.
    #[arg(long, default_value_t = 0)]
    pub kills: usize,
    /// Epoch mode of the kill runs: "fixed" or "output-triggered".
    #[arg(long, default_value = "output-triggered")]
    pub kill_epoch_mode: String,
    /// Internal: run as the client against this guest address.
    #[arg(long, hide = true)]
    pub client: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Unprotected,
    Fixed,
    OutputTriggered,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Unprotected => "unprotected",
            Mode::Fixed => "fixed",
            Mode::OutputTriggered => "output-triggered",
        }
    }
}

const PORT: u16 = 7000;

struct Env {
    ns: String,
    tap: Arc<Tap>,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", self.tap.name()])
            .output();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

pub fn run(args: &Args, out: &Output) -> Result<(), String> {
    if let Some(addr) = &args.client {
        return client(args, addr);
    }
    let mut modes = vec![Mode::Unprotected];
    if args.protected {
        modes.extend([Mode::Fixed, Mode::OutputTriggered]);
    }
    let mut rows = Vec::new();
    let mut base_p50 = None;
    for mode in modes {
        let v = measure(args, mode)?;
        let p50 = v["p50"].as_f64().unwrap_or(0.0);
        if mode == Mode::Unprotected {
            base_p50 = Some(p50);
        }
        rows.push(vec![
            ("mode", json!(mode.name())),
            (
                "epoch_ms",
                json!(if mode == Mode::Unprotected {
                    0
                } else {
                    args.epoch_ms
                }),
            ),
            ("stream_MiB_s", v["stream_mib_s"].clone()),
            ("stream_seconds", v["seconds"].clone()),
            ("req_bytes", json!(args.request_bytes)),
            ("rtt_p50_us", v["p50"].clone()),
            ("rtt_p99_us", v["p99"].clone()),
            ("rtt_max_us", v["max"].clone()),
            (
                "added_p50_us",
                json!(base_p50.map_or(0.0, |b| (p50 - b).round())),
            ),
            ("round_trips", v["pings"].clone()),
            ("epochs", v["epochs"].clone()),
        ]);
    }
    out.table(
        "guest TCP over virtio-net + tap, client in another namespace",
        &rows,
    );
    if args.protected && args.kills > 0 {
        let mut gaps = crate::net_kill::run(args.kills, &args.kill_epoch_mode, args.epoch_ms)?;
        gaps.sort_by(|a, b| a.total_cmp(b));
        out.table(
            "SIGKILL of the primary to the client's next byte (real processes, namespaces)",
            &[vec![
                ("epoch_mode", json!(args.kill_epoch_mode)),
                ("kills", json!(gaps.len())),
                (
                    "p50_ms",
                    json!((percentile(&gaps, 50.0) * 10.0).round() / 10.0),
                ),
                (
                    "p99_ms",
                    json!((percentile(&gaps, 99.0) * 10.0).round() / 10.0),
                ),
                (
                    "max_ms",
                    json!((gaps.last().copied().unwrap_or(0.0) * 10.0).round() / 10.0),
                ),
            ]],
        );
    }
    Ok(())
}

/// The in-process replication of a protected run: the backup thread and
/// the primary's pipeline thread, stopped and joined on drop.
struct Protection {
    stop: Arc<std::sync::atomic::AtomicBool>,
    status: Arc<castor_replicator::primary::PrimaryStatus>,
    primary: Option<std::thread::JoinHandle<()>>,
    backup: Option<std::thread::JoinHandle<()>>,
    _rt: tokio::runtime::Runtime,
}

impl Drop for Protection {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(p) = self.primary.take() {
            let _ = p.join();
        }
        if let Some(b) = self.backup.take() {
            let _ = b.join();
        }
    }
}

fn protect(
    vm: Arc<Vm>,
    buffer: Arc<OutputBuffer>,
    release: Arc<dyn Release>,
    mode: Mode,
    args: &Args,
) -> Result<Protection, String> {
    use castor_replicator::backup::{Backup, BackupConfig};
    use castor_replicator::primary::{EpochMode, Primary, PrimaryConfig};
    use castor_replicator::transport::{self, TransportConfig};
    let crate::pair::Loopback {
        rt,
        primary: pid,
        backup: bid,
        listener,
        addr,
    } = crate::pair::loopback()?;
    let backup = std::thread::Builder::new()
        .name("bench-backup".into())
        .spawn(move || {
            let Ok(rt2) = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            else {
                return;
            };
            let mut backup = Backup::new(
                BackupConfig {
                    peer_timeout: Duration::from_secs(2),
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
            if let Ok(Ok(conn)) = rt2.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), listener.accept()).await
            }) {
                let _ = rt2.block_on(backup.serve(conn));
            }
        })
        .map_err(|e| format!("spawning the backup thread: {e}"))?;
    let epoch_mode = match mode {
        Mode::OutputTriggered => EpochMode::OutputTriggered {
            min_epoch: Duration::from_millis(args.min_epoch_ms),
        },
        _ => EpochMode::Fixed,
    };
    let mut primary = Primary::new(
        vm,
        buffer,
        release,
        PrimaryConfig {
            epoch_mode,
            epoch_interval: Duration::from_millis(args.epoch_ms),
            peer_timeout: Duration::from_secs(2),
            cache_bytes: 64 << 20,
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
        .map_err(|e| format!("connecting to the backup: {e}"))?;
    let handle = rt.handle().clone();
    let primary = std::thread::Builder::new()
        .name("bench-primary".into())
        .spawn(move || {
            if let Err(e) = primary.replicate(conn, &handle) {
                if !matches!(e, castor_replicator::primary::PrimaryError::Stopped) {
                    eprintln!("castor-bench: replication ended: {e}");
                }
            }
        })
        .map_err(|e| format!("spawning the primary thread: {e}"))?;
    let p = Protection {
        stop,
        status,
        primary: Some(primary),
        backup: Some(backup),
        _rt: rt,
    };
    let end = Instant::now() + Duration::from_secs(30);
    while !p
        .status
        .protected
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        if Instant::now() > end {
            return Err("the guest was not protected within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(p)
}

fn measure(args: &Args, mode: Mode) -> Result<Value, String> {
    let id = std::process::id() % 100_000;
    let ns = format!("castor-bench{id}");
    let tap = Arc::new(Tap::open(&format!("cb{id}")).map_err(|e| e.to_string())?);
    let env = Env {
        ns: ns.clone(),
        tap: tap.clone(),
    };
    ip(&["netns", "add", &ns])?;
    ip(&["link", "set", tap.name(), "netns", &ns])?;
    ip(&["-n", &ns, "addr", "add", "10.214.0.1/24", "dev", tap.name()])?;
    ip(&["-n", &ns, "link", "set", tap.name(), "up"])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;

    let vm = Arc::new(
        Vm::new(
            &VmConfig {
                vcpus: 1,
                mem_bytes: 64 << 20,
                dirty_tracking: if mode == Mode::Unprotected {
                    castor_vmm::DirtyTracking::None
                } else {
                    castor_vmm::DirtyTracking::Auto
                },
                ..VmConfig::default()
            },
            Arc::new(NullSink),
        )
        .map_err(|e| e.to_string())?,
    );
    let mac = [0x02, 0xca, 0x57, 0, 0, 2];
    let buffer = Arc::new(OutputBuffer::new(
        castor_net_buffer::Config::with_max_bytes(4 << 20),
    ));
    let release: Arc<dyn Release> = Arc::new(TapRelease::new(tap.clone()));
    let tx_sink: Option<Arc<dyn castor_vmm::devices::TxSink>> = match mode {
        Mode::Unprotected => None,
        _ => Some(Arc::new(NetTxSink::new(buffer.clone(), release.clone()))),
    };
    vm.devices()
        .add_virtio_net(VirtioNet::new(NetConfig { tap, mac, tx_sink }))
        .map_err(|e| e.to_string())?;
    vm.boot(&GuestBoot {
        workload: Workload::Net(NetParams {
            ip: [10, 214, 0, 2],
            prefix_len: 24,
            gateway: None,
            mac,
            port: PORT,
            rate: 0,
        }),
        seed: 1,
    })
    .map_err(|e| e.to_string())?;
    let protection = match mode {
        Mode::Unprotected => {
            vm.resume();
            None
        }
        _ => {
            vm.resume();
            Some(protect(vm.clone(), buffer, release, mode, args)?)
        }
    };
    let epochs_before = protection.as_ref().map_or(0, |p| {
        p.status.epoch.load(std::sync::atomic::Ordering::Relaxed)
    });

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let o = Command::new("ip")
        .args(["netns", "exec", &env.ns])
        .arg(exe)
        .args(["net", "--client", "10.214.0.2"])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--pings", &args.pings.to_string()])
        .args(["--request-bytes", &args.request_bytes.to_string()])
        .output()
        .map_err(|e| format!("running the client: {e}"))?;
    let epochs = protection.as_ref().map_or(0, |p| {
        p.status.epoch.load(std::sync::atomic::Ordering::Relaxed) - epochs_before
    });
    drop(protection);
    vm.pause();
    if !o.status.success() {
        return Err(format!(
            "client failed ({}): {}",
            mode.name(),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let mut v: Value =
        serde_json::from_slice(&o.stdout).map_err(|e| format!("client output: {e}"))?;
    v["epochs"] = json!(epochs);
    drop(vm);
    drop(env);
    Ok(v)
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                return Ok(s);
            }
            Err(e) if Instant::now() > end => return Err(format!("connect {addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn client(args: &Args, addr: &str) -> Result<(), String> {
    let ipaddr: std::net::Ipv4Addr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    // Stream.
    let mut s = connect(SocketAddr::from((ipaddr, PORT)))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut next = 1u64;
    let mut pending: Vec<u8> = Vec::new();
    // Warm up, then measure.
    let warm = Instant::now() + Duration::from_millis(300);
    let mut bytes = 0u64;
    let mut start = None;
    let dur = Duration::from_secs_f64(args.seconds);
    loop {
        let n = s.read(&mut buf).map_err(|e| format!("stream read: {e}"))?;
        if n == 0 {
            return Err("stream closed".into());
        }
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / 8 * 8;
        for c in pending[..whole].chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            if u64::from_be_bytes(w) != next {
                return Err(format!("stream gap at {next}"));
            }
            next += 1;
        }
        pending.drain(..whole);
        match start {
            None if Instant::now() >= warm => start = Some(Instant::now()),
            None => {}
            Some(t) => {
                bytes += n as u64;
                if t.elapsed() >= dur {
                    break;
                }
            }
        }
    }
    let secs = start.map_or(1.0, |t| t.elapsed().as_secs_f64());
    drop(s);
    // Request/response.
    let mut e = connect(SocketAddr::from((ipaddr, PORT + 1)))?;
    let req = vec![0x5au8; args.request_bytes.max(1)];
    let mut back = vec![0u8; req.len()];
    let mut rtts = Vec::with_capacity(args.pings);
    for _ in 0..args.pings {
        let t = Instant::now();
        e.write_all(&req).map_err(|x| format!("echo write: {x}"))?;
        e.read_exact(&mut back)
            .map_err(|x| format!("echo read: {x}"))?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(|a, b| a.total_cmp(b));
    let v = json!({
        "stream_mib_s": (bytes as f64 / secs / (1 << 20) as f64 * 10.0).round() / 10.0,
        "seconds": (secs * 100.0).round() / 100.0,
        "p50": percentile(&rtts, 50.0).round(),
        "p99": percentile(&rtts, 99.0).round(),
        "max": rtts.last().copied().unwrap_or(0.0).round(),
        "pings": rtts.len(),
    });
    println!("{v}");
    Ok(())
}
