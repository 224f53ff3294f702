//! A replica VM's output plumbing: the VMs a backup (or a migration target)
//! builds are wired to sinks that refuse output until a takeover connects
//! them, and get the same devices as the primary's guest (for its device
//! state to restore), on this host.

use crate::mac::MacAddr;
use crate::net::{open_tap, NetError, NetTxSink, TapPolicy};
use crate::sinks::{BufferedSink, SwitchSink, SwitchTxSink};
use castor_net_buffer::OutputBuffer;
use castor_replicator::backup::VmFactory;
use castor_replicator::primary::Release;
use castor_vmm::devices::{BlkConfig, NetConfig, Tap, TxSink, VirtioBlk, VirtioNet};
use castor_vmm::{DirtyTracking, Vm, VmConfig, VmShape};
use std::sync::Arc;

/// The replica's virtio-net device on this host.
pub struct ReplicaNet {
    /// This host's tap, on the same L2 segment as the primary's.
    pub tap: Arc<Tap>,
    /// The device's TX sink: refuses frames until a takeover.
    pub tx: Arc<SwitchTxSink>,
    /// The guest's MAC (as on the primary).
    pub mac: MacAddr,
}

impl ReplicaNet {
    /// Opens (and brings up) the tap `tap` for a guest at `mac` (created
    /// when missing only if `policy` says so).
    pub fn open(tap: &str, mac: MacAddr, policy: TapPolicy) -> Result<Self, NetError> {
        Ok(ReplicaNet {
            tap: Arc::new(open_tap(tap, policy)?),
            tx: Arc::new(SwitchTxSink::default()),
            mac,
        })
    }
}

/// The output plumbing of every replica VM this process creates: one record
/// sink and, for a network guest, one tap (a tap without multi-queue takes
/// one opener at a time).
#[derive(Default)]
pub struct ReplicaIo {
    records: Arc<SwitchSink>,
    net: Option<ReplicaNet>,
    disk: Option<BlkConfig>,
}

impl ReplicaIo {
    /// Plumbing for a guest with the network device `net`, if any.
    pub fn new(net: Option<ReplicaNet>) -> Self {
        ReplicaIo {
            records: Arc::new(SwitchSink::default()),
            net,
            disk: None,
        }
    }

    /// Gives every replica VM a virtio-blk device on this host's image
    /// `disk` (after the network device, as on the primary): checkpoints
    /// write the guest's blocks there, and a takeover runs on it.
    pub fn with_disk(mut self, disk: Option<BlkConfig>) -> Self {
        self.disk = disk;
        self
    }

    /// The network device, if any.
    pub fn net(&self) -> Option<&ReplicaNet> {
        self.net.as_ref()
    }

    /// Builds a paused replica VM of `shape`: output refused, devices as the
    /// primary's.
    pub fn build_vm(
        &self,
        shape: &VmShape,
        dirty_tracking: DirtyTracking,
    ) -> Result<Arc<Vm>, castor_vmm::Error> {
        let vm = Vm::new(
            &VmConfig {
                vcpus: shape.vcpus,
                mem_bytes: shape.memory_end(),
                dirty_tracking,
                ..VmConfig::default()
            },
            self.records.clone(),
        )?;
        if let Some(n) = &self.net {
            // The same device as the primary's, on this host's tap.
            let tx: Arc<dyn TxSink> = n.tx.clone();
            vm.devices()
                .add_virtio_net(VirtioNet::new(NetConfig {
                    tap: n.tap.clone(),
                    mac: n.mac.octets(),
                    tx_sink: Some(tx),
                }))
                .map_err(|e| castor_vmm::Error::InvalidConfig(format!("virtio-net: {e}")))?;
        }
        if let Some(d) = &self.disk {
            let blk = VirtioBlk::open(d)
                .map_err(|e| castor_vmm::Error::InvalidConfig(format!("virtio-blk: {e}")))?;
            vm.devices()
                .add_virtio_blk(blk)
                .map_err(|e| castor_vmm::Error::InvalidConfig(format!("virtio-blk: {e}")))?;
        }
        Ok(Arc::new(vm))
    }

    /// [`ReplicaIo::build_vm`] as the replicator's VM factory.
    pub fn vm_factory(self: &Arc<Self>, dirty_tracking: DirtyTracking) -> Box<VmFactory> {
        let io = self.clone();
        Box::new(move |shape| io.build_vm(shape, dirty_tracking))
    }

    /// Connects the replica's output (records and frames) to `buffer`, with
    /// pass-through output going to `release`.
    pub fn connect(&self, buffer: &Arc<OutputBuffer>, release: &Arc<dyn Release>) {
        self.records.connect(Arc::new(BufferedSink {
            buffer: buffer.clone(),
            release: release.clone(),
        }));
        if let Some(n) = &self.net {
            n.tx.connect(Arc::new(NetTxSink::new(buffer.clone(), release.clone())));
        }
    }
}
