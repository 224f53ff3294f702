//! What both daemons' config files share: the `[tls]`, `[output]` and
//! `[metrics]` sections, the field parsers, and [`ConfigError`], which names
//! the file, the field (`section.key`) and what to fix.
//!
//! A daemon's own file (`primary.toml`, `backup.toml`) deserializes into its
//! own sections with [`parse_toml`] and validates every field through a
//! [`Validator`], so that every daemon reports a bad value the same way.

use crate::mac::MacAddr;
use crate::protect::OnBackupLoss;
use castor_replicator::primary::EpochMode;
use castor_replicator::transport::{Identity, PeerCert, TransportError};
use castor_vmm::DirtyTracking;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has a bad or unknown field (the parser's
    /// message names it, and the line).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: toml::de::Error,
    },
    /// A required section is absent.
    #[error("{path}: the [{section}] section is missing (see configs/ for a commented example)")]
    MissingSection {
        /// The file.
        path: PathBuf,
        /// The section.
        section: &'static str,
    },
    /// A field has a value out of range.
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field, as `section.key`.
        field: &'static str,
        /// The value and what to fix.
        message: String,
    },
}

/// Reads a config file.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })
}

/// Deserializes the text of the config file `path` (unknown fields are
/// refused by the sections' `deny_unknown_fields`). A missing required
/// section is named (`required`), not reported at line 1, column 1.
pub fn parse_toml<T: DeserializeOwned>(
    text: &str,
    path: &Path,
    required: &[&'static str],
) -> Result<T, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.into(),
        source,
    })?;
    if let Some(section) = required.iter().find(|s| !table.contains_key(**s)) {
        return Err(ConfigError::MissingSection {
            path: path.into(),
            section,
        });
    }
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.into(),
        source,
    })
}

/// The `[tls]` section: paths relative to the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// This host's certificate (PEM), from `castor keygen`.
    pub cert: PathBuf,
    /// This host's private key (PEM).
    pub key: PathBuf,
    /// The peer's certificate: the only peer accepted.
    pub peer_cert: PathBuf,
}

impl TlsSection {
    /// The files, resolved against the config file's directory.
    pub fn resolve(&self, v: &Validator<'_>) -> TlsFiles {
        TlsFiles {
            cert: v.relative(&self.cert),
            key: v.relative(&self.key),
            peer_cert: v.relative(&self.peer_cert),
        }
    }
}

/// This host's TLS identity and its pinned peer, as files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This host's certificate.
    pub cert: PathBuf,
    /// This host's private key.
    pub key: PathBuf,
    /// The only peer certificate accepted.
    pub peer_cert: PathBuf,
}

impl TlsFiles {
    /// This host's key pair.
    pub fn identity(&self) -> Result<Identity, TransportError> {
        Identity::load(&self.cert, &self.key)
    }

    /// The pinned peer.
    pub fn peer(&self) -> Result<PeerCert, TransportError> {
        PeerCert::load(&self.peer_cert)
    }
}

/// The `[output]` section (optional as a whole).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Where released guest *records* go (the built-in `dirtier` guest): a
    /// UDP address, each record one datagram. A network guest's output is
    /// its frames, released to its tap: this does not apply to it.
    #[serde(default)]
    pub release_to: Option<SocketAddr>,
    /// Most output held awaiting acks ("4M"); beyond it the guest stalls.
    #[serde(default = "default_held")]
    pub max_held: String,
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            release_to: None,
            max_held: default_held(),
        }
    }
}

impl OutputSection {
    /// `max_held` in bytes.
    pub fn max_held_bytes(&self, v: &Validator<'_>) -> Result<usize, ConfigError> {
        Ok(v.size("output.max_held", &self.max_held)? as usize)
    }

    /// `release_to` for a guest whose output is records (required), or
    /// `None` for a network guest (`network` = its tap), whose output goes
    /// to its tap: a `release_to` given for one is logged as not applying.
    pub fn records_to(
        &self,
        v: &Validator<'_>,
        network: Option<&str>,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        match (network, self.release_to) {
            (None, Some(a)) => Ok(Some(a)),
            (None, None) => Err(v.invalid(
                "output.release_to",
                "required for the record guest (workload \"dirtier\"): the UDP address released records go to, e.g. release_to = \"127.0.0.1:7500\" under [output]",
            )),
            (Some(tap), Some(a)) => {
                log::warn!(
                    "{}: [output] release_to = \"{a}\" does not apply to a network guest: its output is its frames, released to tap {tap}; remove the line",
                    v.path().display()
                );
                Ok(None)
            }
            (Some(_), None) => Ok(None),
        }
    }
}

fn default_held() -> String {
    "4M".into()
}

/// The `[disk]` section of both daemons: the guest's virtio-blk disk on
/// this host (the primary's image; the backup's own image of the same
/// size, written at each commit and used after a takeover).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    /// Raw image file (relative to the config file's directory). Required.
    pub path: PathBuf,
    /// The guest sees the disk read-only (its writes fail): the image is
    /// still copied to the backup at each new session, and both daemons
    /// must say the same. Default false.
    #[serde(default)]
    pub read_only: bool,
    /// When `path` does not exist, create it as a sparse image of this size
    /// ("1G"; the backup's must be the primary's size). Default: never.
    #[serde(default)]
    pub create: Option<String>,
}

impl DiskSection {
    /// The device configuration, the image checked: it must exist and be a
    /// non-empty regular file whose size is a whole number of 4 KiB blocks.
    pub fn resolve(
        &self,
        v: &Validator<'_>,
    ) -> Result<castor_vmm::devices::BlkConfig, ConfigError> {
        let path = v.relative(&self.path);
        if let (Some(size), false) = (&self.create, path.exists()) {
            let bytes = v.size("disk.create", size)?;
            if bytes == 0 || bytes % castor_vmm::devices::DISK_BLOCK != 0 {
                return Err(v.invalid(
                    "disk.create",
                    format!("{size:?}: use a non-zero multiple of 4 KiB, e.g. \"1G\""),
                ));
            }
            std::fs::File::create_new(&path)
                .and_then(|f| f.set_len(bytes))
                .map_err(|e| {
                    v.invalid("disk.create", format!("creating {}: {e}", path.display()))
                })?;
            log::info!(
                "created the sparse disk image {} ({} MiB)",
                path.display(),
                bytes >> 20
            );
        }
        let len = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => {
                return Err(v.invalid(
                    "disk.path",
                    format!("{} is not a regular file: name a raw image", path.display()),
                ))
            }
            Err(e) => {
                return Err(v.invalid(
                    "disk.path",
                    format!(
                        "{}: {e}; create an image with `truncate -s SIZE {}`, or set create = \"SIZE\" under [disk] (the backup's must be the size of the primary's)",
                        path.display(),
                        path.display()
                    ),
                ))
            }
        };
        if len == 0 || len % castor_vmm::devices::DISK_BLOCK != 0 {
            return Err(v.invalid(
                "disk.path",
                format!(
                    "{} is {len} bytes: a disk image must be a non-zero multiple of 4096 bytes (`truncate -s SIZE {}`)",
                    path.display(),
                    path.display()
                ),
            ));
        }
        Ok(castor_vmm::devices::BlkConfig {
            path,
            read_only: self.read_only,
        })
    }
}

/// The `[metrics]` section.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// The daemon's HTTP endpoint, "127.0.0.1:9100": `/metrics`
    /// (Prometheus), `/status` (JSON) and the status page at `/`; absent =
    /// no endpoint.
    pub listen: Option<SocketAddr>,
}

/// The `[control]` section.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// The control socket (`castor ctl SOCKET status|suspend|resume`), mode
    /// 0600. Default `/run/castor/ROLE.sock`; `""` = none.
    pub socket: Option<PathBuf>,
}

impl ControlSection {
    /// The socket of a daemon in `role` (relative paths against the config
    /// file's directory), or `None` when switched off.
    pub fn resolve(&self, v: &Validator<'_>, role: &str) -> Option<crate::control::SocketConfig> {
        match &self.socket {
            None => Some(crate::control::SocketConfig {
                path: crate::control::default_socket(role),
                explicit: false,
            }),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(crate::control::SocketConfig {
                path: v.relative(p),
                explicit: true,
            }),
        }
    }
}

/// A bad `epoch_mode` / `min_epoch_ms` pair.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpochModeError {
    /// Neither "fixed" nor "output-triggered".
    #[error("{0:?}: use \"fixed\" or \"output-triggered\"")]
    UnknownMode(String),
    /// `min_epoch_ms` outside 1 to `epoch_ms`.
    #[error("{min_epoch_ms}: use 1 to epoch_ms ({epoch_ms})")]
    MinEpochOutOfRange {
        /// The value given.
        min_epoch_ms: u64,
        /// The epoch interval it must not exceed.
        epoch_ms: u64,
    },
}

/// Parses `epoch_mode` with its `min_epoch_ms` (checked against `epoch_ms`
/// in output-triggered mode).
pub fn parse_epoch_mode(
    mode: &str,
    min_epoch_ms: u64,
    epoch_ms: u64,
) -> Result<EpochMode, EpochModeError> {
    match mode {
        "fixed" => Ok(EpochMode::Fixed),
        "output-triggered" => {
            if min_epoch_ms == 0 || min_epoch_ms > epoch_ms {
                return Err(EpochModeError::MinEpochOutOfRange {
                    min_epoch_ms,
                    epoch_ms,
                });
            }
            Ok(EpochMode::OutputTriggered {
                min_epoch: Duration::from_millis(min_epoch_ms),
            })
        }
        other => Err(EpochModeError::UnknownMode(other.into())),
    }
}

/// Parses a dirty-tracking mode name: "bitmap", "ring" or "auto".
pub fn parse_tracking(s: &str) -> Option<DirtyTracking> {
    match s {
        "bitmap" => Some(DirtyTracking::Bitmap),
        "ring" => Some(DirtyTracking::Ring),
        "auto" => Some(DirtyTracking::Auto),
        _ => None,
    }
}

/// Parses a backup-loss policy: "pause" or "continue".
pub fn parse_on_backup_loss(s: &str) -> Option<OnBackupLoss> {
    match s {
        "pause" => Some(OnBackupLoss::Pause),
        "continue" => Some(OnBackupLoss::Continue),
        _ => None,
    }
}

/// Validates the fields of one config file: every check names the field it
/// refuses, and relative paths resolve against the file's directory.
#[derive(Debug, Clone, Copy)]
pub struct Validator<'a> {
    path: &'a Path,
}

impl<'a> Validator<'a> {
    /// Fields of the file `path`.
    pub fn new(path: &'a Path) -> Self {
        Validator { path }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        self.path
    }

    /// `p` relative to the file's directory (absolute paths stay as they are).
    pub fn relative(&self, p: &Path) -> PathBuf {
        self.path.parent().unwrap_or(Path::new(".")).join(p)
    }

    /// `field` is refused: `message` says what to fix.
    pub fn invalid(&self, field: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.into(),
            field,
            message: message.into(),
        }
    }

    /// A size such as "256M".
    pub fn size(&self, field: &'static str, v: &str) -> Result<u64, ConfigError> {
        castor_vmm::parse_size(v).map_err(|m| self.invalid(field, m))
    }

    /// A MAC address.
    pub fn mac(&self, field: &'static str, v: &str) -> Result<MacAddr, ConfigError> {
        v.parse()
            .map_err(|e| self.invalid(field, format!("{v:?}: {e}")))
    }

    /// A dirty-tracking mode.
    pub fn tracking(&self, field: &'static str, v: &str) -> Result<DirtyTracking, ConfigError> {
        parse_tracking(v)
            .ok_or_else(|| self.invalid(field, format!("{v:?}: use bitmap, ring or auto")))
    }

    /// A backup-loss policy.
    pub fn on_backup_loss(
        &self,
        field: &'static str,
        v: &str,
    ) -> Result<OnBackupLoss, ConfigError> {
        parse_on_backup_loss(v)
            .ok_or_else(|| self.invalid(field, format!("{v:?}: use \"pause\" or \"continue\"")))
    }

    /// An epoch interval, 2 to 1000 ms.
    pub fn epoch_ms(&self, field: &'static str, ms: u64) -> Result<Duration, ConfigError> {
        if !(2..=1000).contains(&ms) {
            return Err(self.invalid(field, format!("{ms}: use 2 to 1000")));
        }
        Ok(Duration::from_millis(ms))
    }

    /// The peer timeout, which must exceed a non-zero heartbeat period
    /// (`field` names the timeout).
    pub fn timeouts(
        &self,
        field: &'static str,
        heartbeat_ms: u64,
        timeout_ms: u64,
    ) -> Result<(Duration, Duration), ConfigError> {
        if heartbeat_ms == 0 || timeout_ms <= heartbeat_ms {
            return Err(self.invalid(
                field,
                format!("{timeout_ms} ms must exceed heartbeat_ms ({heartbeat_ms})"),
            ));
        }
        Ok((
            Duration::from_millis(heartbeat_ms),
            Duration::from_millis(timeout_ms),
        ))
    }

    /// `epoch_mode` and `min_epoch_ms`, each refused under its own field name.
    pub fn epoch_mode(
        &self,
        (mode_field, min_field): (&'static str, &'static str),
        mode: &str,
        min_epoch_ms: u64,
        epoch_ms: u64,
    ) -> Result<EpochMode, ConfigError> {
        parse_epoch_mode(mode, min_epoch_ms, epoch_ms).map_err(|e| {
            let field = match e {
                EpochModeError::UnknownMode(_) => mode_field,
                EpochModeError::MinEpochOutOfRange { .. } => min_field,
            };
            self.invalid(field, e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_sections_are_named_and_output_applies_to_records_only() {
        #[derive(Debug, Deserialize)]
        struct F {
            #[allow(dead_code)]
            a: toml::Table,
            #[serde(default)]
            output: OutputSection,
        }
        let p = Path::new("/etc/castor/x.toml");
        match parse_toml::<F>("[b]\n", p, &["a"]) {
            Err(e @ ConfigError::MissingSection { section: "a", .. }) => {
                assert!(e.to_string().contains("[a] section is missing"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let f: F = parse_toml("[a]\n", p, &["a"]).unwrap();
        let v = Validator::new(p);
        assert_eq!(f.output.records_to(&v, Some("tap0")).unwrap(), None);
        match f.output.records_to(&v, None) {
            Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "output.release_to"),
            other => panic!("{other:?}"),
        }
        let f: F = parse_toml("[a]\n[output]\nrelease_to = \"127.0.0.1:9\"\n", p, &["a"]).unwrap();
        assert_eq!(f.output.records_to(&v, Some("tap0")).unwrap(), None);
        assert!(f.output.records_to(&v, None).unwrap().is_some());
        let c = ControlSection::default();
        assert_eq!(
            c.resolve(&v, "primary").map(|s| (s.path, s.explicit)),
            Some((PathBuf::from("/run/castor/primary.sock"), false))
        );
        let off = ControlSection {
            socket: Some(PathBuf::new()),
        };
        assert_eq!(off.resolve(&v, "primary"), None);
    }

    #[test]
    fn epoch_modes() {
        assert_eq!(parse_epoch_mode("fixed", 0, 25), Ok(EpochMode::Fixed));
        assert_eq!(
            parse_epoch_mode("output-triggered", 2, 25),
            Ok(EpochMode::OutputTriggered {
                min_epoch: Duration::from_millis(2)
            })
        );
        assert_eq!(
            parse_epoch_mode("output-triggered", 30, 25),
            Err(EpochModeError::MinEpochOutOfRange {
                min_epoch_ms: 30,
                epoch_ms: 25
            })
        );
        assert_eq!(
            parse_epoch_mode("sometimes", 1, 25),
            Err(EpochModeError::UnknownMode("sometimes".into()))
        );
    }

    #[test]
    fn validator_names_fields_and_resolves_paths() {
        let v = Validator::new(Path::new("/etc/castor/x.toml"));
        assert_eq!(
            v.relative(Path::new("a.crt")),
            Path::new("/etc/castor/a.crt")
        );
        assert_eq!(v.relative(Path::new("/b.crt")), Path::new("/b.crt"));
        let field = |e: ConfigError| match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("{other}"),
        };
        assert_eq!(field(v.mac("net.mac", "02:00").unwrap_err()), "net.mac");
        assert_eq!(
            field(v.size("output.max_held", "lots").unwrap_err()),
            "output.max_held"
        );
        assert_eq!(
            field(v.tracking("vm.dirty_tracking", "x").unwrap_err()),
            "vm.dirty_tracking"
        );
        assert_eq!(field(v.on_backup_loss("r.l", "maybe").unwrap_err()), "r.l");
        assert_eq!(
            field(v.epoch_ms("r.epoch_ms", 1).unwrap_err()),
            "r.epoch_ms"
        );
        assert_eq!(
            field(v.timeouts("r.timeout_ms", 10, 10).unwrap_err()),
            "r.timeout_ms"
        );
        let modes = ("t.epoch_mode", "t.min_epoch_ms");
        assert_eq!(
            field(v.epoch_mode(modes, "x", 1, 25).unwrap_err()),
            "t.epoch_mode"
        );
        assert_eq!(
            field(v.epoch_mode(modes, "output-triggered", 0, 25).unwrap_err()),
            "t.min_epoch_ms"
        );
        assert_eq!(
            v.on_backup_loss("r.l", "pause").unwrap(),
            OnBackupLoss::Pause
        );
    }
}
