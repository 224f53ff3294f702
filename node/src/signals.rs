//! SIGTERM for a daemon: a backup guarding its primary detaches gracefully
//! (says goodbye, never takes over); any other daemon state ends the
//! process as SIGTERM's default would.

use std::sync::Arc;

/// What SIGTERM does right now.
pub trait OnTerm: Send + Sync + 'static {
    /// Handles one SIGTERM; false when the daemon has nothing graceful to do
    /// (the process then exits with status 143, as SIGTERM's default).
    fn term(&self) -> bool;
}

/// A backup's board: SIGTERM requests the planned detach while it guards
/// a primary.
impl OnTerm for crate::StatusBoard {
    fn term(&self) -> bool {
        match self.request_detach() {
            Some(_) => {
                log::warn!("SIGTERM: detaching gracefully (the primary runs on unprotected)");
                true
            }
            None => false,
        }
    }
}

/// Installs the SIGTERM handler on `rt`.
pub fn on_sigterm(rt: &tokio::runtime::Runtime, handler: Arc<dyn OnTerm>) -> std::io::Result<()> {
    let mut term = {
        let _g = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?
    };
    rt.spawn(async move {
        while term.recv().await.is_some() {
            if !handler.term() {
                log::warn!("SIGTERM: exiting");
                crate::systemd::notify_stopping();
                std::process::exit(143);
            }
        }
    });
    Ok(())
}
