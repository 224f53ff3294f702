//! Checkpoints: what the primary stages at the pause and encodes into frames,
//! and how the backup assembles, verifies and commits them.
//!
//! The invariant the backup keeps: **the replica equals exactly one committed
//! checkpoint.** An epoch's frames are buffered as they arrive (in any order,
//! over any stream); nothing touches the replica until the epoch's `EpochEnd`
//! has arrived, every announced frame is there with a matching digest, every
//! page decodes (into a staging area, against the committed replica as XOR
//! base) and the state deserializes. Only then are the staged pages written
//! into the replica's memory and the state and held output replaced, as one
//! step. Anything else discards the whole epoch.

use crate::codec::{self, Page, PageEncoder, PageTag};
use crate::disk::{self, DiskError, ReplicaDisk, StagedDisk};
use crate::wire::{
    self, BodyRef, EpochCheck, EpochEnd, EpochTally, Frame, FrameType, Header, Limits,
    PageBatchWriter, SectionWriter, PAGE_SIZE, PROTOCOL_VERSION,
};
use castor_parts::{Checked, PartError, PartId, PartSet, Staged};
use castor_vmm::state::VmShape;
use castor_vmm::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// Errors of checkpoint encoding, assembly and commit.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A frame could not be encoded or decoded.
    #[error("wire: {0}")]
    Wire(#[from] wire::WireError),
    /// A page did not decode.
    #[error("page {page}: {source}")]
    Page {
        /// Page number.
        page: u64,
        /// Why.
        #[source]
        source: codec::CodecError,
    },
    /// A frame of another epoch was given to this epoch's assembler.
    #[error("frame of epoch {got} in epoch {expected}")]
    WrongEpoch {
        /// The assembler's epoch.
        expected: u64,
        /// The frame's epoch.
        got: u64,
    },
    /// A second `EpochEnd` for one epoch.
    #[error("epoch {epoch}: two EpochEnd frames")]
    TwoEpochEnds {
        /// The epoch.
        epoch: u64,
    },
    /// A frame that has no place among an epoch's data.
    #[error("epoch {epoch}: unexpected {frame_type:?} frame among its data")]
    UnexpectedFrame {
        /// The epoch.
        epoch: u64,
        /// The frame's type.
        frame_type: FrameType,
    },
    /// Commit was asked for an epoch not yet complete.
    #[error("epoch {epoch} is incomplete")]
    Incomplete {
        /// The epoch.
        epoch: u64,
    },
    /// The epoch's frames disagree with its `EpochEnd`.
    #[error("epoch {epoch}: received {frames} frames / {pages} pages / digest {digest:#x}, EpochEnd says {want_frames} / {want_pages} / {want_digest:#x}")]
    Tally {
        /// The epoch.
        epoch: u64,
        /// Frames received.
        frames: u32,
        /// Pages received.
        pages: u64,
        /// Digest of what was received.
        digest: u64,
        /// Frames announced.
        want_frames: u32,
        /// Pages announced.
        want_pages: u64,
        /// Digest announced.
        want_digest: u64,
    },
    /// An epoch out of order.
    #[error("epoch {epoch} cannot follow committed epoch {committed}")]
    NotNext {
        /// The epoch.
        epoch: u64,
        /// The last committed one.
        committed: u64,
    },
    /// Pre-copy pages after the replica committed a checkpoint.
    #[error("pre-copy pages after the first commit")]
    SyncAfterCommit,
    /// An epoch holds more buffered bytes than allowed.
    #[error("epoch {epoch} exceeds the staging cap of {cap} bytes")]
    TooLarge {
        /// The epoch.
        epoch: u64,
        /// The cap.
        cap: usize,
    },
    /// An epoch names more pages than the guest has.
    #[error("epoch {epoch} carries {pages} page entries for a guest of {guest_pages} pages")]
    TooManyPages {
        /// The epoch.
        epoch: u64,
        /// Entries announced.
        pages: u64,
        /// Pages in the guest.
        guest_pages: u64,
    },
    /// A page twice in one epoch.
    #[error("epoch {epoch} carries page {page} twice")]
    DuplicatePage {
        /// The epoch.
        epoch: u64,
        /// The page.
        page: u64,
    },
    /// A page lies outside guest memory.
    #[error("page {page} is outside guest memory ({pages} pages)")]
    PageOutOfRange {
        /// Page number.
        page: u64,
        /// Pages in the guest.
        pages: u64,
    },
    /// Guest memory access failed.
    #[error("guest memory at page {page}: {source}")]
    Memory {
        /// The page.
        page: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A section for a part this replica does not have.
    #[error("epoch {epoch}: section for unknown part {part}")]
    UnknownPart {
        /// The epoch.
        epoch: u64,
        /// The part.
        part: PartId,
    },
    /// A part's section twice in one epoch.
    #[error("epoch {epoch}: two sections for part {part}")]
    DuplicateSection {
        /// The epoch.
        epoch: u64,
        /// The part.
        part: PartId,
    },
    /// An epoch without some part's section (every checkpoint carries every part).
    #[error("epoch {epoch}: no section for part {part}")]
    MissingSection {
        /// The epoch.
        epoch: u64,
        /// The part.
        part: PartId,
    },
    /// A part refused its section (decode or validation).
    #[error("epoch {epoch}: {source}")]
    Part {
        /// The epoch.
        epoch: u64,
        /// The part's error.
        #[source]
        source: PartError,
    },
    /// The first commit of a session could not be restored into the replica
    /// VM: the session is refused while the primary is alive to hear it.
    #[error("epoch {epoch}: the replica cannot restore this checkpoint: {source}")]
    NotRestorable {
        /// The epoch.
        epoch: u64,
        /// The part that failed.
        #[source]
        source: PartError,
    },
    /// The epoch's disk blocks were refused (decode, range, length), or the
    /// image could not be written at commit.
    #[error("epoch {epoch}: {source}")]
    Disk {
        /// The epoch (0: pre-copy).
        epoch: u64,
        /// Why.
        #[source]
        source: DiskError,
    },
    /// After committing, the replica's memory digest differed from the
    /// primary's: the replica diverged and must be resynchronised.
    #[error("epoch {epoch}: replica memory digest differs from the primary's")]
    MemoryMismatch {
        /// The epoch whose commit was checked.
        epoch: u64,
    },
}

/// Everything the primary copies aside while the guest is paused.
#[derive(Default)]
pub struct StagedEpoch {
    /// Epoch number (1, 2, ...).
    pub epoch: u64,
    /// Dirty page numbers (guest-physical address / 4 KiB), ascending.
    pub pages: Vec<u64>,
    /// Their content: page `i` at `i * 4096` (the buffer may be longer: it
    /// is reused across epochs).
    pub data: Vec<u8>,
    /// Every part's staged state, in restore order.
    pub sections: StagedSections,
    /// Digest of all guest memory at the pause (for verification).
    pub memory_digest: Option<[u8; 32]>,
    /// The disk blocks written during the epoch (a protected disk).
    pub disk: Option<StagedDisk>,
}

impl std::fmt::Debug for StagedEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedEpoch")
            .field("epoch", &self.epoch)
            .field("pages", &self.pages.len())
            .field("sections", &self.sections.len())
            .finish()
    }
}

/// Every part's staged state at one pause, in restore order.
pub type StagedSections = Vec<(PartId, Box<dyn Staged>)>;

/// Stages every part of `parts` (call inside the pause).
pub fn stage_parts(parts: &PartSet) -> Result<StagedSections, PartError> {
    parts.iter().map(|p| Ok((p.id(), p.stage()?))).collect()
}

/// What encoding one epoch produced.
#[derive(Debug, Default, Clone, Copy)]
pub struct EncodedEpoch {
    /// Page entries.
    pub pages: u64,
    /// Bytes of frames (data and end).
    pub wire_bytes: u64,
    /// Data frames.
    pub data_frames: u32,
    /// Disk blocks carried.
    pub disk_blocks: u64,
}

/// Primary side: turns staged epochs into frames, keeping the sent-copy cache.
#[derive(Debug)]
pub struct CheckpointEncoder {
    pages: PageEncoder,
    max_batch_bytes: usize,
    version: u16,
}

impl CheckpointEncoder {
    /// An encoder with a last-sent cache of `cache_bytes`.
    pub fn new(cache_bytes: usize) -> Self {
        CheckpointEncoder {
            pages: PageEncoder::with_cache_bytes(cache_bytes),
            max_batch_bytes: 1 << 20,
            version: PROTOCOL_VERSION,
        }
    }

    /// Encodes frames in protocol `version` (the one negotiated at Hello).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// The protocol version frames are encoded in.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Forgets every cached copy: after a reconnection or resync.
    pub fn invalidate_all(&mut self) {
        self.pages.invalidate_all();
    }

    /// The page encoder (for its statistics).
    pub fn page_encoder(&self) -> &PageEncoder {
        &self.pages
    }

    /// Encodes `pages` (numbers and `data`) as `PageBatch` frames of `epoch`
    /// appended to `out`, counting them in `tally`.
    pub fn encode_pages(
        &mut self,
        epoch: u64,
        pages: &[u64],
        data: &[u8],
        out: &mut Vec<u8>,
        tally: &mut EpochTally,
    ) -> Result<(), CheckpointError> {
        let start = out.len();
        let mut i = 0;
        while i < pages.len() {
            let mut w = PageBatchWriter::begin(out, epoch);
            while i < pages.len() && w.frame_len() < self.max_batch_bytes {
                let page: &Page = data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .try_into()
                    .map_err(|_| CheckpointError::PageOutOfRange {
                        page: pages[i],
                        pages: (data.len() / PAGE_SIZE) as u64,
                    })?;
                let pn = pages[i];
                let enc = &mut self.pages;
                w.push_with(pn, |buf| enc.encode_page(pn, page, buf) as u8)?;
                i += 1;
            }
            let n = w.count() as u64;
            let header = w.finish()?;
            tally.add(&header, n);
        }
        if self.version != PROTOCOL_VERSION {
            wire::restamp(&mut out[start..], self.version);
        }
        Ok(())
    }

    /// Encodes a whole staged epoch: pages and every part's section into
    /// `data_out` and the `EpochEnd` frame into `end_out`.
    pub fn encode_epoch(
        &mut self,
        staged: &StagedEpoch,
        data_out: &mut Vec<u8>,
        end_out: &mut Vec<u8>,
    ) -> Result<EncodedEpoch, CheckpointError> {
        let e = staged.epoch;
        let start = data_out.len();
        let mut tally = EpochTally::new(e);
        self.encode_pages(e, &staged.pages, &staged.data, data_out, &mut tally)?;
        let sections_start = data_out.len();
        let mut disk_blocks = 0;
        if let Some(d) = &staged.disk {
            if self.version < wire::DISK_PROTOCOL_VERSION {
                return Err(CheckpointError::Disk {
                    epoch: e,
                    source: DiskError::OldPeer {
                        version: self.version,
                    },
                });
            }
            disk_blocks =
                disk::encode_blocks(e, &d.blocks, &d.data, d.flushed, data_out, &mut tally)
                    .map_err(|source| CheckpointError::Disk { epoch: e, source })?
                    .blocks;
        }
        for (id, section) in &staged.sections {
            let mut w = SectionWriter::begin(data_out, e, *id, section.version());
            if let Err(source) = section.encode(w.data()) {
                w.abort();
                return Err(CheckpointError::Part { epoch: e, source });
            }
            let h: Header = w.finish()?;
            tally.add(&h, 0);
        }
        let end_start = end_out.len();
        Frame::new(
            e,
            wire::Body::EpochEnd(tally.epoch_end(staged.memory_digest)),
        )
        .encode(end_out)?;
        if self.version != PROTOCOL_VERSION {
            wire::restamp(&mut data_out[sections_start..], self.version);
            wire::restamp(&mut end_out[end_start..], self.version);
            // The tally covers payloads only, so re-stamped headers keep it.
        }
        Ok(EncodedEpoch {
            pages: staged.pages.len() as u64,
            wire_bytes: (data_out.len() - start + end_out.len() - end_start) as u64,
            data_frames: tally.data_frames,
            disk_blocks,
        })
    }
}

/// Backup side: the frames of one epoch as they arrive.
#[derive(Debug)]
pub struct EpochAssembler {
    epoch: u64,
    frames: Vec<u8>,
    tally: EpochTally,
    end: Option<EpochEnd>,
    end_at: Option<std::time::Instant>,
    cap: usize,
}

impl EpochAssembler {
    /// An empty assembler for `epoch` buffering at most `cap` bytes.
    pub fn new(epoch: u64, cap: usize) -> Self {
        EpochAssembler {
            epoch,
            frames: Vec::new(),
            tally: EpochTally::new(epoch),
            end: None,
            end_at: None,
            cap,
        }
    }

    /// The epoch assembled.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Adds one received frame (its exact bytes, already decoded once by the
    /// transport as `frame`).
    pub fn add(&mut self, frame: &wire::FrameRef<'_>, bytes: &[u8]) -> Result<(), CheckpointError> {
        if frame.epoch() != self.epoch {
            return Err(CheckpointError::WrongEpoch {
                expected: self.epoch,
                got: frame.epoch(),
            });
        }
        match &frame.body {
            BodyRef::EpochEnd(end) => {
                if self.end.is_some() {
                    return Err(CheckpointError::TwoEpochEnds { epoch: self.epoch });
                }
                self.end = Some(*end);
                self.end_at = Some(std::time::Instant::now());
            }
            _ if frame.header.frame_type.is_epoch_data() => {
                if self.frames.len() + bytes.len() > self.cap {
                    return Err(CheckpointError::TooLarge {
                        epoch: self.epoch,
                        cap: self.cap,
                    });
                }
                self.tally.add_frame(frame);
                self.frames.extend_from_slice(bytes);
            }
            _ => {
                return Err(CheckpointError::UnexpectedFrame {
                    epoch: self.epoch,
                    frame_type: frame.header.frame_type,
                })
            }
        }
        Ok(())
    }

    /// Bytes of frames buffered.
    pub fn buffered_bytes(&self) -> usize {
        self.frames.len()
    }

    /// How long the epoch has waited for data since its `EpochEnd` arrived
    /// (`None` before that). A stream cut short inside a frame leaves the
    /// receiver waiting for bytes that never come: the caller bounds this.
    pub fn incomplete_for(&self) -> Option<std::time::Duration> {
        match self.status() {
            None => self.end_at.map(|t| t.elapsed()),
            Some(_) => None,
        }
    }

    /// Whether the epoch is complete (`Some(Ok)`), still waiting (`None`), or
    /// broken (`Some(Err)`).
    pub fn status(&self) -> Option<Result<(), CheckpointError>> {
        let end = self.end.as_ref()?;
        match self.tally.check(end) {
            EpochCheck::Complete => Some(Ok(())),
            EpochCheck::Pending { .. } => None,
            EpochCheck::Mismatch => Some(Err(CheckpointError::Tally {
                epoch: self.epoch,
                frames: self.tally.data_frames,
                pages: self.tally.pages,
                digest: self.tally.digest,
                want_frames: end.data_frames,
                want_pages: end.page_count,
                want_digest: end.content_digest,
            })),
        }
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitInfo {
    /// The committed epoch.
    pub epoch: u64,
    /// Pages written into the replica.
    pub pages: u64,
    /// Whether the memory digest was checked (and matched).
    pub memory_verified: bool,
    /// Whether this commit ran the restorability dry run (first of a session).
    pub proven: bool,
    /// Disk blocks written to the replica's image.
    pub disk_blocks: u64,
    /// Whether the replica's image was made durable (`fdatasync`) before
    /// this commit returned: the epoch carried a guest FLUSH (or followed a
    /// pre-copy).
    pub disk_synced: bool,
}

/// The backup's replica: guest memory (owned by the backup's paused VM), the
/// parts of that VM, and the checked state of every part at the last commit.
///
/// Invariant: the replica equals exactly one committed checkpoint. A commit
/// decodes and checks everything first (pages into staging, every part's
/// section through [`castor_parts::Part::check`]); any error leaves the
/// replica as it was.
pub struct Replica {
    mem: GuestMemoryMmap,
    pages: u64,
    limits: Limits,
    parts: PartSet,
    committed_epoch: u64,
    /// After a (re)connection the first epoch may follow any committed one.
    any_next: bool,
    /// The committed state of every part, in restore order.
    committed: Option<Vec<Checked>>,
    /// Whether this session's first commit has been proven restorable.
    proven: bool,
    /// A memory verification failed: the replica no longer equals a
    /// checkpoint; it can neither be taken over nor resynced incrementally.
    diverged: bool,
    /// Whether anything was written into the replica's memory or disk
    /// since it was created (pre-copy or a commit).
    written: bool,
    staging_pages: Vec<u64>,
    staging: Vec<u8>,
    /// Pages the epoch being decoded zeroes (staged as their number only:
    /// a zero entry costs 11 wire bytes and must not cost 4 KiB here).
    staging_zero: Vec<u64>,
    /// One bit per guest page: which pages the epoch being decoded has
    /// already carried (duplicates are refused).
    seen: Vec<u64>,
    /// The backup's own image of the guest's protected disk.
    disk: Option<ReplicaDisk>,
}

/// Staging kept between epochs; a larger buffer is given back after use.
const STAGING_KEEP: usize = 64 << 20;

impl Replica {
    /// A replica over `mem` (a paused VM's memory) of the given shape, whose
    /// state is made of `parts`.
    pub fn new(mem: GuestMemoryMmap, shape: &VmShape, parts: PartSet) -> Self {
        let pages = shape.memory_end() / PAGE_SIZE as u64;
        Replica {
            mem,
            pages,
            limits: Limits::for_guest_pages(pages),
            parts,
            committed_epoch: 0,
            any_next: true,
            committed: None,
            proven: false,
            diverged: false,
            written: false,
            staging_pages: Vec::new(),
            staging: Vec::new(),
            staging_zero: Vec::new(),
            seen: Vec::new(),
            disk: None,
        }
    }

    /// Gives the replica its disk (the backup's image, the same capacity as
    /// the primary's: checked at Hello): disk blocks are written there at
    /// commit.
    pub fn set_disk(&mut self, disk: ReplicaDisk) {
        self.disk = Some(disk);
    }

    /// Whether the replica has a disk.
    pub fn has_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// The largest legitimate disk part of one epoch on the wire: every
    /// block of the disk raw, with its entry overhead (0 without a disk).
    pub fn largest_disk_bytes(&self) -> usize {
        self.disk.as_ref().map_or(0, |d| {
            (d.blocks() as usize).saturating_mul(disk::BLOCK + wire::PAGE_ENTRY_OVERHEAD)
        })
    }

    /// Initial synchronisation of the disk: a pre-copy `DiskBatch` is written
    /// straight to the image (like [`Replica::apply_sync_batch`]).
    pub fn apply_sync_disk(
        &mut self,
        batch: &wire::DiskBatchRef<'_>,
    ) -> Result<u64, CheckpointError> {
        if self.committed_epoch != 0 {
            return Err(CheckpointError::SyncAfterCommit);
        }
        let disk = self.disk.as_mut().ok_or(CheckpointError::Disk {
            epoch: 0,
            source: DiskError::NoDisk,
        })?;
        self.written = true;
        disk.apply_sync(batch)
            .map_err(|source| CheckpointError::Disk { epoch: 0, source })
    }

    /// Decoding limits for this guest.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The replica's parts.
    pub fn parts(&self) -> &PartSet {
        &self.parts
    }

    /// The last committed epoch (0: none yet).
    pub fn committed_epoch(&self) -> u64 {
        self.committed_epoch
    }

    /// A new session begins (after a `Hello`): any epoch above the committed
    /// one may come next (the primary numbers epochs across sessions and
    /// resyncs incrementally), and the session's first commit is proven
    /// restorable again.
    pub fn expect_any_next(&mut self) {
        self.any_next = true;
        self.proven = false;
    }

    /// Whether this session's first commit is still to come (nothing
    /// committed since the last `Hello`).
    pub fn session_uncommitted(&self) -> bool {
        !self.proven
    }

    /// Whether `epoch` is the one to commit next.
    pub fn is_next(&self, epoch: u64) -> bool {
        epoch > self.committed_epoch && (self.any_next || epoch == self.committed_epoch + 1)
    }

    /// Whether a checkpoint has been committed and the replica still equals
    /// it (the replica can take over).
    pub fn has_state(&self) -> bool {
        self.committed.is_some() && !self.diverged
    }

    /// Whether a memory verification found the replica diverged from the
    /// primary (only a full resync repairs it).
    pub fn is_diverged(&self) -> bool {
        self.diverged
    }

    /// Whether anything was written into the replica (pre-copy pages or
    /// blocks, or a commit) since it was created: until then the memory and
    /// disk under it still hold what an earlier replica left there.
    pub fn is_written(&self) -> bool {
        self.written
    }

    /// The replica's memory (test-only fault injection writes here).
    #[cfg(feature = "fault-injection")]
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Restores the committed checkpoint into the replica's parts (the VM
    /// must be paused): the takeover.
    pub fn restore(&self) -> Result<(), CheckpointError> {
        let states = self.committed.as_ref().ok_or(CheckpointError::Incomplete {
            epoch: self.committed_epoch,
        })?;
        self.parts
            .restore_all(states)
            .map_err(|source| CheckpointError::NotRestorable {
                epoch: self.committed_epoch,
                source,
            })
    }

    fn read_page(&self, page: u64, out: &mut Page) -> Result<(), CheckpointError> {
        self.mem
            .read_slice(out, GuestAddress(page * PAGE_SIZE as u64))
            .map_err(|source| CheckpointError::Memory { page, source })
    }

    /// Initial synchronisation: applies a `PageBatch` straight into the replica
    /// (there is no committed checkpoint yet to protect; a session with one
    /// resynchronises through checkpoints instead). Each page is decoded
    /// into a scratch page first, so a bad entry leaves its page untouched.
    pub fn apply_sync_batch(
        &mut self,
        batch: &wire::PageBatchRef<'_>,
    ) -> Result<u64, CheckpointError> {
        if self.committed_epoch != 0 {
            return Err(CheckpointError::SyncAfterCommit);
        }
        let mut page: Box<Page> = Box::new([0u8; PAGE_SIZE]);
        let mut base: Box<Page> = Box::new([0u8; PAGE_SIZE]);
        let mut n = 0;
        for entry in batch.iter() {
            if entry.tag == codec::PageTag::Zero as u8 {
                self.check_page(entry.page_number)?;
                self.read_page(entry.page_number, &mut base)?;
                if codec::is_zero_page(&base) {
                    // Already zero (a fresh replica): writing would only fault it in.
                    n += 1;
                    continue;
                }
            }
            self.decode_onto_replica(&entry, &mut page)?;
            self.written = true;
            self.write_page(entry.page_number, &page[..])?;
            n += 1;
        }
        Ok(n)
    }

    /// Decodes one entry into `page`, starting from the replica's committed
    /// copy of that page (the XOR base); the replica itself is not written.
    fn decode_onto_replica(
        &self,
        entry: &wire::PageEntryRef<'_>,
        page: &mut Page,
    ) -> Result<(), CheckpointError> {
        self.check_page(entry.page_number)?;
        self.read_page(entry.page_number, page)?;
        codec::decode_page(entry.tag, entry.data, page).map_err(|source| {
            CheckpointError::Page {
                page: entry.page_number,
                source,
            }
        })?;
        Ok(())
    }

    fn check_page(&self, page: u64) -> Result<(), CheckpointError> {
        if page >= self.pages {
            return Err(CheckpointError::PageOutOfRange {
                page,
                pages: self.pages,
            });
        }
        Ok(())
    }

    fn write_page(&self, page: u64, data: &[u8]) -> Result<(), CheckpointError> {
        self.mem
            .write_slice(data, GuestAddress(page * PAGE_SIZE as u64))
            .map_err(|source| CheckpointError::Memory { page, source })
    }

    /// Verifies and commits a complete epoch. On any error nothing of the
    /// epoch reaches the replica, which still equals the previous commit.
    /// `digest` computes a full-memory digest when the epoch carries one.
    pub fn commit(
        &mut self,
        asm: &EpochAssembler,
        digest: impl Fn(&GuestMemoryMmap) -> [u8; 32],
    ) -> Result<CommitInfo, CheckpointError> {
        let epoch = asm.epoch;
        match asm.status() {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(CheckpointError::Incomplete { epoch }),
        }
        if !self.is_next(epoch) {
            return Err(CheckpointError::NotNext {
                epoch,
                committed: self.committed_epoch,
            });
        }
        let end = asm.end.ok_or(CheckpointError::Incomplete { epoch })?;
        // Staging costs up to 4 KiB per entry whatever an entry costs on the
        // wire: bound it by the guest's size, no page twice. Zero and
        // unchanged entries stage no page data at all.
        if end.page_count > self.pages {
            return Err(CheckpointError::TooManyPages {
                epoch,
                pages: end.page_count,
                guest_pages: self.pages,
            });
        }
        self.seen.clear();
        self.seen.resize(self.pages.div_ceil(64) as usize, 0);
        // 1. Decode and check everything, against the committed replica.
        self.staging_pages.clear();
        self.staging.clear();
        self.staging_zero.clear();
        if let Some(d) = &mut self.disk {
            d.begin_epoch();
        }
        let mut sections: Vec<Option<Checked>> = Vec::new();
        sections.resize_with(self.parts.len(), || None);
        let mut page: Box<Page> = Box::new([0u8; PAGE_SIZE]);
        for frame in wire::FrameIter::new(&asm.frames, &self.limits) {
            let frame = frame?;
            match frame.body {
                BodyRef::PageBatch(batch) => {
                    for entry in batch.iter() {
                        self.check_page(entry.page_number)?;
                        let (w, b) = ((entry.page_number / 64) as usize, entry.page_number % 64);
                        if self.seen[w] & (1 << b) != 0 {
                            return Err(CheckpointError::DuplicatePage {
                                epoch,
                                page: entry.page_number,
                            });
                        }
                        self.seen[w] |= 1 << b;
                        match codec::check_dataless(entry.tag, entry.data).map_err(|source| {
                            CheckpointError::Page {
                                page: entry.page_number,
                                source,
                            }
                        })? {
                            Some(PageTag::Zero) => self.staging_zero.push(entry.page_number),
                            Some(_) => {}
                            None => {
                                self.decode_onto_replica(&entry, &mut page)?;
                                self.staging_pages.push(entry.page_number);
                                self.staging.extend_from_slice(&page[..]);
                            }
                        }
                    }
                }
                BodyRef::DiskBatch(batch) => {
                    let d = self.disk.as_mut().ok_or(CheckpointError::Disk {
                        epoch,
                        source: DiskError::NoDisk,
                    })?;
                    d.stage(&batch)
                        .map_err(|source| CheckpointError::Disk { epoch, source })?;
                }
                BodyRef::Section(sec) => {
                    let (Some(pos), Some(part)) =
                        (self.parts.position(sec.part), self.parts.get(sec.part))
                    else {
                        return Err(CheckpointError::UnknownPart {
                            epoch,
                            part: sec.part,
                        });
                    };
                    if sections[pos].is_some() {
                        return Err(CheckpointError::DuplicateSection {
                            epoch,
                            part: sec.part,
                        });
                    }
                    let checked = part
                        .check(sec.version, sec.data)
                        .map_err(|source| CheckpointError::Part { epoch, source })?;
                    sections[pos] = Some(checked);
                }
                _ => {
                    return Err(CheckpointError::UnexpectedFrame {
                        epoch,
                        frame_type: frame.header.frame_type,
                    })
                }
            }
        }
        let mut states = Vec::with_capacity(sections.len());
        for (slot, part) in sections.into_iter().zip(self.parts.iter()) {
            states.push(slot.ok_or(CheckpointError::MissingSection {
                epoch,
                part: part.id(),
            })?);
        }
        // 2. The first commit of a session proves the replica restorable: a
        // dry run into the paused replica VM (never run before a takeover,
        // which restores again), while the primary is alive to be told.
        let proving = !self.proven;
        if proving {
            self.parts
                .restore_all(&states)
                .map_err(|source| CheckpointError::NotRestorable { epoch, source })?;
        }
        // 3. Apply: from here on nothing can fail short of memory access errors.
        self.written = true;
        for (i, &p) in self.staging_pages.iter().enumerate() {
            self.write_page(p, &self.staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])?;
        }
        // A page already zero is left alone: writing would only fault it in.
        for &p in &self.staging_zero {
            self.read_page(p, &mut page)?;
            if !codec::is_zero_page(&page) {
                page.fill(0);
                self.write_page(p, &page[..])?;
            }
        }
        // The disk, after the memory: written only now that the whole epoch
        // verified (and made durable when the guest flushed).
        let (mut disk_blocks, mut disk_synced) = (0, false);
        if let Some(d) = &mut self.disk {
            match d.apply() {
                Ok((n, synced)) => (disk_blocks, disk_synced) = (n, synced),
                Err(source) => {
                    // Half-applied: no longer equal to any checkpoint.
                    self.diverged = true;
                    return Err(CheckpointError::Disk { epoch, source });
                }
            }
        }
        self.committed = Some(states);
        self.committed_epoch = epoch;
        self.any_next = false;
        self.proven = true;
        let pages = (self.staging_pages.len() + self.staging_zero.len()) as u64;
        if self.staging.capacity() > STAGING_KEEP && self.staging.len() < STAGING_KEEP {
            // A large epoch (a resync) is over: give its staging back.
            self.staging = Vec::new();
            self.staging_pages = Vec::new();
        }
        if self.staging_zero.capacity() > STAGING_KEEP / PAGE_SIZE {
            self.staging_zero = Vec::new();
        }
        let mut memory_verified = false;
        if let Some(want) = end.memory_digest {
            if digest(&self.mem) != want {
                self.diverged = true;
                return Err(CheckpointError::MemoryMismatch { epoch });
            }
            memory_verified = true;
        }
        Ok(CommitInfo {
            epoch,
            pages,
            memory_verified,
            proven: proving,
            disk_blocks,
            disk_synced,
        })
    }
}

/// Which frames belong to an epoch's data (for routing on the backup).
pub fn is_epoch_frame(t: FrameType) -> bool {
    t.is_epoch_data() || t == FrameType::EpochEnd
}
