//! Decoding/encoding errors and the decoder's [`Limits`].

use thiserror::Error;

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
    /// The first bytes are not [`MAGIC`](super::MAGIC) (missing bytes of a partial header are shown as 0).
    #[error("bad frame magic {got:02x?}")]
    BadMagic {
        /// The bytes found.
        got: [u8; 4],
    },
    /// The peer speaks a protocol version this build does not.
    #[error("the peer speaks protocol version {got}; this build speaks versions {min} to {max}: upgrade the older host (a pair upgrades one host at a time between adjacent versions)")]
    UnsupportedVersion {
        /// Version in the header.
        got: u16,
        /// Oldest version this build speaks.
        min: u16,
        /// Newest version this build speaks.
        max: u16,
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

/// Why a peer ends a session: the code of an `Error` frame and, the same
/// number, the QUIC application close code that follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Normal end of a session.
    Done = 0,
    /// A frame did not decode or an epoch failed verification: the replica
    /// is kept, the primary reconnects and resyncs incrementally.
    BadData = 1,
    /// The backup judged the primary lost.
    PeerLost = 2,
    /// An internal error ended the session.
    Internal = 3,
    /// No protocol version in common.
    Version = 10,
    /// The manifest does not fit the backup's configuration.
    Manifest = 11,
    /// The session's first checkpoint could not be restored.
    NotRestorable = 12,
    /// The replica's memory diverged from the primary's: full resync.
    Diverged = 13,
    /// The backup leaves the pair on purpose (maintenance: SIGTERM, `castor
    /// ctl detach`) and will not take over: the primary runs on unprotected
    /// instead of applying its backup-loss policy.
    Detach = 14,
    /// The backup holds the committed replica of another session (another
    /// guest) and pairs with no other guest meanwhile.
    Occupied = 15,
}

impl ErrorCode {
    /// The code for a wire value (unknown values are `None`).
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        Some(match v {
            0 => ErrorCode::Done,
            1 => ErrorCode::BadData,
            2 => ErrorCode::PeerLost,
            3 => ErrorCode::Internal,
            10 => ErrorCode::Version,
            11 => ErrorCode::Manifest,
            12 => ErrorCode::NotRestorable,
            13 => ErrorCode::Diverged,
            14 => ErrorCode::Detach,
            15 => ErrorCode::Occupied,
            _ => return None,
        })
    }

    /// The wire value (Error frames).
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The QUIC application close code (the same number).
    pub fn close_code(self) -> u32 {
        u32::from(self.as_u16())
    }

    /// Whether a primary refused with this code should not simply retry: the
    /// backup's configuration or version must change first.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            ErrorCode::Version
                | ErrorCode::Manifest
                | ErrorCode::NotRestorable
                | ErrorCode::Occupied
        )
    }
}
