//! `backup.toml`: every field, with its default. Unknown fields are refused
//! and named; see `configs/backup.toml` for a commented example. `[tls]`,
//! `[output]` and `[metrics]` are as in primary.toml (`castor_node::config`).

pub use castor_node::config::ConfigError;
use castor_node::config::{
    self, ControlSection, MetricsSection, OutputSection, TlsFiles, TlsSection, Validator,
};
use castor_node::{MacAddr, OnBackupLoss, TakeoverPlan, TapPolicy};
use castor_replicator::backup::BackupConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `[replication]` of backup.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    /// Address to listen on for the primary, "0.0.0.0:7400". Required.
    pub listen: SocketAddr,
    /// Heartbeat period in ms. Default 10.
    #[serde(default = "default_hb")]
    pub heartbeat_ms: u64,
    /// The primary is lost after this many ms of silence. Default 100.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// "bitmap", "ring" or "auto": dirty tracking of the replica VM (used
    /// once it runs the guest after a takeover). Default "auto".
    #[serde(default = "default_tracking")]
    pub dirty_tracking: String,
}

/// `[log]` of backup.toml.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// Append one line per committed epoch, `EPOCH UNIX_NANOS`, to this file
    /// (relative to the config file), written before the epoch's Ack is sent:
    /// the record observers check released output against. Absent = none.
    pub commit_log: Option<PathBuf>,
}

/// `[takeover]` of backup.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeoverSection {
    /// Re-send the last committed checkpoint's held output on takeover (the
    /// primary may or may not have released it; duplicates carry their
    /// sequence numbers). Default true.
    #[serde(default = "yes")]
    pub reemit_output: bool,
    /// Re-protection: after a takeover, replicate the guest to this new
    /// backup ("host:port"); absent = run unprotected after a takeover.
    #[serde(default)]
    pub new_backup: Option<SocketAddr>,
    /// The new backup's certificate (relative to this file); required with
    /// `new_backup`. This host's own `[tls]` key pair identifies it there.
    #[serde(default)]
    pub new_backup_cert: Option<PathBuf>,
    /// Local UDP address for re-protection. Default "0.0.0.0:0".
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Epoch interval once re-protecting, 2 to 1000 ms. Default 25.
    #[serde(default = "default_epoch")]
    pub epoch_ms: u64,
    /// Epoch mode once re-protecting: "fixed" (default) or "output-triggered".
    #[serde(default = "default_epoch_mode")]
    pub epoch_mode: String,
    /// Shortest epoch in output-triggered mode, ms. Default 1.
    #[serde(default = "default_min_epoch")]
    pub min_epoch_ms: u64,
    /// While the new backup is absent: "continue" (default: run unprotected,
    /// releasing output) or "pause".
    #[serde(default = "default_loss")]
    pub on_backup_loss: String,
}

impl Default for TakeoverSection {
    fn default() -> Self {
        TakeoverSection {
            reemit_output: true,
            new_backup: None,
            new_backup_cert: None,
            bind: default_bind(),
            epoch_ms: default_epoch(),
            epoch_mode: default_epoch_mode(),
            min_epoch_ms: default_min_epoch(),
            on_backup_loss: default_loss(),
        }
    }
}

/// `[net]` of backup.toml: the replica's virtio-net device on this host
/// (needed when the primary runs `workload = "net"`: the replica must have
/// the same devices for its state to restore).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSection {
    /// This host's tap, on a bridge on the same L2 segment as the
    /// primary's. Required. A missing tap is refused unless `create_tap`.
    pub tap: String,
    /// Create the tap when it is missing (then on no bridge until you attach
    /// it). Default false.
    #[serde(default)]
    pub create_tap: bool,
    /// The guest's MAC (as in primary.toml). Default "02:ca:57:00:00:02".
    #[serde(default = "default_mac")]
    pub mac: String,
    /// After a takeover, announce the guest on this host's tap with a
    /// gratuitous ARP (IPv4 address read from the guest's device
    /// configuration). Default true.
    #[serde(default = "yes")]
    pub announce: bool,
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[replication]`.
    pub replication: ReplicationSection,
    /// `[tls]`.
    pub tls: TlsSection,
    /// `[output]`: where the guest's records go after a takeover (a network
    /// guest's frames go to the `[net]` tap).
    #[serde(default)]
    pub output: OutputSection,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[control]`.
    #[serde(default)]
    pub control: ControlSection,
    /// `[takeover]`.
    #[serde(default)]
    pub takeover: TakeoverSection,
    /// `[log]`.
    #[serde(default)]
    pub log: LogSection,
    /// `[net]`.
    #[serde(default)]
    pub net: Option<NetSection>,
    /// `[disk]`: this host's image of the guest's disk (the size of the
    /// primary's; written at each commit, the guest's disk after a takeover).
    #[serde(default)]
    pub disk: Option<castor_node::DiskSection>,
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
fn default_epoch() -> u64 {
    25
}
fn default_epoch_mode() -> String {
    "fixed".into()
}
fn default_min_epoch() -> u64 {
    1
}
fn default_loss() -> String {
    "continue".into()
}
fn default_mac() -> String {
    "02:ca:57:00:00:02".into()
}
fn default_hb() -> u64 {
    10
}
fn default_timeout() -> u64 {
    100
}
fn default_tracking() -> String {
    "auto".into()
}
fn yes() -> bool {
    true
}

/// A validated backup configuration.
#[derive(Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Replica VM dirty tracking.
    pub dirty_tracking: castor_vmm::DirtyTracking,
    /// Backup pipeline settings.
    pub backup: BackupConfig,
    /// This host's TLS identity and the primary's certificate.
    pub tls: TlsFiles,
    /// HTTP endpoint (metrics, status, status page).
    pub metrics: Option<SocketAddr>,
    /// Control socket.
    pub control: Option<castor_node::control::SocketConfig>,
    /// Commit log file.
    pub commit_log: Option<PathBuf>,
    /// The takeover: output destination, re-emission, announcement, output cap.
    pub takeover: TakeoverPlan,
    /// Re-protection after a takeover: new backup, its certificate, policy.
    pub reprotect: Option<Reprotect>,
    /// The replica's network device.
    pub net: Option<BackupNet>,
    /// The replica's disk.
    pub disk: Option<castor_vmm::devices::BlkConfig>,
}

/// The replica's virtio-net device on this host.
#[derive(Debug, Clone)]
pub struct BackupNet {
    /// Tap name.
    pub tap: String,
    /// The guest's MAC.
    pub mac: MacAddr,
    /// Create the tap when missing.
    pub tap_policy: TapPolicy,
}

/// Re-protection settings (from `[takeover]`).
#[derive(Debug, Clone)]
pub struct Reprotect {
    /// The new backup.
    pub backup: SocketAddr,
    /// Its certificate.
    pub cert: PathBuf,
    /// Local bind.
    pub bind: SocketAddr,
    /// Pipeline settings.
    pub pipeline: castor_replicator::primary::PrimaryConfig,
    /// Policy while it is absent.
    pub on_backup_loss: OnBackupLoss,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::parse(&config::read(path)?, path)
    }

    /// Validates the text of a config file.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let f: File = config::parse_toml(text, path, &["replication", "tls"])?;
        let v = Validator::new(path);
        let r = &f.replication;
        let (heartbeat, peer_timeout) =
            v.timeouts("replication.timeout_ms", r.heartbeat_ms, r.timeout_ms)?;
        let dirty_tracking = v.tracking("replication.dirty_tracking", &r.dirty_tracking)?;
        let net = match &f.net {
            None => None,
            Some(n) => Some(BackupNet {
                tap: n.tap.clone(),
                mac: v.mac("net.mac", &n.mac)?,
                tap_policy: if n.create_tap {
                    TapPolicy::Create
                } else {
                    TapPolicy::MustExist
                },
            }),
        };
        Ok(Config {
            listen: r.listen,
            dirty_tracking,
            backup: BackupConfig {
                peer_timeout,
                heartbeat,
                ..Default::default()
            },
            tls: f.tls.resolve(&v),
            metrics: f.metrics.listen,
            control: f.control.resolve(&v, "backup"),
            commit_log: f.log.commit_log.as_deref().map(|p| v.relative(p)),
            takeover: TakeoverPlan {
                release_to: f
                    .output
                    .records_to(&v, f.net.as_ref().map(|n| n.tap.as_str()))?,
                reemit_output: f.takeover.reemit_output,
                announce: f.net.as_ref().is_some_and(|n| n.announce),
                max_held: f.output.max_held_bytes(&v)?,
            },
            reprotect: reprotect(&f.takeover, &v, heartbeat, peer_timeout)?,
            net,
            disk: match &f.disk {
                // read_only: the guest sees the disk read-only (as on the
                // primary: the pair must agree); the replica still writes
                // the primary's content to this image.
                Some(d) => Some(d.resolve(&v)?),
                None => None,
            },
        })
    }
}

/// `[takeover]`'s re-protection settings, if a new backup is named.
fn reprotect(
    t: &TakeoverSection,
    v: &Validator<'_>,
    heartbeat: std::time::Duration,
    peer_timeout: std::time::Duration,
) -> Result<Option<Reprotect>, ConfigError> {
    let (addr, cert) = match (t.new_backup, &t.new_backup_cert) {
        (None, None) => return Ok(None),
        (Some(addr), Some(cert)) => (addr, cert),
        (Some(_), None) | (None, Some(_)) => {
            return Err(v.invalid(
                "takeover.new_backup",
                "set both new_backup and new_backup_cert, or neither",
            ))
        }
    };
    let epoch_interval = v.epoch_ms("takeover.epoch_ms", t.epoch_ms)?;
    let on_backup_loss = v.on_backup_loss("takeover.on_backup_loss", &t.on_backup_loss)?;
    let epoch_mode = v.epoch_mode(
        ("takeover.epoch_mode", "takeover.min_epoch_ms"),
        &t.epoch_mode,
        t.min_epoch_ms,
        t.epoch_ms,
    )?;
    Ok(Some(Reprotect {
        backup: addr,
        cert: v.relative(cert),
        bind: t.bind,
        pipeline: castor_replicator::primary::PrimaryConfig {
            epoch_mode,
            epoch_interval,
            heartbeat,
            peer_timeout,
            ..Default::default()
        },
        on_backup_loss,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[replication]\nlisten = \"0.0.0.0:7400\"\n\
        [tls]\ncert = \"b.crt\"\nkey = \"b.key\"\npeer_cert = \"p.crt\"\n\
        [output]\nrelease_to = \"127.0.0.1:7500\"\n";

    fn parse(rest: &str) -> Result<Config, ConfigError> {
        Config::parse(
            &format!("{BASE}{rest}"),
            Path::new("/etc/castor/backup.toml"),
        )
    }

    fn field(e: ConfigError) -> &'static str {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn defaults_and_paths() {
        let c = parse("[log]\ncommit_log = \"commits.log\"\n").unwrap();
        assert_eq!(c.tls.cert, Path::new("/etc/castor/b.crt"));
        assert_eq!(
            c.commit_log.as_deref(),
            Some(Path::new("/etc/castor/commits.log"))
        );
        assert!(c.takeover.reemit_output);
        assert!(!c.takeover.announce);
        assert_eq!(c.takeover.max_held, 4 << 20);
        assert!(c.reprotect.is_none() && c.net.is_none());
        let n = parse("[net]\ntap = \"tap1\"\nmac = \"02:00:00:00:00:09\"\n").unwrap();
        assert!(n.takeover.announce);
        let net = n.net.unwrap();
        assert_eq!(net.mac.to_string(), "02:00:00:00:00:09");
        assert_eq!(net.tap_policy, TapPolicy::MustExist);
        assert_eq!(
            c.control.map(|s| s.path),
            Some(PathBuf::from("/run/castor/backup.sock"))
        );
        // A network guest's backup needs no [output].
        let no_output = "[replication]\nlisten = \"0.0.0.0:7400\"\n\
            [tls]\ncert = \"b.crt\"\nkey = \"b.key\"\npeer_cert = \"p.crt\"\n";
        let p = Path::new("/etc/castor/backup.toml");
        let c = Config::parse(
            &format!("{no_output}[net]\ntap = \"tap1\"\ncreate_tap = true\n"),
            p,
        )
        .unwrap();
        assert_eq!(c.takeover.release_to, None);
        assert_eq!(c.net.unwrap().tap_policy, TapPolicy::Create);
        assert_eq!(
            field(Config::parse(no_output, p).unwrap_err()),
            "output.release_to"
        );
        let e = Config::parse("[tls]\n", p).unwrap_err();
        assert!(
            e.to_string().contains("[replication] section is missing"),
            "{e}"
        );
    }

    #[test]
    fn disk_image_checked_or_created_sparse() {
        let dir = std::env::temp_dir().join(format!("castor-bcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("replica.img");
        let _ = std::fs::remove_file(&img);
        let at = |rest: &str| Config::parse(&format!("{BASE}{rest}"), &dir.join("backup.toml"));
        // Missing: named, with the fix.
        let e = at("[disk]\npath = \"replica.img\"\n").unwrap_err();
        assert_eq!(field(e), "disk.path");
        // Created sparse when asked.
        let c = at("[disk]\npath = \"replica.img\"\ncreate = \"8M\"\n").unwrap();
        assert_eq!(c.disk.unwrap().path, img);
        let m = std::fs::metadata(&img).unwrap();
        assert_eq!(m.len(), 8 << 20);
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&m) < 64,
            "not sparse"
        );
        // Not a whole number of 4 KiB blocks.
        std::fs::File::create(&img).unwrap().set_len(1000).unwrap();
        assert_eq!(
            field(at("[disk]\npath = \"replica.img\"\n").unwrap_err()),
            "disk.path"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reprotection() {
        let c = parse(
            "[takeover]\nnew_backup = \"10.0.0.9:7400\"\nnew_backup_cert = \"b2.crt\"\n\
             on_backup_loss = \"pause\"\n",
        )
        .unwrap();
        let rp = c.reprotect.unwrap();
        assert_eq!(rp.cert, Path::new("/etc/castor/b2.crt"));
        assert_eq!(rp.on_backup_loss, OnBackupLoss::Pause);
        assert_eq!(rp.pipeline.epoch_interval.as_millis(), 25);
    }

    #[test]
    fn bad_settings_are_refused_with_the_field() {
        assert_eq!(
            field(parse("[takeover]\nnew_backup = \"10.0.0.9:7400\"\n").unwrap_err()),
            "takeover.new_backup"
        );
        let rp = "[takeover]\nnew_backup = \"10.0.0.9:7400\"\nnew_backup_cert = \"b2.crt\"\n";
        assert_eq!(
            field(
                parse(&format!(
                    "{rp}epoch_mode = \"output-triggered\"\nmin_epoch_ms = 0\n"
                ))
                .unwrap_err()
            ),
            "takeover.min_epoch_ms"
        );
        assert_eq!(
            field(parse(&format!("{rp}on_backup_loss = \"maybe\"\n")).unwrap_err()),
            "takeover.on_backup_loss"
        );
        assert_eq!(
            field(parse("[net]\ntap = \"t\"\nmac = \"02\"\n").unwrap_err()),
            "net.mac"
        );
        assert!(matches!(
            parse("[surprise]\n").unwrap_err(),
            ConfigError::Parse { .. }
        ));
    }
}
