//! `castor backup`: holds a hot replica of a primary's guest, commits only
//! whole verified checkpoints, and takes over when the primary is lost.
//! Thin over `castor-replicator` and `castor-node`: this crate reads
//! `backup.toml` and runs the serve/take-over loop; the replica's plumbing
//! ([`ReplicaIo`]), the takeover sequence ([`castor_node::TakeoverPlan`]) and
//! re-protection ([`castor_node::protect()`]) are `castor-node`'s.

pub mod config;

use castor_node::{
    Detection, NetError, Protection, Reason, ReplicaIo, ReplicaNet, Role, StatusBoard,
};
use castor_replicator::backup::{Backup, GuardEnd, GuardEvent, SessionEnd};
use castor_replicator::transport::{self, PeerCert, TransportConfig};
pub use config::{Config, ConfigError};
use std::sync::Arc;
use std::time::Duration;

/// Errors of the backup daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Replication failed.
    #[error("backup: {0}")]
    Backup(#[from] castor_replicator::backup::BackupError),
    /// TLS or QUIC.
    #[error("transport: {0}")]
    Transport(#[from] castor_replicator::transport::TransportError),
    /// I/O (the commit log).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The async runtime or the metrics endpoint.
    #[error(transparent)]
    Runtime(#[from] castor_node::RuntimeError),
    /// The replica's network device.
    #[error("network device: {0}")]
    Net(#[from] NetError),
    /// The guest must not run (its new backup holds another guest).
    #[error(transparent)]
    Protect(#[from] castor_node::ProtectError),
    /// The takeover could not connect the guest's output.
    #[error("takeover: {0}")]
    Takeover(#[from] castor_node::TakeoverError),
}

/// Runs the backup until killed.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    let board = StatusBoard::new(Role::Backup);
    run_with(cfg, &board)
}

/// [`run`], reporting to `board`.
pub fn run_with(cfg: Config, board: &Arc<StatusBoard>) -> Result<(), DaemonError> {
    let rt = castor_node::daemon_runtime()?;
    castor_node::start_endpoints(&rt, board, cfg.metrics, cfg.control.as_ref())?;
    let identity = cfg.tls.identity()?;
    let peer = cfg.tls.peer()?;
    // One tap and one set of switched sinks for every replica VM this
    // process creates.
    let io = Arc::new(
        ReplicaIo::new(match &cfg.net {
            None => None,
            Some(n) => Some(ReplicaNet::open(&n.tap, n.mac, n.tap_policy)?),
        })
        .with_disk(cfg.disk.clone()),
    );
    let mut backup = Backup::new(cfg.backup.clone(), io.vm_factory(cfg.dirty_tracking));
    board.watch_backup(backup.status());
    // SIGTERM and `castor ctl SOCKET detach`: a graceful detach while this
    // backup guards its primary (after a takeover SIGTERM ends the process).
    board.set_detach(backup.detach_handle());
    castor_node::signals::on_sigterm(&rt, board.clone())?;
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
    board.unprotected(Reason::NoPrimary, false);
    board.ready();
    // One liveness rule across sessions (Backup::guard): whatever ends a
    // session, the backup goes back to accepting with the primary's deadline
    // running, and takes over only when nothing arrived for timeout_ms.
    let end = rt.block_on(backup.guard(&listener, |backup, event| match event {
        GuardEvent::Started(peer) => {
            board.session_started(peer.to_string(), backup.committed_epoch() > 0)
        }
        GuardEvent::Ended(Ok(SessionEnd::ProtocolError(why))) => board.unprotected(
            Reason::SessionEnded {
                detail: format!(
                    "the primary's data failed verification ({why}); it should reconnect"
                ),
            },
            false,
        ),
        // Refused at Hello (already logged with the reason): keep the
        // replica and wait for a primary this backup can protect.
        GuardEvent::Ended(Ok(SessionEnd::Refused(why))) => board.unprotected(
            Reason::SessionEnded {
                detail: format!("refused the primary: {why}"),
            },
            false,
        ),
        GuardEvent::Ended(Ok(SessionEnd::PrimaryLost(why))) => board.unprotected(
            Reason::SessionEnded {
                detail: if backup.committed_epoch() > 0 {
                    format!("session ended ({why}); waiting up to timeout_ms for the primary")
                } else {
                    format!("primary lost before the first commit ({why})")
                },
            },
            false,
        ),
        GuardEvent::Ended(Ok(SessionEnd::Detached)) => {
            board.unprotected(Reason::Detaching, false);
        }
        GuardEvent::Ended(Err(e)) => {
            log::error!("session failed: {e}");
            board.unprotected(
                Reason::SessionEnded {
                    detail: e.to_string(),
                },
                false,
            );
        }
    }));
    board.clear_detach();
    let lost = match end {
        GuardEnd::PrimaryLost(lost) => lost,
        GuardEnd::Detached => {
            log::warn!(
                "detached on purpose: exiting without taking over (committed epoch {} dropped)",
                backup.committed_epoch()
            );
            board.unprotected(Reason::Detaching, false);
            castor_node::systemd::notify_stopping();
            return Ok(());
        }
    };
    let detected = Detection::now();
    log::warn!(
        "primary lost ({lost}): taking over from epoch {}",
        backup.committed_epoch()
    );
    take_over(&cfg, &mut backup, &io, detected, board)
}

/// Takes over from the committed checkpoint, then runs the guest
/// unprotected, or re-protects it with `[takeover] new_backup`.
fn take_over(
    cfg: &Config,
    backup: &mut Backup,
    io: &ReplicaIo,
    detected: Detection,
    board: &Arc<StatusBoard>,
) -> Result<(), DaemonError> {
    let t = backup.take_over()?;
    let running = cfg.takeover.execute(t, io, detected, board)?;
    match &cfg.reprotect {
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        Some(rp) => {
            log::warn!("re-protection: replicating to the new backup {}", rp.backup);
            let rt = castor_node::daemon_runtime()?;
            running.protect(
                Protection {
                    backup: rp.backup,
                    bind: rp.bind,
                    identity: cfg.tls.identity()?,
                    peer: PeerCert::load(&rp.cert)?,
                    pipeline: rp.pipeline.clone(),
                    on_backup_loss: rp.on_backup_loss,
                },
                board,
                &rt,
            )?;
            castor_node::systemd::notify_stopping();
            Ok(())
        }
    }
}
