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

use std::fmt;
use std::fs;
use std::io;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::wire::{self, Frame, FrameRef, Header, Limits, ReadFrameError, WireError};

/// ALPN protocol identifier.
pub const ALPN: &[u8] = b"castor/1";
/// TLS server name used when connecting (ignored by the pinned verifier).
pub const SERVER_NAME: &str = "castor-peer";

/// Application close code: normal shutdown.
pub const CLOSE_OK: u32 = 0;
/// Application close code: the peer sent a frame that does not decode.
pub const CLOSE_PROTOCOL_ERROR: u32 = 1;

/// Transport errors.
#[derive(Debug, Error)]
pub enum TransportError {
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
    #[error("invalid PEM {what}: {reason}")]
    Pem {
        /// What was being parsed.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// QUIC configuration failed.
    #[error("QUIC configuration: {0}")]
    Config(String),
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

// ---------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------

/// SHA-256 fingerprint of a DER certificate, as `sha256:` + hex.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in d.as_ref() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Generates a self-signed ECDSA P-256 certificate for `host_name`;
/// returns `(cert_pem, key_pem)`.
pub fn generate_identity(host_name: &str) -> Result<(String, String), TransportError> {
    let ck = rcgen::generate_simple_self_signed(vec![host_name.to_owned()])?;
    Ok((ck.cert.pem(), ck.key_pair.serialize_pem()))
}

/// Generates an identity and writes `DIR/NAME.crt` (mode 0644) and
/// `DIR/NAME.key` (mode 0600), creating `dir` if needed. Refuses to overwrite
/// an existing key. Returns the two paths.
pub fn write_identity(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), TransportError> {
    let (cert_pem, key_pem) = generate_identity(name)?;
    fs::create_dir_all(dir).map_err(|source| TransportError::File {
        what: "creating directory",
        path: dir.to_owned(),
        source,
    })?;
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    write_new_file(&key_path, key_pem.as_bytes(), 0o600)?;
    write_new_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

fn write_new_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TransportError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TransportError::File {
        what: "writing",
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TransportError> {
    fs::read(path).map_err(|source| TransportError::File {
        what,
        path: path.to_owned(),
        source,
    })
}

fn parse_cert(pem: &[u8]) -> Result<CertificateDer<'static>, TransportError> {
    CertificateDer::from_pem_slice(pem).map_err(|e| TransportError::Pem {
        what: "certificate",
        reason: e.to_string(),
    })
}

/// This side's certificate and private key.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("cert", &fingerprint(&self.cert))
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Parses PEM certificate and private key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TransportError> {
        let cert = parse_cert(cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TransportError::Pem {
            what: "private key",
            reason: e.to_string(),
        })?;
        Ok(Identity { cert, key })
    }

    /// Reads PEM certificate and key files.
    pub fn load(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, TransportError> {
        let cert = read_file(cert_path.as_ref(), "reading certificate")?;
        let key = read_file(key_path.as_ref(), "reading private key")?;
        Self::from_pem(&cert, &key)
    }

    /// Generates a fresh self-signed identity (for tests and ephemeral use).
    pub fn generate(host_name: &str) -> Result<Self, TransportError> {
        let (c, k) = generate_identity(host_name)?;
        Self::from_pem(c.as_bytes(), k.as_bytes())
    }

    /// The certificate, as the peer should pin it.
    pub fn cert(&self) -> PeerCert {
        PeerCert {
            der: self.cert.clone(),
        }
    }
}

/// The peer's pinned certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerCert {
    der: CertificateDer<'static>,
}

impl fmt::Debug for PeerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PeerCert")
            .field(&self.fingerprint())
            .finish()
    }
}

impl PeerCert {
    /// Parses a PEM certificate.
    pub fn from_pem(pem: &[u8]) -> Result<Self, TransportError> {
        Ok(PeerCert {
            der: parse_cert(pem)?,
        })
    }

    /// Reads a PEM certificate file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TransportError> {
        Self::from_pem(&read_file(path.as_ref(), "reading peer certificate")?)
    }

    /// A certificate from DER bytes.
    pub fn from_der(der: Vec<u8>) -> Self {
        PeerCert {
            der: CertificateDer::from(der),
        }
    }

    /// DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// SHA-256 fingerprint (see [`fingerprint`]).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.der)
    }
}

// ---------------------------------------------------------------------------
// Pinned-certificate verifiers
// ---------------------------------------------------------------------------

/// Why a peer certificate was refused.
#[derive(Debug, Error)]
#[error("{side} certificate {presented} is not the pinned peer certificate {expected}")]
pub struct PinMismatch {
    /// "server" or "client".
    pub side: &'static str,
    /// Fingerprint presented.
    pub presented: String,
    /// Fingerprint expected.
    pub expected: String,
}

#[derive(Debug)]
struct Pinned {
    expected: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
    side: &'static str,
}

impl Pinned {
    fn new(peer: &PeerCert, provider: &CryptoProvider, side: &'static str) -> Self {
        Pinned {
            expected: peer.der.clone(),
            algorithms: provider.signature_verification_algorithms,
            side,
        }
    }

    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if presented.as_ref() == self.expected.as_ref() {
            return Ok(());
        }
        let err = PinMismatch {
            side: self.side,
            presented: fingerprint(presented),
            expected: fingerprint(&self.expected),
        };
        log::warn!(
            "refusing {} certificate {}: expected pinned peer certificate {}",
            err.side,
            err.presented,
            err.expected
        );
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(err)),
        )))
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

#[derive(Debug)]
struct PinnedServerVerifier(Pinned);

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct PinnedClientVerifier(Pinned);

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_crypto(identity: &Identity, peer: &PeerCert) -> Result<QuicServerConfig, TransportError> {
    let provider = provider();
    let verifier = PinnedClientVerifier(Pinned::new(peer, &provider, "client"));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicServerConfig::try_from(tls).map_err(|e| TransportError::Config(e.to_string()))
}

fn client_crypto(identity: &Identity, peer: &PeerCert) -> Result<QuicClientConfig, TransportError> {
    let provider = provider();
    let verifier = PinnedServerVerifier(Pinned::new(peer, &provider, "server"));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicClientConfig::try_from(tls).map_err(|e| TransportError::Config(e.to_string()))
}

// ---------------------------------------------------------------------------
// Configuration and endpoints
// ---------------------------------------------------------------------------

/// Transport tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransportConfig {
    /// Link bandwidth used to size flow-control windows, bits per second.
    pub bandwidth_bits_per_sec: u64,
    /// Round-trip time used to size windows (and the initial RTT estimate).
    pub rtt: Duration,
    /// Window = bandwidth × RTT × `window_headroom`, at least `min_window_bytes`.
    pub window_headroom: u32,
    /// Lower bound of the per-stream receive window.
    pub min_window_bytes: u64,
    /// Most data streams the peer may open (concurrent unidirectional streams).
    pub max_data_streams: u32,
    /// QUIC keep-alive interval.
    pub keep_alive: Option<Duration>,
    /// Connection idle timeout.
    pub idle_timeout: Duration,
    /// Requested UDP socket send/receive buffer size (the kernel may cap it at
    /// `net.core.rmem_max` / `wmem_max`; this is logged, not fatal).
    pub socket_buffer_bytes: usize,
    /// Decoder limits for received frames.
    pub limits: Limits,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            bandwidth_bits_per_sec: 10_000_000_000,
            rtt: Duration::from_millis(1),
            window_headroom: 4,
            min_window_bytes: 8 << 20,
            max_data_streams: 8,
            keep_alive: Some(Duration::from_millis(500)),
            idle_timeout: Duration::from_secs(5),
            socket_buffer_bytes: 8 << 20,
            limits: Limits::default(),
        }
    }
}

impl TransportConfig {
    /// Bandwidth-delay product in bytes.
    pub fn bdp_bytes(&self) -> u64 {
        let bytes_per_sec = self.bandwidth_bits_per_sec / 8;
        (u128::from(bytes_per_sec) * self.rtt.as_nanos() / 1_000_000_000).min(u64::MAX.into())
            as u64
    }

    /// Per-stream receive window in bytes.
    pub fn stream_window_bytes(&self) -> u64 {
        self.bdp_bytes()
            .saturating_mul(self.window_headroom.into())
            .max(self.min_window_bytes)
    }

    /// Connection receive window / send window in bytes (twice the stream window).
    pub fn connection_window_bytes(&self) -> u64 {
        self.stream_window_bytes().saturating_mul(2)
    }

    fn quinn_transport(&self) -> Result<quinn::TransportConfig, TransportError> {
        let varint = |v: u64| VarInt::from_u32(v.min(u32::MAX.into()) as u32);
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(varint(self.stream_window_bytes()))
            .receive_window(varint(self.connection_window_bytes()))
            .send_window(self.connection_window_bytes())
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_data_streams))
            .max_concurrent_bidi_streams(VarInt::from_u32(4))
            .initial_rtt(self.rtt.max(Duration::from_millis(1)))
            .keep_alive_interval(self.keep_alive)
            .max_idle_timeout(Some(
                IdleTimeout::try_from(self.idle_timeout)
                    .map_err(|e| TransportError::Config(format!("idle timeout: {e}")))?,
            ))
            .enable_segmentation_offload(true);
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(self.bdp_bytes().max(14_720));
        t.congestion_controller_factory(Arc::new(cubic));
        Ok(t)
    }
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| TransportError::Socket { addr, source };
    let sock =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if let Err(e) = sock.set_recv_buffer_size(buffer) {
        log::warn!("cannot set SO_RCVBUF to {buffer} on {addr}: {e}");
    }
    if let Err(e) = sock.set_send_buffer_size(buffer) {
        log::warn!("cannot set SO_SNDBUF to {buffer} on {addr}: {e}");
    }
    let rcv = sock.recv_buffer_size().unwrap_or(0);
    let snd = sock.send_buffer_size().unwrap_or(0);
    // Linux reports twice the usable size and caps at net.core.{r,w}mem_max.
    if rcv < buffer || snd < buffer {
        log::info!(
            "UDP socket {addr}: asked for {buffer} byte buffers, got SO_RCVBUF={rcv} SO_SNDBUF={snd} \
             (raise net.core.rmem_max / wmem_max for more)"
        );
    } else {
        log::debug!("UDP socket {addr}: SO_RCVBUF={rcv} SO_SNDBUF={snd}");
    }
    sock.set_nonblocking(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    Ok(sock.into())
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    cfg: &TransportConfig,
) -> Result<quinn::Endpoint, TransportError> {
    let socket = udp_socket(addr, cfg.socket_buffer_bytes)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Socket { addr, source })
}

/// A listening endpoint (the backup, usually).
#[derive(Debug)]
pub struct Listener {
    endpoint: quinn::Endpoint,
    limits: Limits,
}

/// Binds `bind_addr` and accepts connections from the peer holding `peer`'s
/// certificate. Must be called within a tokio runtime.
pub fn listen(
    bind_addr: SocketAddr,
    identity: &Identity,
    peer: &PeerCert,
    cfg: &TransportConfig,
) -> Result<Listener, TransportError> {
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto(identity, peer)?));
    server.transport_config(Arc::new(cfg.quinn_transport()?));
    let endpoint = endpoint(bind_addr, Some(server), cfg)?;
    Ok(Listener {
        endpoint,
        limits: cfg.limits.clone(),
    })
}

impl Listener {
    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        let addr = self.endpoint.local_addr();
        addr.map_err(|source| TransportError::Socket {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })
    }

    /// Waits for the next connection and completes its handshake. A peer
    /// with the wrong certificate gives an error (the listener stays usable).
    pub async fn accept(&self) -> Result<Connection, TransportError> {
        let incoming = self
            .endpoint
            .accept()
            .await
            .ok_or(TransportError::EndpointClosed)?;
        let conn = incoming.await?;
        log::info!(
            "accepted replication connection from {}",
            conn.remote_address()
        );
        Ok(Connection {
            conn,
            _endpoint: None,
            limits: self.limits.clone(),
        })
    }

    /// Stops listening and closes all connections.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(CLOSE_OK), b"shutdown");
    }
}

/// Connects from `local` (e.g. `0.0.0.0:0`) to `remote`, which must present
/// `peer`'s certificate. Must be called within a tokio runtime.
pub async fn connect(
    local: SocketAddr,
    remote: SocketAddr,
    identity: &Identity,
    peer: &PeerCert,
    cfg: &TransportConfig,
) -> Result<Connection, TransportError> {
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto(identity, peer)?));
    client.transport_config(Arc::new(cfg.quinn_transport()?));
    let endpoint = endpoint(local, None, cfg)?;
    let conn = endpoint.connect_with(client, remote, SERVER_NAME)?.await?;
    log::info!("connected to replication peer {remote}");
    Ok(Connection {
        conn,
        _endpoint: Some(endpoint),
        limits: cfg.limits.clone(),
    })
}

/// Picks the data stream for a page, so all frames of one page number use
/// the same stream (keeping XOR bases in order).
pub fn data_stream_for_page(page_number: u64, streams: usize) -> usize {
    if streams == 0 {
        0
    } else {
        (page_number % streams as u64) as usize
    }
}

// ---------------------------------------------------------------------------
// Connections and framed streams
// ---------------------------------------------------------------------------

/// An established, mutually authenticated connection.
#[derive(Debug)]
pub struct Connection {
    conn: quinn::Connection,
    _endpoint: Option<quinn::Endpoint>,
    limits: Limits,
}

impl Connection {
    /// Opens the bidirectional control stream (send a frame first: the peer
    /// sees the stream only then).
    pub async fn open_control(&self) -> Result<(FrameSender, FrameReceiver), TransportError> {
        let (s, r) = self.conn.open_bi().await?;
        Ok((
            FrameSender::new(s),
            FrameReceiver::new(r, self.limits.clone()),
        ))
    }

    /// Accepts the peer's control stream.
    pub async fn accept_control(&self) -> Result<(FrameSender, FrameReceiver), TransportError> {
        let (s, r) = self.conn.accept_bi().await?;
        Ok((
            FrameSender::new(s),
            FrameReceiver::new(r, self.limits.clone()),
        ))
    }

    /// Opens a unidirectional data stream.
    pub async fn open_data(&self) -> Result<FrameSender, TransportError> {
        Ok(FrameSender::new(self.conn.open_uni().await?))
    }

    /// Accepts the peer's next data stream.
    pub async fn accept_data(&self) -> Result<FrameReceiver, TransportError> {
        let r = self.conn.accept_uni().await?;
        Ok(FrameReceiver::new(r, self.limits.clone()))
    }

    /// Sends a small frame (e.g. a `Heartbeat`) as an unreliable QUIC datagram.
    pub fn send_datagram_frame(&self, frame: &Frame) -> Result<(), TransportError> {
        let mut buf = Vec::with_capacity(wire::HEADER_LEN + 32);
        frame.encode(&mut buf)?;
        self.conn.send_datagram(bytes::Bytes::from(buf))?;
        Ok(())
    }

    /// Receives the next datagram frame.
    pub async fn recv_datagram_frame(&self) -> Result<Frame, TransportError> {
        let d = self.conn.read_datagram().await?;
        let (frame, used) = wire::decode_owned(&d, &self.limits)?;
        if used != d.len() {
            return Err(WireError::Malformed {
                what: "trailing bytes in datagram",
            }
            .into());
        }
        Ok(frame)
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Current RTT estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// QUIC statistics.
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// The decoder limits used by this connection's receivers.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Replaces the decoder limits for receivers created afterwards (e.g.
    /// after `Hello` told the guest size).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Closes the connection.
    pub fn close(&self, code: u32, reason: &str) {
        self.conn.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Closes the connection because the peer sent an invalid frame.
    pub fn close_for_protocol_error(&self, error: &WireError) {
        log::warn!("closing connection to {}: {error}", self.remote_address());
        let reason = error.to_string();
        self.close(CLOSE_PROTOCOL_ERROR, &reason);
    }

    /// Waits until the connection is closed; returns why.
    pub async fn closed(&self) -> TransportError {
        TransportError::Connection(self.conn.closed().await)
    }

    /// The underlying quinn connection.
    pub fn quinn(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// Sends frames on one QUIC stream.
#[derive(Debug)]
pub struct FrameSender {
    stream: quinn::SendStream,
    buf: Vec<u8>,
    frames: u64,
}

impl FrameSender {
    fn new(stream: quinn::SendStream) -> Self {
        FrameSender {
            stream,
            buf: Vec::new(),
            frames: 0,
        }
    }

    /// Encodes and sends one frame; returns its header (for [`wire::EpochTally`]).
    pub async fn send(&mut self, frame: &Frame) -> Result<Header, TransportError> {
        self.buf.clear();
        let header = frame.encode(&mut self.buf)?;
        self.stream.write_all(&self.buf).await?;
        self.frames += 1;
        Ok(header)
    }

    /// Sends already encoded frames (e.g. built with [`wire::PageBatchWriter`]);
    /// `frames` must hold whole frames only.
    pub async fn send_encoded(&mut self, frames: &[u8]) -> Result<(), TransportError> {
        self.stream.write_all(frames).await?;
        self.frames += 1;
        Ok(())
    }

    /// Number of `send`/`send_encoded` calls so far.
    pub fn frames_sent(&self) -> u64 {
        self.frames
    }

    /// Finishes the stream gracefully (the receiver then sees `Ok(None)`).
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.stream.finish()?;
        Ok(())
    }

    /// Abandons the stream with an error code.
    pub fn reset(&mut self, code: u32) -> Result<(), TransportError> {
        self.stream.reset(VarInt::from_u32(code))?;
        Ok(())
    }
}

/// Receives and decodes frames from one QUIC stream.
#[derive(Debug)]
pub struct FrameReceiver {
    stream: quinn::RecvStream,
    buf: Vec<u8>,
    limits: Limits,
}

impl FrameReceiver {
    fn new(stream: quinn::RecvStream, limits: Limits) -> Self {
        FrameReceiver {
            stream,
            buf: Vec::new(),
            limits,
        }
    }

    /// Receives the next frame (borrowing this receiver's buffer until the
    /// next call); `Ok(None)` when the peer finished the stream.
    pub async fn recv(&mut self) -> Result<Option<FrameRef<'_>>, TransportError> {
        Ok(wire::read_frame(&mut self.stream, &mut self.buf, &self.limits).await?)
    }

    /// Receives the next frame as its exact bytes (header and payload),
    /// checked like [`FrameReceiver::recv`]; `Ok(None)` when the peer finished
    /// the stream. For a receiver that keeps frames (one copy, no per-page
    /// allocation) and decodes them again, borrowed, later.
    pub async fn recv_raw(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        let header = match wire::read_frame(&mut self.stream, &mut self.buf, &self.limits).await? {
            None => return Ok(None),
            Some(f) => f.header,
        };
        let mut out = Vec::with_capacity(wire::HEADER_LEN + self.buf.len());
        out.extend_from_slice(&header.to_bytes());
        out.extend_from_slice(&self.buf);
        Ok(Some(out))
    }

    /// Receives the next frame as an owned [`Frame`].
    pub async fn recv_owned(&mut self) -> Result<Option<Frame>, TransportError> {
        Ok(self.recv().await?.map(|f| f.to_owned()))
    }

    /// Replaces the decoder limits.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u32) -> Result<(), TransportError> {
        self.stream.stop(VarInt::from_u32(code))?;
        Ok(())
    }
}
