//! `castor status` and `castor ctl`: an operator's view of a running daemon
//! and its control commands.
//!
//! `castor status` asks a daemon for its [`Status`] (role, protection state
//! with its reason, peer, epochs, ack age, bandwidth, pauses, last
//! failover) and prints it, or the JSON with `--json`. It reaches the daemon
//! through its control socket (`--socket`, or the `[control] socket` of
//! `--config`; by default every socket in /run/castor) or through its HTTP
//! endpoint (`--http ADDR`: `/status`, no root needed).
//!
//! `castor ctl SOCKET suspend|resume|status|detach` sends one command.

use castor_node::control::{self, Command};
use castor_node::Status;
use serde::Deserialize;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `castor status` arguments.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print the status as JSON (as the daemon's `/status`).
    #[arg(long)]
    pub json: bool,
    /// The daemon's control socket.
    #[arg(long, conflicts_with_all = ["config", "http"])]
    pub socket: Option<PathBuf>,
    /// The daemon's config file: its `[control] socket`, else its
    /// `[metrics] listen` endpoint.
    #[arg(long, conflicts_with = "http")]
    pub config: Option<PathBuf>,
    /// The daemon's HTTP endpoint (`[metrics] listen`), e.g. 127.0.0.1:9100.
    #[arg(long)]
    pub http: Option<SocketAddr>,
}

/// `castor ctl` arguments.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The daemon's control socket (`[control] socket`; default
    /// /run/castor/primary.sock or backup.sock).
    pub socket: PathBuf,
    /// suspend: the primary runs its guest unprotected on purpose (held
    /// output released; a host failure then loses the guest); resume:
    /// reconnect and resynchronise the backup; status: as `castor status`;
    /// detach (on a backup's socket): say goodbye to the primary, which
    /// runs on unprotected without pausing; the backup exits without
    /// taking over.
    #[arg(value_parser = ["suspend", "resume", "status", "detach"])]
    pub command: String,
    /// Print the daemon's reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A status request failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The control socket.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// The HTTP endpoint could not be reached or read.
    #[error("http://{addr}/status: {source}")]
    Http {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The endpoint answered with something else than a status.
    #[error("http://{addr}/status: not a Castor status ({detail})")]
    NotStatus {
        /// The endpoint.
        addr: SocketAddr,
        /// What was wrong.
        detail: String,
    },
    /// The config file could not be read.
    #[error("{path}: {detail}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// No way to reach a daemon was given or found.
    #[error("no daemon found: no control socket in {dir}; use --socket, --config or --http")]
    NoDaemon {
        /// Where sockets were looked for.
        dir: &'static str,
    },
    /// The daemon answered a status request without a status.
    #[error("the daemon's reply has no status")]
    NoStatus,
}

/// Fetches `http://addr/status`.
pub fn fetch_http(addr: SocketAddr) -> Result<Status, StatusError> {
    let io = |source| StatusError::Http { addr, source };
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    s.write_all(
        format!("GET /status HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(io)?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(io)?;
    let body =
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .ok_or_else(|| StatusError::NotStatus {
                addr,
                detail: "no HTTP body".into(),
            })?;
    serde_json::from_str(body).map_err(|e| StatusError::NotStatus {
        addr,
        detail: e.to_string(),
    })
}

/// Asks the daemon at the control socket `path` for its status.
pub fn fetch_socket(path: &Path) -> Result<Status, StatusError> {
    control::request(path, Command::Status)?
        .status
        .map(|s| *s)
        .ok_or(StatusError::NoStatus)
}

#[derive(Deserialize)]
struct Sections {
    #[serde(default)]
    control: Option<ControlPart>,
    #[serde(default)]
    metrics: Option<MetricsPart>,
    #[serde(default)]
    replication: Option<toml_value::Table>,
}

mod toml_value {
    pub type Table = std::collections::BTreeMap<String, serde_json::Value>;
}

#[derive(Deserialize)]
struct ControlPart {
    socket: Option<PathBuf>,
}

#[derive(Deserialize)]
struct MetricsPart {
    listen: Option<SocketAddr>,
}

/// Where `--config`'s daemon answers: its control socket, else its HTTP endpoint.
fn from_config(path: &Path) -> Result<Status, StatusError> {
    let bad = |detail: String| StatusError::Config {
        path: path.into(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let s: Sections = toml_parse(&text).map_err(bad)?;
    let role = match &s.replication {
        Some(r) if r.contains_key("listen") => "backup",
        _ => "primary",
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let socket = match s.control.and_then(|c| c.socket) {
        None => Some(control::default_socket(role)),
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(dir.join(p)),
    };
    let http = s.metrics.and_then(|m| m.listen);
    match (socket, http) {
        (Some(sock), http) => match fetch_socket(&sock) {
            Ok(st) => Ok(st),
            Err(e) => match http {
                Some(a) => fetch_http(a),
                None => Err(e),
            },
        },
        (None, Some(a)) => fetch_http(a),
        (None, None) => Err(bad(
            "neither a [control] socket nor a [metrics] listen address".into(),
        )),
    }
}

fn toml_parse(text: &str) -> Result<Sections, String> {
    // The daemon crates validate the whole file; here only two sections matter.
    castor_node::config::parse_toml::<Sections>(text, Path::new("config"), &[])
        .map_err(|e| e.to_string())
}

/// The statuses to show: the one named, or every daemon with a socket in
/// /run/castor.
fn gather(a: &StatusArgs) -> Result<Vec<Status>, StatusError> {
    if let Some(s) = &a.socket {
        return Ok(vec![fetch_socket(s)?]);
    }
    if let Some(c) = &a.config {
        return Ok(vec![from_config(c)?]);
    }
    if let Some(h) = a.http {
        return Ok(vec![fetch_http(h)?]);
    }
    let mut socks: Vec<PathBuf> = std::fs::read_dir(control::DEFAULT_DIR)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    socks.sort();
    let found: Vec<Status> = socks.iter().filter_map(|s| fetch_socket(s).ok()).collect();
    if found.is_empty() {
        return Err(StatusError::NoDaemon {
            dir: control::DEFAULT_DIR,
        });
    }
    Ok(found)
}

/// `castor status`.
pub fn status(a: &StatusArgs) -> Result<(), String> {
    let all = gather(a).map_err(|e| e.to_string())?;
    for (i, s) in all.iter().enumerate() {
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(s).map_err(|e| e.to_string())?
            );
        } else {
            if i > 0 {
                println!();
            }
            print!("{s}");
        }
    }
    Ok(())
}

/// `castor ctl`.
pub fn ctl(a: &CtlArgs) -> Result<(), String> {
    let cmd =
        Command::parse(&a.command).ok_or_else(|| format!("unknown command {:?}", a.command))?;
    let reply = control::request(&a.socket, cmd).map_err(|e| e.to_string())?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reply).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    if cmd != Command::Status {
        if let Some(m) = &reply.message {
            println!("{m}");
        }
    }
    if let Some(s) = &reply.status {
        if cmd == Command::Status {
            print!("{s}");
        } else {
            println!("state: {}", s.state);
        }
    }
    Ok(())
}
