//! QUIC endpoints: [`TransportConfig`] (flow-control windows, congestion
//! and socket tuning), [`listen`] and [`connect`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, VarInt};
use serde::{Deserialize, Serialize};

use super::pinning::{client_crypto, server_crypto};
use super::{Connection, Identity, PeerCert, TransportError, CLOSE_OK, SERVER_NAME};
use crate::wire::Limits;

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
                    .map_err(|_| TransportError::IdleTimeout(self.idle_timeout))?,
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
            version: std::sync::atomic::AtomicU16::new(crate::wire::PROTOCOL_VERSION),
            conn,
            _endpoint: None,
            limits: self.limits.clone(),
        })
    }

    /// Accepts connections in the background and completes each handshake
    /// concurrently, each within `handshake_timeout`: a peer that opens a
    /// handshake and stops delays no one else. Established (mutually
    /// authenticated) connections and handshake failures arrive on the
    /// returned channel, in completion order. Must be called within a tokio
    /// runtime; the task ends when the receiver is dropped or the endpoint
    /// closes.
    pub fn incoming(
        &self,
        handshake_timeout: std::time::Duration,
    ) -> tokio::sync::mpsc::Receiver<Result<Connection, TransportError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let endpoint = self.endpoint.clone();
        let limits = self.limits.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                if tx.is_closed() {
                    return;
                }
                let (tx, limits) = (tx.clone(), limits.clone());
                tokio::spawn(async move {
                    let r = match tokio::time::timeout(handshake_timeout, incoming).await {
                        Err(_) => Err(TransportError::HandshakeTimeout(handshake_timeout)),
                        Ok(Err(e)) => Err(e.into()),
                        Ok(Ok(conn)) => {
                            log::info!(
                                "accepted replication connection from {}",
                                conn.remote_address()
                            );
                            Ok(Connection {
                                version: std::sync::atomic::AtomicU16::new(
                                    crate::wire::PROTOCOL_VERSION,
                                ),
                                conn,
                                _endpoint: None,
                                limits,
                            })
                        }
                    };
                    let _ = tx.send(r).await;
                });
            }
        });
        rx
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
        version: std::sync::atomic::AtomicU16::new(crate::wire::PROTOCOL_VERSION),
        conn,
        _endpoint: Some(endpoint),
        limits: cfg.limits.clone(),
    })
}
