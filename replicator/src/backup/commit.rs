//! Routing an epoch's frames into assemblers, committing complete epochs in
//! order and acknowledging them.

use super::*;
use crate::checkpoint::EpochAssembler;
use crate::primary::memory_digest;
use crate::transport::FrameSender;
use crate::wire::{self, Body, BodyRef, Frame, FrameType};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl Backup {
    pub(super) async fn on_frame(
        &mut self,
        raw: &[u8],
        limits: &wire::Limits,
        pending: &mut BTreeMap<u64, EpochAssembler>,
        ctl_tx: &mut FrameSender,
    ) -> Result<(), BackupError> {
        let replica = self.replica.as_mut().ok_or(BackupError::NoReplica)?;
        let (frame, _) = wire::decode(raw, limits).map_err(CheckpointError::from)?;
        let t = frame.header.frame_type;
        match (&frame.body, frame.epoch()) {
            (BodyRef::Heartbeat(_), _) => return Ok(()),
            (BodyRef::Error { code, message }, _) => {
                return Err(BackupError::Peer {
                    code: *code,
                    message: (*message).to_owned(),
                })
            }
            (BodyRef::PageBatch(b), 0) => {
                replica.apply_sync_batch(b)?;
                return Ok(());
            }
            (BodyRef::DiskBatch(b), 0) => {
                replica.apply_sync_disk(b)?;
                return Ok(());
            }
            _ if t == FrameType::EpochEnd || t.is_epoch_data() => {}
            _ => return Err(BackupError::UnexpectedFrame(t)),
        }
        let e = frame.epoch();
        if e <= replica.committed_epoch() {
            return Err(BackupError::StaleEpoch {
                epoch: e,
                committed: replica.committed_epoch(),
            });
        }
        if !pending.contains_key(&e) && pending.len() >= self.cfg.max_epochs_buffered {
            return Err(BackupError::TooManyEpochs(self.cfg.max_epochs_buffered));
        }
        // One cap for everything buffered, whatever the number of epochs.
        // The worst legitimate epoch carries every page raw (and every block
        // of a protected disk): never refuse that.
        let cap = self.cfg.max_epoch_bytes.max(
            largest_epoch_bytes(replica.limits()).saturating_add(replica.largest_disk_bytes()),
        );
        let buffered: usize = pending.values().map(EpochAssembler::buffered_bytes).sum();
        if buffered + raw.len() > cap {
            return Err(CheckpointError::TooLarge { epoch: e, cap }.into());
        }
        let asm = pending
            .entry(e)
            .or_insert_with(|| EpochAssembler::new(e, cap));
        asm.add(&frame, raw)?;
        // Commit, in order, every epoch that is complete.
        while let Some((&first, asm)) = pending.iter().next() {
            match asm.status() {
                None => break,
                Some(Err(err)) => return Err(err.into()),
                Some(Ok(())) => {}
            }
            if !replica.is_next(first) {
                break;
            }
            let Some(asm) = pending.remove(&first) else {
                break;
            };
            #[cfg(feature = "fault-injection")]
            if let Some(f) = self.cfg.fault {
                match f {
                    BackupFault::CorruptPage { epoch, page } if epoch == first => {
                        use vm_memory::{Bytes, GuestAddress};
                        let at = GuestAddress(page * wire::PAGE_SIZE as u64);
                        let mut b = [0u8; 1];
                        let mem = replica.memory();
                        if mem.read_slice(&mut b, at).is_ok() {
                            let _ = mem.write_slice(&[b[0] ^ 0xff], at);
                        }
                        log::warn!(
                            "fault injection: corrupted replica page {page} before epoch {epoch}"
                        );
                    }
                    BackupFault::FailResumes(n)
                        if n > 0
                            && replica.session_uncommitted()
                            && replica.committed_epoch() > 0 =>
                    {
                        self.cfg.fault = Some(BackupFault::FailResumes(n - 1));
                        log::warn!("fault injection: failing a resumed session before epoch {first} commits");
                        return Err(BackupError::Injected(f));
                    }
                    _ => {}
                }
            }
            let t = Instant::now();
            // Decoding, the dry run and the apply are CPU work: off the
            // runtime's worker, so heartbeats and the readers' arrival
            // stamps keep flowing during a long commit (a resync epoch).
            let info = match off_the_runtime(|| replica.commit(&asm, memory_digest)) {
                Ok(info) => info,
                Err(e @ CheckpointError::MemoryMismatch { .. }) => {
                    self.status.verify_failures.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("castor_verify_failures_total").increment(1);
                    log::error!("MEMORY VERIFICATION FAILED: {e}");
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
            if info.memory_verified {
                self.status.verified.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("castor_verify_ok_total").increment(1);
            }
            if let Some(log) = self.commit_log.as_mut() {
                log(first);
            }
            self.status.committed.store(first, Ordering::Relaxed);
            self.status.commits.fetch_add(1, Ordering::Relaxed);
            metrics::histogram!("castor_commit_seconds").record(t.elapsed().as_secs_f64());
            metrics::gauge!("castor_committed_epoch").set(first as f64);
            ctl_tx.send(&Frame::new(first, Body::Ack)).await?;
        }
        Ok(())
    }
}

/// The largest legitimate epoch on the wire for a guest: every page raw
/// with its entry overhead, plus 64 MiB for batch headers and sections.
pub(crate) fn largest_epoch_bytes(limits: &wire::Limits) -> usize {
    let pages = limits.max_page_count as usize;
    pages
        .saturating_mul(wire::PAGE_SIZE + wire::PAGE_ENTRY_OVERHEAD)
        .saturating_add(64 << 20)
}

/// Runs `f` on this thread with the runtime's other tasks moved to another
/// worker (`block_in_place`), where the runtime allows it.
fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
