//! Rogue peers against one long-lived real backup (issue #11, items 9 and 7).
//!
//! A real primary (real KVM guest, real QUIC + mTLS on loopback) pairs with a
//! real backup (`Backup::guard`) and commits. Then a test client holding the
//! primary's pinned certificate connects again and again, each time sending
//! one class of bad input written from the documented wire format
//! (ARCHITECTURE.md "Wire format", `replicator/src/wire/`): garbage, bad
//! magic, versions and checksums, truncated frames, 4 GiB lengths, unknown
//! types, inconsistent Hello shapes, out-of-range and duplicate pages,
//! mismatched `EpochEnd`s, replays of committed epochs, floods, too many
//! epochs, oversized sections, millions of zero-page entries, a nearly valid
//! epoch with one bad page, malformed datagrams, and Hellos of another
//! session followed by nothing valid. After each class: the backup is still in its
//! guard loop (no takeover), its session ended with the expected refusal,
//! and it kept its committed replica (same committed epoch, not diverged,
//! same memory digest, no commit). At the end the real primary (same
//! identity and session) resumes incrementally from the committed epoch and
//! commits verified epochs.
//!
//! The backup's session id is never exposed, so the real primary's sessions
//! run through a frame-level relay (the test holds both identities): it shows
//! the backup's Hello reply (session id, committed epoch), whether the
//! primary pre-copies (a full sync) and keeps the primary's recent epochs for
//! replays.
//!
//! Item 7: QUIC handshakes that start (a real client Initial) and then go
//! silent, and clients with a wrong certificate, do not delay the real
//! primary: it pairs and commits while they hang.

mod common;

use castor_net_buffer::{OutputBuffer, OutputPart};
use castor_node::BufferedSink;
use castor_parts::{PartId, PartKind};
use castor_replicator::backup::{Backup, BackupConfig, BackupStatus, GuardEvent};
use castor_replicator::manifest::{Manifest, Region};
use castor_replicator::primary::{memory_digest, Primary, PrimaryConfig, Release};
use castor_replicator::transport::{
    self, Connection, FrameReceiver, FrameSender, Identity, Listener, PeerCert, TransportConfig,
    TransportError,
};
use castor_replicator::wire::{self, Body, Frame};
use castor_tests::require_kvm;
use castor_vmm::{DirtierParams, GuestBoot, NullSink, Vm, VmConfig, Workload};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long anything may take before the test calls it stuck (never a
/// performance bound: a loaded 2-core machine is far faster than this).
const STUCK: Duration = Duration::from_secs(90);
/// The backup's peer timeout: a gap between two rogue sessions stays far below.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// The wire format, from the documentation (not from the crate's encoder).
// ---------------------------------------------------------------------------

const T_HELLO: u16 = 1;
const T_PAGES: u16 = 2;
const T_END: u16 = 6;
const T_ACK: u16 = 7;
const T_HEARTBEAT: u16 = 8;
const T_ERROR: u16 = 9;
const T_SECTION: u16 = 10;
const ROLE_PRIMARY: u8 = 1;
const ROLE_BACKUP: u8 = 2;
const TAG_ZERO: u8 = 0;
const TAG_RAW: u8 = 1;
const PAGE: usize = 4096;
/// The version the rogue writes and offers up to (frame layouts used here
/// are the same in every version from 3 on).
const V: u16 = wire::PROTOCOL_VERSION;
const VMIN: u16 = wire::MIN_PROTOCOL_VERSION;

/// CRC-32 (IEEE, reflected, as `crc32fast`).
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = t[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A frame: the 32-byte header (magic, version, type, epoch, payload length,
/// payload CRC, reserved, header CRC), then the payload.
fn frame(version: u16, ty: u16, epoch: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(32 + payload.len());
    f.extend_from_slice(b"CSTR");
    f.extend_from_slice(&version.to_le_bytes());
    f.extend_from_slice(&ty.to_le_bytes());
    f.extend_from_slice(&epoch.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32(payload).to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    let hc = crc32(&f[..28]);
    f.extend_from_slice(&hc.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Recomputes the header CRC after a header field was changed on purpose.
fn reseal(f: &mut [u8]) {
    let hc = crc32(&f[..28]);
    f[28..32].copy_from_slice(&hc.to_le_bytes());
}

fn le_u16(f: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([f[at], f[at + 1]])
}
fn le_u32(f: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(f[at..at + 4].try_into().unwrap())
}
fn le_u64(f: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(f[at..at + 8].try_into().unwrap())
}

/// Hello: min u16, max u16, role u8, tracker_len u8, reserved u16,
/// epoch_interval_ms u32, session_id u64, resume_from_epoch u64, generation
/// u64, manifest_len u32, tracker, manifest.
fn hello_payload(min: u16, max: u16, role: u8, session: u64, manifest: &[u8]) -> Vec<u8> {
    let tracker = b"rogue";
    let mut p = Vec::new();
    p.extend_from_slice(&min.to_le_bytes());
    p.extend_from_slice(&max.to_le_bytes());
    p.push(role);
    p.push(tracker.len() as u8);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&10u32.to_le_bytes());
    p.extend_from_slice(&session.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    p.extend_from_slice(tracker);
    p.extend_from_slice(manifest);
    p
}

/// PageBatch: count u32, then (page u64, tag u8, len u16, data) each.
fn pages_payload(entries: &[(u64, u8, &[u8])]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (page, tag, data) in entries {
        p.extend_from_slice(&page.to_le_bytes());
        p.push(*tag);
        p.extend_from_slice(&(data.len() as u16).to_le_bytes());
        p.extend_from_slice(data);
    }
    p
}

/// EpochEnd: page_count u64, data_frames u32, flags u32, content_digest u64.
fn end_payload(pages: u64, frames: u32, digest: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&pages.to_le_bytes());
    p.extend_from_slice(&frames.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&digest.to_le_bytes());
    p
}

/// Section: part kind u16, part instance u32, section version u16, data.
fn section_payload(kind: u16, instance: u32, version: u16, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&kind.to_le_bytes());
    p.extend_from_slice(&instance.to_le_bytes());
    p.extend_from_slice(&version.to_le_bytes());
    p.extend_from_slice(data);
    p
}

/// Heartbeat (protocol 3): sent_at_nanos u64, last_committed_epoch u64, generation u64.
fn heartbeat_frame() -> Vec<u8> {
    frame(V, T_HEARTBEAT, 0, &[0u8; 24])
}

/// Error: code u16, len u16, message.
fn error_payload(code: u16, message: &str) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&code.to_le_bytes());
    p.extend_from_slice(&(message.len() as u16).to_le_bytes());
    p.extend_from_slice(message.as_bytes());
    p
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An epoch's tally as documented: data frames, page entries, and the
/// wrapping sum of `mix64(mix64(payload_crc | len << 32) ^ type)`.
#[derive(Default, Clone, Copy)]
struct Tally {
    frames: u32,
    pages: u64,
    digest: u64,
}

impl Tally {
    fn add(&mut self, f: &[u8]) {
        let ty = le_u16(f, 6);
        assert!(ty == T_PAGES || ty == T_SECTION, "not a data frame");
        let (len, crc) = (le_u32(f, 16), le_u32(f, 20));
        self.frames += 1;
        if ty == T_PAGES {
            self.pages += u64::from(le_u32(f, 32));
        }
        let x = u64::from(crc) | (u64::from(len) << 32);
        self.digest = self.digest.wrapping_add(mix64(mix64(x) ^ u64::from(ty)));
    }
    fn end(&self, epoch: u64) -> Vec<u8> {
        frame(
            V,
            T_END,
            epoch,
            &end_payload(self.pages, self.frames, self.digest),
        )
    }
}

fn garbage(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// The hand-built frames are the documented format: the crate decodes them
/// and its own encoder writes the same bytes (no KVM needed).
#[test]
fn hand_built_frames_follow_the_documented_format() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    let manifest = vec![1, 2, 3];
    let ours = frame(
        V,
        T_HELLO,
        0,
        &hello_payload(VMIN, V, ROLE_PRIMARY, 0xfeed, &manifest),
    );
    let mut theirs = Vec::new();
    Frame::new(
        0,
        Body::Hello(wire::Hello {
            versions: castor_parts::VersionRange::new(VMIN, V),
            role: wire::Role::Primary,
            tracker: "rogue".into(),
            epoch_interval_ms: 10,
            session_id: 0xfeed,
            resume_from_epoch: 0,
            generation: 0,
            manifest,
        }),
    )
    .encode(&mut theirs)
    .unwrap();
    assert_eq!(ours, theirs);

    let data = [7u8; PAGE];
    let batch = frame(
        V,
        T_PAGES,
        9,
        &pages_payload(&[(3, TAG_ZERO, &[]), (4, TAG_RAW, &data)]),
    );
    let mut theirs = Vec::new();
    let mut w = wire::PageBatchWriter::begin(&mut theirs, 9);
    w.push(3, TAG_ZERO, &[]).unwrap();
    w.push(4, TAG_RAW, &data).unwrap();
    let h = w.finish().unwrap();
    assert_eq!(batch, theirs);
    let section = frame(V, T_SECTION, 9, &section_payload(3, 0, 1, &[1, 2]));
    let mut ours_tally = Tally::default();
    ours_tally.add(&batch);
    ours_tally.add(&section);
    let mut tally = wire::EpochTally::new(9);
    tally.add(&h, 2);
    let (sh, _) = wire::decode(&section, &wire::Limits::default()).unwrap();
    tally.add_frame(&sh);
    let mut theirs = Vec::new();
    Frame::new(9, Body::EpochEnd(tally.epoch_end(None)))
        .encode(&mut theirs)
        .unwrap();
    assert_eq!(ours_tally.end(9), theirs);
    let hb = heartbeat_frame();
    let (f, used) = wire::decode(&hb, &wire::Limits::default()).unwrap();
    assert_eq!(used, 56);
    assert!(matches!(f.body, wire::BodyRef::Heartbeat(_)));
    let err = frame(V, T_ERROR, 0, &error_payload(1, "x"));
    let (f, _) = wire::decode(&err, &wire::Limits::default()).unwrap();
    assert!(matches!(f.body, wire::BodyRef::Error { code: 1, .. }));
}

// ---------------------------------------------------------------------------
// The real backup, observed after every session.
// ---------------------------------------------------------------------------

/// What the backup looked like right after a session ended.
#[derive(Clone, Debug)]
struct Seen {
    end: String,
    committed: u64,
    diverged: bool,
    has_state: bool,
    digest: Option<[u8; 32]>,
}

struct BackupRun {
    thread: std::thread::JoinHandle<(String, Instant, u64)>,
    ended: Arc<Mutex<Vec<Seen>>>,
    commits: Arc<Mutex<Vec<u64>>>,
    status: Arc<BackupStatus>,
}

impl BackupRun {
    fn spawn(listener: Listener, cfg: BackupConfig) -> BackupRun {
        let ended = Arc::new(Mutex::new(Vec::<Seen>::new()));
        let commits = Arc::new(Mutex::new(Vec::<u64>::new()));
        let mut backup = Backup::new(
            cfg,
            Box::new(|shape| {
                Ok(Arc::new(Vm::new(
                    &VmConfig {
                        vcpus: shape.vcpus,
                        mem_bytes: shape.memory_end(),
                        ..VmConfig::default()
                    },
                    Arc::new(NullSink),
                )?))
            }),
        );
        let status = backup.status();
        {
            let commits = commits.clone();
            backup.set_commit_log(Box::new(move |e| commits.lock().unwrap().push(e)));
        }
        let ended2 = ended.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let lost = rt.block_on(backup.guard(&listener, |b, ev| {
                if let GuardEvent::Ended(end) = ev {
                    let seen = Seen {
                        end: format!("{end:?}"),
                        committed: b.committed_epoch(),
                        diverged: b.replica().is_some_and(|r| r.is_diverged()),
                        has_state: b.replica().is_some_and(|r| r.has_state()),
                        digest: b.vm().map(|vm| memory_digest(vm.memory())),
                    };
                    ended2.lock().unwrap().push(seen);
                }
            }));
            (
                format!("{lost:?}"),
                Instant::now(),
                backup.committed_epoch(),
            )
        });
        BackupRun {
            thread,
            ended,
            commits,
            status,
        }
    }

    fn ended_count(&self) -> usize {
        self.ended.lock().unwrap().len()
    }

    /// Waits for the session end number `n` (0-based) and returns it.
    fn wait_ended(&self, n: usize, what: &str) -> Seen {
        let t = Instant::now();
        loop {
            if let Some(s) = self.ended.lock().unwrap().get(n) {
                return s.clone();
            }
            assert!(
                !self.thread.is_finished(),
                "{what}: the backup left its guard loop (took over)"
            );
            assert!(
                t.elapsed() < STUCK,
                "{what}: the backup's session never ended"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn commits(&self) -> Vec<u64> {
        self.commits.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------
// The real primary.
// ---------------------------------------------------------------------------

struct Discard;
impl Release for Discard {
    fn release(&self, _epoch: u64, _items: &[castor_net_buffer::HeldItem]) {}
}

struct PrimaryRun {
    vm: Arc<Vm>,
    buffer: Arc<OutputBuffer>,
    primary: Primary,
}

impl PrimaryRun {
    fn new() -> PrimaryRun {
        let buffer = Arc::new(OutputBuffer::new(castor_net_buffer::Config::default()));
        let release: Arc<dyn Release> = Arc::new(Discard);
        let vm = Arc::new(
            Vm::new(
                &VmConfig {
                    vcpus: 1,
                    mem_bytes: 32 << 20,
                    dirty_tracking: castor_vmm::DirtyTracking::Bitmap,
                    ..VmConfig::default()
                },
                Arc::new(BufferedSink {
                    buffer: buffer.clone(),
                    release: release.clone(),
                }),
            )
            .unwrap(),
        );
        vm.boot(&GuestBoot {
            workload: Workload::Dirtier(DirtierParams::default()),
            seed: 11,
        })
        .unwrap();
        let primary = Primary::new(
            vm.clone(),
            buffer.clone(),
            release,
            PrimaryConfig {
                epoch_interval: Duration::from_millis(10),
                peer_timeout: Duration::from_secs(5),
                verify_memory_every: 4,
                ..Default::default()
            },
        );
        PrimaryRun {
            vm,
            buffer,
            primary,
        }
    }

    /// The manifest this primary announces at Hello.
    fn manifest(&self) -> Manifest {
        let mut parts = castor_vmm::parts::vm_parts(&self.vm);
        parts.push(Arc::new(OutputPart::new(self.buffer.clone())));
        Manifest::of(&self.vm, &parts)
    }

    /// Runs the guest and replicates over `conn` until the backup has
    /// committed `more` epochs beyond those in its log now; then stops and
    /// pauses the guest.
    fn replicate_until(
        &mut self,
        rt: &tokio::runtime::Runtime,
        conn: Connection,
        backup: &BackupRun,
        more: usize,
    ) {
        let target = backup.commits().len() + more;
        let stop = self.primary.stop_flag();
        stop.store(false, Ordering::SeqCst);
        let stuck = Arc::new(AtomicBool::new(false));
        let commits = backup.commits.clone();
        let stopper = {
            let (stop, stuck) = (stop.clone(), stuck.clone());
            std::thread::spawn(move || {
                let t = Instant::now();
                while commits.lock().unwrap().len() < target {
                    if t.elapsed() > STUCK {
                        stuck.store(true, Ordering::SeqCst);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                stop.store(true, Ordering::SeqCst);
            })
        };
        self.vm.resume();
        let r = self.primary.replicate(conn, rt.handle());
        // Unblock the stopper if the session failed early.
        stop.store(true, Ordering::SeqCst);
        stopper.join().unwrap();
        self.vm.pause();
        assert!(
            !stuck.load(Ordering::SeqCst),
            "the backup committed {} of {target} epochs in {STUCK:?}; the session ended: {r:?}",
            backup.commits().len()
        );
        assert!(
            matches!(r, Err(castor_replicator::primary::PrimaryError::Stopped)),
            "the primary's session failed: {r:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// A frame relay between the real primary and the backup.
// ---------------------------------------------------------------------------

/// One relayed session, as seen on the wire.
#[derive(Default, Debug, Clone)]
struct Relayed {
    /// The backup's Hello reply: (session id, committed epoch).
    reply: Option<(u64, u64)>,
    /// Epoch-0 page batches from the primary (pre-copy: a full sync).
    precopy_batches: u64,
    /// The first checkpoint epoch the primary sent.
    first_epoch: Option<u64>,
}

#[derive(Default)]
struct ProxyLog {
    sessions: Vec<Relayed>,
    /// The primary's frames (data and EpochEnd) of its first and its latest
    /// epochs, for replays.
    epochs: BTreeMap<u64, Vec<Vec<u8>>>,
}

fn note(log: &Mutex<ProxyLog>, idx: usize, up: bool, f: &[u8]) {
    let (ty, epoch) = (le_u16(f, 6), le_u64(f, 8));
    let mut l = log.lock().unwrap();
    if up {
        if ty == T_PAGES && epoch == 0 {
            l.sessions[idx].precopy_batches += 1;
        }
        if epoch > 0 && matches!(ty, T_PAGES | T_SECTION | T_END) {
            l.sessions[idx].first_epoch.get_or_insert(epoch);
            l.epochs.entry(epoch).or_default().push(f.to_vec());
            while l.epochs.len() > 12 {
                let second = *l.epochs.keys().nth(1).unwrap();
                l.epochs.remove(&second);
            }
        }
    } else if ty == T_HELLO {
        if let Ok((fr, _)) = wire::decode(f, &wire::Limits::default()) {
            if let wire::BodyRef::Hello(h) = fr.body {
                l.sessions[idx].reply = Some((h.session_id, h.resume_from_epoch));
            }
        }
    }
}

async fn pump(
    mut rx: FrameReceiver,
    mut tx: FrameSender,
    log: Arc<Mutex<ProxyLog>>,
    idx: usize,
    up: bool,
) {
    loop {
        let f = match rx.recv_raw().await {
            Ok(Some(f)) => f,
            Ok(None) => {
                let _ = tx.finish();
                return;
            }
            Err(_) => return,
        };
        note(&log, idx, up, &f);
        if tx.send_encoded(&f).await.is_err() {
            return;
        }
    }
}

async fn datagrams(from: Arc<Connection>, to: Arc<Connection>) {
    while let Ok(d) = from.quinn().read_datagram().await {
        if to.quinn().send_datagram(d).is_err() {
            return;
        }
    }
}

async fn relay(
    p: Connection,
    backup: SocketAddr,
    pid: Identity,
    bcert: PeerCert,
    log: Arc<Mutex<ProxyLog>>,
) {
    let idx = {
        let mut l = log.lock().unwrap();
        l.sessions.push(Relayed::default());
        l.sessions.len() - 1
    };
    let b = match transport::connect(
        "127.0.0.1:0".parse().unwrap(),
        backup,
        &pid,
        &bcert,
        &TransportConfig::default(),
    )
    .await
    {
        Ok(b) => b,
        Err(_) => {
            p.close(3, "relay: backup unreachable");
            return;
        }
    };
    let (p, b) = (Arc::new(p), Arc::new(b));
    let Ok((p_tx, p_rx)) = p.accept_control().await else {
        return;
    };
    let Ok((b_tx, b_rx)) = b.open_control().await else {
        return;
    };
    let tasks = [
        tokio::spawn(pump(p_rx, b_tx, log.clone(), idx, true)),
        tokio::spawn(pump(b_rx, p_tx, log.clone(), idx, false)),
        tokio::spawn({
            let (p, b, log) = (p.clone(), b.clone(), log.clone());
            async move {
                if let Ok(rx) = p.accept_data().await {
                    if let Ok(tx) = b.open_data().await {
                        pump(rx, tx, log, idx, true).await;
                    }
                }
            }
        }),
        tokio::spawn(datagrams(p.clone(), b.clone())),
        tokio::spawn(datagrams(b.clone(), p.clone())),
    ];
    tokio::select! {
        _ = p.closed() => b.close(0, "relay: primary gone"),
        _ = b.closed() => p.close(0, "relay: backup gone"),
    }
    for t in tasks {
        t.abort();
    }
}

/// A relay listening as the backup (its identity) for the primary, and
/// connecting to the real backup as the primary (its pinned certificate).
fn start_relay(
    rt: &tokio::runtime::Runtime,
    pid: &Identity,
    bid: &Identity,
    backup: SocketAddr,
) -> (SocketAddr, Arc<Mutex<ProxyLog>>) {
    let listener = {
        let _g = rt.enter();
        transport::listen(
            "127.0.0.1:0".parse().unwrap(),
            bid,
            &pid.cert(),
            &TransportConfig::default(),
        )
        .unwrap()
    };
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(ProxyLog::default()));
    let (pid, bcert, log2) = (pid.clone(), bid.cert(), log.clone());
    rt.spawn(async move {
        loop {
            match listener.accept().await {
                Ok(p) => relay(p, backup, pid.clone(), bcert.clone(), log2.clone()).await,
                Err(TransportError::EndpointClosed) => return,
                Err(_) => continue,
            }
        }
    });
    (addr, log)
}

// ---------------------------------------------------------------------------
// The rogue client.
// ---------------------------------------------------------------------------

/// What the rogue knows: the pair's session and committed epoch, and the
/// real manifest (all public knowledge on the wire for a holder of the key).
#[derive(Clone)]
struct Known {
    session: u64,
    committed: u64,
    manifest: Manifest,
    guest_pages: u64,
}

impl Known {
    fn hello(&self) -> Vec<u8> {
        let m = self.manifest.encode().unwrap();
        frame(
            V,
            T_HELLO,
            0,
            &hello_payload(VMIN, V, ROLE_PRIMARY, self.session, &m),
        )
    }
    fn hello_with(&self, m: &Manifest) -> Vec<u8> {
        frame(
            V,
            T_HELLO,
            0,
            &hello_payload(VMIN, V, ROLE_PRIMARY, self.session, &m.encode().unwrap()),
        )
    }
}

/// Reads the control stream until the backup's `Error` frame (its code) or
/// the end of the connection (`None`).
async fn await_end(conn: &Connection, rx: &mut FrameReceiver) -> Option<u16> {
    loop {
        match rx.recv_owned().await {
            Ok(Some(Frame {
                body: Body::Error(e),
                ..
            })) => return Some(e.code),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break,
        }
    }
    conn.closed().await;
    None
}

/// Sends `bytes` as the first thing on the control stream (`finish`: then
/// ends the stream) and waits for the backup's answer.
async fn first_bytes(conn: &Connection, bytes: &[u8], finish: bool) -> Option<u16> {
    let (mut tx, mut rx) = conn.open_control().await.unwrap();
    let _ = tx.send_encoded(bytes).await;
    if finish {
        let _ = tx.finish();
    }
    await_end(conn, &mut rx).await
}

/// A session resumed with the pair's session id: the backup's Hello reply is
/// checked (same session, the committed epoch), heartbeats flow as datagrams.
struct Rogue {
    ctl: FrameSender,
    rx: FrameReceiver,
    data: FrameSender,
    hb: tokio::task::JoinHandle<()>,
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.hb.abort();
    }
}

async fn resume(conn: &Arc<Connection>, k: &Known) -> Rogue {
    let (mut ctl, mut rx) = conn.open_control().await.unwrap();
    ctl.send_encoded(&k.hello()).await.unwrap();
    let reply = tokio::time::timeout(STUCK, rx.recv_owned())
        .await
        .expect("no Hello reply")
        .expect("the backup's Hello reply")
        .expect("the control stream ended before the Hello reply");
    let Body::Hello(h) = reply.body else {
        panic!("the backup answered {reply:?} to a resuming Hello");
    };
    assert_eq!(h.role, wire::Role::Backup);
    assert_eq!(
        (h.session_id, h.resume_from_epoch),
        (k.session, k.committed),
        "the backup no longer offers the pair's session at its committed epoch"
    );
    assert_eq!((h.versions.min, h.versions.max), (V, V));
    conn.set_version(V);
    let data = conn.open_data().await.unwrap();
    let hb = tokio::spawn({
        let conn = conn.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                let beat = Frame::new(
                    0,
                    Body::Heartbeat(wire::Heartbeat {
                        sent_at_nanos: 1,
                        last_committed_epoch: 0,
                        generation: 0,
                    }),
                );
                if conn.send_datagram_frame(&beat).is_err() {
                    return;
                }
            }
        }
    });
    Rogue { ctl, rx, data, hb }
}

impl Rogue {
    /// Makes the data stream visible to the backup (QUIC opens it lazily)
    /// with a harmless heartbeat frame.
    async fn open_data(&mut self) {
        self.data.send_encoded(&heartbeat_frame()).await.unwrap();
    }
    async fn data(&mut self, f: &[u8]) {
        let _ = self.data.send_encoded(f).await;
    }
    async fn ctl(&mut self, f: &[u8]) {
        let _ = self.ctl.send_encoded(f).await;
    }
    async fn end(&mut self, conn: &Connection) -> Option<u16> {
        await_end(conn, &mut self.rx).await
    }
}

/// Runs one class on its own connection and checks the backup after it.
struct Suite<'a> {
    rt: &'a tokio::runtime::Runtime,
    pid: &'a Identity,
    bcert: PeerCert,
    addr: SocketAddr,
    backup: &'a BackupRun,
    baseline: Seen,
    commits: Vec<u64>,
    classes: usize,
}

impl Suite<'_> {
    fn class<F, Fut>(&mut self, name: &str, expect: &[&str], want_code: Option<u16>, body: F)
    where
        F: FnOnce(Arc<Connection>) -> Fut,
        Fut: Future<Output = Option<u16>>,
    {
        let n = self.backup.ended_count();
        let conn = self
            .rt
            .block_on(transport::connect(
                "127.0.0.1:0".parse().unwrap(),
                self.addr,
                self.pid,
                &self.bcert,
                &TransportConfig::default(),
            ))
            .unwrap_or_else(|e| panic!("{name}: the backup refused the primary's key: {e}"));
        let conn = Arc::new(conn);
        let code = self
            .rt
            .block_on(async { tokio::time::timeout(STUCK, body(conn.clone())).await })
            .unwrap_or_else(|_| panic!("{name}: the backup never ended the session"));
        conn.close(0, "rogue done");
        drop(conn);
        let seen = self.backup.wait_ended(n, name);
        assert!(
            !self.backup.thread.is_finished(),
            "{name}: the backup took over while the primary was heard"
        );
        assert!(
            expect.iter().any(|e| seen.end.contains(e)),
            "{name}: the session ended {}, expected one of {expect:?}",
            seen.end
        );
        assert!(
            !seen.end.contains("PrimaryLost"),
            "{name}: a live peer's bad input was taken for the primary's loss: {}",
            seen.end
        );
        assert_eq!(
            seen.committed, self.baseline.committed,
            "{name}: the committed epoch moved ({})",
            seen.end
        );
        assert!(seen.has_state, "{name}: the committed replica was dropped");
        assert!(!seen.diverged, "{name}: the replica is marked diverged");
        assert!(
            seen.digest == self.baseline.digest,
            "{name}: the replica's memory changed"
        );
        assert_eq!(
            self.backup.commits(),
            self.commits,
            "{name}: the backup committed something"
        );
        if let Some(c) = want_code {
            assert_eq!(
                code,
                Some(c),
                "{name}: the backup's Error frame (session ended {})",
                seen.end
            );
        }
        assert_eq!(
            self.backup.ended_count(),
            n + 1,
            "{name}: more than one session ended"
        );
        self.classes += 1;
    }
    /// A class sent after a valid resuming Hello: `data` frames on the data
    /// stream (a heartbeat frame opens it when empty), then `ctl` frames on
    /// the control stream.
    fn session(
        &mut self,
        k: &Known,
        name: &str,
        expect: &[&str],
        code: Option<u16>,
        data: Vec<Vec<u8>>,
        ctl: Vec<Vec<u8>>,
    ) {
        let k = k.clone();
        self.class(name, expect, code, move |c| async move {
            let mut r = resume(&c, &k).await;
            if data.is_empty() {
                r.open_data().await;
            }
            for f in &data {
                r.data(f).await;
            }
            for f in &ctl {
                r.ctl(f).await;
            }
            r.end(&c).await
        });
    }
}

// ---------------------------------------------------------------------------
// Item 9.
// ---------------------------------------------------------------------------

#[test]
fn rogue_peer_with_the_primary_key_cannot_break_the_backup() {
    require_kvm();
    let _ = env_logger::builder().is_test(true).try_init();
    let (lb, listener) = common::loopback(2);
    let rt = &lb.rt;
    let backup = BackupRun::spawn(
        listener,
        BackupConfig {
            peer_timeout: PEER_TIMEOUT,
            handshake_timeout: Duration::from_secs(2),
            // The cap on buffered epochs: never below the largest legitimate
            // epoch (guest memory + 64 MiB), whatever is set here.
            max_epoch_bytes: 0,
            ..Default::default()
        },
    );
    let (relay_addr, relay) = start_relay(rt, &lb.pid, &lb.bid, lb.addr);
    let connect_primary = || {
        rt.block_on(transport::connect(
            "127.0.0.1:0".parse().unwrap(),
            relay_addr,
            &lb.pid,
            &lb.bid.cert(),
            &TransportConfig::default(),
        ))
        .unwrap()
    };

    // 1. A real primary pairs and commits.
    let mut p = PrimaryRun::new();
    p.replicate_until(rt, connect_primary(), &backup, 20);
    let baseline = backup.wait_ended(0, "the real primary's first session");
    let commits = backup.commits();
    let committed = *commits.last().unwrap();
    assert_eq!(baseline.committed, committed);
    assert!(baseline.has_state && !baseline.diverged && baseline.digest.is_some());
    assert!(backup.status.verified.load(Ordering::SeqCst) > 0);
    assert_eq!(backup.status.verify_failures.load(Ordering::SeqCst), 0);
    let first = relay.lock().unwrap().sessions[0].clone();
    let (session, resumed_from) = first.reply.expect("no Hello reply relayed");
    assert_eq!(resumed_from, 0, "a fresh backup offered a committed epoch");
    assert!(
        first.precopy_batches > 0,
        "the first session did not pre-copy"
    );
    let (old_epoch, old_frames, last_frames) = {
        let l = relay.lock().unwrap();
        let (e, f) = l.epochs.iter().next().expect("no epoch relayed");
        let last = l
            .epochs
            .get(&committed)
            .expect("the committed epoch's frames were not relayed")
            .clone();
        (*e, f.clone(), last)
    };
    assert!(old_epoch < committed);

    let k = Known {
        session,
        committed,
        manifest: p.manifest(),
        guest_pages: p.vm.shape().memory_end() / PAGE as u64,
    };
    let mut s = Suite {
        rt,
        pid: &lb.pid,
        bcert: lb.bid.cert(),
        addr: lb.addr,
        backup: &backup,
        baseline,
        commits,
        classes: 0,
    };
    let e1 = committed + 1;
    let gp = k.guest_pages;

    // 2. Before Hello: the first bytes on the control stream.
    let hello = k.hello();
    s.class("garbage", &["BadMagic"], None, |c| async move {
        let mut g = garbage(4096, 0x1234_5678);
        g[0] = b'X';
        first_bytes(&c, &g, false).await
    });
    s.class("bad magic", &["BadMagic"], None, {
        let mut f = hello.clone();
        f[3] = b'X';
        reseal(&mut f);
        |c| async move { first_bytes(&c, &f, false).await }
    });
    s.class("bad header CRC", &["HeaderChecksum"], None, {
        let mut f = hello.clone();
        f[28] ^= 1;
        |c| async move { first_bytes(&c, &f, false).await }
    });
    s.class("bad payload CRC", &["PayloadChecksum"], None, {
        let mut f = hello.clone();
        let last = f.len() - 1;
        f[last] ^= 0x40;
        |c| async move { first_bytes(&c, &f, false).await }
    });
    for (name, version) in [("protocol 1", 1u16), ("protocol 99", 99)] {
        let mut f = hello.clone();
        f[4..6].copy_from_slice(&version.to_le_bytes());
        reseal(&mut f);
        s.class(name, &["UnsupportedVersion"], Some(10), |c| async move {
            first_bytes(&c, &f, false).await
        });
    }
    s.class("no common version", &["Versions"], Some(10), {
        let m = k.manifest.encode().unwrap();
        let f = frame(
            V,
            T_HELLO,
            0,
            &hello_payload(100, 200, ROLE_PRIMARY, session, &m),
        );
        |c| async move { first_bytes(&c, &f, false).await }
    });
    s.class("empty version range", &["Malformed"], None, {
        let m = k.manifest.encode().unwrap();
        let f = frame(
            V,
            T_HELLO,
            0,
            &hello_payload(V, V - 1, ROLE_PRIMARY, session, &m),
        );
        |c| async move { first_bytes(&c, &f, false).await }
    });
    s.class("4 GiB payload length", &["PayloadTooLarge"], None, {
        let mut f = hello[..32].to_vec();
        f[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(&mut f);
        f.extend_from_slice(&[0u8; 64]);
        |c| async move { first_bytes(&c, &f, false).await }
    });
    for (name, ty) in [
        ("unknown frame type 42", 42u16),
        ("unknown frame type 0xffff", 0xffff),
        ("retired type 3", 3),
        ("type 0", 0),
    ] {
        assert!(wire::FrameType::from_u16(ty).is_none());
        let f = frame(V, ty, 0, &[0u8; 16]);
        s.class(name, &["UnknownFrameType"], None, |c| async move {
            first_bytes(&c, &f, false).await
        });
    }
    s.class("an Ack instead of Hello", &["UnexpectedFrame"], None, |c| {
        let f = frame(V, T_ACK, committed, &[]);
        async move { first_bytes(&c, &f, false).await }
    });
    s.class("a Hello from a backup", &["NotPrimary"], None, {
        let m = k.manifest.encode().unwrap();
        let f = frame(
            V,
            T_HELLO,
            0,
            &hello_payload(VMIN, V, ROLE_BACKUP, session, &m),
        );
        |c| async move { first_bytes(&c, &f, false).await }
    });
    s.class("unknown role", &["UnknownRole"], None, {
        let m = k.manifest.encode().unwrap();
        let f = frame(V, T_HELLO, 0, &hello_payload(VMIN, V, 9, session, &m));
        |c| async move { first_bytes(&c, &f, false).await }
    });
    s.class("truncated Hello, stream finished", &["Truncated"], None, {
        let f = hello[..50].to_vec();
        |c| async move { first_bytes(&c, &f, true).await }
    });
    s.class("truncated header, stream finished", &["Truncated"], None, {
        let f = hello[..20].to_vec();
        |c| async move { first_bytes(&c, &f, true).await }
    });
    s.class("truncated Hello, then silence", &["HelloTimeout"], None, {
        let f = hello[..50].to_vec();
        |c| async move { first_bytes(&c, &f, false).await }
    });
    s.class(
        "no control stream",
        &["HelloTimeout"],
        None,
        |c| async move {
            c.closed().await;
            None
        },
    );
    s.class("manifest length over 64 KiB", &["TooManyEntries"], None, {
        let f = frame(
            V,
            T_HELLO,
            0,
            &hello_payload(VMIN, V, ROLE_PRIMARY, session, &vec![0u8; (64 << 10) + 1]),
        );
        |c| async move { first_bytes(&c, &f, false).await }
    });
    s.class("manifest length lies", &["Malformed"], None, {
        let mut p = hello_payload(VMIN, V, ROLE_PRIMARY, session, &[1, 2, 3]);
        p[36..40].copy_from_slice(&2u32.to_le_bytes());
        let f = frame(V, T_HELLO, 0, &p);
        |c| async move { first_bytes(&c, &f, false).await }
    });
    s.class("manifest garbage", &["Decode"], Some(11), {
        let f = frame(
            V,
            T_HELLO,
            0,
            &hello_payload(VMIN, V, ROLE_PRIMARY, session, &garbage(300, 77)),
        );
        |c| async move { first_bytes(&c, &f, false).await }
    });

    // 3. Inconsistent Hello shapes, with the pair's own session id.
    let region = k.manifest.memory[0];
    let shapes: Vec<(&str, &[&str], Manifest)> = vec![
        ("0 vCPUs", &["Vcpus"], {
            let mut m = k.manifest.clone();
            m.vcpus = 0;
            m
        }),
        ("too many vCPUs", &["Vcpus"], {
            let mut m = k.manifest.clone();
            m.vcpus = castor_vmm::MAX_VCPUS + 1;
            m
        }),
        ("no memory region", &["RegionCount"], {
            let mut m = k.manifest.clone();
            m.memory.clear();
            m
        }),
        ("65 regions", &["RegionCount"], {
            let mut m = k.manifest.clone();
            m.memory = (0..65)
                .map(|i| Region {
                    guest_addr: i << 20,
                    size: 1 << 20,
                })
                .collect();
            m
        }),
        ("overlapping regions", &["Overlap"], {
            let mut m = k.manifest.clone();
            m.memory = vec![
                region,
                Region {
                    guest_addr: region.guest_addr + region.size - 4096,
                    size: 1 << 20,
                },
            ];
            m
        }),
        ("unsorted regions", &["Overlap"], {
            let mut m = k.manifest.clone();
            m.memory = vec![
                Region {
                    guest_addr: region.guest_addr + region.size + (1 << 20),
                    size: 1 << 20,
                },
                region,
            ];
            m
        }),
        ("wrapping region", &["BadRegion"], {
            let mut m = k.manifest.clone();
            m.memory = vec![Region {
                guest_addr: u64::MAX - 0xfff,
                size: 0x2000,
            }];
            m
        }),
        ("unaligned region", &["BadRegion"], {
            let mut m = k.manifest.clone();
            m.memory = vec![Region {
                guest_addr: 0,
                size: region.size + 1,
            }];
            m
        }),
        ("empty region", &["BadRegion"], {
            let mut m = k.manifest.clone();
            m.memory.push(Region {
                guest_addr: 1 << 40,
                size: 0,
            });
            m
        }),
        ("oversized memory", &["MemoryTooLarge"], {
            let mut m = k.manifest.clone();
            m.memory = vec![Region {
                guest_addr: 0,
                size: (16 << 30) + 4096,
            }];
            m
        }),
        ("two vCPUs announced, one vCPU part", &["Part", "Layout"], {
            let mut m = k.manifest.clone();
            m.vcpus = 2;
            m
        }),
        ("a part listed twice", &["DuplicatePart"], {
            let mut m = k.manifest.clone();
            let p0 = m.parts[0].clone();
            m.parts.push(p0);
            m
        }),
    ];
    for (name, expect, m) in shapes {
        let f = k.hello_with(&m);
        s.class(name, expect, Some(11), |c| async move {
            first_bytes(&c, &f, false).await
        });
    }

    // A valid Hello of another session (another guest: a restarted
    // primary daemon boots a new one) while the backup holds the pair's
    // committed replica: refused at Hello (code 15), the replica kept, and
    // not counted as the pair's primary being heard.
    let other = |m: &Manifest| {
        frame(
            V,
            T_HELLO,
            0,
            &hello_payload(
                VMIN,
                V,
                ROLE_PRIMARY,
                session ^ 0x5a5a,
                &m.encode().unwrap(),
            ),
        )
    };
    {
        let f = other(&k.manifest);
        s.class(
            "another session's Hello",
            &["Occupied"],
            Some(15),
            |c| async move { first_bytes(&c, &f, false).await },
        );
    }
    if k.manifest.memory.len() == 1 {
        let mut m = k.manifest.clone();
        m.memory[0].size *= 2;
        let f = other(&m);
        s.class(
            "another session's Hello for a larger guest",
            &["Occupied"],
            Some(15),
            |c| async move { first_bytes(&c, &f, false).await },
        );
    }

    // 4. After a valid resuming Hello (the pair's session): the data.
    s.session(
        &k,
        "garbage on the data stream",
        &["BadMagic"],
        None,
        vec![garbage(8192, 99)],
        vec![],
    );
    let zero_batch = |epoch: u64, pages: &[u64]| {
        let entries: Vec<(u64, u8, &[u8])> =
            pages.iter().map(|&p| (p, TAG_ZERO, &[][..])).collect();
        frame(V, T_PAGES, epoch, &pages_payload(&entries))
    };
    {
        let mut f = zero_batch(e1, &[1, 2]);
        f[29] ^= 0x10;
        s.session(
            &k,
            "data frame: bad header CRC",
            &["HeaderChecksum"],
            None,
            vec![f],
            vec![],
        );
        let mut f = zero_batch(e1, &[1, 2]);
        f[40] ^= 0x01;
        s.session(
            &k,
            "data frame: bad payload CRC",
            &["PayloadChecksum"],
            None,
            vec![f],
            vec![],
        );
        let mut f = zero_batch(e1, &[1, 2]);
        f[0] = b'K';
        reseal(&mut f);
        s.session(
            &k,
            "data frame: bad magic",
            &["BadMagic"],
            None,
            vec![f],
            vec![],
        );
        let mut f = zero_batch(e1, &[1, 2]);
        f[4..6].copy_from_slice(&99u16.to_le_bytes());
        reseal(&mut f);
        s.session(
            &k,
            "data frame: protocol 99",
            &["UnsupportedVersion"],
            None,
            vec![f],
            vec![],
        );
        let mut f = zero_batch(e1, &[1, 2])[..32].to_vec();
        f[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(&mut f);
        f.extend_from_slice(&[0u8; 128]);
        s.session(
            &k,
            "data frame: 4 GiB payload length",
            &["PayloadTooLarge"],
            None,
            vec![f],
            vec![],
        );
        let mut f = zero_batch(e1, &[1, 2]);
        f[24] = 1;
        reseal(&mut f);
        s.session(
            &k,
            "data frame: reserved header field",
            &["Malformed"],
            None,
            vec![f],
            vec![],
        );
        for ty in [4u16, 5, 42, 0xffff] {
            assert!(wire::FrameType::from_u16(ty).is_none());
            let f = frame(V, ty, e1, &[0u8; 40]);
            s.session(
                &k,
                &format!("data frame: unknown type {ty}"),
                &["UnknownFrameType"],
                None,
                vec![f],
                vec![],
            );
        }
        let f = zero_batch(e1, &[1, 2, 3]);
        let cut = f[..f.len() - 5].to_vec();
        s.class(
            "data frame cut short, stream finished",
            &["Truncated"],
            None,
            {
                let k = k.clone();
                |c| async move {
                    let mut r = resume(&c, &k).await;
                    r.data(&cut).await;
                    let _ = r.data.finish();
                    r.end(&c).await
                }
            },
        );
        let mut p = pages_payload(&[(1, TAG_ZERO, &[])]);
        p[0..4].copy_from_slice(&3u32.to_le_bytes());
        s.session(
            &k,
            "page batch count lies",
            &["Malformed"],
            None,
            vec![frame(V, T_PAGES, e1, &p)],
            vec![],
        );
    }
    s.session(
        &k,
        "page number = guest pages",
        &["PageOutOfRange"],
        None,
        vec![zero_batch(e1, &[gp])],
        vec![],
    );
    s.session(
        &k,
        "page number 2^64-1",
        &["PageOutOfRange"],
        None,
        vec![zero_batch(e1, &[u64::MAX])],
        vec![],
    );
    s.session(
        &k,
        "pre-copy pages after the commit",
        &["SyncAfterCommit"],
        Some(1),
        vec![zero_batch(0, &[5])],
        vec![],
    );
    {
        let b = zero_batch(e1, &[5, 6]);
        let mut t = Tally::default();
        t.add(&b);
        let mut bad = t;
        bad.digest ^= 1;
        s.session(
            &k,
            "EpochEnd: wrong digest",
            &["Tally"],
            Some(1),
            vec![b.clone()],
            vec![bad.end(e1)],
        );
        let mut bad = t;
        bad.pages += 1;
        s.session(
            &k,
            "EpochEnd: wrong page count",
            &["Tally"],
            Some(1),
            vec![b.clone()],
            vec![bad.end(e1)],
        );
        let b2 = zero_batch(e1, &[7]);
        s.session(
            &k,
            "EpochEnd: fewer frames than sent",
            &["Tally", "MissingSection"],
            Some(1),
            vec![b.clone(), b2],
            vec![t.end(e1)],
        );
        let mut more = t;
        more.frames += 1;
        s.session(
            &k,
            "EpochEnd: more frames than ever come",
            &["IncompleteEpoch"],
            None,
            vec![b.clone()],
            vec![more.end(e1)],
        );
        s.session(
            &k,
            "two EpochEnds",
            &["TwoEpochEnds"],
            Some(1),
            vec![],
            vec![more.end(e1), more.end(e1)],
        );
        let dup = frame(
            V,
            T_PAGES,
            e1,
            &pages_payload(&[(5, TAG_ZERO, &[]), (5, TAG_ZERO, &[])]),
        );
        let mut t = Tally::default();
        t.add(&dup);
        s.session(
            &k,
            "a page twice in one epoch",
            &["DuplicatePage"],
            Some(1),
            vec![dup],
            vec![t.end(e1)],
        );
        let raw = frame(V, T_PAGES, e1, &pages_payload(&[(5, TAG_RAW, &[1u8; 100])]));
        let mut t = Tally::default();
        t.add(&raw);
        s.session(
            &k,
            "a raw page of 100 bytes",
            &["WrongDataLength"],
            Some(1),
            vec![raw],
            vec![t.end(e1)],
        );
        let tag = frame(V, T_PAGES, e1, &pages_payload(&[(5, 9, &[])]));
        let mut t = Tally::default();
        t.add(&tag);
        s.session(
            &k,
            "an unknown page tag",
            &["UnknownTag"],
            Some(1),
            vec![tag],
            vec![t.end(e1)],
        );
    }
    // Replays: a committed epoch, verbatim (valid frames, valid tally).
    {
        let split = |frames: &[Vec<u8>]| -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
            frames.iter().cloned().partition(|f| le_u16(f, 6) != T_END)
        };
        let (d, c) = split(&last_frames);
        s.session(
            &k,
            "replay of the committed epoch",
            &["StaleEpoch"],
            Some(1),
            d,
            c,
        );
        let (d, c) = split(&old_frames);
        s.session(
            &k,
            "replay of an old committed epoch",
            &["StaleEpoch"],
            Some(1),
            d,
            c,
        );
        let one = zero_batch(1, &[5]);
        s.session(
            &k,
            "a frame of epoch 1",
            &["StaleEpoch"],
            Some(1),
            vec![one],
            vec![],
        );
        // Nearly valid: the committed epoch's real frames re-stamped as the
        // next epoch, plus one bad page entry at the end; the tally matches.
        let mut t = Tally::default();
        let mut d2 = Vec::new();
        for mut f in d_clone(&last_frames) {
            f[8..16].copy_from_slice(&e1.to_le_bytes());
            reseal(&mut f);
            t.add(&f);
            d2.push(f);
        }
        let bad = frame(
            V,
            T_PAGES,
            e1,
            &pages_payload(&[(gp - 1, TAG_RAW, &[0xaa; 64])]),
        );
        t.add(&bad);
        d2.push(bad);
        s.session(
            &k,
            "a real checkpoint as the next epoch, one bad page last",
            &["WrongDataLength", "Part {"],
            Some(1),
            d2,
            vec![t.end(e1)],
        );
    }
    // Sections.
    {
        let sec = frame(
            V,
            T_SECTION,
            e1,
            &section_payload(PartKind::Vcpu as u16, 7, 1, &[0; 8]),
        );
        let mut t = Tally::default();
        t.add(&sec);
        s.session(
            &k,
            "section of an unknown part",
            &["UnknownPart"],
            Some(1),
            vec![sec],
            vec![t.end(e1)],
        );
        let sec = frame(V, T_SECTION, e1, &section_payload(99, 0, 1, &[0; 8]));
        let mut t = Tally::default();
        t.add(&sec);
        s.session(
            &k,
            "section of an unknown part kind",
            &["Malformed", "UnknownPart"],
            None,
            vec![sec],
            vec![t.end(e1)],
        );
        let mut big = Vec::new();
        Frame::new(
            e1,
            Body::Section(wire::Section {
                part: PartId::new(PartKind::Vcpu, 0),
                version: 1,
                data: garbage((16 << 20) - 8, 5),
            }),
        )
        .encode(&mut big)
        .unwrap();
        let mut t = Tally::default();
        t.add(&big);
        s.session(
            &k,
            "a 16 MiB section of garbage",
            &["Part {"],
            Some(1),
            vec![big],
            vec![t.end(e1)],
        );
        let mut over = frame(V, T_SECTION, e1, &[])[..32].to_vec();
        over[16..20].copy_from_slice(&((16u32 << 20) + 1).to_le_bytes());
        reseal(&mut over);
        over.extend_from_slice(&[0u8; 4096]);
        s.session(
            &k,
            "a section over the payload cap",
            &["PayloadTooLarge"],
            None,
            vec![over],
            vec![],
        );
    }
    // Out of turn on the control stream.
    s.session(
        &k,
        "a second Hello",
        &["UnexpectedFrame"],
        Some(1),
        vec![],
        vec![hello.clone()],
    );
    s.session(
        &k,
        "an Ack from the primary",
        &["UnexpectedFrame"],
        Some(1),
        vec![],
        vec![frame(V, T_ACK, e1, &[])],
    );
    s.session(
        &k,
        "an Error frame from the primary",
        &["Peer"],
        Some(1),
        vec![],
        vec![frame(V, T_ERROR, 0, &error_payload(3, "rogue"))],
    );
    s.class("a malformed datagram", &["BadMagic", "Malformed"], None, {
        let k = k.clone();
        |c| async move {
            let mut r = resume(&c, &k).await;
            r.open_data().await;
            let mut g = garbage(200, 3);
            g[0] = b'X';
            let _ = c.quinn().send_datagram(g.into());
            r.end(&c).await
        }
    });
    s.class(
        "a heartbeat datagram of protocol 99",
        &["UnsupportedVersion"],
        None,
        {
            let k = k.clone();
            |c| async move {
                let mut r = resume(&c, &k).await;
                r.open_data().await;
                let mut hb = heartbeat_frame();
                hb[4..6].copy_from_slice(&99u16.to_le_bytes());
                reseal(&mut hb);
                let _ = c.quinn().send_datagram(hb.into());
                r.end(&c).await
            }
        },
    );
    // Too many epochs in flight: one small batch each, no EpochEnd.
    {
        let frames: Vec<Vec<u8>> = (0..40).map(|i| zero_batch(e1 + i, &[5])).collect();
        s.session(
            &k,
            "too many epochs in flight",
            &["TooManyEpochs"],
            Some(1),
            frames,
            vec![],
        );
    }
    // Millions of zero-page entries (11 wire bytes each, a 4 KiB page
    // each if staged): 2^21 entries in 32 batches, the tally consistent.
    {
        let mut frames = Vec::new();
        let mut t = Tally::default();
        for b in 0..32u64 {
            let mut buf = Vec::new();
            let mut w = wire::PageBatchWriter::begin(&mut buf, e1);
            for i in 0..65536u64 {
                w.push((b * 65536 + i) % gp, TAG_ZERO, &[]).unwrap();
            }
            w.finish().unwrap();
            t.add(&buf);
            frames.push(buf);
        }
        assert_eq!(t.pages, 1 << 21);
        s.session(
            &k,
            "two million zero-page entries",
            &["TooManyPages", "DuplicatePage", "TooLarge"],
            Some(1),
            frames,
            vec![t.end(e1)],
        );
    }
    // A flood of raw pages without EpochEnd: refused at the staging cap.
    s.class(
        "a flood of pages without EpochEnd",
        &["TooLarge"],
        Some(1),
        {
            let k = k.clone();
            |c| async move {
                let mut r = resume(&c, &k).await;
                let content = garbage(PAGE, 42);
                let mut buf = Vec::new();
                let mut w = wire::PageBatchWriter::begin(&mut buf, e1);
                for i in 0..1024u64 {
                    w.push(i % gp, TAG_RAW, &content).unwrap();
                }
                w.finish().unwrap();
                let Rogue { data, rx, .. } = &mut r;
                let end = await_end(&c, rx);
                tokio::pin!(end);
                // 200 × 4 MiB: far above any cap for a 32 MiB guest.
                let flood = async {
                    for _ in 0..200 {
                        if data.send_encoded(&buf).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::select! {
                    code = &mut end => code,
                    _ = flood => end.await,
                }
            }
        },
    );
    let rogue_classes = s.classes;
    let commits_before = s.commits.clone();
    drop(s);

    // 5. The real primary resumes incrementally and commits verified epochs.
    let verified = backup.status.verified.load(Ordering::SeqCst);
    let n = backup.ended_count();
    p.replicate_until(rt, connect_primary(), &backup, 20);
    let last = relay.lock().unwrap().sessions.last().unwrap().clone();
    assert_eq!(
        last.reply,
        Some((session, committed)),
        "the backup did not offer the pair's session at its committed epoch"
    );
    assert_eq!(last.precopy_batches, 0, "the primary synchronised fully");
    assert!(last.first_epoch.is_some_and(|e| e > committed));
    // The session's end: epochs in flight at the stop may still commit.
    let seen = backup.wait_ended(n, "the resumed session");
    let after = backup.commits();
    assert!(after.len() >= commits_before.len() + 20);
    assert!(
        after.starts_with(&commits_before)
            && after[commits_before.len()..].iter().all(|&e| e > committed),
        "commits: {after:?}"
    );
    assert!(
        after.windows(2).all(|w| w[0] < w[1]),
        "commits out of order: {after:?}"
    );
    assert!(
        backup.status.verified.load(Ordering::SeqCst) > verified,
        "no resumed epoch carried a verified memory digest"
    );
    assert_eq!(backup.status.verify_failures.load(Ordering::SeqCst), 0);
    assert!(seen.has_state && !seen.diverged, "{seen:?}");
    assert_eq!(seen.committed, *after.last().unwrap());

    // 6. Silence: now, and only now, the backup takes over.
    let silent_from = Instant::now();
    let (lost, at, epoch) = backup.thread.join().unwrap();
    assert!(at >= silent_from, "took over ({lost}) too early");
    assert_eq!(epoch, *after.last().unwrap());
    eprintln!("{rogue_classes} rogue classes refused; resumed from {committed} to {epoch}");
}

fn d_clone(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter(|f| le_u16(f, 6) != T_END)
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------
// Item 7.
// ---------------------------------------------------------------------------

/// Real QUIC client Initials (a client that starts a handshake): captured
/// from `n` connection attempts to a socket that never answers.
fn capture_initials(
    rt: &tokio::runtime::Runtime,
    pid: &Identity,
    peer: &PeerCert,
    n: usize,
) -> Vec<Vec<Vec<u8>>> {
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let task = {
            let (pid, peer) = (pid.clone(), peer.clone());
            rt.spawn(async move {
                let _ = transport::connect(
                    "127.0.0.1:0".parse().unwrap(),
                    sink_addr,
                    &pid,
                    &peer,
                    &TransportConfig::default(),
                )
                .await;
            })
        };
        let mut buf = vec![0u8; 65536];
        sink.set_read_timeout(Some(STUCK)).unwrap();
        let (len, from) = sink.recv_from(&mut buf).expect("no QUIC Initial");
        let mut dgrams = vec![buf[..len].to_vec()];
        // The rest of the client's first flight (a ClientHello may span two).
        sink.set_read_timeout(Some(Duration::from_millis(30)))
            .unwrap();
        while let Ok((len, f)) = sink.recv_from(&mut buf) {
            if f == from && dgrams.len() < 8 {
                dgrams.push(buf[..len].to_vec());
            }
        }
        task.abort();
        // Drain whatever the aborted client still had in flight.
        while sink.recv_from(&mut buf).is_ok() {}
        out.push(dgrams);
    }
    out
}

/// Starts `n` handshakes with the backup that never complete: each sends a
/// real client Initial from its own socket and then stays silent. Returns
/// the sockets (keep them open) once the backup answered the first (a
/// handshake is under way and stalled).
fn stall_handshakes(
    rt: &tokio::runtime::Runtime,
    pid: &Identity,
    peer: &PeerCert,
    backup: SocketAddr,
    n: usize,
) -> Vec<UdpSocket> {
    let initials = capture_initials(rt, pid, peer, n);
    let mut socks = Vec::new();
    for dgrams in initials {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        for d in &dgrams {
            s.send_to(d, backup).unwrap();
        }
        s.set_read_timeout(Some(STUCK)).unwrap();
        socks.push(s);
    }
    answered(&socks[0], backup);
    // Garbage datagrams too (not QUIC at all).
    let g = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..16 {
        let _ = g.send_to(&garbage(1200, i + 1), backup);
    }
    socks
}

/// Asserts that the backup answered the Initial sent from `s`.
fn answered(s: &UdpSocket, backup: SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let (_, from) = s
        .recv_from(&mut buf)
        .expect("the backup never answered a client Initial (handshakes served one at a time?)");
    assert_eq!(from, backup);
}

#[test]
fn stalled_unauthenticated_handshakes_do_not_delay_the_primary() {
    require_kvm();
    let _ = env_logger::builder().is_test(true).try_init();
    let (lb, listener) = common::loopback(2);
    let rt = &lb.rt;
    let backup = BackupRun::spawn(
        listener,
        BackupConfig {
            peer_timeout: PEER_TIMEOUT,
            // Far longer than the stuck deadline below: handshakes served
            // one at a time would hold the primary back for good.
            handshake_timeout: Duration::from_secs(600),
            ..Default::default()
        },
    );
    let intruder = Identity::generate("intruder").unwrap();
    let wrong_cert = |n: usize| {
        (0..n)
            .map(|_| {
                let (id, peer) = (intruder.clone(), lb.bid.cert());
                let addr = lb.addr;
                rt.spawn(async move {
                    // The client may finish its side of the handshake before
                    // the backup refuses its certificate: then wait for that.
                    if let Ok(c) = transport::connect(
                        "127.0.0.1:0".parse().unwrap(),
                        addr,
                        &id,
                        &peer,
                        &TransportConfig::default(),
                    )
                    .await
                    {
                        let _ = tokio::time::timeout(STUCK, c.closed()).await;
                    }
                })
            })
            .collect::<Vec<_>>()
    };
    let connect = || {
        rt.block_on(transport::connect(
            "127.0.0.1:0".parse().unwrap(),
            lb.addr,
            &lb.pid,
            &lb.bid.cert(),
            &TransportConfig::default(),
        ))
        .expect("the primary could not connect while other handshakes stalled")
    };
    let mut p = PrimaryRun::new();
    for round in 0..2 {
        let stalled = stall_handshakes(rt, &lb.pid, &lb.bid.cert(), lb.addr, 8);
        let intruders = wrong_cert(2);
        let before = backup.commits().len();
        p.replicate_until(rt, connect(), &backup, 10);
        assert!(backup.commits().len() >= before + 10, "round {round}");
        // Every stalled handshake was under way (answered) meanwhile.
        for sock in &stalled {
            answered(sock, lb.addr);
        }
        for t in intruders {
            let _ = rt.block_on(t);
        }
        drop(stalled);
    }
    // Every session the backup served was the primary's.
    assert_eq!(
        backup.wait_ended(1, "the second session").committed,
        *backup.commits().last().unwrap()
    );
    assert_eq!(backup.ended_count(), 2);
    let last = *backup.commits().last().unwrap();
    let silent_from = Instant::now();
    let (lost, at, epoch) = backup.thread.join().unwrap();
    assert!(at >= silent_from, "took over ({lost}) too early");
    assert_eq!(epoch, last);
}
