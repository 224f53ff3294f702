//! `castor primary`: runs the protected guest and replicates it to the
//! backup. Thin over `castor-replicator`: this crate reads the config, wires
//! the guest's output through the output-commit buffer to the outside world,
//! starts the metrics endpoint, and reconnects (or applies the backup-loss
//! policy) when the backup goes away.

pub mod config;
pub mod net;

use castor_net_buffer::{OutputBuffer, PushError};
use castor_replicator::primary::{Primary, PrimaryError, Release};
use castor_replicator::transport::{self, Identity, PeerCert, TransportConfig};
use castor_vmm::devices::{NetConfig, Tap, VirtioNet};
use castor_vmm::{Emit, OutputSink, Record, Vm};
pub use config::{Config, ConfigError, OnBackupLoss};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

/// Errors of the primary daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The VMM failed.
    #[error("vmm: {0}")]
    Vmm(#[from] castor_vmm::Error),
    /// TLS identity problem.
    #[error("tls: {0}")]
    Tls(#[from] castor_replicator::transport::TransportError),
    /// I/O (sockets, runtime).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Metrics endpoint.
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    /// The guest's network device.
    #[error("network device: {0}")]
    Net(String),
}

/// Opens this host's tap for the guest and brings it up.
pub fn open_tap(name: &str) -> Result<Tap, DaemonError> {
    let tap = Tap::open(name).map_err(|e| DaemonError::Net(e.to_string()))?;
    if let Err(e) = tap.set_up() {
        log::warn!("cannot bring tap {name} up ({e}); assuming it is managed outside");
    }
    Ok(tap)
}

/// The guest's output sink: every record goes into the output-commit buffer
/// (held until its epoch is acknowledged); a full buffer stalls the guest.
pub struct BufferedSink {
    /// The buffer.
    pub buffer: Arc<OutputBuffer>,
    /// Where pass-through items go when running unprotected.
    pub release: Arc<dyn Release>,
}

impl OutputSink for BufferedSink {
    fn emit(&self, r: &Record) -> Emit {
        match self.buffer.try_push(r.to_bytes().to_vec()) {
            Ok(castor_net_buffer::Pushed::Held(_)) => Emit::Accepted,
            Ok(castor_net_buffer::Pushed::PassThrough(item)) => {
                self.release.release(0, &[(item.seq, item.data)]);
                Emit::Accepted
            }
            Err(PushError::Full(_)) => Emit::Busy,
            Err(PushError::TooLarge { .. }) => Emit::Stop,
        }
    }
}

/// Released output goes to a UDP address: one datagram per item,
/// `seq (u64 LE) || epoch (u64 LE) || item bytes`, where `epoch` is the
/// acknowledged epoch that released it (0: released unprotected).
pub struct UdpRelease {
    socket: UdpSocket,
    to: SocketAddr,
}

impl UdpRelease {
    /// A sender to `to`.
    pub fn new(to: SocketAddr) -> std::io::Result<Self> {
        let bind: SocketAddr = if to.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        Ok(UdpRelease {
            socket: UdpSocket::bind(bind)?,
            to,
        })
    }
}

impl Release for UdpRelease {
    fn release(&self, epoch: u64, items: &[(u64, Vec<u8>)]) {
        let mut buf = Vec::with_capacity(64);
        for (seq, data) in items {
            buf.clear();
            buf.extend_from_slice(&seq.to_le_bytes());
            buf.extend_from_slice(&epoch.to_le_bytes());
            buf.extend_from_slice(data);
            if let Err(e) = self.socket.send_to(&buf, self.to) {
                log::warn!("releasing output item {seq} to {}: {e}", self.to);
            }
        }
        metrics::counter!("castor_released_items_total").increment(items.len() as u64);
    }
}

/// Starts the Prometheus endpoint if configured.
pub fn start_metrics(listen: Option<SocketAddr>) -> Result<(), DaemonError> {
    if let Some(addr) = listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| DaemonError::Metrics(format!("{addr}: {e}")))?;
        log::info!("metrics on http://{addr}/metrics");
    }
    Ok(())
}

/// The daemons' async runtime (2 workers: QUIC, heartbeats, acks), with the
/// Prometheus endpoint started on it when configured.
pub fn daemon_runtime(metrics: Option<SocketAddr>) -> Result<tokio::runtime::Runtime, DaemonError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    {
        let _g = rt.enter();
        start_metrics(metrics)?;
    }
    Ok(rt)
}

/// Runs the primary until killed.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    let rt = daemon_runtime(cfg.metrics)?;
    let identity = Identity::load(&cfg.cert, &cfg.key)?;
    let peer = PeerCert::load(&cfg.peer_cert)?;
    let buffer = Arc::new(OutputBuffer::new(
        castor_net_buffer::Config::with_max_bytes(cfg.max_held),
    ));
    let (vm, release) = match &cfg.net {
        None => {
            let release: Arc<dyn Release> = Arc::new(UdpRelease::new(cfg.release_to)?);
            let sink = Arc::new(BufferedSink {
                buffer: buffer.clone(),
                release: release.clone(),
            });
            (Arc::new(Vm::new(&cfg.vm, sink)?), release)
        }
        Some(dev) => {
            // The net guest's output is its frames: held in the buffer,
            // released to this host's tap (`[output] release_to` is unused).
            let tap = Arc::new(open_tap(&dev.tap)?);
            let release: Arc<dyn Release> = Arc::new(net::TapRelease::new(tap.clone()));
            let vm = Arc::new(Vm::new(&cfg.vm, Arc::new(castor_vmm::NullSink))?);
            vm.devices()
                .add_virtio_net(VirtioNet::new(NetConfig {
                    tap,
                    mac: dev.mac,
                    tx_sink: Some(Arc::new(net::NetTxSink::new(
                        buffer.clone(),
                        release.clone(),
                    ))),
                }))
                .map_err(|e| DaemonError::Net(e.to_string()))?;
            log::info!("virtio-net on tap {} (MAC {:02x?})", dev.tap, dev.mac);
            (vm, release)
        }
    };
    vm.boot(&cfg.boot)?;
    log::info!(
        "guest booted: {} vCPU(s), {} MiB, dirty tracking {}",
        cfg.vm.vcpus,
        cfg.vm.mem_bytes >> 20,
        vm.dirty_backend().map_or("none".into(), |b| b.to_string())
    );
    vm.resume();
    protect(
        vm,
        buffer,
        release,
        Protection {
            backup: cfg.backup,
            bind: cfg.bind,
            identity,
            peer,
            pipeline: cfg.pipeline.clone(),
            on_backup_loss: cfg.on_backup_loss,
        },
        &rt,
    )
}

/// Where a running guest is replicated to, and what to do without a backup.
pub struct Protection {
    /// The backup's address.
    pub backup: SocketAddr,
    /// Local UDP address.
    pub bind: SocketAddr,
    /// This host's key pair.
    pub identity: Identity,
    /// The only backup certificate accepted.
    pub peer: PeerCert,
    /// Pipeline settings.
    pub pipeline: castor_replicator::primary::PrimaryConfig,
    /// Policy while no backup is attached.
    pub on_backup_loss: OnBackupLoss,
}

/// Replicates a running guest to its backup for as long as the process
/// lives: connects (and reconnects: incrementally when the backup still
/// holds this session's replica), and applies the backup-loss policy while
/// no backup is attached. Used by `castor primary`, and by a backup that took
/// over and re-protects the guest with a new backup.
pub fn protect(
    vm: Arc<Vm>,
    buffer: Arc<OutputBuffer>,
    release: Arc<dyn Release>,
    p: Protection,
    rt: &tokio::runtime::Runtime,
) -> Result<(), DaemonError> {
    let mut primary = Primary::new(
        vm.clone(),
        buffer.clone(),
        release.clone(),
        p.pipeline.clone(),
    );
    let tcfg = TransportConfig::default();
    let mut paused_for_loss = false;
    let mut warned = false;
    loop {
        let conn = rt.block_on(transport::connect(
            p.bind,
            p.backup,
            &p.identity,
            &p.peer,
            &tcfg,
        ));
        match conn {
            Ok(conn) => {
                warned = false;
                if buffer.is_unprotected() {
                    // The pipeline holds output again from the first checkpoint
                    // of the synchronisation (in its pause), not from here: the
                    // guest's output keeps flowing during the pre-copy.
                    log::warn!(
                        "backup {} attached: protection resumes at the first checkpoint of the resynchronisation",
                        p.backup
                    );
                }
                if paused_for_loss {
                    vm.resume();
                    paused_for_loss = false;
                }
                match primary.replicate(conn, rt.handle()) {
                    Err(PrimaryError::Stopped) => return Ok(()),
                    Err(e) => log::error!("replication to {} lost: {e}", p.backup),
                    Ok(()) => {}
                }
                metrics::counter!("castor_backup_losses_total").increment(1);
            }
            Err(e) => {
                if !warned {
                    log::warn!("cannot reach backup {}: {e}", p.backup);
                    warned = true;
                }
            }
        }
        match p.on_backup_loss {
            OnBackupLoss::Continue => {
                if !buffer.is_unprotected() {
                    log::warn!(
                        "!!! NO BACKUP: running UNPROTECTED (on_backup_loss = \"continue\"); \
                         releasing held output and retrying the backup"
                    );
                    let released = buffer.set_unprotected(true);
                    let items: Vec<(u64, Vec<u8>)> =
                        released.iter().map(|i| (i.seq, i.data.clone())).collect();
                    if !items.is_empty() {
                        release.release(0, &items);
                    }
                }
            }
            OnBackupLoss::Pause => {
                if !paused_for_loss {
                    log::warn!(
                        "!!! BACKUP LOST: guest paused until a backup returns (on_backup_loss = \"pause\")"
                    );
                    vm.pause();
                    paused_for_loss = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
