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
//! | 4      | 2    | version       | protocol version, [`MIN_PROTOCOL_VERSION`]..=[`PROTOCOL_VERSION`] (2..=4), the one negotiated at `Hello` |
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
//! | 1    | `Hello`       | `min_version u16, max_version u16, role u8 (1 primary, 2 backup), tracker_len u8, reserved u16 (0), epoch_interval_ms u32, session_id u64, resume_from_epoch u64, generation u64, manifest_len u32 (<= 64 KiB), tracker [tracker_len], manifest [manifest_len]` (same layout in every version from 2) |
//! | 2    | `PageBatch`   | `count u32`, then `count ×` entry: `page_number u64, tag u8, len u16, data [len]` (tag/data: see `codec`) |
//! | 3-5  | retired       | protocol 1's `VcpuState`, `DeviceState`, `HeldOutput`: unknown frame types since protocol 2      |
//! | 6    | `EpochEnd`    | `page_count u64, data_frames u32, flags u32 (bit 0: memory digest present), content_digest u64, [memory_digest 32 bytes if bit 0]` |
//! | 7    | `Ack`         | empty; the acked epoch is the header's epoch                                                       |
//! | 8    | `Heartbeat`   | `sent_at_nanos u64, last_committed_epoch u64`, and in version 3 `generation u64`                 |
//! | 9    | `Error`       | `code u16, message_len u16, message [message_len]`                                                |
//! | 10   | `Section`     | `part_kind u16, part_instance u32, section_version u16, data [rest]` (a part's state, `castor_parts`) |
//! | 11   | `DiskBatch`   | protocol 4 on: `flags u32 (bit 0: the guest flushed during the epoch)`, `count u32`, then `count ×` entry: `block u64, tag u8, len u16, data [len]` (tags: see `crate::disk`; block range checked by the receiver against its disk) |
//!
//! # Epoch completeness and the content digest
//!
//! The *data frames* of an epoch are its `PageBatch`, `Section` and `DiskBatch` frames
//! (all carry the epoch in the header).
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
//!     body: Body::Heartbeat(Heartbeat { sent_at_nanos: 1, last_committed_epoch: 6, generation: 0 }),
//! };
//! let mut buf = Vec::new();
//! frame.encode(&mut buf).unwrap();
//! let (decoded, used) = wire::decode(&buf, &Limits::default()).unwrap();
//! assert_eq!(used, buf.len());
//! assert_eq!(decoded.to_owned(), frame);
//!
//! // A short buffer says how much more is needed (here: the last 16 bytes).
//! assert_eq!(
//!     wire::decode(&buf[..40], &Limits::default()).unwrap_err(),
//!     wire::WireError::Incomplete { needed: 16 },
//! );
//! ```

/// Frame magic, the first four bytes of every header.
pub const MAGIC: [u8; 4] = *b"CSTR";
/// The newest protocol version this crate speaks (and writes by default).
/// Version 3 adds the sender's fencing generation to `Heartbeat`; version 4
/// adds `DiskBatch` (a protected disk needs it; a pair without a disk still
/// speaks 2 or 3 with an older peer).
pub const PROTOCOL_VERSION: u16 = 4;
/// The first protocol version with `DiskBatch` frames.
pub const DISK_PROTOCOL_VERSION: u16 = 4;
/// The oldest protocol version this crate still speaks, so a pair upgrades
/// one host at a time (2: protocol 4 only added a frame type). Version 1
/// (the first release, string-named state frames, no negotiation) is refused.
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// Every version this crate speaks, as announced in `Hello`.
pub const PROTOCOL_VERSIONS: castor_parts::VersionRange =
    castor_parts::VersionRange::new(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION);
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 32;
/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// Size of the optional full-memory digest carried by `EpochEnd`.
pub const MEMORY_DIGEST_LEN: usize = 32;
/// Fixed size of a `PageBatch` entry before its data.
pub const PAGE_ENTRY_OVERHEAD: usize = 8 + 1 + 2;

mod body;
mod borrowed;
mod error;
mod header;
mod reader;
mod tally;
mod writer;

pub use body::{
    Body, DiskBatch, EpochEnd, ErrorFrame, Frame, Heartbeat, Hello, PageBatch, PageEntry, Role,
    Section, DISK_FLAG_FLUSH,
};
pub use borrowed::{
    decode, decode_owned, decode_payload, BodyRef, DiskBatchRef, FrameIter, FrameRef, PageBatchRef,
    PageEntryRef, PageIter, SectionRef,
};
pub use error::{ErrorCode, Limits, WireError};
pub use header::{FrameType, Header};
pub use reader::{read_frame, ReadFrameError};
pub use tally::{frame_digest, EpochCheck, EpochTally};
pub use writer::{restamp, PageBatchWriter, SectionWriter};
