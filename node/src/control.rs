//! The control socket: a Unix stream socket (mode 0600, in a directory of
//! mode 0700: root, or the daemon's user, only) on which an operator's tool
//! (`castor ctl SOCKET COMMAND`, `castor status`) sends one command per
//! connection, one line, and reads one JSON line back:
//!
//! | command | effect | reply |
//! |---|---|---|
//! | `status` | none | `{"ok":true,"status":{...}}` (as `/status`) |
//! | `suspend` | the primary runs its guest unprotected on purpose | `{"ok":true,"message":...}` |
//! | `resume` | protection resumes (reconnect, resync) | `{"ok":true,"message":...}` |
//! | `detach` | on a backup: say goodbye to the primary (it runs on unprotected, no pause), never take over, exit | `{"ok":true,...}` |
//!
//! Anything else is answered `{"ok":false,"error":...}`.

use crate::status::{Status, StatusBoard};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The default directory of the control sockets.
pub const DEFAULT_DIR: &str = "/run/castor";

/// Where a daemon's control socket goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketConfig {
    /// The socket.
    pub path: PathBuf,
    /// Named in the config file (a failure to create it is then fatal; the
    /// default is skipped with a warning where it cannot be made, e.g. a
    /// second daemon of the same role on this host, or no access to
    /// /run/castor).
    pub explicit: bool,
}

/// The default control socket of a daemon in `role` ("primary", "backup").
pub fn default_socket(role: &str) -> PathBuf {
    Path::new(DEFAULT_DIR).join(format!("{role}.sock"))
}

/// The control socket could not be set up, or a command failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Creating, binding or securing the socket failed.
    #[error("control socket {path}: {what}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon answers on this socket.
    #[error("control socket {path} is in use by a running daemon: give this one its own `[control] socket`")]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// The daemon's reply was not understood.
    #[error("control socket {path}: bad reply: {source}")]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon refused the command.
    #[error("{0}")]
    Refused(String),
}

/// A command on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The daemon's status.
    Status,
    /// Suspend protection.
    Suspend,
    /// Resume protection.
    Resume,
    /// Detach the backup for maintenance (on the backup's socket).
    Detach,
}

impl Command {
    /// The command's word on the socket.
    pub fn word(self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Suspend => "suspend",
            Command::Resume => "resume",
            Command::Detach => "detach",
        }
    }

    /// Parses a command word.
    pub fn parse(s: &str) -> Option<Command> {
        match s.trim() {
            "status" => Some(Command::Status),
            "suspend" => Some(Command::Suspend),
            "resume" => Some(Command::Resume),
            "detach" => Some(Command::Detach),
            _ => None,
        }
    }
}

/// One reply on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the command was carried out.
    pub ok: bool,
    /// What happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The status (for `status`, and after every command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<Status>>,
}

/// Answers one command against `board`.
pub fn handle(board: &StatusBoard, cmd: Option<Command>) -> Reply {
    let done = |message: &str| Reply {
        ok: true,
        message: Some(message.into()),
        error: None,
        status: Some(Box::new(board.snapshot())),
    };
    let refused = |error: String| Reply {
        ok: false,
        message: None,
        error: Some(error),
        status: None,
    };
    match cmd {
        None => refused("unknown command: use status, suspend, resume or detach".into()),
        Some(Command::Status) => done("status"),
        Some(Command::Suspend) => match board.switch().suspend() {
            Ok(()) => {
                log::warn!("control: the operator suspended protection");
                // The protect loop notices at its next epoch.
                wait_for(board, |s| s.state.name() != "protected" && s.state.name() != "syncing");
                done("protection suspended: the guest runs UNPROTECTED until `resume`")
            }
            Err(e) => refused(e.to_string()),
        },
        Some(Command::Resume) => match board.switch().resume() {
            Ok(()) => {
                log::warn!("control: the operator resumed protection");
                done("protection resuming: reconnecting and resynchronising the backup")
            }
            Err(e) => refused(e.to_string()),
        },
        // A backup leaves the pair on purpose: it tells its primary (which
        // runs on unprotected instead of applying its loss policy), never
        // takes over, and exits. SIGTERM does the same.
        Some(Command::Detach) => match board.request_detach() {
            Some(_) => {
                log::warn!("control: the operator detached this backup");
                done("detaching: the primary runs on unprotected; this backup exits without taking over")
            }
            None => refused(
                "detach applies to a backup guarding a primary (run it against the backup's socket); \
                 to run this primary unprotected on purpose, use `suspend`"
                    .into(),
            ),
        },
    }
}

/// Waits (up to 2 s) until the board's state satisfies `f`.
fn wait_for(board: &StatusBoard, f: impl Fn(&Status) -> bool) {
    for _ in 0..200 {
        if f(&board.snapshot()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Creates the socket at `path` (its directory with mode 0700 if missing,
/// the socket with mode 0600; a stale socket left by a dead daemon is
/// replaced) and serves it from a thread for the life of the process.
pub fn start(path: &Path, board: Arc<StatusBoard>) -> Result<(), ControlError> {
    let io = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| ControlError::Io { path, what, source }
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("creating its directory"))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse { path: path.into() });
        }
        std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
    }
    let listener = UnixListener::bind(path).map_err(io("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("setting mode 0600"))?;
    log::info!(
        "control socket {} (castor ctl {} status|suspend|resume)",
        path.display(),
        path.display()
    );
    std::thread::Builder::new()
        .name("castor-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        if let Err(e) = serve_one(c, &board) {
                            log::debug!("control connection: {e}");
                        }
                    }
                    Err(e) => log::warn!("control socket accept: {e}"),
                }
            }
        })
        .map_err(io("starting its thread"))?;
    Ok(())
}

fn serve_one(c: UnixStream, board: &StatusBoard) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(&c, 256)).read_line(&mut line)?;
    let reply = handle(board, Command::parse(&line));
    let mut w = &c;
    let text = serde_json::to_string(&reply).map_err(std::io::Error::other)?;
    w.write_all(text.as_bytes())?;
    w.write_all(b"\n")?;
    Ok(())
}

/// Sends `cmd` to the daemon at the socket `path` and returns its reply
/// (refusals as [`ControlError::Refused`]).
pub fn request(path: &Path, cmd: Command) -> Result<Reply, ControlError> {
    let io = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| ControlError::Io { path, what, source }
    };
    let c = UnixStream::connect(path).map_err(io("connecting"))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io("setting a timeout"))?;
    let mut w = &c;
    w.write_all(format!("{}\n", cmd.word()).as_bytes())
        .map_err(io("sending"))?;
    let mut line = String::new();
    BufReader::new(&c)
        .read_line(&mut line)
        .map_err(io("reading the reply"))?;
    let reply: Reply = serde_json::from_str(&line).map_err(|source| ControlError::BadReply {
        path: path.into(),
        source,
    })?;
    if !reply.ok {
        return Err(ControlError::Refused(
            reply.error.unwrap_or_else(|| "refused".into()),
        ));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Role;
    use std::io::Read;

    #[test]
    fn socket_is_private_and_answers_commands() {
        let dir = std::env::temp_dir().join(format!("castor-ctl-{}", std::process::id()));
        let path = dir.join("sub").join("primary.sock");
        let board = StatusBoard::new(Role::Backup);
        start(&path, board.clone()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let r = request(&path, Command::Status).unwrap();
        assert_eq!(r.status.unwrap().role, Role::Backup);
        // A backup runs no guest: suspend is refused with the reason.
        match request(&path, Command::Suspend) {
            Err(ControlError::Refused(m)) => assert!(m.contains("runs no guest"), "{m}"),
            other => panic!("{other:?}"),
        }
        // No backup guard registered yet: detach is refused with the reason.
        match request(&path, Command::Detach) {
            Err(ControlError::Refused(m)) => assert!(m.contains("guarding a primary"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Registered: detach reaches the backup's handle.
        let handle = castor_replicator::backup::DetachHandle::default();
        board.set_detach(handle.clone());
        let r = request(&path, Command::Detach).unwrap();
        assert!(r.ok, "{r:?}");
        assert!(handle.is_requested());
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"reboot\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert!(
            s.contains("\"ok\":false") && s.contains("unknown command"),
            "{s}"
        );
        // A second daemon on the same socket is refused.
        assert!(matches!(
            start(&path, board),
            Err(ControlError::InUse { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
