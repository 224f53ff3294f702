//! The in-process loopback replication set-up shared by the benchmarks: a
//! runtime, a key pair per side, and the backup's listener.

use castor_replicator::transport::{self, Identity, Listener, TransportConfig};
use std::net::SocketAddr;

/// What [`loopback`] sets up.
pub struct Loopback {
    /// The primary side's async runtime (the listener lives on it).
    pub rt: tokio::runtime::Runtime,
    /// The primary's key pair.
    pub primary: Identity,
    /// The backup's key pair.
    pub backup: Identity,
    /// The backup's listener on 127.0.0.1, accepting only `primary`.
    pub listener: Listener,
    /// Its address.
    pub addr: SocketAddr,
}

/// Builds a runtime, two identities and a backup listener on loopback.
pub fn loopback() -> Result<Loopback, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let primary = Identity::generate("primary").map_err(|e| format!("identity: {e}"))?;
    let backup = Identity::generate("backup").map_err(|e| format!("identity: {e}"))?;
    let listener = {
        let _g = rt.enter();
        transport::listen(
            ([127, 0, 0, 1], 0).into(),
            &backup,
            &primary.cert(),
            &TransportConfig::default(),
        )
        .map_err(|e| format!("backup listen: {e}"))?
    };
    let addr = listener
        .local_addr()
        .map_err(|e| format!("backup address: {e}"))?;
    Ok(Loopback {
        rt,
        primary,
        backup,
        listener,
        addr,
    })
}
