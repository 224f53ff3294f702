//! COM1: a 16550A UART (`vm-superio`) on ports 0x3f8-0x3ff with its
//! interrupt on GSI 4 through an irqfd, and the [`Console`] its output goes
//! to (the VMM log, an in-memory line buffer, and optionally the terminal).
//!
//! The UART's registers are plain serde data ([`SerialState`]) so a
//! checkpoint carries them (`VmState::legacy`); a restore rebuilds the UART
//! from them and re-arms its interrupt exactly as `vm-superio` does.

use super::{layout, LinuxError};
use crate::error::{Error, Result};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Lines the console keeps (older ones are dropped, still counted).
const KEPT_LINES: usize = 20_000;
/// Longest line kept whole; longer output is split.
const MAX_LINE: usize = 4096;

/// The UART's registers (a serde mirror of `vm_superio::SerialState`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::SerialState> for SerialState {
    fn from(s: vm_superio::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[derive(Default)]
struct ConsoleBuf {
    /// Complete lines, oldest first; `lines[0]` has index `first`.
    lines: VecDeque<String>,
    first: u64,
    partial: Vec<u8>,
}

struct ConsoleInner {
    buf: Mutex<ConsoleBuf>,
    cv: Condvar,
    echo: AtomicBool,
}

/// The guest's serial console output, line by line. Cheap to clone; every
/// clone sees the same lines.
#[derive(Clone)]
pub struct Console {
    inner: Arc<ConsoleInner>,
}

impl Default for Console {
    fn default() -> Self {
        Console {
            inner: Arc::new(ConsoleInner {
                buf: Mutex::new(ConsoleBuf::default()),
                cv: Condvar::new(),
                echo: AtomicBool::new(false),
            }),
        }
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("lines", &self.line_count())
            .finish()
    }
}

impl Console {
    fn lock(&self) -> MutexGuard<'_, ConsoleBuf> {
        self.inner.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Also copy the output to this process's standard output, byte by byte
    /// (the log then gets the lines at debug level instead of info).
    pub fn set_echo(&self, on: bool) {
        self.inner.echo.store(on, Ordering::Relaxed);
    }

    /// Number of complete lines so far (including any no longer kept).
    pub fn line_count(&self) -> u64 {
        let b = self.lock();
        b.first + b.lines.len() as u64
    }

    /// The complete lines with index `from` on that are still kept.
    pub fn lines_from(&self, from: u64) -> Vec<String> {
        let b = self.lock();
        let skip = from.saturating_sub(b.first) as usize;
        b.lines.iter().skip(skip).cloned().collect()
    }

    /// Every complete line still kept.
    pub fn lines(&self) -> Vec<String> {
        self.lines_from(0)
    }

    /// The output after the last newline.
    pub fn partial_line(&self) -> String {
        String::from_utf8_lossy(&self.lock().partial).into_owned()
    }

    /// Waits up to `timeout` for a complete line with index `from` or later
    /// that satisfies `pred`; returns its index and text.
    pub fn wait_for(
        &self,
        from: u64,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(u64, String)> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        let mut b = self.lock();
        loop {
            let start = next.max(b.first);
            for (i, line) in b.lines.iter().enumerate().skip((start - b.first) as usize) {
                if pred(line) {
                    return Some((b.first + i as u64, line.clone()));
                }
            }
            next = b.first + b.lines.len() as u64;
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            b = self
                .inner
                .cv
                .wait_timeout(b, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits up to `timeout` until at least `count` complete lines exist.
    pub fn wait_for_count(&self, count: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut b = self.lock();
        while b.first + (b.lines.len() as u64) < count {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            b = self
                .inner
                .cv
                .wait_timeout(b, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn push_byte(&self, byte: u8) {
        if self.inner.echo.load(Ordering::Relaxed) {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&[byte]);
            if byte == b'\n' {
                let _ = out.flush();
            }
        }
        let mut b = self.lock();
        match byte {
            b'\r' => {}
            b'\n' => self.finish_line(&mut b),
            _ => {
                b.partial.push(byte);
                if b.partial.len() >= MAX_LINE {
                    self.finish_line(&mut b);
                }
            }
        }
    }

    fn finish_line(&self, b: &mut ConsoleBuf) {
        let line = String::from_utf8_lossy(&b.partial).into_owned();
        b.partial.clear();
        // On the log; at debug level when the terminal already shows it.
        if self.inner.echo.load(Ordering::Relaxed) {
            log::debug!(target: "castor::guest_console", "{line}");
        } else {
            log::info!(target: "castor::guest_console", "{line}");
        }
        b.lines.push_back(line);
        if b.lines.len() > KEPT_LINES {
            b.lines.pop_front();
            b.first += 1;
        }
        self.inner.cv.notify_all();
    }
}

/// The UART's output: into the console.
struct ConsoleWriter(Console);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.0.push_byte(b);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART's interrupt: an eventfd registered as an irqfd on GSI 4.
struct IrqTrigger(Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqTrigger, NoEvents, ConsoleWriter>;

/// The legacy platform of a Linux guest: COM1. Inactive (and invisible:
/// port I/O stops the vCPU as before) until a Linux boot or a restore of a
/// state that has it.
pub(crate) struct Platform {
    uart: Mutex<Option<Uart>>,
    irq: Mutex<Option<Arc<EventFd>>>,
    active: AtomicBool,
    console: Console,
    /// Per virtio slot, its interrupt eventfd (registered as an irqfd once).
    virtio_irqs: Mutex<Vec<Arc<EventFd>>>,
    poller: AtomicBool,
}

impl Platform {
    pub(crate) fn new() -> Self {
        Platform {
            uart: Mutex::new(None),
            irq: Mutex::new(None),
            active: AtomicBool::new(false),
            console: Console::default(),
            virtio_irqs: Mutex::new(Vec::new()),
            poller: AtomicBool::new(false),
        }
    }

    pub(crate) fn console(&self) -> Console {
        self.console.clone()
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    fn lock_uart(&self) -> MutexGuard<'_, Option<Uart>> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The UART's interrupt eventfd, registered with KVM on first use.
    fn irq(&self, vm: &VmFd) -> Result<Arc<EventFd>> {
        let mut irq = self.irq.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = irq.as_ref() {
            return Ok(e.clone());
        }
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(LinuxError::EventFd)?);
        vm.register_irqfd(&evt, layout::COM1_GSI)
            .map_err(Error::kvm("KVM_IRQFD (COM1)"))?;
        *irq = Some(evt.clone());
        Ok(evt)
    }

    /// Turns the platform on with a UART in `state` (its reset state if
    /// `None`).
    pub(crate) fn activate(&self, vm: &VmFd, state: Option<&SerialState>) -> Result<()> {
        let trigger = IrqTrigger(self.irq(vm)?);
        let writer = ConsoleWriter(self.console.clone());
        let s: vm_superio::SerialState = match state {
            Some(s) => s.into(),
            None => vm_superio::SerialState::default(),
        };
        let len = s.in_buffer.len();
        let uart = Serial::from_state(&s, trigger, NoEvents, writer).map_err(|e| match e {
            vm_superio::serial::Error::FullFifo => LinuxError::SerialFifo { len },
            vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                LinuxError::SerialInterrupt(e)
            }
        })?;
        *self.lock_uart() = Some(uart);
        self.active.store(true, Ordering::Release);
        Ok(())
    }

    /// Gives each virtio device on `bus` its interrupt: an eventfd registered
    /// as an irqfd on the GSI the ACPI tables declare for it.
    pub(crate) fn connect_virtio(
        &self,
        vm: &VmFd,
        bus: &crate::devices::DeviceBus,
    ) -> Result<Vec<(u64, u32, u32)>> {
        let decls = super::declare_virtio(bus)?;
        let mut irqs = self.virtio_irqs.lock().unwrap_or_else(|e| e.into_inner());
        for (slot, &(_, gsi, _)) in decls.iter().enumerate() {
            if irqs.len() <= slot {
                let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(LinuxError::EventFd)?);
                vm.register_irqfd(&evt, gsi)
                    .map_err(Error::kvm("KVM_IRQFD (virtio-mmio)"))?;
                irqs.push(evt);
            }
            bus.set_interrupt(slot, irqs[slot].clone());
        }
        Ok(decls)
    }

    /// Starts (once) the thread that polls the virtio devices every
    /// millisecond while the VM runs ([`crate::devices::DeviceBus::poll`]):
    /// a Linux driver waits for an interrupt instead of polling, so frames
    /// arriving on a tap must be delivered without a guest kick. It checks the
    /// pause flag under the control lock, so a paused VM's devices stay
    /// quiescent, and ends with the VM.
    pub(crate) fn start_poller(
        &self,
        shared: &Arc<crate::vcpu::Shared>,
        bus: &Arc<crate::devices::DeviceBus>,
    ) -> Result<()> {
        if bus.is_empty() || self.poller.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let (shared, bus) = (Arc::downgrade(shared), Arc::downgrade(bus));
        std::thread::Builder::new()
            .name("virtio-poll".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(1));
                let (Some(shared), Some(bus)) = (shared.upgrade(), bus.upgrade()) else {
                    return;
                };
                let c = shared.lock();
                if c.quit {
                    return;
                }
                if !c.pause {
                    bus.poll();
                }
            })
            .map_err(Error::Thread)?;
        Ok(())
    }

    /// Turns the platform off (restoring a state without one).
    pub(crate) fn deactivate(&self) {
        self.active.store(false, Ordering::Release);
        *self.lock_uart() = None;
    }

    /// The UART's registers, if the platform is on.
    pub(crate) fn capture(&self) -> Option<SerialState> {
        if !self.is_active() {
            return None;
        }
        self.lock_uart().as_ref().map(|u| u.state().into())
    }

    /// A port read; `false` if the platform is off.
    pub(crate) fn io_in(&self, port: u16, data: &mut [u8]) -> bool {
        if !self.is_active() {
            return false;
        }
        data.fill(0xff);
        if let Some(off) = com1_offset(port) {
            if let Some(u) = self.lock_uart().as_mut() {
                if let Some(first) = data.first_mut() {
                    *first = u.read(off);
                }
            }
        } else {
            log::trace!("linux platform: in from unclaimed port {port:#x}");
        }
        true
    }

    /// A port write; `false` if the platform is off.
    pub(crate) fn io_out(&self, port: u16, data: &[u8]) -> bool {
        if !self.is_active() {
            return false;
        }
        if let Some(off) = com1_offset(port) {
            if let (Some(u), Some(&v)) = (self.lock_uart().as_mut(), data.first()) {
                if let Err(e) = u.write(off, v) {
                    log::debug!("COM1: write of {v:#x} at +{off}: {e:?}");
                }
            }
        } else {
            log::trace!("linux platform: out to unclaimed port {port:#x}");
        }
        true
    }
}

fn com1_offset(port: u16) -> Option<u8> {
    let off = port.checked_sub(layout::COM1_PORT)?;
    (off < 8).then_some(off as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_splits_lines_and_waits() {
        let c = Console::default();
        for b in b"Linux version 6.1\r\nsecond" {
            c.push_byte(*b);
        }
        assert_eq!(c.lines(), ["Linux version 6.1"]);
        assert_eq!(c.partial_line(), "second");
        let found = c.wait_for(0, Duration::from_millis(10), |l| l.starts_with("Linux"));
        assert_eq!(found, Some((0, "Linux version 6.1".to_string())));
        assert!(c
            .wait_for(1, Duration::from_millis(10), |l| l.starts_with("Linux"))
            .is_none());
        c.push_byte(b'\n');
        assert_eq!(c.line_count(), 2);
        assert_eq!(c.lines_from(1), ["second"]);
    }

    #[test]
    fn serial_state_round_trips() {
        let s = SerialState {
            line_control: 0x3,
            interrupt_enable: 0x2,
            in_buffer: vec![1, 2, 3],
            ..Default::default()
        };
        let back: SerialState = vm_superio::SerialState::from(&s).into();
        assert_eq!(back, s);
    }
}
