//! Disk replication on real KVM: a protected guest's virtio-blk disk fails
//! over with it, consistent with the committed checkpoint.
//!
//! The guest runs the continuous disk workload: numbered, checksummed 4 KiB
//! blocks written at random, a flush every 8 writes, and every block read
//! back in turn and checked against the round the guest believes it last
//! wrote there (its table lives in replicated memory). A mismatch is a
//! record with `_reserved = 1` and a guest panic.
//!
//! - `primary_sigkill_keeps_the_disk_consistent`: real `castor primary` /
//!   `castor backup` processes; the primary is SIGKILLed at a random instant,
//!   the backup takes over on its own image and the guest finishes a full
//!   pass of read-backs there without a mismatch (the backup's image holds
//!   what the committed checkpoint's memory says was written); the backup's
//!   image at the takeover equals, byte for byte, the primary's image as of
//!   the committed epoch (test hook `CASTOR_TEST_DISK_DIGESTS`, feature
//!   `fault-injection`: digests of the primary's image at every pause and of
//!   the backup's at its takeover); the released records keep one history;
//!   every block of the backup's image is one the guest wrote whole (or zero).
//!   `CASTOR_DISK_KILLS=N` sets the number of kills (default 3; the long run
//!   is `CASTOR_DISK_KILLS=25 cargo test --release -p castor-tests --test
//!   disk primary_sigkill`).
//! - `reconnection_resyncs_the_disk_incrementally`: an in-process pair; a
//!   corrupted epoch ends the session under writes, the primary reconnects
//!   and resyncs incrementally (the blocks of every unacked epoch); once the
//!   guest is done the two images are byte for byte equal.
//! - `reprotection_syncs_the_disk_to_a_new_backup`: processes; after the
//!   first takeover the backup re-protects the guest to a second backup
//!   (full disk sync under writes); killing it, the second backup takes
//!   over on its own image and the guest reads every block back there.
//! - `read_only_disk_is_copied_to_the_backup`: processes; a read-only disk
//!   under a dirtier guest is synchronised to the backup's image once.
//! - `net_workload_exercises_a_disk`: the network workload, given a disk,
//!   writes and verifies numbered blocks between its polls.
//! - `kill_during_the_initial_disk_sync_takes_nothing_over`: processes; the
//!   primary dies while its image is being copied: the backup, which has
//!   committed nothing, does not take over and nothing is released.
//! - `wrong_size_backup_image_is_refused_at_hello`: processes; the backup's
//!   image is half the primary's: refused at Hello with the size and the
//!   `truncate` command, nothing committed or released.

mod common;

use castor::cluster::{Cluster, Daemon, Spec};
use castor::observe::{check, CheckOptions, CommitLog, Datagram, Observer};
use castor_guest_abi::{parse_disk_block, Record, DISK_BLOCK_BYTES};
use castor_net_buffer::OutputBuffer;
use castor_node::BufferedSink;
use castor_replicator::backup::{Backup, BackupConfig, SessionEnd};
use castor_replicator::primary::{Fault, Primary, PrimaryConfig, PrimaryError, Release};
use castor_replicator::transport::{self, TransportConfig};
use castor_tests::require_kvm;
use castor_vmm::devices::{BlkConfig, VirtioBlk};
use castor_vmm::{DiskParams, GuestBoot, NullSink, StopReason, Vm, VmConfig, Workload};
use rand::Rng;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BS: usize = DISK_BLOCK_BYTES as usize;

fn castor_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_castor-under-test"))
}

/// One pair of VMs at a time (2 cores).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn make_image(path: &Path, bytes: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
}

/// Every block of `path` is zero or a whole block the workload wrote at its
/// own place (no torn, shifted or foreign block).
fn check_image_blocks(path: &Path) -> Result<u64, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut written = 0;
    for (i, b) in data.chunks(BS).enumerate() {
        match parse_disk_block(b) {
            Some((u64::MAX, 0)) => {}
            Some((block, round)) if block == i as u64 && round >= 1 => written += 1,
            other => return Err(format!("block {i} of {}: {other:?}", path.display())),
        }
    }
    Ok(written)
}

fn record(d: &Datagram) -> Record {
    Record::from_bytes(&d.record).unwrap_or_default()
}

/// A pair of daemons whose guest runs the continuous disk workload on a
/// `size`-byte image (the backup's is `backup_size`).
fn disk_cluster(obs: &Observer, size: u64, backup_size: u64, rate: u64) -> Cluster {
    let spec = Spec {
        vcpus: 1,
        memory: "64M".into(),
        epoch_ms: 10,
        ..Spec::default()
    };
    let c = Cluster::prepare(&castor_exe(), None, spec, obs.addr())
        .unwrap_or_else(|e| panic!("cluster: {e}"));
    make_image(&c.dir.join("primary.img"), size);
    make_image(&c.dir.join("backup.img"), backup_size);
    let p = std::fs::read_to_string(c.primary_config()).unwrap();
    assert!(p.contains("workload = \"dirtier\""), "{p}");
    let p = p.replace(
        "workload = \"dirtier\"",
        &format!("workload = \"disk\"\ndisk_rate = {rate}"),
    );
    std::fs::write(
        c.primary_config(),
        format!("{p}\n[disk]\npath = \"primary.img\"\n"),
    )
    .unwrap();
    let b = std::fs::read_to_string(c.backup_config()).unwrap();
    std::fs::write(
        c.backup_config(),
        format!("{b}\n[disk]\npath = \"backup.img\"\n"),
    )
    .unwrap();
    c
}

fn start(c: &Cluster, backup: bool) -> Daemon {
    let r = if backup {
        c.start_backup()
    } else {
        c.start_primary()
    };
    r.unwrap_or_else(|e| panic!("start: {e}"))
}

fn logs(c: &Cluster) -> String {
    let mut s = String::new();
    for n in ["primary", "backup", "backup2"] {
        if let Ok(t) = std::fs::read_to_string(c.dir.join(format!("{n}.log"))) {
            let lines: Vec<&str> = t.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            s.push_str(&format!("--- {n}.log (tail) ---\n{}\n", tail.join("\n")));
        }
    }
    s
}

fn mismatches(log: &[Datagram]) -> Vec<String> {
    log.iter()
        .map(record)
        .filter(|r| r._reserved != 0)
        .map(|r| {
            format!(
                "disk block {} read back round {:#x} (record {})",
                r.iterations, r.checksum, r.seq
            )
        })
        .collect()
}

const BLOCKS: u64 = 256; // a 1 MiB disk: a full pass of read-backs is 256 operations

/// One kill: start a pair, let the guest write, SIGKILL the primary after
/// `delay`, then wait for the backup to take over and for the guest to read
/// back every block on the backup's image.
fn kill_run(delay: Duration) -> (u64, u64) {
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap_or_else(|e| panic!("observer: {e}"));
    let c = disk_cluster(&obs, BLOCKS * BS as u64, BLOCKS * BS as u64, 2000);
    // Test hook (feature fault-injection): the primary's image digest at
    // every pause, the backup's at its takeover.
    let digests = c.dir.join("digests.log");
    let env = [(
        "CASTOR_TEST_DISK_DIGESTS",
        digests.to_str().unwrap_or_default(),
    )];
    let mut backup = c
        .spawn_with_env("backup", "backup", &c.backup_config(), &env)
        .unwrap_or_else(|e| panic!("start: {e}"));
    let mut primary = c
        .spawn_with_env("primary", "primary", &c.primary_config(), &env)
        .unwrap_or_else(|e| panic!("start: {e}"));
    // Writes under protection first (a deadline for a stuck start only).
    let started = obs.wait_until(Duration::from_secs(60), |l| l.len() >= 8);
    assert!(started, "no protected output within 60 s\n{}", logs(&c));
    std::thread::sleep(delay);
    let old = obs.datagrams().first().map(|d| d.from);
    primary.kill();
    let took_over = obs.wait_until(Duration::from_secs(30), |l| {
        l.iter().any(|d| Some(d.from) != old)
    });
    assert!(
        took_over,
        "no output from the backup 30 s after the kill\n{}",
        logs(&c)
    );
    // The guest goes on from the committed checkpoint on the backup's
    // image: wait for a whole pass of read-backs there.
    let first_new = obs
        .datagrams()
        .into_iter()
        .find(|d| Some(d.from) != old)
        .map(|d| record(&d).iterations)
        .unwrap_or(0);
    let passed = obs.wait_until(Duration::from_secs(60), |l| {
        l.iter()
            .any(|d| Some(d.from) != old && record(d).iterations >= first_new + BLOCKS + 16)
            || !mismatches(l).is_empty()
    });
    backup.kill();
    let log = obs.finish();
    let bad = mismatches(&log);
    assert!(
        bad.is_empty(),
        "the guest read back wrong blocks after the takeover: {bad:?}\n{}",
        logs(&c)
    );
    assert!(
        passed,
        "no full pass of read-backs on the backup's image within 60 s\n{}",
        logs(&c)
    );
    let cl = CommitLog::load(&c.commit_log()).ok();
    let v = check(
        &log,
        cl.as_ref(),
        &CheckOptions {
            from_start: true,
            failovers: Some(1),
        },
    );
    assert!(v.ok(), "one-history invariant violated:\n{v}\n{}", logs(&c));
    // Byte for byte: the backup's image at the takeover is the primary's
    // image as of the committed epoch.
    let text = std::fs::read_to_string(&digests).unwrap_or_default();
    let entry = |what: &str| -> Vec<(u64, String)> {
        text.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(what)).then_some(())?;
                Some((f.next()?.parse().ok()?, f.next()?.to_string()))
            })
            .collect()
    };
    let takeover = entry("takeover");
    let [(epoch, digest)] = &takeover[..] else {
        panic!(
            "expected one takeover digest, got {takeover:?}\n{}",
            logs(&c)
        );
    };
    let primary_at = entry("primary");
    let want = primary_at.iter().find(|(e, _)| e == epoch);
    assert_eq!(
        want.map(|(_, d)| d),
        Some(digest),
        "the backup's image at its takeover from epoch {epoch} differs from the primary's image of that epoch"
    );
    let written = check_image_blocks(&c.dir.join("backup.img")).unwrap_or_else(|e| panic!("{e}"));
    let committed = cl
        .map(|l| l.commits.keys().copied().max().unwrap_or(0))
        .unwrap_or(0);
    (committed, written)
}

#[test]
fn primary_sigkill_keeps_the_disk_consistent() {
    require_kvm();
    let _serial = serial();
    let kills: usize = std::env::var("CASTOR_DISK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut rng = rand::thread_rng();
    let t = Instant::now();
    for i in 0..kills {
        let ti = Instant::now();
        let delay = Duration::from_millis(rng.gen_range(0..800));
        let (committed, written) = kill_run(delay);
        eprintln!(
            "kill {i}: {delay:?} after protected output began; backup had committed epoch {committed}; {written} written blocks on its image, all whole; run {:.1} s",
            ti.elapsed().as_secs_f64()
        );
    }
    eprintln!("{kills} kills in {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn wrong_size_backup_image_is_refused_at_hello() {
    require_kvm();
    let _serial = serial();
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap_or_else(|e| panic!("observer: {e}"));
    let size = 8u64 << 20;
    let c = disk_cluster(&obs, size, size / 2, 500);
    let _backup = start(&c, true);
    let mut primary = start(&c, false);
    let want = format!("truncate -s {size}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let log = loop {
        let log = std::fs::read_to_string(c.dir.join("primary.log")).unwrap_or_default();
        if log.contains("refused") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    primary.kill();
    let line = log
        .lines()
        .find(|l| l.contains("refused"))
        .unwrap_or_else(|| panic!("the primary was not refused within 60 s\n{}", logs(&c)));
    eprintln!("{line}");
    assert!(
        line.contains(&size.to_string()) && line.contains(&want) && line.contains("backup.toml"),
        "the refusal does not say what to do: {line}"
    );
    let committed = CommitLog::load(&c.commit_log())
        .map(|l| l.commits.len())
        .unwrap_or(0);
    assert_eq!(committed, 0, "the backup committed a checkpoint it refused");
    assert!(obs.finish().is_empty(), "output released without a backup");
}

struct Drop0;
impl Release for Drop0 {
    fn release(&self, _epoch: u64, _items: &[castor_net_buffer::HeldItem]) {}
}

fn disk_vm(image: &Path, sink: Arc<dyn castor_vmm::OutputSink>, tracked: bool) -> Arc<Vm> {
    let vm = Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes: 64 << 20,
            dirty_tracking: if tracked {
                castor_vmm::DirtyTracking::Auto
            } else {
                castor_vmm::DirtyTracking::None
            },
            ..VmConfig::default()
        },
        sink,
    )
    .unwrap();
    vm.devices()
        .add_virtio_blk(
            VirtioBlk::open(&BlkConfig {
                path: image.into(),
                read_only: false,
            })
            .unwrap(),
        )
        .unwrap();
    Arc::new(vm)
}

#[test]
fn reconnection_resyncs_the_disk_incrementally() {
    require_kvm();
    let _serial = serial();
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = std::env::temp_dir().join(format!("castor-disk-resync-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (pimg, bimg) = (dir.join("primary.img"), dir.join("backup.img"));
    let size = 2u64 << 20; // 512 blocks
    make_image(&pimg, size);
    make_image(&bimg, size);
    let (lb, listener) = common::loopback(2);
    let done = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(Mutex::new(0u64));
    let backup_thread = {
        let (done, committed, bimg) = (done.clone(), committed.clone(), bimg.clone());
        std::thread::spawn(move || {
            let rt2 = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let mut backup = Backup::new(
                BackupConfig {
                    peer_timeout: Duration::from_secs(5),
                    ..Default::default()
                },
                Box::new(move |_shape| Ok(disk_vm(&bimg, Arc::new(NullSink), false))),
            );
            backup.set_commit_log(Box::new(move |e| *committed.lock().unwrap() = e));
            let mut sessions = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let conn = match rt2.block_on(async {
                    tokio::time::timeout(Duration::from_millis(500), listener.accept()).await
                }) {
                    Ok(Ok(c)) => c,
                    _ => continue,
                };
                sessions.push(match rt2.block_on(backup.serve(conn)) {
                    Ok(SessionEnd::ProtocolError(w)) => format!("protocol: {w}"),
                    Ok(SessionEnd::PrimaryLost(w)) => format!("lost: {w}"),
                    Ok(SessionEnd::Refused(w)) => format!("refused: {w}"),
                    #[allow(unreachable_patterns)]
                    Ok(other) => format!("{other:?}"),
                    Err(e) => format!("error: {e}"),
                });
            }
            sessions
        })
    };
    let buffer = Arc::new(OutputBuffer::new(castor_net_buffer::Config::default()));
    let release: Arc<dyn Release> = Arc::new(Drop0);
    let vm = disk_vm(
        &pimg,
        Arc::new(BufferedSink {
            buffer: buffer.clone(),
            release: release.clone(),
        }),
        true,
    );
    vm.boot(&GuestBoot {
        workload: Workload::Disk(DiskParams {
            blocks: 512,
            continuous: true,
            rate: 1500,
            ops: 3000,
            sequential: false,
        }),
        seed: 11,
    })
    .unwrap();
    vm.resume();
    let mut primary = Primary::new(
        vm.clone(),
        buffer,
        release,
        PrimaryConfig {
            epoch_interval: Duration::from_millis(10),
            peer_timeout: Duration::from_secs(5),
            // Epoch 40 arrives corrupted: the backup rejects it, the session
            // ends, the primary resumes incrementally from what it committed.
            fault: Some((40, Fault::Corrupt)),
            ..Default::default()
        },
    );
    let status = primary.status();
    let figures = primary.status();
    let stop = primary.stop_flag();
    // Stop once the guest is done and two more epochs (with nothing left to
    // write) were acked: both images are then final.
    let watcher = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut done_at = None;
            while t.elapsed() < Duration::from_secs(120) {
                let stopped = vm
                    .vcpu_states()
                    .iter()
                    .all(|s| matches!(s, castor_vmm::VcpuRunState::Stopped(_)));
                let epoch = status.epoch.load(Ordering::Relaxed);
                if stopped && done_at.is_none() {
                    done_at = Some(epoch + 1);
                }
                if done_at.is_some_and(|e| status.acked.load(Ordering::Relaxed) >= e + 2) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, Ordering::Relaxed);
            (done_at, status.acked.load(Ordering::Relaxed))
        })
    };
    let mut errors = Vec::new();
    for _ in 0..10 {
        let conn = lb
            .rt
            .block_on(transport::connect(
                "127.0.0.1:0".parse().unwrap(),
                lb.addr,
                &lb.pid,
                &lb.bid.cert(),
                &TransportConfig::default(),
            ))
            .unwrap();
        match primary.replicate(conn, lb.rt.handle()) {
            Err(PrimaryError::Stopped) => break,
            Err(e) => errors.push(e.to_string()),
            Ok(()) => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (done_at, acked) = watcher.join().unwrap();
    done.store(true, Ordering::Relaxed);
    let sessions = backup_thread.join().unwrap();
    vm.pause();
    let states = vm.vcpu_states();
    eprintln!(
        "sessions: {sessions:?}; primary errors: {errors:?}; acked {acked}; guest {states:?}"
    );
    assert!(
        matches!(
            states.first(),
            Some(castor_vmm::VcpuRunState::Stopped(StopReason::GuestDone))
        ),
        "the guest did not finish its writes and read-backs: {states:?}"
    );
    let done_at = done_at.unwrap_or_else(|| panic!("the guest never stopped"));
    assert!(
        acked >= done_at + 2,
        "acked {acked}, guest done at epoch {done_at}"
    );
    assert!(
        sessions.len() >= 2,
        "the corrupted epoch did not end a session: {sessions:?}"
    );
    assert!(
        errors.len() == 1,
        "expected exactly one reconnection: {errors:?}"
    );
    assert_eq!(
        figures.disk_full_syncs.load(Ordering::Relaxed),
        1,
        "the reconnection synchronised the whole disk again instead of resuming"
    );
    assert!(figures.disk_blocks.load(Ordering::Relaxed) > 0);
    let (p, b) = (std::fs::read(&pimg).unwrap(), std::fs::read(&bimg).unwrap());
    let differ: Vec<usize> = p
        .chunks(BS)
        .zip(b.chunks(BS))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect();
    assert!(
        differ.is_empty(),
        "the backup's image differs from the primary's in blocks {differ:?}"
    );
    let written = check_image_blocks(&bimg).unwrap_or_else(|e| panic!("{e}"));
    assert!(written > 100, "only {written} blocks written");
    eprintln!("images equal: {written} of 512 blocks written by the guest");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kill the primary; the backup takes over on its image and re-protects the
/// guest with a second backup (the disk is synchronised to it while the
/// guest writes); then kill that new primary: the second backup takes over
/// on *its* image and the guest reads every block back there without a
/// mismatch. One history across both failovers.
#[test]
fn reprotection_syncs_the_disk_to_a_new_backup() {
    require_kvm();
    let _serial = serial();
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap_or_else(|e| panic!("observer: {e}"));
    let size = BLOCKS * BS as u64;
    let c = disk_cluster(&obs, size, size, 2000);
    make_image(&c.dir.join("backup2.img"), size);
    castor_replicator::transport::write_identity(&c.dir, "backup2")
        .unwrap_or_else(|e| panic!("{e}"));
    let b2_addr = SocketAddr::from((
        [127, 0, 0, 1],
        castor::cluster::free_udp_port().unwrap_or_else(|e| panic!("{e}")),
    ));
    let b2_config = c.dir.join("backup2.toml");
    std::fs::write(
        &b2_config,
        format!(
            "[replication]\nlisten = \"{b2_addr}\"\nheartbeat_ms = 10\ntimeout_ms = 100\n\n\
             [tls]\ncert = \"backup2.crt\"\nkey = \"backup2.key\"\npeer_cert = \"backup.crt\"\n\n\
             [output]\nrelease_to = \"{}\"\n\n[disk]\npath = \"backup2.img\"\n",
            obs.addr()
        ),
    )
    .unwrap();
    let b1 = c.backup_config();
    let mut text = std::fs::read_to_string(&b1).unwrap();
    text.push_str(&format!(
        "\n[takeover]\nnew_backup = \"{b2_addr}\"\nnew_backup_cert = \"backup2.crt\"\nbind = \"127.0.0.1:0\"\nepoch_ms = 10\n"
    ));
    std::fs::write(&b1, text).unwrap();
    let log_has = |name: &str, s: &str| {
        std::fs::read_to_string(c.dir.join(format!("{name}.log")))
            .unwrap_or_default()
            .contains(s)
    };
    let wait_log = |name: &str, s: &str| {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) && !log_has(name, s) {
            std::thread::sleep(Duration::from_millis(20));
        }
        log_has(name, s)
    };

    let mut backup = start(&c, true);
    let mut backup2 = c
        .spawn_with("backup2", "backup", &b2_config)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut primary = start(&c, false);
    assert!(
        obs.wait_until(Duration::from_secs(60), |l| l.len() >= 20),
        "no protected output\n{}",
        logs(&c)
    );
    primary.kill();
    assert!(
        wait_log("backup", "attached: protection resumes"),
        "backup 1 never re-protected the guest\n{}",
        logs(&c)
    );
    // Backup 2 commits a while (the guest keeps writing).
    let n = obs.count();
    assert!(
        obs.wait_until(Duration::from_secs(30), |l| l.len() >= n + 40),
        "no output while re-protected\n{}",
        logs(&c)
    );
    // Who released before the second failover, and how far the guest got.
    let before: Vec<Datagram> = obs.datagrams();
    let senders: std::collections::BTreeSet<SocketAddr> = before.iter().map(|d| d.from).collect();
    let start_iter = before
        .iter()
        .map(|d| record(d).iterations)
        .max()
        .unwrap_or(0);
    let last_from = before.last().map(|d| d.from);
    backup.kill();
    assert!(
        wait_log("backup2", "TAKEOVER complete"),
        "backup 2 did not take over\n{}",
        logs(&c)
    );
    // A full pass of read-backs on backup 2's image.
    let passed = obs.wait_until(Duration::from_secs(60), |l| {
        l.iter()
            .any(|d| !senders.contains(&d.from) && record(d).iterations >= start_iter + BLOCKS + 16)
            || !mismatches(l).is_empty()
    });
    backup2.kill();
    let log = obs.finish();
    let bad = mismatches(&log);
    assert!(
        bad.is_empty(),
        "the guest read back wrong blocks: {bad:?}\n{}",
        logs(&c)
    );
    assert!(
        passed,
        "no full pass of read-backs on backup 2's image (last sender before: {last_from:?})\n{}",
        logs(&c)
    );
    let v = check(
        &log,
        None,
        &CheckOptions {
            from_start: true,
            failovers: Some(2),
        },
    );
    assert!(v.ok(), "{v}\n{}", logs(&c));
    let written = check_image_blocks(&c.dir.join("backup2.img")).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("backup 2's image: {written} written blocks, all whole");
}

/// A read-only disk (the dirtier guest, which does not touch it) is copied
/// to the backup's image by the initial synchronisation: byte for byte.
#[test]
fn read_only_disk_is_copied_to_the_backup() {
    require_kvm();
    let _serial = serial();
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap_or_else(|e| panic!("observer: {e}"));
    let spec = Spec {
        epoch_ms: 10,
        ..Spec::default()
    };
    let c = Cluster::prepare(&castor_exe(), None, spec, obs.addr())
        .unwrap_or_else(|e| panic!("cluster: {e}"));
    let size = 4u64 << 20;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(c.dir.join("primary.img"), &data[..size as usize / 2]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(c.dir.join("primary.img"))
        .unwrap()
        .set_len(size)
        .unwrap();
    make_image(&c.dir.join("backup.img"), size);
    for (cfg, img) in [
        (c.primary_config(), "primary.img"),
        (c.backup_config(), "backup.img"),
    ] {
        let t = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(
            &cfg,
            format!("{t}\n[disk]\npath = \"{img}\"\nread_only = true\n"),
        )
        .unwrap();
    }
    let mut backup = start(&c, true);
    let mut primary = start(&c, false);
    let protected = obs.wait_until(Duration::from_secs(60), |l| l.len() >= 20);
    primary.kill();
    backup.kill();
    assert!(protected, "no protected output\n{}", logs(&c));
    let (p, b) = (
        std::fs::read(c.dir.join("primary.img")).unwrap(),
        std::fs::read(c.dir.join("backup.img")).unwrap(),
    );
    assert!(
        p == b,
        "the backup's image differs from the read-only primary image"
    );
}

/// The network workload, given a disk, runs the disk workload's writes,
/// flushes and read-backs between its polls (200 a second).
#[test]
fn net_workload_exercises_a_disk() {
    require_kvm();
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("castor-net-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("net.img");
    make_image(&img, 1 << 20);
    let tap = castor_vmm::devices::Tap::open(&format!("cnd{}", std::process::id() % 100_000))
        .expect("creating a tap needs root");
    let vm = Vm::new(
        &VmConfig {
            vcpus: 1,
            mem_bytes: 64 << 20,
            ..VmConfig::default()
        },
        Arc::new(NullSink),
    )
    .unwrap();
    vm.devices()
        .add_virtio_net(castor_vmm::devices::VirtioNet::new(
            castor_vmm::devices::NetConfig {
                tap: Arc::new(tap),
                mac: castor_vmm::NetParams::default().mac,
                tx_sink: None,
            },
        ))
        .unwrap();
    vm.devices()
        .add_virtio_blk(
            VirtioBlk::open(&BlkConfig {
                path: img.clone(),
                read_only: false,
            })
            .unwrap(),
        )
        .unwrap();
    vm.boot(&GuestBoot {
        workload: Workload::Net(castor_vmm::NetParams::default()),
        seed: 9,
    })
    .unwrap();
    vm.resume();
    // 200 operations a second over 256 blocks: a whole pass of read-backs
    // in ~1.3 s; wait for most blocks to be written (a deadline, not a bound).
    let t = Instant::now();
    let mut written = 0;
    while t.elapsed() < Duration::from_secs(30) && written < 128 {
        std::thread::sleep(Duration::from_millis(200));
        written = check_image_blocks(&img).unwrap_or_else(|e| panic!("{e}"));
    }
    let states = vm.vcpu_states();
    vm.pause();
    assert!(
        matches!(states.first(), Some(castor_vmm::VcpuRunState::Running)),
        "the net guest stopped: {states:?}"
    );
    assert!(written >= 128, "only {written} blocks written in 30 s");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGKILL of the primary in the middle of the disk's initial
/// synchronisation: the backup has no committed checkpoint (pre-copy blocks
/// are not one), so it takes nothing over and nothing was released.
#[test]
fn kill_during_the_initial_disk_sync_takes_nothing_over() {
    require_kvm();
    let _serial = serial();
    let obs = Observer::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap_or_else(|e| panic!("observer: {e}"));
    let size = 256u64 << 20;
    let c = disk_cluster(&obs, size, size, 500);
    {
        // Incompressible data in the first half: the copy takes a while.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.dir.join("primary.img"))
            .unwrap();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut chunk = vec![0u8; 1 << 20];
        for off in (0..size / 2).step_by(1 << 20) {
            for w in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all_at(&chunk, off).unwrap();
        }
    }
    let mut backup = start(&c, true);
    let mut primary = start(&c, false);
    let log_has = |name: &str, s: &str| {
        std::fs::read_to_string(c.dir.join(format!("{name}.log")))
            .unwrap_or_default()
            .contains(s)
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) && !log_has("backup", "new replication session") {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        log_has("backup", "new replication session"),
        "no session\n{}",
        logs(&c)
    );
    std::thread::sleep(Duration::from_millis(50));
    let synced_already = log_has("primary", "disk pre-copy: 256 MiB");
    primary.kill();
    // Well past the backup's timeout.
    std::thread::sleep(Duration::from_secs(1));
    backup
        .check_alive()
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&c)));
    backup.kill();
    let committed = CommitLog::load(&c.commit_log())
        .map(|l| l.commits.len())
        .unwrap_or(0);
    let log = obs.finish();
    if synced_already || committed > 0 {
        eprintln!("the kill came after the disk copy (the host was fast): nothing to check");
        return;
    }
    assert!(
        !log_has("backup", "TAKEOVER"),
        "the backup took over without a committed checkpoint\n{}",
        logs(&c)
    );
    assert!(
        log.is_empty(),
        "output released before anything was committed"
    );
}
