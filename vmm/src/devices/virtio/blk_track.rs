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
//! **Read back at the pause, not logged at write time.** A write marks its
//! blocks after its `pwrite` returned (so a harvest that clears the bit
//! before the write lands is followed by the bit set again); the pause
//! harvests the bitmap and reads the marked blocks back from the image (the
//! page cache: one `pread` per run of adjacent blocks). Nothing is copied on
//! the guest's write path and memory does not grow with the write rate; the
//! same bitmap serves the pre-copy rounds and the incremental resync, like
//! the memory's dirty log. All device work happens inside vCPU exits, so in
//! the pause the image is quiescent and consistent with guest memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes per tracked block.
pub const DISK_BLOCK: u64 = 4096;

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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskDirty {
    /// Written blocks, ascending.
    pub blocks: Vec<u64>,
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

    /// A handle on the image (for a replica to write through).
    pub fn file(&self) -> std::io::Result<File> {
        self.file.try_clone()
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

    /// Records a completed FLUSH.
    pub fn mark_flush(&self) {
        self.flushed.store(true, Ordering::Release);
    }

    /// Takes the blocks written and the flush flag since the last harvest.
    pub fn harvest(&self) -> DiskDirty {
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
