//! `castor-bench net --protected --kills N`: SIGKILL to the client's next
//! byte. Real `castor primary` / `castor backup` processes on two hosts
//! (network namespaces A and B, each a bridge joining its tap to the LAN in
//! the client's namespace C, plus a replication veth between A and B); a
//! client in C reads the guest's counter stream; the primary is SIGKILLed N
//! times at random instants (each takeover re-protects to a new backup on
//! the host just killed), and each time the gap from the kill to the next
//! byte the client reads is recorded. The same topology as
//! `tests/tests/net_failover.rs`, without its assertions.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

struct Lab {
    ns: [String; 3],
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.ns {
            let _ = Command::new("ip")
                .args(["netns", "del", ns.as_str()])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    fn new() -> Result<Lab, String> {
        let id = format!("cbk{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("castor-{id}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let lab = Lab {
            ns: [format!("{id}a"), format!("{id}b"), format!("{id}c")],
            dir,
            children: Vec::new(),
        };
        for ns in &lab.ns {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let c = lab.ns[2].as_str();
        sh(&["ip", "-n", c, "link", "add", "lan", "type", "bridge"])?;
        sh(&["ip", "-n", c, "addr", "add", "10.77.0.1/24", "dev", "lan"])?;
        sh(&["ip", "-n", c, "link", "set", "lan", "up"])?;
        for (h, up) in [(lab.ns[0].as_str(), "upa"), (lab.ns[1].as_str(), "upb")] {
            sh(&[
                "ip", "-n", c, "link", "add", up, "type", "veth", "peer", "name", "eth0", "netns",
                h,
            ])?;
            sh(&["ip", "-n", c, "link", "set", up, "master", "lan"])?;
            sh(&["ip", "-n", c, "link", "set", up, "up"])?;
            sh(&["ip", "-n", h, "link", "add", "br0", "type", "bridge"])?;
            sh(&["ip", "-n", h, "link", "set", "eth0", "master", "br0"])?;
            sh(&["ip", "-n", h, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", h, "tuntap", "add", "tap0", "mode", "tap"])?;
            sh(&["ip", "-n", h, "link", "set", "tap0", "master", "br0"])?;
            sh(&["ip", "-n", h, "link", "set", "tap0", "up"])?;
            sh(&["ip", "-n", h, "link", "set", "br0", "up"])?;
        }
        sh(&[
            "ip", "-n", &lab.ns[0], "link", "add", "rep", "type", "veth", "peer", "name", "rep",
            "netns", &lab.ns[1],
        ])?;
        for (h, addr) in [(&lab.ns[0], "10.78.0.1/24"), (&lab.ns[1], "10.78.0.2/24")] {
            sh(&["ip", "-n", h, "addr", "add", addr, "dev", "rep"])?;
            sh(&["ip", "-n", h, "link", "set", "rep", "up"])?;
        }
        for name in ["a", "b"] {
            castor_replicator::transport::write_identity(&lab.dir, name)
                .map_err(|e| format!("keygen: {e}"))?;
        }
        Ok(lab)
    }

    fn config(&self, host: usize, gen: u32, role: &str, mode: &str, epoch_ms: u64) -> PathBuf {
        let me = ["a", "b"][host];
        let other = ["a", "b"][1 - host];
        let my_ip = ["10.78.0.1", "10.78.0.2"][host];
        let other_ip = ["10.78.0.1", "10.78.0.2"][1 - host];
        let text = if role == "primary" {
            format!(
                "[vm]\nmemory = \"64M\"\n[guest]\nworkload = \"net\"\n\
                 [net]\ntap = \"tap0\"\nip = \"10.77.0.2/24\"\nport = 7000\nrate = 20000\n\
                 [replication]\nbackup = \"{other_ip}:7400\"\nbind = \"{my_ip}:0\"\nepoch_ms = {epoch_ms}\n\
                 epoch_mode = \"{mode}\"\ncache = \"64M\"\n\
                 [tls]\ncert = \"{me}.crt\"\nkey = \"{me}.key\"\npeer_cert = \"{other}.crt\"\n\
                 [output]\nrelease_to = \"127.0.0.1:9\"\n"
            )
        } else {
            format!(
                "[replication]\nlisten = \"{my_ip}:7400\"\n\
                 [tls]\ncert = \"{me}.crt\"\nkey = \"{me}.key\"\npeer_cert = \"{other}.crt\"\n\
                 [output]\nrelease_to = \"127.0.0.1:9\"\n[net]\ntap = \"tap0\"\n\
                 [takeover]\nnew_backup = \"{other_ip}:7400\"\nnew_backup_cert = \"{other}.crt\"\n\
                 bind = \"{my_ip}:0\"\nepoch_ms = {epoch_ms}\nepoch_mode = \"{mode}\"\n\
                 [log]\ncommit_log = \"commits-{me}{gen}.log\"\n"
            )
        };
        let p = self.dir.join(format!("{role}-{me}{gen}.toml"));
        let _ = std::fs::write(&p, text);
        p
    }

    fn spawn(
        &mut self,
        exe: &Path,
        host: usize,
        role: &str,
        config: &Path,
    ) -> Result<usize, String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns[host].as_str()])
            .arg(exe)
            .arg(role)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        castor::cluster::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", exe.display()))?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    fn commits(&self, host: usize, gen: u32) -> usize {
        std::fs::read_to_string(
            self.dir
                .join(format!("commits-{}{gen}.log", ["a", "b"][host])),
        )
        .map(|t| t.lines().count())
        .unwrap_or(0)
    }
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let end = Instant::now() + timeout;
    while !f() {
        if Instant::now() > end {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs `kills` SIGKILLs of the primary; returns each SIGKILL-to-next-byte gap in ms.
pub fn run(kills: usize, mode: &str, epoch_ms: u64) -> Result<Vec<f64>, String> {
    use rand::Rng;
    let exe = castor::cluster::sibling_castor_exe().map_err(|e| e.to_string())?;
    let mut lab = Lab::new()?;
    // The index in `lab.children` of the live daemon on each host.
    let mut live = [0usize; 2];
    let cfg = lab.config(1, 0, "backup", mode, epoch_ms);
    live[1] = lab.spawn(&exe, 1, "backup", &cfg)?;
    std::thread::sleep(Duration::from_millis(300));
    let cfg = lab.config(0, 0, "primary", mode, epoch_ms);
    live[0] = lab.spawn(&exe, 0, "primary", &cfg)?;
    wait("the first commits", Duration::from_secs(60), || {
        lab.commits(1, 0) >= 3
    })?;
    let ns = lab.ns[2].clone();
    let stream = std::thread::spawn(move || -> Result<TcpStream, String> {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).map_err(|e| e.to_string())?;
        // SAFETY: setns on this thread only, with a valid namespace fd.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let addr = SocketAddr::from(([10, 77, 0, 2], 7000));
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() > end => return Err(format!("connect {addr}: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })
    .join()
    .map_err(|_| "the connect thread panicked".to_string())??;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    let reader = {
        let (last, stop, failed, reads) =
            (last.clone(), stop.clone(), failed.clone(), reads.clone());
        let mut s = stream;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while !stop.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        let now = start.elapsed().as_nanos() as u64;
                        last.store(now, Ordering::Relaxed);
                        reads.lock().unwrap_or_else(|e| e.into_inner()).push(now);
                    }
                    _ => {
                        failed.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            }
        })
    };
    let mut rng = rand::thread_rng();
    let mut gens = [0u32; 2];
    let mut host = 0usize;
    let mut gaps = Vec::new();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(500..2000)));
        let killed = Instant::now();
        if let Some(c) = lab.children.get_mut(live[host]) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let killed_ns = killed.duration_since(start).as_nanos() as u64;
        gens[host] += 1;
        let cfg = lab.config(host, gens[host], "backup", mode, epoch_ms);
        live[host] = lab.spawn(&exe, host, "backup", &cfg)?;
        // The outage is the longest silence after the kill (frames already
        // on their way may arrive just after it): let the stream run a
        // second past the kill, then find it.
        wait("the stream to resume", Duration::from_secs(15), || {
            last.load(Ordering::Relaxed) > killed_ns + 1_000_000_000
                || failed.load(Ordering::Relaxed)
        })?;
        if failed.load(Ordering::Relaxed) {
            return Err("the client's connection failed".into());
        }
        gaps.push(
            outage_end(&reads.lock().unwrap_or_else(|e| e.into_inner()), killed_ns) as f64 / 1e6,
        );
        // The daemon on the other host is the primary now; it re-protects
        // to the backup just started on this one.
        let (h, g) = (host, gens[host]);
        wait("re-protection", Duration::from_secs(60), || {
            lab.commits(h, g) >= 3
        })?;
        host = 1 - host;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    Ok(gaps)
}

/// Nanoseconds from `killed` to the end of the longest silence between
/// consecutive reads (`reads` ascending) after it.
fn outage_end(reads: &[u64], killed: u64) -> u64 {
    let from = reads.partition_point(|&r| r <= killed).saturating_sub(1);
    let mut prev = reads.get(from).copied().unwrap_or(killed).min(killed);
    let (mut longest, mut end) = (0, killed);
    for &r in &reads[from.min(reads.len())..] {
        if r > killed && r - prev > longest {
            longest = r - prev;
            end = r;
        }
        prev = r;
    }
    end - killed
}
