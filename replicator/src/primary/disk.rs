//! The primary's side of a protected disk: the blocks of each epoch read
//! back in its pause, the blocks of every unacknowledged epoch (for an
//! incremental resync), and the initial synchronisation of the image while
//! the guest runs. See `crate::disk` for the consistency rule.

use super::tasks::{AckBoard, Outgoing};
use super::{Primary, PrimaryError};
use crate::checkpoint::CheckpointError;
use crate::disk::{self, DiskError, StagedDisk, BLOCK};
use crate::wire::EpochTally;
use castor_vmm::devices::{DiskTracker, LoggedBlocks};
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
}

impl DiskSide {
    /// The disk of a VM whose virtio-blk device logs into `tracker` (a
    /// read-only disk is synchronised once per session and never written).
    pub(super) fn new(tracker: Option<Arc<DiskTracker>>) -> Option<Self> {
        let tracker = tracker?;
        Some(DiskSide {
            tracker,
            unacked: VecDeque::new(),
            extra: BTreeSet::new(),
        })
    }

    /// Inside the pause: takes the blocks written since the last pause
    /// (copied at write time; partial-block writes, the pending extra
    /// blocks and anything past the log's cap are read back from the image).
    pub(super) fn stage(&mut self, epoch: u64) -> Result<StagedDisk, DiskError> {
        let dirty = self.tracker.harvest();
        #[cfg(feature = "fault-injection")]
        if let Ok(f) = self.tracker.file() {
            crate::disk_digest::record("primary", epoch, &f);
        }
        let mut read: Vec<u64> = if self.extra.is_empty() {
            dirty.blocks
        } else {
            let mut all = std::mem::take(&mut self.extra);
            all.extend(dirty.blocks);
            all.into_iter().collect()
        };
        let LoggedBlocks {
            blocks: mut logged,
            mut data,
        } = dirty.logged;
        if !read.is_empty() && !logged.is_empty() {
            // A block also marked for read-back: the image holds its latest
            // content; drop its logged copy.
            let marked: std::collections::HashSet<u64> = read.iter().copied().collect();
            let (mut blocks, mut kept) = (Vec::with_capacity(logged.len()), Vec::new());
            for (i, b) in logged.iter().enumerate() {
                if !marked.contains(b) {
                    blocks.push(*b);
                    kept.extend_from_slice(&data[i * BLOCK..(i + 1) * BLOCK]);
                }
            }
            logged = blocks;
            data = kept;
        }
        read.sort_unstable();
        read.dedup();
        let at = data.len();
        data.resize(at + read.len() * BLOCK, 0);
        self.tracker.read_blocks(&read, &mut data[at..])?;
        logged.extend_from_slice(&read);
        self.unacked.push_back((epoch, logged.clone()));
        Ok(StagedDisk {
            blocks: logged,
            data,
            flushed: dirty.flushed,
        })
    }

    /// Gives the staged buffers back to the write log after encoding.
    pub(super) fn give_back(&mut self, staged: StagedDisk) {
        self.tracker.recycle(LoggedBlocks {
            blocks: staged.blocks,
            data: staged.data,
        });
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
            metrics::gauge!("castor_disk_sync_progress").set(first as f64 / total.max(1) as f64);
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
            let dirty = tracker.harvest();
            let mut blocks = dirty.blocks;
            blocks.extend_from_slice(&dirty.logged.blocks);
            blocks.sort_unstable();
            blocks.dedup();
            tracker.recycle(dirty.logged);
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
