//! Castor's replication wire protocol: fixed, versioned frame headers
//! followed by a typed payload.
//!
//! Every message between the primary and the backup is a *frame*: a 32-byte
//! header followed by `payload_len` bytes of payload. All integers are
//! little-endian. The header layout is frozen across protocol versions so a
//! peer can always parse the header and report [`WireError::UnsupportedVersion`]
//! instead of garbage.
//!
//! # Header (32 bytes)
//!
//! | Offset | Size | Field         | Notes                                               |
//! |-------:|-----:|---------------|-----------------------------------------------------|
//! | 0      | 4    | magic         | `b"CSTR"`                                           |
//! | 4      | 2    | version       | protocol version, currently [`PROTOCOL_VERSION`] = 1 |
//! | 6      | 2    | frame type    | see [`FrameType`]                                   |
//! | 8      | 8    | epoch         | epoch the frame belongs to (`Ack`: the acked epoch)  |
//! | 16     | 4    | payload_len   | bytes after the header; `<= Limits::max_payload`    |
//! | 20     | 4    | payload_crc   | CRC-32 (IEEE, `crc32fast`) of the payload bytes     |
//! | 24     | 4    | reserved      | must be zero                                        |
//! | 28     | 4    | header_crc    | CRC-32 of header bytes `0..28`                      |
//!
//! Decoding checks, in order: magic (also on a partial header), header CRC,
//! version, frame type, reserved == 0, `payload_len <= max_payload`, that the
//! whole payload is present (else [`WireError::Incomplete`] with the number of
//! missing bytes), payload CRC, then the payload structure. Any byte string
//! decodes to a frame or a typed error; nothing is allocated before the
//! relevant length has been checked against [`Limits`].
//!
//! # Payloads
//!
//! Strings are UTF-8 with the stated length prefix. "rest" means "all
//! remaining payload bytes". Every payload must be consumed exactly; extra
//! bytes are [`WireError::Malformed`].
//!
//! | Type | Name          | Payload layout                                                                                     |
//! |-----:|---------------|----------------------------------------------------------------------------------------------------|
//! | 1    | `Hello`       | `protocol_version u16, role u8 (1 primary, 2 backup), tracker_len u8, vcpus u32, epoch_interval_ms u32, region_count u32, session_id u64, resume_from_epoch u64, tracker [tracker_len], regions [region_count × (guest_addr u64, size u64)]` |
//! | 2    | `PageBatch`   | `count u32`, then `count ×` entry: `page_number u64, tag u8, len u16, data [len]` (tag/data: see `codec`) |
//! | 3    | `VcpuState`   | `vcpu_index u32, data [rest]` (opaque serialized vCPU state)                                       |
//! | 4    | `DeviceState` | `id_len u8, device_id [id_len], data [rest]` (opaque serialized device state)                     |
//! | 5    | `HeldOutput`  | `count u32`, then `count ×` item: `seq u64, len u32, data [len]`                                    |
//! | 6    | `EpochEnd`    | `page_count u64, data_frames u32, flags u32 (bit 0: memory digest present), content_digest u64, [memory_digest 32 bytes if bit 0]` |
//! | 7    | `Ack`         | empty; the acked epoch is the header's epoch                                                       |
//! | 8    | `Heartbeat`   | `sent_at_nanos u64, last_committed_epoch u64`                                                     |
//! | 9    | `Error`       | `code u16, message_len u16, message [message_len]`                                                |
//!
//! # Epoch completeness and the content digest
//!
//! The *data frames* of an epoch are its `PageBatch`, `VcpuState`,
//! `DeviceState` and `HeldOutput` frames (all carry the epoch in the header).
//! They may travel on several streams, so they can arrive in any interleaving.
//! `EpochEnd` (sent last, on the control stream, after all data-stream writes
//! of the epoch have completed) carries the number of data frames, the number
//! of page entries and `content_digest`: the wrapping sum over the epoch's data
//! frames of `mix64(mix64(payload_crc | payload_len << 32) ^ frame_type)`
//! (`mix64` = the SplitMix64 finalizer). The sum is order-independent, so the
//! receiver can check it regardless of how frames were spread across streams;
//! it detects a lost, duplicated or foreign frame. Payload integrity itself is
//! guaranteed by each frame's CRC. See [`EpochTally`].
//!
//! `memory_digest` (optional, for periodic full-memory verification) is a
//! 32-byte digest of all guest memory after applying the epoch; the wire
//! format does not interpret it (Castor uses SHA-256 over the regions in
//! order).
//!
//! # Example
//!
//! ```
//! use castor_replicator::wire::{self, Body, Frame, Heartbeat, Limits};
//!
//! let frame = Frame {
//!     epoch: 7,
//!     body: Body::Heartbeat(Heartbeat { sent_at_nanos: 1, last_committed_epoch: 6 }),
//! };
//! let mut buf = Vec::new();
//! frame.encode(&mut buf).unwrap();
//! let (decoded, used) = wire::decode(&buf, &Limits::default()).unwrap();
//! assert_eq!(used, buf.len());
//! assert_eq!(decoded.to_owned(), frame);
//!
//! // A short buffer says how much more is needed (here: the last 8 bytes).
//! assert_eq!(
//!     wire::decode(&buf[..40], &Limits::default()).unwrap_err(),
//!     wire::WireError::Incomplete { needed: 8 },
//! );
//! ```

use std::fmt;

use thiserror::Error;

/// Frame magic, the first four bytes of every header.
pub const MAGIC: [u8; 4] = *b"CSTR";
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 32;
/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// Size of the optional full-memory digest carried by `EpochEnd`.
pub const MEMORY_DIGEST_LEN: usize = 32;
/// Fixed size of a `PageBatch` entry before its data.
pub const PAGE_ENTRY_OVERHEAD: usize = 8 + 1 + 2;

const HELLO_FIXED_LEN: usize = 32;
const EPOCH_END_FIXED_LEN: usize = 24;
const REGION_LEN: usize = 16;

/// Errors produced while decoding (or, rarely, encoding) frames.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The buffer ends before the frame does; `needed` more bytes are required
    /// (at least: for a partial header, only the header's remainder is counted).
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete {
        /// Additional bytes required beyond the buffer given.
        needed: usize,
    },
    /// The first bytes are not [`MAGIC`] (missing bytes of a partial header are shown as 0).
    #[error("bad frame magic {got:02x?}")]
    BadMagic {
        /// The bytes found.
        got: [u8; 4],
    },
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {got} (supported: {supported})")]
    UnsupportedVersion {
        /// Version in the header.
        got: u16,
        /// Version this build supports.
        supported: u16,
    },
    /// Unknown frame type number.
    #[error("unknown frame type {got}")]
    UnknownFrameType {
        /// The type number found.
        got: u16,
    },
    /// The header CRC does not match.
    #[error("header checksum mismatch (expected {expected:#010x}, computed {actual:#010x})")]
    HeaderChecksum {
        /// CRC stored in the header.
        expected: u32,
        /// CRC computed over the header.
        actual: u32,
    },
    /// The payload CRC does not match.
    #[error("payload checksum mismatch (expected {expected:#010x}, computed {actual:#010x})")]
    PayloadChecksum {
        /// CRC stored in the header.
        expected: u32,
        /// CRC computed over the payload.
        actual: u32,
    },
    /// The payload is larger than the configured cap.
    #[error("payload of {len} bytes exceeds the cap of {cap} bytes")]
    PayloadTooLarge {
        /// Declared (or attempted) payload length.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// The payload structure is invalid.
    #[error("malformed frame: {what}")]
    Malformed {
        /// What was wrong.
        what: &'static str,
    },
    /// A page number is not below `Limits::max_page_count`.
    #[error("page number {page} out of range (guest has {limit} pages)")]
    PageOutOfRange {
        /// The page number.
        page: u64,
        /// The limit.
        limit: u64,
    },
    /// A string is longer than allowed.
    #[error("{what} is {len} bytes long, the limit is {cap}")]
    StringTooLong {
        /// Which string.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        cap: usize,
    },
    /// A string is not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which string.
        what: &'static str,
    },
    /// A list has more entries than allowed.
    #[error("{what}: {count} entries, the limit is {cap}")]
    TooManyEntries {
        /// Which list.
        what: &'static str,
        /// Declared count.
        count: u64,
        /// The limit.
        cap: u64,
    },
    /// An unknown role byte in `Hello`.
    #[error("unknown role {got}")]
    UnknownRole {
        /// The role byte.
        got: u8,
    },
}

/// Decoder limits; everything the peer declares is checked against these
/// before anything is allocated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest accepted payload, in bytes.
    pub max_payload: u32,
    /// Page numbers must be `< max_page_count` (set it to the guest's page count).
    pub max_page_count: u64,
    /// Most entries in one `PageBatch`.
    pub max_batch_entries: u32,
    /// Most memory regions in `Hello`.
    pub max_regions: u32,
    /// Most items in one `HeldOutput`.
    pub max_output_items: u32,
    /// Longest tracker name / device id.
    pub max_name_len: usize,
    /// Longest `Error` message.
    pub max_message_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 16 << 20,
            max_page_count: 1 << 52,
            max_batch_entries: 1 << 16,
            max_regions: 256,
            max_output_items: 1 << 16,
            max_name_len: 64,
            max_message_len: 4096,
        }
    }
}

impl Limits {
    /// Default limits with page numbers restricted to a guest of `page_count` pages.
    pub fn for_guest_pages(page_count: u64) -> Self {
        Limits {
            max_page_count: page_count,
            ..Limits::default()
        }
    }
}

/// Frame type numbers (header offset 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameType {
    /// Session handshake.
    Hello = 1,
    /// Encoded dirty pages.
    PageBatch = 2,
    /// One vCPU's opaque state.
    VcpuState = 3,
    /// One device's opaque state.
    DeviceState = 4,
    /// Guest output held back until the epoch is acked.
    HeldOutput = 5,
    /// End-of-epoch marker with counts and digests.
    EpochEnd = 6,
    /// Backup acknowledges a committed epoch.
    Ack = 7,
    /// Liveness.
    Heartbeat = 8,
    /// Fatal error report.
    Error = 9,
}

impl FrameType {
    /// Maps a type number to a frame type.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => FrameType::Hello,
            2 => FrameType::PageBatch,
            3 => FrameType::VcpuState,
            4 => FrameType::DeviceState,
            5 => FrameType::HeldOutput,
            6 => FrameType::EpochEnd,
            7 => FrameType::Ack,
            8 => FrameType::Heartbeat,
            9 => FrameType::Error,
            _ => return None,
        })
    }

    /// True for the frames counted by `EpochEnd` (pages, vCPU, device, output).
    pub fn is_epoch_data(self) -> bool {
        matches!(
            self,
            FrameType::PageBatch
                | FrameType::VcpuState
                | FrameType::DeviceState
                | FrameType::HeldOutput
        )
    }
}

/// A parsed and validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version (always [`PROTOCOL_VERSION`] once parsed).
    pub version: u16,
    /// Frame type.
    pub frame_type: FrameType,
    /// Epoch.
    pub epoch: u64,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// CRC-32 of the payload.
    pub payload_crc: u32,
}

impl Header {
    /// Parses and validates the header at the start of `bytes`.
    ///
    /// Needs [`HEADER_LEN`] bytes (else `Incomplete`, or `BadMagic` if the bytes
    /// present already disagree with the magic). Does not look at the payload.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Header, WireError> {
        let n = bytes.len().min(MAGIC.len());
        if bytes[..n] != MAGIC[..n] {
            let mut got = [0u8; 4];
            got[..n].copy_from_slice(&bytes[..n]);
            return Err(WireError::BadMagic { got });
        }
        let Some(h) = bytes.get(..HEADER_LEN) else {
            return Err(WireError::Incomplete {
                needed: HEADER_LEN - bytes.len(),
            });
        };
        let stored_crc = le_u32(h, 28);
        let actual = crc32fast::hash(&h[..28]);
        if stored_crc != actual {
            return Err(WireError::HeaderChecksum {
                expected: stored_crc,
                actual,
            });
        }
        let version = le_u16(h, 4);
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion {
                got: version,
                supported: PROTOCOL_VERSION,
            });
        }
        let ty = le_u16(h, 6);
        let frame_type = FrameType::from_u16(ty).ok_or(WireError::UnknownFrameType { got: ty })?;
        if le_u32(h, 24) != 0 {
            return Err(WireError::Malformed {
                what: "reserved header field is not zero",
            });
        }
        let payload_len = le_u32(h, 16);
        if payload_len > limits.max_payload {
            return Err(WireError::PayloadTooLarge {
                len: payload_len.into(),
                cap: limits.max_payload.into(),
            });
        }
        Ok(Header {
            version,
            frame_type,
            epoch: le_u64(h, 8),
            payload_len,
            payload_crc: le_u32(h, 20),
        })
    }

    /// Total frame length (header + payload).
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    /// Serializes the header (computing the header CRC).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&self.version.to_le_bytes());
        h[6..8].copy_from_slice(&(self.frame_type as u16).to_le_bytes());
        h[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        h[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        h[20..24].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        h
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

// ---------------------------------------------------------------------------
// Payload types
// ---------------------------------------------------------------------------

/// Which side of the replication pair a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The running VM.
    Primary,
    /// The standby replica.
    Backup,
}

impl Role {
    fn to_u8(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Backup => 2,
        }
    }
    fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            1 => Ok(Role::Primary),
            2 => Ok(Role::Backup),
            got => Err(WireError::UnknownRole { got }),
        }
    }
}

/// A guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryRegion {
    /// Guest physical start address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Session handshake: each side sends one on the control stream first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the sender speaks.
    pub protocol_version: u16,
    /// Sender's role.
    pub role: Role,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory layout.
    pub memory_regions: Vec<MemoryRegion>,
    /// Dirty-page tracker name (short, e.g. `"kvm-dirty-log"`).
    pub tracker: String,
    /// Epoch interval in milliseconds.
    pub epoch_interval_ms: u32,
    /// Session identifier (random per replication session).
    pub session_id: u64,
    /// First epoch the sender expects to send/receive (0 for a fresh session).
    pub resume_from_epoch: u64,
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
/// [`PageBatchWriter`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageBatch {
    /// The entries.
    pub pages: Vec<PageEntry>,
}

/// One vCPU's opaque state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuState {
    /// vCPU index.
    pub vcpu_index: u32,
    /// Serialized state.
    pub data: Vec<u8>,
}

/// One device's opaque state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// Device identifier (e.g. `"serial0"`).
    pub device_id: String,
    /// Serialized state.
    pub data: Vec<u8>,
}

/// One held output record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputItem {
    /// Sequence number.
    pub seq: u64,
    /// Output bytes.
    pub data: Vec<u8>,
}

/// Output the guest emitted during the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeldOutput {
    /// The items.
    pub items: Vec<OutputItem>,
}

/// End of an epoch's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEnd {
    /// Number of page entries in the epoch's `PageBatch` frames.
    pub page_count: u64,
    /// Number of data frames (see [`FrameType::is_epoch_data`]) in the epoch.
    pub data_frames: u32,
    /// Order-independent digest of the epoch's data frames (see [`EpochTally`]).
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
    /// See [`VcpuState`].
    VcpuState(VcpuState),
    /// See [`DeviceState`].
    DeviceState(DeviceState),
    /// See [`HeldOutput`].
    HeldOutput(HeldOutput),
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
            Body::VcpuState(_) => FrameType::VcpuState,
            Body::DeviceState(_) => FrameType::DeviceState,
            Body::HeldOutput(_) => FrameType::HeldOutput,
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

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Starts a frame in `buf`: reserves the header; returns the frame start.
fn begin_frame(buf: &mut Vec<u8>) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER_LEN]);
    start
}

/// Completes a frame started by [`begin_frame`]: checks the length, computes
/// the CRCs and writes the header. On error `buf` is truncated to `start`.
fn end_frame(
    buf: &mut Vec<u8>,
    start: usize,
    frame_type: FrameType,
    epoch: u64,
) -> Result<Header, WireError> {
    let payload_len = buf.len() - start - HEADER_LEN;
    let Ok(len32) = u32::try_from(payload_len) else {
        buf.truncate(start);
        return Err(WireError::PayloadTooLarge {
            len: payload_len as u64,
            cap: u32::MAX.into(),
        });
    };
    let header = Header {
        version: PROTOCOL_VERSION,
        frame_type,
        epoch,
        payload_len: len32,
        payload_crc: crc32fast::hash(&buf[start + HEADER_LEN..]),
    };
    buf[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok(header)
}

fn put_u8_str(buf: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), WireError> {
    let len = u8::try_from(s.len()).map_err(|_| WireError::StringTooLong {
        what,
        len: s.len(),
        cap: u8::MAX.into(),
    })?;
    buf.push(len);
    buf.extend_from_slice(s.as_bytes());
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
        let start = begin_frame(buf);
        if let Err(e) = self.encode_payload(buf) {
            buf.truncate(start);
            return Err(e);
        }
        end_frame(buf, start, self.body.frame_type(), self.epoch)
    }

    fn encode_payload(&self, buf: &mut Vec<u8>) -> Result<(), WireError> {
        match &self.body {
            Body::Hello(h) => {
                let tracker_len =
                    u8::try_from(h.tracker.len()).map_err(|_| WireError::StringTooLong {
                        what: "tracker name",
                        len: h.tracker.len(),
                        cap: u8::MAX.into(),
                    })?;
                let regions = count_u32(h.memory_regions.len(), "memory regions")?;
                buf.extend_from_slice(&h.protocol_version.to_le_bytes());
                buf.push(h.role.to_u8());
                buf.push(tracker_len);
                buf.extend_from_slice(&h.vcpus.to_le_bytes());
                buf.extend_from_slice(&h.epoch_interval_ms.to_le_bytes());
                buf.extend_from_slice(&regions.to_le_bytes());
                buf.extend_from_slice(&h.session_id.to_le_bytes());
                buf.extend_from_slice(&h.resume_from_epoch.to_le_bytes());
                buf.extend_from_slice(h.tracker.as_bytes());
                for r in &h.memory_regions {
                    buf.extend_from_slice(&r.guest_addr.to_le_bytes());
                    buf.extend_from_slice(&r.size.to_le_bytes());
                }
            }
            Body::PageBatch(b) => {
                let count = count_u32(b.pages.len(), "page batch")?;
                buf.extend_from_slice(&count.to_le_bytes());
                for p in &b.pages {
                    let len =
                        u16::try_from(p.data.len()).map_err(|_| WireError::PayloadTooLarge {
                            len: p.data.len() as u64,
                            cap: u16::MAX.into(),
                        })?;
                    buf.extend_from_slice(&p.page_number.to_le_bytes());
                    buf.push(p.tag);
                    buf.extend_from_slice(&len.to_le_bytes());
                    buf.extend_from_slice(&p.data);
                }
            }
            Body::VcpuState(v) => {
                buf.extend_from_slice(&v.vcpu_index.to_le_bytes());
                buf.extend_from_slice(&v.data);
            }
            Body::DeviceState(d) => {
                put_u8_str(buf, &d.device_id, "device id")?;
                buf.extend_from_slice(&d.data);
            }
            Body::HeldOutput(o) => {
                let count = count_u32(o.items.len(), "held output")?;
                buf.extend_from_slice(&count.to_le_bytes());
                for it in &o.items {
                    let len = count_u32(it.data.len(), "held output item bytes")?;
                    buf.extend_from_slice(&it.seq.to_le_bytes());
                    buf.extend_from_slice(&len.to_le_bytes());
                    buf.extend_from_slice(&it.data);
                }
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

/// Builds a `PageBatch` frame in place in a caller's buffer, so encoded pages
/// are written once, directly where they will be sent from.
///
/// ```
/// use castor_replicator::wire::{self, BodyRef, Limits, PageBatchWriter};
///
/// let mut buf = Vec::new();
/// let mut w = PageBatchWriter::begin(&mut buf, 3);
/// w.push(10, 0, &[]).unwrap();
/// w.push_with(11, |out| { out.extend_from_slice(&[1, 2, 3]); 2 }).unwrap();
/// let header = w.finish().unwrap();
/// assert_eq!(header.frame_len(), buf.len());
///
/// let (frame, _) = wire::decode(&buf, &Limits::default()).unwrap();
/// let BodyRef::PageBatch(batch) = frame.body else { panic!() };
/// let pages: Vec<_> = batch.iter().map(|p| (p.page_number, p.tag, p.data.len())).collect();
/// assert_eq!(pages, vec![(10, 0, 0), (11, 2, 3)]);
/// ```
#[derive(Debug)]
pub struct PageBatchWriter<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
    epoch: u64,
    count: u32,
}

impl<'b> PageBatchWriter<'b> {
    /// Starts a `PageBatch` frame for `epoch` at the end of `buf`.
    pub fn begin(buf: &'b mut Vec<u8>, epoch: u64) -> Self {
        let start = begin_frame(buf);
        buf.extend_from_slice(&0u32.to_le_bytes());
        PageBatchWriter {
            buf,
            start,
            epoch,
            count: 0,
        }
    }

    /// Number of entries so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Current frame length in bytes (header included).
    pub fn frame_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends an entry with the given encoded data.
    pub fn push(&mut self, page_number: u64, tag: u8, data: &[u8]) -> Result<(), WireError> {
        self.push_with(page_number, |out| {
            out.extend_from_slice(data);
            tag
        })
    }

    /// Appends an entry whose data is written by `encode` (which appends the
    /// encoded bytes to the vector it is given and returns the tag). Fails,
    /// removing the entry, if the data exceeds 65535 bytes or the batch has
    /// `u32::MAX` entries.
    pub fn push_with(
        &mut self,
        page_number: u64,
        encode: impl FnOnce(&mut Vec<u8>) -> u8,
    ) -> Result<(), WireError> {
        if self.count == u32::MAX {
            return Err(WireError::TooManyEntries {
                what: "page batch",
                count: u64::from(self.count) + 1,
                cap: u32::MAX.into(),
            });
        }
        let entry = self.buf.len();
        self.buf.extend_from_slice(&page_number.to_le_bytes());
        self.buf.extend_from_slice(&[0u8; 3]);
        let tag = encode(self.buf);
        let data_len = self.buf.len() - entry - PAGE_ENTRY_OVERHEAD;
        let Ok(len16) = u16::try_from(data_len) else {
            self.buf.truncate(entry);
            return Err(WireError::PayloadTooLarge {
                len: data_len as u64,
                cap: u16::MAX.into(),
            });
        };
        self.buf[entry + 8] = tag;
        self.buf[entry + 9..entry + 11].copy_from_slice(&len16.to_le_bytes());
        self.count += 1;
        Ok(())
    }

    /// Writes the entry count and header; returns the header.
    pub fn finish(self) -> Result<Header, WireError> {
        let at = self.start + HEADER_LEN;
        self.buf[at..at + 4].copy_from_slice(&self.count.to_le_bytes());
        end_frame(self.buf, self.start, FrameType::PageBatch, self.epoch)
    }

    /// Abandons the batch, removing it from the buffer.
    pub fn abort(self) {
        self.buf.truncate(self.start);
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(WireError::Malformed { what })?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(WireError::Malformed { what })?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn str(&mut self, len: usize, what: &'static str) -> Result<&'a str, WireError> {
        let b = self.bytes(len, what)?;
        std::str::from_utf8(b).map_err(|_| WireError::InvalidUtf8 { what })
    }

    fn finish(&self, what: &'static str) -> Result<(), WireError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(WireError::Malformed { what })
        }
    }
}

/// One page entry of a borrowed `PageBatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntryRef<'a> {
    /// Guest page frame number (`< Limits::max_page_count`).
    pub page_number: u64,
    /// Codec tag.
    pub tag: u8,
    /// Encoded data.
    pub data: &'a [u8],
}

/// A validated, borrowed `PageBatch` payload; iterate with [`PageBatchRef::iter`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PageBatchRef<'a> {
    count: u32,
    entries: &'a [u8],
}

impl fmt::Debug for PageBatchRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBatchRef")
            .field("count", &self.count)
            .field("bytes", &self.entries.len())
            .finish()
    }
}

impl<'a> PageBatchRef<'a> {
    fn parse(payload: &'a [u8], limits: &Limits) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload);
        let count = c.u32("page batch count")?;
        if count > limits.max_batch_entries {
            return Err(WireError::TooManyEntries {
                what: "page batch",
                count: count.into(),
                cap: limits.max_batch_entries.into(),
            });
        }
        let entries = c.rest();
        // Validate every entry once so iteration is infallible.
        let mut e = Cursor::new(entries);
        for _ in 0..count {
            let page = e.u64("page entry")?;
            if page >= limits.max_page_count {
                return Err(WireError::PageOutOfRange {
                    page,
                    limit: limits.max_page_count,
                });
            }
            let _tag = e.u8("page entry")?;
            let len = e.u16("page entry")?;
            e.bytes(len.into(), "page entry data")?;
        }
        e.finish("trailing bytes after page batch")?;
        Ok(PageBatchRef { count, entries })
    }

    /// Number of entries.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// True if the batch has no entries.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Iterates over the entries without copying.
    pub fn iter(&self) -> PageIter<'a> {
        PageIter {
            cursor: Cursor::new(self.entries),
            left: self.count,
        }
    }

    /// Copies the batch into its owned form.
    pub fn to_owned(&self) -> PageBatch {
        PageBatch {
            pages: self
                .iter()
                .map(|p| PageEntry {
                    page_number: p.page_number,
                    tag: p.tag,
                    data: p.data.to_vec(),
                })
                .collect(),
        }
    }
}

impl<'a> IntoIterator for PageBatchRef<'a> {
    type Item = PageEntryRef<'a>;
    type IntoIter = PageIter<'a>;
    fn into_iter(self) -> PageIter<'a> {
        self.iter()
    }
}

/// Iterator over a [`PageBatchRef`].
pub struct PageIter<'a> {
    cursor: Cursor<'a>,
    left: u32,
}

impl<'a> Iterator for PageIter<'a> {
    type Item = PageEntryRef<'a>;

    fn next(&mut self) -> Option<PageEntryRef<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let c = &mut self.cursor;
        // Validated at parse time; `ok()?` only guards against the impossible.
        let page_number = c.u64("").ok()?;
        let tag = c.u8("").ok()?;
        let len = c.u16("").ok()?;
        let data = c.bytes(len.into(), "").ok()?;
        Some(PageEntryRef {
            page_number,
            tag,
            data,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

/// Borrowed `HeldOutput` payload.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HeldOutputRef<'a> {
    count: u32,
    items: &'a [u8],
}

impl fmt::Debug for HeldOutputRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldOutputRef")
            .field("count", &self.count)
            .field("bytes", &self.items.len())
            .finish()
    }
}

impl<'a> HeldOutputRef<'a> {
    fn parse(payload: &'a [u8], limits: &Limits) -> Result<Self, WireError> {
        let mut c = Cursor::new(payload);
        let count = c.u32("held output count")?;
        if count > limits.max_output_items {
            return Err(WireError::TooManyEntries {
                what: "held output",
                count: count.into(),
                cap: limits.max_output_items.into(),
            });
        }
        let items = c.rest();
        let mut e = Cursor::new(items);
        for _ in 0..count {
            e.u64("held output item")?;
            let len = e.u32("held output item")?;
            e.bytes(len as usize, "held output item data")?;
        }
        e.finish("trailing bytes after held output")?;
        Ok(HeldOutputRef { count, items })
    }

    /// Number of items.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// True if there are no items.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Iterates over `(seq, bytes)`.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        let mut c = Cursor::new(self.items);
        (0..self.count).map_while(move |_| {
            let seq = c.u64("").ok()?;
            let len = c.u32("").ok()?;
            let data = c.bytes(len as usize, "").ok()?;
            Some((seq, data))
        })
    }

    /// Copies into the owned form.
    pub fn to_owned(&self) -> HeldOutput {
        HeldOutput {
            items: self
                .iter()
                .map(|(seq, data)| OutputItem {
                    seq,
                    data: data.to_vec(),
                })
                .collect(),
        }
    }
}

/// A decoded frame body, borrowing bulk data from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRef<'a> {
    /// Handshake (small; decoded into the owned form, bounded by the limits).
    Hello(Hello),
    /// Pages.
    PageBatch(PageBatchRef<'a>),
    /// vCPU state.
    VcpuState {
        /// vCPU index.
        vcpu_index: u32,
        /// Serialized state.
        data: &'a [u8],
    },
    /// Device state.
    DeviceState {
        /// Device identifier.
        device_id: &'a str,
        /// Serialized state.
        data: &'a [u8],
    },
    /// Held output.
    HeldOutput(HeldOutputRef<'a>),
    /// End of epoch.
    EpochEnd(EpochEnd),
    /// Ack of the header's epoch.
    Ack,
    /// Heartbeat.
    Heartbeat(Heartbeat),
    /// Error report.
    Error {
        /// Error code.
        code: u16,
        /// Message.
        message: &'a str,
    },
}

/// A decoded frame borrowing from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// The validated header.
    pub header: Header,
    /// The body.
    pub body: BodyRef<'a>,
}

impl FrameRef<'_> {
    /// The frame's epoch.
    pub fn epoch(&self) -> u64 {
        self.header.epoch
    }

    /// Copies into an owned [`Frame`].
    pub fn to_owned(&self) -> Frame {
        let body = match &self.body {
            BodyRef::Hello(h) => Body::Hello(h.clone()),
            BodyRef::PageBatch(b) => Body::PageBatch(b.to_owned()),
            BodyRef::VcpuState { vcpu_index, data } => Body::VcpuState(VcpuState {
                vcpu_index: *vcpu_index,
                data: data.to_vec(),
            }),
            BodyRef::DeviceState { device_id, data } => Body::DeviceState(DeviceState {
                device_id: (*device_id).to_owned(),
                data: data.to_vec(),
            }),
            BodyRef::HeldOutput(o) => Body::HeldOutput(o.to_owned()),
            BodyRef::EpochEnd(e) => Body::EpochEnd(*e),
            BodyRef::Ack => Body::Ack,
            BodyRef::Heartbeat(h) => Body::Heartbeat(*h),
            BodyRef::Error { code, message } => Body::Error(ErrorFrame {
                code: *code,
                message: (*message).to_owned(),
            }),
        };
        Frame {
            epoch: self.header.epoch,
            body,
        }
    }

    /// Number of page entries (0 for non-`PageBatch` frames).
    pub fn page_count(&self) -> u64 {
        match &self.body {
            BodyRef::PageBatch(b) => b.len().into(),
            _ => 0,
        }
    }
}

/// Decodes one frame from the start of `bytes`; returns it and the number of
/// bytes it occupies.
///
/// Total: every input yields a frame or a [`WireError`];
/// [`WireError::Incomplete`] means "read more and retry".
pub fn decode<'a>(bytes: &'a [u8], limits: &Limits) -> Result<(FrameRef<'a>, usize), WireError> {
    let header = Header::parse(bytes, limits)?;
    let total = header.frame_len();
    let Some(payload) = bytes.get(HEADER_LEN..total) else {
        return Err(WireError::Incomplete {
            needed: total - bytes.len(),
        });
    };
    let body = decode_payload(&header, payload, limits)?;
    Ok((FrameRef { header, body }, total))
}

/// Like [`decode`], returning an owned frame.
pub fn decode_owned(bytes: &[u8], limits: &Limits) -> Result<(Frame, usize), WireError> {
    decode(bytes, limits).map(|(f, n)| (f.to_owned(), n))
}

/// Verifies the payload CRC and parses `payload` according to `header`
/// (which must come from [`Header::parse`]). For stream readers that read the
/// header and payload separately.
pub fn decode_payload<'a>(
    header: &Header,
    payload: &'a [u8],
    limits: &Limits,
) -> Result<BodyRef<'a>, WireError> {
    if payload.len() != header.payload_len as usize {
        return Err(WireError::Malformed {
            what: "payload length differs from header",
        });
    }
    let actual = crc32fast::hash(payload);
    if actual != header.payload_crc {
        return Err(WireError::PayloadChecksum {
            expected: header.payload_crc,
            actual,
        });
    }
    parse_body(header.frame_type, payload, limits)
}

fn parse_body<'a>(
    ty: FrameType,
    payload: &'a [u8],
    limits: &Limits,
) -> Result<BodyRef<'a>, WireError> {
    let mut c = Cursor::new(payload);
    let body = match ty {
        FrameType::Hello => {
            let protocol_version = c.u16("hello")?;
            let role = Role::from_u8(c.u8("hello")?)?;
            let tracker_len = usize::from(c.u8("hello")?);
            let vcpus = c.u32("hello")?;
            let epoch_interval_ms = c.u32("hello")?;
            let region_count = c.u32("hello")?;
            let session_id = c.u64("hello")?;
            let resume_from_epoch = c.u64("hello")?;
            debug_assert_eq!(c.pos, HELLO_FIXED_LEN);
            if tracker_len > limits.max_name_len {
                return Err(WireError::StringTooLong {
                    what: "tracker name",
                    len: tracker_len,
                    cap: limits.max_name_len,
                });
            }
            let tracker = c.str(tracker_len, "hello tracker name")?.to_owned();
            if region_count > limits.max_regions {
                return Err(WireError::TooManyEntries {
                    what: "memory regions",
                    count: region_count.into(),
                    cap: limits.max_regions.into(),
                });
            }
            // Exact size check before allocating.
            if c.remaining() != region_count as usize * REGION_LEN {
                return Err(WireError::Malformed {
                    what: "hello region list length",
                });
            }
            let mut memory_regions = Vec::with_capacity(region_count as usize);
            for _ in 0..region_count {
                memory_regions.push(MemoryRegion {
                    guest_addr: c.u64("hello region")?,
                    size: c.u64("hello region")?,
                });
            }
            BodyRef::Hello(Hello {
                protocol_version,
                role,
                vcpus,
                memory_regions,
                tracker,
                epoch_interval_ms,
                session_id,
                resume_from_epoch,
            })
        }
        FrameType::PageBatch => BodyRef::PageBatch(PageBatchRef::parse(payload, limits)?),
        FrameType::VcpuState => {
            let vcpu_index = c.u32("vcpu state")?;
            BodyRef::VcpuState {
                vcpu_index,
                data: c.rest(),
            }
        }
        FrameType::DeviceState => {
            let len = usize::from(c.u8("device state")?);
            if len > limits.max_name_len {
                return Err(WireError::StringTooLong {
                    what: "device id",
                    len,
                    cap: limits.max_name_len,
                });
            }
            let device_id = c.str(len, "device id")?;
            BodyRef::DeviceState {
                device_id,
                data: c.rest(),
            }
        }
        FrameType::HeldOutput => BodyRef::HeldOutput(HeldOutputRef::parse(payload, limits)?),
        FrameType::EpochEnd => {
            let page_count = c.u64("epoch end")?;
            let data_frames = c.u32("epoch end")?;
            let flags = c.u32("epoch end")?;
            let content_digest = c.u64("epoch end")?;
            debug_assert_eq!(c.pos, EPOCH_END_FIXED_LEN);
            let memory_digest = match flags {
                0 => None,
                1 => Some(c.array::<MEMORY_DIGEST_LEN>("epoch end memory digest")?),
                _ => {
                    return Err(WireError::Malformed {
                        what: "unknown epoch end flags",
                    })
                }
            };
            c.finish("trailing bytes after epoch end")?;
            BodyRef::EpochEnd(EpochEnd {
                page_count,
                data_frames,
                content_digest,
                memory_digest,
            })
        }
        FrameType::Ack => {
            c.finish("ack carries a payload")?;
            BodyRef::Ack
        }
        FrameType::Heartbeat => {
            let sent_at_nanos = c.u64("heartbeat")?;
            let last_committed_epoch = c.u64("heartbeat")?;
            c.finish("trailing bytes after heartbeat")?;
            BodyRef::Heartbeat(Heartbeat {
                sent_at_nanos,
                last_committed_epoch,
            })
        }
        FrameType::Error => {
            let code = c.u16("error frame")?;
            let len = usize::from(c.u16("error frame")?);
            if len > limits.max_message_len {
                return Err(WireError::StringTooLong {
                    what: "error message",
                    len,
                    cap: limits.max_message_len,
                });
            }
            let message = c.str(len, "error message")?;
            c.finish("trailing bytes after error message")?;
            BodyRef::Error { code, message }
        }
    };
    Ok(body)
}

/// Iterates over consecutive frames in a byte buffer. Stops after the first
/// error (an `Incomplete` error at the end means the buffer ends mid-frame).
///
/// ```
/// use castor_replicator::wire::{Body, Frame, FrameIter, Limits};
///
/// let mut buf = Vec::new();
/// Frame::new(1, Body::Ack).encode(&mut buf).unwrap();
/// Frame::new(2, Body::Ack).encode(&mut buf).unwrap();
/// let limits = Limits::default();
/// let epochs: Vec<u64> = FrameIter::new(&buf, &limits).map(|f| f.unwrap().epoch()).collect();
/// assert_eq!(epochs, vec![1, 2]);
/// ```
pub struct FrameIter<'a, 'l> {
    rest: &'a [u8],
    limits: &'l Limits,
    failed: bool,
}

impl<'a, 'l> FrameIter<'a, 'l> {
    /// Iterates over the frames in `bytes`.
    pub fn new(bytes: &'a [u8], limits: &'l Limits) -> Self {
        FrameIter {
            rest: bytes,
            limits,
            failed: false,
        }
    }

    /// Bytes not yet consumed.
    pub fn remainder(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for FrameIter<'a, '_> {
    type Item = Result<FrameRef<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match decode(self.rest, self.limits) {
            Ok((f, n)) => {
                self.rest = &self.rest[n..];
                Some(Ok(f))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Async streaming
// ---------------------------------------------------------------------------

/// Errors from [`read_frame`].
#[derive(Debug, Error)]
pub enum ReadFrameError {
    /// I/O error from the reader.
    #[error("I/O error reading frame: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes read are not a valid frame.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    UnexpectedEof {
        /// Bytes of the frame read.
        got: usize,
        /// Frame length (or header length, if the header was incomplete).
        expected: usize,
    },
}

/// Reads one frame from `reader` into `buf` (reused between calls: it holds
/// the payload afterwards) and decodes it.
///
/// Returns `Ok(None)` on a clean end of stream at a frame boundary. Reads the
/// header first and allocates at most `limits.max_payload` bytes.
pub async fn read_frame<'b, R>(
    reader: &mut R,
    buf: &'b mut Vec<u8>,
    limits: &Limits,
) -> Result<Option<FrameRef<'b>>, ReadFrameError>
where
    R: tokio::io::AsyncRead + Unpin + ?Sized,
{
    use tokio::io::AsyncReadExt;

    let mut hdr = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = reader.read(&mut hdr[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            // Report bad magic on a partial header in preference to EOF.
            if let Err(e @ WireError::BadMagic { .. }) = Header::parse(&hdr[..got], limits) {
                return Err(e.into());
            }
            return Err(ReadFrameError::UnexpectedEof {
                got,
                expected: HEADER_LEN,
            });
        }
        got += n;
        // Fail fast on garbage.
        if got < HEADER_LEN {
            if let Err(e @ WireError::BadMagic { .. }) = Header::parse(&hdr[..got], limits) {
                return Err(e.into());
            }
        }
    }
    let header = Header::parse(&hdr, limits)?;
    let len = header.payload_len as usize;
    buf.clear();
    buf.resize(len, 0);
    let mut filled = 0;
    while filled < len {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(ReadFrameError::UnexpectedEof {
                got: HEADER_LEN + filled,
                expected: header.frame_len(),
            });
        }
        filled += n;
    }
    let body = decode_payload(&header, buf, limits)?;
    Ok(Some(FrameRef { header, body }))
}

// ---------------------------------------------------------------------------
// Epoch accounting
// ---------------------------------------------------------------------------

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Contribution of one data frame to an epoch's content digest.
pub fn frame_digest(header: &Header) -> u64 {
    let x = u64::from(header.payload_crc) | (u64::from(header.payload_len) << 32);
    mix64(mix64(x) ^ u64::from(header.frame_type as u16))
}

/// Result of comparing an [`EpochTally`] with the epoch's `EpochEnd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochCheck {
    /// All data frames arrived and the digest matches.
    Complete,
    /// Fewer data frames than announced have arrived so far.
    Pending {
        /// Frames still missing.
        missing_frames: u32,
    },
    /// More frames than announced, or counts/digest disagree.
    Mismatch,
}

/// Running count and digest of an epoch's data frames, kept by the sender
/// (to fill `EpochEnd`) and by the receiver (to know when the epoch is
/// complete, whatever streams the frames used).
///
/// ```
/// use castor_replicator::wire::{Body, EpochCheck, EpochTally, Frame, VcpuState};
///
/// let mut sent = EpochTally::new(5);
/// let mut buf = Vec::new();
/// let h = Frame::new(5, Body::VcpuState(VcpuState { vcpu_index: 0, data: vec![1] }))
///     .encode(&mut buf).unwrap();
/// sent.add(&h, 0);
/// let end = sent.epoch_end(None);
///
/// let mut received = EpochTally::new(5);
/// assert_eq!(received.check(&end), EpochCheck::Pending { missing_frames: 1 });
/// received.add(&h, 0);
/// assert_eq!(received.check(&end), EpochCheck::Complete);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochTally {
    /// The epoch tallied.
    pub epoch: u64,
    /// Data frames counted.
    pub data_frames: u32,
    /// Page entries counted.
    pub pages: u64,
    /// Digest so far.
    pub digest: u64,
}

impl EpochTally {
    /// An empty tally for `epoch`.
    pub fn new(epoch: u64) -> Self {
        EpochTally {
            epoch,
            data_frames: 0,
            pages: 0,
            digest: 0,
        }
    }

    /// Counts a data frame (other frame types are ignored) with `pages` page entries.
    pub fn add(&mut self, header: &Header, pages: u64) {
        if !header.frame_type.is_epoch_data() {
            return;
        }
        self.data_frames = self.data_frames.wrapping_add(1);
        self.pages = self.pages.wrapping_add(pages);
        self.digest = self.digest.wrapping_add(frame_digest(header));
    }

    /// Counts a received frame.
    pub fn add_frame(&mut self, frame: &FrameRef<'_>) {
        self.add(&frame.header, frame.page_count());
    }

    /// Builds the `EpochEnd` body for this tally.
    pub fn epoch_end(&self, memory_digest: Option<[u8; MEMORY_DIGEST_LEN]>) -> EpochEnd {
        EpochEnd {
            page_count: self.pages,
            data_frames: self.data_frames,
            content_digest: self.digest,
            memory_digest,
        }
    }

    /// Compares with the announced `EpochEnd`.
    pub fn check(&self, end: &EpochEnd) -> EpochCheck {
        if self.data_frames < end.data_frames {
            EpochCheck::Pending {
                missing_frames: end.data_frames - self.data_frames,
            }
        } else if self.data_frames == end.data_frames
            && self.pages == end.page_count
            && self.digest == end.content_digest
        {
            EpochCheck::Complete
        } else {
            EpochCheck::Mismatch
        }
    }
}
