//! virtio-net backed by a tap device.
//!
//! Queue 0 is RX, queue 1 is TX. Features: VERSION_1, MAC, RING_EVENT_IDX;
//! no offloads and no mergeable RX buffers, so every RX buffer must hold a
//! 12-byte `virtio_net_hdr_v1` plus a full-MTU frame (the guest posts 2 KiB).
//!
//! **TX seam.** Every frame the guest transmits goes through one
//! [`TxSink`] given to the device; the default, [`TapTxSink`], writes it
//! straight to the tap. The replicator's output-commit buffer plugs in here
//! and holds frames until their epoch is acknowledged.
//!
//! **Back-pressure.** A sink may answer [`TxOutcome::Full`] (its bounded
//! buffer is full). The device then stops consuming TX descriptors: the
//! refused chain is put back (not added to the used ring), so the guest sees
//! its TX ring stay full and nothing is dropped. Every later notification of
//! either queue (the guest kicks on every loop, TX or idle RX poll) retries
//! TX first, in order, from the refused frame.
//!
//! **RX without a thread.** The built-in guest polls and takes no
//! interrupts, so RX is pulled on guest notifications: any QueueNotify (the
//! guest's TX kick, or its idle "poll" kick of the RX queue) first sends
//! what the TX ring holds, then moves every frame waiting in the tap into
//! free RX buffers, as many as the ring has (one exit per batch, not per
//! packet). Why not an RX thread: with all device work inside vCPU exits, a
//! paused VM has quiescent devices, so `pause()` needs no device protocol,
//! capture is consistent with guest memory by construction, and RX writes
//! cannot race a dirty-bitmap harvest. The cost is RX latency of one guest
//! poll interval (the guest polls when idle, every loop).
//!
//! Received frames are written into guest memory through vm-memory
//! (`write_slice`), which marks the pages dirty.

use super::{BackendState, Processed, VirtioDevice, F_RING_EVENT_IDX, F_VERSION_1, TYPE_NET};
use crate::devices::tap::{Tap, VNET_HDR_LEN};
use crate::devices::DeviceError;
use crate::memory::GuestMemoryMmap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

/// Feature: the device has a MAC address in its config space.
pub const F_MAC: u64 = 1 << 5;
/// RX queue index.
pub const RX_QUEUE: usize = 0;
/// TX queue index.
pub const TX_QUEUE: usize = 1;
/// Largest frame accepted from the guest or the tap (header excluded).
pub const MAX_FRAME: usize = 65_550;

/// Where the frames the guest transmits go. The single seam for output
/// commit: an implementation may hold frames (e.g. until the epoch that
/// produced them is acknowledged by the backup) before releasing them.
pub trait TxSink: Send + Sync {
    /// One Ethernet frame (without the virtio-net header) from the guest.
    /// [`TxOutcome::Full`] refuses it for now: the device keeps the frame in
    /// the guest's TX ring and offers it again on the next notification.
    fn transmit(&self, frame: &[u8]) -> TxOutcome;
}

/// What a [`TxSink`] did with a frame.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// Taken (sent, held or dropped by the sink's own choice).
    Sent,
    /// Not taken: the sink is full; offer the same frame again later.
    Full,
}

/// The default sink: writes every frame straight to the tap.
pub struct TapTxSink {
    tap: Arc<Tap>,
    errors: AtomicU64,
}

impl TapTxSink {
    /// A sink writing to `tap`.
    pub fn new(tap: Arc<Tap>) -> Self {
        TapTxSink {
            tap,
            errors: AtomicU64::new(0),
        }
    }

    /// Frames the tap refused.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

impl TxSink for TapTxSink {
    fn transmit(&self, frame: &[u8]) -> TxOutcome {
        if let Err(e) = self.tap.write_frame(frame) {
            if self.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!("virtio-net: writing to tap {}: {e}", self.tap.name());
            }
        }
        TxOutcome::Sent
    }
}

/// Counters of a virtio-net device.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames the guest transmitted.
    pub tx_frames: AtomicU64,
    /// Malformed TX chains dropped.
    pub tx_dropped: AtomicU64,
    /// Times the sink refused a frame (full): TX stopped until the next kick.
    pub tx_full: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames dropped because an RX buffer was malformed or too small.
    pub rx_dropped: AtomicU64,
}

/// What to back a virtio-net device with.
pub struct NetConfig {
    /// The tap frames are received from (and, by default, sent to).
    pub tap: Arc<Tap>,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Where transmitted frames go; `None`: straight to the tap.
    pub tx_sink: Option<Arc<dyn TxSink>>,
}

/// A virtio-net device.
pub struct VirtioNet {
    tap: Arc<Tap>,
    sink: Arc<dyn TxSink>,
    mac: [u8; 6],
    config: [u8; 8],
    rx_buf: Vec<u8>,
    counters: Arc<NetCounters>,
}

impl VirtioNet {
    /// A device on `cfg.tap`.
    pub fn new(cfg: NetConfig) -> Self {
        let sink = cfg
            .tx_sink
            .unwrap_or_else(|| Arc::new(TapTxSink::new(cfg.tap.clone())));
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&cfg.mac);
        // status (u16) at 6: VIRTIO_NET_S_LINK_UP is only valid with F_STATUS; leave 0.
        VirtioNet {
            tap: cfg.tap,
            sink,
            mac: cfg.mac,
            config,
            rx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME],
            counters: Arc::new(NetCounters::default()),
        }
    }

    /// The device's counters (shared; readable while the VM runs).
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn tx(&self, q: &mut Queue, mem: &GuestMemoryMmap) -> Processed {
        let mut p = Processed::default();
        if !q.ready() {
            return p;
        }
        let mut frame = Vec::with_capacity(2048);
        loop {
            if q.disable_notification(mem).is_err() {
                p.broken = true;
                return p;
            }
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let descs: Vec<Descriptor> = chain.collect();
                frame.clear();
                match gather(mem, &descs, &mut frame) {
                    Err(why) => {
                        log::debug!("virtio-net: dropping TX chain: {why}");
                        self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(()) => match self.sink.transmit(&frame[VNET_HDR_LEN..]) {
                        TxOutcome::Sent => {
                            self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                        }
                        TxOutcome::Full => {
                            // Back-pressure: leave the chain in the ring (not
                            // used), stop here; the next kick retries it.
                            q.go_to_previous_position();
                            self.counters.tx_full.fetch_add(1, Ordering::Relaxed);
                            if q.enable_notification(mem).is_err() {
                                p.broken = true;
                            }
                            return p;
                        }
                    },
                }
                if q.add_used(mem, head, 0).is_err() {
                    p.broken = true;
                    return p;
                }
                p.used += 1;
            }
            match q.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => return p,
                Err(_) => {
                    p.broken = true;
                    return p;
                }
            }
        }
    }

    fn rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Processed {
        let mut p = Processed::default();
        if !q.ready() {
            return p;
        }
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let n = match self.tap.read_frame(&mut self.rx_buf) {
                Ok(Some(n)) if n >= VNET_HDR_LEN => n,
                Ok(Some(_)) => {
                    // Shorter than its header: drop it, keep the buffer.
                    q.go_to_previous_position();
                    continue;
                }
                Ok(None) => {
                    // Nothing waiting: give the buffer back.
                    q.go_to_previous_position();
                    break;
                }
                Err(e) => {
                    log::warn!("virtio-net: reading tap {}: {e}", self.tap.name());
                    q.go_to_previous_position();
                    break;
                }
            };
            // One buffer per frame (no MRG_RXBUF): num_buffers = 1.
            self.rx_buf[10] = 1;
            self.rx_buf[11] = 0;
            let descs: Vec<Descriptor> = chain.collect();
            let written = match scatter(mem, &descs, &self.rx_buf[..n]) {
                Ok(w) => {
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    w
                }
                Err(why) => {
                    log::debug!("virtio-net: dropping RX frame: {why}");
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            if q.add_used(mem, head, written).is_err() {
                p.broken = true;
                return p;
            }
            p.used += 1;
        }
        // Publish avail_event so an EVENT_IDX driver knows we want more buffers.
        if q.enable_notification(mem).is_err() {
            p.broken = true;
        }
        p
    }
}

/// Concatenates a TX chain's driver-readable buffers into `out` (header first).
pub(crate) fn gather(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let mut total = 0usize;
    for d in descs {
        if d.is_write_only() {
            return Err("device-writable buffer in a TX chain");
        }
        total += d.len() as usize;
        if total > VNET_HDR_LEN + MAX_FRAME {
            return Err("frame too long");
        }
    }
    if total < VNET_HDR_LEN + 14 {
        return Err("shorter than a header and an Ethernet header");
    }
    out.resize(total, 0);
    let mut off = 0;
    for d in descs {
        let len = d.len() as usize;
        mem.read_slice(&mut out[off..off + len], d.addr())
            .map_err(|_| "buffer outside guest memory")?;
        off += len;
    }
    Ok(())
}

/// Writes `data` across an RX chain's device-writable buffers; returns the bytes written.
pub(crate) fn scatter(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    data: &[u8],
) -> Result<u32, &'static str> {
    let room: u64 = descs.iter().map(|d| d.len() as u64).sum();
    if descs.iter().any(|d| !d.is_write_only()) {
        return Err("driver-readable buffer in an RX chain");
    }
    if room < data.len() as u64 {
        return Err("RX buffer too small");
    }
    let mut off = 0usize;
    for d in descs {
        if off == data.len() {
            break;
        }
        let len = (d.len() as usize).min(data.len() - off);
        // Through `Bytes`: marks the guest pages dirty.
        mem.write_slice(&data[off..off + len], d.addr())
            .map_err(|_| "buffer outside guest memory")?;
        off += len;
    }
    Ok(off as u32)
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn avail_features(&self) -> u64 {
        F_VERSION_1 | F_RING_EVENT_IDX | F_MAC
    }

    fn queue_count(&self) -> usize {
        2
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn process(&mut self, _idx: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Processed {
        // Any kick sends what is queued, then pulls what the tap holds.
        let mut p = Processed::default();
        if let Some(q) = queues.get_mut(TX_QUEUE) {
            let t = self.tx(q, mem);
            p.used += t.used;
            p.broken |= t.broken;
        }
        if let Some(q) = queues.get_mut(RX_QUEUE) {
            let r = self.rx(q, mem);
            p.used += r.used;
            p.broken |= r.broken;
        }
        p
    }

    fn capture(&self) -> BackendState {
        BackendState::Net { mac: self.mac }
    }

    fn identity(&self) -> castor_parts::PartIdentity {
        castor_parts::PartIdentity::VirtioNet { mac: self.mac }
    }

    fn restore(&mut self, s: &BackendState) -> Result<(), DeviceError> {
        self.check(s)
    }

    fn check(&self, s: &BackendState) -> Result<(), DeviceError> {
        match s {
            BackendState::Net { mac } if *mac == self.mac => Ok(()),
            BackendState::Net { mac } => Err(DeviceError::StateMismatch(format!(
                "MAC {mac:02x?} in the state, {:02x?} here",
                self.mac
            ))),
            other => Err(DeviceError::StateMismatch(format!(
                "{other:?} for a virtio-net device"
            ))),
        }
    }
}
