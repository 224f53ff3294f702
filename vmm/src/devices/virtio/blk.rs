//! virtio-blk backed by a raw image file.
//!
//! Requests: IN (read), OUT (write), FLUSH (`fdatasync`) and GET_ID. Writes go
//! to the file with `pwrite` (the page cache); FLUSH makes them durable, and
//! the device offers `VIRTIO_BLK_F_FLUSH` so the driver knows it must flush.
//! Everything in a request is guest-controlled and checked: a malformed
//! chain, an out-of-range sector or an unknown type gets `VIRTIO_BLK_S_IOERR`
//! or `VIRTIO_BLK_S_UNSUPP` in its status byte (or, with no usable status
//! byte, a zero-length used entry), never a VMM panic. Data reaches guest
//! memory through vm-memory's `Bytes`, which marks the pages dirty.

use super::blk_track::DiskTracker;
use super::{BackendState, Processed, VirtioDevice, F_RING_EVENT_IDX, F_VERSION_1, TYPE_BLOCK};
use crate::devices::DeviceError;
use crate::memory::GuestMemoryMmap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

/// Sector size.
pub const SECTOR_SIZE: u64 = 512;
/// Feature: the device supports FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// Read.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get the device id string.
pub const T_GET_ID: u32 = 8;
/// Status: success.
pub const S_OK: u8 = 0;
/// Status: I/O error (also: malformed request, out of range).
pub const S_IOERR: u8 = 1;
/// Status: unsupported request type.
pub const S_UNSUPP: u8 = 2;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// Largest data length of one request (bounds the VMM's bounce buffer).
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;

/// What to back a virtio-blk device with.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    /// Raw image file; its length (rounded down to sectors) is the capacity.
    pub path: PathBuf,
    /// Open read-only: writes get IOERR.
    pub read_only: bool,
}

/// A virtio-blk device.
pub struct VirtioBlk {
    file: File,
    capacity_sectors: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    config: [u8; 8],
    /// Requests completed with each status (OK, IOERR, UNSUPP).
    pub completed: [u64; 3],
    /// Blocks written and flushes since the last harvest (a protected disk).
    tracker: Option<Arc<DiskTracker>>,
}

impl VirtioBlk {
    /// Opens the image.
    pub fn open(cfg: &BlkConfig) -> Result<Self, DeviceError> {
        let err = |source| DeviceError::DiskImage {
            path: cfg.path.display().to_string(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&cfg.path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let tracker = DiskTracker::new(
            file.try_clone().map_err(err)?,
            len / SECTOR_SIZE * SECTOR_SIZE,
            cfg.read_only,
        );
        let mut blk = Self::from_file(file, len / SECTOR_SIZE, cfg.read_only, &cfg.path);
        blk.tracker = Some(Arc::new(tracker));
        Ok(blk)
    }

    /// The device's write log (what a protected disk replicates).
    pub fn tracker(&self) -> Option<Arc<DiskTracker>> {
        self.tracker.clone()
    }

    fn from_file(file: File, capacity_sectors: u64, read_only: bool, path: &Path) -> Self {
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        VirtioBlk {
            file,
            capacity_sectors,
            read_only,
            id,
            config: capacity_sectors.to_le_bytes(),
            completed: [0; 3],
            tracker: None,
        }
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Executes one request; returns (status, bytes written into guest data buffers).
    fn execute(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> (u8, u32) {
        // Layout: header (readable, 16 bytes), data..., status (writable, last).
        let Some((hdr_desc, rest)) = descs.split_first() else {
            return (S_IOERR, 0);
        };
        let Some((_status, data)) = rest.split_last() else {
            return (S_IOERR, 0);
        };
        if hdr_desc.is_write_only() || hdr_desc.len() < 16 {
            return (S_IOERR, 0);
        }
        let mut hdr = [0u8; 16];
        if mem.read_slice(&mut hdr, hdr_desc.addr()).is_err() {
            return (S_IOERR, 0);
        }
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(s);
        match ty {
            T_IN | T_OUT => self.rw(mem, ty == T_IN, sector, data),
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => {
                    if let Some(t) = &self.tracker {
                        t.mark_flush();
                    }
                    (S_OK, 0)
                }
                Err(e) => {
                    log::warn!("virtio-blk: flush: {e}");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let Some(d) = data.first() else {
                    return (S_IOERR, 0);
                };
                if !d.is_write_only() {
                    return (S_IOERR, 0);
                }
                let n = (d.len() as usize).min(ID_LEN);
                match mem.write_slice(&self.id[..n], d.addr()) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }

    fn rw(
        &mut self,
        mem: &GuestMemoryMmap,
        read: bool,
        sector: u64,
        data: &[Descriptor],
    ) -> (u8, u32) {
        if !read && self.read_only {
            return (S_IOERR, 0);
        }
        let mut total: u64 = 0;
        for d in data {
            // Reads need device-writable buffers, writes driver-readable ones.
            if d.is_write_only() != read {
                return (S_IOERR, 0);
            }
            total += d.len() as u64;
        }
        if !total.is_multiple_of(SECTOR_SIZE) || total > MAX_REQUEST_BYTES {
            return (S_IOERR, 0);
        }
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(total).map(|end| (start, end)));
        let Some((start, end)) = end else {
            return (S_IOERR, 0);
        };
        if end > self.capacity_sectors * SECTOR_SIZE {
            return (S_IOERR, 0);
        }
        let mut buf = vec![0u8; total as usize];
        if read {
            if let Err(e) = self.file.read_exact_at(&mut buf, start) {
                log::warn!("virtio-blk: read at {start}: {e}");
                return (S_IOERR, 0);
            }
            let mut off = 0usize;
            for d in data {
                let len = d.len() as usize;
                // Through `Bytes`: marks the guest pages dirty.
                if mem.write_slice(&buf[off..off + len], d.addr()).is_err() {
                    return (S_IOERR, off as u32);
                }
                off += len;
            }
            (S_OK, total as u32)
        } else {
            let mut off = 0usize;
            for d in data {
                let len = d.len() as usize;
                if mem.read_slice(&mut buf[off..off + len], d.addr()).is_err() {
                    return (S_IOERR, 0);
                }
                off += len;
            }
            match self.file.write_all_at(&buf, start) {
                Ok(()) => {
                    // After the write landed: a harvest between the two
                    // sees the bit again at the next one.
                    if let Some(t) = &self.tracker {
                        t.record_write(start, &buf);
                    }
                    (S_OK, 0)
                }
                Err(e) => {
                    log::warn!("virtio-blk: write at {start}: {e}");
                    (S_IOERR, 0)
                }
            }
        }
    }
}

/// Drains queue `q`: pops every available chain, lets `f` handle its
/// descriptors (returning bytes written to the guest), puts it in the used
/// ring, and re-arms notifications (EVENT_IDX: publishes `avail_event`).
pub(crate) fn drain<F>(q: &mut Queue, mem: &GuestMemoryMmap, mut f: F) -> Processed
where
    F: FnMut(&[Descriptor]) -> u32,
{
    let mut p = Processed::default();
    if !q.ready() {
        return p;
    }
    loop {
        if q.disable_notification(mem).is_err() {
            p.broken = true;
            return p;
        }
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let len = f(&descs);
            if q.add_used(mem, head, len).is_err() {
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

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn avail_features(&self) -> u64 {
        F_VERSION_1 | F_RING_EVENT_IDX | F_FLUSH
    }

    fn queue_count(&self) -> usize {
        1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn process(&mut self, idx: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Processed {
        let Some(q) = queues.get_mut(idx) else {
            return Processed::default();
        };
        drain(q, mem, |descs| {
            let (status, written) = self.execute(mem, descs);
            self.completed[status.min(2) as usize] += 1;
            // The status byte goes in the last descriptor, if it is a writable one.
            match descs.last() {
                Some(d) if descs.len() >= 2 && d.is_write_only() && d.len() >= 1 => {
                    match mem.write_obj(status, d.addr()) {
                        Ok(()) => written + 1,
                        Err(_) => 0,
                    }
                }
                _ => 0,
            }
        })
    }

    fn capture(&self) -> BackendState {
        BackendState::Blk {
            capacity_sectors: self.capacity_sectors,
        }
    }

    fn identity(&self) -> castor_parts::PartIdentity {
        castor_parts::PartIdentity::VirtioBlk {
            capacity_bytes: self.capacity_sectors * SECTOR_SIZE,
            read_only: self.read_only,
        }
    }

    fn restore(&mut self, s: &BackendState) -> Result<(), DeviceError> {
        self.check(s)
    }

    fn check(&self, s: &BackendState) -> Result<(), DeviceError> {
        match s {
            BackendState::Blk { capacity_sectors }
                if *capacity_sectors == self.capacity_sectors =>
            {
                Ok(())
            }
            BackendState::Blk { capacity_sectors } => Err(DeviceError::StateMismatch(format!(
                "disk of {capacity_sectors} sectors in the state, {} here",
                self.capacity_sectors
            ))),
            other => Err(DeviceError::StateMismatch(format!(
                "{other:?} for a virtio-blk device"
            ))),
        }
    }
}
