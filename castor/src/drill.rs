//! `castor drill`: against a running pair, trigger a failover on purpose
//! (SIGKILL the primary, or cut the replication link with an iptables rule),
//! observe the guest's output as its clients would, check it and report (as
//! text, or JSON with `--json`).
//!
//! - Record guest (`workload = "dirtier"`): the drill receives the released
//!   records on `[output] release_to` and checks the one-history invariant
//!   against the backup's commit log.
//! - Network guest (`workload = "net"`): the drill is a TCP client of the
//!   guest's counter service (`[net] ip`, `port`, reachable from the drill
//!   host): the stream must go on through the failover with no reset, gap or
//!   duplicate; the report gives the stall the client saw.

use crate::cluster::{metric, scrape};
use crate::counter::{CounterClient, StreamFault};
use crate::observe::{self, CheckOptions, CommitLog, Observer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `castor drill` arguments.
#[derive(clap::Args, Debug)]
pub struct DrillArgs {
    /// The running primary's config file.
    #[arg(long)]
    pub primary_config: PathBuf,
    /// The running backup's config file.
    #[arg(long)]
    pub backup_config: PathBuf,
    /// "kill": SIGKILL the primary (found by its command line);
    /// "partition": drop the replication traffic with iptables.
    #[arg(long, default_value = "kill")]
    pub mode: String,
    /// Seconds to observe output before triggering the failover.
    #[arg(long, default_value_t = 2.0)]
    pub before: f64,
    /// Seconds to observe output after it.
    #[arg(long, default_value_t = 3.0)]
    pub after: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a drill found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrillReport {
    /// "kill" or "partition".
    pub mode: String,
    /// "records" or "net".
    pub workload: &'static str,
    /// When the failover was triggered (Unix seconds).
    pub trigger_unix: f64,
    /// Trigger to the backup declaring the primary lost, ms (backup metrics).
    pub detection_ms: Option<f64>,
    /// State restore on the backup, ms.
    pub restore_ms: Option<f64>,
    /// Detection to the guest running on the backup, ms.
    pub resume_ms: Option<f64>,
    /// Trigger to the first output of the new primary seen by the drill, ms.
    pub takeover_ms: Option<f64>,
    /// Outputs (records, or counter values) seen before the trigger.
    pub outputs_before: u64,
    /// Outputs seen after it.
    pub outputs_after: u64,
    /// Records released twice (a takeover's re-emission).
    pub duplicates: u64,
    /// Whether outputs were lost (a gap).
    pub lost: bool,
    /// Network guest: the longest stall of the TCP stream around the
    /// failover, ms.
    pub stream_stall_ms: Option<f64>,
    /// Whether everything the drill saw forms one history.
    pub ok: bool,
    /// What is wrong, if anything.
    pub violations: Vec<String>,
}

impl std::fmt::Display for DrillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
        writeln!(
            f,
            "=== drill report ({}, {} guest) ===",
            self.mode, self.workload
        )?;
        writeln!(
            f,
            "detection (trigger -> backup declares the primary lost): {}",
            ms(self.detection_ms)
        )?;
        writeln!(f, "state restore: {}", ms(self.restore_ms))?;
        writeln!(f, "detection -> guest resumed: {}", ms(self.resume_ms))?;
        writeln!(
            f,
            "takeover (trigger -> first output of the new primary): {}",
            ms(self.takeover_ms)
        )?;
        if self.workload == "net" {
            writeln!(f, "TCP counter stream: {} values before the trigger, {} after; longest stall around the failover: {}",
                self.outputs_before, self.outputs_after, ms(self.stream_stall_ms))?;
        } else {
            writeln!(
                f,
                "outputs: {} before the trigger, {} after; duplicated: {}; lost (gaps): {}",
                self.outputs_before,
                self.outputs_after,
                self.duplicates,
                if self.lost { "YES" } else { "0" }
            )?;
        }
        for v in &self.violations {
            writeln!(f, "VIOLATION: {v}")?;
        }
        writeln!(f, "{}", if self.ok { "OK: one history" } else { "FAILED" })
    }
}

/// Finds the pid of `castor primary --config PATH` by scanning /proc.
fn find_primary(config: &Path) -> Result<i32, String> {
    let want = std::fs::canonicalize(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut found = Vec::new();
    let dir = std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(i) = args.iter().position(|a| a == "primary") else {
            continue;
        };
        let Some(cfg) = args[i..]
            .windows(2)
            .find(|w| w[0] == "--config")
            .map(|w| w[1].clone())
        else {
            continue;
        };
        let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        let path = cwd.join(cfg);
        if std::fs::canonicalize(&path).is_ok_and(|p| p == want) {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => Err(format!(
            "no running `castor primary --config {}` found",
            config.display()
        )),
        many => Err(format!("several primaries run with that config: {many:?}")),
    }
}

struct Partition {
    rules: Vec<Vec<String>>,
}

impl Partition {
    fn cut(port: u16) -> Result<Partition, String> {
        let p = port.to_string();
        let rules: Vec<Vec<String>> = ["--dport", "--sport"]
            .iter()
            .map(|dir| {
                ["INPUT", "-p", "udp", dir, &p, "-j", "DROP"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            })
            .collect();
        let mut done = Partition { rules: Vec::new() };
        for r in rules {
            let st = std::process::Command::new("iptables")
                .arg("-I")
                .args(&r)
                .status()
                .map_err(|e| format!("iptables: {e} (is it installed? use --mode kill)"))?;
            if !st.success() {
                return Err(format!("iptables -I {} failed ({st})", r.join(" ")));
            }
            done.rules.push(r);
        }
        Ok(done)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for r in &self.rules {
            let _ = std::process::Command::new("iptables")
                .arg("-D")
                .args(r)
                .status();
        }
    }
}

/// Runs the drill.
pub fn drill(a: &DrillArgs) -> Result<(), String> {
    observe::install_interrupt_handler();
    let p = castor_primary::Config::load(&a.primary_config).map_err(|e| e.to_string())?;
    let b = castor_backup::Config::load(&a.backup_config).map_err(|e| e.to_string())?;
    let report =
        match (&p.linux, &p.boot.workload) {
            // A Linux guest with a network device: the guest kit's init serves
            // the same counter on port 7000, at the address of `castor.ip=` on
            // its command line (default 10.0.0.2).
            (Some(l), _) if p.net.is_some() => {
                let addr = SocketAddr::from((linux_guest_ip(&l.cmdline)?, 7000));
                net_drill(a, &p, &b, addr)?
            }
            (Some(_), _) => return Err(
                "a drill of a Linux guest observes its TCP counter (port 7000 of the guest kit): \
                 give the guest a [net] section"
                    .into(),
            ),
            (None, castor_vmm::Workload::Net(n)) => {
                let addr = SocketAddr::from((n.ip, n.port));
                net_drill(a, &p, &b, addr)?
            }
            (None, _) => record_drill(a, &p, &b)?,
        };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print!("{report}");
    }
    if report.takeover_ms.is_none() {
        return Err("no takeover observed".into());
    }
    if report.ok {
        Ok(())
    } else {
        Err("the one-history invariant is violated".into())
    }
}

/// The address a kit guest takes: `castor.ip=A.B.C.D/P` on its command
/// line, else the kit's default 10.0.0.2.
fn linux_guest_ip(cmdline: &str) -> Result<std::net::Ipv4Addr, String> {
    match cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("castor.ip="))
    {
        None => Ok(std::net::Ipv4Addr::new(10, 0, 0, 2)),
        Some(v) => castor_primary::config::parse_cidr(v)
            .map(|(ip, _)| ip.into())
            .ok_or_else(|| {
                format!("castor.ip={v} on the guest's command line: use ADDRESS/PREFIX")
            }),
    }
}

/// Waits `secs`, unless interrupted.
fn wait(secs: f64) -> Result<(), String> {
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        if observe::interrupted() {
            return Err("interrupted".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The failover: SIGKILL of the primary or a partition (kept until dropped).
fn trigger(
    a: &DrillArgs,
    p: &castor_primary::Config,
    b: &castor_backup::Config,
    say: &dyn Fn(String),
) -> Result<(Instant, u128, Option<Partition>), String> {
    match a.mode.as_str() {
        "kill" => {
            let pid = find_primary(&a.primary_config)?;
            say(format!("SIGKILL primary pid {pid}"));
            let t = (Instant::now(), observe::unix_ns());
            // SAFETY: plain kill(2) on a pid we found.
            if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                return Err(format!("kill {pid}: {}", std::io::Error::last_os_error()));
            }
            Ok((t.0, t.1, None))
        }
        "partition" => {
            if p.on_backup_loss == castor_node::OnBackupLoss::Continue {
                say("WARNING: the primary's on_backup_loss is \"continue\": a partition makes both sides run (split brain); the check will show it".into());
            }
            say(format!(
                "cutting replication traffic on UDP port {}",
                b.listen.port()
            ));
            let t = (Instant::now(), observe::unix_ns());
            let part = Partition::cut(b.listen.port())?;
            Ok((t.0, t.1, Some(part)))
        }
        other => Err(format!("--mode {other:?}: use kill or partition")),
    }
}

/// The backup's takeover timings, from its metrics endpoint.
fn backup_timings(
    b: &castor_backup::Config,
    trigger_unix_ns: u128,
    r: &mut DrillReport,
    say: &dyn Fn(String),
) {
    let Some(m) = b.metrics else {
        say(
            "(set [metrics] listen in the backup's config for detection and restore timings)"
                .into(),
        );
        return;
    };
    let s = scrape(m);
    r.detection_ms = metric(&s, "castor_takeover_detected_unix_seconds")
        .map(|d| d * 1e3 - trigger_unix_ns as f64 / 1e6);
    r.restore_ms = metric(&s, "castor_takeover_restore_seconds").map(|v| v * 1e3);
    r.resume_ms = metric(&s, "castor_takeover_resume_seconds").map(|v| v * 1e3);
}

fn empty_report(a: &DrillArgs, workload: &'static str, trigger_unix_ns: u128) -> DrillReport {
    DrillReport {
        mode: a.mode.clone(),
        workload,
        trigger_unix: trigger_unix_ns as f64 / 1e9,
        detection_ms: None,
        restore_ms: None,
        resume_ms: None,
        takeover_ms: None,
        outputs_before: 0,
        outputs_after: 0,
        duplicates: 0,
        lost: false,
        stream_stall_ms: None,
        ok: false,
        violations: Vec::new(),
    }
}

/// The network guest's drill: a TCP client of its counter service.
fn net_drill(
    a: &DrillArgs,
    p: &castor_primary::Config,
    b: &castor_backup::Config,
    addr: SocketAddr,
) -> Result<DrillReport, String> {
    let json = a.json;
    let say = move |m: String| {
        if !json {
            println!("{m}");
        }
    };
    let client = CounterClient::start(addr, Duration::from_secs(5)).map_err(|e| {
        format!("{e}: the drill is a client of the guest's counter service; run it where the guest's address is reachable (see the README's network recipe)")
    })?;
    say(format!(
        "drill: reading the guest's TCP counter stream from {addr}"
    ));
    wait(a.before)?;
    let before = client.values();
    if before == 0 {
        return Err(format!(
            "no counter value arrived from {addr} in {} s: is the pair running and protected?",
            a.before
        ));
    }
    let (t0, t0_unix, partition) = trigger(a, p, b, &say)?;
    let trigger_at = client.elapsed();
    let _ = t0;
    wait(a.after)?;
    drop(partition);
    let (values, fault, stalls) = client.stop();
    let mut r = empty_report(a, "net", t0_unix);
    backup_timings(b, t0_unix, &mut r, &say);
    r.outputs_before = before;
    r.outputs_after = values.saturating_sub(before);
    // The stall that spans the trigger (or starts right after it).
    let t = trigger_at.as_secs_f64();
    let around: Vec<_> = stalls
        .iter()
        .filter(|s| s.at_s <= t + 1.0 && s.at_s + s.ms / 1e3 >= t)
        .collect();
    r.stream_stall_ms = around
        .iter()
        .map(|s| s.ms)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    // The first value after the trigger came from the new primary once the
    // stall around the trigger ended.
    r.takeover_ms = match around.iter().map(|s| s.at_s * 1e3 + s.ms).reduce(f64::max) {
        Some(end_ms) => Some(end_ms - t * 1e3),
        None if r.outputs_after > 0 => Some(0.0),
        None => None,
    };
    if let Some(f) = fault {
        r.lost = matches!(f, StreamFault::OutOfSequence { got, expected } if got > expected);
        r.violations.push(f.to_string());
    }
    if r.outputs_after == 0 {
        r.violations
            .push("the counter stream did not continue after the failover".into());
    }
    r.ok = r.violations.is_empty();
    Ok(r)
}

/// The record guest's drill: observe released records, check against the
/// backup's commit log.
fn record_drill(
    a: &DrillArgs,
    p: &castor_primary::Config,
    b: &castor_backup::Config,
) -> Result<DrillReport, String> {
    let json = a.json;
    let say = move |m: String| {
        if !json {
            println!("{m}");
        }
    };
    let Some(release_to) = p.release_to else {
        return Err("the primary's config has no [output] release_to".into());
    };
    if Some(release_to) != b.takeover.release_to {
        say(format!(
            "warning: the primary releases to {release_to} but the backup to {}; observing {release_to}",
            b.takeover.release_to.map_or("nowhere".to_string(), |a| a.to_string())
        ));
    }
    let obs = Observer::bind(release_to).map_err(|e| {
        format!(
            "{e}: the drill receives the pair's output itself; stop whatever listens on {release_to} or point [output] release_to of both configs at the drill host"
        )
    })?;
    say(format!("drill: observing output on {}", obs.addr()));
    wait(a.before)?;
    let before = obs.datagrams();
    let Some(last) = before.last() else {
        return Err(format!(
            "no output arrived in {} s: is the pair running and protected?",
            a.before
        ));
    };
    let old = last.from;
    let (trigger_at, trigger_unix, partition) = trigger(a, p, b, &say)?;
    let end = trigger_at + Duration::from_secs_f64(a.after);
    while Instant::now() < end {
        if observe::interrupted() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(partition);
    let first_new = obs.first_from_new_source(trigger_at, Some(old));
    let log = obs.finish();
    let cl = match &b.commit_log {
        Some(p) => Some(CommitLog::load(p).map_err(|e| e.to_string())?),
        None => None,
    };
    let verdict = observe::check(
        &log,
        cl.as_ref(),
        &CheckOptions {
            from_start: false,
            failovers: Some(1),
        },
    );
    let mut r = empty_report(a, "records", trigger_unix);
    backup_timings(b, trigger_unix, &mut r, &say);
    r.takeover_ms = first_new
        .as_ref()
        .map(|d| d.at.duration_since(trigger_at).as_secs_f64() * 1e3);
    r.outputs_before = before.len() as u64;
    r.outputs_after = log.iter().filter(|d| d.at >= trigger_at).count() as u64;
    r.duplicates = verdict.duplicates as u64;
    r.lost = verdict.violations.iter().any(|v| v.starts_with("GAP"));
    r.violations = verdict.violations.clone();
    r.ok = verdict.ok();
    if !json {
        print!("{verdict}");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::linux_guest_ip;

    #[test]
    fn a_kit_guests_address_comes_from_its_command_line() {
        assert_eq!(
            linux_guest_ip("console=ttyS0 castor.ip=10.9.8.7/16 quiet"),
            Ok(std::net::Ipv4Addr::new(10, 9, 8, 7))
        );
        assert_eq!(
            linux_guest_ip("console=ttyS0"),
            Ok(std::net::Ipv4Addr::new(10, 0, 0, 2))
        );
        assert!(linux_guest_ip("castor.ip=10.0.0.300/24").is_err());
    }
}
