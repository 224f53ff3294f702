//! The reconnect/backup-loss loop: replicates a running guest to its backup
//! for as long as the process lives. Used by `castor primary`, and by a
//! backup that took over and re-protects the guest with a new backup.
//!
//! Every change of protection goes to the daemon's [`StatusBoard`] (which
//! logs it once, with its reason); the board's [`ProtectSwitch`] lets the
//! operator suspend protection on purpose (`castor ctl SOCKET suspend`) and
//! resume it.

use crate::status::{Reason, StatusBoard};
use castor_net_buffer::OutputBuffer;
use castor_replicator::primary::{Primary, PrimaryConfig, PrimaryError, Release};
use castor_replicator::transport::{self, Identity, PeerCert, TransportConfig};
use castor_vmm::Vm;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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

/// Why a protect loop gave up its guest.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// The backup holds (and takes over) another guest of this pair: this
    /// one, booted by a daemon restarted after a crash, must never run
    /// beside it. The guest is paused and the daemon exits.
    #[error("the backup {backup} holds the replica of another guest of this pair and takes it over; this guest was stopped: {message}")]
    OtherGuest {
        /// The backup.
        backup: SocketAddr,
        /// The backup's refusal.
        message: String,
    },
}

/// A suspend/resume request could not be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    /// This daemon runs no guest (a backup before any takeover).
    #[error("this daemon runs no guest (a backup): suspend or resume protection on the primary")]
    NoGuest,
    /// Protection is already suspended.
    #[error("protection is already suspended")]
    AlreadySuspended,
    /// Protection is not suspended.
    #[error("protection is not suspended")]
    NotSuspended,
}

#[derive(Default)]
struct SwitchInner {
    /// A protect loop runs (a guest runs on this host).
    running: bool,
    suspended: bool,
    /// The stop flag of the pipeline in session, if any.
    stop: Option<Arc<AtomicBool>>,
}

/// The operator's switch over a protect loop: suspend protection (the
/// session with the backup ends and the guest runs unprotected on purpose,
/// its held output released) and resume it (reconnect and resynchronise:
/// incrementally when the backup still holds this session's replica).
#[derive(Default)]
pub struct ProtectSwitch {
    inner: Mutex<SwitchInner>,
    cv: Condvar,
}

impl ProtectSwitch {
    fn lock(&self) -> MutexGuard<'_, SwitchInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Suspends protection.
    pub fn suspend(&self) -> Result<(), SwitchError> {
        let mut g = self.lock();
        if !g.running {
            return Err(SwitchError::NoGuest);
        }
        if g.suspended {
            return Err(SwitchError::AlreadySuspended);
        }
        g.suspended = true;
        if let Some(stop) = &g.stop {
            stop.store(true, Ordering::Relaxed);
        }
        self.cv.notify_all();
        Ok(())
    }

    /// Resumes protection.
    pub fn resume(&self) -> Result<(), SwitchError> {
        let mut g = self.lock();
        if !g.running {
            return Err(SwitchError::NoGuest);
        }
        if !g.suspended {
            return Err(SwitchError::NotSuspended);
        }
        g.suspended = false;
        self.cv.notify_all();
        Ok(())
    }

    /// Whether protection is suspended.
    pub fn is_suspended(&self) -> bool {
        self.lock().suspended
    }

    fn attach(&self, stop: Arc<AtomicBool>) {
        let mut g = self.lock();
        g.running = true;
        g.stop = Some(stop);
    }

    /// Waits up to `d` for a resume; true once not suspended.
    fn wait_resumed(&self, d: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, d, |g| g.suspended)
            .unwrap_or_else(|e| e.into_inner());
        !g.suspended
    }

    /// Sleeps up to `d`, waking early on a suspend.
    fn sleep(&self, d: Duration) {
        let g = self.lock();
        let _ = self
            .cv
            .wait_timeout_while(g, d, |g| !g.suspended)
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// Releases everything the buffer holds and lets output pass through.
fn run_unprotected(buffer: &OutputBuffer, release: &dyn Release) {
    if !buffer.is_unprotected() {
        let released = buffer.set_unprotected(true);
        let items: Vec<castor_net_buffer::HeldItem> = released
            .iter()
            .map(|i| castor_net_buffer::HeldItem {
                seq: i.seq,
                data: i.data.clone(),
            })
            .collect();
        if !items.is_empty() {
            release.release(0, &items);
        }
    }
}

/// Replicates a running guest to its backup for as long as the process
/// lives: connects (and reconnects: incrementally when the backup still
/// holds this session's replica), and applies the backup-loss policy while
/// no backup is attached. Every state change goes to `board`. Returns when
/// the guest stops, or with an error when it must not run (see
/// [`ProtectError`]).
pub fn protect(
    vm: Arc<Vm>,
    buffer: Arc<OutputBuffer>,
    release: Arc<dyn Release>,
    p: Protection,
    board: &Arc<StatusBoard>,
    rt: &tokio::runtime::Runtime,
) -> Result<(), ProtectError> {
    let mut primary = Primary::new(
        vm.clone(),
        buffer.clone(),
        release.clone(),
        p.pipeline.clone(),
    );
    board.watch_primary(primary.status(), vm.shape().memory_end());
    let switch = board.switch().clone();
    let stop = primary.stop_flag();
    switch.attach(stop.clone());
    let tcfg = TransportConfig::default();
    let mut paused_for_loss = false;
    let mut warned = false;
    // The backup said goodbye (planned maintenance): run on unprotected,
    // whatever the loss policy, until a backup attaches again.
    let mut detached = false;
    // After a session that ended (not refused), the first reconnection goes
    // at once: the backup takes over after timeout_ms without hearing us,
    // so a primary that dropped a session for its own reasons (it judged
    // the backup silent, it fenced itself) must be heard again before that.
    let mut retry_now;
    let mut last_quick_retry: Option<std::time::Instant> = None;
    loop {
        if switch.is_suspended() {
            log::warn!(
                "!!! protection SUSPENDED by the operator: the guest runs UNPROTECTED on purpose \
                 (held output released; a host failure now loses the guest). \
                 Resume with `castor ctl SOCKET resume`"
            );
            run_unprotected(&buffer, release.as_ref());
            if paused_for_loss {
                vm.resume();
                paused_for_loss = false;
            }
            board.unprotected(Reason::Suspended, false);
            while !switch.wait_resumed(Duration::from_secs(3600)) {}
            stop.store(false, Ordering::Relaxed);
            log::warn!(
                "protection resumed by the operator: reconnecting to backup {}",
                p.backup
            );
        }
        let conn = rt.block_on(transport::connect(
            p.bind,
            p.backup,
            &p.identity,
            &p.peer,
            &tcfg,
        ));
        retry_now = false;
        let reason = match conn {
            Ok(conn) => {
                retry_now = last_quick_retry.is_none_or(|t| t.elapsed() > Duration::from_secs(1));
                warned = false;
                detached = false;
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
                // Incremental when this pipeline already had a backup commit.
                let incremental = primary.acked_epoch() > 0;
                board.session_started(p.backup.to_string(), incremental);
                let end = primary.replicate(conn, rt.handle());
                match end {
                    Err(PrimaryError::Stopped) if switch.is_suspended() => continue,
                    Err(PrimaryError::Stopped) => return Ok(()),
                    Err(PrimaryError::Detached) => {
                        log::warn!(
                            "!!! the backup {} DETACHED on purpose (maintenance): the guest runs UNPROTECTED \
                             (held output released, no pause) until a backup attaches again",
                            p.backup
                        );
                        detached = true;
                        Reason::BackupDetached
                    }
                    Err(PrimaryError::Refused { code, message })
                        if code == castor_replicator::wire::ErrorCode::Occupied.as_u16() =>
                    {
                        // The backup holds (and will take over) another
                        // guest of this pair: a daemon restarted after a
                        // crash boots a new guest, which must never run
                        // beside the one the backup resumes.
                        log::error!(
                            "!!! the backup {} holds the replica of ANOTHER guest of this pair and takes it over: \
                             this guest is stopped and this primary exits ({message})",
                            p.backup
                        );
                        vm.pause();
                        board.unprotected(
                            Reason::BackupRefused {
                                message: message.clone(),
                            },
                            true,
                        );
                        return Err(ProtectError::OtherGuest {
                            backup: p.backup,
                            message,
                        });
                    }
                    Err(PrimaryError::Refused { message, .. }) => {
                        retry_now = false;
                        log::error!(
                            "replication to {}: the backup refused this primary: {message}",
                            p.backup
                        );
                        metrics::counter!("castor_backup_losses_total").increment(1);
                        Reason::BackupRefused { message }
                    }
                    Err(e) => {
                        log::error!("replication to {} lost: {e}", p.backup);
                        metrics::counter!("castor_backup_losses_total").increment(1);
                        Reason::BackupLost {
                            error: e.to_string(),
                        }
                    }
                    Ok(()) => {
                        metrics::counter!("castor_backup_losses_total").increment(1);
                        Reason::BackupLost {
                            error: "the session ended".into(),
                        }
                    }
                }
            }
            Err(e) => {
                if !warned {
                    log::warn!("cannot reach backup {}: {e}", p.backup);
                    warned = true;
                }
                Reason::BackupUnreachable {
                    error: e.to_string(),
                }
            }
        };
        if switch.is_suspended() {
            continue;
        }
        if detached {
            // A planned detach is not a loss: never pause for it.
            run_unprotected(&buffer, release.as_ref());
            if paused_for_loss {
                vm.resume();
                paused_for_loss = false;
            }
            board.unprotected(Reason::BackupDetached, false);
            switch.sleep(Duration::from_millis(200));
            continue;
        }
        if retry_now {
            last_quick_retry = Some(std::time::Instant::now());
        }
        match p.on_backup_loss {
            OnBackupLoss::Continue => {
                if !buffer.is_unprotected() {
                    log::warn!(
                        "!!! NO BACKUP: running UNPROTECTED (on_backup_loss = \"continue\"); \
                         releasing held output and retrying the backup"
                    );
                    run_unprotected(&buffer, release.as_ref());
                }
                board.unprotected(reason, false);
            }
            OnBackupLoss::Pause => {
                if !paused_for_loss {
                    log::warn!(
                        "!!! BACKUP LOST: guest paused until a backup returns (on_backup_loss = \"pause\"); \
                         `castor ctl SOCKET suspend` runs it unprotected instead"
                    );
                    vm.pause();
                    paused_for_loss = true;
                }
                board.unprotected(reason, true);
            }
        }
        if !retry_now {
            switch.sleep(Duration::from_millis(200));
        }
    }
}
