//! The fixed 32-byte frame header: [`FrameType`], [`Header`] parsing and
//! serialization.

use super::{Limits, WireError, HEADER_LEN, MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Frame type numbers (header offset 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameType {
    /// Session handshake.
    Hello = 1,
    /// Encoded dirty pages.
    PageBatch = 2,
    // 3, 4 and 5 (protocol 1's VcpuState, DeviceState, HeldOutput) are retired:
    // all state travels in `Section` frames since protocol 2.
    /// End-of-epoch marker with counts and digests.
    EpochEnd = 6,
    /// Backup acknowledges a committed epoch.
    Ack = 7,
    /// Liveness.
    Heartbeat = 8,
    /// Fatal error report.
    Error = 9,
    /// One part's state at the epoch's pause (`castor_parts`).
    Section = 10,
    /// Encoded disk blocks written in the epoch, and its flush flag
    /// (protocol 4 on).
    DiskBatch = 11,
}

impl FrameType {
    /// Maps a type number to a frame type.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => FrameType::Hello,
            2 => FrameType::PageBatch,
            6 => FrameType::EpochEnd,
            7 => FrameType::Ack,
            8 => FrameType::Heartbeat,
            9 => FrameType::Error,
            10 => FrameType::Section,
            11 => FrameType::DiskBatch,
            _ => return None,
        })
    }

    /// True for the frames counted by `EpochEnd` (pages, part sections,
    /// disk blocks).
    pub fn is_epoch_data(self) -> bool {
        matches!(
            self,
            FrameType::PageBatch | FrameType::Section | FrameType::DiskBatch
        )
    }
}

/// A parsed and validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version (within [`MIN_PROTOCOL_VERSION`]..=[`PROTOCOL_VERSION`] once parsed).
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
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(WireError::UnsupportedVersion {
                got: version,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
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
