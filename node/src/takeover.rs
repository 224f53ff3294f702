//! The takeover sequence: what runs once a replica VM has been restored
//! from its last committed checkpoint ([`castor_replicator::backup::Backup::take_over`])
//! until the guest runs on this host and its output reaches the outside
//! world. Independent of any daemon's config file: the backup daemon builds
//! a [`TakeoverPlan`] from `backup.toml`, live migration from its own settings.

use crate::arp::{announce, guest_net_address};
use crate::net::{drain_stale_frames, TapRelease};
use crate::protect::{protect, Protection};
use crate::replica::{ReplicaIo, ReplicaNet};
use crate::sinks::UdpRelease;
use crate::status::{Failover, StatusBoard};
use castor_net_buffer::OutputBuffer;
use castor_replicator::backup::Takeover;
use castor_replicator::primary::Release;
use castor_vmm::Vm;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How a takeover brings the guest's output to the outside world.
#[derive(Debug, Clone)]
pub struct TakeoverPlan {
    /// Where the guest's records go, as UDP datagrams (a network guest's
    /// output is its frames: they go to the replica's tap instead, and this
    /// may be absent).
    pub release_to: Option<SocketAddr>,
    /// Re-send the committed checkpoint's held output (the old primary may
    /// or may not have released it; duplicates carry their sequence numbers,
    /// and TCP discards duplicate segments).
    pub reemit_output: bool,
    /// Announce a network guest at its new port with a gratuitous ARP.
    pub announce: bool,
    /// Most output held awaiting acks once the guest is protected again.
    pub max_held: usize,
}

/// When the old primary was found lost: the start of the takeover's timings.
#[derive(Debug, Clone, Copy)]
pub struct Detection {
    at: Instant,
    unix_seconds: f64,
}

impl Detection {
    /// Now.
    pub fn now() -> Self {
        Detection {
            at: Instant::now(),
            unix_seconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }
}

/// The takeover could not connect the guest's output.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// A record guest, and no `[output] release_to` to send its records to.
    #[error("the guest's output is records but backup.toml has no [output] release_to: set it to where the primary's records went")]
    NoRecordTarget,
    /// No UDP socket for the released records.
    #[error("output socket towards {to}: {source}")]
    OutputSocket {
        /// The destination.
        to: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A guest running on this host after a takeover, unprotected: what
/// re-protection needs.
pub struct TookOver {
    /// The running VM.
    pub vm: Arc<Vm>,
    /// The epoch it resumed from.
    pub epoch: u64,
    /// Its output buffer (unprotected: output passes through).
    pub buffer: Arc<OutputBuffer>,
    /// Where its released output goes.
    pub release: Arc<dyn Release>,
}

impl TookOver {
    /// Re-protects the guest ([`protect`]) until it stops.
    pub fn protect(
        self,
        p: Protection,
        board: &Arc<StatusBoard>,
        rt: &tokio::runtime::Runtime,
    ) -> Result<(), crate::protect::ProtectError> {
        protect(self.vm, self.buffer, self.release, p, board, rt)
    }
}

impl TakeoverPlan {
    /// Runs the guest restored by `t`: drains the frames queued on the tap
    /// while the replica was not running, announces the guest (gratuitous
    /// ARP), re-emits the committed output, connects the replica's sinks
    /// (through a new, unprotected output buffer) and resumes the guest, then
    /// records the takeover's metrics, log lines and status (`board`).
    pub fn execute(
        &self,
        t: Takeover,
        io: &ReplicaIo,
        detected: Detection,
        board: &Arc<StatusBoard>,
    ) -> Result<TookOver, TakeoverError> {
        metrics::gauge!("castor_takeover_detected_unix_seconds").set(detected.unix_seconds);
        let world: Arc<dyn Release> = match (io.net(), self.release_to) {
            (Some(n), _) => Arc::new(TapRelease::new(n.tap.clone())),
            (None, None) => return Err(TakeoverError::NoRecordTarget),
            (None, Some(to)) => Arc::new(
                UdpRelease::new(to).map_err(|source| TakeoverError::OutputSocket { to, source })?,
            ),
        };
        let release: Arc<dyn Release> = Arc::new(FirstOutput {
            inner: world,
            since: detected.at,
            seen: AtomicBool::new(false),
            board: board.clone(),
        });
        if let Some(n) = io.net() {
            let dropped = drain_stale_frames(&n.tap);
            if dropped > 0 {
                log::info!(
                    "takeover: dropped {dropped} stale frame(s) queued on tap {}",
                    n.tap.name()
                );
            }
            if self.announce {
                announce_guest(&t.vm, n);
            }
        }
        // Re-send the committed checkpoint's held frames/records: the primary
        // may have died before releasing them (for TCP, duplicates are harmless).
        if self.reemit_output && !t.output.items.is_empty() {
            release.release(t.epoch, &t.output.items);
        }
        let buffer = Arc::new(OutputBuffer::new(castor_net_buffer::Config {
            first_seq: t.output.next_seq,
            ..castor_net_buffer::Config::with_max_bytes(self.max_held)
        }));
        // A new buffer holds nothing: there is nothing to release.
        let _ = buffer.set_unprotected(true);
        io.connect(&buffer, &release);
        t.vm.resume();
        let total = detected.at.elapsed();
        metrics::counter!("castor_failovers_total").increment(1);
        metrics::histogram!("castor_failover_restore_seconds").record(t.restore.as_secs_f64());
        metrics::gauge!("castor_takeover_restore_seconds").set(t.restore.as_secs_f64());
        metrics::gauge!("castor_takeover_resume_seconds").set(total.as_secs_f64());
        metrics::gauge!("castor_takeover_epoch").set(t.epoch as f64);
        log::warn!(
            "TAKEOVER complete: resumed from epoch {} (state restore {:?}, detection to resume {:?}); \
             re-emitted {} held output item(s); running UNPROTECTED. This host is now the primary: \
             start a new `castor backup` for it (or configure [takeover] new_backup)",
            t.epoch,
            t.restore,
            total,
            t.output.items.len()
        );
        board.took_over(Failover {
            detected_unix: detected.unix_seconds,
            from_epoch: t.epoch,
            restore_ms: t.restore.as_secs_f64() * 1000.0,
            resume_ms: total.as_secs_f64() * 1000.0,
            first_output_ms: None,
        });
        Ok(TookOver {
            vm: t.vm,
            epoch: t.epoch,
            buffer,
            release,
        })
    }
}

/// Announces the guest at its new port: a gratuitous ARP (request and reply
/// forms) on this host's tap, from the guest's MAC for the IPv4 address in
/// its device configuration (replicated guest memory).
fn announce_guest(vm: &Vm, n: &ReplicaNet) {
    let addr = match guest_net_address(vm) {
        Ok(a) => a,
        Err(e) => {
            log::warn!("takeover: {e}; no gratuitous ARP");
            return;
        }
    };
    if addr.mac != n.mac {
        log::warn!(
            "takeover: the guest's MAC {} differs from the device's MAC {}",
            addr.mac,
            n.mac
        );
    }
    announce(&TapRelease::new(n.tap.clone()), addr);
    log::warn!(
        "takeover: gratuitous ARP for {} at {} on tap {}",
        addr.ipv4,
        addr.mac,
        n.tap.name()
    );
}

/// Passes releases through and reports the first one after a takeover
/// (metric `castor_takeover_first_output_seconds`, from detection, and a log line).
struct FirstOutput {
    inner: Arc<dyn Release>,
    since: Instant,
    seen: AtomicBool,
    board: Arc<StatusBoard>,
}

impl Release for FirstOutput {
    fn release(&self, epoch: u64, items: &[castor_net_buffer::HeldItem]) {
        self.inner.release(epoch, items);
        if !items.is_empty() && !self.seen.swap(true, Ordering::Relaxed) {
            let d = self.since.elapsed();
            metrics::gauge!("castor_takeover_first_output_seconds").set(d.as_secs_f64());
            self.board.first_output(d.as_secs_f64() * 1000.0);
            log::warn!(
                "TAKEOVER first output released {d:?} after detection (epoch label {epoch})"
            );
        }
    }
}
