//! Packet output commit for the guest's virtio-net device.
//!
//! * [`NetTxSink`] is the device's [`TxSink`]: every frame the guest
//!   transmits is pushed into the output-commit buffer, held and tagged with
//!   the open epoch. A full buffer answers [`TxOutcome::Full`], so the device
//!   stops consuming the guest's TX ring until a later kick (back-pressure:
//!   nothing is dropped). In unprotected mode the frame passes through at once.
//! * [`TapRelease`] is the [`Release`] sink: frames released by `Ack(e)` are
//!   written to this host's tap, in sequence order.
//! * [`gratuitous_arp`] builds the frame a backup sends on its tap after a
//!   takeover so bridges and peers learn the guest's MAC on the new port.
//!
//! Inbound frames are not buffered: the device reads the tap directly.

use castor_net_buffer::{OutputBuffer, PushError, Pushed};
use castor_replicator::primary::Release;
use castor_vmm::devices::{Tap, TxOutcome, TxSink};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The guest's TX frames go into the output-commit buffer.
pub struct NetTxSink {
    buffer: Arc<OutputBuffer>,
    release: Arc<dyn Release>,
    too_large: AtomicU64,
}

impl NetTxSink {
    /// Frames go into `buffer`; pass-through frames (unprotected) go to `release`.
    pub fn new(buffer: Arc<OutputBuffer>, release: Arc<dyn Release>) -> Self {
        NetTxSink {
            buffer,
            release,
            too_large: AtomicU64::new(0),
        }
    }
}

impl TxSink for NetTxSink {
    fn transmit(&self, frame: &[u8]) -> TxOutcome {
        match self.buffer.try_push(frame.to_vec()) {
            Ok(Pushed::Held(_)) => TxOutcome::Sent,
            Ok(Pushed::PassThrough(item)) => {
                self.release.release(0, &[(item.seq, item.data)]);
                TxOutcome::Sent
            }
            Err(PushError::Full(_)) => TxOutcome::Full,
            Err(PushError::TooLarge { len, max_bytes, .. }) => {
                // Can never fit: refusing it would wedge the TX ring forever.
                if self.too_large.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::error!(
                        "virtio-net: dropping a {len}-byte frame larger than [output] max_held ({max_bytes})"
                    );
                }
                TxOutcome::Sent
            }
        }
    }
}

/// Released frames go to a tap.
pub struct TapRelease {
    tap: Arc<Tap>,
    errors: AtomicU64,
}

impl TapRelease {
    /// Writes released frames to `tap`.
    pub fn new(tap: Arc<Tap>) -> Self {
        TapRelease {
            tap,
            errors: AtomicU64::new(0),
        }
    }

    /// Writes one frame (also used for frames the VMM makes itself, e.g. ARP).
    pub fn send(&self, frame: &[u8]) {
        if let Err(e) = self.tap.write_frame(frame) {
            if self.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!("writing a frame to tap {}: {e}", self.tap.name());
            }
        }
    }
}

impl Release for TapRelease {
    fn release(&self, _epoch: u64, items: &[(u64, Vec<u8>)]) {
        for (_, frame) in items {
            self.send(frame);
        }
        metrics::counter!("castor_released_frames_total").increment(items.len() as u64);
    }
}

/// A gratuitous ARP for `ip` at `mac`: a broadcast ARP frame with the
/// sender and target protocol address both `ip` (RFC 5227 announcement),
/// padded to the 60-byte Ethernet minimum. `reply` picks the ARP reply form
/// (opcode 2) instead of the request form (opcode 1); some peers update
/// their caches only on one of them, so a takeover sends both.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4], reply: bool) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4]); // Ethernet, IPv4
    f.extend_from_slice(&[0x00, if reply { 2 } else { 1 }]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    if reply {
        f.extend_from_slice(&mac);
    } else {
        f.extend_from_slice(&[0; 6]);
    }
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_layout() {
        let f = gratuitous_arp([2, 0xca, 0x57, 0, 0, 2], [10, 0, 0, 2], false);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &[10, 0, 0, 2]);
        assert_eq!(&f[38..42], &[10, 0, 0, 2]);
        let r = gratuitous_arp([2, 0xca, 0x57, 0, 0, 2], [10, 0, 0, 2], true);
        assert_eq!(&r[20..22], &[0, 2]);
        assert_eq!(&r[32..38], &[2, 0xca, 0x57, 0, 0, 2]);
    }
}
