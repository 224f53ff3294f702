//! An established [`Connection`] and the framed streams on it
//! ([`FrameSender`], [`FrameReceiver`]), plus frames in QUIC datagrams.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::VarInt;

use super::{TransportError, CLOSE_PROTOCOL_ERROR};
use crate::wire::{self, Frame, FrameRef, Header, Limits, WireError};

/// Picks the data stream for a page, so all frames of one page number use
/// the same stream (keeping XOR bases in order).
pub fn data_stream_for_page(page_number: u64, streams: usize) -> usize {
    if streams == 0 {
        0
    } else {
        (page_number % streams as u64) as usize
    }
}

/// An established, mutually authenticated connection.
#[derive(Debug)]
pub struct Connection {
    pub(super) conn: quinn::Connection,
    pub(super) _endpoint: Option<quinn::Endpoint>,
    pub(super) limits: Limits,
    /// Protocol version datagrams are encoded in (the negotiated one).
    pub(super) version: std::sync::atomic::AtomicU16,
}

impl Connection {
    /// Sets the protocol version negotiated at Hello: datagrams are encoded
    /// in it from now on.
    pub fn set_version(&self, version: u16) {
        self.version
            .store(version, std::sync::atomic::Ordering::Relaxed);
    }

    /// The protocol version in use.
    pub fn version(&self) -> u16 {
        self.version.load(std::sync::atomic::Ordering::Relaxed)
    }

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
        frame.encode_at(self.version(), &mut buf)?;
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
    version: u16,
}

impl FrameSender {
    fn new(stream: quinn::SendStream) -> Self {
        FrameSender {
            stream,
            buf: Vec::new(),
            frames: 0,
            version: wire::PROTOCOL_VERSION,
        }
    }

    /// Encodes frames in protocol `version` from now on (the negotiated one).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// Encodes and sends one frame; returns its header (for [`wire::EpochTally`]).
    pub async fn send(&mut self, frame: &Frame) -> Result<Header, TransportError> {
        self.buf.clear();
        let header = frame.encode_at(self.version, &mut self.buf)?;
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
