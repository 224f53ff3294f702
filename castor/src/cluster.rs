//! A primary/backup pair as real processes on this machine: a temporary
//! directory with keys and configs, `castor backup` and `castor primary`
//! started from a `castor` executable, and their clean-up. Used by
//! `castor demo`, the failover tests and `castor-bench failover`.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Cluster errors.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// File or process I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Key generation.
    #[error("keygen: {0}")]
    Keygen(String),
    /// A daemon exited on its own.
    #[error("{name} exited ({status}); its log: {log}")]
    Exited {
        /// Which daemon.
        name: &'static str,
        /// Exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// The shape of the pair.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Guest memory ("64M").
    pub memory: String,
    /// Epoch interval.
    pub epoch_ms: u64,
    /// Dirty rate ("20M").
    pub dirty_rate: String,
    /// A record every this many page touches.
    pub record_every: u64,
    /// Heartbeat period (both sides).
    pub heartbeat_ms: u64,
    /// Peer timeout (both sides).
    pub timeout_ms: u64,
    /// Primary's policy: "pause" or "continue".
    pub on_backup_loss: String,
    /// Expose Prometheus endpoints on free loopback ports.
    pub metrics: bool,
    /// Have the backup write a commit log.
    pub commit_log: bool,
    /// `RUST_LOG` for the daemons.
    pub log_level: String,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            vcpus: 1,
            memory: "64M".into(),
            epoch_ms: 25,
            dirty_rate: "20M".into(),
            record_every: 64,
            heartbeat_ms: 10,
            timeout_ms: 100,
            on_backup_loss: "pause".into(),
            metrics: false,
            commit_log: true,
            log_level: "info".into(),
        }
    }
}

/// A free loopback UDP port (for QUIC listeners).
pub fn free_udp_port() -> Result<u16, ClusterError> {
    let s = UdpSocket::bind("127.0.0.1:0").map_err(io("picking a UDP port"))?;
    Ok(s.local_addr().map_err(io("picking a UDP port"))?.port())
}

/// A free loopback TCP port (for metrics endpoints).
pub fn free_tcp_port() -> Result<u16, ClusterError> {
    let s = TcpListener::bind("127.0.0.1:0").map_err(io("picking a TCP port"))?;
    Ok(s.local_addr().map_err(io("picking a TCP port"))?.port())
}

/// One daemon process.
pub struct Daemon {
    /// "primary" or "backup" (or a suffixed name).
    pub name: &'static str,
    /// The process.
    pub child: Child,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
}

impl Daemon {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs it and reaps it; returns the instant the signal was sent.
    pub fn kill(&mut self) -> Instant {
        let t = Instant::now();
        let _ = self.child.kill();
        let _ = self.child.wait();
        t
    }

    /// Errors if it has exited.
    pub fn check_alive(&mut self) -> Result<(), ClusterError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ClusterError::Exited {
                name: self.name,
                status: status.to_string(),
                log: self.log.clone(),
            }),
            _ => Ok(()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pair's files and addresses.
pub struct Cluster {
    /// The `castor` executable.
    pub exe: PathBuf,
    /// The temporary directory (keys, configs, logs).
    pub dir: PathBuf,
    /// The pair's shape.
    pub spec: Spec,
    /// Where released output goes.
    pub release_to: SocketAddr,
    /// The backup's replication address.
    pub backup_addr: SocketAddr,
    /// Primary metrics endpoint.
    pub primary_metrics: Option<SocketAddr>,
    /// Backup metrics endpoint.
    pub backup_metrics: Option<SocketAddr>,
    /// Keep the directory on drop.
    pub keep: bool,
}

impl Cluster {
    /// Makes a temporary directory under `base` (or the system's), keys for
    /// both sides and their configs.
    pub fn prepare(
        exe: &Path,
        base: Option<&Path>,
        spec: Spec,
        release_to: SocketAddr,
    ) -> Result<Cluster, ClusterError> {
        let base = base.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let dir = base.join(format!(
            "castor-{}-{}",
            std::process::id(),
            crate::observe::unix_ns() % 1_000_000_000_000
        ));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        for name in ["primary", "backup"] {
            castor_replicator::transport::write_identity(&dir, name)
                .map_err(|e| ClusterError::Keygen(e.to_string()))?;
        }
        let mut c = Cluster {
            exe: exe.into(),
            dir,
            release_to,
            backup_addr: SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
            primary_metrics: None,
            backup_metrics: None,
            keep: std::env::var_os("CASTOR_KEEP_DIR").is_some(),
            spec,
        };
        if c.spec.metrics {
            c.primary_metrics = Some(SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?)));
            c.backup_metrics = Some(SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?)));
        }
        c.write_configs()?;
        Ok(c)
    }

    /// Path of the primary's config.
    pub fn primary_config(&self) -> PathBuf {
        self.dir.join("primary.toml")
    }

    /// Path of the backup's config.
    pub fn backup_config(&self) -> PathBuf {
        self.dir.join("backup.toml")
    }

    /// The primary's control socket.
    pub fn primary_socket(&self) -> PathBuf {
        self.dir.join("primary.sock")
    }

    /// The backup's control socket.
    pub fn backup_socket(&self) -> PathBuf {
        self.dir.join("backup.sock")
    }

    /// Path of the backup's commit log.
    pub fn commit_log(&self) -> PathBuf {
        self.dir.join("commits.log")
    }

    fn write_configs(&self) -> Result<(), ClusterError> {
        let s = &self.spec;
        let metrics = |m: Option<SocketAddr>| match m {
            Some(a) => format!("[metrics]\nlisten = \"{a}\"\n"),
            None => String::new(),
        };
        let primary = format!(
            "[vm]\nvcpus = {}\nmemory = \"{}\"\n\n\
             [guest]\nworkload = \"dirtier\"\ndirty_rate = \"{}\"\nrecord_every = {}\nentropy = true\n\n\
             [replication]\nbackup = \"{}\"\nbind = \"127.0.0.1:0\"\nepoch_ms = {}\nheartbeat_ms = {}\ntimeout_ms = {}\non_backup_loss = \"{}\"\ncache = \"64M\"\n\n\
             [tls]\ncert = \"primary.crt\"\nkey = \"primary.key\"\npeer_cert = \"backup.crt\"\n\n\
             [output]\nrelease_to = \"{}\"\n\n[control]\nsocket = \"primary.sock\"\n\n{}",
            s.vcpus,
            s.memory,
            s.dirty_rate,
            s.record_every,
            self.backup_addr,
            s.epoch_ms,
            s.heartbeat_ms,
            s.timeout_ms,
            s.on_backup_loss,
            self.release_to,
            metrics(self.primary_metrics)
        );
        let log = if s.commit_log {
            "[log]\ncommit_log = \"commits.log\"\n"
        } else {
            ""
        };
        let backup = format!(
            "[replication]\nlisten = \"{}\"\nheartbeat_ms = {}\ntimeout_ms = {}\n\n\
             [tls]\ncert = \"backup.crt\"\nkey = \"backup.key\"\npeer_cert = \"primary.crt\"\n\n\
             [output]\nrelease_to = \"{}\"\n\n[control]\nsocket = \"backup.sock\"\n\n{}\n{}",
            self.backup_addr,
            s.heartbeat_ms,
            s.timeout_ms,
            self.release_to,
            metrics(self.backup_metrics),
            log
        );
        for (path, text) in [
            (self.primary_config(), primary),
            (self.backup_config(), backup),
        ] {
            std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
        }
        Ok(())
    }

    /// Starts `castor ROLE --config DIR/ROLE.toml`, logging to DIR/ROLE.log.
    /// The child gets SIGKILL if this process dies.
    pub fn spawn(&self, name: &'static str, role: &str) -> Result<Daemon, ClusterError> {
        self.spawn_with(name, role, &self.dir.join(format!("{role}.toml")))
    }

    /// Starts `castor ROLE --config CONFIG` as `name` (log in `name.log`).
    pub fn spawn_with(
        &self,
        name: &'static str,
        role: &str,
        config: &Path,
    ) -> Result<Daemon, ClusterError> {
        self.spawn_with_env(name, role, config, &[])
    }

    /// Like [`Cluster::spawn_with`], with extra environment variables (for
    /// the test-only fault hooks of a `fault-injection` build).
    pub fn spawn_with_env(
        &self,
        name: &'static str,
        role: &str,
        config: &Path,
        env: &[(&str, &str)],
    ) -> Result<Daemon, ClusterError> {
        let log = self.dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("opening {}", log.display())))?;
        let err = out.try_clone().map_err(io("log file"))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg(role)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", &self.spec.log_level)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {} {role}", self.exe.display())))?;
        Ok(Daemon { name, child, log })
    }

    /// Starts the backup.
    pub fn start_backup(&self) -> Result<Daemon, ClusterError> {
        self.spawn("backup", "backup")
    }

    /// Starts the primary.
    pub fn start_primary(&self) -> Result<Daemon, ClusterError> {
        self.spawn("primary", "primary")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Makes `cmd`'s child receive SIGKILL when this process dies (Linux
/// `PR_SET_PDEATHSIG`), so no daemon outlives a crashed or interrupted parent.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only calls async-signal-safe prctl between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Fetches `http://addr/metrics` and returns `name{...} value` samples as
/// (name with labels, value). Empty on any error.
pub fn scrape(addr: SocketAddr) -> Vec<(String, f64)> {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(
        format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .is_err()
    {
        return Vec::new();
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.trim().to_string(), value.trim().parse().ok()?))
        })
        .filter(|(n, _)| !n.starts_with("HTTP/"))
        .collect()
}

/// The value of `name` (exact, labels included) in a scrape.
pub fn metric(samples: &[(String, f64)], name: &str) -> Option<f64> {
    samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

/// The `castor` executable next to the running one (`target/PROFILE/castor`
/// for a bench binary in `target/PROFILE/` or a test in `target/PROFILE/deps/`),
/// or `$CASTOR_BIN` if set.
pub fn sibling_castor_exe() -> Result<PathBuf, ClusterError> {
    if let Some(p) = std::env::var_os("CASTOR_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().map_err(io("locating the running executable"))?;
    let mut dir = me.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let exe = dir.join("castor");
    if exe.is_file() {
        Ok(exe)
    } else {
        Err(ClusterError::Io {
            what: format!(
                "no castor executable at {} (build it: cargo build -p castor, with --release for a release bench; or set CASTOR_BIN)",
                exe.display()
            ),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    }
}
