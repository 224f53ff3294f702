//! What the VMM does with the guest's exits: the paravirtual registers of the
//! built-in guest's ABI, and the seam ([`OutputSink`]) through which guest
//! output leaves the VMM.

use crate::memory::GuestMemoryMmap;
use crate::vcpu::ExitHandler;
use castor_guest_abi::{layout, pv, status, Record, MAILBOX_OFFSET, PANIC_TEXT_LEN, TEXT_OFFSET};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

/// Why a vCPU stopped on its own (not by `pause()`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StopReason {
    /// The guest reported that its workload finished.
    #[error("guest workload finished")]
    GuestDone,
    /// The guest panicked.
    #[error("guest panicked: {0}")]
    GuestPanic(String),
    /// The guest did not understand its boot information.
    #[error("guest rejected its boot information")]
    BadBootInfo,
    /// The output sink asked this vCPU to stop (e.g. a record limit was reached).
    #[error("stopped by the output sink")]
    SinkStop,
    /// A fault with no handler (triple fault).
    #[error("guest fault (exception {exception}) at rip {rip:#x}")]
    Fault {
        /// Instruction pointer at the fault.
        rip: u64,
        /// Exception vector, when KVM reports one.
        exception: u8,
    },
    /// KVM_RUN failed.
    #[error("{0}")]
    KvmError(String),
    /// An exit the VMM does not handle.
    #[error("unexpected exit: {0}")]
    UnexpectedExit(String),
    /// KVM could not emulate a guest instruction (or hit another internal
    /// error): the exit, RIP and instruction bytes.
    #[error("{0}")]
    EmulationFailure(Box<crate::linux::EmulationFailure>),
}

/// What the vCPU thread does after an exit was handled.
#[derive(Debug)]
pub(crate) enum ExitAction {
    /// Keep running.
    Continue,
    /// Complete this exit, then stop.
    Stop(StopReason),
    /// Stop at once (nothing to complete).
    StopNow(StopReason),
    /// The guest is idle: park the vCPU thread for at most this long.
    Sleep(std::time::Duration),
}

/// The answer of an [`OutputSink`] to one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emit {
    /// Taken: the guest goes on.
    Accepted,
    /// Not taken now (buffer full): the guest retries the same record later.
    Busy,
    /// Not taken, and this vCPU stops (its state stays consistent and capturable).
    Stop,
}

/// Receives the guest's output records. Called on vCPU threads: keep it short
/// and never block for long (return [`Emit::Busy`] instead: back-pressure).
pub trait OutputSink: Send + Sync {
    /// One record from the guest.
    fn emit(&self, record: &Record) -> Emit;
}

/// A sink that accepts and drops everything.
pub struct NullSink;

impl OutputSink for NullSink {
    fn emit(&self, _: &Record) -> Emit {
        Emit::Accepted
    }
}

/// The VM's exit handler: the guest ABI's ports.
pub(crate) struct GuestPorts {
    pub mem: GuestMemoryMmap,
    pub sink: Arc<dyn OutputSink>,
    /// Devices at and above `pv::DEVICES_BASE`.
    pub devices: Arc<crate::devices::DeviceBus>,
    /// The legacy platform of a Linux guest (port I/O), when on.
    pub platform: Arc<crate::linux::serial::Platform>,
}

impl GuestPorts {
    fn read_panic_text(&self, vcpu: u32) -> String {
        let mut buf = [0u8; PANIC_TEXT_LEN];
        let addr = GuestAddress(layout::vcpu_page(vcpu as u64) + TEXT_OFFSET);
        if self.mem.read_slice(&mut buf, addr).is_err() {
            return "<unreadable>".into();
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }
}

impl GuestPorts {
    fn submit_record(&self, vcpu: u32, data: &mut [u8]) -> ExitAction {
        data.fill(0);
        let addr = GuestAddress(layout::vcpu_page(vcpu as u64) + MAILBOX_OFFSET);
        let mut raw = [0u8; Record::SIZE];
        if let Err(e) = self.mem.read_slice(&mut raw, addr) {
            return ExitAction::Stop(StopReason::UnexpectedExit(format!(
                "reading vCPU {vcpu}'s mailbox: {e}"
            )));
        }
        let rec = match Record::from_bytes(&raw) {
            Some(rec) if rec.vcpu == vcpu => rec,
            _ => {
                return ExitAction::Stop(StopReason::UnexpectedExit(format!(
                    "vCPU {vcpu} submitted a record of another vCPU"
                )))
            }
        };
        match self.sink.emit(&rec) {
            Emit::Accepted => {
                data[0] = 1;
                ExitAction::Continue
            }
            Emit::Busy => ExitAction::Continue,
            Emit::Stop => ExitAction::Stop(StopReason::SinkStop),
        }
    }
}

impl ExitHandler for GuestPorts {
    fn io_in(&self, _vcpu: u32, p: u16, data: &mut [u8]) -> ExitAction {
        if self.platform.io_in(p, data) {
            return ExitAction::Continue;
        }
        data.fill(0xff);
        ExitAction::Stop(StopReason::UnexpectedExit(format!("in from port {p:#x}")))
    }

    fn io_out(&self, _vcpu: u32, p: u16, data: &[u8]) -> ExitAction {
        if self.platform.io_out(p, data) {
            return ExitAction::Continue;
        }
        ExitAction::StopNow(StopReason::UnexpectedExit(format!("out to port {p:#x}")))
    }

    fn mmio_read(&self, vcpu: u32, addr: u64, data: &mut [u8]) -> ExitAction {
        match addr {
            pv::OUTPUT if data.len() == 4 => self.submit_record(vcpu, data),
            pv::ENTROPY => {
                fill_random(data);
                ExitAction::Continue
            }
            a if a >= pv::DEVICES_BASE && self.devices.read(a, data) => ExitAction::Continue,
            _ if self.platform.is_active() => {
                // Like a PC where nothing decodes: all ones (a Linux guest probes).
                data.fill(0xff);
                log::debug!(
                    "linux platform: {}-byte MMIO read at {addr:#x}, no device",
                    data.len()
                );
                ExitAction::Continue
            }
            _ => {
                data.fill(0xff);
                ExitAction::Stop(StopReason::UnexpectedExit(format!(
                    "{}-byte MMIO read at {addr:#x}, where no device is",
                    data.len()
                )))
            }
        }
    }

    fn mmio_write(&self, vcpu: u32, addr: u64, data: &[u8]) -> ExitAction {
        match addr {
            pv::SLEEP_US => {
                let mut w = [0u8; 4];
                let n = data.len().min(4);
                w[..n].copy_from_slice(&data[..n]);
                let us = u32::from_le_bytes(w).min(pv::MAX_SLEEP_US);
                ExitAction::Sleep(std::time::Duration::from_micros(us as u64))
            }
            pv::STATUS => {
                let mut w = [0u8; 4];
                let n = data.len().min(4);
                w[..n].copy_from_slice(&data[..n]);
                ExitAction::StopNow(match u32::from_le_bytes(w) {
                    status::DONE => StopReason::GuestDone,
                    status::PANIC => StopReason::GuestPanic(self.read_panic_text(vcpu)),
                    _ => StopReason::BadBootInfo,
                })
            }
            a if a >= pv::DEVICES_BASE && self.devices.write(a, data) => ExitAction::Continue,
            _ if self.platform.is_active() => {
                log::debug!(
                    "linux platform: {}-byte MMIO write at {addr:#x}, no device",
                    data.len()
                );
                ExitAction::Continue
            }
            _ => ExitAction::StopNow(StopReason::UnexpectedExit(format!(
                "{}-byte MMIO write at {addr:#x}, where no device is",
                data.len()
            ))),
        }
    }

    fn internal_error(&self, vcpu: u32, fd: &mut kvm_ioctls::VcpuFd) -> StopReason {
        let failure = crate::linux::emulation::report(fd, &self.mem);
        log::error!("vCPU {vcpu} stopped: {failure}");
        StopReason::EmulationFailure(Box::new(failure))
    }
}

/// Fills `buf` from the kernel's random source.
fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the valid buffer given.
        let n = unsafe {
            libc::getrandom(
                buf[done..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - done,
                0,
            )
        };
        if n <= 0 {
            break;
        }
        done += n as usize;
    }
}
