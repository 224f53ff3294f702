//! The session's tasks beside the epoch thread: the sender (data frames on
//! the data stream, `EpochEnd` on the control stream), the ack reader (which
//! releases output), and the heartbeats both ways.

#[cfg(feature = "fault-injection")]
use super::fault::{inject, Fault};
use super::fence::Fence;
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
    /// Self-fencing: whether this process stood still for about the
    /// backup's timeout (then nothing more is released in this session).
    pub(super) fence: Arc<Fence>,
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
                        "this primary stood still for {gap:?} (stopped or frozen): the backup may have taken over; fencing: no output is released from now on in this session"
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
