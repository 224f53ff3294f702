//! `castor primary`: runs the protected guest and replicates it to the
//! backup. Thin over `castor-replicator` and `castor-node`: this crate reads
//! `primary.toml`, boots the guest with its output wired through the
//! output-commit buffer to the outside world, and runs the reconnect/
//! backup-loss loop ([`castor_node::protect()`]).

pub mod config;

use castor_net_buffer::OutputBuffer;
use castor_node::{
    open_tap, BufferedSink, NetError, NetTxSink, Protection, Role, StatusBoard, TapRelease,
    UdpRelease,
};
use castor_replicator::primary::Release;
use castor_vmm::devices::{NetConfig, VirtioBlk, VirtioNet};
use castor_vmm::Vm;
pub use config::{Config, ConfigError};
use std::sync::Arc;

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
    /// I/O (sockets).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The async runtime or the metrics endpoint.
    #[error(transparent)]
    Runtime(#[from] castor_node::RuntimeError),
    /// The guest's network device.
    #[error("network device: {0}")]
    Net(#[from] NetError),
    /// The guest's disk.
    #[error("disk: {0}")]
    Disk(#[from] castor_vmm::devices::DeviceError),
    /// The guest must not run (its backup holds another guest of the pair).
    #[error(transparent)]
    Protect(#[from] castor_node::ProtectError),
    /// A record guest without `[output] release_to` (validated by
    /// `Config::parse`; a hand-built `Config` can still lack it).
    #[error("the record guest needs [output] release_to")]
    NoRecordTarget,
}

/// Runs the primary until killed (or until the guest stops).
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    let board = StatusBoard::new(Role::Primary);
    run_with(cfg, &board)
}

/// [`run`], reporting to `board`.
pub fn run_with(cfg: Config, board: &Arc<StatusBoard>) -> Result<(), DaemonError> {
    let rt = castor_node::daemon_runtime()?;
    castor_node::start_endpoints(&rt, board, cfg.metrics, cfg.control.as_ref())?;
    let identity = cfg.tls.identity()?;
    let peer = cfg.tls.peer()?;
    let buffer = Arc::new(OutputBuffer::new(
        castor_net_buffer::Config::with_max_bytes(cfg.max_held),
    ));
    let (vm, release) = match &cfg.net {
        None => {
            let to = cfg.release_to.ok_or(DaemonError::NoRecordTarget)?;
            let release: Arc<dyn Release> = Arc::new(UdpRelease::new(to)?);
            let sink = Arc::new(BufferedSink {
                buffer: buffer.clone(),
                release: release.clone(),
            });
            log::info!("guest records released to udp://{to}");
            (Arc::new(Vm::new(&cfg.vm, sink)?), release)
        }
        Some(dev) => {
            // The net guest's output is its frames: held in the buffer,
            // released to this host's tap.
            let tap = Arc::new(open_tap(&dev.tap, dev.tap_policy)?);
            let release: Arc<dyn Release> = Arc::new(TapRelease::new(tap.clone()));
            let vm = Arc::new(Vm::new(&cfg.vm, Arc::new(castor_vmm::NullSink))?);
            vm.devices()
                .add_virtio_net(VirtioNet::new(NetConfig {
                    tap,
                    mac: dev.mac.octets(),
                    tx_sink: Some(Arc::new(NetTxSink::new(buffer.clone(), release.clone()))),
                }))
                .map_err(NetError::from)?;
            log::info!("virtio-net on tap {} (MAC {})", dev.tap, dev.mac);
            (vm, release)
        }
    };
    if let Some(disk) = &cfg.disk {
        // After any network device: the backup's replica adds its devices
        // in the same order (parts are matched by bus slot).
        let blk = VirtioBlk::open(disk)?;
        log::info!(
            "virtio-blk on {} ({} MiB{}), replicated with the guest",
            disk.path.display(),
            (blk.capacity_sectors() * 512) >> 20,
            if disk.read_only { ", read-only" } else { "" }
        );
        vm.devices().add_virtio_blk(blk)?;
    }
    match &cfg.linux {
        None => vm.boot(&cfg.boot)?,
        Some(linux) => {
            let report = vm.boot_linux(linux)?;
            log::info!(
                "Linux guest: {} ({:?} entry), initramfs {}, command line {:?}; its console is logged (target castor::guest_console), not output-committed",
                linux.kernel.display(),
                report.protocol,
                linux
                    .initrd
                    .as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string()),
                linux.cmdline
            );
        }
    }
    log::info!(
        "guest booted: {} vCPU(s), {} MiB, dirty tracking {}; replicating to backup {}",
        cfg.vm.vcpus,
        cfg.vm.mem_bytes >> 20,
        vm.dirty_backend().map_or("none".into(), |b| b.to_string()),
        cfg.backup
    );
    vm.resume();
    let end = castor_node::protect(
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
        board,
        &rt,
    );
    castor_node::systemd::notify_stopping();
    Ok(end?)
}
