//! Network failover end to end, on real KVM with real processes: a Linux TCP
//! client keeps a connection to the protected guest's counter service (and
//! one to its echo service) while the primary is SIGKILLed again and again.
//! The connection never resets, the counter stream has no gap and no
//! duplicate, the echo answers stay right, and the stream resumes (the time
//! from SIGKILL to the client's next byte is printed).
//!
//! Hosts are network namespaces. Two VM hosts, A and B, each with a bridge
//! `br0` joining its tap `tap0` (the guest's port on that host) and an uplink
//! veth to the LAN bridge `lan` in the client's namespace C (10.77.0.1/24;
//! the guest is 10.77.0.2). A and B also share a replication link (veth
//! `rep`, 10.78.0.1 / 10.78.0.2). Every daemon on host X listens for a
//! primary on X's replication address and, after a takeover, re-protects the
//! guest to a new backup on the other host, so kills alternate A, B, A, ...
//!
//! `CASTOR_NET_KILLS=N` sets the number of kills (default 3; the long run
//! uses 10+); `CASTOR_NET_EPOCH_MODE=fixed|output-triggered` (default
//! output-triggered); `..._with_loss_...` drops 1% of the packets each way
//! on the replication link (nftables), the ignored `..._with_netem` test adds
//! 1% loss and 1 ms delay (needs sch_netem); `CASTOR_NET_MAX_RESUME_MS=N`
//! bounds SIGKILL to the client's next byte (unbounded by default: a figure
//! of the host and its load, not a correctness property);
//! `CASTOR_KEEP_DIR=1` keeps the logs.

use castor::cluster::{die_with_parent, sibling_castor_exe};
use castor_tests::require_kvm;
use rand::Rng;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GUEST: [u8; 4] = [10, 77, 0, 2];
const PORT: u16 = 7000;

/// The `castor` CLI built into this package (`castor-under-test`), or the
/// `castor` executable next to this test (or `$CASTOR_BIN`).
fn castor_exe() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_castor-under-test") {
        Some(p) => PathBuf::from(p),
        None => match sibling_castor_exe() {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        },
    }
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the replication link between A and B does to packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// Nothing.
    Clean,
    /// netem: 1% loss and 1 ms delay (needs sch_netem).
    Netem,
    /// nftables: 1% of packets dropped, each way (no delay).
    Loss,
}

/// Three namespaces (hosts A, B and client C) and everything in them;
/// deleting a namespace deletes its interfaces, taps and bridges.
struct Topology {
    a: String,
    b: String,
    c: String,
    dir: PathBuf,
    keep: bool,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.c] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns.as_str()])
                .output();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Topology {
    fn new(link: Link) -> Topology {
        static N: AtomicU64 = AtomicU64::new(0);
        let id = format!(
            "cnf{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("castor-{id}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let t = Topology {
            a: format!("{id}a"),
            b: format!("{id}b"),
            c: format!("{id}c"),
            dir,
            keep: std::env::var_os("CASTOR_KEEP_DIR").is_some(),
        };
        for ns in [&t.a, &t.b, &t.c] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let c = t.c.as_str();
        sh(&["ip", "-n", c, "link", "add", "lan", "type", "bridge"]);
        sh(&["ip", "-n", c, "addr", "add", "10.77.0.1/24", "dev", "lan"]);
        sh(&["ip", "-n", c, "link", "set", "lan", "up"]);
        for (host, up) in [(&t.a, "upa"), (&t.b, "upb")] {
            let h = host.as_str();
            sh(&[
                "ip", "-n", c, "link", "add", up, "type", "veth", "peer", "name", "eth0", "netns",
                h,
            ]);
            sh(&["ip", "-n", c, "link", "set", up, "master", "lan"]);
            sh(&["ip", "-n", c, "link", "set", up, "up"]);
            sh(&["ip", "-n", h, "link", "add", "br0", "type", "bridge"]);
            sh(&["ip", "-n", h, "link", "set", "eth0", "master", "br0"]);
            sh(&["ip", "-n", h, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", h, "tuntap", "add", "tap0", "mode", "tap"]);
            sh(&["ip", "-n", h, "link", "set", "tap0", "master", "br0"]);
            sh(&["ip", "-n", h, "link", "set", "tap0", "up"]);
            sh(&["ip", "-n", h, "link", "set", "br0", "up"]);
        }
        sh(&[
            "ip", "-n", &t.a, "link", "add", "rep", "type", "veth", "peer", "name", "rep", "netns",
            &t.b,
        ]);
        for (h, addr) in [(&t.a, "10.78.0.1/24"), (&t.b, "10.78.0.2/24")] {
            sh(&["ip", "-n", h, "addr", "add", addr, "dev", "rep"]);
            sh(&["ip", "-n", h, "link", "set", "rep", "up"]);
            match link {
                Link::Clean => {}
                Link::Netem => sh(&[
                    "ip", "netns", "exec", h, "tc", "qdisc", "add", "dev", "rep", "root", "netem",
                    "loss", "1%", "delay", "1ms",
                ]),
                Link::Loss => {
                    // 1% of the packets arriving on the replication link, each way.
                    sh(&[
                        "ip", "netns", "exec", h, "nft", "add", "table", "inet", "lossy",
                    ]);
                    sh(&[
                        "ip",
                        "netns",
                        "exec",
                        h,
                        "nft",
                        "add",
                        "chain",
                        "inet",
                        "lossy",
                        "in",
                        "{ type filter hook input priority 0; }",
                    ]);
                    sh(&[
                        "ip", "netns", "exec", h, "nft", "add", "rule", "inet", "lossy", "in",
                        "iifname", "rep", "numgen", "random", "mod", "100", "0", "drop",
                    ]);
                }
            }
        }
        for name in ["a", "b"] {
            castor_replicator::transport::write_identity(&t.dir, name).expect("keygen");
        }
        t
    }

    fn ns(&self, host: usize) -> &str {
        if host == 0 {
            &self.a
        } else {
            &self.b
        }
    }

    /// Writes the configs of host `host` (0 = A, 1 = B), generation `gen`.
    fn configs(&self, host: usize, gen: u32, epoch_mode: &str) -> (PathBuf, PathBuf) {
        let me = ["a", "b"][host];
        let other = ["a", "b"][1 - host];
        let my_ip = ["10.78.0.1", "10.78.0.2"][host];
        let other_ip = ["10.78.0.1", "10.78.0.2"][1 - host];
        let timeout = env_u64("CASTOR_NET_TIMEOUT_MS", 100);
        let primary = format!(
            "[vm]\nvcpus = 1\nmemory = \"64M\"\n\n\
             [guest]\nworkload = \"net\"\n\n\
             [net]\ntap = \"tap0\"\nip = \"10.77.0.2/24\"\nport = {PORT}\nrate = 20000\n\n\
             [replication]\nbackup = \"{other_ip}:7400\"\nbind = \"{my_ip}:0\"\nepoch_ms = 20\n\
             epoch_mode = \"{epoch_mode}\"\nmin_epoch_ms = 1\nheartbeat_ms = 10\ntimeout_ms = {timeout}\n\
             on_backup_loss = \"pause\"\ncache = \"64M\"\n\n\
             [tls]\ncert = \"{me}.crt\"\nkey = \"{me}.key\"\npeer_cert = \"{other}.crt\"\n\n\
             [output]\nrelease_to = \"127.0.0.1:9\"\n"
        );
        let backup = format!(
            "[replication]\nlisten = \"{my_ip}:7400\"\nheartbeat_ms = 10\ntimeout_ms = {timeout}\n\n\
             [tls]\ncert = \"{me}.crt\"\nkey = \"{me}.key\"\npeer_cert = \"{other}.crt\"\n\n\
             [output]\nrelease_to = \"127.0.0.1:9\"\n\n\
             [net]\ntap = \"tap0\"\n\n\
             [takeover]\nreemit_output = true\nnew_backup = \"{other_ip}:7400\"\n\
             new_backup_cert = \"{other}.crt\"\nbind = \"{my_ip}:0\"\nepoch_ms = 20\n\
             epoch_mode = \"{epoch_mode}\"\nmin_epoch_ms = 1\non_backup_loss = \"continue\"\n\n\
             [log]\ncommit_log = \"commits-{me}{gen}.log\"\n"
        );
        let p = self.dir.join(format!("primary-{me}{gen}.toml"));
        let b = self.dir.join(format!("backup-{me}{gen}.toml"));
        std::fs::write(&p, primary).expect("write config");
        std::fs::write(&b, backup).expect("write config");
        (p, b)
    }

    fn commit_log(&self, host: usize, gen: u32) -> PathBuf {
        self.dir
            .join(format!("commits-{}{gen}.log", ["a", "b"][host]))
    }

    fn spawn(&self, host: usize, role: &str, config: &Path, log: &str) -> Daemon {
        let log = self.dir.join(log);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns(host)])
            .arg(castor_exe())
            .arg(role)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("start castor");
        Daemon { child }
    }

    /// Runs `f` on a thread inside the client namespace (sockets it makes stay there).
    fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.c.clone();
        std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("open netns");
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("client-namespace thread")
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.sort();
        for p in names
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
        {
            if let Ok(t) = std::fs::read_to_string(p) {
                let lines: Vec<&str> = t.lines().collect();
                let tail = &lines[lines.len().saturating_sub(12)..];
                s.push_str(&format!("--- {} ---\n{}\n", p.display(), tail.join("\n")));
            }
        }
        s
    }
}

struct Daemon {
    child: Child,
}

impl Daemon {
    fn kill(&mut self) -> Instant {
        let t = Instant::now();
        let _ = self.child.kill();
        let _ = self.child.wait();
        t
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.alive() {
            self.kill();
        }
    }
}

fn commits(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn wait_for(what: &str, timeout: Duration, t: &Topology, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}\n{}",
            t.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the client threads saw.
#[derive(Default)]
struct Client {
    /// Counter values received (the next expected is this + 1).
    values: AtomicU64,
    /// Nanoseconds since `start` of the last counter byte read.
    last_byte_ns: AtomicU64,
    /// Nanoseconds since `start` of every counter read.
    reads: Mutex<Vec<u64>>,
    /// Echo round trips completed.
    echoes: AtomicU64,
    /// First failure (reset, gap, duplicate, wrong echo), if any.
    failure: Mutex<Option<String>>,
    stop: AtomicBool,
}

impl Client {
    fn fail(&self, why: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn connect(port: u16) -> TcpStream {
    let addr = SocketAddr::from((GUEST, port));
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(1000)) {
            Ok(s) => return s,
            Err(e) if Instant::now() > end => panic!("connect to the guest at {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn counter_reader(mut s: TcpStream, c: Arc<Client>, start: Instant) {
    let mut buf = vec![0u8; 64 << 10];
    let mut pending: Vec<u8> = Vec::new();
    let mut next = 1u64;
    while !c.stop.load(Ordering::Relaxed) {
        let n = match s.read(&mut buf) {
            Ok(0) => return c.fail("counter connection closed by the guest side".into()),
            Ok(n) => n,
            Err(e) => {
                return c.fail(format!(
                    "counter connection: {e} (after value {})",
                    next - 1
                ))
            }
        };
        let now = start.elapsed().as_nanos() as u64;
        c.last_byte_ns.store(now, Ordering::Relaxed);
        c.reads.lock().unwrap_or_else(|e| e.into_inner()).push(now);
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / 8 * 8;
        for w in pending[..whole].chunks_exact(8) {
            let v = u64::from_be_bytes(w.try_into().unwrap_or([0; 8]));
            if v != next {
                return c.fail(format!(
                    "counter stream: got {v}, expected {next} ({})",
                    if v < next { "duplicate" } else { "gap" }
                ));
            }
            next += 1;
        }
        pending.drain(..whole);
        c.values.store(next - 1, Ordering::Relaxed);
    }
}

fn echo_client(mut s: TcpStream, c: Arc<Client>) {
    let mut i = 0u64;
    let mut back = [0u8; 64];
    while !c.stop.load(Ordering::Relaxed) {
        let mut msg = [0u8; 64];
        for (j, b) in msg.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(j as u8);
        }
        msg[..8].copy_from_slice(&i.to_be_bytes());
        if let Err(e) = s.write_all(&msg) {
            return c.fail(format!("echo write: {e}"));
        }
        if let Err(e) = s.read_exact(&mut back) {
            return c.fail(format!("echo read: {e} (request {i})"));
        }
        if back != msg {
            return c.fail(format!("echo {i} came back different"));
        }
        i += 1;
        c.echoes.store(i, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn run(kills: u32, link: Link) {
    require_kvm();
    let _serial = serial();
    let mode = std::env::var("CASTOR_NET_EPOCH_MODE").unwrap_or_else(|_| "output-triggered".into());
    // How fast the stream resumes is a figure (printed below), not a
    // correctness bound: a loaded host is slower. CASTOR_NET_MAX_RESUME_MS=N
    // turns it into a bound for a measurement run on an idle host.
    let max_resume = std::env::var("CASTOR_NET_MAX_RESUME_MS")
        .ok()
        .map(|_| Duration::from_millis(env_u64("CASTOR_NET_MAX_RESUME_MS", 2000)));
    let t = Topology::new(link);
    let mut gens = [0u32, 0u32];
    // Host A runs the primary, host B the first backup.
    let (_, b_cfg) = t.configs(1, 0, &mode);
    let (a_cfg, _) = t.configs(0, 0, &mode);
    let mut daemons: [Option<Daemon>; 2] = [None, None];
    daemons[1] = Some(t.spawn(1, "backup", &b_cfg, "b0-backup.log"));
    std::thread::sleep(Duration::from_millis(300));
    daemons[0] = Some(t.spawn(0, "primary", &a_cfg, "a0-primary.log"));
    wait_for("the first commits", Duration::from_secs(60), &t, || {
        commits(&t.commit_log(1, 0)) >= 3
    });

    let start = Instant::now();
    let client = Arc::new(Client::default());
    let (cs, es) = t.in_client(|| (connect(PORT), connect(PORT + 1)));
    for s in [&cs, &es] {
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        s.set_nodelay(true).ok();
    }
    let reader = {
        let c = client.clone();
        std::thread::spawn(move || counter_reader(cs, c, start))
    };
    let echo = {
        let c = client.clone();
        std::thread::spawn(move || echo_client(es, c))
    };
    let check = |what: &str| {
        if let Some(f) = client
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            panic!("client failure {what}: {f}\n{}", t.logs());
        }
    };
    wait_for("the counter stream", Duration::from_secs(20), &t, || {
        client.values.load(Ordering::Relaxed) > 1000
    });

    let mut rng = rand::thread_rng();
    let mut primary_host = 0usize;
    let mut resumes = Vec::new();
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(500..2500)));
        check(&format!("before kill {k}"));
        let before = client.values.load(Ordering::Relaxed);
        let killed = daemons[primary_host]
            .as_mut()
            .map(Daemon::kill)
            .unwrap_or_else(Instant::now);
        let killed_ns = killed.duration_since(start).as_nanos() as u64;
        // The other host's daemon takes over and re-protects the guest to a
        // new backup on the host just killed: start it now (its tap is free).
        let host = primary_host;
        gens[host] += 1;
        let (_, cfg) = t.configs(host, gens[host], &mode);
        daemons[host] = Some(t.spawn(
            host,
            "backup",
            &cfg,
            &format!("{}{}-backup.log", ["a", "b"][host], gens[host]),
        ));
        // Frames already on their way when the primary died may still
        // arrive just after the kill: the outage is the longest silence
        // after it. Wait until the stream has run for a second past the
        // kill, then find that silence.
        wait_for(
            &format!("the stream to resume after kill {k}"),
            Duration::from_secs(15),
            &t,
            || client.last_byte_ns.load(Ordering::Relaxed) > killed_ns + 1_000_000_000,
        );
        let resumed = {
            let reads = client.reads.lock().unwrap_or_else(|e| e.into_inner());
            let from = reads.partition_point(|&r| r <= killed_ns).saturating_sub(1);
            let mut prev = reads.get(from).copied().unwrap_or(killed_ns).min(killed_ns);
            let mut gap_end = killed_ns;
            let mut longest = 0;
            for &r in &reads[from..] {
                if r > killed_ns && r - prev > longest {
                    longest = r - prev;
                    gap_end = r;
                }
                prev = r;
            }
            Duration::from_nanos(gap_end - killed_ns)
        };
        resumes.push(resumed);
        eprintln!(
            "kill {k}: host {} SIGKILLed after value {before}; client's next byte {resumed:?} later",
            ["A", "B"][primary_host]
        );
        primary_host = 1 - host;
        let log = t.commit_log(host, gens[host]);
        wait_for(
            &format!("re-protection after kill {k}"),
            Duration::from_secs(60),
            &t,
            || commits(&log) >= 3,
        );
        check(&format!("after kill {k}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    check("at the end");
    let values = client.values.load(Ordering::Relaxed);
    let echoes = client.echoes.load(Ordering::Relaxed);
    client.stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let _ = echo.join();
    resumes.sort();
    eprintln!(
        "{kills} kills ({mode}, replication link {link:?}): {values} counter values and \
         {echoes} echoes, no reset, no gap, no duplicate; SIGKILL to the client's next byte: \
         min {:?}, median {:?}, max {:?}",
        resumes.first(),
        resumes.get(resumes.len() / 2),
        resumes.last()
    );
    if let Some(max_resume) = max_resume {
        for (k, r) in resumes.iter().enumerate() {
            assert!(
                *r <= max_resume,
                "resume {k} took {r:?} (> {max_resume:?})\n{}",
                t.logs()
            );
        }
    }
}

/// At least 3 SIGKILLs of the primary (alternating hosts) under a live TCP
/// stream and echo from a client on the LAN.
#[test]
fn tcp_client_never_notices_primary_kills() {
    run(env_u64("CASTOR_NET_KILLS", 3) as u32, Link::Clean);
}

/// The same with 1% packet loss each way on the replication link (nftables;
/// the kernel here has no sch_netem for the delay).
#[test]
fn tcp_client_never_notices_primary_kills_with_loss_on_the_replication_link() {
    run(env_u64("CASTOR_NET_KILLS", 3) as u32, Link::Loss);
}

/// The same with 1% loss and 1 ms delay on the replication link. Ignored
/// by default: the kernel needs sch_netem, which this CI kernel lacks
/// (`cargo test -p castor-tests --test net_failover -- --ignored`).
#[test]
#[ignore = "needs the sch_netem qdisc (absent from this CI kernel)"]
fn tcp_client_never_notices_primary_kills_with_netem() {
    run(env_u64("CASTOR_NET_KILLS", 3) as u32, Link::Netem);
}
