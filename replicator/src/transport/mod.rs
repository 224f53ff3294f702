//! QUIC transport with mutual TLS and certificate pinning, carrying
//! [`wire`](crate::wire) frames.
//!
//! * Identities are self-signed certificates made with [`generate_identity`]
//!   (`castor keygen`). Each side is configured with its own identity and the
//!   peer's certificate; the TLS verifiers accept exactly that certificate
//!   (byte-for-byte DER comparison) and still verify the handshake signature,
//!   which proves the peer holds the matching private key. Names and
//!   validity dates are not used.
//! * [`listen`] / [`connect`] create endpoints tuned for a LAN: flow-control
//!   windows sized from a bandwidth-delay product, enlarged UDP socket
//!   buffers, keep-alive and idle timeout.
//! * Frames travel on long-lived streams: [`FrameSender`] / [`FrameReceiver`].
//!   Suggested layout: one bidirectional *control* stream opened by the
//!   primary (`Hello` both ways, `EpochEnd` primary→backup, `Ack`/`Error`
//!   backup→primary), plus N unidirectional *data* streams for `PageBatch`,
//!   `VcpuState`, `DeviceState` and `HeldOutput` frames. Send every page
//!   number on the same data stream ([`data_stream_for_page`]) so the XOR
//!   bases stay in order, and send `EpochEnd` on the control stream after
//!   the epoch's data-stream writes completed. The receiver counts data
//!   frames per epoch with [`wire::EpochTally`](crate::wire::EpochTally) and
//!   commits when the tally matches the `EpochEnd`. Heartbeats go in QUIC
//!   datagrams ([`Connection::send_datagram_frame`]), which are not blocked
//!   behind stream data.
//! * QUIC opens streams lazily: the peer's `accept_*` returns only once the
//!   opener has sent something on the stream, so send a frame right after
//!   opening one.
//!
//! A received frame that does not decode yields [`TransportError::Wire`] (see
//! [`TransportError::wire_error`]); the caller should then close the
//! connection ([`Connection::close_for_protocol_error`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), castor_replicator::transport::TransportError> {
//! use castor_replicator::transport::{self, Identity, PeerCert, TransportConfig};
//! use castor_replicator::wire::{Body, Frame};
//!
//! let me = Identity::load("primary.crt", "primary.key")?;
//! let backup = PeerCert::load("backup.crt")?;
//! let cfg = TransportConfig::default();
//! let conn = transport::connect(
//!     "0.0.0.0:0".parse().unwrap(),
//!     "10.0.0.2:7500".parse().unwrap(),
//!     &me,
//!     &backup,
//!     &cfg,
//! )
//! .await?;
//! let (mut control_tx, mut control_rx) = conn.open_control().await?;
//! control_tx.send(&Frame::new(0, Body::Ack)).await?;
//! if let Some(frame) = control_rx.recv().await? {
//!     println!("got {:?}", frame.header.frame_type);
//! }
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

use crate::wire::{ReadFrameError, WireError};

mod keys;
mod pinning;
mod quic;
mod streams;

pub use keys::{fingerprint, generate_identity, write_identity, Identity, PeerCert};
pub use pinning::PinMismatch;
pub use quic::{connect, listen, Listener, TransportConfig};
pub use streams::{data_stream_for_page, Connection, FrameReceiver, FrameSender};

/// ALPN protocol identifier.
pub const ALPN: &[u8] = b"castor/1";
/// TLS server name used when connecting (ignored by the pinned verifier).
pub const SERVER_NAME: &str = "castor-peer";

/// Application close code: normal shutdown ([`crate::wire::ErrorCode::Done`]).
pub const CLOSE_OK: u32 = crate::wire::ErrorCode::Done as u32;
/// Application close code: the peer sent a frame that does not decode
/// ([`crate::wire::ErrorCode::BadData`]).
pub const CLOSE_PROTOCOL_ERROR: u32 = crate::wire::ErrorCode::BadData as u32;

/// Transport errors.
#[derive(Debug, Error)]
pub enum TransportError {
    /// A peer did not complete its handshake in time.
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// Key or certificate generation failed.
    #[error("key generation failed: {0}")]
    Keygen(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// PEM data could not be parsed.
    #[error("invalid PEM {what}: {source}")]
    Pem {
        /// What was being parsed.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// QUIC configuration failed.
    #[error("QUIC configuration: no TLS 1.3 initial cipher suite: {0}")]
    CipherSuite(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The idle timeout does not fit QUIC's variable-length integer.
    #[error("QUIC configuration: idle timeout {0:?} is out of range")]
    IdleTimeout(std::time::Duration),
    /// Socket setup failed.
    #[error("socket setup on {addr}: {source}")]
    Socket {
        /// Address being bound.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The connection attempt could not start.
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (includes a refused certificate).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already finished or reset.
    #[error("stream closed: {0}")]
    ClosedStream(#[from] quinn::ClosedStream),
    /// Reading from a stream failed.
    #[error("stream read: {0}")]
    Read(#[source] io::Error),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A received frame is invalid; close the connection.
    #[error("protocol violation: {0}")]
    Wire(#[from] WireError),
    /// Sending a datagram failed.
    #[error("datagram: {0}")]
    Datagram(#[from] quinn::SendDatagramError),
    /// The endpoint was closed.
    #[error("endpoint closed")]
    EndpointClosed,
}

impl TransportError {
    /// The decoding error, if this error is a protocol violation by the peer.
    pub fn wire_error(&self) -> Option<&WireError> {
        match self {
            TransportError::Wire(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the peer broke the protocol (a frame that does not decode, a
    /// stream it finished in the middle of a frame) rather than going away:
    /// a live peer that does this gets a resync, never a takeover.
    pub fn is_protocol_error(&self) -> bool {
        matches!(
            self,
            TransportError::Wire(_) | TransportError::Truncated { .. }
        )
    }
}

impl From<ReadFrameError> for TransportError {
    fn from(e: ReadFrameError) -> Self {
        match e {
            ReadFrameError::Io(e) => TransportError::Read(e),
            ReadFrameError::Wire(e) => TransportError::Wire(e),
            ReadFrameError::UnexpectedEof { got, expected } => {
                TransportError::Truncated { got, expected }
            }
        }
    }
}
