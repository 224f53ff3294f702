//! Helpers shared by Castor's KVM tests.
//!
//! Every KVM test starts with [`require_kvm`]: where `/dev/kvm` is missing or
//! unusable the test fails with a message saying so; it never passes silently.

use castor_vmm::{Emit, OutputSink, Record};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Fails the calling test loudly unless `/dev/kvm` can be opened read-write.
pub fn require_kvm() {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => {}
        Err(e) => panic!(
            "\n\n*** KVM IS NOT AVAILABLE: cannot open /dev/kvm ({e}). ***\n\
             Castor's VM tests run real guests on KVM and cannot pass without it.\n\
             Run them on a host with KVM (load kvm / kvm_pvm, or give this user access to /dev/kvm).\n"
        ),
    }
}

#[derive(Default)]
struct RecorderInner {
    records: Vec<Record>,
    /// Per vCPU: accept records up to and including this seq, then stop.
    limits: HashMap<u32, u64>,
    /// Per vCPU: the vCPU was stopped by a limit.
    stopped: HashMap<u32, u64>,
}

/// An [`OutputSink`] that keeps every record and can stop each vCPU at a
/// given record sequence number.
#[derive(Default)]
pub struct Recorder {
    inner: Mutex<RecorderInner>,
    cv: Condvar,
}

impl Recorder {
    /// A recorder with no limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every record so far, in arrival order.
    pub fn records(&self) -> Vec<Record> {
        self.lock().records.clone()
    }

    /// Records of one vCPU, in arrival order.
    pub fn records_of(&self, vcpu: u32) -> Vec<Record> {
        self.lock()
            .records
            .iter()
            .filter(|r| r.vcpu == vcpu)
            .copied()
            .collect()
    }

    /// Last sequence number seen from `vcpu` (0 if none).
    pub fn last_seq(&self, vcpu: u32) -> u64 {
        self.lock()
            .records
            .iter()
            .filter(|r| r.vcpu == vcpu)
            .map(|r| r.seq)
            .max()
            .unwrap_or(0)
    }

    /// Accept records of `vcpu` up to `seq`, then stop the vCPU.
    pub fn stop_after(&self, vcpu: u32, seq: u64) {
        self.lock().limits.insert(vcpu, seq);
    }

    /// Waits until `n` vCPUs were stopped by their limits.
    pub fn wait_stopped(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while g.stopped.len() < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Waits until `vcpu` has emitted at least `seq`.
    pub fn wait_seq(&self, vcpu: u32, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.last_seq(vcpu) < seq {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl OutputSink for Recorder {
    fn emit(&self, record: &Record) -> Emit {
        let mut g = self.lock();
        if let Some(&limit) = g.limits.get(&record.vcpu) {
            if record.seq > limit {
                g.stopped.insert(record.vcpu, record.seq);
                self.cv.notify_all();
                return Emit::Stop;
            }
        }
        g.records.push(*record);
        Emit::Accepted
    }
}

/// Checks that each vCPU's records are exactly 1, 2, 3, ... with no gap and no
/// duplicate, and that iterations advance by `record_every` per record.
pub fn check_contiguous(records: &[Record], vcpus: u32, record_every: u64) -> Result<(), String> {
    for v in 0..vcpus {
        let mine: Vec<&Record> = records.iter().filter(|r| r.vcpu == v).collect();
        for (i, r) in mine.iter().enumerate() {
            let want = i as u64 + 1;
            if r.seq != want {
                return Err(format!(
                    "vCPU {v}: record #{i} has seq {} (expected {want})",
                    r.seq
                ));
            }
            if r.iterations != want * record_every {
                return Err(format!(
                    "vCPU {v}: record {} reports {} iterations (expected {})",
                    r.seq,
                    r.iterations,
                    want * record_every
                ));
            }
        }
    }
    Ok(())
}

/// The last `lines` lines of each daemon log `DIR/NAME.log` that exists,
/// each under a heading: what a failing process-level test prints.
pub fn log_tails(dir: &std::path::Path, names: &[&str], lines: usize) -> String {
    let mut s = String::new();
    for n in names {
        if let Ok(t) = std::fs::read_to_string(dir.join(format!("{n}.log"))) {
            let all: Vec<&str> = t.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            s.push_str(&format!("--- {n}.log (tail) ---\n{}\n", tail.join("\n")));
        }
    }
    s
}
