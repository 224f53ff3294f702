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

use crate::codec::{self, Page, PageEncoder};
use crate::wire::{
    self, BodyRef, EpochCheck, EpochEnd, EpochTally, Frame, FrameType, Header, Limits,
    PageBatchWriter, PAGE_SIZE,
};
use bincode::Options;
use castor_vmm::state::{VcpuState, VmDevicesState, VmShape, VmState, STATE_VERSION};
use castor_vmm::GuestMemoryMmap;
use serde::{de::DeserializeOwned, Serialize};
use vm_memory::{Bytes, GuestAddress};

/// Device id of the VM-wide KVM device state (PIC, IOAPIC, PIT, clock).
pub const VM_DEVICES_ID: &str = "kvm-vm";

/// Device id of the MMIO devices' state (virtio transports and backends).
pub const MMIO_DEVICES_ID: &str = "mmio-devices";

/// Device id of the output buffer's position (next sequence number, u64 LE).
pub const OUTPUT_ID: &str = "output";

/// Most bytes a serialized state blob may take.
pub const MAX_STATE_BYTES: u64 = 1 << 20;

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
    /// The epoch's frames disagree with its `EpochEnd`.
    #[error("epoch {epoch} failed verification: {what}")]
    Verification {
        /// The epoch.
        epoch: u64,
        /// What disagreed.
        what: String,
    },
    /// An epoch holds more buffered bytes than allowed.
    #[error("epoch {epoch} exceeds the staging cap of {cap} bytes")]
    TooLarge {
        /// The epoch.
        epoch: u64,
        /// The cap.
        cap: usize,
    },
    /// Serialized state did not decode.
    #[error("state: {0}")]
    State(String),
    /// A page lies outside guest memory.
    #[error("page {page} is outside guest memory ({pages} pages)")]
    PageOutOfRange {
        /// Page number.
        page: u64,
        /// Pages in the guest.
        pages: u64,
    },
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// After committing, the replica's memory digest differed from the
    /// primary's: the replica diverged and must be resynchronised.
    #[error("epoch {epoch}: replica memory digest differs from the primary's")]
    MemoryMismatch {
        /// The epoch whose commit was checked.
        epoch: u64,
    },
}

fn state_options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(MAX_STATE_BYTES)
}

/// Serializes a state struct for the wire.
pub fn encode_state<T: Serialize>(v: &T) -> Result<Vec<u8>, CheckpointError> {
    state_options()
        .serialize(v)
        .map_err(|e| CheckpointError::State(e.to_string()))
}

/// Deserializes untrusted state bytes, with a hard allocation cap.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CheckpointError> {
    state_options()
        .reject_trailing_bytes()
        .deserialize(bytes)
        .map_err(|e| CheckpointError::State(e.to_string()))
}

/// Everything the primary copies aside while the guest is paused.
#[derive(Debug, Default)]
pub struct StagedEpoch {
    /// Epoch number (1, 2, ...).
    pub epoch: u64,
    /// Dirty page numbers (guest-physical address / 4 KiB), ascending.
    pub pages: Vec<u64>,
    /// Their content: page `i` at `i * 4096` (the buffer may be longer: it
    /// is reused across epochs).
    pub data: Vec<u8>,
    /// The VM's state at the pause, when this epoch carries one.
    pub state: Option<VmState>,
    /// Output held and not yet acknowledged (all sealed epochs up to this one).
    pub held: Vec<(u64, Vec<u8>)>,
    /// The output buffer's next sequence number at the pause.
    pub output_next_seq: u64,
    /// Digest of all guest memory at the pause (for verification).
    pub memory_digest: Option<[u8; 32]>,
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
}

/// Primary side: turns staged epochs into frames, keeping the sent-copy cache.
#[derive(Debug)]
pub struct CheckpointEncoder {
    pages: PageEncoder,
    max_batch_bytes: usize,
}

impl CheckpointEncoder {
    /// An encoder with a last-sent cache of `cache_bytes`.
    pub fn new(cache_bytes: usize) -> Self {
        CheckpointEncoder {
            pages: PageEncoder::with_cache_bytes(cache_bytes),
            max_batch_bytes: 1 << 20,
        }
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
        let mut i = 0;
        while i < pages.len() {
            let mut w = PageBatchWriter::begin(out, epoch);
            while i < pages.len() && w.frame_len() < self.max_batch_bytes {
                let page: &Page = data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .try_into()
                    .map_err(|_| CheckpointError::Memory("staged page size".into()))?;
                let pn = pages[i];
                let enc = &mut self.pages;
                w.push_with(pn, |buf| enc.encode_page(pn, page, buf) as u8)?;
                i += 1;
            }
            let n = w.count() as u64;
            let header = w.finish()?;
            tally.add(&header, n);
        }
        Ok(())
    }

    /// Encodes a whole staged epoch: pages, state, held output into `data_out`
    /// and the `EpochEnd` frame into `end_out`.
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
        let mut push = |frame: Frame, out: &mut Vec<u8>| -> Result<Header, CheckpointError> {
            let h = frame.encode(out)?;
            tally.add(&h, 0);
            Ok(h)
        };
        if let Some(state) = &staged.state {
            for v in &state.vcpus {
                push(
                    Frame::new(
                        e,
                        wire::Body::VcpuState(wire::VcpuState {
                            vcpu_index: v.id,
                            data: encode_state(v)?,
                        }),
                    ),
                    data_out,
                )?;
            }
            push(
                Frame::new(
                    e,
                    wire::Body::DeviceState(wire::DeviceState {
                        device_id: VM_DEVICES_ID.into(),
                        data: encode_state(&state.vm)?,
                    }),
                ),
                data_out,
            )?;
            // The virtio devices (transport + backend state), when the VM has
            // any: the replica restores them at takeover (absent = none).
            if !state.devices.is_empty() {
                push(
                    Frame::new(
                        e,
                        wire::Body::DeviceState(wire::DeviceState {
                            device_id: MMIO_DEVICES_ID.into(),
                            data: encode_state(&state.devices)?,
                        }),
                    ),
                    data_out,
                )?;
            }
        }
        push(
            Frame::new(
                e,
                wire::Body::DeviceState(wire::DeviceState {
                    device_id: OUTPUT_ID.into(),
                    data: staged.output_next_seq.to_le_bytes().to_vec(),
                }),
            ),
            data_out,
        )?;
        for chunk in staged.held.chunks(4096) {
            push(
                Frame::new(
                    e,
                    wire::Body::HeldOutput(wire::HeldOutput {
                        items: chunk
                            .iter()
                            .map(|(seq, d)| wire::OutputItem {
                                seq: *seq,
                                data: d.clone(),
                            })
                            .collect(),
                    }),
                ),
                data_out,
            )?;
        }
        let end_start = end_out.len();
        Frame::new(
            e,
            wire::Body::EpochEnd(tally.epoch_end(staged.memory_digest)),
        )
        .encode(end_out)?;
        Ok(EncodedEpoch {
            pages: staged.pages.len() as u64,
            wire_bytes: (data_out.len() - start + end_out.len() - end_start) as u64,
            data_frames: tally.data_frames,
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
                    return Err(CheckpointError::Verification {
                        epoch: self.epoch,
                        what: "two EpochEnd frames".into(),
                    });
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
                return Err(CheckpointError::Verification {
                    epoch: self.epoch,
                    what: format!("unexpected {:?} frame", frame.header.frame_type),
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
            EpochCheck::Mismatch => Some(Err(CheckpointError::Verification {
                epoch: self.epoch,
                what: format!(
                    "received {} frames / {} pages / digest {:#x}, EpochEnd says {} / {} / {:#x}",
                    self.tally.data_frames,
                    self.tally.pages,
                    self.tally.digest,
                    end.data_frames,
                    end.page_count,
                    end.content_digest
                ),
            })),
        }
    }
}

/// Output a committed checkpoint holds: re-emitted by a backup that takes over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommittedOutput {
    /// (sequence number, bytes), ascending.
    pub items: Vec<(u64, Vec<u8>)>,
    /// The output buffer's next sequence number at that checkpoint.
    pub next_seq: u64,
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
}

/// The backup's replica: guest memory (owned by the backup's paused VM) plus
/// the last committed state and held output.
pub struct Replica {
    mem: GuestMemoryMmap,
    shape: VmShape,
    pages: u64,
    limits: Limits,
    committed_epoch: u64,
    /// After a (re)connection the first epoch may follow any committed one.
    any_next: bool,
    state: Option<VmState>,
    output: CommittedOutput,
    staging_pages: Vec<u64>,
    staging: Vec<u8>,
}

impl Replica {
    /// A replica over `mem` (a paused VM's memory) of the given shape.
    pub fn new(mem: GuestMemoryMmap, shape: VmShape) -> Self {
        let pages = shape.memory_end() / PAGE_SIZE as u64;
        Replica {
            mem,
            shape,
            pages,
            limits: Limits::for_guest_pages(pages),
            committed_epoch: 0,
            any_next: true,
            state: None,
            output: CommittedOutput::default(),
            staging_pages: Vec::new(),
            staging: Vec::new(),
        }
    }

    /// Decoding limits for this guest.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The last committed epoch (0: none yet).
    pub fn committed_epoch(&self) -> u64 {
        self.committed_epoch
    }

    /// Accept any epoch above the committed one next (after a `Hello`: the
    /// primary numbers epochs across sessions and resyncs incrementally).
    pub fn expect_any_next(&mut self) {
        self.any_next = true;
    }

    /// Whether `epoch` is the one to commit next.
    pub fn is_next(&self, epoch: u64) -> bool {
        epoch > self.committed_epoch && (self.any_next || epoch == self.committed_epoch + 1)
    }

    /// The last committed state, if any epoch carrying one was committed.
    pub fn state(&self) -> Option<&VmState> {
        self.state.as_ref()
    }

    /// The held output of the last committed checkpoint.
    pub fn output(&self) -> &CommittedOutput {
        &self.output
    }

    fn read_page(&self, page: u64, out: &mut Page) -> Result<(), CheckpointError> {
        self.mem
            .read_slice(out, GuestAddress(page * PAGE_SIZE as u64))
            .map_err(|e| CheckpointError::Memory(format!("reading page {page}: {e}")))
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
            return Err(CheckpointError::Verification {
                epoch: 0,
                what: "sync pages after the first commit".into(),
            });
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
            .map_err(|e| CheckpointError::Memory(format!("writing page {page}: {e}")))
    }

    /// Verifies and commits a complete epoch. On any error nothing of the
    /// epoch reaches the replica, which still equals the previous commit.
    /// `digest` computes a full-memory digest when the epoch carries one.
    pub fn commit(
        &mut self,
        asm: &EpochAssembler,
        digest: impl Fn(&GuestMemoryMmap) -> [u8; 32],
    ) -> Result<CommitInfo, CheckpointError> {
        match asm.status() {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => {
                return Err(CheckpointError::Verification {
                    epoch: asm.epoch,
                    what: "incomplete".into(),
                })
            }
        }
        let epoch = asm.epoch;
        if !self.is_next(epoch) {
            return Err(CheckpointError::Verification {
                epoch,
                what: format!("expected epoch {}", self.committed_epoch + 1),
            });
        }
        let end = asm.end.ok_or_else(|| CheckpointError::Verification {
            epoch,
            what: "no EpochEnd".into(),
        })?;
        // 1. Decode everything into staging, against the committed replica.
        self.staging_pages.clear();
        self.staging.clear();
        let mut vcpus: Vec<Option<VcpuState>> = vec![None; self.shape.vcpus as usize];
        let mut vm_devices: Option<VmDevicesState> = None;
        let mut mmio_devices: Option<Vec<castor_vmm::devices::DeviceState>> = None;
        let mut output = Vec::new();
        let mut next_seq: Option<u64> = None;
        let mut page: Box<Page> = Box::new([0u8; PAGE_SIZE]);
        for frame in wire::FrameIter::new(&asm.frames, &self.limits) {
            let frame = frame?;
            match frame.body {
                BodyRef::PageBatch(batch) => {
                    for entry in batch.iter() {
                        self.decode_onto_replica(&entry, &mut page)?;
                        self.staging_pages.push(entry.page_number);
                        self.staging.extend_from_slice(&page[..]);
                    }
                }
                BodyRef::VcpuState { vcpu_index, data } => {
                    let s: VcpuState = decode_state(data)?;
                    let slot = vcpus.get_mut(vcpu_index as usize).ok_or_else(|| {
                        CheckpointError::State(format!("vCPU {vcpu_index} out of range"))
                    })?;
                    if s.id != vcpu_index || slot.is_some() {
                        return Err(CheckpointError::State(format!(
                            "vCPU state {vcpu_index} duplicated or mislabelled"
                        )));
                    }
                    *slot = Some(s);
                }
                BodyRef::DeviceState { device_id, data } if device_id == VM_DEVICES_ID => {
                    vm_devices = Some(decode_state(data)?);
                }
                BodyRef::DeviceState { device_id, data } if device_id == MMIO_DEVICES_ID => {
                    mmio_devices = Some(decode_state(data)?);
                }
                BodyRef::DeviceState { device_id, data } if device_id == OUTPUT_ID => {
                    let b: [u8; 8] = data.try_into().map_err(|_| {
                        CheckpointError::State("output position is not 8 bytes".into())
                    })?;
                    next_seq = Some(u64::from_le_bytes(b));
                }
                BodyRef::DeviceState { device_id, .. } => {
                    return Err(CheckpointError::State(format!(
                        "unknown device {device_id:?}"
                    )))
                }
                BodyRef::HeldOutput(h) => {
                    for (seq, data) in h.iter() {
                        output.push((seq, data.to_vec()));
                    }
                }
                _ => {
                    return Err(CheckpointError::Verification {
                        epoch,
                        what: format!("{:?} among data frames", frame.header.frame_type),
                    })
                }
            }
        }
        let state = match (vm_devices, vcpus.iter().all(Option::is_some)) {
            (Some(vm), true) => Some(VmState {
                version: STATE_VERSION,
                shape: self.shape.clone(),
                vm,
                vcpus: vcpus.into_iter().flatten().collect(),
                devices: mmio_devices.unwrap_or_default(),
            }),
            (None, _) if vcpus.iter().all(Option::is_none) => None,
            _ => {
                return Err(CheckpointError::State(
                    "the epoch carries part of the VM state".into(),
                ))
            }
        };
        if state.is_none() && self.state.is_none() {
            return Err(CheckpointError::State(
                "the first checkpoint must carry the VM state".into(),
            ));
        }
        let next_seq = next_seq
            .ok_or_else(|| CheckpointError::State("the epoch carries no output position".into()))?;
        if output.last().is_some_and(|(s, _)| *s >= next_seq) {
            return Err(CheckpointError::State(
                "held output beyond the output position".into(),
            ));
        }
        let mut seqs = output.iter().map(|(s, _)| *s);
        if let Some(mut prev) = seqs.next() {
            for s in seqs {
                if s <= prev {
                    return Err(CheckpointError::Verification {
                        epoch,
                        what: "held output out of order".into(),
                    });
                }
                prev = s;
            }
        }
        // 2. Apply: from here on nothing can fail short of memory access errors.
        for (i, &p) in self.staging_pages.iter().enumerate() {
            self.write_page(p, &self.staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])?;
        }
        if let Some(s) = state {
            self.state = Some(s);
        }
        self.output = CommittedOutput {
            items: output,
            next_seq,
        };
        self.committed_epoch = epoch;
        self.any_next = false;
        let mut memory_verified = false;
        if let Some(want) = end.memory_digest {
            if digest(&self.mem) != want {
                return Err(CheckpointError::MemoryMismatch { epoch });
            }
            memory_verified = true;
        }
        Ok(CommitInfo {
            epoch,
            pages: self.staging_pages.len() as u64,
            memory_verified,
        })
    }
}

/// Which frames belong to an epoch's data (for routing on the backup).
pub fn is_epoch_frame(t: FrameType) -> bool {
    t.is_epoch_data() || t == FrameType::EpochEnd
}
