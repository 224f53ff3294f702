//! The session's tasks beside the epoch thread: the sender (data frames on
//! the data stream, `EpochEnd` on the control stream), the ack reader (which
//! releases output), and the heartbeats both ways.

#[cfg(feature = "fault-injection")]
use super::fault::{inject, Fault};
use super::{PrimaryError, PrimaryStatus, Release};
use crate::transport::{Connection, FrameSender};
use crate::wire::{self, Body, Frame};
use castor_net_buffer::{HeldItem, OutputBuffer};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub(super) struct AckBoard {
    /// Flow control: the last epoch acked or counted as acked (epochs of a
    /// dead session are never acked one by one).
    pub(super) acked: Mutex<u64>,
    /// The last epoch the backup really committed (from its Hello or an Ack).
    pub(super) committed: std::sync::atomic::AtomicU64,
    pub(super) cv: Condvar,
    pub(super) sent_at: Mutex<VecDeque<(u64, Instant)>>,
    pub(super) last_heard: Mutex<Instant>,
    pub(super) failed: Mutex<Option<PrimaryError>>,
    /// Self-fencing: when this primary last sent a heartbeat (nanoseconds
    /// since `born`), and whether it was ever silent for longer than
    /// `fence_after` (the process stopped or starved: the backup may have
    /// taken over, so nothing may be released any more in this session).
    pub(super) fence: Fence,
}

/// A primary that was silent for about the backup's timeout (SIGSTOP, a
/// starved process, a frozen host) cannot know whether its backup took
/// over. It must then release nothing more: not even output the backup
/// acked, since a backup that took over already re-emitted it and then
/// moved on. The heartbeat task marks the gap; the ack task checks it
/// before each release.
pub(super) struct Fence {
    born: Instant,
    last_sent_ns: std::sync::atomic::AtomicU64,
    silenced_ns: std::sync::atomic::AtomicU64,
    after: Duration,
}

impl Fence {
    /// A fence for a session whose backup takes over after `peer_timeout`
    /// of silence: it closes after three quarters of that (the rest is the
    /// margin for the heartbeat's flight and the backup's own clock).
    pub(super) fn new(peer_timeout: Duration) -> Self {
        Fence {
            born: Instant::now(),
            last_sent_ns: std::sync::atomic::AtomicU64::new(0),
            silenced_ns: std::sync::atomic::AtomicU64::new(0),
            after: peer_timeout * 3 / 4,
        }
    }

    fn now_ns(&self) -> u64 {
        self.born.elapsed().as_nanos() as u64
    }

    /// A heartbeat is about to go out: records the gap since the last one
    /// (first the verdict, then the new time, so a reader that sees the new
    /// time also sees the verdict).
    fn sending(&self) {
        let now = self.now_ns();
        let gap = now.saturating_sub(self.last_sent_ns.load(Ordering::SeqCst));
        if Duration::from_nanos(gap) > self.after {
            self.silenced_ns.fetch_max(gap, Ordering::SeqCst);
        }
        self.last_sent_ns.store(now, Ordering::SeqCst);
    }

    /// `Some(gap)` if this primary has been silent for too long, now or at
    /// any time in this session.
    pub(super) fn silenced(&self) -> Option<Duration> {
        // The time first, then the verdict (see `sending`).
        let gap = self
            .now_ns()
            .saturating_sub(self.last_sent_ns.load(Ordering::SeqCst));
        let marked = self.silenced_ns.load(Ordering::SeqCst);
        let worst = Duration::from_nanos(gap.max(marked));
        (worst > self.after).then_some(worst)
    }
}

impl AckBoard {
    pub(super) fn fail(&self, why: PrimaryError) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
        self.cv.notify_all();
    }
    /// Whether a task recorded a failure.
    pub(super) fn has_failed(&self) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The first recorded failure (taken: asked once, when the session ends).
    pub(super) fn take_failure(&self) -> PrimaryError {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or(PrimaryError::SenderStopped)
    }
}

pub(super) struct Outgoing {
    pub(super) epoch: u64,
    /// When the guest was paused for this epoch (ack latency runs from here).
    pub(super) paused_at: Instant,
    pub(super) data: Vec<u8>,
    pub(super) end: Vec<u8>,
}

pub(super) async fn send_task(
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
            board.fail(PrimaryError::Send {
                epoch: o.epoch,
                source: e,
            });
            return;
        }
        if !o.end.is_empty() {
            if let Err(e) = ctl_tx.send_encoded(&o.end).await {
                board.fail(PrimaryError::Send {
                    epoch: o.epoch,
                    source: e,
                });
                return;
            }
        }
    }
    let _ = data_tx.finish();
}

pub(super) async fn ack_task(
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
                board.fail(PrimaryError::ControlClosed);
                return;
            }
            Err(e) => {
                board.fail(PrimaryError::Transport(e));
                return;
            }
        };
        *board.last_heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        match frame.body {
            Body::Ack => {
                let e = frame.epoch;
                // Acks arrive in order on this one task: check, then release
                // without holding the flow-control lock (a slow write must
                // never stall the epoch thread's next pause).
                if e <= *board.acked.lock().unwrap_or_else(|e| e.into_inner()) {
                    continue;
                }
                // Write out first, then drop from the buffer: until written,
                // the items stay in every checkpoint staged meanwhile.
                let items: Vec<HeldItem> = output
                    .peek_through(e)
                    .into_iter()
                    .map(|i| HeldItem {
                        seq: i.seq,
                        data: i.data,
                    })
                    .collect();
                #[cfg(feature = "fault-injection")]
                super::fault::stop_at_ack(e);
                // Self-fencing: after a silence the backup may have taken
                // over (and re-emitted these): release nothing more.
                if let Some(gap) = board.fence.silenced() {
                    log::error!(
                        "this primary was silent for {gap:?} (stopped or starved): the backup may have taken over; fencing: no output is released from now on in this session"
                    );
                    metrics::counter!("castor_primary_fenced_total").increment(1);
                    board.fail(PrimaryError::Fenced(gap));
                    return;
                }
                if !items.is_empty() {
                    release.release(e, &items);
                }
                if let Err(err) = output.release_through(e) {
                    board.fail(PrimaryError::Output(err));
                    return;
                }
                board.committed.fetch_max(e, Ordering::AcqRel);
                {
                    let mut acked = board.acked.lock().unwrap_or_else(|e| e.into_inner());
                    *acked = (*acked).max(e);
                }
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
            Body::Error(err) if err.code == wire::ErrorCode::Detach.as_u16() => {
                log::warn!("the backup detaches on purpose: {}", err.message);
                board.fail(PrimaryError::Detached);
                return;
            }
            Body::Error(err) => {
                board.fail(PrimaryError::Peer {
                    code: err.code,
                    message: err.message,
                });
                return;
            }
            other => {
                board.fail(PrimaryError::UnexpectedFrame(other.frame_type()));
                return;
            }
        }
    }
}

pub(super) async fn heartbeat_task(
    conn: Arc<Connection>,
    period: Duration,
    board: Arc<AckBoard>,
    status: Arc<PrimaryStatus>,
) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        board.fence.sending();
        let hb = Frame::new(
            0,
            Body::Heartbeat(wire::Heartbeat {
                sent_at_nanos: start.elapsed().as_nanos() as u64,
                last_committed_epoch: status.acked.load(Ordering::Relaxed),
                generation: 0,
            }),
        );
        if let Err(e) = conn.send_datagram_frame(&hb) {
            board.fail(PrimaryError::Transport(e));
            return;
        }
    }
}

/// The backup's heartbeat datagrams are signs of life.
pub(super) async fn heartbeat_listener(conn: Arc<Connection>, board: Arc<AckBoard>) {
    while conn.recv_datagram_frame().await.is_ok() {
        *board.last_heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::Fence;
    use std::time::Duration;

    #[test]
    fn fence_closes_after_a_silence_and_stays_closed() {
        let f = Fence::new(Duration::from_millis(40));
        f.sending();
        assert_eq!(f.silenced(), None);
        std::thread::sleep(Duration::from_millis(50));
        // Silent now, before the next heartbeat.
        assert!(f.silenced().is_some());
        // The next heartbeat records the gap: still fenced afterwards.
        f.sending();
        let gap = f.silenced().expect("the gap is remembered");
        assert!(gap >= Duration::from_millis(30), "{gap:?}");
        f.sending();
        assert!(f.silenced().is_some());
    }

    #[test]
    fn regular_heartbeats_keep_the_fence_open() {
        let f = Fence::new(Duration::from_secs(3600));
        for _ in 0..100 {
            f.sending();
            assert_eq!(f.silenced(), None);
        }
    }
}
