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

use crate::checkpoint::{stage_parts, CheckpointEncoder, StagedEpoch};
use crate::manifest::Manifest;
use crate::transport::{Connection, FrameSender, TransportError};
use crate::wire::{self, Body, EpochTally, Frame, Hello, Role, PROTOCOL_VERSIONS};
use castor_net_buffer::OutputBuffer;
use castor_parts::{PartSet, VersionRange};
use castor_vmm::Vm;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use vm_memory::{Bytes, GuestAddress};

/// Page size.
const PAGE: usize = 4096;

/// Errors of the primary pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// The connection to the backup failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The backup spoke out of turn.
    #[error("protocol: {0}")]
    Protocol(String),
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
    /// Stopped on request.
    #[error("stopped")]
    Stopped,
}

/// A fault to inject into one epoch's data frames, inside the encrypted
/// channel (a network proxy cannot alter frames under QUIC's AEAD), to test
/// that the backup rejects them and the pair recovers. Testing only: built
/// with the `fault-injection` feature.
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Flip a byte in the first data frame's payload (CRC mismatch).
    Corrupt,
    /// Send only the first half of the first data frame.
    Truncate,
    /// Send the first data frame twice (tally mismatch).
    Duplicate,
    /// Swap the first two data frames (tolerated: the tally is order-free).
    Reorder,
}

/// When an epoch ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochMode {
    /// Every `epoch_interval`.
    Fixed,
    /// Every `epoch_interval`, and also as soon as the guest has output
    /// waiting (the open epoch of the output buffer is not empty) and
    /// `min_epoch` has passed since the last pause began: held output waits
    /// about one pause + transfer + ack instead of a whole epoch.
    OutputTriggered {
        /// Shortest epoch.
        min_epoch: Duration,
    },
}

/// Primary pipeline settings.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    /// When epochs end (default [`EpochMode::Fixed`]).
    pub epoch_mode: EpochMode,
    /// Testing only: inject `Fault` into the data frames of that epoch (once:
    /// the next session runs clean).
    #[cfg(feature = "fault-injection")]
    pub fault: Option<(u64, Fault)>,
    /// Protocol versions offered at Hello (default: every version this
    /// build speaks; pin to one during a rolling upgrade).
    pub protocol: VersionRange,
    /// Time between pauses.
    pub epoch_interval: Duration,
    /// Epochs sent but not yet acknowledged before the next pause waits.
    pub max_in_flight: usize,
    /// Bytes of last-sent page copies kept for XOR deltas.
    pub cache_bytes: usize,
    /// Every N-th epoch carries a digest of all guest memory (0: never).
    pub verify_memory_every: u64,
    /// Most pre-copy rounds before the first checkpoint.
    pub precopy_max_rounds: u32,
    /// Pre-copy ends when a round finds fewer dirty pages than this.
    pub precopy_stop_pages: usize,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// The backup is lost after this long without any frame from it.
    pub peer_timeout: Duration,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        PrimaryConfig {
            epoch_mode: EpochMode::Fixed,
            epoch_interval: Duration::from_millis(25),
            max_in_flight: 4,
            cache_bytes: 256 << 20,
            verify_memory_every: 0,
            precopy_max_rounds: 8,
            precopy_stop_pages: 2048,
            heartbeat: Duration::from_millis(10),
            peer_timeout: Duration::from_millis(100),
            #[cfg(feature = "fault-injection")]
            fault: None,
            protocol: PROTOCOL_VERSIONS,
        }
    }
}

/// Where released output goes: the outside world.
pub trait Release: Send + Sync {
    /// Items `(seq, bytes)` in sequence order, released because the backup
    /// acknowledged epoch `epoch` (every item belongs to an epoch `<= epoch`).
    /// `epoch == 0` means the output is released unprotected (no backup).
    fn release(&self, epoch: u64, items: &[(u64, Vec<u8>)]);
}

/// One epoch's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpochSample {
    /// The epoch.
    pub epoch: u64,
    /// Time the guest was paused for it.
    pub pause: Duration,
    /// Dirty pages staged.
    pub dirty_pages: u64,
    /// Bytes of frames sent for it.
    pub wire_bytes: u64,
    /// Pause to Ack; `None` until acknowledged.
    pub ack_latency: Option<Duration>,
}

/// Most epoch samples kept.
pub const HISTORY: usize = 1 << 16;

/// Live figures of the pipeline (for status displays; metrics go to `metrics`).
#[derive(Debug, Default)]
pub struct PrimaryStatus {
    /// The last [`HISTORY`] epochs' figures, oldest first.
    pub history: Mutex<VecDeque<EpochSample>>,
    /// Last epoch staged.
    pub epoch: AtomicU64,
    /// Last epoch acknowledged.
    pub acked: AtomicU64,
    /// Last pause, in microseconds.
    pub last_pause_us: AtomicU64,
    /// Last ack latency (pause to ack), in microseconds.
    pub last_ack_us: AtomicU64,
    /// Dirty pages of the last epoch.
    pub last_dirty_pages: AtomicU64,
    /// Bytes sent on the wire so far.
    pub wire_bytes: AtomicU64,
    /// Dirty bytes (pages x 4 KiB) staged so far.
    pub dirty_bytes: AtomicU64,
    /// Whether the initial synchronisation is done (the guest is protected).
    pub protected: AtomicBool,
}

struct AckBoard {
    acked: Mutex<u64>,
    cv: Condvar,
    sent_at: Mutex<VecDeque<(u64, Instant)>>,
    last_heard: Mutex<Instant>,
    failed: Mutex<Option<String>>,
}

impl AckBoard {
    fn acked(&self) -> u64 {
        *self.acked.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn fail(&self, why: String) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
        self.cv.notify_all();
    }
    fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
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
        let manifest = Manifest::of(&self.vm, &self.parts)
            .encode()
            .map_err(|e| PrimaryError::Protocol(format!("manifest: {e}")))?;
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
            .map_err(|_| PrimaryError::Protocol("no Hello from the backup within 10 s".into()))??
            .ok_or_else(|| PrimaryError::Protocol("control stream closed before Hello".into()))?;
        let theirs = match reply.body {
            Body::Hello(h) if h.role == Role::Backup => h,
            Body::Error(e) if e.code == crate::backup::REFUSED_VERSION => {
                return Err(PrimaryError::Refused {
                    code: e.code,
                    message: e.message,
                })
            }
            Body::Error(e) if e.code == crate::backup::REFUSED_MANIFEST => {
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
            other => {
                return Err(PrimaryError::Protocol(format!(
                    "expected the backup's Hello, got {:?}",
                    other.frame_type()
                )))
            }
        };
        // The backup answers with the one version it chose from our range.
        let version = theirs.versions.max;
        if theirs.versions.min != version || !self.cfg.protocol.contains(version) {
            return Err(PrimaryError::Protocol(format!(
                "the backup chose protocol {} outside our {}",
                theirs.versions, self.cfg.protocol
            )));
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
            cv: Condvar::new(),
            sent_at: Mutex::new(VecDeque::new()),
            last_heard: Mutex::new(Instant::now()),
            failed: Mutex::new(None),
        });
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
        self.acked = self.acked.max(board.acked());
        conn.close(0, "primary session ended");
        result
    }

    fn run_session(
        &mut self,
        incremental: bool,
        backup_committed: u64,
        out: &tokio::sync::mpsc::Sender<Outgoing>,
        board: &Arc<AckBoard>,
    ) -> Result<(), PrimaryError> {
        // Pages the first checkpoint must carry besides its own dirty set:
        // after a reconnection, every page of the epochs the backup has not
        // committed; after a pre-copy, the pages its last round left unsent.
        let mut extra: BTreeSet<u64> = BTreeSet::new();
        if incremental {
            for (e, pages) in &self.unacked_dirty {
                if *e > backup_committed {
                    extra.extend(pages.iter().copied());
                }
            }
        } else {
            // Epoch numbers keep increasing across sessions (the output buffer's
            // epochs do too); a fresh backup takes any first epoch. Output held
            // from an earlier session stays held until this backup commits.
            self.unacked_dirty.clear();
            extra.extend(self.precopy(out, board)?);
        }
        let mut next = Instant::now();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(PrimaryError::Stopped);
            }
            next += self.cfg.epoch_interval;
            let now = Instant::now();
            if next > now {
                match self.cfg.epoch_mode {
                    EpochMode::Fixed => std::thread::sleep(next - now),
                    EpochMode::OutputTriggered { min_epoch } => {
                        // End the epoch at its deadline, or earlier once output
                        // waits and min_epoch has passed (woken by the push).
                        let earliest = (self.paused_at + min_epoch).min(next);
                        if earliest > now {
                            std::thread::sleep(earliest - now);
                        }
                        if self.output.wait_for_open_output(next) {
                            // Early: the next deadline counts from this pause.
                            next = Instant::now();
                        }
                    }
                }
            } else {
                next = now;
            }
            self.wait_for_room(board)?;
            self.take_acks(board)?;
            let staged = self.stage_epoch(&extra)?;
            extra.clear();
            self.unacked_dirty
                .push_back((staged.epoch, staged.pages.clone()));
            let mut data = Vec::with_capacity(staged.pages.len() * PAGE / 4 + 4096);
            let mut end = Vec::with_capacity(128);
            let enc = self.encoder.encode_epoch(&staged, &mut data, &mut end);
            self.staging = staged.data;
            let enc = enc?;
            self.status
                .wire_bytes
                .fetch_add(enc.wire_bytes, Ordering::Relaxed);
            {
                let mut h = self
                    .status
                    .history
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if h.len() >= HISTORY {
                    h.pop_front();
                }
                h.push_back(EpochSample {
                    epoch: staged.epoch,
                    pause: Duration::from_micros(self.status.last_pause_us.load(Ordering::Relaxed)),
                    dirty_pages: enc.pages,
                    wire_bytes: enc.wire_bytes,
                    ack_latency: None,
                });
            }
            metrics::counter!("castor_wire_bytes_total").increment(enc.wire_bytes);
            metrics::counter!("castor_dirty_bytes_total").increment(enc.pages * PAGE as u64);
            if enc.pages > 0 {
                metrics::gauge!("castor_compression_ratio")
                    .set(enc.wire_bytes as f64 / (enc.pages * PAGE as u64) as f64);
            }
            if out
                .blocking_send(Outgoing {
                    epoch: staged.epoch,
                    paused_at: self.paused_at,
                    data,
                    end,
                })
                .is_err()
            {
                return Err(self.session_failure(board));
            }
        }
    }

    fn session_failure(&self, board: &AckBoard) -> PrimaryError {
        match board.failure() {
            Some(why) => PrimaryError::Protocol(why),
            None => PrimaryError::Protocol("the sender stopped".into()),
        }
    }

    /// Blocks until fewer than `max_in_flight` epochs are unacknowledged.
    fn wait_for_room(&mut self, board: &AckBoard) -> Result<(), PrimaryError> {
        let mut acked = board.acked.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(why) = board.failure() {
                return Err(PrimaryError::Protocol(why));
            }
            let silent = board
                .last_heard
                .lock()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            if silent > self.cfg.peer_timeout {
                return Err(PrimaryError::PeerSilent(silent));
            }
            if self.epoch.saturating_sub(*acked) < self.cfg.max_in_flight as u64 {
                return Ok(());
            }
            acked = board
                .cv
                .wait_timeout(acked, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn take_acks(&mut self, board: &AckBoard) -> Result<(), PrimaryError> {
        let a = board.acked();
        if a > self.acked {
            self.acked = a;
            while self.unacked_dirty.front().is_some_and(|(e, _)| *e <= a) {
                self.unacked_dirty.pop_front();
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, epoch: u64) -> Result<(), PrimaryError> {
        if epoch > self.acked {
            let released = self.output.release_through(epoch)?;
            let items: Vec<(u64, Vec<u8>)> =
                released.iter().map(|i| (i.seq, i.data.clone())).collect();
            if !items.is_empty() {
                self.release.release(epoch, &items);
            }
            self.acked = epoch;
            self.status.acked.store(epoch, Ordering::Relaxed);
            while self.unacked_dirty.front().is_some_and(|(e, _)| *e <= epoch) {
                self.unacked_dirty.pop_front();
            }
        }
        Ok(())
    }

    /// Pause, harvest, copy, capture, seal, resume.
    /// `extra`: pages to carry besides the harvested ones (copied in the pause).
    fn stage_epoch(&mut self, extra: &BTreeSet<u64>) -> Result<StagedEpoch, PrimaryError> {
        let epoch = self.epoch + 1;
        let verify =
            self.cfg.verify_memory_every > 0 && epoch.is_multiple_of(self.cfg.verify_memory_every);
        let t0 = Instant::now();
        self.paused_at = t0;
        let mut data = std::mem::take(&mut self.staging);
        self.vm.pause();
        let staged = (|| -> Result<StagedEpoch, PrimaryError> {
            let mut pages = dirty_pages(&self.vm.harvest_dirty()?);
            if !extra.is_empty() {
                let mut all: BTreeSet<u64> = extra.clone();
                all.extend(pages.iter().copied());
                pages = all.into_iter().collect();
            }
            let need = pages.len() * PAGE;
            if data.len() < need {
                data.resize(need, 0);
            }
            copy_pages(&self.vm, &pages, &mut data[..need])?;
            // Seal first: the output part stages the buffer's position after it.
            self.output.seal(epoch)?;
            let sections = stage_parts(&self.parts)?;
            // Output that passed through unprotected (no backup yet, or just
            // after a takeover) is part of this checkpoint's history: from
            // here on it is held again. Done in the pause, so the guest's
            // network is not stalled for the whole initial synchronisation.
            if self.output.is_unprotected() {
                let _ = self.output.set_unprotected(false);
            }
            let memory_digest = verify.then(|| memory_digest(self.vm.memory()));
            Ok(StagedEpoch {
                epoch,
                pages,
                data: std::mem::take(&mut data),
                sections,
                memory_digest,
            })
        })();
        self.vm.resume();
        let pause = t0.elapsed();
        // Everything sealed and not yet acknowledged travels in this
        // checkpoint (the output part), so the backup can re-emit it
        // whatever the primary released.
        let staged = staged?;
        self.epoch = epoch;
        self.status.epoch.store(epoch, Ordering::Relaxed);
        self.status
            .last_pause_us
            .store(pause.as_micros() as u64, Ordering::Relaxed);
        self.status
            .last_dirty_pages
            .store(staged.pages.len() as u64, Ordering::Relaxed);
        self.status
            .dirty_bytes
            .fetch_add((staged.pages.len() * PAGE) as u64, Ordering::Relaxed);
        metrics::histogram!("castor_pause_seconds").record(pause.as_secs_f64());
        metrics::histogram!("castor_dirty_pages").record(staged.pages.len() as f64);
        metrics::counter!("castor_epochs_total").increment(1);
        metrics::gauge!("castor_held_output_bytes").set(self.output.held_bytes() as f64);
        Ok(staged)
    }

    /// Iterative pre-copy while the guest runs.
    /// Returns the pages the last round found dirty and did not send.
    fn precopy(
        &mut self,
        out: &tokio::sync::mpsc::Sender<Outgoing>,
        board: &AckBoard,
    ) -> Result<Vec<u64>, PrimaryError> {
        // Start tracking from a clean slate, then send everything.
        self.vm.pause();
        let started = self.vm.start_dirty_tracking();
        self.vm.resume();
        started?;
        let total_pages = self.vm.shape().memory_end() / PAGE as u64;
        let mut round_pages: Vec<u64> = (0..total_pages).collect();
        for round in 0..=self.cfg.precopy_max_rounds {
            let t = Instant::now();
            let mut bytes = 0u64;
            for chunk in round_pages.chunks(4096) {
                let mut data = vec![0u8; chunk.len() * PAGE];
                copy_pages(&self.vm, chunk, &mut data)?;
                let mut buf = Vec::with_capacity(data.len() / 2);
                let mut tally = EpochTally::new(0);
                self.encoder
                    .encode_pages(0, chunk, &data, &mut buf, &mut tally)?;
                bytes += buf.len() as u64;
                if out
                    .blocking_send(Outgoing {
                        epoch: 0,
                        paused_at: Instant::now(),
                        data: buf,
                        end: Vec::new(),
                    })
                    .is_err()
                {
                    return Err(self.session_failure(board));
                }
            }
            log::info!(
                "pre-copy round {round}: {} pages, {} KiB on the wire, {:?}",
                round_pages.len(),
                bytes >> 10,
                t.elapsed()
            );
            self.status.wire_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.vm.pause();
            let dirty = self.vm.harvest_dirty();
            self.vm.resume();
            round_pages = dirty_pages(&dirty?);
            if round_pages.len() < self.cfg.precopy_stop_pages {
                break;
            }
        }
        Ok(round_pages)
    }
}

/// Page numbers (guest-physical address / 4 KiB) of a dirty set, ascending.
pub fn dirty_pages(set: &castor_vmm::DirtySet) -> Vec<u64> {
    let mut v = Vec::with_capacity(set.count() as usize);
    v.extend(set.iter().map(|gpa| gpa / PAGE as u64));
    v
}

/// Copies `pages` (ascending page numbers) into `out`, one call per run.
pub fn copy_pages(vm: &Vm, pages: &[u64], out: &mut [u8]) -> Result<(), PrimaryError> {
    let mem = vm.memory();
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[j - 1] + 1 {
            j += 1;
        }
        mem.read_slice(
            &mut out[i * PAGE..j * PAGE],
            GuestAddress(pages[i] * PAGE as u64),
        )
        .map_err(|e| {
            PrimaryError::Vmm(castor_vmm::Error::Memory(format!(
                "copying pages {}..{}: {e}",
                pages[i],
                pages[j - 1] + 1
            )))
        })?;
        i = j;
    }
    Ok(())
}

/// BLAKE3 digest of all guest memory, regions in address order.
pub fn memory_digest(mem: &castor_vmm::GuestMemoryMmap) -> [u8; 32] {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for r in mem.iter() {
        let mut off = 0u64;
        while off < r.len() {
            let n = ((r.len() - off) as usize).min(buf.len());
            if mem
                .read_slice(&mut buf[..n], GuestAddress(r.start_addr().0 + off))
                .is_err()
            {
                buf[..n].fill(0xee);
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    *h.finalize().as_bytes()
}

struct Outgoing {
    epoch: u64,
    /// When the guest was paused for this epoch (ack latency runs from here).
    paused_at: Instant,
    data: Vec<u8>,
    end: Vec<u8>,
}

async fn send_task(
    mut data_tx: FrameSender,
    mut ctl_tx: FrameSender,
    mut rx: tokio::sync::mpsc::Receiver<Outgoing>,
    board: Arc<AckBoard>,
    #[cfg(feature = "fault-injection")] fault: Option<(u64, Fault)>,
) {
    #[allow(unused_mut)]
    while let Some(mut o) = rx.recv().await {
        #[cfg(feature = "fault-injection")]
        if let Some((at, f)) = fault {
            if o.epoch == at && !o.end.is_empty() {
                log::warn!("fault injection: {f:?} in epoch {at}'s data frames");
                o.data = inject(f, o.data);
            }
        }
        if !o.end.is_empty() {
            board
                .sent_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back((o.epoch, o.paused_at));
        }
        if let Err(e) = data_tx.send_encoded(&o.data).await {
            board.fail(format!("sending epoch {} data: {e}", o.epoch));
            return;
        }
        if !o.end.is_empty() {
            if let Err(e) = ctl_tx.send_encoded(&o.end).await {
                board.fail(format!("sending epoch {} end: {e}", o.epoch));
                return;
            }
        }
    }
    let _ = data_tx.finish();
}

async fn ack_task(
    mut ctl_rx: crate::transport::FrameReceiver,
    board: Arc<AckBoard>,
    output: Arc<OutputBuffer>,
    release: Arc<dyn Release>,
    status: Arc<PrimaryStatus>,
) {
    loop {
        let frame = match ctl_rx.recv_owned().await {
            Ok(Some(f)) => f,
            Ok(None) => {
                board.fail("the backup closed the control stream".into());
                return;
            }
            Err(e) => {
                board.fail(format!("control stream: {e}"));
                return;
            }
        };
        *board.last_heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        match frame.body {
            Body::Ack => {
                let e = frame.epoch;
                let mut acked = board.acked.lock().unwrap_or_else(|e| e.into_inner());
                if e <= *acked {
                    continue;
                }
                match output.release_through(e) {
                    Ok(released) => {
                        let items: Vec<(u64, Vec<u8>)> =
                            released.iter().map(|i| (i.seq, i.data.clone())).collect();
                        if !items.is_empty() {
                            release.release(e, &items);
                        }
                    }
                    Err(err) => {
                        board.fail(format!("ack of epoch {e}: {err}"));
                        return;
                    }
                }
                *acked = e;
                status.acked.store(e, Ordering::Relaxed);
                status.protected.store(true, Ordering::Relaxed);
                let mut sent = board.sent_at.lock().unwrap_or_else(|e| e.into_inner());
                while let Some(&(se, at)) = sent.front() {
                    if se > e {
                        break;
                    }
                    sent.pop_front();
                    if se == e {
                        let lat = at.elapsed();
                        status
                            .last_ack_us
                            .store(lat.as_micros() as u64, Ordering::Relaxed);
                        metrics::histogram!("castor_ack_latency_seconds").record(lat.as_secs_f64());
                    }
                }
                board.cv.notify_all();
            }
            Body::Heartbeat(_) => {}
            Body::Error(err) => {
                board.fail(format!("backup error {}: {}", err.code, err.message));
                return;
            }
            other => {
                board.fail(format!(
                    "unexpected {:?} from the backup",
                    other.frame_type()
                ));
                return;
            }
        }
    }
}

async fn heartbeat_task(
    conn: Arc<Connection>,
    period: Duration,
    board: Arc<AckBoard>,
    status: Arc<PrimaryStatus>,
) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let hb = Frame::new(
            0,
            Body::Heartbeat(wire::Heartbeat {
                sent_at_nanos: start.elapsed().as_nanos() as u64,
                last_committed_epoch: status.acked.load(Ordering::Relaxed),
                generation: 0,
            }),
        );
        if let Err(e) = conn.send_datagram_frame(&hb) {
            board.fail(format!("heartbeat: {e}"));
            return;
        }
    }
}

/// The backup's heartbeat datagrams are signs of life.
async fn heartbeat_listener(conn: Arc<Connection>, board: Arc<AckBoard>) {
    while conn.recv_datagram_frame().await.is_ok() {
        *board.last_heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

/// Applies a [`Fault`] to a buffer of whole frames.
#[cfg(feature = "fault-injection")]
fn inject(fault: Fault, data: Vec<u8>) -> Vec<u8> {
    let limits = wire::Limits {
        max_payload: u32::MAX,
        ..Default::default()
    };
    let mut bounds = Vec::new();
    let mut off = 0;
    while off < data.len() {
        match wire::Header::parse(&data[off..], &limits) {
            Ok(h) => {
                bounds.push((off, off + h.frame_len()));
                off += h.frame_len();
            }
            Err(_) => break,
        }
    }
    let Some(&(a0, a1)) = bounds.first() else {
        return data;
    };
    match fault {
        Fault::Corrupt => {
            let mut d = data;
            let i = (a0 + wire::HEADER_LEN + 4).min(a1 - 1);
            d[i] ^= 0xa5;
            d
        }
        Fault::Truncate => {
            let mut d = data[..a0 + (a1 - a0) / 2].to_vec();
            d.extend_from_slice(&data[a1..]);
            d
        }
        Fault::Duplicate => {
            let mut d = data[a0..a1].to_vec();
            d.extend_from_slice(&data);
            d
        }
        Fault::Reorder => match bounds.get(1) {
            Some(&(b0, b1)) => {
                let mut d = data[b0..b1].to_vec();
                d.extend_from_slice(&data[a0..a1]);
                d.extend_from_slice(&data[b1..]);
                d
            }
            None => data,
        },
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
