//! The disk workload: writes numbered 4 KiB blocks to virtio-blk, flushes,
//! reads them back and checks them, then sends the device malformed requests
//! and a corrupt ring (each must get an error, never hang or crash the VMM),
//! then reports DONE. Any mismatch or unexpected answer panics (the VMM sees
//! the message).

use crate::mem::{BLK_DATA, BLK_HDR, BLK_Q};
use crate::rt;
use crate::virtq::{
    Mmio, Virtq, DESC_F_NEXT, DESC_F_WRITE, F_RING_EVENT_IDX, F_VERSION_1, REG_CONFIG, REG_STATUS,
};
use castor_guest_abi::{disk_pattern, status, BootInfo, DeviceConfig, DISK_BLOCK_BYTES};
use core::ptr::{read_volatile, write_volatile};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const F_FLUSH: u64 = 1 << 9;

/// A polling virtio-blk driver, one request in flight.
pub struct Blk {
    mmio: Mmio,
    q: Virtq,
    pub capacity_sectors: u64,
}

impl Blk {
    pub fn new(base: u64) -> Self {
        let mmio = Mmio { base };
        let q = Virtq::new(BLK_Q, 16);
        mmio.init(2, F_VERSION_1 | F_RING_EVENT_IDX | F_FLUSH, &[(0, &q)]);
        let lo = mmio.read(REG_CONFIG) as u64;
        let hi = mmio.read(REG_CONFIG + 4) as u64;
        Blk {
            mmio,
            q,
            capacity_sectors: (hi << 32) | lo,
        }
    }

    /// Submits the chain `descs` (address, length, flags), linked in order,
    /// for request type `ty` at `sector`; returns (status byte, used length).
    /// For building malformed requests: nothing is checked here.
    pub fn raw_request(&mut self, ty: u32, sector: u64, descs: &[Desc]) -> (u8, u32) {
        // SAFETY: BLK_HDR is RAM reserved for the request header and status.
        unsafe {
            write_volatile(BLK_HDR as *mut u32, ty);
            write_volatile((BLK_HDR + 4) as *mut u32, 0);
            write_volatile((BLK_HDR + 8) as *mut u64, sector);
            write_volatile((BLK_HDR + 16) as *mut u8, 0xff);
        }
        let n = descs.len() as u16;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = i as u16;
            let (flags, next) = if i + 1 < n {
                (flags | DESC_F_NEXT, i + 1)
            } else {
                (flags & !DESC_F_NEXT, 0)
            };
            self.q.set_desc(i, addr, len, flags, next);
        }
        self.q.push_avail(0);
        self.mmio.notify(0);
        loop {
            if let Some((_, used_len)) = self.q.pop_used() {
                // SAFETY: the status byte.
                let st = unsafe { read_volatile((BLK_HDR + 16) as *const u8) };
                return (st, used_len);
            }
            rt::cpu_relax();
        }
    }

    /// Runs one request of type `ty` at `sector` with `len` data bytes at
    /// BLK_DATA; returns (status, used length).
    pub fn request(&mut self, ty: u32, sector: u64, len: u32) -> (u8, u32) {
        let data_flags = if ty == T_OUT { 0 } else { DESC_F_WRITE };
        let hdr = (BLK_HDR, 16, 0);
        let status = (BLK_HDR + 16, 1, DESC_F_WRITE);
        if len > 0 {
            self.raw_request(ty, sector, &[hdr, (BLK_DATA, len, data_flags), status])
        } else {
            self.raw_request(ty, sector, &[hdr, status])
        }
    }
}

pub fn run(vcpu: u64, info: &BootInfo, cfg: &DeviceConfig) -> ! {
    if vcpu != 0 {
        rt::stop(status::DONE);
    }
    if cfg.blk_mmio == 0 {
        rt::stop(status::BAD_BOOT_INFO);
    }
    let mut blk = Blk::new(cfg.blk_mmio);
    match cfg.disk_continuous {
        0 => {}
        castor_guest_abi::DISK_MODE_SEQUENTIAL => crate::disk_soak::sequential(&mut blk, info, cfg),
        _ => crate::disk_soak::run(&mut blk, info, cfg),
    }
    let sectors_per_block = DISK_BLOCK_BYTES / 512;
    if cfg.disk_blocks * sectors_per_block > blk.capacity_sectors {
        panic!(
            "disk of {} sectors is too small for {} blocks",
            blk.capacity_sectors, cfg.disk_blocks
        );
    }
    // SAFETY: BLK_DATA is RAM reserved for the data buffer (4 KiB).
    let data = unsafe { crate::mem::slice(BLK_DATA, DISK_BLOCK_BYTES as usize) };
    for b in 0..cfg.disk_blocks {
        for (i, x) in data.iter_mut().enumerate() {
            *x = disk_pattern(info.seed, b, i as u64);
        }
        let (st, _) = blk.request(T_OUT, b * sectors_per_block, DISK_BLOCK_BYTES as u32);
        if st != 0 {
            panic!("write of block {} failed: status {}", b, st);
        }
    }
    let (st, _) = blk.request(T_FLUSH, 0, 0);
    if st != 0 {
        panic!("flush failed: status {}", st);
    }
    let (st, n) = blk.request(T_GET_ID, 0, 20);
    if st != 0 || n == 0 {
        panic!("get-id failed: status {} len {}", st, n);
    }
    for b in 0..cfg.disk_blocks {
        data.fill(0);
        let (st, n) = blk.request(T_IN, b * sectors_per_block, DISK_BLOCK_BYTES as u32);
        if st != 0 || n != DISK_BLOCK_BYTES as u32 + 1 {
            panic!("read of block {} failed: status {} len {}", b, st, n);
        }
        for (i, x) in data.iter().enumerate() {
            if *x != disk_pattern(info.seed, b, i as u64) {
                panic!("block {} byte {} reads back wrong", b, i);
            }
        }
    }
    // Past the end: the device must answer IOERR, not hang or crash.
    let (st, _) = blk.request(T_IN, blk.capacity_sectors, 512);
    if st != 1 {
        panic!("read past the end got status {}, not IOERR", st);
    }
    malformed(&mut blk);
    rt::stop(status::DONE)
}

/// Malformed requests from the guest: each must be refused with IOERR (1) or
/// UNSUPP (2), or, when the chain leaves no usable status byte, completed
/// with nothing written; and the device must keep serving valid requests.
/// Finally a corrupt avail ring must make the device ask for a reset.
/// One descriptor: (guest address, length, flags).
type Desc = (u64, u32, u16);

fn malformed(blk: &mut Blk) {
    const OUTSIDE_RAM: u64 = 0x7_0000_0000; // mapped, but no memory there
    let hdr = (BLK_HDR, 16, 0);
    let status_desc = (BLK_HDR + 16, 1, DESC_F_WRITE);
    let cases: [(&str, u32, &[Desc]); 6] = [
        (
            "data buffer outside guest memory",
            T_IN,
            &[hdr, (OUTSIDE_RAM, 4096, DESC_F_WRITE), status_desc],
        ),
        (
            "write-only request header",
            T_IN,
            &[
                (BLK_HDR, 16, DESC_F_WRITE),
                (BLK_DATA, 512, DESC_F_WRITE),
                status_desc,
            ],
        ),
        (
            "unknown request type",
            77,
            &[hdr, (BLK_DATA, 512, DESC_F_WRITE), status_desc],
        ),
        (
            "length not a whole sector",
            T_IN,
            &[hdr, (BLK_DATA, 100, DESC_F_WRITE), status_desc],
        ),
        (
            "read into a read-only buffer",
            T_IN,
            &[hdr, (BLK_DATA, 512, 0), status_desc],
        ),
        ("no status descriptor", T_IN, &[hdr]),
    ];
    for (what, ty, descs) in cases {
        let (st, used) = blk.raw_request(ty, 0, descs);
        let refused = st == 1 || st == 2;
        let dropped = st == 0xff && used == 0;
        if !(refused || dropped) {
            panic!("{}: status {} used {} (expected an error)", what, st, used);
        }
        // The device still serves a valid request.
        let (st, n) = blk.request(T_IN, 0, 512);
        if st != 0 || n != 513 {
            panic!("after {}: a valid read got status {} len {}", what, st, n);
        }
    }
    // A descriptor index past the queue in the avail ring: the device must
    // stop and ask for a reset (DEVICE_NEEDS_RESET, 0x40), not crash.
    blk.q.push_avail(200);
    blk.mmio.notify(0);
    if blk.mmio.read(REG_STATUS) & 0x40 == 0 {
        panic!("a corrupt avail ring did not set DEVICE_NEEDS_RESET");
    }
}
