//! The daemons' async runtime (QUIC, heartbeats, acks), their HTTP endpoint
//! (`/metrics`, `/status`, the status page: [`crate::http`]) and their
//! control socket ([`crate::control`]).

use crate::status::StatusBoard;
use std::net::SocketAddr;
use std::sync::Arc;

/// The runtime, the endpoint or the control socket could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The tokio runtime could not be built.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The Prometheus recorder could not be installed.
    #[error("metrics recorder: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    /// The HTTP endpoint could not listen.
    #[error("http endpoint {addr}: {source}")]
    Listen {
        /// Its address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control socket.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
}

/// The daemons' async runtime (2 workers: QUIC, heartbeats, acks).
pub fn daemon_runtime() -> Result<tokio::runtime::Runtime, RuntimeError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Starts what shows the daemon to an operator: the status sampler, the
/// HTTP endpoint on `listen` (Prometheus recorder, `/metrics`, `/status`,
/// the status page), if any, and the control socket at `control`, if any.
pub fn start_endpoints(
    rt: &tokio::runtime::Runtime,
    board: &Arc<StatusBoard>,
    listen: Option<SocketAddr>,
    control: Option<&crate::control::SocketConfig>,
) -> Result<(), RuntimeError> {
    board.start_sampler()?;
    if let Some(addr) = listen {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
        let listener = {
            let _g = rt.enter();
            let std = std::net::TcpListener::bind(addr)
                .map_err(|source| RuntimeError::Listen { addr, source })?;
            std.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(std)
                .map_err(|source| RuntimeError::Listen { addr, source })?
        };
        let upkeep = handle.clone();
        rt.spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        });
        rt.spawn(crate::http::serve(listener, Some(handle), board.clone()));
        log::info!(
            "status page on {}, JSON on http://{addr}/status, metrics on http://{addr}/metrics",
            crate::http::url(addr)
        );
    }
    match control {
        None => {}
        Some(c) if c.explicit => crate::control::start(&c.path, board.clone())?,
        Some(c) => {
            if let Err(e) = crate::control::start(&c.path, board.clone()) {
                log::warn!(
                    "{e}; running without a control socket (set [control] socket to choose one)"
                );
            }
        }
    }
    Ok(())
}
