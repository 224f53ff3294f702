//! `castor-bench net`: the built-in guest's TCP services over virtio-net and a
//! tap, measured from a client in another network namespace, unprotected (no
//! replication): stream throughput of the counter service and
//! request/response latency of the echo service.
//!
//! The bench makes a tap, moves it into a fresh namespace with the host
//! address, boots the net guest, and runs itself as the client inside the
//! namespace (`ip netns exec NS castor-bench net --client IP`), which prints
//! one JSON line. Namespace and tap are removed on exit, even on failure.

use crate::report::{percentile, Output};
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
    /// Internal: run as the client against this guest address.
    #[arg(long, hide = true)]
    pub client: Option<String>,
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

    let vm = Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes: 64 << 20,
            ..VmConfig::default()
        },
        Arc::new(NullSink),
    )
    .map_err(|e| e.to_string())?;
    let mac = [0x02, 0xca, 0x57, 0, 0, 2];
    vm.devices()
        .add_virtio_net(VirtioNet::new(NetConfig {
            tap,
            mac,
            tx_sink: None,
        }))
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
    vm.resume();

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
    vm.pause();
    if !o.status.success() {
        return Err(format!(
            "client failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| format!("client output: {e}"))?;
    out.table(
        "guest TCP over virtio-net + tap, client in another namespace (unprotected)",
        &[vec![
            ("stream_MiB_s", v["stream_mib_s"].clone()),
            ("stream_seconds", v["seconds"].clone()),
            ("req_bytes", json!(args.request_bytes)),
            ("rtt_p50_us", v["p50"].clone()),
            ("rtt_p99_us", v["p99"].clone()),
            ("rtt_max_us", v["max"].clone()),
            ("round_trips", v["pings"].clone()),
        ]],
    );
    drop(vm);
    drop(env);
    Ok(())
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
