//! `castor backup`: holds a hot replica of a primary's guest, commits only
//! whole verified checkpoints, and takes over when the primary is lost.
//! Thin over `castor-replicator`.

use castor_primary::{BufferedSink, UdpRelease};
use castor_replicator::backup::{Backup, BackupConfig, SessionEnd};
use castor_replicator::primary::Release;
use castor_replicator::transport::{self, Identity, PeerCert, TransportConfig};
use castor_vmm::devices::{NetConfig, TxOutcome, TxSink, VirtioNet};
use castor_vmm::{Emit, OutputSink, Record, Vm, VmConfig};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors of the backup daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] castor_primary::ConfigError),
    /// Replication failed.
    #[error("backup: {0}")]
    Backup(#[from] castor_replicator::backup::BackupError),
    /// TLS or QUIC.
    #[error("transport: {0}")]
    Transport(#[from] castor_replicator::transport::TransportError),
    /// I/O.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Primary-side daemon pieces (metrics).
    #[error(transparent)]
    Primary(#[from] castor_primary::DaemonError),
    /// The replica's network device.
    #[error("network device: {0}")]
    Net(String),
}

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

/// `[net]` of backup.toml: the replica's virtio-net device on this host
/// (needed when the primary runs `workload = "net"`: the replica must have
/// the same devices for its state to restore).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSection {
    /// This host's tap, on the same L2 segment as the primary's. Required.
    pub tap: String,
    /// The guest's MAC (as in primary.toml). Default "02:ca:57:00:00:02".
    #[serde(default = "default_mac")]
    pub mac: String,
    /// After a takeover, announce the guest on this host's tap with a
    /// gratuitous ARP (IPv4 address read from the guest's device
    /// configuration). Default true.
    #[serde(default = "yes")]
    pub announce: bool,
}

fn default_mac() -> String {
    "02:ca:57:00:00:02".into()
}

/// `[tls]`, `[output]`, `[metrics]` as in primary.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[replication]`.
    pub replication: ReplicationSection,
    /// `[tls]`.
    pub tls: castor_primary::config::TlsSection,
    /// `[output]`: where the guest's output goes after a takeover.
    pub output: castor_primary::config::OutputSection,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: castor_primary::config::MetricsSection,
    /// `[takeover]`.
    #[serde(default)]
    pub takeover: TakeoverSection,
    /// `[log]`.
    #[serde(default)]
    pub log: LogSection,
    /// `[net]`.
    #[serde(default)]
    pub net: Option<NetSection>,
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
    /// TLS files.
    pub cert: PathBuf,
    /// Key.
    pub key: PathBuf,
    /// Peer certificate.
    pub peer_cert: PathBuf,
    /// Output destination after takeover.
    pub release_to: SocketAddr,
    /// Output cap.
    pub max_held: usize,
    /// Metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// Re-emit held output on takeover.
    pub reemit_output: bool,
    /// Commit log file.
    pub commit_log: Option<PathBuf>,
    /// Re-protection after a takeover: new backup, its certificate, policy.
    pub reprotect: Option<Reprotect>,
    /// The replica's network device.
    pub net: Option<BackupNet>,
}

/// The replica's virtio-net device on this host.
#[derive(Debug, Clone)]
pub struct BackupNet {
    /// Tap name.
    pub tap: String,
    /// The guest's MAC.
    pub mac: [u8; 6],
    /// Send a gratuitous ARP on takeover.
    pub announce: bool,
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
    pub on_backup_loss: castor_primary::OnBackupLoss,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, castor_primary::ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| castor_primary::ConfigError::Read {
                path: path.into(),
                source,
            })?;
        Self::parse(&text, path)
    }

    /// Validates the text of a config file.
    pub fn parse(text: &str, path: &Path) -> Result<Config, castor_primary::ConfigError> {
        use castor_primary::ConfigError;
        let f: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        let bad = |field: &'static str, message: String| ConfigError::Invalid {
            path: path.into(),
            field,
            message,
        };
        let r = &f.replication;
        if r.heartbeat_ms == 0 || r.timeout_ms <= r.heartbeat_ms {
            return Err(bad(
                "replication.timeout_ms",
                format!(
                    "{} ms must exceed heartbeat_ms ({})",
                    r.timeout_ms, r.heartbeat_ms
                ),
            ));
        }
        let dirty_tracking =
            castor_primary::config::parse_tracking(&r.dirty_tracking).ok_or_else(|| {
                bad(
                    "replication.dirty_tracking",
                    format!("{:?}: use bitmap, ring or auto", r.dirty_tracking),
                )
            })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let net = match &f.net {
            None => None,
            Some(n) => Some(BackupNet {
                tap: n.tap.clone(),
                mac: castor_primary::config::parse_mac(&n.mac).ok_or_else(|| {
                    bad(
                        "net.mac",
                        format!("{:?}: use six hex bytes, 02:ca:57:00:00:02", n.mac),
                    )
                })?,
                announce: n.announce,
            }),
        };
        Ok(Config {
            net,
            listen: r.listen,
            dirty_tracking,
            backup: BackupConfig {
                peer_timeout: Duration::from_millis(r.timeout_ms),
                heartbeat: Duration::from_millis(r.heartbeat_ms),
                ..Default::default()
            },
            cert: dir.join(&f.tls.cert),
            key: dir.join(&f.tls.key),
            peer_cert: dir.join(&f.tls.peer_cert),
            release_to: f.output.release_to,
            max_held: castor_vmm::parse_size(&f.output.max_held)
                .map_err(|m| bad("output.max_held", m))? as usize,
            metrics: f.metrics.listen,
            reemit_output: f.takeover.reemit_output,
            commit_log: f.log.commit_log.map(|p| dir.join(p)),
            reprotect: match (f.takeover.new_backup, &f.takeover.new_backup_cert) {
                (None, None) => None,
                (Some(_), None) | (None, Some(_)) => {
                    return Err(bad(
                        "takeover.new_backup",
                        "set both new_backup and new_backup_cert, or neither".into(),
                    ))
                }
                (Some(addr), Some(cert)) => {
                    if !(2..=1000).contains(&f.takeover.epoch_ms) {
                        return Err(bad(
                            "takeover.epoch_ms",
                            format!("{}: use 2 to 1000", f.takeover.epoch_ms),
                        ));
                    }
                    let on_backup_loss = match f.takeover.on_backup_loss.as_str() {
                        "continue" => castor_primary::OnBackupLoss::Continue,
                        "pause" => castor_primary::OnBackupLoss::Pause,
                        other => {
                            return Err(bad(
                                "takeover.on_backup_loss",
                                format!("{other:?}: use \"continue\" or \"pause\""),
                            ))
                        }
                    };
                    let epoch_mode = castor_primary::config::parse_epoch_mode(
                        &f.takeover.epoch_mode,
                        f.takeover.min_epoch_ms,
                        f.takeover.epoch_ms,
                    )
                    .map_err(|(_, m)| bad("takeover.epoch_mode", m))?;
                    Some(Reprotect {
                        backup: addr,
                        cert: dir.join(cert),
                        bind: f.takeover.bind,
                        pipeline: castor_replicator::primary::PrimaryConfig {
                            epoch_mode,
                            epoch_interval: Duration::from_millis(f.takeover.epoch_ms),
                            heartbeat: Duration::from_millis(r.heartbeat_ms),
                            peer_timeout: Duration::from_millis(r.timeout_ms),
                            ..Default::default()
                        },
                        on_backup_loss,
                    })
                }
            },
        })
    }
}

/// The replica VM's output sink: refuses everything until a takeover
/// connects it to the real one (the replica never runs before that).
#[derive(Default)]
pub struct SwitchSink {
    inner: Mutex<Option<Arc<dyn OutputSink>>>,
}

impl SwitchSink {
    /// Routes output to `sink` from now on.
    pub fn connect(&self, sink: Arc<dyn OutputSink>) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }
}

impl OutputSink for SwitchSink {
    fn emit(&self, r: &Record) -> Emit {
        match self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(s) => s.emit(r),
            None => Emit::Busy,
        }
    }
}

/// The replica's TX sink: refuses frames (full) until a takeover connects
/// it (the replica never runs before that).
#[derive(Default)]
pub struct SwitchTxSink {
    inner: Mutex<Option<Arc<dyn TxSink>>>,
}

impl SwitchTxSink {
    /// Routes frames to `sink` from now on.
    pub fn connect(&self, sink: Arc<dyn TxSink>) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }
}

impl TxSink for SwitchTxSink {
    fn transmit(&self, frame: &[u8]) -> TxOutcome {
        match self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(s) => s.transmit(frame),
            None => TxOutcome::Full,
        }
    }
}

/// The replica's network plumbing on this host.
struct ReplicaNet {
    tap: Arc<castor_vmm::devices::Tap>,
    tx: Arc<SwitchTxSink>,
    cfg: BackupNet,
}

/// Runs the backup until killed.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    let rt = castor_primary::daemon_runtime(cfg.metrics)?;
    let identity = Identity::load(&cfg.cert, &cfg.key)?;
    let peer = PeerCert::load(&cfg.peer_cert)?;
    let switch = Arc::new(SwitchSink::default());
    let sw = switch.clone();
    let tracking = cfg.dirty_tracking;
    // One tap for every replica VM this process creates (a tap without
    // multi-queue takes one opener at a time).
    let net = match &cfg.net {
        None => None,
        Some(n) => Some(Arc::new(ReplicaNet {
            tap: Arc::new(
                castor_primary::open_tap(&n.tap).map_err(|e| DaemonError::Net(e.to_string()))?,
            ),
            tx: Arc::new(SwitchTxSink::default()),
            cfg: n.clone(),
        })),
    };
    let factory_net = net.clone();
    let mut backup = Backup::new(
        cfg.backup.clone(),
        Box::new(move |shape| {
            let mem = shape.memory_end();
            let vm = Vm::new(
                &VmConfig {
                    vcpus: shape.vcpus,
                    mem_bytes: mem,
                    dirty_tracking: tracking,
                    ..VmConfig::default()
                },
                sw.clone(),
            )?;
            if let Some(n) = &factory_net {
                // The same device as the primary's, on this host's tap.
                let tx: Arc<dyn TxSink> = n.tx.clone();
                vm.devices()
                    .add_virtio_net(VirtioNet::new(NetConfig {
                        tap: n.tap.clone(),
                        mac: n.cfg.mac,
                        tx_sink: Some(tx),
                    }))
                    .map_err(|e| castor_vmm::Error::InvalidConfig(format!("virtio-net: {e}")))?;
            }
            Ok(Arc::new(vm))
        }),
    );
    if let Some(path) = &cfg.commit_log {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        backup.set_commit_log(Box::new(move |epoch| {
            let ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            if let Err(e) = writeln!(file, "{epoch} {ns}").and_then(|_| file.flush()) {
                log::warn!("commit log: {e}");
            }
        }));
    }
    let listener = {
        let _g = rt.enter();
        transport::listen(cfg.listen, &identity, &peer, &TransportConfig::default())?
    };
    log::info!("backup listening on {}", cfg.listen);
    loop {
        let conn = match rt.block_on(listener.accept()) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("refused a connection: {e}");
                continue;
            }
        };
        let end = rt.block_on(backup.serve(conn));
        let detected = Instant::now();
        match end {
            Ok(SessionEnd::ProtocolError(_)) => continue,
            Ok(SessionEnd::PrimaryLost(why)) if backup.committed_epoch() > 0 => {
                log::warn!(
                    "primary lost ({why}): taking over from epoch {}",
                    backup.committed_epoch()
                );
                return take_over(&cfg, &mut backup, &switch, net.as_deref(), detected);
            }
            Ok(SessionEnd::PrimaryLost(why)) => {
                log::warn!("primary lost before the first commit ({why}); waiting for a primary");
            }
            Err(e) => log::error!("session failed: {e}"),
        }
    }
}

fn take_over(
    cfg: &Config,
    backup: &mut Backup,
    switch: &SwitchSink,
    net: Option<&ReplicaNet>,
    detected: Instant,
) -> Result<(), DaemonError> {
    let detected_unix = unix_seconds();
    metrics::gauge!("castor_takeover_detected_unix_seconds").set(detected_unix);
    let t = backup.take_over()?;
    let world: Arc<dyn Release> = match net {
        Some(n) => Arc::new(castor_primary::net::TapRelease::new(n.tap.clone())),
        None => Arc::new(UdpRelease::new(cfg.release_to)?),
    };
    let release: Arc<dyn Release> = Arc::new(FirstOutput {
        inner: world,
        since: detected,
        seen: std::sync::atomic::AtomicBool::new(false),
    });
    if let Some(n) = net {
        drain_stale_frames(n);
        if n.cfg.announce {
            announce(&t.vm, n);
        }
    }
    // Re-send the committed checkpoint's held frames/records: the primary
    // may have died before releasing them (for TCP, duplicates are harmless).
    if cfg.reemit_output && !t.output.items.is_empty() {
        release.release(t.epoch, &t.output.items);
    }
    let next_seq = t.output.next_seq;
    let buffer = Arc::new(castor_net_buffer::OutputBuffer::new(
        castor_net_buffer::Config {
            first_seq: next_seq,
            ..castor_net_buffer::Config::with_max_bytes(cfg.max_held)
        },
    ));
    let _ = buffer.set_unprotected(true);
    switch.connect(Arc::new(BufferedSink {
        buffer: buffer.clone(),
        release: release.clone(),
    }));
    if let Some(n) = net {
        n.tx.connect(Arc::new(castor_primary::net::NetTxSink::new(
            buffer.clone(),
            release.clone(),
        )));
    }
    t.vm.resume();
    let total = detected.elapsed();
    metrics::counter!("castor_failovers_total").increment(1);
    metrics::histogram!("castor_failover_restore_seconds").record(t.restore.as_secs_f64());
    metrics::gauge!("castor_takeover_restore_seconds").set(t.restore.as_secs_f64());
    metrics::gauge!("castor_takeover_resume_seconds").set(total.as_secs_f64());
    metrics::gauge!("castor_takeover_epoch").set(t.epoch as f64);
    log::warn!(
        "TAKEOVER complete: resumed from epoch {} (state restore {:?}, detection to resume {:?}); \
         re-emitted {} held output item(s); running UNPROTECTED",
        t.epoch,
        t.restore,
        total,
        t.output.items.len()
    );
    match &cfg.reprotect {
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        Some(rp) => {
            log::warn!("re-protection: replicating to the new backup {}", rp.backup);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            castor_primary::protect(
                t.vm,
                buffer,
                release,
                castor_primary::Protection {
                    backup: rp.backup,
                    bind: rp.bind,
                    identity: Identity::load(&cfg.cert, &cfg.key)?,
                    peer: PeerCert::load(&rp.cert)?,
                    pipeline: rp.pipeline.clone(),
                    on_backup_loss: rp.on_backup_loss,
                },
                &rt,
            )?;
            Ok(())
        }
    }
}

/// Drops the frames queued on this host's tap while the replica was not
/// running (broadcasts and frames flooded before the LAN learned the
/// guest's port, possibly seconds old, e.g. the client's first SYN). The
/// restored guest must not see them; anything still needed is sent again
/// by its peers (TCP retransmits what the committed state has not seen).
fn drain_stale_frames(n: &ReplicaNet) {
    let mut buf = vec![0u8; 65_536];
    let mut dropped = 0u32;
    while dropped < 100_000 {
        match n.tap.read_frame(&mut buf) {
            Ok(Some(_)) => dropped += 1,
            Ok(None) | Err(_) => break,
        }
    }
    if dropped > 0 {
        log::info!(
            "takeover: dropped {dropped} stale frame(s) queued on tap {}",
            n.tap.name()
        );
    }
}

/// Announces the guest at its new port: a gratuitous ARP (request and
/// reply forms) on this host's tap, from the guest's MAC for the IPv4
/// address in its device configuration (replicated guest memory). The
/// built-in guest is IPv4-only, so there is no IPv6 neighbour advertisement.
fn announce(vm: &Vm, n: &ReplicaNet) {
    use vm_memory::{Bytes, GuestAddress};
    let mut cfg = [0u8; 64];
    if let Err(e) = vm.memory().read_slice(
        &mut cfg,
        GuestAddress(castor_guest_abi::layout::DEVICE_CONFIG_ADDR),
    ) {
        log::warn!("takeover: cannot read the guest's network configuration: {e}");
        return;
    }
    let magic = u64::from_le_bytes(cfg[0..8].try_into().unwrap_or([0; 8]));
    if magic != castor_guest_abi::DEVICE_CONFIG_MAGIC {
        log::warn!("takeover: no network configuration in the guest; no gratuitous ARP");
        return;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&cfg[24..30]);
    let mut ip = [0u8; 4];
    ip.copy_from_slice(&cfg[32..36]);
    if mac != n.cfg.mac {
        log::warn!(
            "takeover: the guest's MAC {mac:02x?} differs from [net] mac {:02x?}",
            n.cfg.mac
        );
    }
    let tap = castor_primary::net::TapRelease::new(n.tap.clone());
    for reply in [false, true] {
        tap.send(&castor_primary::net::gratuitous_arp(mac, ip, reply));
    }
    log::warn!(
        "takeover: gratuitous ARP for {}.{}.{}.{} at {mac:02x?} on tap {}",
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        n.tap.name()
    );
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Passes releases through and reports the first one after a takeover
/// (metric `castor_takeover_first_output_seconds`, from detection, and a log line).
struct FirstOutput {
    inner: Arc<dyn Release>,
    since: Instant,
    seen: std::sync::atomic::AtomicBool,
}

impl Release for FirstOutput {
    fn release(&self, epoch: u64, items: &[(u64, Vec<u8>)]) {
        self.inner.release(epoch, items);
        if !items.is_empty() && !self.seen.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let d = self.since.elapsed();
            metrics::gauge!("castor_takeover_first_output_seconds").set(d.as_secs_f64());
            log::warn!(
                "TAKEOVER first output released {d:?} after detection (epoch label {epoch})"
            );
        }
    }
}
