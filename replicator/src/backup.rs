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

use crate::checkpoint::{CheckpointError, EpochAssembler, Replica};
use crate::manifest::Manifest;
use crate::primary::memory_digest;
use crate::transport::{Connection, FrameReceiver, FrameSender, TransportError};
use crate::wire::{self, Body, BodyRef, Frame, FrameType, Hello, Role, PROTOCOL_VERSIONS};
use castor_net_buffer::OutputPart;
use castor_parts::{PartSet, VersionRange};
use castor_vmm::state::VmShape;
use castor_vmm::Vm;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The primary spoke out of turn.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The VMM failed.
    #[error("vmm: {0}")]
    Vmm(#[from] castor_vmm::Error),
    /// Takeover was asked for with no committed checkpoint.
    #[error("no committed checkpoint to take over from")]
    NothingCommitted,
}

/// Error and close code: the data failed verification (the replica is kept).
pub const REFUSED_DATA: u16 = 1;
/// Error and close code: no protocol version in common.
pub const REFUSED_VERSION: u16 = 10;
/// Error and close code: the manifest does not fit this backup's configuration.
pub const REFUSED_MANIFEST: u16 = 11;
/// Error and close code: the session's first checkpoint could not be restored.
pub const REFUSED_STATE: u16 = 12;

/// Output a committed checkpoint holds: re-emitted by a backup that takes over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommittedOutput {
    /// (sequence number, bytes), ascending.
    pub items: Vec<(u64, Vec<u8>)>,
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
    /// committed (a bound on what a peer can make the backup allocate); at
    /// least the guest's memory plus 64 MiB, the largest legitimate epoch.
    pub max_epoch_bytes: usize,
    /// Most epochs buffered at once (arriving ahead of their commit).
    pub max_epochs_buffered: usize,
    /// Protocol versions accepted at Hello.
    pub protocol: VersionRange,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            peer_timeout: Duration::from_millis(100),
            heartbeat: Duration::from_millis(10),
            max_epoch_bytes: 1 << 30,
            max_epochs_buffered: 16,
            protocol: PROTOCOL_VERSIONS,
        }
    }
}

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The primary stopped answering or the connection died: take over if
    /// there is a committed checkpoint.
    PrimaryLost(String),
    /// The primary's data failed verification; the replica is intact and the
    /// primary is expected to reconnect and resync.
    ProtocolError(String),
    /// The primary was refused at Hello (no common protocol version, or a
    /// manifest this backup's configuration cannot restore); the replica,
    /// if any, is kept.
    Refused(String),
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
        }
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

    /// Sends an Error frame with `code`, lets it reach the peer (finish the
    /// stream, give the peer a moment to read it and close), then closes the
    /// connection with the same code.
    async fn refuse(conn: &Connection, ctl_tx: &mut FrameSender, code: u16, message: &str) {
        log::error!("refusing the primary {}: {message}", conn.remote_address());
        metrics::counter!("castor_backup_refusals_total").increment(1);
        let _ = ctl_tx
            .send(&Frame::new(
                0,
                Body::Error(wire::ErrorFrame {
                    code,
                    message: message.chars().take(1000).collect(),
                }),
            ))
            .await;
        let _ = ctl_tx.finish();
        let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
        conn.close(u32::from(code), "refused");
    }

    /// Serves one primary connection until it ends.
    pub async fn serve(&mut self, mut conn: Connection) -> Result<SessionEnd, BackupError> {
        let (mut ctl_tx, mut ctl_rx) = conn.accept_control().await?;
        let hello = match tokio::time::timeout(Duration::from_secs(10), ctl_rx.recv_owned()).await {
            Err(_) => return Err(BackupError::Protocol("no Hello within 10 s".into())),
            Ok(Err(e)) => {
                if let Some(w @ wire::WireError::UnsupportedVersion { .. }) = e.wire_error() {
                    let msg = w.to_string();
                    Self::refuse(&conn, &mut ctl_tx, REFUSED_VERSION, &msg).await;
                    return Ok(SessionEnd::Refused(msg));
                }
                return Err(e.into());
            }
            Ok(Ok(r)) => r.ok_or_else(|| BackupError::Protocol("control stream closed".into()))?,
        };
        let Body::Hello(h) = hello.body else {
            return Err(BackupError::Protocol(format!(
                "expected Hello, got {:?}",
                hello.body.frame_type()
            )));
        };
        if h.role != Role::Primary {
            return Err(BackupError::Protocol("the peer is not a primary".into()));
        }
        let Some(version) = h.versions.common_max(&self.cfg.protocol) else {
            let msg = format!(
                "the primary speaks protocol {}, this backup {}: upgrade the older host",
                h.versions, self.cfg.protocol
            );
            Self::refuse(&conn, &mut ctl_tx, REFUSED_VERSION, &msg).await;
            return Ok(SessionEnd::Refused(msg));
        };
        let manifest = match Manifest::decode(&h.manifest) {
            Ok(m) => m,
            Err(e) => {
                let msg = format!("bad manifest: {e}");
                Self::refuse(&conn, &mut ctl_tx, REFUSED_MANIFEST, &msg).await;
                return Ok(SessionEnd::Refused(msg));
            }
        };
        let shape = manifest.shape();
        let same_session = h.session_id == self.session_id
            && self.machine.as_ref().is_some_and(|m| m.vm.shape() == shape)
            && self.committed_epoch() > 0;
        // Validate against a candidate machine; the committed replica (if
        // any) is kept untouched until the manifest is accepted.
        let candidate = if same_session {
            None
        } else {
            match self.machine.as_ref() {
                Some(m) if m.vm.shape() == shape => None,
                _ => Some(ReplicaMachine::new((self.factory)(&shape)?)),
            }
        };
        let check = match (&candidate, &self.machine) {
            (Some(c), _) | (None, Some(c)) => manifest.check_against(&c.vm, &c.parts),
            (None, None) => return Err(BackupError::Protocol("no replica machine".into())),
        };
        if let Err(e) = check {
            let msg = e.to_string();
            Self::refuse(&conn, &mut ctl_tx, REFUSED_MANIFEST, &msg).await;
            return Ok(SessionEnd::Refused(msg));
        }
        if !same_session {
            log::info!(
                "new replication session {:#x} from {} (protocol {version}): {} vCPUs, {} MiB, {} parts, tracker {}",
                h.session_id,
                conn.remote_address(),
                shape.vcpus,
                shape.memory.iter().map(|r| r.size).sum::<u64>() >> 20,
                manifest.parts.len(),
                h.tracker
            );
            if let Some(c) = candidate {
                self.machine = Some(c);
            }
            let Some(m) = self.machine.as_ref() else {
                return Err(BackupError::Protocol("no replica machine".into()));
            };
            self.replica = Some(Replica::new(m.vm.memory().clone(), &shape, m.parts.clone()));
            self.session_id = h.session_id;
        } else {
            log::info!(
                "primary {} resumes session {:#x} from committed epoch {} (protocol {version})",
                conn.remote_address(),
                h.session_id,
                self.committed_epoch()
            );
        }
        let replica = self
            .replica
            .as_mut()
            .ok_or_else(|| BackupError::Protocol("no replica".into()))?;
        replica.expect_any_next();
        let limits = replica.limits().clone();
        conn.set_limits(limits.clone());
        conn.set_version(version);
        ctl_rx.set_limits(limits);
        ctl_tx.set_version(version);
        let reply = Hello {
            versions: VersionRange::only(version),
            role: Role::Backup,
            tracker: h.tracker.clone(),
            epoch_interval_ms: h.epoch_interval_ms,
            session_id: self.session_id,
            resume_from_epoch: replica.committed_epoch(),
            generation: 0,
            manifest: Vec::new(),
        };
        ctl_tx.send(&Frame::new(0, Body::Hello(reply))).await?;
        let data_rx = conn.accept_data().await?;
        let conn = Arc::new(conn);
        let bad_frame: BadFrame = Arc::new(std::sync::Mutex::new(None));
        let mut end = self
            .session(conn.clone(), ctl_tx, ctl_rx, data_rx, bad_frame.clone())
            .await;
        // A malformed frame tears the connection down from both ends; whatever
        // failed first here, the malformed frame is the cause.
        if let Ok(SessionEnd::PrimaryLost(_)) = &end {
            if let Some(why) = bad_frame.lock().unwrap_or_else(|e| e.into_inner()).take() {
                self.status.discarded.fetch_add(1, Ordering::Relaxed);
                end = Ok(SessionEnd::ProtocolError(why));
            }
        }
        match &end {
            Ok(SessionEnd::ProtocolError(why)) => {
                log::warn!(
                    "replication session ended: {why}; keeping committed epoch {}",
                    self.committed_epoch()
                );
                conn.close(2, "checkpoint failed verification");
            }
            Ok(SessionEnd::PrimaryLost(why)) => {
                log::warn!("primary lost: {why}");
                conn.close(1, "primary lost");
            }
            Ok(SessionEnd::Refused(_)) => {}
            Err(_) => conn.close(3, "backup error"),
        }
        end
    }

    async fn session(
        &mut self,
        conn: Arc<Connection>,
        mut ctl_tx: FrameSender,
        ctl_rx: FrameReceiver,
        data_rx: FrameReceiver,
        bad_frame: BadFrame,
    ) -> Result<SessionEnd, BackupError> {
        let mut pending: BTreeMap<u64, EpochAssembler> = BTreeMap::new();
        let start = Instant::now();
        let limits = self
            .replica
            .as_ref()
            .map(|r| r.limits().clone())
            .unwrap_or_default();
        // Liveness is judged by when frames *arrive* (stamped by the reader
        // tasks), not when this loop gets to them: a long commit is not silence.
        let arrived = Arc::new(AtomicU64::new(0));
        let heartbeats = tokio::spawn(heartbeat_sender(
            conn.clone(),
            self.cfg.heartbeat,
            self.status.clone(),
        ));
        let _hb_abort = AbortOnDrop([heartbeats]);
        // Frame reads are not cancel-safe, so each source runs in its own task
        // and the loop below only selects on a channel and timers.
        let (tx, mut events) = tokio::sync::mpsc::channel::<Event>(256);
        let readers = [
            tokio::spawn(forward(
                ctl_rx,
                tx.clone(),
                Event::Control,
                bad_frame.clone(),
                Stamp(arrived.clone(), start),
            )),
            tokio::spawn(forward(
                data_rx,
                tx.clone(),
                Event::Data,
                bad_frame,
                Stamp(arrived.clone(), start),
            )),
            tokio::spawn(forward_datagrams(
                conn.clone(),
                tx,
                Stamp(arrived.clone(), start),
            )),
        ];
        let _abort = AbortOnDrop(readers);
        let mut data_open = true;
        loop {
            let last = Duration::from_nanos(arrived.load(Ordering::Acquire));
            let silence = start.elapsed().saturating_sub(last);
            if silence > self.cfg.peer_timeout {
                return Ok(SessionEnd::PrimaryLost(format!("silent for {silence:?}")));
            }
            // An epoch whose EpochEnd arrived must complete within the peer
            // timeout: a frame cut short on its stream would otherwise stall
            // the pair (the primary waits for acks, we for bytes).
            if let Some((e, d)) = pending
                .iter()
                .find_map(|(e, a)| a.incomplete_for().map(|d| (*e, d)))
                .filter(|(_, d)| *d > self.cfg.peer_timeout)
            {
                let discarded = pending.len() as u64;
                self.status
                    .discarded
                    .fetch_add(discarded, Ordering::Relaxed);
                metrics::counter!("castor_backup_epochs_discarded_total").increment(discarded);
                let why = format!("epoch {e} still incomplete {d:?} after its EpochEnd");
                log::error!(
                    "rejecting the primary's data: {why}; discarding {discarded} partial epoch(s)"
                );
                return Ok(SessionEnd::ProtocolError(why));
            }
            let budget = self
                .cfg
                .peer_timeout
                .saturating_sub(silence)
                .min(self.cfg.heartbeat.max(Duration::from_millis(5)));
            let event = tokio::select! {
                e = events.recv() => e.unwrap_or(Event::Closed),
                _ = tokio::time::sleep(budget) => Event::Tick,
            };
            let frame = match event {
                Event::Tick => continue,
                Event::Closed => return Ok(SessionEnd::PrimaryLost("connection closed".into())),
                Event::Datagram(Ok(_)) => continue,
                Event::Datagram(Err(e)) => {
                    return Ok(SessionEnd::PrimaryLost(format!("datagrams: {e}")))
                }
                Event::Control(Ok(Some(f))) => f,
                Event::Data(Ok(Some(f))) => f,
                Event::Control(Ok(None)) => {
                    return Ok(SessionEnd::PrimaryLost("control stream closed".into()))
                }
                Event::Data(Ok(None)) => {
                    if data_open {
                        data_open = false;
                    }
                    continue;
                }
                Event::Control(Err(e)) | Event::Data(Err(e)) => {
                    let end = lost_or_bad(e);
                    if matches!(end, SessionEnd::ProtocolError(_)) {
                        // The partial epochs buffered, or at least the one the
                        // rejected frame belonged to, are dropped.
                        let n = (pending.len() as u64).max(1);
                        self.status.discarded.fetch_add(n, Ordering::Relaxed);
                        metrics::counter!("castor_backup_epochs_discarded_total").increment(n);
                    }
                    return Ok(end);
                }
            };
            if let Err(e) = self
                .on_frame(&frame, &limits, &mut pending, &mut ctl_tx)
                .await
            {
                let discarded = pending.len() as u64;
                self.status
                    .discarded
                    .fetch_add(discarded, Ordering::Relaxed);
                metrics::counter!("castor_backup_epochs_discarded_total").increment(discarded);
                let msg = e.to_string();
                log::error!(
                    "rejecting the primary's data: {msg}; discarding {discarded} partial epoch(s)"
                );
                let code = match &e {
                    BackupError::Checkpoint(CheckpointError::NotRestorable { .. }) => REFUSED_STATE,
                    _ => REFUSED_DATA,
                };
                let _ = ctl_tx
                    .send(&Frame::new(
                        0,
                        Body::Error(wire::ErrorFrame {
                            code,
                            message: msg.chars().take(1000).collect(),
                        }),
                    ))
                    .await;
                // Let the Error frame reach the primary before the close.
                let _ = ctl_tx.finish();
                let _ = tokio::time::timeout(Duration::from_millis(200), conn.closed()).await;
                return match e {
                    BackupError::Transport(t) => Ok(lost_or_bad(t)),
                    BackupError::Vmm(v) => Err(BackupError::Vmm(v)),
                    other => Ok(SessionEnd::ProtocolError(other.to_string())),
                };
            }
        }
    }

    async fn on_frame(
        &mut self,
        raw: &[u8],
        limits: &wire::Limits,
        pending: &mut BTreeMap<u64, EpochAssembler>,
        ctl_tx: &mut FrameSender,
    ) -> Result<(), BackupError> {
        let replica = self
            .replica
            .as_mut()
            .ok_or_else(|| BackupError::Protocol("no replica".into()))?;
        let (frame, _) = wire::decode(raw, limits).map_err(CheckpointError::from)?;
        let t = frame.header.frame_type;
        match (&frame.body, frame.epoch()) {
            (BodyRef::Heartbeat(_), _) => return Ok(()),
            (BodyRef::Error { code, message }, _) => {
                return Err(BackupError::Protocol(format!(
                    "primary error {code}: {message}"
                )))
            }
            (BodyRef::PageBatch(b), 0) => {
                replica.apply_sync_batch(b)?;
                return Ok(());
            }
            _ if t == FrameType::EpochEnd || t.is_epoch_data() => {}
            _ => {
                return Err(BackupError::Protocol(format!(
                    "unexpected {t:?} frame in a session"
                )))
            }
        }
        let e = frame.epoch();
        if e <= replica.committed_epoch() {
            return Err(BackupError::Protocol(format!(
                "frame of epoch {e}, already committed {}",
                replica.committed_epoch()
            )));
        }
        if !pending.contains_key(&e) && pending.len() >= self.cfg.max_epochs_buffered {
            return Err(BackupError::Protocol(format!(
                "more than {} epochs in flight",
                self.cfg.max_epochs_buffered
            )));
        }
        // One cap for everything buffered, whatever the number of epochs.
        // The worst legitimate epoch carries every page raw: never refuse that.
        let guest_bytes = replica.limits().max_page_count as usize * wire::PAGE_SIZE;
        let cap = self.cfg.max_epoch_bytes.max(guest_bytes + (64 << 20));
        let buffered: usize = pending.values().map(EpochAssembler::buffered_bytes).sum();
        if buffered + raw.len() > cap {
            return Err(CheckpointError::TooLarge { epoch: e, cap }.into());
        }
        let asm = pending
            .entry(e)
            .or_insert_with(|| EpochAssembler::new(e, cap));
        asm.add(&frame, raw)?;
        // Commit, in order, every epoch that is complete.
        while let Some((&first, asm)) = pending.iter().next() {
            match asm.status() {
                None => break,
                Some(Err(err)) => return Err(err.into()),
                Some(Ok(())) => {}
            }
            if !replica.is_next(first) {
                break;
            }
            let Some(asm) = pending.remove(&first) else {
                break;
            };
            let t = Instant::now();
            let info = match replica.commit(&asm, memory_digest) {
                Ok(info) => info,
                Err(e @ CheckpointError::MemoryMismatch { .. }) => {
                    self.status.verify_failures.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("castor_verify_failures_total").increment(1);
                    log::error!("MEMORY VERIFICATION FAILED: {e}");
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
            if info.memory_verified {
                self.status.verified.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("castor_verify_ok_total").increment(1);
            }
            if let Some(log) = self.commit_log.as_mut() {
                log(first);
            }
            self.status.committed.store(first, Ordering::Relaxed);
            self.status.commits.fetch_add(1, Ordering::Relaxed);
            metrics::histogram!("castor_commit_seconds").record(t.elapsed().as_secs_f64());
            metrics::gauge!("castor_committed_epoch").set(first as f64);
            ctl_tx.send(&Frame::new(first, Body::Ack)).await?;
        }
        Ok(())
    }

    /// Takes over: restores the last committed checkpoint into the replica
    /// machine's parts (its memory is already in place) and hands back the
    /// VM, still paused, with the checkpoint's held output for re-emission.
    pub fn take_over(&mut self) -> Result<Takeover, BackupError> {
        let replica = self.replica.as_ref().ok_or(BackupError::NothingCommitted)?;
        let machine = self.machine.as_ref().ok_or(BackupError::NothingCommitted)?;
        if !replica.has_state() {
            return Err(BackupError::NothingCommitted);
        }
        let t = Instant::now();
        replica.restore()?;
        let held = machine.output.restored().unwrap_or_default();
        Ok(Takeover {
            vm: machine.vm.clone(),
            epoch: replica.committed_epoch(),
            output: CommittedOutput {
                items: held.items.into_iter().map(|i| (i.seq, i.data)).collect(),
                next_seq: held.next_seq,
            },
            restore: t.elapsed(),
        })
    }
}

/// What [`Backup::take_over`] returns.
pub struct Takeover {
    /// The restored VM, paused: resume it after re-emitting `output`.
    pub vm: Arc<Vm>,
    /// The epoch it was restored from.
    pub epoch: u64,
    /// The held output of that checkpoint.
    pub output: CommittedOutput,
    /// How long the state restore took.
    pub restore: Duration,
}

enum Event {
    Control(Result<Option<Vec<u8>>, TransportError>),
    Data(Result<Option<Vec<u8>>, TransportError>),
    Datagram(Result<Frame, TransportError>),
    Tick,
    Closed,
}

/// Marks "a frame arrived now" on the session's arrival clock.
struct Stamp(Arc<AtomicU64>, Instant);

impl Stamp {
    fn now(&self) {
        self.0
            .fetch_max(self.1.elapsed().as_nanos() as u64, Ordering::AcqRel);
    }
}

/// Sends a heartbeat datagram every `period`, independently of commits.
async fn heartbeat_sender(conn: Arc<Connection>, period: Duration, status: Arc<BackupStatus>) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let beat = Frame::new(
            0,
            Body::Heartbeat(wire::Heartbeat {
                sent_at_nanos: start.elapsed().as_nanos() as u64,
                last_committed_epoch: status.committed.load(Ordering::Relaxed),
                generation: 0,
            }),
        );
        if conn.send_datagram_frame(&beat).is_err() {
            return;
        }
    }
}

/// The first malformed frame a reader saw, if any.
type BadFrame = Arc<std::sync::Mutex<Option<String>>>;

/// Reads frames from one stream into the event channel until it ends.
async fn forward(
    mut rx: FrameReceiver,
    tx: tokio::sync::mpsc::Sender<Event>,
    wrap: fn(Result<Option<Vec<u8>>, TransportError>) -> Event,
    bad_frame: BadFrame,
    stamp: Stamp,
) {
    loop {
        let r = rx.recv_raw().await;
        stamp.now();
        if let Err(e) = &r {
            if let Some(w) = e.wire_error() {
                log::error!("malformed frame from the primary: {w}");
                metrics::counter!("castor_backup_bad_frames_total").increment(1);
                let mut slot = bad_frame.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert_with(|| format!("malformed frame: {w}"));
            }
        }
        let last = !matches!(r, Ok(Some(_)));
        if tx.send(wrap(r)).await.is_err() || last {
            return;
        }
    }
}

async fn forward_datagrams(
    conn: Arc<Connection>,
    tx: tokio::sync::mpsc::Sender<Event>,
    stamp: Stamp,
) {
    loop {
        let r = conn.recv_datagram_frame().await;
        stamp.now();
        let last = r.is_err();
        if tx.send(Event::Datagram(r)).await.is_err() || last {
            return;
        }
    }
}

struct AbortOnDrop<const N: usize>([tokio::task::JoinHandle<()>; N]);

impl<const N: usize> Drop for AbortOnDrop<N> {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

fn lost_or_bad(e: TransportError) -> SessionEnd {
    match e.wire_error() {
        Some(w) => SessionEnd::ProtocolError(format!("malformed frame: {w}")),
        None => SessionEnd::PrimaryLost(e.to_string()),
    }
}
