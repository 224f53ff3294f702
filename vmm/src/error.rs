//! The VMM's error type.

use thiserror::Error;

/// Everything that can go wrong in the VMM.
#[derive(Debug, Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm ({0}): Castor needs KVM; check that the kvm module is loaded and that you may open /dev/kvm")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The KVM on this host lacks something Castor needs.
    #[error("KVM lacks {0}")]
    MissingCapability(&'static str),
    /// The VM configuration is invalid; the message says what to fix.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest image is not a loadable ELF.
    #[error("guest image: {0}")]
    Image(String),
    /// A saved state does not fit this VM.
    #[error("state does not fit this VM: {0}")]
    StateMismatch(String),
    /// The guest's state needs what this host cannot give it.
    #[error("this host cannot run the guest's state: {0}")]
    HostMismatch(#[from] crate::host::HostMismatch),
    /// A vCPU thread could not be started.
    #[error("cannot start vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The VM is in the wrong run state for the request.
    #[error("{0}")]
    WrongState(&'static str),
    /// Dirty tracking failed or is unavailable.
    #[error("dirty tracking: {0}")]
    DirtyTracking(#[from] castor_dirty_tracking::Error),
    /// Booting a Linux guest failed.
    #[error(transparent)]
    Linux(#[from] crate::linux::LinuxError),
}

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}

/// Result with the VMM's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
