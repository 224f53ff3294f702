//! What a protected disk needs from its virtio-blk device: which 4 KiB
//! blocks the guest wrote since the last harvest, whether it flushed, and a
//! way to read blocks back from the image while the VM is paused.
//!
//! **Granularity: 4 KiB.** The guest's page and every common filesystem's
//! block size: a filesystem writes whole 4 KiB blocks, so nearly nothing is
//! re-sent that was not written; a 512-byte sector write costs at most 8x
//! (rare); the bitmap is 32 KiB per GiB of disk, so marking costs one atomic
//! OR per block on the write path and harvesting a few microseconds.
//!
//! **Logged at write time, read back only as a fallback.** A write that
//! covers whole blocks copies them, after its `pwrite` returned, into the
//! epoch's write log (a block written twice keeps its last content); the
//! pause only swaps the log out (O(1): no copy, no syscall), so the pause
//! does not grow with the write rate. A write that covers part of a block,
//! or one past the log's cap ([`LOG_CAP`] bytes), marks the block in a
//! bitmap instead, and the pause reads those blocks back from the image (the
//! page cache: one `pread` per run of adjacent blocks); a marked block wins
//! over a logged copy (the image holds its latest content). Marks are set
//! after the write landed, so a harvest that clears a bit before the write
//! is followed by the bit set again. The pre-copy rounds and the incremental
//! resync read blocks back by number, like the memory's dirty log. All
//! device work happens inside vCPU exits, so in the pause the image is
//! quiescent and consistent with guest memory.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Bytes per tracked block.
pub const DISK_BLOCK: u64 = 4096;

/// Most bytes the write log holds between two harvests; later whole-block
/// writes are marked for read-back instead.
pub const LOG_CAP: usize = 64 << 20;

/// Blocks copied at write time since the last harvest: `blocks[i]`'s
/// content is at `data[i * 4096..]` (in write order, each block once).
#[derive(Debug, Default)]
pub struct LoggedBlocks {
    /// Block numbers.
    pub blocks: Vec<u64>,
    /// Their content.
    pub data: Vec<u8>,
}

#[derive(Debug, Default)]
struct WriteLog {
    index: HashMap<u64, usize>,
    logged: LoggedBlocks,
    /// Buffers given back after encoding, reused by the next epoch.
    spare: Option<LoggedBlocks>,
}

/// Errors of reading blocks back from the image.
#[derive(Debug, thiserror::Error)]
pub enum DiskTrackError {
    /// A block past the end of the disk.
    #[error("block {block} is past the end of the disk ({blocks} blocks)")]
    OutOfRange {
        /// The block.
        block: u64,
        /// Blocks on the disk.
        blocks: u64,
    },
    /// The output buffer does not hold one block per block asked for.
    #[error("buffer of {len} bytes for {blocks} blocks")]
    Buffer {
        /// Buffer length.
        len: usize,
        /// Blocks asked for.
        blocks: usize,
    },
    /// Reading the image failed.
    #[error("reading the disk image at byte {offset}: {source}")]
    Io {
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Blocks written (and flushes issued) since the last harvest.
#[derive(Debug, Default)]
pub struct DiskDirty {
    /// Written blocks to read back from the image, ascending.
    pub blocks: Vec<u64>,
    /// Written blocks copied at write time (a block also in `blocks` must
    /// be read back instead).
    pub logged: LoggedBlocks,
    /// Whether the guest completed a FLUSH.
    pub flushed: bool,
}

/// The write log of one virtio-blk device (shared with its device).
#[derive(Debug)]
pub struct DiskTracker {
    file: File,
    capacity_bytes: u64,
    read_only: bool,
    words: Vec<AtomicU64>,
    flushed: AtomicBool,
    log: Mutex<WriteLog>,
}

impl DiskTracker {
    /// A tracker over `file` (a handle on the device's image) of `capacity_bytes`.
    pub fn new(file: File, capacity_bytes: u64, read_only: bool) -> Self {
        let blocks = capacity_bytes.div_ceil(DISK_BLOCK);
        DiskTracker {
            file,
            capacity_bytes,
            read_only,
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            flushed: AtomicBool::new(false),
            log: Mutex::new(WriteLog::default()),
        }
    }

    /// The disk's capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Whether the device refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Number of 4 KiB blocks (the last one may be partial).
    pub fn blocks(&self) -> u64 {
        self.capacity_bytes.div_ceil(DISK_BLOCK)
    }

    /// A handle on the image (the device's: read-only for a read-only disk).
    pub fn file(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// A handle on the image opened for writing (a replica writes the
    /// guest's blocks through it, also for a disk the guest sees read-only).
    pub fn writer(&self) -> std::io::Result<File> {
        if !self.read_only {
            return self.file.try_clone();
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{fd}"))
    }

    /// Marks the blocks of the byte range `start..end` written. Call after
    /// the write reached the image.
    pub fn mark(&self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        for b in start / DISK_BLOCK..end.div_ceil(DISK_BLOCK) {
            if let Some(w) = self.words.get((b / 64) as usize) {
                w.fetch_or(1 << (b % 64), Ordering::Release);
            }
        }
    }

    /// Records a completed write of `data` at byte `start`: whole blocks are
    /// copied into the write log, partial ones (and everything past the
    /// log's cap) marked for read-back. Call after the write reached the image.
    pub fn record_write(&self, start: u64, data: &[u8]) {
        let end = start + data.len() as u64;
        if end <= start {
            return;
        }
        let bs = DISK_BLOCK as usize;
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        for b in start / DISK_BLOCK..end.div_ceil(DISK_BLOCK) {
            let (bstart, bend) = (b * DISK_BLOCK, (b + 1) * DISK_BLOCK);
            let whole = bstart >= start && bend <= end && bend <= self.capacity_bytes;
            if !whole {
                self.mark(bstart.max(start), bend.min(end));
                continue;
            }
            let off = (bstart - start) as usize;
            let src = &data[off..off + bs];
            let log = &mut *log;
            match log.index.get(&b) {
                Some(&slot) => {
                    log.logged.data[slot * bs..(slot + 1) * bs].copy_from_slice(src);
                }
                None if log.logged.data.len() + bs <= LOG_CAP => {
                    log.index.insert(b, log.logged.blocks.len());
                    log.logged.blocks.push(b);
                    log.logged.data.extend_from_slice(src);
                }
                None => self.mark(bstart, bend),
            }
        }
    }

    /// Gives the buffers of a harvested log back for the next epoch.
    pub fn recycle(&self, mut logged: LoggedBlocks) {
        logged.blocks.clear();
        logged.data.clear();
        if logged.data.capacity() > 2 * LOG_CAP {
            return;
        }
        self.log.lock().unwrap_or_else(|e| e.into_inner()).spare = Some(logged);
    }

    /// Records a completed FLUSH.
    pub fn mark_flush(&self) {
        self.flushed.store(true, Ordering::Release);
    }

    /// Takes the blocks written and the flush flag since the last harvest.
    pub fn harvest(&self) -> DiskDirty {
        let logged = {
            let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            log.index.clear();
            let fresh = log.spare.take().unwrap_or_default();
            std::mem::replace(&mut log.logged, fresh)
        };
        let mut blocks = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                blocks.push(i as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        DiskDirty {
            blocks,
            logged,
            flushed: self.flushed.swap(false, Ordering::AcqRel),
        }
    }

    /// Forgets everything written so far (a full synchronisation starts).
    pub fn clear(&self) {
        let _ = self.harvest();
    }

    /// Reads `blocks` (ascending) into `out`, 4 KiB each, one `pread` per run
    /// of adjacent blocks; a partial last block reads as zeros past the end.
    pub fn read_blocks(&self, blocks: &[u64], out: &mut [u8]) -> Result<(), DiskTrackError> {
        let bs = DISK_BLOCK as usize;
        if out.len() < blocks.len() * bs {
            return Err(DiskTrackError::Buffer {
                len: out.len(),
                blocks: blocks.len(),
            });
        }
        let total = self.blocks();
        let mut i = 0;
        while i < blocks.len() {
            if blocks[i] >= total {
                return Err(DiskTrackError::OutOfRange {
                    block: blocks[i],
                    blocks: total,
                });
            }
            let mut j = i + 1;
            while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 && blocks[j] < total {
                j += 1;
            }
            self.read_range(blocks[i], &mut out[i * bs..j * bs])?;
            i = j;
        }
        Ok(())
    }

    /// Reads whole blocks from `first` into `out` (a multiple of 4 KiB);
    /// bytes past the end of the disk read as zeros.
    pub fn read_range(&self, first: u64, out: &mut [u8]) -> Result<(), DiskTrackError> {
        let offset = first * DISK_BLOCK;
        let avail = self
            .capacity_bytes
            .saturating_sub(offset)
            .min(out.len() as u64) as usize;
        let (data, tail) = out.split_at_mut(avail);
        self.file
            .read_exact_at(data, offset)
            .map_err(|source| DiskTrackError::Io { offset, source })?;
        tail.fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(blocks: u64) -> (DiskTracker, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("castor-track-{}-{blocks}.img", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(blocks * DISK_BLOCK).unwrap();
        (DiskTracker::new(f, blocks * DISK_BLOCK, false), path)
    }

    #[test]
    fn whole_blocks_are_logged_partial_ones_marked() {
        let (t, path) = tracker(16);
        let bs = DISK_BLOCK as usize;
        // Blocks 1 and 2 whole, then block 1 again: logged once, last content.
        t.record_write(DISK_BLOCK, &vec![1u8; 2 * bs]);
        t.record_write(DISK_BLOCK, &vec![3u8; bs]);
        // 512 bytes into block 5 and a write straddling blocks 7-8.
        t.record_write(5 * DISK_BLOCK + 512, &[9u8; 512]);
        t.record_write(7 * DISK_BLOCK + 2048, &vec![7u8; bs]);
        t.mark_flush();
        let d = t.harvest();
        assert_eq!(d.logged.blocks, vec![1, 2]);
        assert_eq!(d.logged.data[..bs], vec![3u8; bs][..]);
        assert_eq!(d.logged.data[bs..], vec![1u8; bs][..]);
        assert_eq!(d.blocks, vec![5, 7, 8]);
        assert!(d.flushed);
        let d = t.harvest();
        assert!(d.blocks.is_empty() && d.logged.blocks.is_empty() && !d.flushed);
        let _ = std::fs::remove_file(path);
    }
}
