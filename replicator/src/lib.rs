//! Castor's replication layers that do not need a VM:
//!
//! * [`wire`]: the framed, versioned, checksummed wire protocol;
//! * [`codec`]: per-page encoding (zero / raw / XOR+LZ4 / LZ4 / unchanged)
//!   with the primary's bounded cache of sent pages;
//! * [`transport`]: QUIC with mutual, pinned-certificate TLS, carrying frames.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod transport;
pub mod wire;
