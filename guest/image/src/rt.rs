//! The freestanding runtime: memory primitives the compiler calls, paravirtual
//! register access,
//! the TSC, and the panic path. Everything here is usable at CPL 3.

use castor_guest_abi::{layout, pv, status, TEXT_OFFSET};
use core::arch::asm;

// The compiler lowers copies and fills to these symbols; with no libc they are ours.
// `rep movsb`/`rep stosb` in asm keep LLVM from turning them back into calls.

/// # Safety
/// Standard `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and do not overlap.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dest precedes src or they do not overlap.
        unsafe { memcpy(dest, src, n) }
    } else {
        // SAFETY: backward copy with the direction flag set, restored afterwards.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _, inout("rdi") dest.add(n - 1) => _,
                 inout("rsi") src.add(n - 1) => _, options(nostack));
        }
        dest
    }
}

/// # Safety
/// Standard `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The prebuilt libcore references it; with `panic = "abort"` it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// 32-bit load from a paravirtual register (an MMIO exit).
#[inline(always)]
pub fn pv_read32(addr: u64) -> u32 {
    // SAFETY: `addr` is in the paravirtual page, mapped user-accessible by the
    // VMM's page tables and backed by no memory slot: the load exits to the VMM.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// 64-bit load from a paravirtual register.
#[inline(always)]
pub fn pv_read64(addr: u64) -> u64 {
    // SAFETY: as for `pv_read32`.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// 32-bit store to a paravirtual register.
#[inline(always)]
pub fn pv_write32(addr: u64, v: u32) {
    // SAFETY: as for `pv_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// The time-stamp counter (readable at CPL 3: CR4.TSD is clear).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc has no memory effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

/// Spin-loop hint.
#[inline(always)]
pub fn cpu_relax() {
    core::hint::spin_loop();
}

/// Reports `code` to the VMM, which stops this vCPU. Never returns; if the VMM
/// resumes us anyway, fault so the VMM sees a shutdown.
pub fn stop(code: u32) -> ! {
    pv_write32(pv::STATUS, code);
    loop {
        // SAFETY: ud2 raises #UD, which with no IDT is a triple fault: a clean stop.
        unsafe { asm!("ud2", options(nomem, nostack)) };
    }
}

struct TextWriter {
    base: *mut u8,
    len: usize,
}

impl core::fmt::Write for TextWriter {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len + 1 >= castor_guest_abi::PANIC_TEXT_LEN {
                break;
            }
            // SAFETY: within this vCPU's control page text buffer (bounded above).
            unsafe { core::ptr::write_volatile(self.base.add(self.len), b) };
            self.len += 1;
        }
        Ok(())
    }
}

/// This vCPU's id, from where its stack lives (each vCPU's stack is inside its
/// own area), so the panic path needs no shared state.
fn current_vcpu() -> u64 {
    let sp: u64;
    // SAFETY: reads the stack pointer only.
    unsafe { asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    (sp.saturating_sub(layout::VCPU_AREA_ADDR) / layout::VCPU_AREA_SIZE).min(layout::MAX_VCPUS - 1)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    let id = current_vcpu();
    let mut w = TextWriter {
        base: (layout::vcpu_page(id) + TEXT_OFFSET) as *mut u8,
        len: 0,
    };
    let _ = write!(w, "{}", info);
    stop(status::PANIC)
}
