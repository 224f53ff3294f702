//! Live figures of the pipeline, for status displays (metrics go to `metrics`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;
use std::time::Duration;

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
    /// Disk blocks carried (a protected disk).
    pub disk_blocks: u64,
    /// Time of the pause spent harvesting and reading back disk blocks.
    pub disk_pause: Duration,
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
    /// Guest pages a full synchronisation sends in its first pass (0: none
    /// in progress or done yet).
    pub precopy_pages_total: AtomicU64,
    /// Of those, the pages already sent.
    pub precopy_pages_sent: AtomicU64,
    /// Disk blocks (4 KiB) the current initial synchronisation has sent.
    pub disk_sync_blocks: AtomicU64,
    /// How long the last full synchronisation of the disk took (whole image
    /// and its rounds), in microseconds.
    pub disk_sync_us: AtomicU64,
    /// Full synchronisations of the disk so far (a reconnection that
    /// resumes incrementally does not count).
    pub disk_full_syncs: AtomicU64,
    /// Disk blocks carried by checkpoints so far.
    pub disk_blocks: AtomicU64,
    /// Time spent reading disk blocks back inside pauses, in microseconds.
    pub disk_pause_us: AtomicU64,
    /// That time in the last pause, in nanoseconds.
    pub last_disk_pause_ns: AtomicU64,
}
