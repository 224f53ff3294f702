//! `castor demo --network` (root): the one-command demo with the networked
//! guest. It makes three network namespaces on this machine and removes them
//! at the end:
//!
//! ```text
//!  host A (primary)             host B (backup)            C (client)
//!  guest -- tap0 -- br0 -- eth0 ---- lan bridge 10.99.0.1 ---- eth0 -- br0 -- tap0 -- (replica)
//!           rep 10.98.0.1 <------------- replication link -------------> rep 10.98.0.2
//! ```
//!
//! The guest (10.99.0.2) serves its TCP counter on port 7000; a client in C
//! reads the stream while the primary is SIGKILLed, and the stream goes on
//! from the backup with no reset, gap or duplicate. [`Topology`] is public
//! for the drill test (`tests/tests/drill.rs`).

use crate::cluster::die_with_parent;
use crate::counter::CounterClient;
use crate::observe;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LAN_HOST: &str = "10.99.0.1/24";
/// The guest's address on the LAN.
pub const GUEST_IP: [u8; 4] = [10, 99, 0, 2];
/// Its counter service's port.
pub const PORT: u16 = 7000;

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e} (install iproute2)", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The namespaces and files of the demo; removed on drop.
pub struct Topology {
    /// The primary's host (namespace name).
    pub a: String,
    /// The backup's host.
    pub b: String,
    /// The client's host, on the LAN bridge.
    pub c: String,
    /// Keys, configs, logs, control sockets.
    pub dir: PathBuf,
    keep: bool,
    made: Vec<String>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in &self.made {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Topology {
    /// Makes the namespaces, bridges, taps, the replication link and keys
    /// (`tag` keeps the names of concurrent users apart).
    pub fn new(tag: &str, keep: bool) -> Result<Topology, String> {
        let id = format!("c{tag}{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("castor-{id}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut t = Topology {
            a: format!("{id}a"),
            b: format!("{id}b"),
            c: format!("{id}c"),
            dir,
            keep,
            made: Vec::new(),
        };
        for ns in [t.a.clone(), t.b.clone(), t.c.clone()] {
            ip(&["netns", "add", &ns])?;
            t.made.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let c = t.c.clone();
        ip(&["-n", &c, "link", "add", "lan", "type", "bridge"])?;
        ip(&["-n", &c, "addr", "add", LAN_HOST, "dev", "lan"])?;
        ip(&["-n", &c, "link", "set", "lan", "up"])?;
        for (h, up) in [(t.a.clone(), "upa"), (t.b.clone(), "upb")] {
            ip(&[
                "-n", &c, "link", "add", up, "type", "veth", "peer", "name", "eth0", "netns", &h,
            ])?;
            ip(&["-n", &c, "link", "set", up, "master", "lan"])?;
            ip(&["-n", &c, "link", "set", up, "up"])?;
            // The recipe an operator follows on a real host: a bridge with the
            // uplink and the guest's tap.
            ip(&["-n", &h, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &h, "link", "set", "eth0", "master", "br0"])?;
            ip(&["-n", &h, "link", "set", "eth0", "up"])?;
            ip(&["-n", &h, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
            ip(&["-n", &h, "link", "set", "tap0", "master", "br0"])?;
            ip(&["-n", &h, "link", "set", "tap0", "up"])?;
            ip(&["-n", &h, "link", "set", "br0", "up"])?;
        }
        ip(&[
            "-n", &t.a, "link", "add", "rep", "type", "veth", "peer", "name", "rep", "netns", &t.b,
        ])?;
        for (h, addr) in [(t.a.clone(), "10.98.0.1/24"), (t.b.clone(), "10.98.0.2/24")] {
            ip(&["-n", &h, "addr", "add", addr, "dev", "rep"])?;
            ip(&["-n", &h, "link", "set", "rep", "up"])?;
        }
        for name in ["a", "b"] {
            castor_replicator::transport::write_identity(&t.dir, name)
                .map_err(|e| format!("keygen: {e}"))?;
        }
        Ok(t)
    }

    /// Writes primary.toml and backup.toml (control sockets in the directory).
    pub fn write_configs(&self, epoch_ms: u64) -> Result<(PathBuf, PathBuf), String> {
        let primary = format!(
            "[vm]\nvcpus = 1\nmemory = \"64M\"\n\n\
             [guest]\nworkload = \"net\"\n\n\
             [net]\ntap = \"tap0\"\nip = \"10.99.0.2/24\"\nport = {PORT}\nrate = 500\n\n\
             [replication]\nbackup = \"10.98.0.2:7400\"\nbind = \"10.98.0.1:0\"\nepoch_ms = {epoch_ms}\n\
             epoch_mode = \"output-triggered\"\ntimeout_ms = 200\ncache = \"64M\"\n\n\
             [tls]\ncert = \"a.crt\"\nkey = \"a.key\"\npeer_cert = \"b.crt\"\n\n\
             [control]\nsocket = \"primary.sock\"\n"
        );
        let backup = "[replication]\nlisten = \"10.98.0.2:7400\"\ntimeout_ms = 200\n\n\
             [tls]\ncert = \"b.crt\"\nkey = \"b.key\"\npeer_cert = \"a.crt\"\n\n\
             [net]\ntap = \"tap0\"\n\n\
             [control]\nsocket = \"backup.sock\"\n"
            .to_string();
        let p = self.dir.join("primary.toml");
        let b = self.dir.join("backup.toml");
        for (path, text) in [(&p, primary), (&b, backup)] {
            std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok((p, b))
    }

    /// Starts `exe ROLE --config CONFIG` in the namespace `ns` (log: ROLE.log).
    pub fn spawn(&self, exe: &Path, ns: &str, role: &str, config: &Path) -> Result<Child, String> {
        let log = self.dir.join(format!("{role}.log"));
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(exe)
            .arg(role)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        die_with_parent(&mut cmd);
        cmd.spawn()
            .map_err(|e| format!("starting castor {role}: {e}"))
    }

    /// Starts the counter client inside the client namespace.
    fn client(&self) -> Result<CounterClient, String> {
        let ns = self.c.clone();
        std::thread::spawn(move || -> Result<CounterClient, String> {
            let f = std::fs::File::open(format!("/var/run/netns/{ns}"))
                .map_err(|e| format!("netns {ns}: {e}"))?;
            // SAFETY: setns on this thread only, with an open namespace fd;
            // the socket made below stays in that namespace.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            CounterClient::start(SocketAddr::from((GUEST_IP, PORT)), Duration::from_secs(20))
                .map_err(|e| e.to_string())
        })
        .join()
        .map_err(|_| "the client thread panicked".to_string())?
    }
}

fn state_of(sock: &Path) -> String {
    match crate::status::fetch_socket(sock) {
        Ok(s) => format!("{}: {}", s.role, s.state),
        Err(_) => "gone".into(),
    }
}

fn kill(c: &mut Child) -> Instant {
    let t = Instant::now();
    let _ = c.kill();
    let _ = c.wait();
    t
}

/// `castor demo --network`.
pub fn demo(kill_after: f64, watch_after: f64, epoch_ms: u64, keep: bool) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "castor demo --network makes network namespaces, bridges and taps: run it as root"
                .into(),
        );
    }
    observe::install_interrupt_handler();
    let t = Topology::new("demo", keep)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (pc, bc) = t.write_configs(epoch_ms)?;
    println!(
        "namespaces {} (primary), {} (backup), {} (client); files in {}",
        t.a,
        t.b,
        t.c,
        t.dir.display()
    );
    let psock = t.dir.join("primary.sock");
    let bsock = t.dir.join("backup.sock");
    let mut backup = t.spawn(&exe, &t.b, "backup", &bc)?;
    std::thread::sleep(Duration::from_millis(500));
    let mut primary = t.spawn(&exe, &t.a, "primary", &pc)?;
    let start = Instant::now();
    loop {
        if crate::status::fetch_socket(&psock)
            .is_ok_and(|s| s.state == castor_node::ProtectionState::Protected)
        {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) || observe::interrupted() {
            return Err(format!(
                "the primary did not become protected in 60 s; see {}",
                t.dir.join("primary.log").display()
            ));
        }
        if let Ok(Some(st)) = primary.try_wait() {
            return Err(format!(
                "the primary exited ({st}); see {}",
                t.dir.join("primary.log").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "primary PROTECTED after {:.1} s; a TCP client in {} connects to 10.99.0.2:{PORT}",
        start.elapsed().as_secs_f64(),
        t.c
    );
    let client = t.client()?;
    let t0 = Instant::now();
    let mut last = 0;
    let mut killed_at: Option<Instant> = None;
    let end_at = kill_after + watch_after;
    while t0.elapsed().as_secs_f64() < end_at {
        if observe::interrupted() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        let v = client.values();
        println!(
            "[{:5.1}s] client: counter at {v:>7} (+{:>4}) | {} | {}",
            t0.elapsed().as_secs_f64(),
            v - last,
            state_of(&psock),
            state_of(&bsock)
        );
        last = v;
        if killed_at.is_none() && t0.elapsed().as_secs_f64() >= kill_after {
            println!("!!! SIGKILL primary (pid {})", primary.id());
            killed_at = Some(kill(&mut primary));
        }
    }
    let killed_s = killed_at.map(|k| k.duration_since(t0).as_secs_f64());
    let (values, fault, stalls) = client.stop();
    let stall = killed_s.and_then(|k| {
        stalls
            .iter()
            .filter(|s| s.at_s <= k + 1.0 && s.at_s + s.ms / 1e3 >= k - 0.1)
            .map(|s| s.ms)
            .reduce(f64::max)
    });
    let status = crate::status::fetch_socket(&bsock).ok();
    kill(&mut backup);
    println!("\n=== castor demo --network ===");
    println!("counter values received by the client: {values}");
    if let Some(s) = status.as_ref().and_then(|s| s.last_failover.clone()) {
        println!(
            "takeover from epoch {}: state restore {:.2} ms, detection to resume {:.1} ms",
            s.from_epoch, s.restore_ms, s.resume_ms
        );
    }
    match stall {
        Some(ms) => println!("the stream stalled {ms:.0} ms around the SIGKILL, then went on"),
        None => println!(
            "no stall of {} ms or more around the SIGKILL",
            crate::counter::STALL.as_millis()
        ),
    }
    let continued = killed_at.is_some_and(|_| values > 0);
    match fault {
        Some(f) => Err(format!("the TCP stream broke: {f}")),
        None if continued => {
            println!("OK: one TCP connection, no reset, no gap, no duplicate, through the SIGKILL of the primary");
            Ok(())
        }
        None => Err("the demo was interrupted before the failover".into()),
    }
}
