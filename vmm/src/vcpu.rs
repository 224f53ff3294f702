//! vCPU threads and the pause/resume protocol.
//!
//! Each vCPU has its own thread running `KVM_RUN` in a loop. To pause, the
//! controller sets `kvm_run.immediate_exit = 1` on every vCPU and sends each
//! thread a real-time signal with a no-op handler: a thread inside `KVM_RUN`
//! is kicked out with `EINTR`, a thread about to enter returns at once. A
//! thread that sees `EINTR` with a pause requested releases its `VcpuFd` and
//! waits. `pause()` returns once every vCPU waits, so the controller may then
//! use every `VcpuFd` (capture, restore) without racing a running vCPU.
//!
//! Any exit that needs completion by KVM (`in`, MMIO reads) is completed by
//! the `KVM_RUN` with `immediate_exit = 1` that precedes the wait, so a
//! paused vCPU's registers are always architecturally consistent.

use crate::exits::{ExitAction, StopReason};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// `KVM_EXIT_DIRTY_RING_FULL`, which kvm-ioctls reports as `Unsupported`.
const KVM_EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;

/// Signal used to kick vCPU threads out of `KVM_RUN`.
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op kick handler once per process (without `SA_RESTART`, so
/// `KVM_RUN` returns `EINTR`).
pub(crate) fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| e.errno())
    })
    .map_err(std::io::Error::from_raw_os_error)
}

/// Pointer to a vCPU's `kvm_run.immediate_exit`, written by the controller.
pub(crate) struct ImmediateExit {
    ptr: *mut u8,
    // Keeps the mapping `ptr` points into alive.
    _fd: Arc<Mutex<VcpuFd>>,
}

// SAFETY: `ptr` points into the vCPU's kvm_run mapping, owned by the VcpuFd that
// `_fd` keeps alive; the byte is only ever accessed with volatile single-byte
// loads/stores, which the kernel tolerates from any thread.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    pub(crate) fn new(fd: &Arc<Mutex<VcpuFd>>) -> Self {
        let ptr = {
            let mut guard = fd.lock().unwrap_or_else(|e| e.into_inner());
            std::ptr::addr_of_mut!(guard.get_kvm_run().immediate_exit)
        };
        ImmediateExit {
            ptr,
            _fd: fd.clone(),
        }
    }

    pub(crate) fn set(&self, v: bool) {
        // SAFETY: see the Send impl: a valid byte in a live mapping.
        unsafe { std::ptr::write_volatile(self.ptr, v as u8) };
    }
}

/// Where a vCPU is in the pause protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuRunState {
    /// In or about to enter `KVM_RUN`.
    Running,
    /// Out of `KVM_RUN`, waiting for `resume()`.
    Paused,
    /// Stopped for a reason; runs again only after a restore or boot.
    Stopped(StopReason),
}

pub(crate) struct Ctl {
    pub pause: bool,
    pub quit: bool,
    pub runnable: Vec<bool>,
    pub states: Vec<VcpuRunState>,
}

/// State shared between the controller and the vCPU threads of one VM.
pub(crate) struct Shared {
    pub ctl: Mutex<Ctl>,
    /// Signalled by the controller on resume/quit.
    pub resume_cv: Condvar,
    /// Signalled by a vCPU thread when it starts waiting.
    pub waiting_cv: Condvar,
    /// vCPUs currently out of `KVM_RUN` and waiting.
    pub waiting: AtomicUsize,
    pub exits: Vec<ImmediateExit>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every vCPU is out of `KVM_RUN`. Pause is on the epoch's
    /// critical path, so the controller does not sleep on a condition variable
    /// (a wake-up costs tens of microseconds): it yields the CPU, which lets a
    /// kicked vCPU thread that shares this core run to its park, and falls
    /// back to the condition variable only if the vCPUs take unusually long.
    pub(crate) fn wait_all_out(&self, n: usize) {
        let yield_until = Instant::now() + Duration::from_millis(5);
        while self.waiting.load(Ordering::Acquire) < n {
            if Instant::now() > yield_until {
                let mut c = self.lock();
                while self.waiting.load(Ordering::Acquire) < n {
                    c = self
                        .waiting_cv
                        .wait_timeout(c, Duration::from_millis(10))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                return;
            }
            std::thread::yield_now();
        }
    }
}

/// Handles the exits a vCPU thread cannot handle itself.
pub(crate) trait ExitHandler: Send + Sync {
    fn io_in(&self, vcpu: u32, port: u16, data: &mut [u8]) -> ExitAction;
    fn io_out(&self, vcpu: u32, port: u16, data: &[u8]) -> ExitAction;
    fn mmio_read(&self, vcpu: u32, addr: u64, data: &mut [u8]) -> ExitAction;
    fn mmio_write(&self, vcpu: u32, addr: u64, data: &[u8]) -> ExitAction;
    /// `KVM_EXIT_INTERNAL_ERROR` (e.g. an instruction KVM could not emulate).
    fn internal_error(&self, vcpu: u32, fd: &mut VcpuFd) -> StopReason;
}

/// The body of vCPU thread `id`.
pub(crate) fn vcpu_loop(
    id: u32,
    fd: Arc<Mutex<VcpuFd>>,
    shared: Arc<Shared>,
    handler: Arc<dyn ExitHandler>,
    dirty_ring: Option<Arc<castor_dirty_tracking::RingShared>>,
) {
    let idx = id as usize;
    // Start out of KVM_RUN, waiting for the first resume.
    let mut guard = match wait_for_go(idx, &fd, &shared, None) {
        Some(g) => g,
        None => return,
    };
    let mut pending_stop: Option<StopReason> = None;
    loop {
        let action = match guard.run() {
            Ok(VcpuExit::IoIn(port, data)) => handler.io_in(id, port, data),
            Ok(VcpuExit::IoOut(port, data)) => handler.io_out(id, port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => handler.mmio_read(id, addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => handler.mmio_write(id, addr, data),
            Ok(VcpuExit::Shutdown) => {
                let regs = guard.get_regs().unwrap_or_default();
                log::warn!(
                    "vCPU {id} shutdown: rip {:#x} rflags {:#x} rsp {:#x}",
                    regs.rip,
                    regs.rflags,
                    regs.rsp
                );
                let rip = regs.rip;
                let exception = guard.get_vcpu_events().map(|e| e.exception.nr).unwrap_or(0);
                ExitAction::StopNow(StopReason::Fault { rip, exception })
            }
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) if dirty_ring.is_some() => {
                // This vCPU's dirty ring is full: move it to the pending set,
                // let KVM recycle it, and run on (nothing is lost).
                match dirty_ring.as_ref().map(|r| r.on_ring_full(idx)) {
                    Some(Err(e)) => ExitAction::StopNow(StopReason::KvmError(format!(
                        "harvesting a full dirty ring: {e}"
                    ))),
                    _ => ExitAction::Continue,
                }
            }
            Ok(VcpuExit::Hlt) => ExitAction::StopNow(StopReason::UnexpectedExit("HLT".into())),
            Ok(VcpuExit::InternalError) => {
                ExitAction::StopNow(handler.internal_error(id, &mut guard))
            }
            Ok(VcpuExit::FailEntry(reason, _)) => ExitAction::StopNow(StopReason::UnexpectedExit(
                format!("VM entry failed, hardware reason {reason:#x}"),
            )),
            Ok(other) => ExitAction::StopNow(StopReason::UnexpectedExit(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR => {
                // Kicked, or an immediate exit after completing the last I/O.
                if let Some(reason) = pending_stop.take() {
                    drop(guard);
                    guard = match wait_for_go(idx, &fd, &shared, Some(reason)) {
                        Some(g) => g,
                        None => return,
                    };
                    continue;
                }
                let mut c = shared.lock();
                if c.quit {
                    return;
                }
                if c.pause {
                    drop(c);
                    drop(guard);
                    guard = match wait_for_go(idx, &fd, &shared, None) {
                        Some(g) => g,
                        None => return,
                    };
                } else {
                    // A stale kick: clear it under the lock so no new pause is lost.
                    shared.exits[idx].set(false);
                    c.states[idx] = VcpuRunState::Running;
                }
                continue;
            }
            Err(e) if e.errno() == libc::EAGAIN => continue,
            Err(e) => ExitAction::StopNow(StopReason::KvmError(format!("KVM_RUN: {e}"))),
        };
        match action {
            ExitAction::Continue => {}
            ExitAction::Stop(reason) => {
                // Re-enter once with immediate_exit so KVM completes this exit's I/O.
                pending_stop = Some(reason);
                shared.exits[idx].set(true);
            }
            ExitAction::StopNow(reason) => {
                drop(guard);
                guard = match wait_for_go(idx, &fd, &shared, Some(reason)) {
                    Some(g) => g,
                    None => return,
                };
            }
            ExitAction::Sleep(d) => {
                drop(guard);
                guard = match sleep_out_of_run(idx, &fd, &shared, d) {
                    Some(g) => g,
                    None => return,
                };
            }
        }
    }
}

/// Parks vCPU `idx` for at most `d` (the guest asked to idle), counted as out
/// of `KVM_RUN` so a `pause()` meanwhile returns at once; a pause during the
/// sleep holds the vCPU until `resume()`. `None` means quit.
fn sleep_out_of_run<'a>(
    idx: usize,
    fd: &'a Arc<Mutex<VcpuFd>>,
    shared: &Shared,
    d: Duration,
) -> Option<MutexGuard<'a, VcpuFd>> {
    let until = Instant::now() + d;
    let mut c = shared.lock();
    shared.waiting.fetch_add(1, Ordering::AcqRel);
    shared.waiting_cv.notify_all();
    loop {
        if c.quit {
            shared.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let now = Instant::now();
        if !c.pause && c.runnable[idx] && now >= until {
            break;
        }
        let wait = if c.pause || !c.runnable[idx] {
            Duration::from_millis(50)
        } else {
            until - now
        };
        c = shared
            .resume_cv
            .wait_timeout(c, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    shared.waiting.fetch_sub(1, Ordering::AcqRel);
    shared.exits[idx].set(false);
    c.states[idx] = VcpuRunState::Running;
    drop(c);
    Some(fd.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Marks vCPU `idx` as out of `KVM_RUN` (stopped if `stop` is set), waits for
/// a resume that lets it run, and re-takes its fd. `None` means quit.
fn wait_for_go<'a>(
    idx: usize,
    fd: &'a Arc<Mutex<VcpuFd>>,
    shared: &Shared,
    stop: Option<StopReason>,
) -> Option<MutexGuard<'a, VcpuFd>> {
    let mut c = shared.lock();
    if let Some(reason) = stop {
        log::debug!("vCPU {idx} stopped: {reason}");
        c.runnable[idx] = false;
        c.states[idx] = VcpuRunState::Stopped(reason);
    } else {
        c.states[idx] = VcpuRunState::Paused;
    }
    shared.waiting.fetch_add(1, Ordering::AcqRel);
    shared.waiting_cv.notify_all();
    while !c.quit && (c.pause || !c.runnable[idx]) {
        c = shared.resume_cv.wait(c).unwrap_or_else(|e| e.into_inner());
    }
    shared.waiting.fetch_sub(1, Ordering::AcqRel);
    if c.quit {
        return None;
    }
    shared.exits[idx].set(false);
    c.states[idx] = VcpuRunState::Running;
    drop(c);
    Some(fd.lock().unwrap_or_else(|e| e.into_inner()))
}
