//! Where the guest's output goes.
//!
//! * [`BufferedSink`]: the VM's record sink on a protected guest: every
//!   record goes into the output-commit buffer (held until its epoch is
//!   acknowledged); a full buffer stalls the guest.
//! * [`UdpRelease`]: the [`Release`] sink for records: one UDP datagram each.
//! * [`SwitchSink`] / [`SwitchTxSink`]: what a replica VM is built with: they
//!   refuse output until a takeover connects them to the real sinks (the
//!   replica never runs before that).

use castor_net_buffer::{OutputBuffer, PushError, Pushed};
use castor_replicator::primary::Release;
use castor_vmm::devices::{TxOutcome, TxSink};
use castor_vmm::{Emit, OutputSink, Record};
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

/// The guest's output sink: every record goes into the output-commit buffer
/// (held until its epoch is acknowledged); a full buffer stalls the guest.
pub struct BufferedSink {
    /// The buffer.
    pub buffer: Arc<OutputBuffer>,
    /// Where pass-through items go when running unprotected.
    pub release: Arc<dyn Release>,
}

impl OutputSink for BufferedSink {
    fn emit(&self, r: &Record) -> Emit {
        match self.buffer.try_push(r.to_bytes().to_vec()) {
            Ok(Pushed::Held(_)) => Emit::Accepted,
            Ok(Pushed::PassThrough(item)) => {
                self.release.release(
                    0,
                    &[castor_net_buffer::HeldItem {
                        seq: item.seq,
                        data: item.data,
                    }],
                );
                Emit::Accepted
            }
            Err(PushError::Full(_)) => Emit::Busy,
            Err(PushError::TooLarge { .. }) => Emit::Stop,
        }
    }
}

/// Released output goes to a UDP address: one datagram per item,
/// `seq (u64 LE) || epoch (u64 LE) || item bytes`, where `epoch` is the
/// acknowledged epoch that released it (0: released unprotected).
pub struct UdpRelease {
    socket: UdpSocket,
    to: SocketAddr,
}

impl UdpRelease {
    /// A sender to `to`.
    pub fn new(to: SocketAddr) -> std::io::Result<Self> {
        let bind: SocketAddr = if to.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        Ok(UdpRelease {
            socket: UdpSocket::bind(bind)?,
            to,
        })
    }
}

impl Release for UdpRelease {
    fn release(&self, epoch: u64, items: &[castor_net_buffer::HeldItem]) {
        let mut buf = Vec::with_capacity(64);
        for castor_net_buffer::HeldItem { seq, data } in items {
            buf.clear();
            buf.extend_from_slice(&seq.to_le_bytes());
            buf.extend_from_slice(&epoch.to_le_bytes());
            buf.extend_from_slice(data);
            if let Err(e) = self.socket.send_to(&buf, self.to) {
                log::warn!("releasing output item {seq} to {}: {e}", self.to);
            }
        }
        metrics::counter!("castor_released_items_total").increment(items.len() as u64);
    }
}

/// A replica VM's output sink: refuses everything until a takeover
/// connects it to the real one (the replica never runs before that).
#[derive(Default)]
pub struct SwitchSink {
    inner: Mutex<Option<Arc<dyn OutputSink>>>,
}

impl SwitchSink {
    /// Routes output to `sink` from now on.
    pub fn connect(&self, sink: Arc<dyn OutputSink>) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }
}

impl OutputSink for SwitchSink {
    fn emit(&self, r: &Record) -> Emit {
        match self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(s) => s.emit(r),
            None => Emit::Busy,
        }
    }
}

/// A replica's TX sink: refuses frames (full) until a takeover connects
/// it (the replica never runs before that).
#[derive(Default)]
pub struct SwitchTxSink {
    inner: Mutex<Option<Arc<dyn TxSink>>>,
}

impl SwitchTxSink {
    /// Routes frames to `sink` from now on.
    pub fn connect(&self, sink: Arc<dyn TxSink>) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }
}

impl TxSink for SwitchTxSink {
    fn transmit(&self, frame: &[u8]) -> TxOutcome {
        match self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(s) => s.transmit(frame),
            None => TxOutcome::Full,
        }
    }
}
