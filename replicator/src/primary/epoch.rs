//! One epoch on the epoch thread: wait, pause, harvest, copy, stage every
//! part, seal, resume, encode, hand to the sender; and the pre-copy rounds.

use super::tasks::{AckBoard, Outgoing};
use super::{EpochMode, EpochSample, Primary, PrimaryError, HISTORY, PAGE};
use crate::checkpoint::{stage_parts, StagedEpoch};
use crate::wire::EpochTally;
use castor_vmm::Vm;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

impl Primary {
    pub(super) fn run_session(
        &mut self,
        incremental: bool,
        backup_committed: u64,
        out: &tokio::sync::mpsc::Sender<Outgoing>,
        board: &Arc<AckBoard>,
    ) -> Result<(), PrimaryError> {
        // Pages the first checkpoint must carry besides its own dirty set:
        // after a reconnection, every page of the epochs the backup has not
        // committed; after a pre-copy, the pages its last round left unsent.
        let mut extra: BTreeSet<u64> = BTreeSet::new();
        if incremental {
            for (e, pages) in &self.unacked_dirty {
                if *e > backup_committed {
                    extra.extend(pages.iter().copied());
                }
            }
            if let Some(d) = self.disk.as_mut() {
                d.resume_from(backup_committed);
            }
        } else {
            // Epoch numbers keep increasing across sessions (the output buffer's
            // epochs do too); a fresh backup takes any first epoch. Output held
            // from an earlier session stays held until this backup commits.
            self.unacked_dirty.clear();
            self.precopy_disk(out, board)?;
            extra.extend(self.precopy(out, board)?);
        }
        let mut next = Instant::now();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(PrimaryError::Stopped);
            }
            next += self.cfg.epoch_interval;
            let now = Instant::now();
            if next > now {
                match self.cfg.epoch_mode {
                    EpochMode::Fixed => std::thread::sleep(next - now),
                    EpochMode::OutputTriggered { min_epoch } => {
                        // End the epoch at its deadline, or earlier once output
                        // waits and min_epoch has passed (woken by the push).
                        let earliest = (self.paused_at + min_epoch).min(next);
                        if earliest > now {
                            std::thread::sleep(earliest - now);
                        }
                        if self.output.wait_for_open_output(next) {
                            // Early: the next deadline counts from this pause.
                            next = Instant::now();
                        }
                    }
                }
            } else {
                next = now;
            }
            self.wait_for_room(board)?;
            self.take_acks(board)?;
            let mut staged = self.stage_epoch(&extra)?;
            extra.clear();
            self.unacked_dirty
                .push_back((staged.epoch, staged.pages.clone()));
            let mut data = Vec::with_capacity(staged.pages.len() * PAGE / 4 + 4096);
            let mut end = Vec::with_capacity(128);
            let enc = self.encoder.encode_epoch(&staged, &mut data, &mut end);
            self.staging = std::mem::take(&mut staged.data);
            if let (Some(side), Some(d)) = (self.disk.as_mut(), staged.disk.take()) {
                side.give_back(d);
            }
            let enc = enc?;
            self.status
                .disk_blocks
                .fetch_add(enc.disk_blocks, Ordering::Relaxed);
            metrics::counter!("castor_disk_blocks_total").increment(enc.disk_blocks);
            self.status
                .wire_bytes
                .fetch_add(enc.wire_bytes, Ordering::Relaxed);
            {
                let mut h = self
                    .status
                    .history
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if h.len() >= HISTORY {
                    h.pop_front();
                }
                h.push_back(EpochSample {
                    epoch: staged.epoch,
                    pause: Duration::from_micros(self.status.last_pause_us.load(Ordering::Relaxed)),
                    dirty_pages: enc.pages,
                    wire_bytes: enc.wire_bytes,
                    ack_latency: None,
                    disk_blocks: enc.disk_blocks,
                    disk_pause: Duration::from_nanos(
                        self.status.last_disk_pause_ns.load(Ordering::Relaxed),
                    ),
                });
            }
            metrics::counter!("castor_wire_bytes_total").increment(enc.wire_bytes);
            metrics::counter!("castor_dirty_bytes_total").increment(enc.pages * PAGE as u64);
            if enc.pages > 0 {
                metrics::gauge!("castor_compression_ratio")
                    .set(enc.wire_bytes as f64 / (enc.pages * PAGE as u64) as f64);
            }
            if out
                .blocking_send(Outgoing {
                    epoch: staged.epoch,
                    paused_at: self.paused_at,
                    data,
                    end,
                })
                .is_err()
            {
                return Err(self.session_failure(board));
            }
        }
    }

    pub(super) fn session_failure(&self, board: &AckBoard) -> PrimaryError {
        board.take_failure()
    }

    /// Blocks until fewer than `max_in_flight` epochs are unacknowledged.
    pub(super) fn wait_for_room(&mut self, board: &AckBoard) -> Result<(), PrimaryError> {
        let mut acked = board.acked.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if board.has_failed() {
                return Err(board.take_failure());
            }
            let silent = board
                .last_heard
                .lock()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            if silent > self.cfg.peer_timeout {
                return Err(PrimaryError::PeerSilent(silent));
            }
            if self.epoch.saturating_sub(*acked) < self.cfg.max_in_flight as u64 {
                return Ok(());
            }
            acked = board
                .cv
                .wait_timeout(acked, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub(super) fn take_acks(&mut self, board: &AckBoard) -> Result<(), PrimaryError> {
        let a = board.committed.load(Ordering::Acquire);
        if a > self.acked {
            self.acked = a;
            while self.unacked_dirty.front().is_some_and(|(e, _)| *e <= a) {
                self.unacked_dirty.pop_front();
            }
            if let Some(d) = self.disk.as_mut() {
                d.acked(a);
            }
        }
        Ok(())
    }

    pub(super) fn on_ack(&mut self, epoch: u64) -> Result<(), PrimaryError> {
        if epoch > self.acked {
            // Write out first, then drop from the buffer (see the ack task).
            let items: Vec<castor_net_buffer::HeldItem> = self
                .output
                .peek_through(epoch)
                .into_iter()
                .map(|i| castor_net_buffer::HeldItem {
                    seq: i.seq,
                    data: i.data,
                })
                .collect();
            if !items.is_empty() {
                self.release.release(epoch, &items);
            }
            self.output.release_through(epoch)?;
            self.acked = epoch;
            self.status.acked.store(epoch, Ordering::Relaxed);
            while self.unacked_dirty.front().is_some_and(|(e, _)| *e <= epoch) {
                self.unacked_dirty.pop_front();
            }
            if let Some(d) = self.disk.as_mut() {
                d.acked(epoch);
            }
        }
        Ok(())
    }

    /// Pause, harvest, copy, capture, seal, resume.
    /// `extra`: pages to carry besides the harvested ones (copied in the pause).
    pub(super) fn stage_epoch(
        &mut self,
        extra: &BTreeSet<u64>,
    ) -> Result<StagedEpoch, PrimaryError> {
        let epoch = self.epoch + 1;
        let verify =
            self.cfg.verify_memory_every > 0 && epoch.is_multiple_of(self.cfg.verify_memory_every);
        let t0 = Instant::now();
        self.paused_at = t0;
        let mut data = std::mem::take(&mut self.staging);
        self.vm.pause();
        let staged = (|| -> Result<StagedEpoch, PrimaryError> {
            let mut pages = dirty_pages(&self.vm.harvest_dirty()?);
            if !extra.is_empty() {
                let mut all: BTreeSet<u64> = extra.clone();
                all.extend(pages.iter().copied());
                pages = all.into_iter().collect();
            }
            let need = pages.len() * PAGE;
            if data.len() < need {
                data.resize(need, 0);
            }
            copy_pages(&self.vm, &pages, &mut data[..need])?;
            // The disk's blocks of this epoch, read back while the device is
            // quiescent (see crate::disk).
            let td = Instant::now();
            let disk = match self.disk.as_mut() {
                Some(d) => Some(d.stage(epoch).map_err(|source| {
                    PrimaryError::Checkpoint(crate::checkpoint::CheckpointError::Disk {
                        epoch,
                        source,
                    })
                })?),
                None => None,
            };
            if disk.is_some() {
                let t = td.elapsed();
                self.status
                    .disk_pause_us
                    .fetch_add(t.as_micros() as u64, Ordering::Relaxed);
                self.status
                    .last_disk_pause_ns
                    .store(t.as_nanos() as u64, Ordering::Relaxed);
            }
            // Seal first: the output part stages the buffer's position after it.
            self.output.seal(epoch)?;
            let sections = stage_parts(&self.parts)?;
            // Output that passed through unprotected (no backup yet, or just
            // after a takeover) is part of this checkpoint's history: from
            // here on it is held again. Done in the pause, so the guest's
            // network is not stalled for the whole initial synchronisation.
            if self.output.is_unprotected() {
                let _ = self.output.set_unprotected(false);
            }
            let memory_digest = verify.then(|| memory_digest(self.vm.memory()));
            Ok(StagedEpoch {
                epoch,
                pages,
                data: std::mem::take(&mut data),
                sections,
                memory_digest,
                disk,
            })
        })();
        self.vm.resume();
        let pause = t0.elapsed();
        // Everything sealed and not yet acknowledged travels in this
        // checkpoint (the output part), so the backup can re-emit it
        // whatever the primary released.
        let staged = staged?;
        self.epoch = epoch;
        self.status.epoch.store(epoch, Ordering::Relaxed);
        self.status
            .last_pause_us
            .store(pause.as_micros() as u64, Ordering::Relaxed);
        self.status
            .last_dirty_pages
            .store(staged.pages.len() as u64, Ordering::Relaxed);
        self.status
            .dirty_bytes
            .fetch_add((staged.pages.len() * PAGE) as u64, Ordering::Relaxed);
        metrics::histogram!("castor_pause_seconds").record(pause.as_secs_f64());
        metrics::histogram!("castor_dirty_pages").record(staged.pages.len() as f64);
        metrics::counter!("castor_epochs_total").increment(1);
        metrics::gauge!("castor_held_output_bytes").set(self.output.held_bytes() as f64);
        Ok(staged)
    }

    /// Iterative pre-copy while the guest runs.
    /// Returns the pages the last round found dirty and did not send.
    pub(super) fn precopy(
        &mut self,
        out: &tokio::sync::mpsc::Sender<Outgoing>,
        board: &AckBoard,
    ) -> Result<Vec<u64>, PrimaryError> {
        // Start tracking from a clean slate, then send everything.
        self.vm.pause();
        let started = self.vm.start_dirty_tracking();
        self.vm.resume();
        started?;
        let total_pages = self.vm.shape().memory_end() / PAGE as u64;
        self.status.precopy_pages_sent.store(0, Ordering::Relaxed);
        self.status
            .precopy_pages_total
            .store(total_pages, Ordering::Relaxed);
        let mut round_pages: Vec<u64> = (0..total_pages).collect();
        for round in 0..=self.cfg.precopy_max_rounds {
            let t = Instant::now();
            let mut bytes = 0u64;
            for chunk in round_pages.chunks(4096) {
                let mut data = vec![0u8; chunk.len() * PAGE];
                copy_pages(&self.vm, chunk, &mut data)?;
                let mut buf = Vec::with_capacity(data.len() / 2);
                let mut tally = EpochTally::new(0);
                self.encoder
                    .encode_pages(0, chunk, &data, &mut buf, &mut tally)?;
                bytes += buf.len() as u64;
                if out
                    .blocking_send(Outgoing {
                        epoch: 0,
                        paused_at: Instant::now(),
                        data: buf,
                        end: Vec::new(),
                    })
                    .is_err()
                {
                    return Err(self.session_failure(board));
                }
                if round == 0 {
                    self.status
                        .precopy_pages_sent
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
            log::info!(
                "pre-copy round {round}: {} pages, {} KiB on the wire, {:?}",
                round_pages.len(),
                bytes >> 10,
                t.elapsed()
            );
            self.status.wire_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.vm.pause();
            let dirty = self.vm.harvest_dirty();
            self.vm.resume();
            round_pages = dirty_pages(&dirty?);
            if round_pages.len() < self.cfg.precopy_stop_pages {
                break;
            }
        }
        Ok(round_pages)
    }
}

/// Page numbers (guest-physical address / 4 KiB) of a dirty set, ascending.
pub fn dirty_pages(set: &castor_vmm::DirtySet) -> Vec<u64> {
    let mut v = Vec::with_capacity(set.count() as usize);
    v.extend(set.iter().map(|gpa| gpa / PAGE as u64));
    v
}

/// Copies `pages` (ascending page numbers) into `out`, one call per run.
pub fn copy_pages(vm: &Vm, pages: &[u64], out: &mut [u8]) -> Result<(), PrimaryError> {
    let mem = vm.memory();
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[j - 1] + 1 {
            j += 1;
        }
        mem.read_slice(
            &mut out[i * PAGE..j * PAGE],
            GuestAddress(pages[i] * PAGE as u64),
        )
        .map_err(|e| {
            PrimaryError::Vmm(castor_vmm::Error::Memory(format!(
                "copying pages {}..{}: {e}",
                pages[i],
                pages[j - 1] + 1
            )))
        })?;
        i = j;
    }
    Ok(())
}

/// BLAKE3 digest of all guest memory, regions in address order.
pub fn memory_digest(mem: &castor_vmm::GuestMemoryMmap) -> [u8; 32] {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for r in mem.iter() {
        let mut off = 0u64;
        while off < r.len() {
            let n = ((r.len() - off) as usize).min(buf.len());
            if mem
                .read_slice(&mut buf[..n], GuestAddress(r.start_addr().0 + off))
                .is_err()
            {
                buf[..n].fill(0xee);
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    *h.finalize().as_bytes()
}
