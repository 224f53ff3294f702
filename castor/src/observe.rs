//! The output observer: receives the records a primary (or a backup that took
//! over) releases to `[output] release_to`, and checks that the world saw one
//! history.
//!
//! Each datagram is `seq (u64 LE) || epoch (u64 LE) || Record (32 bytes)`:
//! `seq` is the output buffer's sequence number, `epoch` the acknowledged
//! epoch that released it (0: released unprotected) and the record is the
//! guest's (`vcpu u32, reserved u32, seq u64, iterations u64, checksum u64`).
//!
//! The invariant, per vCPU ([`check`]):
//! - **no fork**: a (vCPU, guest seq) pair never arrives with two contents;
//! - **no gap**: the guest seqs seen are contiguous (from 1 when the observer
//!   saw the guest start);
//! - **duplicates** are identical, come from a releaser other than the one
//!   that first released them (a backup re-emitting after takeover), and each
//!   failover produces at most one batch of them, all labelled with one epoch
//!   no older than the first copies';
//! - with a commit log: a record released by epoch `e > 0` arrives after the
//!   backup logged `e` as committed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bytes of one released datagram.
pub const DATAGRAM_SIZE: usize = 16 + 32;

/// Observer errors.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The listening socket could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A commit log could not be read.
    #[error("commit log {path}: {message}")]
    CommitLog {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Other I/O.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// One received datagram.
#[derive(Clone, Debug)]
pub struct Datagram {
    /// Output buffer sequence number.
    pub out_seq: u64,
    /// Epoch that released it (0 = unprotected).
    pub epoch: u64,
    /// vCPU of the record.
    pub vcpu: u32,
    /// Guest record number of that vCPU (1, 2, 3, ...).
    pub seq: u64,
    /// The 32 record bytes, as released.
    pub record: [u8; 32],
    /// Sender address (each releaser has its own socket).
    pub from: SocketAddr,
    /// Arrival, wall clock (nanoseconds since the Unix epoch).
    pub at_unix_ns: u128,
    /// Arrival, monotonic.
    pub at: Instant,
}

impl Datagram {
    /// Decodes a datagram; `None` if it has the wrong size.
    pub fn decode(buf: &[u8], from: SocketAddr, at: Instant, at_unix_ns: u128) -> Option<Self> {
        if buf.len() != DATAGRAM_SIZE {
            return None;
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let mut record = [0u8; 32];
        record.copy_from_slice(&buf[16..48]);
        let mut v = [0u8; 4];
        v.copy_from_slice(&buf[16..20]);
        Some(Datagram {
            out_seq: u64_at(0),
            epoch: u64_at(8),
            vcpu: u32::from_le_bytes(v),
            seq: u64_at(24),
            record,
            from,
            at_unix_ns,
            at,
        })
    }
}

/// Wall clock now, ns since the Unix epoch.
pub fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[derive(Default)]
struct Shared {
    log: Vec<Datagram>,
    malformed: u64,
}

/// Receive buffer the observer asks for.
const OBSERVER_RCVBUF: libc::c_int = 32 << 20;

/// The observer must not lose a datagram that Castor released: on a loaded
/// host its thread runs late while a takeover or a switch to unprotected
/// output releases a burst, and the default receive buffer (~200 KiB, a few
/// hundred small datagrams) overflows; the check then reports a GAP that is
/// the observer's own (seen under a CPU hog: 49 records "missing", exactly
/// the kernel's UDP RcvbufErrors count). Asks for [`OBSERVER_RCVBUF`]:
/// `SO_RCVBUFFORCE` where allowed (root), else `SO_RCVBUF` (capped by
/// `net.core.rmem_max`, which `.ci/run` raises).
fn grow_receive_buffer(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on an open socket, given a pointer to a c_int
        // that lives across the call and its exact size.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&OBSERVER_RCVBUF as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
    log::warn!(
        "observer: cannot enlarge the UDP receive buffer ({}); a loaded host may drop datagrams",
        std::io::Error::last_os_error()
    );
}

/// A running observer: a thread receiving datagrams on a UDP socket.
pub struct Observer {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Observer {
    /// Listens on `addr` (port 0: any free port, see [`Observer::addr`]).
    pub fn bind(addr: SocketAddr) -> Result<Observer, ObserveError> {
        let socket = UdpSocket::bind(addr).map_err(|source| ObserveError::Bind { addr, source })?;
        grow_receive_buffer(&socket);
        let addr = socket.local_addr()?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, st) = (shared.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("observer".into())
            .spawn(move || {
                let mut buf = [0u8; 2048];
                while !st.load(Ordering::Relaxed) {
                    match socket.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            let d = Datagram::decode(&buf[..n], from, Instant::now(), unix_ns());
                            let mut g = sh.lock().unwrap_or_else(|e| e.into_inner());
                            match d {
                                Some(d) => g.log.push(d),
                                None => g.malformed += 1,
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => {
                            log::warn!("observer: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })?;
        Ok(Observer {
            addr,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Datagrams received so far.
    pub fn count(&self) -> usize {
        self.lock().log.len()
    }

    /// A copy of every datagram so far, in arrival order.
    pub fn datagrams(&self) -> Vec<Datagram> {
        self.lock().log.clone()
    }

    /// Datagrams that were not 48 bytes long.
    pub fn malformed(&self) -> u64 {
        self.lock().malformed
    }

    /// The last datagram received, if any.
    pub fn last(&self) -> Option<Datagram> {
        self.lock().log.last().cloned()
    }

    /// The sender of the last datagram that arrived before `t`.
    pub fn source_before(&self, t: Instant) -> Option<SocketAddr> {
        self.lock()
            .log
            .iter()
            .rev()
            .find(|d| d.at < t)
            .map(|d| d.from)
    }

    /// The first datagram after `t` from a sender other than `old`.
    pub fn first_from_new_source(&self, t: Instant, old: Option<SocketAddr>) -> Option<Datagram> {
        self.lock()
            .log
            .iter()
            .find(|d| d.at >= t && Some(d.from) != old)
            .cloned()
    }

    /// Waits until `pred(datagrams)` holds or `timeout` passes; true if it held.
    pub fn wait_until(&self, timeout: Duration, mut pred: impl FnMut(&[Datagram]) -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if pred(&self.lock().log) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops receiving and returns every datagram.
    pub fn finish(mut self) -> Vec<Datagram> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut self.lock().log)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A backup's commit log: epoch -> wall-clock commit time (ns).
#[derive(Clone, Debug, Default)]
pub struct CommitLog {
    /// First commit time of each epoch.
    pub commits: HashMap<u64, u128>,
}

impl CommitLog {
    /// Reads `EPOCH UNIX_NANOS` lines.
    pub fn load(path: &Path) -> Result<CommitLog, ObserveError> {
        let text = std::fs::read_to_string(path).map_err(|e| ObserveError::CommitLog {
            path: path.into(),
            message: e.to_string(),
        })?;
        Self::parse(&text).map_err(|message| ObserveError::CommitLog {
            path: path.into(),
            message,
        })
    }

    /// Parses the text of a commit log.
    pub fn parse(text: &str) -> Result<CommitLog, String> {
        let mut commits = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let mut it = line.split_whitespace();
            let (Some(e), Some(t), None) = (it.next(), it.next(), it.next()) else {
                return Err(format!("line {}: expected \"EPOCH UNIX_NANOS\"", i + 1));
            };
            let e: u64 = e
                .parse()
                .map_err(|_| format!("line {}: bad epoch {e:?}", i + 1))?;
            let t: u128 = t
                .parse()
                .map_err(|_| format!("line {}: bad time {t:?}", i + 1))?;
            commits.entry(e).or_insert(t);
        }
        Ok(CommitLog { commits })
    }
}

/// What the check may assume.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// The observer saw the guest start: every vCPU's records begin at 1.
    pub from_start: bool,
    /// Failovers that happened (bounds the duplicate batches); `None`: one per
    /// sender change seen.
    pub failovers: Option<usize>,
}

/// Per-vCPU summary.
#[derive(Clone, Debug, Default)]
pub struct VcpuSummary {
    /// Lowest guest seq seen.
    pub first: u64,
    /// Highest guest seq seen.
    pub last: u64,
    /// Distinct records.
    pub distinct: u64,
}

/// The verdict of [`check`].
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Datagrams checked.
    pub datagrams: usize,
    /// Identical repeats (allowed within a takeover's re-emission).
    pub duplicates: usize,
    /// Batches of duplicates: (sender, epoch label, count).
    pub duplicate_batches: Vec<(SocketAddr, u64, usize)>,
    /// Distinct senders, in order of first appearance, with datagram counts.
    pub senders: Vec<(SocketAddr, usize)>,
    /// Records released unprotected (epoch 0).
    pub unprotected: usize,
    /// Per vCPU.
    pub vcpus: BTreeMap<u32, VcpuSummary>,
    /// Records checked against the commit log.
    pub commit_checked: usize,
    /// Every violation found, in words (empty: the invariant holds).
    pub violations: Vec<String>,
}

impl Verdict {
    /// True when no violation was found.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invariant: {}",
            if self.ok() { "HOLDS" } else { "VIOLATED" }
        )?;
        writeln!(
            f,
            "  datagrams {}, duplicates {} in {} batch(es), unprotected {}, checked against commit log {}",
            self.datagrams,
            self.duplicates,
            self.duplicate_batches.len(),
            self.unprotected,
            self.commit_checked
        )?;
        for (i, (a, n)) in self.senders.iter().enumerate() {
            writeln!(f, "  releaser #{i}: {a} ({n} datagrams)")?;
        }
        for (v, s) in &self.vcpus {
            writeln!(
                f,
                "  vCPU {v}: records {}..={} ({} distinct)",
                s.first, s.last, s.distinct
            )?;
        }
        const SHOWN: usize = 20;
        for v in self.violations.iter().take(SHOWN) {
            writeln!(f, "  VIOLATION: {v}")?;
        }
        if self.violations.len() > SHOWN {
            writeln!(f, "  ... and {} more", self.violations.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// Checks the one-history invariant over datagrams in arrival order.
pub fn check(log: &[Datagram], commit_log: Option<&CommitLog>, opts: &CheckOptions) -> Verdict {
    let mut v = Verdict {
        datagrams: log.len(),
        ..Default::default()
    };
    // (vcpu, seq) -> index of the first copy.
    let mut seen: HashMap<(u32, u64), usize> = HashMap::new();
    let mut batches: Vec<(SocketAddr, u64, usize)> = Vec::new();
    for (i, d) in log.iter().enumerate() {
        match v.senders.iter_mut().find(|(a, _)| *a == d.from) {
            Some((_, n)) => *n += 1,
            None => v.senders.push((d.from, 1)),
        }
        if d.epoch == 0 {
            v.unprotected += 1;
        }
        if d.seq == 0 {
            v.violations.push(format!(
                "vCPU {} sent record seq 0 (output seq {})",
                d.vcpu, d.out_seq
            ));
            continue;
        }
        match seen.get(&(d.vcpu, d.seq)) {
            None => {
                seen.insert((d.vcpu, d.seq), i);
            }
            Some(&j) => {
                let first = &log[j];
                if first.record != d.record {
                    v.violations.push(format!(
                        "FORK: vCPU {} record {} arrived with two contents: {} (epoch {}, from {}) then {} (epoch {}, from {})",
                        d.vcpu,
                        d.seq,
                        hex(&first.record),
                        first.epoch,
                        first.from,
                        hex(&d.record),
                        d.epoch,
                        d.from
                    ));
                    continue;
                }
                v.duplicates += 1;
                if first.from == d.from {
                    v.violations.push(format!(
                        "DUPLICATE from the same releaser {}: vCPU {} record {} (output seq {}, epochs {} and {})",
                        d.from, d.vcpu, d.seq, d.out_seq, first.epoch, d.epoch
                    ));
                }
                if d.epoch == 0 || d.epoch < first.epoch {
                    v.violations.push(format!(
                        "DUPLICATE re-released by epoch {} after epoch {} released it: vCPU {} record {}",
                        d.epoch, first.epoch, d.vcpu, d.seq
                    ));
                }
                if first.out_seq != d.out_seq {
                    v.violations.push(format!(
                        "DUPLICATE with another output seq: vCPU {} record {} as output {} then {}",
                        d.vcpu, d.seq, first.out_seq, d.out_seq
                    ));
                }
                match batches
                    .iter_mut()
                    .find(|(a, e, _)| *a == d.from && *e == d.epoch)
                {
                    Some((_, _, n)) => *n += 1,
                    None => batches.push((d.from, d.epoch, 1)),
                }
            }
        }
    }
    let allowed = opts.failovers.unwrap_or(v.senders.len().saturating_sub(1));
    if batches.len() > allowed {
        v.violations.push(format!(
            "duplicates in {} batches (sender, epoch): {:?}; at most one per failover ({allowed}) is allowed",
            batches.len(),
            batches
        ));
    }
    v.duplicate_batches = batches;
    // Gaps, per vCPU.
    let mut per: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (vcpu, seq) in seen.keys() {
        per.entry(*vcpu).or_default().push(*seq);
    }
    for (vcpu, mut seqs) in per {
        seqs.sort_unstable();
        let first = seqs[0];
        let last = seqs[seqs.len() - 1];
        if opts.from_start && first != 1 {
            v.violations.push(format!(
                "GAP: vCPU {vcpu}'s first record seen is {first}, not 1"
            ));
        }
        let mut missing = 0u64;
        let mut shown = Vec::new();
        for w in seqs.windows(2) {
            if w[1] != w[0] + 1 {
                missing += w[1] - w[0] - 1;
                if shown.len() < 5 {
                    shown.push(format!("{}..{}", w[0] + 1, w[1] - 1));
                }
            }
        }
        if missing > 0 {
            v.violations.push(format!(
                "GAP: vCPU {vcpu} is missing {missing} record(s) between {first} and {last}: {}",
                shown.join(", ")
            ));
        }
        v.vcpus.insert(
            vcpu,
            VcpuSummary {
                first,
                last,
                distinct: seqs.len() as u64,
            },
        );
    }
    // Release after commit.
    if let Some(cl) = commit_log {
        let mut bad = 0usize;
        for d in log.iter().filter(|d| d.epoch > 0) {
            v.commit_checked += 1;
            match cl.commits.get(&d.epoch) {
                Some(&t) if t < d.at_unix_ns => {}
                Some(&t) => {
                    bad += 1;
                    if bad <= 5 {
                        v.violations.push(format!(
                            "EARLY RELEASE: vCPU {} record {} released by epoch {} arrived {} us before that epoch was committed",
                            d.vcpu,
                            d.seq,
                            d.epoch,
                            (t - d.at_unix_ns) / 1000
                        ));
                    }
                }
                None => {
                    bad += 1;
                    if bad <= 5 {
                        v.violations.push(format!(
                            "EARLY RELEASE: vCPU {} record {} released by epoch {}, which the commit log never committed",
                            d.vcpu, d.seq, d.epoch
                        ));
                    }
                }
            }
        }
        if bad > 5 {
            v.violations
                .push(format!("... {bad} records released before commit in all"));
        }
    }
    v
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dg(from: u16, out_seq: u64, epoch: u64, vcpu: u32, seq: u64, sum: u64) -> Datagram {
        let mut buf = Vec::new();
        buf.extend_from_slice(&out_seq.to_le_bytes());
        buf.extend_from_slice(&epoch.to_le_bytes());
        buf.extend_from_slice(&vcpu.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&(seq * 10).to_le_bytes());
        buf.extend_from_slice(&sum.to_le_bytes());
        Datagram::decode(
            &buf,
            SocketAddr::from(([127, 0, 0, 1], from)),
            Instant::now(),
            u128::from(epoch) * 10 + 5,
        )
        .unwrap_or_else(|| panic!("decode"))
    }

    #[test]
    fn clean_failover_holds() {
        let log = vec![
            dg(1, 1, 1, 0, 1, 11),
            dg(1, 2, 2, 0, 2, 12),
            // takeover from epoch 3: re-emits 2 (dup) and 3 (new)
            dg(2, 2, 3, 0, 2, 12),
            dg(2, 3, 3, 0, 3, 13),
            dg(2, 4, 0, 0, 4, 99),
        ];
        let cl = CommitLog::parse("1 1\n2 2\n3 3\n").unwrap_or_default();
        let v = check(
            &log,
            Some(&cl),
            &CheckOptions {
                from_start: true,
                failovers: Some(1),
            },
        );
        assert!(v.ok(), "{v}");
        assert_eq!(v.duplicates, 1);
    }

    #[test]
    fn fork_gap_dup_and_early_release_are_caught() {
        let fork = vec![dg(1, 1, 1, 0, 1, 11), dg(2, 1, 1, 0, 1, 77)];
        assert!(check(&fork, None, &CheckOptions::default())
            .violations
            .iter()
            .any(|m| m.starts_with("FORK")));
        let gap = vec![dg(1, 1, 1, 0, 1, 11), dg(1, 3, 1, 0, 3, 13)];
        assert!(!check(&gap, None, &CheckOptions::default()).ok());
        let same = vec![dg(1, 1, 1, 0, 1, 11), dg(1, 1, 2, 0, 1, 11)];
        assert!(!check(&same, None, &CheckOptions::default()).ok());
        let early = vec![dg(1, 1, 4, 0, 1, 11)];
        let cl = CommitLog::parse("4 1000\n").unwrap_or_default();
        assert!(!check(&early, Some(&cl), &CheckOptions::default()).ok());
        let never = CommitLog::parse("3 1\n").unwrap_or_default();
        assert!(!check(&early, Some(&never), &CheckOptions::default()).ok());
    }
}

/// Set by SIGINT/SIGTERM once [`install_interrupt_handler`] ran.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to [`INTERRUPTED`] (so long-running commands
/// can clean up their children and report before exiting).
pub fn install_interrupt_handler() {
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// True once SIGINT or SIGTERM arrived (after [`install_interrupt_handler`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `castor observe` arguments.
#[derive(clap::Args, Debug)]
pub struct ObserveArgs {
    /// UDP address to receive released output on (the pair's `[output] release_to`).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Write the verdict (and a per-vCPU summary) to this file at the end.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The backup's commit log (`[log] commit_log`): also check that no
    /// record is released before its epoch was committed.
    #[arg(long)]
    pub commit_log: Option<PathBuf>,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    pub duration: Option<f64>,
    /// The observer saw the guest start: records must begin at 1.
    #[arg(long)]
    pub from_start: bool,
}

/// Runs `castor observe`: prints a status line every second, and on Ctrl-C
/// (or after `--duration`) checks the invariant. Errors if it is violated.
pub fn observe_command(a: &ObserveArgs) -> Result<(), String> {
    install_interrupt_handler();
    let obs = Observer::bind(a.listen).map_err(|e| e.to_string())?;
    println!(
        "observing released output on {} (Ctrl-C to stop and check)",
        obs.addr()
    );
    let start = Instant::now();
    let mut last_print = Instant::now();
    let mut last_count = 0usize;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if interrupted()
            || a.duration
                .is_some_and(|d| start.elapsed().as_secs_f64() >= d)
        {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            let n = obs.count();
            let last = obs.last();
            println!(
                "[{:6.1}s] {n} records (+{}/s){}",
                start.elapsed().as_secs_f64(),
                n - last_count,
                last.map_or(String::new(), |d| format!(
                    ", last: vCPU {} record {} epoch {} from {}",
                    d.vcpu, d.seq, d.epoch, d.from
                ))
            );
            last_count = n;
            last_print = Instant::now();
        }
    }
    let malformed = obs.malformed();
    let log = obs.finish();
    let cl = match &a.commit_log {
        Some(p) => Some(CommitLog::load(p).map_err(|e| e.to_string())?),
        None => None,
    };
    let verdict = check(
        &log,
        cl.as_ref(),
        &CheckOptions {
            from_start: a.from_start,
            failovers: None,
        },
    );
    let mut text = verdict.to_string();
    if malformed > 0 {
        text.push_str(&format!("  ({malformed} malformed datagram(s) ignored)\n"));
    }
    print!("{text}");
    if let Some(p) = &a.report {
        std::fs::write(p, &text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if verdict.ok() {
        Ok(())
    } else {
        Err("the one-history invariant is violated".into())
    }
}
