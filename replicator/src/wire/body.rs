//! Owned frame bodies ([`Body`], [`Frame`]) and their encoding
//! ([`Frame::encode`]).

use super::writer::{begin_frame, end_frame};
use super::{FrameType, Header, WireError, MEMORY_DIGEST_LEN};

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
/// [`PageBatchWriter`](super::PageBatchWriter)).
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
