//! Takeover: restore the committed checkpoint into the replica machine.

use super::*;
use std::time::Instant;

impl Backup {
    /// Takes over: restores the last committed checkpoint into the replica
    /// machine's parts (its memory is already in place) and hands back the
    /// VM, still paused, with the checkpoint's held output for re-emission.
    pub fn take_over(&mut self) -> Result<Takeover, BackupError> {
        let replica = self.replica.as_ref().ok_or(BackupError::NothingCommitted)?;
        let machine = self.machine.as_ref().ok_or(BackupError::NothingCommitted)?;
        if !replica.has_state() {
            return Err(BackupError::NothingCommitted);
        }
        let t = Instant::now();
        replica.restore()?;
        #[cfg(feature = "fault-injection")]
        if let Some(Ok(f)) = machine.vm.devices().disk().map(|d| d.file()) {
            crate::disk_digest::record("takeover", replica.committed_epoch(), &f);
        }
        let held = machine.output.restored().unwrap_or_default();
        Ok(Takeover {
            vm: machine.vm.clone(),
            epoch: replica.committed_epoch(),
            output: CommittedOutput {
                items: held.items,
                next_seq: held.next_seq,
            },
            restore: t.elapsed(),
        })
    }
}

/// What [`Backup::take_over`] returns.
pub struct Takeover {
    /// The restored VM, paused: resume it after re-emitting `output`.
    pub vm: Arc<Vm>,
    /// The epoch it was restored from.
    pub epoch: u64,
    /// The held output of that checkpoint.
    pub output: CommittedOutput,
    /// How long the state restore took.
    pub restore: Duration,
}
