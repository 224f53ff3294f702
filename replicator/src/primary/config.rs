//! The pipeline's settings and where released output goes.

use crate::wire::PROTOCOL_VERSIONS;
use castor_net_buffer::HeldItem;
use castor_parts::VersionRange;
use std::time::Duration;

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
    pub fault: Option<(u64, super::Fault)>,
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
    fn release(&self, epoch: u64, items: &[HeldItem]);
}
