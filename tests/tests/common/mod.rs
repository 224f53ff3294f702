//! Set-up shared by the in-process replication tests: a tokio runtime, the
//! pair's identities and a backup listener on loopback.

use castor_replicator::transport::{self, Identity, Listener, TransportConfig};
use std::net::SocketAddr;

/// The primary's side of an in-process pair.
pub struct Loopback {
    /// The primary's runtime.
    pub rt: tokio::runtime::Runtime,
    /// The primary's identity.
    pub pid: Identity,
    /// The backup's identity.
    pub bid: Identity,
    /// Where the backup listens.
    pub addr: SocketAddr,
}

/// A runtime with `workers` threads, identities for both sides, and the
/// backup's listener (pinned to the primary's certificate) on loopback.
pub fn loopback(workers: usize) -> (Loopback, Listener) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    let pid = Identity::generate("primary").unwrap();
    let bid = Identity::generate("backup").unwrap();
    let listener = {
        let _g = rt.enter();
        transport::listen(
            "127.0.0.1:0".parse().unwrap(),
            &bid,
            &pid.cert(),
            &TransportConfig::default(),
        )
        .unwrap()
    };
    let addr = listener.local_addr().unwrap();
    (Loopback { rt, pid, bid, addr }, listener)
}

/// A backup's replica factory for the record guest: a plain VM of the shape
/// the primary announces (no devices).
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn plain_replica() -> Box<castor_replicator::backup::VmFactory> {
    Box::new(|shape| {
        Ok(std::sync::Arc::new(castor_vmm::Vm::new(
            &castor_vmm::VmConfig {
                vcpus: shape.vcpus,
                mem_bytes: shape.memory_end(),
                ..castor_vmm::VmConfig::default()
            },
            std::sync::Arc::new(castor_vmm::NullSink),
        )?))
    })
}

/// The backup thread's own runtime (one worker: a backup's session loop).
#[allow(dead_code)]
pub fn backup_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}
