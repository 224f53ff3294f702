//! The `dirtier` workload: writes to its vCPU's region at a rate and pattern,
//! keeps its counters and a running checksum in guest memory, and every
//! `record_every` touches submits a [`Record`] through the output register.
//!
//! Deterministic for a given seed and starting state: what it writes and the
//! records it emits depend only on the state in guest memory (and, when
//! `use_entropy` is set, on the values read from the entropy register). The TSC is
//! read only for pacing, which changes *when* a touch happens, never *what*
//! (though the pacing deadline it stores on the stack differs between two
//! VMs); an unpaced dirtier reads no clock at all, so its whole memory is
//! deterministic.

use crate::rt;
use castor_guest_abi::{
    layout, pattern, pv, BootInfo, DirtierState, Record, VcpuPage, MAILBOX_OFFSET,
};
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline(always)]
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[inline(always)]
fn mix(checksum: u64, v: u64) -> u64 {
    (checksum.rotate_left(7) ^ v).wrapping_mul(0x0000_0100_0000_01b3)
}

/// Runs the dirtier on vCPU `vcpu` forever.
pub fn run(vcpu: u64, info: &BootInfo) -> ! {
    let cfg = info.dirtier;
    let page_size = layout::PAGE_SIZE;
    let npages = (cfg.region_bytes / page_size).max(1);
    let region = cfg.region_base + vcpu * cfg.region_bytes;
    let words = (cfg.bytes_per_page as u64 / 8).clamp(1, page_size / 8);
    let span = page_size / 8 - words + 1; // possible word offsets in a page
    let record_every = cfg.record_every.max(1);
    let hot_pages = (npages / 10).max(1);

    let page_addr = layout::vcpu_page(vcpu);
    let ctl = page_addr as *mut VcpuPage;
    // SAFETY: the control page is this vCPU's own, identity mapped, and laid out as VcpuPage.
    let state: *mut DirtierState = unsafe { addr_of_mut!((*ctl).dirtier) };
    // SAFETY: as above; the VMM zeroes the page at boot, a restore brings back a live one.
    let mut st = unsafe { read_volatile(state) };
    if st.rng == 0 && st.iterations == 0 {
        st.rng = info.seed ^ (vcpu + 1).wrapping_mul(GOLDEN);
    }

    // Pacing in 32.32 fixed point TSC ticks per touch; 0 = unpaced.
    let tsc_hz = info.tsc_khz.saturating_mul(1000);
    let ticks_per_touch: u128 = if cfg.pages_per_sec == 0 || tsc_hz == 0 {
        0
    } else {
        ((tsc_hz as u128) << 32) / cfg.pages_per_sec as u128
    };
    let max_lag: u128 = (tsc_hz as u128 / 100) << 32; // never burst more than 10 ms worth
                                                      // Read the clock only when pacing: the TSC is input from outside the VM,
                                                      // and an unpaced dirtier stays deterministic down to every byte of its
                                                      // memory (its stack included).
    let mut deadline: u128 = if ticks_per_touch != 0 {
        (rt::rdtsc() as u128) << 32
    } else {
        0
    };

    loop {
        if ticks_per_touch != 0 {
            deadline += ticks_per_touch;
            if st.iterations.is_multiple_of(16) {
                let mut now = (rt::rdtsc() as u128) << 32;
                if now > deadline + max_lag {
                    deadline = now; // we were paused or starved: do not catch up in a burst
                }
                while now < deadline {
                    // Far ahead of schedule: let the VMM park this vCPU rather
                    // than spin (an idle kernel would halt); else spin.
                    let ahead_us = ((deadline - now) >> 32) * 1000 / (info.tsc_khz.max(1) as u128);
                    if ahead_us > 100 {
                        rt::pv_write32(pv::SLEEP_US, (ahead_us as u32).min(pv::MAX_SLEEP_US));
                    } else {
                        rt::cpu_relax();
                    }
                    now = (rt::rdtsc() as u128) << 32;
                }
            }
        }

        let page = match cfg.pattern {
            pattern::SEQUENTIAL => {
                let p = st.cursor % npages;
                st.cursor = st.cursor.wrapping_add(1);
                p
            }
            pattern::HOT_COLD => {
                let r = splitmix(&mut st.rng);
                if !r.is_multiple_of(10) {
                    (r >> 8) % hot_pages
                } else {
                    (r >> 8) % npages
                }
            }
            _ => splitmix(&mut st.rng) % npages,
        };
        let first_word = splitmix(&mut st.rng) % span;
        let base = (region + page * page_size + first_word * 8) as *mut u64;
        for w in 0..words {
            let v = splitmix(&mut st.rng);
            // SAFETY: `base + w` stays inside this vCPU's region page (first_word + words <= 512).
            unsafe { write_volatile(base.add(w as usize), v) };
            st.checksum = mix(st.checksum, v ^ page);
        }
        st.iterations += 1;

        if st.iterations.is_multiple_of(record_every) {
            if cfg.use_entropy != 0 {
                let e = rt::pv_read64(pv::ENTROPY);
                st.checksum = mix(st.checksum, e);
            }
            st.seq += 1;
            let rec = Record {
                vcpu: vcpu as u32,
                _reserved: 0,
                seq: st.seq,
                iterations: st.iterations,
                checksum: st.checksum,
            };
            // SAFETY: the state and mailbox live in this vCPU's control page.
            unsafe {
                write_volatile(state, st);
                write_volatile((page_addr + MAILBOX_OFFSET) as *mut Record, rec);
            }
            // Submit; 0 means the VMM's output buffer is full: retry (back-pressure).
            while rt::pv_read32(pv::OUTPUT) == 0 {
                rt::cpu_relax();
            }
        } else {
            // SAFETY: as above.
            unsafe { write_volatile(state, st) };
        }
    }
}
