//! Self-fencing of a frozen primary.
//!
//! A primary whose process stood still for about the backup's timeout
//! (SIGSTOP, a frozen VM host, a stalled hypervisor) cannot know whether its
//! backup took over meanwhile. It must then release nothing more: not even
//! output the backup acked while it was frozen, since a backup that took
//! over has already re-emitted that output and moved on.
//!
//! What is measured is the process standing still, not the pipeline being
//! slow: a watchdog thread of its own (not a task of the async runtime,
//! which a long send can keep busy while frames still flow to the backup)
//! ticks every heartbeat period and records the largest gap between two of
//! its ticks. The ack task checks the fence before every release.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// The fence of one session (see the module documentation).
pub(super) struct Fence {
    born: Instant,
    last_tick_ns: AtomicU64,
    silenced_ns: AtomicU64,
    after: Duration,
}

impl Fence {
    /// A fence for a session whose backup takes over after `peer_timeout`
    /// of silence: it closes after a gap of three quarters of that (the
    /// rest is the margin for the backup's clock and the flight of the last
    /// heartbeat). Not yet watched: see [`Fence::watch`].
    pub(super) fn new(peer_timeout: Duration) -> Self {
        Fence {
            born: Instant::now(),
            last_tick_ns: AtomicU64::new(0),
            silenced_ns: AtomicU64::new(0),
            after: peer_timeout * 3 / 4,
        }
    }

    /// Starts the watchdog thread, ticking every `period`; it ends once the
    /// last `Arc` of the fence is dropped (the session is over).
    pub(super) fn watch(self: &Arc<Self>, period: Duration) -> std::io::Result<()> {
        let weak: Weak<Fence> = Arc::downgrade(self);
        self.tick();
        std::thread::Builder::new()
            .name("castor-fence".into())
            .spawn(move || {
                while let Some(f) = weak.upgrade() {
                    f.tick();
                    drop(f);
                    std::thread::sleep(period);
                }
            })
            .map(|_| ())
    }

    fn now_ns(&self) -> u64 {
        self.born.elapsed().as_nanos() as u64
    }

    /// Records the gap since the last tick: first the verdict, then the new
    /// time, so a reader that sees the new time also sees the verdict.
    pub(super) fn tick(&self) {
        let now = self.now_ns();
        let gap = now.saturating_sub(self.last_tick_ns.load(Ordering::SeqCst));
        if Duration::from_nanos(gap) > self.after {
            self.silenced_ns.fetch_max(gap, Ordering::SeqCst);
        }
        self.last_tick_ns.store(now, Ordering::SeqCst);
    }

    /// `Some(gap)` if this process stood still for too long, now or at any
    /// time in this session.
    pub(super) fn silenced(&self) -> Option<Duration> {
        // The time first, then the verdict (see `tick`).
        let gap = self
            .now_ns()
            .saturating_sub(self.last_tick_ns.load(Ordering::SeqCst));
        let marked = self.silenced_ns.load(Ordering::SeqCst);
        let worst = Duration::from_nanos(gap.max(marked));
        (worst > self.after).then_some(worst)
    }
}

#[cfg(test)]
mod tests {
    use super::Fence;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn fence_closes_after_a_standstill_and_stays_closed() {
        let f = Fence::new(Duration::from_millis(40));
        f.tick();
        assert_eq!(f.silenced(), None);
        std::thread::sleep(Duration::from_millis(50));
        // Standing still now, before the next tick.
        assert!(f.silenced().is_some());
        // The next tick records the gap: still closed afterwards.
        f.tick();
        let gap = f.silenced().expect("the gap is remembered");
        assert!(gap >= Duration::from_millis(30), "{gap:?}");
        f.tick();
        assert!(f.silenced().is_some());
    }

    #[test]
    fn regular_ticks_keep_the_fence_open() {
        let f = Fence::new(Duration::from_secs(3600));
        for _ in 0..100 {
            f.tick();
            assert_eq!(f.silenced(), None);
        }
    }

    #[test]
    fn the_watchdog_ticks_and_ends_with_the_session() {
        let f = Arc::new(Fence::new(Duration::from_secs(3600)));
        f.watch(Duration::from_millis(1)).expect("thread");
        let first = f.last_tick_ns.load(std::sync::atomic::Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while f.last_tick_ns.load(std::sync::atomic::Ordering::SeqCst) == first {
            assert!(
                std::time::Instant::now() < deadline,
                "the watchdog never ticked"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let weak = Arc::downgrade(&f);
        drop(f);
        // The thread holds the fence only while ticking: it lets go.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while weak.upgrade().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the watchdog kept the fence"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
