//! systemd's service notification protocol (`sd_notify(3)`): a daemon
//! started by a unit with `Type=notify` sends `READY=1` once it is ready,
//! `STATUS=...` lines that `systemctl status` shows, and, under
//! `WatchdogSec=`, `WATCHDOG=1` at least every `WATCHDOG_USEC` while healthy.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the Unix socket named
//! by `$NOTIFY_SOCKET` (a path, or an abstract name written `@name`); a
//! crate would add a dependency for ~40 lines. Without `$NOTIFY_SOCKET`
//! (not started by systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The socket could not be created or the datagram not sent.
    #[error("sd_notify to {socket}: {source}")]
    Io {
        /// `$NOTIFY_SOCKET`.
        socket: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) to `$NOTIFY_SOCKET`;
/// `Ok(false)` when there is none.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = socket.to_string_lossy().into_owned();
    let err = |source| NotifyError::Io {
        socket: socket.clone(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(err)?;
    if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?;
        sock.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
    } else {
        sock.send_to(state.as_bytes(), &socket).map_err(err)?;
    }
    Ok(true)
}

fn send(state: &str) {
    if let Err(e) = notify(state) {
        log::warn!("{e}");
    }
}

/// One line for `STATUS=` (no newlines).
fn status_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// `READY=1` with a status line.
pub fn notify_ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}", status_line(status)));
}

/// A status line for `systemctl status`.
pub fn notify_status(status: &str) {
    send(&format!("STATUS={}", status_line(status)));
}

/// `WATCHDOG=1`: the daemon is alive and healthy.
pub fn notify_watchdog() {
    send("WATCHDOG=1");
}

/// `STOPPING=1`: the daemon is shutting down on purpose.
pub fn notify_stopping() {
    send("STOPPING=1");
}

/// How often to send `WATCHDOG=1` (half of `$WATCHDOG_USEC`), when the
/// service manager asks for it and it is meant for this process
/// (`$WATCHDOG_PID`, when set, is this process's id).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test touches the process environment (tests run in threads).
    #[test]
    fn datagrams_reach_the_socket_and_nothing_happens_without_one() {
        let dir = std::env::temp_dir().join(format!("castor-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!notify("READY=1").unwrap());
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify_ready("primary PROTECTED");
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=primary PROTECTED");
        // Abstract socket names start with '@'.
        let name = format!("castor-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let abs = UnixDatagram::bind_addr(
            &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap(),
        )
        .unwrap();
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        notify_watchdog();
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        std::env::set_var("WATCHDOG_USEC", "2000000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(1)));
        std::env::set_var("WATCHDOG_PID", "1");
        assert_eq!(watchdog_interval(), None);
        std::env::remove_var("WATCHDOG_PID");
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("NOTIFY_SOCKET");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
