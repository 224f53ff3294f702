//! The primary's checkpoint pipeline.
//!
//! One epoch, on the epoch thread:
//!
//! 1. wait for the epoch deadline, and for room: at most `max_in_flight`
//!    epochs may be sent and not yet acknowledged (back-pressure: a slow
//!    backup delays the next pause, buffers never grow without bound);
//! 2. **pause** the vCPUs; **harvest** the dirty set; **copy** the dirty pages
//!    into the staging buffer; **capture** the VM state; **seal** the output
//!    buffer's epoch; **resume** the guest — this is the whole pause;
//! 3. encode the staged epoch (zero / raw / XOR+LZ4 against the last sent
//!    copy) into frames and hand them to the sender task, which writes the
//!    data frames on the data stream and `EpochEnd` on the control stream.
//!
//! The ack task reads the control stream: `Ack(e)` releases the output held
//! for every epoch `<= e`, in order, to the [`Release`] sink.
//!
//! A new session starts with an iterative pre-copy while the guest runs
//! (epoch-0 page batches the backup applies directly), then epoch 1 carries
//! the first full state. A reconnection to the same backup session resumes
//! with an *incremental resync*: the first checkpoint carries the union of the
//! dirty sets of every epoch after the backup's committed one, with the
//! sent-copy cache invalidated, and commits atomically like any other epoch,
//! so the backup never stops protecting the guest.

mod config;
mod disk;
mod epoch;
#[cfg(feature = "fault-injection")]
mod fault;
mod fence;
mod status;
mod tasks;

pub use config::{EpochMode, PrimaryConfig, Release};
pub use epoch::{copy_pages, dirty_pages, memory_digest};
#[cfg(feature = "fault-injection")]
pub use fault::Fault;
pub use status::{EpochSample, PrimaryStatus, HISTORY};

use crate::checkpoint::CheckpointEncoder;
use crate::manifest::Manifest;
use crate::transport::{Connection, TransportError};
use crate::wire::{Body, ErrorCode, Frame, Hello, Role};
use castor_net_buffer::OutputBuffer;
use castor_parts::{PartSet, VersionRange};
use castor_vmm::Vm;
use fence::Fence;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tasks::{ack_task, heartbeat_listener, heartbeat_task, send_task, AckBoard, Outgoing};
use tokio::runtime::Handle;

/// Page size.
const PAGE: usize = 4096;

/// Errors of the primary pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// The connection to the backup failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The manifest could not be encoded.
    #[error("manifest: {0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    /// The backup did not answer Hello in time.
    #[error("no Hello from the backup within {0:?}")]
    HelloTimeout(Duration),
    /// The control stream closed before the backup's Hello.
    #[error("the control stream closed before the backup's Hello")]
    ClosedBeforeHello,
    /// The backup sent a frame out of turn.
    #[error("unexpected {0:?} frame from the backup")]
    UnexpectedFrame(crate::wire::FrameType),
    /// The backup chose a protocol version that was not offered.
    #[error("the backup chose protocol {chosen}, outside the offered {offered}")]
    VersionChoice {
        /// What it chose.
        chosen: VersionRange,
        /// What was offered.
        offered: VersionRange,
    },
    /// Sending an epoch's frames failed.
    #[error("sending epoch {epoch}: {source}")]
    Send {
        /// The epoch.
        epoch: u64,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The backup closed the control stream.
    #[error("the backup closed the control stream")]
    ControlClosed,
    /// The sender task stopped without a recorded reason.
    #[error("the sender stopped")]
    SenderStopped,
    /// The VMM failed.
    #[error("vmm: {0}")]
    Vmm(#[from] castor_vmm::Error),
    /// Encoding failed.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// A part could not be staged.
    #[error("part: {0}")]
    Part(#[from] castor_parts::PartError),
    /// The output buffer refused an operation.
    #[error("output buffer: {0}")]
    Output(#[from] castor_net_buffer::Error),
    /// The backup sent an error frame.
    #[error("backup reported error {code}: {message}")]
    Peer {
        /// Code.
        code: u16,
        /// Message.
        message: String,
    },
    /// The backup refused this primary at Hello (its configuration does not
    /// fit this VM, or no protocol version in common): the message says what
    /// to change. Reconnecting will not help until someone does.
    #[error("the backup refused this primary: {message}")]
    Refused {
        /// Code.
        code: u16,
        /// The backup's reason.
        message: String,
    },
    /// The backup stayed silent for longer than the failure timeout.
    #[error("backup silent for {0:?}")]
    PeerSilent(Duration),
    /// This primary's process stood still for about the backup's timeout
    /// (stopped, frozen): the backup may have taken over, so it fenced itself.
    #[error("this primary stood still for {0:?}: fenced (the backup may have taken over)")]
    Fenced(Duration),
    /// The fence's watchdog thread could not be started.
    #[error("starting the fence watchdog: {0}")]
    Watchdog(#[source] std::io::Error),
    /// The backup said goodbye: it leaves on purpose (maintenance) and will
    /// not take over. Not a loss: the primary runs on unprotected.
    #[error("the backup detached on purpose")]
    Detached,
    /// Stopped on request.
    #[error("stopped")]
    Stopped,
}

/// The primary side of replication for one VM.
pub struct Primary {
    vm: Arc<Vm>,
    /// Every part of the replicated state, in restore order.
    parts: PartSet,
    output: Arc<OutputBuffer>,
    release: Arc<dyn Release>,
    cfg: PrimaryConfig,
    status: Arc<PrimaryStatus>,
    encoder: CheckpointEncoder,
    session_id: u64,
    /// Last epoch staged (sent or about to be).
    epoch: u64,
    /// Last epoch known committed on the backup.
    acked: u64,
    /// Dirty pages of every epoch after `acked`, for incremental resync.
    unacked_dirty: VecDeque<(u64, Vec<u64>)>,
    stop: Arc<AtomicBool>,
    tracker: String,
    /// Reused staging buffer (never shrinks), so the pause does not allocate
    /// and fault in fresh memory every epoch.
    staging: Vec<u8>,
    /// When the epoch being staged was paused.
    paused_at: Instant,
    /// The VM's protected disk, if it has a writable one.
    disk: Option<disk::DiskSide>,
}

impl Primary {
    /// A primary for `vm`, whose output sink pushes into `output`.
    pub fn new(
        vm: Arc<Vm>,
        output: Arc<OutputBuffer>,
        release: Arc<dyn Release>,
        cfg: PrimaryConfig,
    ) -> Self {
        let session_id = random_u64();
        let tracker = vm
            .dirty_backend()
            .map_or_else(|| "none".to_string(), |b| b.to_string());
        let disk = disk::DiskSide::new(vm.devices().disk());
        let mut parts = castor_vmm::parts::vm_parts(&vm);
        parts.push(Arc::new(castor_net_buffer::OutputPart::new(output.clone())));
        Primary {
            vm,
            parts,
            output,
            release,
            encoder: CheckpointEncoder::new(cfg.cache_bytes),
            cfg,
            status: Arc::new(PrimaryStatus::default()),
            session_id,
            epoch: 0,
            acked: 0,
            unacked_dirty: VecDeque::new(),
            stop: Arc::new(AtomicBool::new(false)),
            tracker,
            staging: Vec::new(),
            paused_at: Instant::now(),
            disk,
        }
    }

    /// Live figures.
    pub fn status(&self) -> Arc<PrimaryStatus> {
        self.status.clone()
    }

    /// A flag that stops [`Primary::replicate`] at the next epoch.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Last epoch acknowledged by the backup.
    pub fn acked_epoch(&self) -> u64 {
        self.acked
    }

    /// Replicates over `conn` until it fails or [`Primary::stop_flag`] is set.
    /// Call again with a new connection to resume (incrementally when the
    /// backup still holds this session's replica).
    pub fn replicate(&mut self, conn: Connection, rt: &Handle) -> Result<(), PrimaryError> {
        let conn = Arc::new(conn);
        let (mut ctl_tx, mut ctl_rx) = rt.block_on(conn.open_control())?;
        let manifest = Manifest::of(&self.vm, &self.parts).encode()?;
        let hello = Hello {
            versions: self.cfg.protocol,
            role: Role::Primary,
            tracker: self.tracker.clone(),
            epoch_interval_ms: self.cfg.epoch_interval.as_millis().min(u32::MAX as u128) as u32,
            session_id: self.session_id,
            resume_from_epoch: self.acked,
            generation: 0,
            manifest,
        };
        rt.block_on(ctl_tx.send(&Frame::new(0, Body::Hello(hello))))?;
        let reply = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), ctl_rx.recv_owned()).await
            })
            .map_err(|_| PrimaryError::HelloTimeout(Duration::from_secs(10)))??
            .ok_or(PrimaryError::ClosedBeforeHello)?;
        let theirs = match reply.body {
            Body::Hello(h) if h.role == Role::Backup => h,
            Body::Error(e) if ErrorCode::from_u16(e.code).is_some_and(ErrorCode::is_refusal) => {
                return Err(PrimaryError::Refused {
                    code: e.code,
                    message: e.message,
                })
            }
            Body::Error(e) => {
                return Err(PrimaryError::Peer {
                    code: e.code,
                    message: e.message,
                })
            }
            other => return Err(PrimaryError::UnexpectedFrame(other.frame_type())),
        };
        // The backup answers with the one version it chose from our range.
        let version = theirs.versions.max;
        if theirs.versions.min != version || !self.cfg.protocol.contains(version) {
            return Err(PrimaryError::VersionChoice {
                chosen: theirs.versions,
                offered: self.cfg.protocol,
            });
        }
        ctl_tx.set_version(version);
        conn.set_version(version);
        self.encoder.set_version(version);
        let backup_committed = theirs.resume_from_epoch;
        let incremental = theirs.session_id == self.session_id
            && backup_committed >= 1
            && backup_committed <= self.epoch
            && backup_committed >= self.acked;
        log::info!(
            "connected to backup {} (session {:#x}, committed epoch {}): {}",
            conn.remote_address(),
            theirs.session_id,
            backup_committed,
            if incremental {
                "incremental resync"
            } else {
                "full synchronisation"
            }
        );
        self.encoder.invalidate_all();
        // Epochs in flight are counted on this connection only: epochs staged in
        // a dead session are never acked one by one (the resync checkpoint
        // carries their pages and output).
        let base_acked = self.epoch;
        if incremental {
            self.on_ack(backup_committed)?;
        } else {
            // A fresh replica: unprotected until its first commit.
            self.status.protected.store(false, Ordering::Relaxed);
        }

        let board = Arc::new(AckBoard {
            acked: Mutex::new(base_acked),
            committed: std::sync::atomic::AtomicU64::new(self.acked),
            cv: Condvar::new(),
            sent_at: Mutex::new(VecDeque::new()),
            last_heard: Mutex::new(Instant::now()),
            failed: Mutex::new(None),
            fence: Arc::new(Fence::new(self.cfg.peer_timeout)),
        });
        board
            .fence
            .watch(self.cfg.heartbeat)
            .map_err(PrimaryError::Watchdog)?;
        let data_tx = rt.block_on(conn.open_data())?;
        let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Outgoing>(self.cfg.max_in_flight + 2);
        let sender = rt.spawn(send_task(
            data_tx,
            ctl_tx,
            out_rx,
            board.clone(),
            #[cfg(feature = "fault-injection")]
            self.cfg.fault.take(),
        ));
        let acker = rt.spawn(ack_task(
            ctl_rx,
            board.clone(),
            self.output.clone(),
            self.release.clone(),
            self.status.clone(),
        ));
        let hb = rt.spawn(heartbeat_task(
            conn.clone(),
            self.cfg.heartbeat,
            board.clone(),
            self.status.clone(),
        ));
        let hb_in = rt.spawn(heartbeat_listener(conn.clone(), board.clone()));

        let result = self.run_session(incremental, backup_committed, &out_tx, &board);
        drop(out_tx);
        hb.abort();
        hb_in.abort();
        acker.abort();
        // Give the sender a moment to flush what it has, then drop it.
        let _ =
            rt.block_on(async { tokio::time::timeout(Duration::from_millis(200), sender).await });
        // Only what the backup really committed counts: `board.acked` also
        // counts the epochs of a dead session that the resync checkpoint
        // covers, and taking those as committed would make the next
        // reconnection fall back to a full sync the backup refuses.
        self.acked = self
            .acked
            .max(board.committed.load(std::sync::atomic::Ordering::Acquire));
        conn.close(0, "primary session ended");
        result
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom_fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        return t ^ u64::from(std::process::id()) << 32;
    }
    u64::from_le_bytes(b)
}

fn getrandom_fill(b: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(b)
}
