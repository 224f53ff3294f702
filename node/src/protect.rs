//! The reconnect/backup-loss loop: replicates a running guest to its backup
//! for as long as the process lives. Used by `castor primary`, and by a
//! backup that took over and re-protects the guest with a new backup.

use castor_net_buffer::OutputBuffer;
use castor_replicator::primary::{Primary, PrimaryConfig, PrimaryError, Release};
use castor_replicator::transport::{self, Identity, PeerCert, TransportConfig};
use castor_vmm::Vm;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What to do when the backup is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBackupLoss {
    /// Hold the guest until a backup returns.
    Pause,
    /// Run unprotected, releasing output at once.
    Continue,
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
    pub pipeline: PrimaryConfig,
    /// Policy while no backup is attached.
    pub on_backup_loss: OnBackupLoss,
}

/// Replicates a running guest to its backup for as long as the process
/// lives: connects (and reconnects: incrementally when the backup still
/// holds this session's replica), and applies the backup-loss policy while
/// no backup is attached. Returns when the guest stops.
pub fn protect(
    vm: Arc<Vm>,
    buffer: Arc<OutputBuffer>,
    release: Arc<dyn Release>,
    p: Protection,
    rt: &tokio::runtime::Runtime,
) {
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
                    Err(PrimaryError::Stopped) => return,
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
