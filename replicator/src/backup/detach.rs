//! A planned detach: the backup leaves the pair on purpose (SIGTERM,
//! `castor ctl SOCKET detach`) and says goodbye, so its primary runs on
//! unprotected instead of applying its backup-loss policy. A detaching
//! backup never takes over.

use tokio::sync::watch;

/// Asks a [`Backup`](super::Backup) to detach: the session in progress (if
/// any) sends the primary an `Error` frame with [`ErrorCode::Detach`]
/// (`crate::wire::ErrorCode`), finishes its streams and ends, and
/// [`Backup::guard`](super::Backup::guard) returns
/// [`GuardEnd::Detached`](super::GuardEnd::Detached) instead of ever
/// taking over. Cloneable; a request is remembered (a guard that starts
/// later returns at once).
#[derive(Clone, Debug)]
pub struct DetachHandle(watch::Sender<bool>);

impl Default for DetachHandle {
    fn default() -> Self {
        DetachHandle(watch::Sender::new(false))
    }
}

impl DetachHandle {
    /// Requests the detach. Returns false if it had been requested already.
    pub fn request(&self) -> bool {
        !self.0.send_replace(true)
    }

    /// Whether a detach was requested.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once a detach is requested (at once if it already was).
    pub(super) async fn requested(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = rx.wait_for(|d| *d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::DetachHandle;

    #[tokio::test]
    async fn a_request_is_remembered_and_wakes_every_waiter() {
        let h = DetachHandle::default();
        assert!(!h.is_requested());
        let waiter = {
            let h = h.clone();
            tokio::spawn(async move { h.requested().await })
        };
        assert!(h.request());
        assert!(!h.request(), "a second request is not new");
        waiter.await.expect("the waiter wakes");
        // A waiter that starts after the request returns at once.
        h.requested().await;
        assert!(h.is_requested());
    }
}
