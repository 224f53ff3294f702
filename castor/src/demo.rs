//! `castor demo`: a primary and a backup as separate processes on this
//! machine, an in-process observer on the released output, live status, a
//! SIGKILL of the primary, the backup's takeover, and a summary with the
//! failover time and the invariant's verdict.

use crate::cluster::{metric, scrape, Cluster, Daemon, Spec};
use crate::observe::{self, CheckOptions, CommitLog, Observer};
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `castor demo` arguments.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Seconds of protected running (after the first released output) before the primary is SIGKILLed.
    #[arg(long, default_value_t = 5.0)]
    pub kill_after: f64,
    /// Seconds to keep watching after the kill.
    #[arg(long, default_value_t = 3.0)]
    pub watch_after: f64,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory.
    #[arg(long, default_value = "128M")]
    pub memory: String,
    /// Epoch interval in ms.
    #[arg(long, default_value_t = 25)]
    pub epoch_ms: u64,
    /// Guest dirty rate.
    #[arg(long, default_value = "50M")]
    pub dirty_rate: String,
    /// Keep the temporary directory (keys, configs, logs, commit log).
    #[arg(long)]
    pub keep: bool,
    /// The networked guest (root): taps and bridges in network namespaces
    /// this command makes and removes, and a TCP client of the guest's
    /// counter service whose stream goes on through the SIGKILL.
    #[arg(long)]
    pub network: bool,
}

struct Tail {
    path: PathBuf,
    pos: u64,
}

impl Tail {
    fn new(path: &Path) -> Tail {
        Tail {
            path: path.into(),
            pos: 0,
        }
    }

    /// New complete lines since the last call.
    fn lines(&mut self) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return Vec::new();
        }
        let mut s = String::new();
        if f.read_to_string(&mut s).is_err() {
            return Vec::new();
        }
        let Some(end) = s.rfind('\n') else {
            return Vec::new();
        };
        self.pos += end as u64 + 1;
        s[..end].lines().map(str::to_string).collect()
    }
}

fn interrupted() -> Result<(), String> {
    if observe::interrupted() {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

struct Status {
    last_epochs: Option<f64>,
    last_records: usize,
    last_at: Instant,
}

impl Status {
    fn line(&mut self, t0: Instant, role: &str, m: Option<SocketAddr>, obs: &Observer) -> String {
        let now = Instant::now();
        let dt = now.duration_since(self.last_at).as_secs_f64().max(1e-3);
        let n = obs.count();
        let mut line = format!(
            "[{:5.1}s] {role:<8} output {:>6} records ({:>4.0}/s)",
            t0.elapsed().as_secs_f64(),
            n,
            (n - self.last_records) as f64 / dt
        );
        if let Some(addr) = m {
            let s = scrape(addr);
            if let Some(e) = metric(&s, "castor_epochs_total") {
                let rate = self.last_epochs.map_or(0.0, |p| (e - p) / dt);
                self.last_epochs = Some(e);
                line.push_str(&format!(" | epochs {e:>5.0} ({rate:>3.0}/s)"));
                let q = |name: &str, qq: &str| {
                    metric(&s, &format!("{name}{{quantile=\"{qq}\"}}")).unwrap_or(0.0) * 1e3
                };
                line.push_str(&format!(
                    " | pause p50 {:.2} ms p99 {:.2} ms | ack p50 {:.1} ms | held {:.1} KiB",
                    q("castor_pause_seconds", "0.5"),
                    q("castor_pause_seconds", "0.99"),
                    q("castor_ack_latency_seconds", "0.5"),
                    metric(&s, "castor_held_output_bytes").unwrap_or(0.0) / 1024.0
                ));
            }
        }
        if let Some(d) = obs.last() {
            line.push_str(&format!(
                " | last: vCPU {} #{} epoch {}",
                d.vcpu, d.seq, d.epoch
            ));
        }
        self.last_records = n;
        self.last_at = now;
        line
    }
}

/// Runs the demo.
pub fn demo(a: &DemoArgs) -> Result<(), String> {
    if a.network {
        return crate::netdemo::demo(a.kill_after, a.watch_after, a.epoch_ms, a.keep);
    }
    observe::install_interrupt_handler();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(|e| e.to_string())?;
    let spec = Spec {
        vcpus: a.vcpus,
        memory: a.memory.clone(),
        epoch_ms: a.epoch_ms,
        dirty_rate: a.dirty_rate.clone(),
        record_every: 64,
        metrics: true,
        commit_log: true,
        ..Spec::default()
    };
    let mut cluster = Cluster::prepare(&exe, None, spec, obs.addr()).map_err(|e| e.to_string())?;
    cluster.keep = cluster.keep || a.keep;
    println!("castor demo: working directory {}", cluster.dir.display());
    println!(
        "  keys: primary.crt/key, backup.crt/key; configs: primary.toml, backup.toml; logs: primary.log, backup.log"
    );
    println!(
        "  backup listens on {} (QUIC + mutual TLS), output goes to the observer on {}",
        cluster.backup_addr,
        obs.addr()
    );
    let mut backup = cluster.start_backup().map_err(|e| e.to_string())?;
    let mut primary = cluster.start_primary().map_err(|e| e.to_string())?;
    println!(
        "  started backup (pid {}) and primary (pid {}): {} vCPU(s), {} guest, {} ms epochs, dirtier at {}/s",
        backup.pid(),
        primary.pid(),
        a.vcpus,
        a.memory,
        a.epoch_ms,
        a.dirty_rate
    );
    let result = run(a, &cluster, &obs, &mut primary, &mut backup);
    // Children are SIGKILLed when their handles drop (and by PDEATHSIG if we die).
    drop(primary);
    drop(backup);
    if cluster.keep {
        println!("kept {}", cluster.dir.display());
    }
    result
}

fn run(
    a: &DemoArgs,
    cluster: &Cluster,
    obs: &Observer,
    primary: &mut Daemon,
    backup: &mut Daemon,
) -> Result<(), String> {
    let t0 = Instant::now();
    let mut tail = Tail::new(&backup.log);
    // Initial synchronisation: wait for the first released record.
    println!("initial synchronisation (the backup receives the whole guest memory)...");
    let deadline = Instant::now() + Duration::from_secs(60);
    while obs.count() == 0 {
        interrupted()?;
        primary.check_alive().map_err(|e| e.to_string())?;
        backup.check_alive().map_err(|e| e.to_string())?;
        if Instant::now() > deadline {
            return Err(format!(
                "no output released after 60 s; see {} and {}",
                primary.log.display(),
                backup.log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "protected: first output released {} after start",
        ms(t0.elapsed())
    );
    let mut status = Status {
        last_epochs: None,
        last_records: 0,
        last_at: Instant::now(),
    };
    let protected_from = Instant::now();
    let mut next_print = Instant::now() + Duration::from_secs(1);
    while protected_from.elapsed().as_secs_f64() < a.kill_after {
        interrupted()?;
        primary.check_alive().map_err(|e| e.to_string())?;
        if Instant::now() >= next_print {
            println!(
                "{}",
                status.line(t0, "primary", cluster.primary_metrics, obs)
            );
            next_print += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = obs.datagrams();
    let old_source = before.last().map(|d| d.from);
    println!(
        "\n*** SIGKILL primary (pid {}) with {} records released ***",
        primary.pid(),
        before.len()
    );
    let killed = primary.kill();
    let mut first_new = None;
    let watch_until = killed + Duration::from_secs_f64(a.watch_after);
    let mut next_print = killed + Duration::from_secs(1);
    status.last_epochs = None;
    while Instant::now() < watch_until || first_new.is_none() {
        interrupted()?;
        if first_new.is_none() {
            if let Some(d) = obs.first_from_new_source(killed, old_source) {
                println!(
                    "*** backup took over: first output from the new primary {} after SIGKILL (vCPU {} record {}, epoch {}) ***",
                    ms(d.at.duration_since(killed)),
                    d.vcpu,
                    d.seq,
                    d.epoch
                );
                first_new = Some(d);
            } else if killed.elapsed() > Duration::from_secs(10) {
                backup.check_alive().map_err(|e| e.to_string())?;
                return Err(format!(
                    "no output from the backup 10 s after the kill; see {}",
                    backup.log.display()
                ));
            }
        }
        for l in tail.lines() {
            if l.contains("WARN") || l.contains("ERROR") {
                println!("  backup log: {l}");
            }
        }
        if Instant::now() >= next_print {
            println!("{}", status.line(t0, "backup", cluster.backup_metrics, obs));
            next_print += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    backup.kill();
    std::thread::sleep(Duration::from_millis(50));
    let log = obs.datagrams();
    let cl = CommitLog::load(&cluster.commit_log()).map_err(|e| e.to_string())?;
    let verdict = observe::check(
        &log,
        Some(&cl),
        &CheckOptions {
            from_start: true,
            failovers: Some(1),
        },
    );
    println!("\n=== summary ===");
    println!(
        "protected run {:.1} s, {} epochs committed by the backup",
        a.kill_after,
        cl.commits.len()
    );
    if let Some(d) = &first_new {
        println!(
            "failover time (SIGKILL -> first record released by the new primary): {}",
            ms(d.at.duration_since(killed))
        );
        let max_before = before.iter().map(|d| d.seq).max().unwrap_or(0);
        if let Some(fresh) = log
            .iter()
            .find(|x| x.at >= killed && x.seq > max_before && x.from == d.from)
        {
            println!(
                "first record the world had not seen: {} after SIGKILL",
                ms(fresh.at.duration_since(killed))
            );
        }
    }
    print!("{verdict}");
    if verdict.ok() {
        Ok(())
    } else {
        Err("the one-history invariant is violated".into())
    }
}
