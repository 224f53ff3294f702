//! The backup's side of replication: receive checkpoints, commit only whole
//! verified ones, acknowledge them; and take over when the primary is lost.
//!
//! Session start: the primary sends `Hello`; the backup answers with its own,
//! carrying the session id and the epoch it last committed, so a primary that
//! reconnects can resume incrementally. A new session (another id) gets a
//! fresh replica: epoch-0 page batches (the primary's pre-copy) are applied
//! straight into it, and the first checkpoint carrying state makes it usable.
//!
//! Any malformed or unverifiable frame ends the session with an `Error` frame
//! and drops every partial epoch; the replica keeps its last commit, and the
//! primary reconnects and resyncs.

mod commit;
mod detach;
mod guard;
mod hello;
mod probe;
mod session;
mod takeover;

pub use detach::DetachHandle;
pub use guard::{GuardEnd, GuardEvent};
pub use takeover::Takeover;

use crate::checkpoint::{CheckpointError, Replica};
use crate::transport::TransportError;
use crate::wire::{ErrorCode, FrameType, PROTOCOL_VERSIONS};
use castor_net_buffer::OutputPart;
use castor_parts::{PartSet, VersionRange};
use castor_vmm::state::VmShape;
use castor_vmm::Vm;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors of the backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Transport failure.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// A checkpoint failed to assemble, verify or commit.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// No Hello from the primary in time.
    #[error("no Hello within {0:?}")]
    HelloTimeout(Duration),
    /// The replica's disk image could not be opened for writing.
    #[error("the replica's disk image: {0}")]
    DiskImage(#[source] std::io::Error),
    /// The control stream closed before the primary's Hello.
    #[error("the control stream closed before the primary's Hello")]
    ClosedBeforeHello,
    /// The peer is not a primary.
    #[error("the peer announced itself as a backup, not a primary")]
    NotPrimary,
    /// A frame out of turn.
    #[error("unexpected {0:?} frame")]
    UnexpectedFrame(FrameType),
    /// Session data arrived before a replica exists (a bug, never a peer's doing).
    #[error("no replica for this session")]
    NoReplica,
    /// The primary reported an error.
    #[error("primary error {code}: {message}")]
    Peer {
        /// Its code.
        code: u16,
        /// Its message.
        message: String,
    },
    /// A frame of an epoch already committed (a replay).
    #[error("frame of epoch {epoch}, already committed {committed}")]
    StaleEpoch {
        /// The frame's epoch.
        epoch: u64,
        /// The committed epoch.
        committed: u64,
    },
    /// More epochs in flight than allowed.
    #[error("more than {0} epochs in flight")]
    TooManyEpochs(usize),
    /// An epoch stayed incomplete after its EpochEnd (a stream cut mid-frame).
    #[error("epoch {epoch} still incomplete {waited:?} after its EpochEnd")]
    IncompleteEpoch {
        /// The epoch.
        epoch: u64,
        /// How long it waited.
        waited: Duration,
    },
    /// A frame did not decode.
    #[error("malformed frame: {0}")]
    Malformed(crate::wire::WireError),
    /// A fault this backup injected into itself (testing only).
    #[cfg(feature = "fault-injection")]
    #[error("injected fault: {0:?}")]
    Injected(BackupFault),
    /// The VMM failed.
    #[error("vmm: {0}")]
    Vmm(#[from] castor_vmm::Error),
    /// Takeover was asked for with no committed checkpoint.
    #[error("no committed checkpoint to take over from")]
    NothingCommitted,
}

/// Output a committed checkpoint holds: re-emitted by a backup that takes over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommittedOutput {
    /// The held items, ascending by sequence number.
    pub items: Vec<castor_net_buffer::HeldItem>,
    /// The output buffer's next sequence number at that checkpoint.
    pub next_seq: u64,
}

/// The replica's machine: its paused VM and its parts (the VM's own and the
/// output buffer's), in restore order.
pub struct ReplicaMachine {
    /// The paused replica VM.
    pub vm: Arc<Vm>,
    /// Every part, in restore order.
    pub parts: PartSet,
    /// The output part (its restored state is what a takeover re-emits).
    pub output: Arc<OutputPart>,
}

impl ReplicaMachine {
    /// The machine of `vm`: the VM's parts, then the output buffer's.
    pub fn new(vm: Arc<Vm>) -> Self {
        let mut parts = castor_vmm::parts::vm_parts(&vm);
        let output = Arc::new(OutputPart::replica());
        parts.push(output.clone());
        ReplicaMachine { vm, parts, output }
    }
}

/// Backup settings.
#[derive(Clone, Debug)]
pub struct BackupConfig {
    /// The primary is lost after this long without a frame from it.
    pub peer_timeout: Duration,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Most bytes of frames buffered at once, over all epochs not yet
    /// committed (a bound on what a peer can make the backup allocate).
    /// Never below the largest legitimate epoch (every guest page raw, its
    /// entry overhead, and 64 MiB for sections): 0 means exactly that.
    pub max_epoch_bytes: usize,
    /// Most bytes of frames read off the streams and queued for the session
    /// loop (at least one largest frame). With the two readers' buffers,
    /// this bounds what a peer can park between the socket and the epochs.
    pub max_queued_bytes: usize,
    /// Most epochs buffered at once (arriving ahead of their commit).
    pub max_epochs_buffered: usize,
    /// Protocol versions accepted at Hello.
    pub protocol: VersionRange,
    /// Deadline of each phase before the data stream (control stream,
    /// Hello, data stream): a stalled peer cannot hold a session open.
    pub handshake_timeout: Duration,
    /// Testing only: faults this backup injects into itself.
    #[cfg(feature = "fault-injection")]
    pub fault: Option<BackupFault>,
}

/// Faults a backup injects into itself, to test the fault paths (feature
/// `fault-injection`; never in a production build).
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupFault {
    /// Flip one byte of replica page `page` just before committing `epoch`
    /// (which must carry a memory digest): a diverged replica.
    CorruptPage {
        /// The epoch.
        epoch: u64,
        /// The page.
        page: u64,
    },
    /// End the next `n` sessions that resume incrementally, each when its
    /// first checkpoint is complete and before it commits (the link dying
    /// twice in a row before a resync commits).
    FailResumes(u32),
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            peer_timeout: Duration::from_millis(100),
            heartbeat: Duration::from_millis(10),
            max_epoch_bytes: 0,
            max_queued_bytes: 32 << 20,
            max_epochs_buffered: 16,
            protocol: PROTOCOL_VERSIONS,
            handshake_timeout: Duration::from_secs(5),
            #[cfg(feature = "fault-injection")]
            fault: None,
        }
    }
}

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The primary stopped answering or the connection died: take over if
    /// there is a committed checkpoint.
    PrimaryLost(Lost),
    /// The primary's data failed verification; the replica is intact and the
    /// primary is expected to reconnect and resync.
    ProtocolError(Box<BackupError>),
    /// The primary was refused at Hello (no common protocol version, or a
    /// manifest this backup's configuration cannot restore); the replica,
    /// if any, is kept.
    Refused(Refusal),
    /// This backup detached on purpose ([`DetachHandle`]) and told the
    /// primary so.
    Detached,
}

/// Why the backup judged the primary lost.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    /// Nothing arrived for longer than the timeout.
    #[error("silent for {0:?}")]
    Silent(Duration),
    /// The connection closed.
    #[error("connection closed")]
    ConnectionClosed,
    /// The control stream closed.
    #[error("control stream closed")]
    ControlStreamClosed,
    /// The connection failed.
    #[error("{0}")]
    Transport(#[from] TransportError),
    /// The primary's host reported its port closed (ICMP port unreachable):
    /// the primary's process is gone.
    #[error("its host reports its port closed (the process died)")]
    PortClosed,
}

/// Why a primary was refused at Hello.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Its frames are of a protocol version this build does not speak.
    #[error("{0}")]
    Header(crate::wire::WireError),
    /// No protocol version in common.
    #[error("the primary speaks protocol {primary}, this backup {backup}: upgrade the older host")]
    Versions {
        /// The primary's range.
        primary: VersionRange,
        /// This backup's.
        backup: VersionRange,
    },
    /// The manifest does not fit this backup.
    #[error("{0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    /// Another session (another guest) while this backup holds the
    /// committed replica of its pair's guest.
    #[error(
        "this backup holds the committed replica (epoch {committed}) of session {session:#x}, another guest: \
         it takes that guest over if its primary stays silent, and pairs with no other guest meanwhile; \
         to protect this guest with it instead, restart the backup (it then drops that replica)"
    )]
    Occupied {
        /// The pair's session.
        session: u64,
        /// Its committed epoch.
        committed: u64,
    },
}

impl Refusal {
    /// The Error frame / close code that carries it.
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::Header(_) | Refusal::Versions { .. } => ErrorCode::Version,
            Refusal::Manifest(_) => ErrorCode::Manifest,
            Refusal::Occupied { .. } => ErrorCode::Occupied,
        }
    }
}

/// Live figures of the backup.
#[derive(Debug, Default)]
pub struct BackupStatus {
    /// Last committed epoch.
    pub committed: AtomicU64,
    /// Epochs committed.
    pub commits: AtomicU64,
    /// Epochs discarded (partial or failed verification).
    pub discarded: AtomicU64,
    /// Memory-digest verifications that passed.
    pub verified: AtomicU64,
    /// Memory-digest verifications that failed.
    pub verify_failures: AtomicU64,
}

/// Builds the backup's VM for a shape announced by a primary.
pub type VmFactory = dyn Fn(&VmShape) -> Result<Arc<Vm>, castor_vmm::Error> + Send + Sync;

/// The backup: a paused replica VM and the committed checkpoint.
pub struct Backup {
    cfg: BackupConfig,
    factory: Box<VmFactory>,
    machine: Option<ReplicaMachine>,
    replica: Option<Replica>,
    session_id: u64,
    status: Arc<BackupStatus>,
    commit_log: Option<Box<dyn FnMut(u64) + Send>>,
    /// When anything from the primary last arrived, over all sessions.
    last_heard: Option<Instant>,
    /// A planned detach, requested from outside.
    detach: DetachHandle,
}

impl Backup {
    /// A backup that creates its replica VM with `factory` when a primary
    /// announces the shape.
    pub fn new(cfg: BackupConfig, factory: Box<VmFactory>) -> Self {
        Backup {
            cfg,
            factory,
            machine: None,
            replica: None,
            session_id: 0,
            status: Arc::new(BackupStatus::default()),
            commit_log: None,
            last_heard: None,
            detach: DetachHandle::default(),
        }
    }

    /// The handle that makes this backup detach (say goodbye and never
    /// take over): for SIGTERM and the control socket's `detach`.
    pub fn detach_handle(&self) -> DetachHandle {
        self.detach.clone()
    }

    /// Records that the primary was heard at `t` (never moves back).
    fn heard_at(&mut self, t: Instant) {
        if self.last_heard.is_none_or(|h| t > h) {
            self.last_heard = Some(t);
        }
    }

    /// When the primary was last heard, over all sessions.
    pub fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    /// Called with each epoch right after it is committed (before its Ack is
    /// sent): the commit log tests check output against.
    pub fn set_commit_log(&mut self, f: Box<dyn FnMut(u64) + Send>) {
        self.commit_log = Some(f);
    }

    /// Live figures.
    pub fn status(&self) -> Arc<BackupStatus> {
        self.status.clone()
    }

    /// Last committed epoch (0: none).
    pub fn committed_epoch(&self) -> u64 {
        self.replica.as_ref().map_or(0, |r| r.committed_epoch())
    }

    /// The replica (for inspection in tests).
    pub fn replica(&self) -> Option<&Replica> {
        self.replica.as_ref()
    }

    /// The replica VM.
    pub fn vm(&self) -> Option<&Arc<Vm>> {
        self.machine.as_ref().map(|m| &m.vm)
    }
}
