//! One session's event loop: frames and datagrams read by their own tasks
//! (frame reads are not cancel-safe), arrival-stamped liveness, the bound on
//! an epoch left incomplete after its EpochEnd.

use super::*;
use crate::checkpoint::EpochAssembler;
use crate::transport::{Connection, FrameReceiver, FrameSender, TransportError};
use crate::wire::{self, Body, Frame};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

impl Backup {
    pub(super) async fn session(
        &mut self,
        conn: Arc<Connection>,
        mut ctl_tx: FrameSender,
        ctl_rx: FrameReceiver,
        data_rx: FrameReceiver,
        bad_frame: BadFrame,
        (start, arrived): (Instant, Arc<AtomicU64>),
    ) -> Result<SessionEnd, BackupError> {
        let mut pending: BTreeMap<u64, EpochAssembler> = BTreeMap::new();
        let limits = self
            .replica
            .as_ref()
            .map(|r| r.limits().clone())
            .unwrap_or_default();
        // Liveness is judged by when frames *arrive* (stamped by the reader
        // tasks), not when this loop gets to them: a long commit is not silence.
        let heartbeats = tokio::spawn(heartbeat_sender(
            conn.clone(),
            self.cfg.heartbeat,
            self.status.clone(),
        ));
        let _hb_abort = AbortOnDrop([heartbeats]);
        // Frame reads are not cancel-safe, so each source runs in its own task
        // and the loop below only selects on a channel and timers.
        // The queue is bounded in bytes (frames hold permits until the loop
        // is done with them) as well as in entries (datagrams are small).
        let (tx, mut events) = tokio::sync::mpsc::channel::<Event>(256);
        let queued = Arc::new(Semaphore::new(queue_bytes(&self.cfg, &limits)));
        let readers = [
            tokio::spawn(forward(
                ctl_rx,
                tx.clone(),
                Event::Control,
                bad_frame.clone(),
                Stamp(arrived.clone(), start),
                queued.clone(),
            )),
            tokio::spawn(forward(
                data_rx,
                tx.clone(),
                Event::Data,
                bad_frame,
                Stamp(arrived.clone(), start),
                queued,
            )),
            tokio::spawn(forward_datagrams(
                conn.clone(),
                tx.clone(),
                Stamp(arrived.clone(), start),
            )),
            tokio::spawn(forward_port_closed(
                conn.remote_address(),
                self.cfg.heartbeat,
                tx,
            )),
        ];
        let _abort = AbortOnDrop(readers);
        let mut data_open = true;
        loop {
            let last = Duration::from_nanos(arrived.load(Ordering::Acquire));
            let silence = start.elapsed().saturating_sub(last);
            if silence > self.cfg.peer_timeout {
                return Ok(SessionEnd::PrimaryLost(Lost::Silent(silence)));
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
                let why = BackupError::IncompleteEpoch {
                    epoch: e,
                    waited: d,
                };
                log::error!(
                    "rejecting the primary's data: {why}; discarding {discarded} partial epoch(s)"
                );
                return Ok(SessionEnd::ProtocolError(Box::new(why)));
            }
            let budget = self
                .cfg
                .peer_timeout
                .saturating_sub(silence)
                .min(self.cfg.heartbeat.max(Duration::from_millis(5)));
            let event = tokio::select! {
                e = events.recv() => e.unwrap_or(Event::Closed),
                _ = self.detach.requested() => Event::Detach,
                _ = tokio::time::sleep(budget) => Event::Tick,
            };
            let frame = match event {
                Event::Tick => continue,
                Event::PortClosed => {
                    log::warn!(
                        "the primary's host reports its port {} closed: the primary's process died",
                        conn.remote_address()
                    );
                    return Ok(SessionEnd::PrimaryLost(Lost::PortClosed));
                }
                Event::Detach => {
                    self.say_goodbye(&conn, &mut ctl_tx).await;
                    return Ok(SessionEnd::Detached);
                }
                Event::Closed => return Ok(SessionEnd::PrimaryLost(Lost::ConnectionClosed)),
                Event::Datagram(Ok(_)) => continue,
                // A malformed datagram from a live primary is a protocol
                // error (resync), never a loss (takeover).
                Event::Datagram(Err(e)) => return Ok(lost_or_bad(e)),
                Event::Control(Ok(Some(f))) => f,
                Event::Data(Ok(Some(f))) => f,
                Event::Control(Ok(None)) => {
                    return Ok(SessionEnd::PrimaryLost(Lost::ControlStreamClosed))
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
                .on_frame(&frame.bytes, &limits, &mut pending, &mut ctl_tx)
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
                    BackupError::Checkpoint(CheckpointError::NotRestorable { .. }) => {
                        ErrorCode::NotRestorable
                    }
                    BackupError::Checkpoint(CheckpointError::MemoryMismatch { .. }) => {
                        ErrorCode::Diverged
                    }
                    _ => ErrorCode::BadData,
                }
                .as_u16();
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
                    other => Ok(SessionEnd::ProtocolError(Box::new(other))),
                };
            }
        }
    }
}

enum Event {
    /// A planned detach was requested.
    Detach,
    /// The primary's host reported its port closed.
    PortClosed,
    Control(Result<Option<Queued>, TransportError>),
    Data(Result<Option<Queued>, TransportError>),
    Datagram(Result<Frame, TransportError>),
    Tick,
    Closed,
}

impl Backup {
    /// Tells the primary this backup leaves on purpose (an `Error` frame
    /// with `ErrorCode::Detach`, the stream finished, the connection closed
    /// with the same code once the primary had a moment to read it).
    async fn say_goodbye(&self, conn: &Connection, ctl_tx: &mut FrameSender) {
        log::warn!(
            "detaching on purpose: telling the primary at {} to run on unprotected",
            conn.remote_address()
        );
        let _ = ctl_tx
            .send(&Frame::new(
                0,
                Body::Error(wire::ErrorFrame {
                    code: ErrorCode::Detach.as_u16(),
                    message:
                        "the backup is detaching on purpose (maintenance); it will not take over"
                            .into(),
                }),
            ))
            .await;
        let _ = ctl_tx.finish();
        // The primary closes the connection when it reads the goodbye.
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
        conn.close(ErrorCode::Detach.close_code(), "detached");
    }
}

/// A frame read off a stream, holding its bytes' share of the queue bound
/// until the session loop drops it.
struct Queued {
    bytes: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

/// Bytes of frames the readers may queue: the configured bound, but never
/// less than one largest frame (a reader would wait forever for it).
fn queue_bytes(cfg: &BackupConfig, limits: &wire::Limits) -> usize {
    let largest = wire::HEADER_LEN + limits.max_payload as usize;
    cfg.max_queued_bytes.max(largest)
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
pub(super) type BadFrame = Arc<std::sync::Mutex<Option<wire::WireError>>>;

/// Reads frames from one stream into the event channel until it ends.
async fn forward(
    mut rx: FrameReceiver,
    tx: tokio::sync::mpsc::Sender<Event>,
    wrap: fn(Result<Option<Queued>, TransportError>) -> Event,
    bad_frame: BadFrame,
    stamp: Stamp,
    queued: Arc<Semaphore>,
) {
    loop {
        let r = rx.recv_raw().await;
        stamp.now();
        // Wait for room before queueing: a peer that sends faster than the
        // loop commits is held back by QUIC flow control, not by our memory.
        let r = match r {
            Ok(Some(bytes)) => {
                let n = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                match queued.clone().acquire_many_owned(n).await {
                    Ok(permit) => Ok(Some(Queued {
                        bytes,
                        _permit: permit,
                    })),
                    Err(_) => return,
                }
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        if let Err(e) = &r {
            if let Some(w) = e.wire_error() {
                log::error!("malformed frame from the primary: {w}");
                metrics::counter!("castor_backup_bad_frames_total").increment(1);
                let mut slot = bad_frame.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert_with(|| w.clone());
            }
        }
        let last = !matches!(r, Ok(Some(_)));
        if tx.send(wrap(r)).await.is_err() || last {
            return;
        }
    }
}

/// Reports the primary's port closed (see `probe`), once.
async fn forward_port_closed(
    peer: std::net::SocketAddr,
    period: Duration,
    tx: tokio::sync::mpsc::Sender<Event>,
) {
    if super::probe::port_closed(peer, period).await {
        let _ = tx.send(Event::PortClosed).await;
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
    if e.is_protocol_error() {
        SessionEnd::ProtocolError(Box::new(BackupError::Transport(e)))
    } else {
        SessionEnd::PrimaryLost(Lost::Transport(e))
    }
}
