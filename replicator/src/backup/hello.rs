//! Session start: the Hello exchange, protocol version negotiation, the
//! manifest check against a candidate replica, and refusals that reach the
//! primary before the connection closes.

use super::session::BadFrame;
use super::*;
use crate::manifest::Manifest;
use crate::transport::{Connection, FrameSender};
use crate::wire::{self, Body, Frame, Hello, Role};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

impl Backup {
    /// Sends an Error frame with `code`, lets it reach the peer (finish the
    /// stream, give the peer a moment to read it and close), then closes the
    /// connection with the same code.
    async fn refuse(conn: &Connection, ctl_tx: &mut FrameSender, code: ErrorCode, message: &str) {
        log::error!("refusing the primary {}: {message}", conn.remote_address());
        metrics::counter!("castor_backup_refusals_total").increment(1);
        let _ = ctl_tx
            .send(&Frame::new(
                0,
                Body::Error(wire::ErrorFrame {
                    code: code.as_u16(),
                    message: message.chars().take(1000).collect(),
                }),
            ))
            .await;
        let _ = ctl_tx.finish();
        let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
        conn.close(code.close_code(), "refused");
    }

    async fn refused(
        conn: &Connection,
        ctl_tx: &mut FrameSender,
        why: Refusal,
    ) -> Result<SessionEnd, BackupError> {
        Self::refuse(conn, ctl_tx, why.code(), &why.to_string()).await;
        Ok(SessionEnd::Refused(why))
    }

    /// Serves one primary connection until it ends. Every phase before the
    /// data stream has a deadline ([`BackupConfig::handshake_timeout`]).
    ///
    /// While this backup holds a live committed replica, only its pair's
    /// session is served: a Hello of another session (another guest) is
    /// refused ([`Refusal::Occupied`]) and the replica stays untouched.
    pub async fn serve(&mut self, mut conn: Connection) -> Result<SessionEnd, BackupError> {
        // An authenticated connection (the pinned primary certificate) is a
        // sign of life.
        // (Unless it turns out to be another guest's Hello: see below.)
        let heard_before = self.last_heard;
        self.heard_at(Instant::now());
        let limit = self.cfg.handshake_timeout;
        let (mut ctl_tx, mut ctl_rx) = tokio::time::timeout(limit, conn.accept_control())
            .await
            .map_err(|_| BackupError::HelloTimeout(limit))??;
        let hello = match tokio::time::timeout(limit, ctl_rx.recv_owned()).await {
            Err(_) => return Err(BackupError::HelloTimeout(limit)),
            Ok(Err(e)) => {
                if let Some(w @ wire::WireError::UnsupportedVersion { .. }) = e.wire_error() {
                    let why = Refusal::Header(w.clone());
                    return Self::refused(&conn, &mut ctl_tx, why).await;
                }
                return Err(e.into());
            }
            Ok(Ok(r)) => r.ok_or(BackupError::ClosedBeforeHello)?,
        };
        let hello_at = Instant::now();
        let Body::Hello(h) = hello.body else {
            self.heard_at(hello_at);
            return Err(BackupError::UnexpectedFrame(hello.body.frame_type()));
        };
        if h.role != Role::Primary {
            self.heard_at(hello_at);
            return Err(BackupError::NotPrimary);
        }
        // A valid Hello of another session is another guest (a restarted
        // primary daemon boots a new one): it is not the pair's primary
        // alive, and it may not replace the committed replica of the pair's
        // guest, which is taken over if its primary stays silent.
        let live_replica =
            self.committed_epoch() > 0 && !self.replica.as_ref().is_some_and(Replica::is_diverged);
        if live_replica && h.session_id != self.session_id {
            self.last_heard = heard_before;
            let why = Refusal::Occupied {
                session: self.session_id,
                committed: self.committed_epoch(),
            };
            log::error!(
                "refusing a primary of another session {:#x}: {why}",
                h.session_id
            );
            return Self::refused(&conn, &mut ctl_tx, why).await;
        }
        self.heard_at(hello_at);
        let Some(version) = h.versions.common_max(&self.cfg.protocol) else {
            let why = Refusal::Versions {
                primary: h.versions,
                backup: self.cfg.protocol,
            };
            return Self::refused(&conn, &mut ctl_tx, why).await;
        };
        let manifest = match Manifest::decode(&h.manifest) {
            Ok(m) => m,
            Err(e) => return Self::refused(&conn, &mut ctl_tx, e.into()).await,
        };
        let shape = manifest.shape();
        // A diverged replica is never resumed: the primary gets a new session
        // (a full sync) in this backup's Hello.
        let diverged = self.replica.as_ref().is_some_and(Replica::is_diverged);
        let same_session = h.session_id == self.session_id
            && self.machine.as_ref().is_some_and(|m| m.vm.shape() == shape)
            && self.committed_epoch() > 0
            && !diverged;
        // Validate against a candidate machine; the committed replica (if
        // any) is kept untouched until the manifest is accepted.
        let candidate = if same_session {
            None
        } else {
            match self.machine.as_ref() {
                Some(m) if m.vm.shape() == shape => None,
                _ => Some(ReplicaMachine::new((self.factory)(&shape)?)),
            }
        };
        let check = match (&candidate, &self.machine) {
            (Some(c), _) | (None, Some(c)) => manifest.check_against(&c.vm, &c.parts),
            (None, None) => return Err(BackupError::NoReplica),
        };
        if let Err(e) = check {
            return Self::refused(&conn, &mut ctl_tx, e.into()).await;
        }
        if !same_session {
            log::info!(
                "new replication session {:#x} from {} (protocol {version}): {} vCPUs, {} MiB, {} parts, tracker {}",
                h.session_id,
                conn.remote_address(),
                shape.vcpus,
                shape.memory.iter().map(|r| r.size).sum::<u64>() >> 20,
                manifest.parts.len(),
                h.tracker
            );
            if let Some(c) = candidate {
                self.machine = Some(c);
            }
            let m = self.machine.as_ref().ok_or(BackupError::NoReplica)?;
            let mut replica = Replica::new(m.vm.memory().clone(), &shape, m.parts.clone());
            if let Some(disk) = m.vm.devices().disk() {
                // The replica VM's disk is this host's image: blocks are
                // written there at commit, through a handle of its own.
                let file = disk.writer().map_err(BackupError::DiskImage)?;
                replica.set_disk(crate::disk::ReplicaDisk::new(file, disk.capacity_bytes()));
            }
            self.replica = Some(replica);
            // A replica that diverged is replaced: the fresh one answers
            // with committed epoch 0, so the primary synchronises fully.
            if diverged {
                log::error!("the replica diverged from the primary: full resynchronisation");
                metrics::counter!("castor_backup_full_resyncs_total").increment(1);
            }
            self.session_id = h.session_id;
        } else {
            log::info!(
                "primary {} resumes session {:#x} from committed epoch {} (protocol {version})",
                conn.remote_address(),
                h.session_id,
                self.committed_epoch()
            );
        }
        let replica = self.replica.as_mut().ok_or(BackupError::NoReplica)?;
        replica.expect_any_next();
        let limits = replica.limits().clone();
        conn.set_limits(limits.clone());
        conn.set_version(version);
        ctl_rx.set_limits(limits);
        ctl_tx.set_version(version);
        let reply = Hello {
            versions: VersionRange::only(version),
            role: Role::Backup,
            tracker: h.tracker.clone(),
            epoch_interval_ms: h.epoch_interval_ms,
            session_id: self.session_id,
            resume_from_epoch: replica.committed_epoch(),
            generation: 0,
            manifest: Vec::new(),
        };
        ctl_tx.send(&Frame::new(0, Body::Hello(reply))).await?;
        let data_rx = tokio::time::timeout(limit, conn.accept_data())
            .await
            .map_err(|_| BackupError::HelloTimeout(limit))??;
        let conn = Arc::new(conn);
        let bad_frame: BadFrame = Arc::new(std::sync::Mutex::new(None));
        let start = Instant::now();
        let arrived = Arc::new(AtomicU64::new(0));
        let mut end = self
            .session(
                conn.clone(),
                ctl_tx,
                ctl_rx,
                data_rx,
                bad_frame.clone(),
                (start, arrived.clone()),
            )
            .await;
        // The primary was last heard when the session's last frame or
        // datagram arrived: the liveness rule carries across sessions.
        self.heard_at(start + Duration::from_nanos(arrived.load(Ordering::Acquire)));
        // A malformed frame tears the connection down from both ends; whatever
        // failed first here, the malformed frame is the cause.
        if let Ok(SessionEnd::PrimaryLost(_)) = &end {
            if let Some(w) = bad_frame.lock().unwrap_or_else(|e| e.into_inner()).take() {
                self.status.discarded.fetch_add(1, Ordering::Relaxed);
                end = Ok(SessionEnd::ProtocolError(Box::new(BackupError::Malformed(
                    w,
                ))));
            }
        }
        match &end {
            Ok(SessionEnd::ProtocolError(why)) => {
                log::warn!(
                    "replication session ended: {why}; keeping committed epoch {}",
                    self.committed_epoch()
                );
                conn.close(ErrorCode::BadData.close_code(), "checkpoint refused");
            }
            Ok(SessionEnd::PrimaryLost(why)) => {
                log::warn!("primary lost: {why}");
                conn.close(ErrorCode::PeerLost.close_code(), "primary lost");
            }
            // Closed by the goodbye, with its own code.
            Ok(SessionEnd::Refused(_)) | Ok(SessionEnd::Detached) => {}
            Err(_) => conn.close(ErrorCode::Internal.close_code(), "backup error"),
        }
        end
    }
}
