//! One liveness rule across sessions: a backup that holds a committed
//! replica takes over if and only if nothing from the primary (a frame, a
//! datagram, an authenticated connection) arrived for `peer_timeout`,
//! however the last session ended: a protocol error, a refused Hello, a
//! failed handshake, a stalled phase or a closed connection all send the
//! backup back to accepting *with the deadline still running*, never to an
//! unwatched `accept`.

use super::*;
use crate::transport::Listener;
use std::time::Instant;

impl Backup {
    /// Serves primaries from `listener`, one session at a time, handshakes
    /// completing concurrently (each within `handshake_timeout`), until the
    /// primary is gone while a committed replica exists (then returns why,
    /// and the caller takes over) or a detach is requested (the primary, if
    /// in session, is told goodbye; never a takeover). `events` sees each
    /// session start and end.
    pub async fn guard(
        &mut self,
        listener: &Listener,
        mut events: impl FnMut(&Self, GuardEvent<'_>),
    ) -> GuardEnd {
        let mut incoming = listener.incoming(self.cfg.handshake_timeout);
        let detach = self.detach.clone();
        loop {
            if detach.is_requested() {
                return GuardEnd::Detached;
            }
            let deadline = (self.committed_epoch() > 0)
                .then(|| self.last_heard.unwrap_or_else(Instant::now) + self.cfg.peer_timeout);
            let next = match deadline {
                Some(d) => {
                    tokio::select! {
                        biased;
                        _ = detach.requested() => return GuardEnd::Detached,
                        c = incoming.recv() => c,
                        _ = tokio::time::sleep_until(d.into()) => {
                            let silent = self
                                .last_heard
                                .map_or(self.cfg.peer_timeout, |h| h.elapsed());
                            return GuardEnd::PrimaryLost(Lost::Silent(silent));
                        }
                    }
                }
                None => tokio::select! {
                    biased;
                    _ = detach.requested() => return GuardEnd::Detached,
                    c = incoming.recv() => c,
                },
            };
            let conn = match next {
                None => return GuardEnd::PrimaryLost(Lost::ConnectionClosed),
                Some(Err(e)) => {
                    log::warn!("refused a connection: {e}");
                    continue;
                }
                Some(Ok(c)) => c,
            };
            events(self, GuardEvent::Started(conn.remote_address()));
            let end = self.serve(conn).await;
            if let Ok(SessionEnd::PrimaryLost(why)) = &end {
                log::warn!(
                    "session ended ({why}); the primary was last heard {:?} ago",
                    self.last_heard.map(|h| h.elapsed()).unwrap_or_default()
                );
            }
            events(self, GuardEvent::Ended(&end));
            match end {
                Ok(SessionEnd::Detached) => return GuardEnd::Detached,
                // The primary's process is gone (its host said so): no
                // timeout to wait out.
                Ok(SessionEnd::PrimaryLost(Lost::PortClosed)) if self.committed_epoch() > 0 => {
                    return GuardEnd::PrimaryLost(Lost::PortClosed)
                }
                _ => {}
            }
        }
    }
}

/// How [`Backup::guard`] ended.
#[derive(Debug, thiserror::Error)]
pub enum GuardEnd {
    /// The primary is gone and a committed replica exists: take over.
    #[error("primary lost: {0}")]
    PrimaryLost(Lost),
    /// This backup detached on purpose (the primary, if in session, was
    /// told): exit, never take over.
    #[error("detached on purpose")]
    Detached,
}

/// What [`Backup::guard`] reports as it goes.
#[derive(Debug)]
pub enum GuardEvent<'a> {
    /// A session with the primary at this address starts.
    Started(std::net::SocketAddr),
    /// A session ended so.
    Ended(&'a Result<SessionEnd, BackupError>),
}
