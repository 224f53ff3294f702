//! `castor drill`: against a running pair, trigger a failover on purpose
//! (SIGKILL the primary, or cut the replication link with an iptables rule),
//! observe the released output, check the invariant and report.

use crate::cluster::{metric, scrape};
use crate::observe::{self, CheckOptions, CommitLog, Observer};
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
    let Some(release_to) = p.release_to else {
        return Err("network guest: not supported yet".into());
    };
    if Some(release_to) != b.takeover.release_to {
        println!(
            "warning: the primary releases to {release_to} but the backup to {:?}; observing {release_to}",
            b.takeover.release_to
        );
    }
    let obs = Observer::bind(release_to).map_err(|e| {
        format!(
            "{e}: the drill receives the pair's output itself; stop whatever listens on {release_to} or point [output] release_to of both configs at the drill host"
        )
    })?;
    println!("drill: observing output on {}", obs.addr());
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < a.before {
        if observe::interrupted() {
            return Err("interrupted".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = obs.datagrams();
    let Some(last) = before.last() else {
        return Err(format!(
            "no output arrived in {} s: is the pair running and protected?",
            a.before
        ));
    };
    let old = last.from;
    let mut _partition = None;
    let (trigger, trigger_unix) = match a.mode.as_str() {
        "kill" => {
            let pid = find_primary(&a.primary_config)?;
            println!("SIGKILL primary pid {pid}");
            let t = (Instant::now(), observe::unix_ns());
            // SAFETY: plain kill(2) on a pid we found.
            if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                return Err(format!("kill {pid}: {}", std::io::Error::last_os_error()));
            }
            t
        }
        "partition" => {
            if p.on_backup_loss == castor_node::OnBackupLoss::Continue {
                println!(
                    "WARNING: the primary's on_backup_loss is \"continue\": a partition makes both sides run (split brain); the check will show it"
                );
            }
            println!(
                "cutting replication traffic on UDP port {}",
                b.listen.port()
            );
            let t = (Instant::now(), observe::unix_ns());
            _partition = Some(Partition::cut(b.listen.port())?);
            t
        }
        other => return Err(format!("--mode {other:?}: use kill or partition")),
    };
    let end = trigger + Duration::from_secs_f64(a.after);
    while Instant::now() < end {
        if observe::interrupted() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(_partition);
    let first_new = obs.first_from_new_source(trigger, Some(old));
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
    println!("\n=== drill report ({}) ===", a.mode);
    if let Some(m) = b.metrics {
        let s = scrape(m);
        let detected = metric(&s, "castor_takeover_detected_unix_seconds");
        if let Some(d) = detected {
            let det_ms = (d * 1e3) - (trigger_unix as f64 / 1e6);
            println!("detection (trigger -> backup declares the primary lost): {det_ms:.1} ms");
        }
        if let Some(r) = metric(&s, "castor_takeover_restore_seconds") {
            println!("state restore: {:.2} ms", r * 1e3);
        }
        if let Some(r) = metric(&s, "castor_takeover_resume_seconds") {
            println!("detection -> guest resumed: {:.2} ms", r * 1e3);
        }
    } else {
        println!("(set [metrics] listen in the backup's config for detection and restore timings)");
    }
    match &first_new {
        Some(d) => println!(
            "takeover (trigger -> first record released by the new primary): {:.1} ms",
            d.at.duration_since(trigger).as_secs_f64() * 1e3
        ),
        None => println!("NO output from a new primary after the trigger"),
    }
    let after: Vec<_> = log.iter().filter(|d| d.at >= trigger).collect();
    let held = after
        .iter()
        .filter(|d| d.epoch > 0 && d.from != old)
        .count();
    println!(
        "outputs: {} before the trigger, {} after; re-emitted by the new primary with an epoch label: {held}; duplicated: {}; lost (gaps): {}",
        before.len(),
        after.len(),
        verdict.duplicates,
        if verdict.violations.iter().any(|v| v.starts_with("GAP")) {
            "YES"
        } else {
            "0"
        }
    );
    print!("{verdict}");
    if first_new.is_none() {
        return Err("no takeover observed".into());
    }
    if verdict.ok() {
        Ok(())
    } else {
        Err("the one-history invariant is violated".into())
    }
}
