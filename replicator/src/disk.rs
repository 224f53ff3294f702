//! Protected disks: how the blocks a guest wrote travel with its checkpoint
//! (`DiskBatch` frames) and how the backup applies them to its own image.
//!
//! **Consistency rule.** The blocks written during epoch e (harvested from the
//! virtio-blk device's write log and read back from the image in e's pause,
//! see `castor_vmm::devices::DiskTracker`) are data frames of checkpoint e.
//! The backup decodes and checks them with the rest of the epoch (block in
//! range, whole blocks, no block twice, staging bounded) and writes them to
//! its image only when the whole epoch verified, just after the memory pages:
//! its image always equals the primary's image as of its committed
//! checkpoint. If the guest completed a FLUSH during the epoch (`DiskBatch`
//! flag), the backup `fdatasync`s its image before the epoch is acked, so
//! output that depends on the flush leaves the primary only once both hosts
//! hold the data durably.
//!
//! **Why a frame type of its own.** Disk blocks are bulk data like pages, not
//! a part's state: a section is one postcard value under a 16 MiB cap, while
//! a disk's initial synchronisation is the whole image (GiBs) and a resync
//! the union of many epochs' writes. `DiskBatch` reuses the `PageBatch` entry
//! layout (block number in place of the page number), counted by the epoch
//! tally like any data frame, so epochs, pre-copy and resync work as for
//! memory. It needs protocol 4, negotiated at `Hello`.
//!
//! **Entries** (`tag`: a subset of the page codec's):
//!
//! | tag | data | meaning |
//! |----:|------|---------|
//! | 0 | `count u32` | `count` (>= 1) zero blocks from `block` on: a hole or zeros cost 15 bytes per run |
//! | 1 | 4096 bytes | the block, raw |
//! | 3 | LZ4 block | the block, compressed (decompresses to exactly 4096 bytes) |

use crate::codec::{self, CodecError, Page, PageTag};
use crate::wire::{
    self, DiskBatchRef, EpochTally, PageBatchWriter, PageEntryRef, DISK_FLAG_FLUSH, PAGE_SIZE,
};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bytes per replicated block (see `castor_vmm::devices::DISK_BLOCK`).
pub const BLOCK: usize = PAGE_SIZE;

/// Most decoded bytes one epoch's disk blocks may stage on the backup (a
/// peer must not make it allocate more whatever the entries cost on the
/// wire); a zero run stages 16 bytes.
pub const DISK_STAGING_CAP: usize = 256 << 20;

/// Errors of disk blocks: untrusted entries on the backup, image I/O.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Disk blocks arrived for a replica that has no disk.
    #[error(
        "the primary replicates a disk but this backup has none: add [disk] path to backup.toml"
    )]
    NoDisk,
    /// A block (or the end of a zero run) outside the disk.
    #[error("disk block {block} (+{count}) is outside the disk ({blocks} blocks)")]
    OutOfRange {
        /// First block of the entry.
        block: u64,
        /// Blocks in the entry.
        count: u64,
        /// Blocks on the disk.
        blocks: u64,
    },
    /// A zero run of no block, or whose data is not a 4-byte count.
    #[error("disk block {block}: a zero run needs a 4-byte count >= 1, got {len} bytes")]
    BadRun {
        /// First block.
        block: u64,
        /// Data length.
        len: usize,
    },
    /// A tag that disk entries do not use.
    #[error("disk block {block}: tag {tag} is not a disk block encoding (0, 1, 3)")]
    Tag {
        /// The block.
        block: u64,
        /// The tag.
        tag: u8,
    },
    /// Block data of the wrong length or that does not decompress.
    #[error("disk block {block}: {source}")]
    Block {
        /// The block.
        block: u64,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// A block twice in one epoch.
    #[error("disk block {block} twice in one epoch")]
    Duplicate {
        /// The block.
        block: u64,
    },
    /// An epoch's disk blocks would stage more than [`DISK_STAGING_CAP`].
    #[error("an epoch's disk blocks exceed the staging cap of {cap} bytes")]
    TooLarge {
        /// The cap.
        cap: usize,
    },
    /// Writing or syncing the image failed.
    #[error("disk image: {op} at byte {offset}: {source}")]
    Io {
        /// What was done.
        op: DiskOp,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading blocks back on the primary failed.
    #[error(transparent)]
    Read(#[from] castor_vmm::devices::DiskTrackError),
    /// A frame could not be built.
    #[error("wire: {0}")]
    Wire(#[from] wire::WireError),
    /// The session's protocol predates disk blocks.
    #[error("the backup speaks protocol {version}; a protected disk needs protocol {}: upgrade the backup", wire::DISK_PROTOCOL_VERSION)]
    OldPeer {
        /// The negotiated version.
        version: u16,
    },
}

/// An image operation (for [`DiskError::Io`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    /// `pwrite`.
    Write,
    /// `pread`.
    Read,
    /// `fdatasync`.
    Sync,
}

impl std::fmt::Display for DiskOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskOp::Write => "write",
            DiskOp::Read => "read",
            DiskOp::Sync => "fdatasync",
        })
    }
}

fn io(op: DiskOp, offset: u64) -> impl FnOnce(std::io::Error) -> DiskError {
    move |source| DiskError::Io { op, offset, source }
}

/// What the primary copied of the disk in one pause.
#[derive(Debug, Default, Clone)]
pub struct StagedDisk {
    /// Blocks, ascending.
    pub blocks: Vec<u64>,
    /// Their content, 4 KiB each.
    pub data: Vec<u8>,
    /// The guest completed a FLUSH during the epoch.
    pub flushed: bool,
}

/// What encoding produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiskEncoded {
    /// Blocks carried (zero runs count each block).
    pub blocks: u64,
    /// Blocks that were zero (no data on the wire).
    pub zero_blocks: u64,
    /// Bytes of frames.
    pub wire_bytes: u64,
}

/// Largest `DiskBatch` frame the encoder builds (bytes).
const MAX_FRAME: usize = 1 << 20;

/// Encodes `blocks` (ascending, content in `data`, 4 KiB each) as
/// `DiskBatch` frames of `epoch` appended to `out`, counted in `tally`;
/// `flushed` sets the flush flag (an epoch that flushed without writing
/// still sends one empty frame; one that did neither sends nothing).
/// Adjacent zero blocks become one zero run.
pub fn encode_blocks(
    epoch: u64,
    blocks: &[u64],
    data: &[u8],
    flushed: bool,
    out: &mut Vec<u8>,
    tally: &mut EpochTally,
) -> Result<DiskEncoded, DiskError> {
    let start = out.len();
    let mut enc = DiskEncoded::default();
    if blocks.is_empty() && !flushed {
        return Ok(enc);
    }
    let flags = if flushed { DISK_FLAG_FLUSH } else { 0 };
    let mut lz4 = vec![0u8; lz4_flex::block::get_maximum_output_size(BLOCK)];
    // After 8 blocks in a row that LZ4 could not shrink (encrypted,
    // compressed or random data), only every 16th is tried: compressing
    // incompressible data costs CPU the guest shares.
    let mut incompressible = 0u32;
    let mut i = 0;
    let mut first = true;
    while first || i < blocks.len() {
        first = false;
        let mut w = PageBatchWriter::begin_disk(out, epoch, flags);
        while i < blocks.len() && w.frame_len() < MAX_FRAME {
            let b = blocks[i];
            let block = block_at(data, i)?;
            if codec::is_zero_page(block) {
                let mut n = 1usize;
                while i + n < blocks.len()
                    && blocks[i + n] == b + n as u64
                    && n < u32::MAX as usize
                    && codec::is_zero_page(block_at(data, i + n)?)
                {
                    n += 1;
                }
                w.push(b, PageTag::Zero as u8, &(n as u32).to_le_bytes())?;
                enc.blocks += n as u64;
                enc.zero_blocks += n as u64;
                i += n;
                continue;
            }
            let try_lz4 = incompressible < 8 || incompressible.is_multiple_of(16);
            match try_lz4.then(|| lz4_flex::block::compress_into(block, &mut lz4)) {
                Some(Ok(n)) if n < BLOCK - BLOCK / 16 => {
                    incompressible = 0;
                    w.push(b, PageTag::Lz4 as u8, &lz4[..n])?
                }
                _ => {
                    incompressible = incompressible.saturating_add(1);
                    w.push(b, PageTag::Raw as u8, block)?
                }
            }
            enc.blocks += 1;
            i += 1;
        }
        let header = w.finish()?;
        tally.add(&header, 0);
    }
    enc.wire_bytes = (out.len() - start) as u64;
    Ok(enc)
}

fn block_at(data: &[u8], i: usize) -> Result<&Page, DiskError> {
    data.get(i * BLOCK..(i + 1) * BLOCK)
        .and_then(|s| s.try_into().ok())
        .ok_or(DiskError::Read(
            castor_vmm::devices::DiskTrackError::Buffer {
                len: data.len(),
                blocks: i + 1,
            },
        ))
}

/// One checked entry: a run of zero blocks or one block's content.
enum Entry {
    Zero { block: u64, count: u64 },
    Data { block: u64 },
}

/// The backup's disk: its own image, written only at commit.
#[derive(Debug)]
pub struct ReplicaDisk {
    file: File,
    capacity_bytes: u64,
    blocks: u64,
    staged_blocks: Vec<u64>,
    staging: Vec<u8>,
    staged_zero: Vec<(u64, u64)>,
    seen: Vec<u64>,
    flushed: bool,
    /// Pre-copy blocks were written straight to the image: make them
    /// durable at the next commit.
    unsynced: bool,
}

impl ReplicaDisk {
    /// The replica's disk on `file` (the backup's image) of `capacity_bytes`.
    pub fn new(file: File, capacity_bytes: u64) -> Self {
        ReplicaDisk {
            file,
            capacity_bytes,
            blocks: capacity_bytes.div_ceil(BLOCK as u64),
            staged_blocks: Vec::new(),
            staging: Vec::new(),
            staged_zero: Vec::new(),
            seen: Vec::new(),
            flushed: false,
            unsynced: false,
        }
    }

    /// Blocks on the disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Forgets what a previous (failed) epoch staged.
    pub fn begin_epoch(&mut self) {
        self.staged_blocks.clear();
        self.staging.clear();
        self.staged_zero.clear();
        self.seen.clear();
        self.seen.resize(self.blocks.div_ceil(64) as usize, 0);
        self.flushed = false;
    }

    fn check(&self, e: &PageEntryRef<'_>) -> Result<Entry, DiskError> {
        let block = e.page_number;
        let count = match PageTag::from_u8(e.tag) {
            Some(PageTag::Zero) => {
                let c: [u8; 4] = e.data.try_into().map_err(|_| DiskError::BadRun {
                    block,
                    len: e.data.len(),
                })?;
                let c = u64::from(u32::from_le_bytes(c));
                if c == 0 {
                    return Err(DiskError::BadRun { block, len: 4 });
                }
                c
            }
            Some(PageTag::Raw) | Some(PageTag::Lz4) => 1,
            _ => return Err(DiskError::Tag { block, tag: e.tag }),
        };
        if block >= self.blocks || count > self.blocks - block {
            return Err(DiskError::OutOfRange {
                block,
                count,
                blocks: self.blocks,
            });
        }
        Ok(if e.tag == PageTag::Zero as u8 {
            Entry::Zero { block, count }
        } else {
            Entry::Data { block }
        })
    }

    fn decode(e: &PageEntryRef<'_>, out: &mut Page) -> Result<(), DiskError> {
        codec::decode_page(e.tag, e.data, out)
            .map(|_| ())
            .map_err(|source| DiskError::Block {
                block: e.page_number,
                source,
            })
    }

    fn see(&mut self, block: u64, count: u64) -> Result<(), DiskError> {
        for b in block..block + count {
            let (w, bit) = ((b / 64) as usize, b % 64);
            let word = self.seen.get_mut(w).ok_or(DiskError::OutOfRange {
                block: b,
                count: 1,
                blocks: self.blocks,
            })?;
            if *word & (1 << bit) != 0 {
                return Err(DiskError::Duplicate { block: b });
            }
            *word |= 1 << bit;
        }
        Ok(())
    }

    /// Checks and decodes one of the epoch's `DiskBatch` frames into staging
    /// (nothing is written to the image).
    pub fn stage(&mut self, batch: &DiskBatchRef<'_>) -> Result<(), DiskError> {
        self.flushed |= batch.flushed();
        let mut page: Box<Page> = Box::new([0u8; BLOCK]);
        for e in batch.blocks.iter() {
            match self.check(&e)? {
                Entry::Zero { block, count } => {
                    self.see(block, count)?;
                    self.staged_zero.push((block, count));
                }
                Entry::Data { block } => {
                    self.see(block, 1)?;
                    if self.staging.len() + BLOCK > DISK_STAGING_CAP {
                        return Err(DiskError::TooLarge {
                            cap: DISK_STAGING_CAP,
                        });
                    }
                    Self::decode(&e, &mut page)?;
                    self.staged_blocks.push(block);
                    self.staging.extend_from_slice(&page[..]);
                }
            }
        }
        Ok(())
    }

    /// Writes what the epoch staged to the image (after the whole epoch
    /// verified) and makes the image durable if the guest flushed (or
    /// pre-copy data is not yet durable). Returns the blocks written and
    /// whether the image was synced.
    pub fn apply(&mut self) -> Result<(u64, bool), DiskError> {
        let mut n = 0u64;
        for (i, &b) in self.staged_blocks.iter().enumerate() {
            self.write_block(b, &self.staging[i * BLOCK..(i + 1) * BLOCK])?;
            n += 1;
        }
        let zero = std::mem::take(&mut self.staged_zero);
        for &(b, count) in &zero {
            self.zero_blocks(b, count)?;
            n += count;
        }
        self.staged_zero = zero;
        self.staged_zero.clear();
        let synced = self.flushed || self.unsynced;
        if synced {
            self.file.sync_data().map_err(io(DiskOp::Sync, 0))?;
            self.unsynced = false;
        }
        if self.staging.capacity() > 64 << 20 {
            self.staging = Vec::new();
            self.staged_blocks = Vec::new();
        }
        Ok((n, synced))
    }

    /// Initial synchronisation (no committed checkpoint yet to protect):
    /// checks each entry of a pre-copy `DiskBatch` and writes it straight to
    /// the image. Returns the blocks written.
    pub fn apply_sync(&mut self, batch: &DiskBatchRef<'_>) -> Result<u64, DiskError> {
        let mut page: Box<Page> = Box::new([0u8; BLOCK]);
        let mut n = 0;
        for e in batch.blocks.iter() {
            match self.check(&e)? {
                Entry::Zero { block, count } => {
                    self.zero_blocks(block, count)?;
                    n += count;
                }
                Entry::Data { block } => {
                    Self::decode(&e, &mut page)?;
                    self.write_block(block, &page[..])?;
                    n += 1;
                }
            }
        }
        self.unsynced = true;
        Ok(n)
    }

    fn write_block(&self, block: u64, data: &[u8]) -> Result<(), DiskError> {
        let off = block * BLOCK as u64;
        let len = (self.capacity_bytes - off).min(BLOCK as u64) as usize;
        self.file
            .write_all_at(&data[..len], off)
            .map_err(io(DiskOp::Write, off))
    }

    /// Zeroes `count` blocks from `block`: reads first and writes only where
    /// the image is not already zero (a fresh sparse image stays sparse).
    fn zero_blocks(&self, block: u64, count: u64) -> Result<(), DiskError> {
        const CHUNK: u64 = 256;
        let mut buf = vec![0u8; (CHUNK.min(count) as usize) * BLOCK];
        let mut b = block;
        while b < block + count {
            let n = CHUNK.min(block + count - b);
            let off = b * BLOCK as u64;
            let len = ((self.capacity_bytes - off).min(n * BLOCK as u64)) as usize;
            let chunk = &mut buf[..len];
            self.file
                .read_exact_at(chunk, off)
                .map_err(io(DiskOp::Read, off))?;
            if chunk.iter().any(|&x| x != 0) {
                chunk.fill(0);
                self.file
                    .write_all_at(chunk, off)
                    .map_err(io(DiskOp::Write, off))?;
            }
            b += n;
        }
        Ok(())
    }
}
