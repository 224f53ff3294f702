//! Test-only fault injection inside the encrypted channel (feature
//! `fault-injection`): a network proxy cannot alter frames under QUIC's AEAD,
//! so faults are applied to an epoch's encoded frames before they are sent.

use crate::wire;

/// A fault to inject into one epoch's data frames, inside the encrypted
/// channel (a network proxy cannot alter frames under QUIC's AEAD), to test
/// that the backup rejects them and the pair recovers. Testing only: built
/// with the `fault-injection` feature.
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Flip a byte in the first data frame's payload (CRC mismatch).
    Corrupt,
    /// Send only the first half of the first data frame.
    Truncate,
    /// Send the first data frame twice (tally mismatch).
    Duplicate,
    /// Swap the first two data frames (tolerated: the tally is order-free).
    Reorder,
}

/// Applies a [`Fault`] to a buffer of whole frames.
pub(super) fn inject(fault: Fault, data: Vec<u8>) -> Vec<u8> {
    let limits = wire::Limits {
        max_payload: u32::MAX,
        ..Default::default()
    };
    let mut bounds = Vec::new();
    let mut off = 0;
    while off < data.len() {
        match wire::Header::parse(&data[off..], &limits) {
            Ok(h) => {
                bounds.push((off, off + h.frame_len()));
                off += h.frame_len();
            }
            Err(_) => break,
        }
    }
    let Some(&(a0, a1)) = bounds.first() else {
        return data;
    };
    match fault {
        Fault::Corrupt => {
            let mut d = data;
            let i = (a0 + wire::HEADER_LEN + 4).min(a1 - 1);
            d[i] ^= 0xa5;
            d
        }
        Fault::Truncate => {
            let mut d = data[..a0 + (a1 - a0) / 2].to_vec();
            d.extend_from_slice(&data[a1..]);
            d
        }
        Fault::Duplicate => {
            let mut d = data[a0..a1].to_vec();
            d.extend_from_slice(&data);
            d
        }
        Fault::Reorder => match bounds.get(1) {
            Some(&(b0, b1)) => {
                let mut d = data[b0..b1].to_vec();
                d.extend_from_slice(&data[a0..a1]);
                d.extend_from_slice(&data[b1..]);
                d
            }
            None => data,
        },
    }
}

/// Testing: with `CASTOR_FAULT_STOP_AT_ACK=N` in its environment, the ack
/// task holds the backup's `Ack(N)` before acting on it, once, until the
/// process has been stopped and continued: it logs "holding Ack(N) in hand
/// until this process is stopped", the test sends SIGSTOP and later
/// SIGCONT, and the hold ends when it sees the standstill (a gap between
/// two of its 1 ms naps; 60 s at most). A primary frozen with an ack in
/// hand: the fence must then refuse to release that ack's output.
pub(super) fn stop_at_ack(epoch: u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    static FIRED: AtomicBool = AtomicBool::new(false);
    let at = std::env::var("CASTOR_FAULT_STOP_AT_ACK")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if at != Some(epoch) || FIRED.swap(true, Ordering::SeqCst) {
        return;
    }
    log::warn!("fault injection: holding Ack({epoch}) in hand until this process is stopped");
    let start = Instant::now();
    let mut last = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
        let now = Instant::now();
        if now.duration_since(last) > Duration::from_millis(250) {
            log::warn!(
                "fault injection: stood still for {:?}; acting on Ack({epoch}) now",
                now.duration_since(last)
            );
            return;
        }
        last = now;
    }
}
