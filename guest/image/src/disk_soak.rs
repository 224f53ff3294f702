//! The continuous disk workload (`disk_continuous`): what a protected disk
//! must survive. Forever: write round `r + 1` of a random block (numbered,
//! checksummed: `castor_guest_abi::disk_block`), flush every 8 writes, and
//! read back the next block in turn, checking it against the round this
//! guest believes it last wrote there (its table of rounds is in guest RAM,
//! so it travels with every checkpoint). A record every 16 operations says
//! how far it got; a mismatch is reported as a record with `_reserved = 1`
//! (block in `iterations`, the round found in `checksum`, `u64::MAX` for a
//! block that is not a well-formed one), then the guest panics.
//!
//! After a failover the guest goes on from the committed checkpoint on the
//! backup's image: a full pass of read-backs then proves the image equals,
//! block for block, what that checkpoint's memory says was written.

use crate::disk::{Blk, T_FLUSH, T_IN, T_OUT};
use crate::mem::{BLK_BULK, BLK_BULK_BYTES, BLK_DATA, BLK_EXPECT, BLK_ROUNDS};
use crate::rt;
use castor_guest_abi::{
    disk_block, layout, parse_disk_block, pv, BootInfo, DeviceConfig, Record, DISK_BLOCK_BYTES,
    MAILBOX_OFFSET,
};
use core::ptr::{read_volatile, write_volatile};

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn emit(rec: Record) {
    let mailbox = layout::vcpu_page(0) + MAILBOX_OFFSET;
    // SAFETY: vCPU 0's mailbox in its control page.
    unsafe { write_volatile(mailbox as *mut Record, rec) };
    // 0: the VMM's output buffer is full: retry (back-pressure).
    while rt::pv_read32(pv::OUTPUT) == 0 {
        rt::cpu_relax();
    }
}

/// The throughput benchmark (`DISK_MODE_SEQUENTIAL`): sequential 64 KiB
/// writes, a flush every 16, paced by `rate` writes per second (0: flat out).
pub fn sequential(blk: &mut Blk, info: &BootInfo, cfg: &DeviceConfig) -> ! {
    let spb = DISK_BLOCK_BYTES / 512;
    let per_write = BLK_BULK_BYTES / DISK_BLOCK_BYTES;
    let chunks = (cfg.disk_blocks / per_write).max(1);
    // SAFETY: reserved guest RAM (see mem.rs), not aliased.
    let bulk = unsafe { crate::mem::slice(BLK_BULK, BLK_BULK_BYTES as usize) };
    let mut rng = info.seed | 1;
    for x in bulk.iter_mut() {
        *x = splitmix(&mut rng) as u8;
    }
    let hdr = (crate::mem::BLK_HDR, 16, 0);
    let status = (crate::mem::BLK_HDR + 16, 1, crate::virtq::DESC_F_WRITE);
    let mut seq: u64 = 0;
    let mut writes: u64 = 0;
    let tsc_hz = info.tsc_khz.max(1) * 1000;
    let ticks_per_op = tsc_hz.checked_div(cfg.rate).unwrap_or(0);
    let mut deadline = rt::rdtsc();
    loop {
        let c = writes % chunks;
        // A different first word each time: the data changes.
        bulk[..8].copy_from_slice(&writes.to_le_bytes());
        let (st, _) = blk.raw_request(
            T_OUT,
            c * per_write * spb,
            &[hdr, (BLK_BULK, BLK_BULK_BYTES as u32, 0), status],
        );
        if st != 0 {
            panic!("write of chunk {} failed: status {}", c, st);
        }
        writes += 1;
        if writes.is_multiple_of(16) {
            let t = rt::rdtsc();
            let (st, _) = blk.request(T_FLUSH, 0, 0);
            if st != 0 {
                panic!("flush failed: status {}", st);
            }
            let flush_ticks = rt::rdtsc().saturating_sub(t);
            seq += 1;
            emit(Record {
                vcpu: 0,
                _reserved: 0,
                seq,
                iterations: writes,
                checksum: flush_ticks,
            });
        }
        if ticks_per_op != 0 {
            deadline += ticks_per_op;
            let now = rt::rdtsc();
            if now > deadline + tsc_hz / 100 || deadline > now + tsc_hz {
                deadline = now;
            }
            while rt::rdtsc() < deadline {
                let ahead_us = deadline.saturating_sub(rt::rdtsc()) * 1_000_000 / tsc_hz;
                if ahead_us > 100 {
                    rt::pv_write32(pv::SLEEP_US, (ahead_us as u32).min(pv::MAX_SLEEP_US));
                } else {
                    rt::cpu_relax();
                }
            }
        }
    }
}

/// One block found not to be what the guest wrote there.
pub struct Mismatch {
    pub block: u64,
    /// The round the block holds (`u64::MAX`: not a well-formed block).
    pub found: u64,
    pub want: u64,
}

/// The write / flush / read-back state machine, one operation per
/// [`Soak::step`] (the disk workload loops on it; the net workload, given a
/// disk, steps it between polls).
pub struct Soak {
    seed: u64,
    n: u64,
    rng: u64,
    pub ops: u64,
    pub verified: u64,
    vptr: u64,
}

impl Soak {
    pub fn new(info: &BootInfo, blocks: u64) -> Self {
        Soak {
            seed: info.seed,
            n: blocks,
            rng: info.seed ^ 0x5eed_d15c,
            ops: 0,
            verified: 0,
            vptr: 0,
        }
    }

    /// Whether the read-backs just completed a whole pass.
    pub fn at_pass_start(&self) -> bool {
        self.vptr == 0
    }

    /// Writes the next round of a random block (a flush every 8 writes),
    /// then reads back the next block in turn and checks it.
    pub fn step(&mut self, blk: &mut Blk) -> Result<(), Mismatch> {
        let spb = DISK_BLOCK_BYTES / 512;
        let bs = DISK_BLOCK_BYTES as usize;
        // SAFETY: reserved guest RAM (see mem.rs), not aliased.
        let data = unsafe { crate::mem::slice(BLK_DATA, bs) };
        // SAFETY: as above.
        let expect = unsafe { crate::mem::slice(BLK_EXPECT, bs) };
        let rounds = BLK_ROUNDS as *mut u32;
        let b = splitmix(&mut self.rng) % self.n;
        // SAFETY: b < n <= MAX_CONTINUOUS_DISK_BLOCKS: inside the table.
        let r = unsafe { read_volatile(rounds.add(b as usize)) } as u64 + 1;
        disk_block(self.seed, b, r, data);
        let (st, _) = blk.request(T_OUT, b * spb, bs as u32);
        if st != 0 {
            panic!("write of block {} failed: status {}", b, st);
        }
        // SAFETY: as above.
        unsafe { write_volatile(rounds.add(b as usize), r as u32) };
        self.ops += 1;
        if self.ops.is_multiple_of(8) {
            let (st, _) = blk.request(T_FLUSH, 0, 0);
            if st != 0 {
                panic!("flush failed: status {}", st);
            }
        }
        let v = self.vptr;
        self.vptr = (self.vptr + 1) % self.n;
        data.fill(0xa5);
        let (st, len) = blk.request(T_IN, v * spb, bs as u32);
        if st != 0 || len != bs as u32 + 1 {
            panic!("read of block {} failed: status {} len {}", v, st, len);
        }
        // SAFETY: v < n: inside the table.
        let want = unsafe { read_volatile(rounds.add(v as usize)) } as u64;
        disk_block(self.seed, v, want, expect);
        if data[..] != expect[..] {
            let found = match parse_disk_block(data) {
                Some((_, round)) => round,
                None => u64::MAX,
            };
            return Err(Mismatch {
                block: v,
                found,
                want,
            });
        }
        self.verified += 1;
        Ok(())
    }
}

pub fn run(blk: &mut Blk, info: &BootInfo, cfg: &DeviceConfig) -> ! {
    let mut soak = Soak::new(info, cfg.disk_blocks);
    let mut seq: u64 = 0;
    let tsc_hz = info.tsc_khz.max(1) * 1000;
    let ticks_per_op = tsc_hz.checked_div(cfg.rate).unwrap_or(0);
    let mut deadline = rt::rdtsc();
    loop {
        if let Err(m) = soak.step(blk) {
            seq += 1;
            emit(Record {
                vcpu: 0,
                _reserved: 1,
                seq,
                iterations: m.block,
                checksum: m.found,
            });
            panic!(
                "disk block {} reads back round {}, expected round {}",
                m.block, m.found, m.want
            );
        }
        let (ops, verified) = (soak.ops, soak.verified);
        if cfg.disk_ops != 0 && ops >= cfg.disk_ops && soak.at_pass_start() {
            // Done, after a last whole pass of read-backs: report and stop.
            seq += 1;
            emit(Record {
                vcpu: 0,
                _reserved: 0,
                seq,
                iterations: verified,
                checksum: ops,
            });
            rt::stop(castor_guest_abi::status::DONE);
        }
        if ops.is_multiple_of(16) {
            seq += 1;
            emit(Record {
                vcpu: 0,
                _reserved: 0,
                seq,
                iterations: verified,
                checksum: ops,
            });
        }
        if ticks_per_op != 0 {
            deadline += ticks_per_op;
            let now = rt::rdtsc();
            if now > deadline + tsc_hz / 100 || deadline > now + tsc_hz {
                // Paused or starved: no catch-up burst; a clock that moved
                // back (another host) must not park the guest either.
                deadline = now;
            }
            while rt::rdtsc() < deadline {
                let ahead_us = deadline.saturating_sub(rt::rdtsc()) * 1_000_000 / tsc_hz;
                if ahead_us > 100 {
                    rt::pv_write32(pv::SLEEP_US, (ahead_us as u32).min(pv::MAX_SLEEP_US));
                } else {
                    rt::cpu_relax();
                }
            }
        }
    }
}
