//! What an operator sees: the daemon's role and protection state, with the
//! figures behind it.
//!
//! A [`StatusBoard`] is shared by everything in a daemon that changes the
//! state (the protect loop, the backup's serve loop, the takeover) and by
//! everything that shows it (`/status` and the status page on the HTTP
//! endpoint, the control socket, `castor status`, the Prometheus gauges,
//! systemd's `STATUS=`). The loops say *what happened* (a session started,
//! the backup was lost, the operator suspended protection); a sampler thread
//! ([`StatusBoard::start_sampler`]) reads the replicator's live figures
//! ([`PrimaryStatus`], [`BackupStatus`]) every [`TICK`], notices the first
//! acknowledged checkpoint of a session (the guest is then *protected*),
//! keeps the last minute of epochs (pause p50/p99) and a per-second series
//! of the last minutes for the plots, and sets the gauges.
//!
//! Every state change is logged once, with its reason, and kept as an event.

use castor_replicator::backup::BackupStatus;
use castor_replicator::primary::PrimaryStatus;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the sampler reads the replicator's figures.
pub const TICK: Duration = Duration::from_millis(100);
/// Seconds of per-second points kept for the plots.
pub const SERIES_SECONDS: usize = 600;
/// State changes kept.
pub const EVENTS: usize = 100;
/// Window of the pause percentiles.
pub const PAUSE_WINDOW: Duration = Duration::from_secs(60);

/// What this daemon is in its pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the guest and replicates it.
    Primary,
    /// Holds a replica and takes over when the primary is lost.
    Backup,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        })
    }
}

/// Why the guest is not protected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// The daemon is starting.
    Starting,
    /// The session with the backup broke (timeout, connection closed, error).
    BackupLost {
        /// The pipeline's error.
        error: String,
    },
    /// No backup could be reached.
    BackupUnreachable {
        /// The transport's error.
        error: String,
    },
    /// The backup refused this primary: its message says what to change.
    BackupRefused {
        /// The backup's reason.
        message: String,
    },
    /// The operator suspended protection (`castor ctl SOCKET suspend`).
    Suspended,
    /// The backup detached on purpose (SIGTERM or `castor ctl SOCKET
    /// detach` on the backup): the guest runs unprotected until a backup
    /// attaches again.
    BackupDetached,
    /// This backup is detaching on purpose and will not take over.
    Detaching,
    /// This host took the guest over and has no new backup configured.
    TookOver,
    /// A backup waiting for its primary.
    NoPrimary,
    /// A backup whose session with the primary ended before anything was
    /// committed, or failed (the replica, if any, is kept).
    SessionEnded {
        /// How it ended.
        detail: String,
    },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Starting => f.write_str("starting"),
            Reason::BackupLost { error } => write!(f, "backup lost: {error}"),
            Reason::BackupUnreachable { error } => write!(f, "backup unreachable: {error}"),
            Reason::BackupRefused { message } => {
                write!(f, "backup refused this primary: {message}")
            }
            Reason::Suspended => f.write_str("suspended by the operator"),
            Reason::BackupDetached => f.write_str(
                "the backup detached on purpose (maintenance): running unprotected until a backup attaches",
            ),
            Reason::Detaching => {
                f.write_str("detaching on purpose: the primary runs on unprotected; no takeover")
            }
            Reason::TookOver => {
                f.write_str("took over, no new backup configured: start a new backup and re-pair")
            }
            Reason::NoPrimary => f.write_str("waiting for a primary"),
            Reason::SessionEnded { detail } => write!(f, "session ended: {detail}"),
        }
    }
}

/// Progress of a (re)synchronisation with the backup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncProgress {
    /// A reconnection that resumes from the backup's committed epoch (only
    /// the pages dirtied since travel), or a full synchronisation (pre-copy
    /// of all memory).
    pub incremental: bool,
    /// Bytes sent (primary) in this synchronisation so far.
    pub bytes_sent: u64,
    /// Guest memory, bytes (what a full pre-copy sends at least once, before
    /// compression); 0 where unknown.
    pub memory_bytes: u64,
    /// Seconds since it began.
    pub seconds: f64,
    /// A full synchronisation: the share of guest memory its first pass
    /// has sent, 0 to 100 (the rounds after it resend what the guest
    /// dirtied meanwhile). `None` for an incremental resync, or before the
    /// pipeline reports.
    #[serde(default)]
    pub memory_percent: Option<f64>,
}

/// The protection state of the guest, as this daemon sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ProtectionState {
    /// Not yet replicating.
    Starting,
    /// Synchronising a backup: not yet protected.
    Syncing(SyncProgress),
    /// Every output the world sees is covered by a checkpoint the backup
    /// committed.
    Protected,
    /// The guest runs without a backup, releasing its output at once.
    Unprotected {
        /// Why.
        reason: Reason,
    },
    /// The guest is held (`on_backup_loss = "pause"`) until a backup returns.
    PausedAwaitingBackup {
        /// Why.
        reason: Reason,
    },
    /// Another host holds the guest's lease (witness): this one must not run
    /// it. Not entered yet: placeholder for the witness.
    Fenced,
}

impl ProtectionState {
    /// Short name, as in `/status` and the `state` label of
    /// `castor_protection_state`.
    pub fn name(&self) -> &'static str {
        match self {
            ProtectionState::Starting => "starting",
            ProtectionState::Syncing(_) => "syncing",
            ProtectionState::Protected => "protected",
            ProtectionState::Unprotected { .. } => "unprotected",
            ProtectionState::PausedAwaitingBackup { .. } => "paused_awaiting_backup",
            ProtectionState::Fenced => "fenced",
        }
    }

    /// Every state name (the gauge sets one to 1, the others to 0).
    pub const NAMES: [&'static str; 6] = [
        "starting",
        "syncing",
        "protected",
        "unprotected",
        "paused_awaiting_backup",
        "fenced",
    ];

    /// The reason, for the unprotected states.
    pub fn reason(&self) -> Option<&Reason> {
        match self {
            ProtectionState::Unprotected { reason }
            | ProtectionState::PausedAwaitingBackup { reason } => Some(reason),
            _ => None,
        }
    }

    fn same_kind(&self, other: &ProtectionState) -> bool {
        match (self, other) {
            (ProtectionState::Syncing(a), ProtectionState::Syncing(b)) => {
                a.incremental == b.incremental
            }
            (a, b) => a.name() == b.name() && a.reason() == b.reason(),
        }
    }
}

impl std::fmt::Display for ProtectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtectionState::Starting => f.write_str("STARTING"),
            ProtectionState::Syncing(p) => {
                write!(
                    f,
                    "SYNCING ({}",
                    if p.incremental {
                        "incremental resync"
                    } else {
                        "full synchronisation"
                    }
                )?;
                if let Some(pct) = p.memory_percent {
                    write!(f, ", {pct:.0}% of memory sent")?;
                }
                if p.bytes_sent > 0 {
                    write!(f, ", {} sent", bytes(p.bytes_sent as f64))?;
                    if p.memory_bytes > 0 && !p.incremental {
                        write!(f, " for {} of guest memory", bytes(p.memory_bytes as f64))?;
                    }
                }
                write!(f, ", {:.1} s)", p.seconds)
            }
            ProtectionState::Protected => f.write_str("PROTECTED"),
            ProtectionState::Unprotected { reason } => write!(f, "UNPROTECTED ({reason})"),
            ProtectionState::PausedAwaitingBackup { reason } => {
                write!(f, "PAUSED awaiting a backup ({reason})")
            }
            ProtectionState::Fenced => f.write_str("FENCED (another host holds the lease)"),
        }
    }
}

/// The last takeover on this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    /// When the old primary was found lost (Unix seconds).
    pub detected_unix: f64,
    /// The committed epoch the guest resumed from.
    pub from_epoch: u64,
    /// State restore, ms.
    pub restore_ms: f64,
    /// Detection to the guest running, ms.
    pub resume_ms: f64,
    /// Detection to the first output released, ms (once there was some).
    pub first_output_ms: Option<f64>,
}

/// One state change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When (Unix seconds).
    pub at_unix: f64,
    /// The state entered (its short name), or "failover".
    pub kind: String,
    /// What an operator reads.
    pub text: String,
}

/// One second of figures, for the plots.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// End of the second (Unix seconds).
    pub t: f64,
    /// Epochs staged in it.
    pub epochs: u64,
    /// Longest pause, ms.
    pub pause_max_ms: Option<f64>,
    /// Median pause, ms.
    pub pause_p50_ms: Option<f64>,
    /// Latest ack latency (pause to ack) seen, ms.
    pub ack_ms: Option<f64>,
    /// Dirty bytes staged per second.
    pub dirty_bps: f64,
    /// Replication bytes sent per second.
    pub wire_bps: f64,
    /// Commits per second (backup).
    pub commits: u64,
}

/// The whole picture, as `/status` serves it and `castor status` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Castor's version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// Now (Unix seconds), by the daemon's clock.
    pub now_unix: f64,
    /// Its role.
    pub role: Role,
    /// Whether this host took the guest over from a lost primary.
    pub took_over: bool,
    /// The protection state.
    pub state: ProtectionState,
    /// Seconds in this state.
    pub state_seconds: f64,
    /// The peer: the backup's address (primary), the primary's (backup).
    pub peer: Option<String>,
    /// Primary: last epoch staged and sent. Backup: last epoch committed.
    pub epoch: u64,
    /// Last epoch the backup committed and acknowledged.
    pub acked_epoch: u64,
    /// Seconds since the last acknowledgement (primary) or commit (backup).
    pub last_ack_age_seconds: Option<f64>,
    /// Epochs sent and not yet acknowledged.
    pub epochs_in_flight: u64,
    /// Replication bytes sent per second, over the last 10 s.
    pub wire_bytes_per_second: f64,
    /// Dirty bytes staged per second, over the last 10 s.
    pub dirty_bytes_per_second: f64,
    /// Median pause of the last minute, ms.
    pub pause_p50_ms: Option<f64>,
    /// 99th percentile pause of the last minute, ms.
    pub pause_p99_ms: Option<f64>,
    /// Epochs in that minute.
    pub pause_epochs: u64,
    /// Latest ack latency (pause to ack), ms.
    pub ack_latency_ms: Option<f64>,
    /// Backup: epochs committed in this process; discarded; memory
    /// verifications passed and failed.
    pub commits: u64,
    /// Backup: epochs discarded.
    pub discarded: u64,
    /// Backup: memory-digest verifications that failed.
    pub verify_failures: u64,
    /// The last takeover on this host.
    pub last_failover: Option<Failover>,
    /// The latest state changes, oldest first.
    pub events: Vec<Event>,
    /// Per-second figures of the last minutes, oldest first.
    pub series: Vec<Point>,
}

/// Where the sampler reads live figures from.
enum Source {
    None,
    Primary(Arc<PrimaryStatus>),
    Backup(Arc<BackupStatus>),
}

/// The session being watched for its first acknowledged checkpoint.
struct Session {
    acked_at_start: u64,
    wire_at_start: u64,
    started: Instant,
    incremental: bool,
}

#[derive(Default)]
struct Bucket {
    started: Option<Instant>,
    epochs: u64,
    pauses_us: Vec<u64>,
    ack_us: Option<u64>,
    dirty_bytes: u64,
    wire_bytes: u64,
    commits: u64,
}

struct Inner {
    role: Role,
    took_over: bool,
    state: ProtectionState,
    state_since: Instant,
    peer: Option<String>,
    memory_bytes: u64,
    source: Source,
    session: Option<Session>,
    last_epoch_seen: u64,
    last_epoch_at: Instant,
    epoch: u64,
    acked: u64,
    last_ack_at: Option<Instant>,
    last_ack_us: Option<u64>,
    wire_total: u64,
    dirty_total: u64,
    prev_wire: u64,
    prev_dirty: u64,
    commits_total: u64,
    /// (when, wire bytes, dirty bytes) every tick, the last 10 s.
    rates: VecDeque<(Instant, u64, u64)>,
    /// (when, pause µs) of every epoch of the last minute.
    pauses: VecDeque<(Instant, u64)>,
    bucket: Bucket,
    series: VecDeque<Point>,
    events: VecDeque<Event>,
    failover: Option<Failover>,
    first_output_ms: Option<f64>,
    notified_ready: bool,
}

/// The daemon's status, shared by what changes it and what shows it.
pub struct StatusBoard {
    started: Instant,
    inner: Mutex<Inner>,
    switch: Arc<crate::protect::ProtectSwitch>,
    /// A backup's planned-detach handle (`castor ctl SOCKET detach`).
    detach: Mutex<Option<castor_replicator::backup::DetachHandle>>,
}

/// Unix time now, in seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl StatusBoard {
    /// A board for a daemon in `role`, starting.
    pub fn new(role: Role) -> Arc<StatusBoard> {
        let now = Instant::now();
        Arc::new(StatusBoard {
            started: now,
            switch: Arc::new(crate::protect::ProtectSwitch::default()),
            detach: Mutex::new(None),
            inner: Mutex::new(Inner {
                role,
                took_over: false,
                state: ProtectionState::Starting,
                state_since: now,
                peer: None,
                memory_bytes: 0,
                source: Source::None,
                session: None,
                last_epoch_seen: 0,
                last_epoch_at: now,
                epoch: 0,
                acked: 0,
                last_ack_at: None,
                last_ack_us: None,
                wire_total: 0,
                dirty_total: 0,
                prev_wire: 0,
                prev_dirty: 0,
                commits_total: 0,
                rates: VecDeque::new(),
                pauses: VecDeque::new(),
                bucket: Bucket::default(),
                series: VecDeque::new(),
                events: VecDeque::new(),
                failover: None,
                first_output_ms: None,
                notified_ready: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The suspend/resume switch of this daemon's protect loop.
    pub fn switch(&self) -> &Arc<crate::protect::ProtectSwitch> {
        &self.switch
    }

    /// Lets the control socket's `detach` reach this backup.
    pub fn set_detach(&self, handle: castor_replicator::backup::DetachHandle) {
        *self.detach.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    }

    /// Asks this backup to detach. `None` on a daemon that is not a backup
    /// guarding a primary (a primary, or a backup that took over); else
    /// whether the request is new.
    pub fn request_detach(&self) -> Option<bool> {
        self.detach
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|h| h.request())
    }

    /// Forgets the detach handle (the backup took over: it is a primary now).
    pub fn clear_detach(&self) {
        *self.detach.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The current protection state.
    pub fn state(&self) -> ProtectionState {
        self.lock().state.clone()
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.lock().role
    }

    /// Reads the live figures of this primary pipeline from now on (guest
    /// memory `memory_bytes`, for the synchronisation's progress).
    pub fn watch_primary(&self, status: Arc<PrimaryStatus>, memory_bytes: u64) {
        let mut g = self.lock();
        g.source = Source::Primary(status);
        g.memory_bytes = memory_bytes;
        g.last_epoch_seen = 0;
        g.prev_wire = 0;
        g.prev_dirty = 0;
        g.session = None;
    }

    /// Reads the live figures of this backup from now on.
    pub fn watch_backup(&self, status: Arc<BackupStatus>) {
        let mut g = self.lock();
        g.source = Source::Backup(status);
        g.session = None;
    }

    /// A session with `peer` begins: synchronising until its first
    /// acknowledged (primary) or committed (backup) checkpoint.
    pub fn session_started(&self, peer: String, incremental: bool) {
        let mut g = self.lock();
        let (acked, wire) = match &g.source {
            Source::Primary(p) => (
                p.acked.load(Ordering::Relaxed),
                p.wire_bytes.load(Ordering::Relaxed),
            ),
            Source::Backup(b) => (b.committed.load(Ordering::Relaxed), 0),
            Source::None => (0, 0),
        };
        g.peer = Some(peer);
        g.session = Some(Session {
            acked_at_start: acked,
            wire_at_start: wire,
            started: Instant::now(),
            incremental,
        });
        let memory_bytes = g.memory_bytes;
        self.enter(
            &mut g,
            ProtectionState::Syncing(SyncProgress {
                incremental,
                bytes_sent: 0,
                memory_bytes,
                seconds: 0.0,
                memory_percent: None,
            }),
        );
    }

    /// The session ended (or none could start): the guest is no longer
    /// protected, for this reason; `paused` when the guest is held.
    pub fn unprotected(&self, reason: Reason, paused: bool) {
        let mut g = self.lock();
        g.session = None;
        let s = if paused {
            ProtectionState::PausedAwaitingBackup { reason }
        } else {
            ProtectionState::Unprotected { reason }
        };
        self.enter(&mut g, s);
    }

    /// The guest was taken over on this host: it is now the primary.
    pub fn took_over(&self, mut f: Failover) {
        let mut g = self.lock();
        f.first_output_ms = f.first_output_ms.or(g.first_output_ms.take());
        g.role = Role::Primary;
        g.took_over = true;
        g.session = None;
        g.peer = None;
        let text = format!(
            "took over from epoch {}: state restore {:.2} ms, detection to resume {:.1} ms",
            f.from_epoch, f.restore_ms, f.resume_ms
        );
        g.failover = Some(f);
        push_event(&mut g, "failover", text);
        self.enter(
            &mut g,
            ProtectionState::Unprotected {
                reason: Reason::TookOver,
            },
        );
    }

    /// The first output after a takeover was released `ms` after detection
    /// (possibly before [`StatusBoard::took_over`] is told).
    pub fn first_output(&self, ms: f64) {
        let mut g = self.lock();
        match g.failover.as_mut() {
            Some(f) => {
                f.first_output_ms.get_or_insert(ms);
            }
            None => g.first_output_ms = Some(ms),
        }
    }

    /// Tells systemd the daemon is ready (once), e.g. a backup listening.
    pub fn ready(&self) {
        let mut g = self.lock();
        if !g.notified_ready {
            g.notified_ready = true;
            crate::systemd::notify_ready(&format!("{} {}", g.role, g.state));
        }
    }

    fn enter(&self, g: &mut Inner, s: ProtectionState) {
        if g.state.same_kind(&s) {
            g.state = s;
            return;
        }
        let text = match &s {
            ProtectionState::Protected => match (&g.peer, g.role) {
                (Some(p), Role::Primary) => format!(
                    "PROTECTED: backup {p} committed epoch {} (every output released from now on is covered by a committed checkpoint)",
                    g.acked
                ),
                (Some(p), Role::Backup) => format!(
                    "PROTECTED: replica of primary {p} committed at epoch {}",
                    g.acked
                ),
                (None, _) => "PROTECTED".to_string(),
            },
            other => format!("{other}"),
        };
        match &s {
            ProtectionState::Protected
            | ProtectionState::Syncing(_)
            | ProtectionState::Starting => {
                log::info!("state: {text}")
            }
            _ => log::warn!("state: {text}"),
        }
        push_event(g, s.name(), text.clone());
        g.state = s;
        g.state_since = Instant::now();
        // A primary is ready once protected, or once it has settled in a
        // state without a backup (a service whose backup is away must still
        // start); a backup once it listens (`ready`).
        let settled = matches!(
            g.state,
            ProtectionState::Protected
                | ProtectionState::Unprotected { .. }
                | ProtectionState::PausedAwaitingBackup { .. }
        );
        if g.role == Role::Primary && settled && !g.notified_ready {
            g.notified_ready = true;
            crate::systemd::notify_ready(&text);
        } else {
            crate::systemd::notify_status(&text);
        }
    }

    /// Starts the sampler thread (every [`TICK`]: live figures, the
    /// protected transition, gauges, the systemd watchdog).
    pub fn start_sampler(self: &Arc<Self>) -> std::io::Result<()> {
        let board = Arc::downgrade(self);
        let watchdog = crate::systemd::watchdog_interval();
        std::thread::Builder::new()
            .name("castor-status".into())
            .spawn(move || {
                let mut last_ping = Instant::now();
                while let Some(b) = board.upgrade() {
                    let healthy = b.tick();
                    if let Some(every) = watchdog {
                        if healthy && last_ping.elapsed() >= every {
                            crate::systemd::notify_watchdog();
                            last_ping = Instant::now();
                        }
                    }
                    drop(b);
                    std::thread::sleep(TICK);
                }
            })?;
        Ok(())
    }

    /// One sampler step; returns whether the daemon looks healthy (for the
    /// watchdog: a protected primary whose epochs stopped for 10 s is not).
    pub fn tick(&self) -> bool {
        let now = Instant::now();
        let mut g = self.lock();
        match &g.source {
            Source::Primary(p) => {
                let p = p.clone();
                self.tick_primary(&mut g, &p, now);
            }
            Source::Backup(b) => {
                let b = b.clone();
                self.tick_backup(&mut g, &b, now);
            }
            Source::None => {}
        }
        roll_bucket(&mut g, now);
        while g
            .rates
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > Duration::from_secs(10))
        {
            g.rates.pop_front();
        }
        let (wire, dirty) = (g.wire_total, g.dirty_total);
        g.rates.push_back((now, wire, dirty));
        while g
            .pauses
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > PAUSE_WINDOW)
        {
            g.pauses.pop_front();
        }
        let st = self.snapshot_locked(&g, now, false);
        let stalled = now.duration_since(g.last_epoch_at) > Duration::from_secs(10);
        drop(g);
        set_gauges(&st);
        !(st.state == ProtectionState::Protected && st.role == Role::Primary && stalled)
    }

    fn tick_primary(&self, g: &mut Inner, p: &PrimaryStatus, now: Instant) {
        let epoch = p.epoch.load(Ordering::Relaxed);
        let acked = p.acked.load(Ordering::Relaxed);
        let wire = p.wire_bytes.load(Ordering::Relaxed);
        let dirty = p.dirty_bytes.load(Ordering::Relaxed);
        if acked != g.acked {
            g.last_ack_at = Some(now);
            let us = p.last_ack_us.load(Ordering::Relaxed);
            if us > 0 {
                g.last_ack_us = Some(us);
                g.bucket.ack_us = Some(g.bucket.ack_us.map_or(us, |a| a.max(us)));
            }
        }
        g.epoch = epoch;
        g.acked = acked;
        // Counters of this pipeline (a new one after a takeover starts at 0).
        let dw = if wire >= g.prev_wire {
            wire - g.prev_wire
        } else {
            wire
        };
        let dd = if dirty >= g.prev_dirty {
            dirty - g.prev_dirty
        } else {
            dirty
        };
        g.prev_wire = wire;
        g.prev_dirty = dirty;
        g.wire_total += dw;
        g.dirty_total += dd;
        g.bucket.wire_bytes += dw;
        g.bucket.dirty_bytes += dd;
        // New epochs since the last tick, from the pipeline's history.
        let last_seen = g.last_epoch_seen;
        let mut fresh: Vec<u64> = Vec::new();
        let mut newest = last_seen;
        {
            let h = p.history.lock().unwrap_or_else(|e| e.into_inner());
            for s in h.iter().rev() {
                if s.epoch <= last_seen {
                    break;
                }
                newest = newest.max(s.epoch);
                fresh.push(s.pause.as_micros() as u64);
            }
        }
        if newest > last_seen {
            g.last_epoch_seen = newest;
            g.last_epoch_at = now;
        }
        for us in fresh.into_iter().rev() {
            g.pauses.push_back((now, us));
            g.bucket.pauses_us.push(us);
            g.bucket.epochs += 1;
        }
        if let Some(s) = &g.session {
            // A full synchronisation clears `protected` as it begins.
            let progress = SyncProgress {
                incremental: s.incremental && p.protected.load(Ordering::Relaxed),
                bytes_sent: wire.saturating_sub(s.wire_at_start),
                memory_bytes: g.memory_bytes,
                seconds: s.started.elapsed().as_secs_f64(),
                memory_percent: {
                    let total = p.precopy_pages_total.load(Ordering::Relaxed);
                    let sent = p.precopy_pages_sent.load(Ordering::Relaxed);
                    let full = !(s.incremental && p.protected.load(Ordering::Relaxed));
                    (full && total > 0).then(|| (sent.min(total) as f64) * 100.0 / total as f64)
                },
            };
            let done = p.protected.load(Ordering::Relaxed) && acked > s.acked_at_start;
            if done {
                g.session = None;
                self.enter(g, ProtectionState::Protected);
            } else if let ProtectionState::Syncing(_) = g.state {
                g.state = ProtectionState::Syncing(progress);
            }
        }
    }

    fn tick_backup(&self, g: &mut Inner, b: &BackupStatus, now: Instant) {
        let committed = b.committed.load(Ordering::Relaxed);
        let commits = b.commits.load(Ordering::Relaxed);
        if committed != g.acked {
            g.last_ack_at = Some(now);
            g.last_epoch_at = now;
        }
        g.epoch = committed;
        g.acked = committed;
        g.bucket.commits += commits.saturating_sub(g.commits_total);
        g.commits_total = commits;
        if let Some(s) = &g.session {
            if committed > s.acked_at_start {
                g.session = None;
                self.enter(g, ProtectionState::Protected);
            } else if let ProtectionState::Syncing(p) = &mut g.state {
                p.seconds = s.started.elapsed().as_secs_f64();
            }
        }
    }

    /// The whole picture now (with the per-second series).
    pub fn snapshot(&self) -> Status {
        let g = self.lock();
        self.snapshot_locked(&g, Instant::now(), true)
    }

    fn snapshot_locked(&self, g: &Inner, now: Instant, series: bool) -> Status {
        let mut pauses: Vec<u64> = g.pauses.iter().map(|(_, us)| *us).collect();
        pauses.sort_unstable();
        let (wire_bps, dirty_bps) = match (g.rates.front(), g.rates.back()) {
            (Some((t0, w0, d0)), Some((t1, w1, d1))) if t1 > t0 => {
                let s = t1.duration_since(*t0).as_secs_f64();
                (
                    w1.saturating_sub(*w0) as f64 / s,
                    d1.saturating_sub(*d0) as f64 / s,
                )
            }
            _ => (0.0, 0.0),
        };
        let (commits, discarded, verify_failures) = match &g.source {
            Source::Backup(b) => (
                b.commits.load(Ordering::Relaxed),
                b.discarded.load(Ordering::Relaxed),
                b.verify_failures.load(Ordering::Relaxed),
            ),
            _ => (0, 0, 0),
        };
        let in_session = matches!(
            g.state,
            ProtectionState::Protected | ProtectionState::Syncing(_)
        );
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_seconds: now.duration_since(self.started).as_secs_f64(),
            now_unix: unix_now(),
            role: g.role,
            took_over: g.took_over,
            state: g.state.clone(),
            state_seconds: now.duration_since(g.state_since).as_secs_f64(),
            peer: g.peer.clone(),
            epoch: g.epoch,
            acked_epoch: g.acked,
            last_ack_age_seconds: g.last_ack_at.map(|t| now.duration_since(t).as_secs_f64()),
            epochs_in_flight: if g.role == Role::Primary && in_session {
                g.epoch.saturating_sub(g.acked)
            } else {
                0
            },
            wire_bytes_per_second: wire_bps,
            dirty_bytes_per_second: dirty_bps,
            pause_p50_ms: percentile(&pauses, 0.50).map(us_to_ms),
            pause_p99_ms: percentile(&pauses, 0.99).map(us_to_ms),
            pause_epochs: pauses.len() as u64,
            ack_latency_ms: g.last_ack_us.map(us_to_ms),
            commits,
            discarded,
            verify_failures,
            last_failover: g.failover.clone(),
            events: g.events.iter().cloned().collect(),
            series: if series {
                g.series.iter().cloned().collect()
            } else {
                Vec::new()
            },
        }
    }
}

fn push_event(g: &mut Inner, kind: &str, text: String) {
    if g.events.len() >= EVENTS {
        g.events.pop_front();
    }
    g.events.push_back(Event {
        at_unix: unix_now(),
        kind: kind.to_string(),
        text,
    });
}

/// Closes the current second into a [`Point`] once it is over.
fn roll_bucket(g: &mut Inner, now: Instant) {
    let started = *g.bucket.started.get_or_insert(now);
    let len = now.duration_since(started);
    if len < Duration::from_secs(1) {
        return;
    }
    let b = std::mem::take(&mut g.bucket);
    let mut pauses = b.pauses_us;
    pauses.sort_unstable();
    let secs = len.as_secs_f64();
    let point = Point {
        t: unix_now(),
        epochs: b.epochs,
        pause_max_ms: pauses.last().copied().map(us_to_ms),
        pause_p50_ms: percentile(&pauses, 0.5).map(us_to_ms),
        ack_ms: b.ack_us.map(us_to_ms),
        dirty_bps: b.dirty_bytes as f64 / secs,
        wire_bps: b.wire_bytes as f64 / secs,
        commits: b.commits,
    };
    if g.series.len() >= SERIES_SECONDS {
        g.series.pop_front();
    }
    g.series.push_back(point);
    g.bucket.started = Some(now);
}

/// The `q` quantile (nearest rank) of sorted values.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Sets the Prometheus gauges from a status.
fn set_gauges(s: &Status) {
    let current = s.state.name();
    for name in ProtectionState::NAMES {
        metrics::gauge!("castor_protection_state", "state" => name).set(if name == current {
            1.0
        } else {
            0.0
        });
    }
    metrics::gauge!("castor_protected").set(if current == "protected" { 1.0 } else { 0.0 });
    metrics::gauge!("castor_fenced").set(if current == "fenced" { 1.0 } else { 0.0 });
    for role in ["primary", "backup"] {
        metrics::gauge!("castor_role", "role" => role).set(if s.role.to_string() == role {
            1.0
        } else {
            0.0
        });
    }
    metrics::gauge!("castor_state_seconds").set(s.state_seconds);
    metrics::gauge!("castor_epoch").set(s.epoch as f64);
    metrics::gauge!("castor_acked_epoch").set(s.acked_epoch as f64);
    if let Some(a) = s.last_ack_age_seconds {
        metrics::gauge!("castor_last_ack_age_seconds").set(a);
    }
    metrics::gauge!("castor_epochs_in_flight").set(s.epochs_in_flight as f64);
    metrics::gauge!("castor_replication_bytes_per_second").set(s.wire_bytes_per_second);
    metrics::gauge!("castor_dirty_bytes_per_second").set(s.dirty_bytes_per_second);
    if let Some(p) = s.pause_p50_ms {
        metrics::gauge!("castor_pause_p50_seconds").set(p / 1000.0);
    }
    if let Some(p) = s.pause_p99_ms {
        metrics::gauge!("castor_pause_p99_seconds").set(p / 1000.0);
    }
}

/// Human units: "1.2 MiB".
pub fn bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn age(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

impl std::fmt::Display for Status {
    /// What `castor status` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2} ms"));
        writeln!(
            f,
            "role:          {}{} (pid {}, up {}, castor {})",
            self.role,
            if self.took_over { " (took over)" } else { "" },
            self.pid,
            age(self.uptime_seconds),
            self.version
        )?;
        writeln!(
            f,
            "state:         {} for {}",
            self.state,
            age(self.state_seconds)
        )?;
        writeln!(
            f,
            "peer:          {}",
            self.peer.as_deref().unwrap_or("none")
        )?;
        match self.role {
            Role::Primary => writeln!(
                f,
                "epochs:        sent {}, acked {} ({} in flight), last ack {}",
                self.epoch,
                self.acked_epoch,
                self.epochs_in_flight,
                self.last_ack_age_seconds
                    .map_or("never".to_string(), |a| format!("{} ago", age(a)))
            )?,
            Role::Backup => writeln!(
                f,
                "epochs:        committed {} ({} commits, {} discarded, {} verification failures), last commit {}",
                self.epoch,
                self.commits,
                self.discarded,
                self.verify_failures,
                self.last_ack_age_seconds
                    .map_or("never".to_string(), |a| format!("{} ago", age(a)))
            )?,
        }
        if self.role == Role::Primary {
            writeln!(
                f,
                "bandwidth:     {}/s on the wire, guest dirtied {}/s (last 10 s)",
                bytes(self.wire_bytes_per_second),
                bytes(self.dirty_bytes_per_second)
            )?;
            writeln!(
                f,
                "pause:         p50 {}, p99 {} (last minute, {} epochs)",
                ms(self.pause_p50_ms),
                ms(self.pause_p99_ms),
                self.pause_epochs
            )?;
            writeln!(f, "ack latency:   {}", ms(self.ack_latency_ms))?;
        }
        match &self.last_failover {
            None => writeln!(f, "last failover: none")?,
            Some(fo) => writeln!(
                f,
                "last failover: {} ago from epoch {}: restore {:.2} ms, detection to resume {:.1} ms, first output {}",
                age((self.now_unix - fo.detected_unix).max(0.0)),
                fo.from_epoch,
                fo.restore_ms,
                fo.resume_ms,
                fo.first_output_ms
                    .map_or("-".to_string(), |v| format!("{v:.1} ms"))
            )?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn primary_becomes_protected_at_the_first_ack_of_its_session() {
        let board = StatusBoard::new(Role::Primary);
        let ps = Arc::new(PrimaryStatus::default());
        board.watch_primary(ps.clone(), 64 << 20);
        board.session_started("127.0.0.1:7400".into(), false);
        ps.wire_bytes.store(1 << 20, Ordering::Relaxed);
        ps.precopy_pages_total.store(16384, Ordering::Relaxed);
        ps.precopy_pages_sent.store(4096, Ordering::Relaxed);
        board.tick();
        match board.state() {
            ProtectionState::Syncing(p) => {
                assert!(!p.incremental);
                assert_eq!(p.bytes_sent, 1 << 20);
                assert_eq!(p.memory_percent, Some(25.0));
                let text = ProtectionState::Syncing(p).to_string();
                assert!(text.contains("25% of memory sent"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        ps.epoch.store(1, Ordering::Relaxed);
        ps.acked.store(1, Ordering::Relaxed);
        ps.protected.store(true, Ordering::Relaxed);
        board.tick();
        assert_eq!(board.state(), ProtectionState::Protected);
        let s = board.snapshot();
        assert_eq!(s.acked_epoch, 1);
        assert!(s.last_ack_age_seconds.is_some());
        assert_eq!(s.peer.as_deref(), Some("127.0.0.1:7400"));
        assert!(s.events.iter().any(|e| e.text.starts_with("PROTECTED")));
        // Loss, then a reconnection: protected again only after a new ack.
        board.unprotected(
            Reason::BackupLost {
                error: "backup silent for 150ms".into(),
            },
            true,
        );
        assert_eq!(board.state().name(), "paused_awaiting_backup");
        board.session_started("127.0.0.1:7400".into(), true);
        board.tick();
        assert_eq!(board.state().name(), "syncing");
        ps.acked.store(2, Ordering::Relaxed);
        board.tick();
        assert_eq!(board.state(), ProtectionState::Protected);
        let json = serde_json::to_string(&board.snapshot()).unwrap();
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back.state, ProtectionState::Protected);
        assert!(format!("{back}").contains("PROTECTED"));
    }

    #[test]
    fn states_serialize_with_their_reason() {
        let s = ProtectionState::Unprotected {
            reason: Reason::BackupRefused {
                message: "set [net] in backup.toml".into(),
            },
        };
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"], "unprotected");
        assert_eq!(v["reason"]["kind"], "backup_refused");
        assert_eq!(
            s.to_string(),
            "UNPROTECTED (backup refused this primary: set [net] in backup.toml)"
        );
        let back: ProtectionState = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn backup_is_protected_once_it_commits() {
        let board = StatusBoard::new(Role::Backup);
        let bs = Arc::new(BackupStatus::default());
        board.watch_backup(bs.clone());
        board.session_started("127.0.0.1:4000".into(), false);
        board.tick();
        assert_eq!(board.state().name(), "syncing");
        bs.committed.store(3, Ordering::Relaxed);
        bs.commits.store(1, Ordering::Relaxed);
        board.tick();
        assert_eq!(board.state(), ProtectionState::Protected);
        assert_eq!(board.snapshot().epoch, 3);
    }
}
