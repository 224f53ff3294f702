//! Owned frame bodies ([`Body`], [`Frame`]) and their encoding
//! ([`Frame::encode`]).

use super::writer::{begin_frame, end_frame};
use super::{FrameType, Header, WireError, MEMORY_DIGEST_LEN, PROTOCOL_VERSION};
use castor_parts::{PartId, VersionRange};

/// Which side of the replication pair a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The running VM.
    Primary,
    /// The standby replica.
    Backup,
}

impl Role {
    pub(super) fn to_u8(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Backup => 2,
        }
    }
    pub(super) fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            1 => Ok(Role::Primary),
            2 => Ok(Role::Backup),
            got => Err(WireError::UnknownRole { got }),
        }
    }
}

/// Session handshake: each side sends one on the control stream first. Its
/// layout is the same in every protocol version from 2 on (so two peers can
/// always read each other's `Hello` to agree on a version); the primary
/// sends its own range, the backup answers with the one version chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol versions the sender speaks (the backup's reply: exactly the
    /// version chosen for the session).
    pub versions: VersionRange,
    /// Sender's role.
    pub role: Role,
    /// Dirty-page tracker name (short, e.g. `"bitmap"`).
    pub tracker: String,
    /// Epoch interval in milliseconds.
    pub epoch_interval_ms: u32,
    /// Session identifier (random per replication session).
    pub session_id: u64,
    /// Primary: its last acknowledged epoch; backup: its committed epoch.
    pub resume_from_epoch: u64,
    /// The sender's fencing generation (0: no witness).
    pub generation: u64,
    /// Primary: the encoded manifest (see `crate::manifest`); backup: empty.
    pub manifest: Vec<u8>,
}

/// One encoded page (owned form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageEntry {
    /// Guest page frame number (guest physical address / 4096).
    pub page_number: u64,
    /// Codec tag (see `codec::PageTag`).
    pub tag: u8,
    /// Encoded page data (at most `u16::MAX` bytes).
    pub data: Vec<u8>,
}

/// Encoded dirty pages (owned form; to build batches without copies use
/// [`PageBatchWriter`](super::PageBatchWriter)).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageBatch {
    /// The entries.
    pub pages: Vec<PageEntry>,
}

/// One part's state at the epoch's pause (owned form; to encode without a
/// copy use [`SectionWriter`](super::SectionWriter)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Whose state.
    pub part: PartId,
    /// The section's own format version.
    pub version: u16,
    /// The encoded state.
    pub data: Vec<u8>,
}

/// `DiskBatch` flag: the guest completed a FLUSH during the epoch (the
/// backup makes its image durable before acknowledging it).
pub const DISK_FLAG_FLUSH: u32 = 1;

/// Disk blocks written during an epoch (owned form; the entries use the
/// `PageBatch` entry layout with the block number in place of the page
/// number).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskBatch {
    /// [`DISK_FLAG_FLUSH`] or 0.
    pub flags: u32,
    /// The entries (`page_number` is the 4 KiB block number).
    pub blocks: PageBatch,
}

/// End of an epoch's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEnd {
    /// Number of page entries in the epoch's `PageBatch` frames.
    pub page_count: u64,
    /// Number of data frames (see [`FrameType::is_epoch_data`]) in the epoch.
    pub data_frames: u32,
    /// Order-independent digest of the epoch's data frames (see [`EpochTally`](super::EpochTally)).
    pub content_digest: u64,
    /// Optional digest of all guest memory after this epoch.
    pub memory_digest: Option<[u8; MEMORY_DIGEST_LEN]>,
}

/// Liveness message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Sender's clock, nanoseconds.
    pub sent_at_nanos: u64,
    /// Last epoch the sender knows to be committed.
    pub last_committed_epoch: u64,
    /// The sender's fencing generation (protocol 3; 0 when read from 2).
    pub generation: u64,
}

/// Fatal error report (owned form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Error code.
    pub code: u16,
    /// Human-readable message.
    pub message: String,
}

/// An owned frame body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`PageBatch`].
    PageBatch(PageBatch),
    /// See [`Section`].
    Section(Section),
    /// See [`DiskBatch`].
    DiskBatch(DiskBatch),
    /// See [`EpochEnd`].
    EpochEnd(EpochEnd),
    /// Acknowledges the frame's epoch.
    Ack,
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`ErrorFrame`].
    Error(ErrorFrame),
}

impl Body {
    /// The frame type of this body.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Body::Hello(_) => FrameType::Hello,
            Body::PageBatch(_) => FrameType::PageBatch,
            Body::Section(_) => FrameType::Section,
            Body::DiskBatch(_) => FrameType::DiskBatch,
            Body::EpochEnd(_) => FrameType::EpochEnd,
            Body::Ack => FrameType::Ack,
            Body::Heartbeat(_) => FrameType::Heartbeat,
            Body::Error(_) => FrameType::Error,
        }
    }
}

/// An owned frame: epoch (from the header) and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Epoch carried in the header.
    pub epoch: u64,
    /// The body.
    pub body: Body,
}

fn encode_entries(b: &PageBatch, buf: &mut Vec<u8>) -> Result<(), WireError> {
    let count = count_u32(b.pages.len(), "page batch")?;
    buf.extend_from_slice(&count.to_le_bytes());
    for p in &b.pages {
        let len = u16::try_from(p.data.len()).map_err(|_| WireError::PayloadTooLarge {
            len: p.data.len() as u64,
            cap: u16::MAX.into(),
        })?;
        buf.extend_from_slice(&p.page_number.to_le_bytes());
        buf.push(p.tag);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&p.data);
    }
    Ok(())
}

fn count_u32(n: usize, what: &'static str) -> Result<u32, WireError> {
    u32::try_from(n).map_err(|_| WireError::TooManyEntries {
        what,
        count: n as u64,
        cap: u32::MAX.into(),
    })
}

impl Frame {
    /// Creates a frame.
    pub fn new(epoch: u64, body: Body) -> Self {
        Frame { epoch, body }
    }

    /// Appends the encoded frame to `buf` and returns its header.
    ///
    /// Fails only for bodies the format cannot represent (a tracker name or
    /// device id over 255 bytes, an error message over 65535 bytes, a page
    /// entry over 65535 bytes, a payload over 4 GiB); `buf` is then left as it
    /// was.
    pub fn encode(&self, buf: &mut Vec<u8>) -> Result<Header, WireError> {
        self.encode_at(PROTOCOL_VERSION, buf)
    }

    /// [`Frame::encode`] in protocol `version` (the one negotiated).
    pub fn encode_at(&self, version: u16, buf: &mut Vec<u8>) -> Result<Header, WireError> {
        let start = begin_frame(buf);
        if let Err(e) = self.encode_payload(version, buf) {
            buf.truncate(start);
            return Err(e);
        }
        end_frame(buf, start, self.body.frame_type(), self.epoch, version)
    }

    fn encode_payload(&self, version: u16, buf: &mut Vec<u8>) -> Result<(), WireError> {
        match &self.body {
            Body::Hello(h) => {
                let tracker_len =
                    u8::try_from(h.tracker.len()).map_err(|_| WireError::StringTooLong {
                        what: "tracker name",
                        len: h.tracker.len(),
                        cap: u8::MAX.into(),
                    })?;
                let manifest_len = count_u32(h.manifest.len(), "manifest bytes")?;
                buf.extend_from_slice(&h.versions.min.to_le_bytes());
                buf.extend_from_slice(&h.versions.max.to_le_bytes());
                buf.push(h.role.to_u8());
                buf.push(tracker_len);
                buf.extend_from_slice(&[0, 0]);
                buf.extend_from_slice(&h.epoch_interval_ms.to_le_bytes());
                buf.extend_from_slice(&h.session_id.to_le_bytes());
                buf.extend_from_slice(&h.resume_from_epoch.to_le_bytes());
                buf.extend_from_slice(&h.generation.to_le_bytes());
                buf.extend_from_slice(&manifest_len.to_le_bytes());
                buf.extend_from_slice(h.tracker.as_bytes());
                buf.extend_from_slice(&h.manifest);
            }
            Body::PageBatch(b) => encode_entries(b, buf)?,
            Body::DiskBatch(d) => {
                buf.extend_from_slice(&d.flags.to_le_bytes());
                encode_entries(&d.blocks, buf)?;
            }
            Body::Section(sec) => {
                buf.extend_from_slice(&sec.part.kind.as_u16().to_le_bytes());
                buf.extend_from_slice(&sec.part.instance.to_le_bytes());
                buf.extend_from_slice(&sec.version.to_le_bytes());
                buf.extend_from_slice(&sec.data);
            }
            Body::EpochEnd(e) => {
                buf.extend_from_slice(&e.page_count.to_le_bytes());
                buf.extend_from_slice(&e.data_frames.to_le_bytes());
                let flags: u32 = u32::from(e.memory_digest.is_some());
                buf.extend_from_slice(&flags.to_le_bytes());
                buf.extend_from_slice(&e.content_digest.to_le_bytes());
                if let Some(d) = &e.memory_digest {
                    buf.extend_from_slice(d);
                }
            }
            Body::Ack => {}
            Body::Heartbeat(h) => {
                buf.extend_from_slice(&h.sent_at_nanos.to_le_bytes());
                buf.extend_from_slice(&h.last_committed_epoch.to_le_bytes());
                if version >= 3 {
                    buf.extend_from_slice(&h.generation.to_le_bytes());
                }
            }
            Body::Error(e) => {
                let len = u16::try_from(e.message.len()).map_err(|_| WireError::StringTooLong {
                    what: "error message",
                    len: e.message.len(),
                    cap: u16::MAX.into(),
                })?;
                buf.extend_from_slice(&e.code.to_le_bytes());
                buf.extend_from_slice(&len.to_le_bytes());
                buf.extend_from_slice(e.message.as_bytes());
            }
        }
        Ok(())
    }
}
