//! Packet output commit for the guest's virtio-net device, on this host's tap.
//!
//! * [`NetTxSink`] is the device's [`TxSink`]: every frame the guest
//!   transmits is pushed into the output-commit buffer, held and tagged with
//!   the open epoch. A full buffer answers [`TxOutcome::Full`], so the device
//!   stops consuming the guest's TX ring until a later kick (back-pressure:
//!   nothing is dropped). In unprotected mode the frame passes through at once.
//! * [`TapRelease`] is the [`Release`] sink: frames released by `Ack(e)` are
//!   written to this host's tap, in sequence order.
//! * [`open_tap`] opens (and brings up) the tap; [`drain_stale_frames`]
//!   empties its queue before a restored guest reads it.
//!
//! Inbound frames are not buffered: the device reads the tap directly.

use castor_net_buffer::{OutputBuffer, PushError, Pushed};
use castor_replicator::primary::Release;
use castor_vmm::devices::{DeviceError, Tap, TapError, TxOutcome, TxSink};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The guest's network device could not be set up on this host.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The virtio-net device could not be added to the VM.
    #[error("virtio-net: {0}")]
    Device(#[from] DeviceError),
    /// The tap does not exist, and the config does not ask for one to be
    /// created (a tap created here would be on no bridge: the guest would be
    /// unreachable, and a takeover would announce it into the void).
    #[error(
        "tap {tap} does not exist. Create it on the guest's bridge first \
         (ip tuntap add dev {tap} mode tap && ip link set {tap} master BRIDGE up), \
         or set `create_tap = true` under [net] to have Castor create it (unbridged: \
         you then attach it to a bridge yourself)"
    )]
    TapMissing {
        /// The tap's name.
        tap: String,
    },
}

/// What to do about the guest's tap on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TapPolicy {
    /// It must exist (the operator made it, on the guest's bridge).
    #[default]
    MustExist,
    /// Create it when missing (`[net] create_tap = true`).
    Create,
}

/// Where an existing interface is enslaved: its bridge (or bond), if any.
pub fn interface_master(name: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/class/net/{name}/master")).ok()?;
    link.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Whether the interface `name` exists in this network namespace.
pub fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Opens this host's tap for the guest and brings it up (a tap that cannot
/// be brought up is assumed to be managed outside: logged, not refused).
/// A missing tap is refused unless `policy` says to create it; a tap on no
/// bridge is logged: the guest is then reachable from this host only.
pub fn open_tap(name: &str, policy: TapPolicy) -> Result<Tap, NetError> {
    let existed = interface_exists(name);
    if !existed && policy == TapPolicy::MustExist {
        return Err(NetError::TapMissing { tap: name.into() });
    }
    let tap = Tap::open(name)?;
    if let Err(e) = tap.set_up() {
        log::warn!("cannot bring tap {name} up ({e}); assuming it is managed outside");
    }
    match (existed, interface_master(name)) {
        (_, Some(bridge)) => log::info!("tap {name} is on bridge {bridge}"),
        (false, None) => log::warn!(
            "created tap {name} ([net] create_tap = true): it is on NO bridge, so the guest is \
             reachable from this host only; attach it: ip link set {name} master BRIDGE"
        ),
        (true, None) => log::warn!(
            "tap {name} is on no bridge: the guest is reachable from this host only (routed \
             set-ups aside), and a takeover announces it where nobody listens; attach it: \
             ip link set {name} master BRIDGE"
        ),
    }
    Ok(tap)
}

/// Drops the frames queued on `tap` (at most 100 000), returning how many:
/// used before a restored guest runs, so that it does not see frames queued
/// while the replica was not running (broadcasts and frames flooded before
/// the LAN learned the guest's port, possibly seconds old). Anything still
/// needed is sent again by its peers (TCP retransmits what the committed
/// state has not seen).
pub fn drain_stale_frames(tap: &Tap) -> u32 {
    let mut buf = vec![0u8; 65_536];
    let mut dropped = 0u32;
    while dropped < 100_000 {
        match tap.read_frame(&mut buf) {
            Ok(Some(_)) => dropped += 1,
            Ok(None) | Err(_) => break,
        }
    }
    dropped
}

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
                self.release.release(
                    0,
                    &[castor_net_buffer::HeldItem {
                        seq: item.seq,
                        data: item.data,
                    }],
                );
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

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }
}

impl Release for TapRelease {
    fn release(&self, _epoch: u64, items: &[castor_net_buffer::HeldItem]) {
        for item in items {
            self.send(&item.data);
        }
        metrics::counter!("castor_released_frames_total").increment(items.len() as u64);
    }
}
