//! The daemons' async runtime (QUIC, heartbeats, acks) and their Prometheus
//! metrics endpoint.

use std::net::SocketAddr;

/// The runtime or the metrics endpoint could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The tokio runtime could not be built.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The Prometheus endpoint could not be started.
    #[error("metrics endpoint: {addr}: {source}")]
    Metrics {
        /// Its address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: metrics_exporter_prometheus::BuildError,
    },
}

/// Starts the Prometheus endpoint on `listen`, if any (call inside a tokio
/// runtime: the HTTP listener runs on it).
pub fn start_metrics(listen: Option<SocketAddr>) -> Result<(), RuntimeError> {
    if let Some(addr) = listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|source| RuntimeError::Metrics { addr, source })?;
        log::info!("metrics on http://{addr}/metrics");
    }
    Ok(())
}

/// The daemons' async runtime (2 workers: QUIC, heartbeats, acks), with the
/// Prometheus endpoint started on it when `metrics` is set.
pub fn daemon_runtime(
    metrics: Option<SocketAddr>,
) -> Result<tokio::runtime::Runtime, RuntimeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    {
        let _g = rt.enter();
        start_metrics(metrics)?;
    }
    Ok(rt)
}
