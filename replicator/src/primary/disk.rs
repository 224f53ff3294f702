//! The primary's side of a protected disk: the blocks of each epoch read
//! back in its pause, the blocks of every unacknowledged epoch (for an
//! incremental resync), and the initial synchronisation of the image while
//! the guest runs. See `crate::disk` for the consistency rule.

use super::tasks::{AckBoard, Outgoing};
use super::{Primary, PrimaryError};
use crate::checkpoint::CheckpointError;
use crate::disk::{self, DiskError, StagedDisk, BLOCK};
use crate::wire::EpochTally;
use castor_vmm::devices::DiskTracker;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// Blocks read per pre-copy chunk (16 MiB).
const CHUNK_BLOCKS: usize = 4096;
/// Pre-copy rounds after the full pass.
const MAX_ROUNDS: u32 = 8;
/// A round this small (blocks) is left to the first checkpoint.
const STOP_BLOCKS: usize = 256;

/// What the primary keeps for its VM's protected disk.
pub(super) struct DiskSide {
    tracker: Arc<DiskTracker>,
    /// Blocks of every epoch after the last acknowledged one.
    unacked: VecDeque<(u64, Vec<u64>)>,
    /// Blocks the next checkpoint must carry besides its own writes (after a
    /// reconnection or a pre-copy).
    extra: BTreeSet<u64>,
    /// Reused read-back buffer.
    buf: Vec<u8>,
}

impl DiskSide {
    /// The disk of a VM whose virtio-blk device logs into `tracker`;
    /// `None` for a read-only disk (nothing to replicate).
    pub(super) fn new(tracker: Option<Arc<DiskTracker>>) -> Option<Self> {
        let tracker = tracker.filter(|t| !t.read_only())?;
        Some(DiskSide {
            tracker,
            unacked: VecDeque::new(),
            extra: BTreeSet::new(),
            buf: Vec::new(),
        })
    }

    /// Inside the pause: harvests the blocks written since the last pause
    /// (plus the pending extra ones) and reads them back from the image.
    pub(super) fn stage(&mut self, epoch: u64) -> Result<StagedDisk, DiskError> {
        let dirty = self.tracker.harvest();
        let blocks: Vec<u64> = if self.extra.is_empty() {
            dirty.blocks
        } else {
            let mut all = std::mem::take(&mut self.extra);
            all.extend(dirty.blocks);
            all.into_iter().collect()
        };
        let mut data = std::mem::take(&mut self.buf);
        let need = blocks.len() * BLOCK;
        if data.len() < need {
            data.resize(need, 0);
        }
        self.tracker.read_blocks(&blocks, &mut data[..need])?;
        data.truncate(need);
        self.unacked.push_back((epoch, blocks.clone()));
        Ok(StagedDisk {
            blocks,
            data,
            flushed: dirty.flushed,
        })
    }

    /// Takes the read-back buffer back after encoding.
    pub(super) fn give_back(&mut self, staged: StagedDisk) {
        let mut data = staged.data;
        if data.capacity() > 64 << 20 {
            data = Vec::new();
        }
        self.buf = data;
    }

    /// Epochs up to `acked` are committed: their blocks are no longer needed.
    pub(super) fn acked(&mut self, acked: u64) {
        while self.unacked.front().is_some_and(|(e, _)| *e <= acked) {
            self.unacked.pop_front();
        }
    }

    /// A reconnection to a backup that committed `committed`: the next
    /// checkpoint carries every block written in the epochs after it.
    pub(super) fn resume_from(&mut self, committed: u64) {
        for (e, blocks) in &self.unacked {
            if *e > committed {
                self.extra.extend(blocks.iter().copied());
            }
        }
    }
}

impl Primary {
    /// Initial synchronisation of the disk while the guest runs: the whole
    /// image (zero blocks and holes as zero runs, nearly free on the wire),
    /// then rounds of the blocks written meanwhile; what the last round
    /// found goes into the first checkpoint.
    pub(super) fn precopy_disk(
        &mut self,
        out: &tokio::sync::mpsc::Sender<Outgoing>,
        board: &AckBoard,
    ) -> Result<(), PrimaryError> {
        if self.disk.is_some() && self.encoder.version() < crate::wire::DISK_PROTOCOL_VERSION {
            return Err(disk_err(DiskError::OldPeer {
                version: self.encoder.version(),
            }));
        }
        let Some(side) = self.disk.as_mut() else {
            return Ok(());
        };
        side.unacked.clear();
        side.extra.clear();
        // Everything written from here on is sent again.
        side.tracker.clear();
        let tracker = side.tracker.clone();
        let total = tracker.blocks();
        let t = Instant::now();
        let mut wire_bytes = 0u64;
        let mut zero = 0u64;
        let mut data = vec![0u8; CHUNK_BLOCKS * BLOCK];
        let mut first = 0u64;
        let mut last_log = Instant::now();
        while first < total {
            let n = (total - first).min(CHUNK_BLOCKS as u64) as usize;
            let blocks: Vec<u64> = (first..first + n as u64).collect();
            tracker
                .read_range(first, &mut data[..n * BLOCK])
                .map_err(|e| disk_err(DiskError::from(e)))?;
            let (bytes, zeros) = self.send_disk_blocks(&blocks, &data[..n * BLOCK], out, board)?;
            wire_bytes += bytes;
            zero += zeros;
            first += n as u64;
            self.status
                .disk_sync_blocks
                .store(first, std::sync::atomic::Ordering::Relaxed);
            if last_log.elapsed().as_secs() >= 1 {
                last_log = Instant::now();
                log::info!(
                    "disk pre-copy: {} / {} MiB ({:.0}%)",
                    (first * BLOCK as u64) >> 20,
                    (total * BLOCK as u64) >> 20,
                    first as f64 * 100.0 / total.max(1) as f64
                );
            }
        }
        log::info!(
            "disk pre-copy: {} MiB in {:?}, {} MiB of it zero, {} KiB on the wire",
            (total * BLOCK as u64) >> 20,
            t.elapsed(),
            (zero * BLOCK as u64) >> 20,
            wire_bytes >> 10
        );
        metrics::counter!("castor_disk_sync_bytes_total").increment(total * BLOCK as u64);
        self.status
            .disk_full_syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for round in 1..=MAX_ROUNDS {
            let blocks = tracker.harvest().blocks;
            if blocks.len() < STOP_BLOCKS || round == MAX_ROUNDS {
                if let Some(side) = self.disk.as_mut() {
                    side.extra.extend(blocks);
                }
                break;
            }
            let mut buf = vec![0u8; blocks.len() * BLOCK];
            tracker
                .read_blocks(&blocks, &mut buf)
                .map_err(|e| disk_err(DiskError::from(e)))?;
            for (chunk, data) in blocks
                .chunks(CHUNK_BLOCKS)
                .zip(buf.chunks(CHUNK_BLOCKS * BLOCK))
            {
                self.send_disk_blocks(chunk, data, out, board)?;
            }
            log::info!("disk pre-copy round {round}: {} blocks", blocks.len());
        }
        self.status.disk_sync_us.store(
            t.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    fn send_disk_blocks(
        &mut self,
        blocks: &[u64],
        data: &[u8],
        out: &tokio::sync::mpsc::Sender<Outgoing>,
        board: &AckBoard,
    ) -> Result<(u64, u64), PrimaryError> {
        let mut buf = Vec::with_capacity(data.len() / 4 + 4096);
        let mut tally = EpochTally::new(0);
        let enc =
            disk::encode_blocks(0, blocks, data, false, &mut buf, &mut tally).map_err(disk_err)?;
        self.status
            .wire_bytes
            .fetch_add(enc.wire_bytes, std::sync::atomic::Ordering::Relaxed);
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
        Ok((enc.wire_bytes, enc.zero_blocks))
    }
}

fn disk_err(source: DiskError) -> PrimaryError {
    PrimaryError::Checkpoint(CheckpointError::Disk { epoch: 0, source })
}
