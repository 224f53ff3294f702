//! Castor's replication layers that do not need a VM:
//!
//! * [`wire`]: the framed, versioned, checksummed wire protocol;
//! * [`codec`]: per-page encoding (zero / raw / XOR+LZ4 / LZ4 / unchanged)
//!   with the primary's bounded cache of sent pages;
//! * [`transport`]: QUIC with mutual, pinned-certificate TLS, carrying frames;
//! * [`checkpoint`]: staging and encoding an epoch on the primary; assembling,
//!   verifying and committing it on the backup;
//! * [`primary`]: the epoch pipeline (pause, harvest, copy, resume, send, ack,
//!   release) with pre-copy and incremental resync;
//! * [`manifest`]: what a primary's VM is and needs, checked by the backup at Hello;
//! * [`backup`]: the receiving side, commit/ack, and takeover.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backup;
pub mod checkpoint;
pub mod codec;
pub mod disk;
#[cfg(feature = "fault-injection")]
mod disk_digest;
pub mod manifest;
pub mod primary;
pub mod transport;
pub mod wire;
